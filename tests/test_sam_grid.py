"""SAM point grid on a tiny random SAM, and the vectorised mask operations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from retclip.images import SourceImage
from retclip.proposers import load_proposer
from retclip.proposers.mask_ops import mask_iou, mask_nms, stability_score
from retclip.proposers.sam_grid import SamGridProposer, low_res_boxes, point_grid
from retclip.vocabulary import Vocabulary
from tiny_detectors import save_sam


@pytest.fixture(scope="module")
def sam_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_sam(tmp_path_factory.mktemp("tiny-sam") / "sam")


def image() -> np.ndarray:
    return np.random.default_rng(3).integers(0, 256, (40, 56, 3), dtype=np.uint8)


def test_point_grid_is_cell_centres_in_xy_pixels() -> None:
    grid = point_grid(2, height=40, width=80)
    assert grid.tolist() == [[20.0, 10.0], [60.0, 10.0], [20.0, 30.0], [60.0, 30.0]]


def test_mask_iou_and_greedy_nms() -> None:
    masks = torch.zeros((4, 4, 10), dtype=torch.bool)
    masks[0, :, 0:4] = True  # A
    masks[1, :, 1:5] = True  # B: IoU(A, B) = 3/5
    masks[2, :, 3:7] = True  # C: IoU(A, C) = 1/7, IoU(B, C) = 2/6
    iou = mask_iou(masks)
    assert iou[0, 1].item() == pytest.approx(0.6) and iou[0, 2].item() == pytest.approx(1 / 7)
    assert iou[3].tolist() == [0, 0, 0, 0]  # empty mask: IoU 0, no division by zero
    scores = torch.tensor([0.9, 0.8, 0.7, 0.1])
    # B is suppressed by A; C overlaps only the suppressed B, so exact greedy NMS keeps it
    assert mask_nms(masks, scores, 0.3).tolist() == [0, 2, 3]
    assert mask_nms(masks, scores, 0.7).tolist() == [0, 1, 2, 3]
    assert mask_nms(masks[:0], scores[:0], 0.5).tolist() == []


def test_stability_score() -> None:
    logits = torch.tensor([[[3.0, 0.5, -0.5, -3.0]]])
    assert stability_score(logits, 0.0, 1.0).tolist() == [pytest.approx(1 / 3)]
    assert stability_score(logits, 0.0, 0.25).tolist() == [1.0]
    assert stability_score(logits, 0.0, 0.5).tolist() == [pytest.approx(1 / 2)]


def test_grid_is_class_agnostic_and_batches_points(sam_dir) -> None:
    proposer = SamGridProposer(
        str(sam_dir),
        points_per_side=5,
        points_per_batch=8,
        pred_iou_threshold=-1.0,
        stability_threshold=0.0,
        mask_nms_iou=1.0,
        min_area=0,
        device="cpu",
    )
    encoder, decoder = [0], [0]
    proposer.sam.model.vision_encoder.register_forward_hook(lambda *_: encoder.append(1))
    proposer.sam.model.mask_decoder.register_forward_hook(lambda *_: decoder.append(1))
    result = proposer.propose(SourceImage(image()), Vocabulary.from_string("ignored"))
    assert (sum(encoder), sum(decoder)) == (1, 4)  # 25 points in batches of 8
    assert result.class_hints is None and result.kept_classes is None
    assert result.masks.shape[1:] == (40, 56) and 0 < len(result) <= 75


def test_grid_filters_drop_masks(sam_dir) -> None:
    def run(**options: float) -> np.ndarray:
        settings = {"pred_iou_threshold": -1.0, "stability_threshold": 0.0, "min_area": 0}
        settings.update(options)
        proposer = load_proposer(
            "sam-grid", sam=str(sam_dir), points_per_side=4, mask_nms_iou=1.0, **settings
        )
        return proposer.propose(SourceImage(image()), Vocabulary.from_string("x")).scores

    everything = run()
    median_iou = float(np.median(everything))
    by_iou = run(pred_iou_threshold=median_iou)
    assert 0 < len(by_iou) < len(everything) and (by_iou > median_iou).all()
    assert len(run(stability_threshold=0.999)) < len(everything)
    assert len(run(pred_iou_threshold=2.0)) == 0
    assert len(run(min_area=40 * 56 + 1)) == 0


def test_low_res_boxes_scale_cells_to_pixels() -> None:
    masks = torch.zeros((2, 4, 8), dtype=torch.bool)
    masks[0, 1:3, 2:5] = True  # rows 1-2, cols 2-4 of a 4×8 grid over a 40×160 image
    boxes = low_res_boxes(masks, 40, 160)
    assert boxes.tolist() == [[40.0, 10.0, 100.0, 30.0], [0.0, 0.0, 0.0, 0.0]]


def grid(sam_dir: Path, **options: float) -> SamGridProposer:
    settings = dict(
        points_per_side=4,
        points_per_batch=8,
        pred_iou_threshold=-1.0,
        stability_threshold=0.0,
        mask_nms_iou=1.0,
        min_area=0,
        device="cpu",
    )
    settings.update(options)
    return SamGridProposer(str(sam_dir), **settings)  # type: ignore[arg-type]


def test_unfiltered_grid_equals_every_upscaled_candidate(sam_dir) -> None:
    proposer = grid(sam_dir)
    result = proposer.propose(SourceImage(image()), Vocabulary.from_string("x"))
    sam_image = proposer.sam.embed(image())
    logits, iou = proposer.sam.segment_points(sam_image, point_grid(4, 40, 56)[:8])
    rest, rest_iou = proposer.sam.segment_points(sam_image, point_grid(4, 40, 56)[8:])
    masks = torch.cat([logits, rest]).flatten(0, 1) > 0
    scores = torch.cat([iou, rest_iou]).flatten()
    order = torch.argsort(scores, descending=True)
    assert len(result) == 48
    np.testing.assert_array_equal(result.masks, masks[order].numpy())
    np.testing.assert_array_equal(result.scores, scores[order].clamp(0, 1).numpy())


def test_filters_run_on_low_res_logits_and_only_survivors_are_upscaled(sam_dir) -> None:
    proposer = grid(sam_dir, stability_offset=2e-6)  # the tiny SAM's logits are ~1e-6
    sam_image = proposer.sam.embed(image())
    low, iou = proposer.sam.point_logits(sam_image, point_grid(4, 40, 56)[:8])
    low2, iou2 = proposer.sam.point_logits(sam_image, point_grid(4, 40, 56)[8:])
    low, iou = torch.cat([low, low2]).flatten(0, 1), torch.cat([iou, iou2]).flatten()
    stable = stability_score(proposer.sam.valid_low_res(low, sam_image), 0.0, 2e-6)
    proposer.pred_iou_threshold = float(iou.median())
    proposer.stability_threshold = float(stable[iou > iou.median()].median())
    expected = (iou > proposer.pred_iou_threshold) & (stable >= proposer.stability_threshold)
    assert 0 < int(expected.sum()) < int((iou > iou.median()).sum())  # both filters bite

    rows: list[int] = []
    upscale = proposer.sam.upscale
    proposer.sam.upscale = lambda logits, im: (rows.append(len(logits)), upscale(logits, im))[1]
    result = proposer.propose(SourceImage(image()), Vocabulary.from_string("x"))
    assert len(result) == sum(rows) == int(expected.sum())  # only the survivors upscaled
    np.testing.assert_array_equal(
        np.sort(result.scores), np.sort(iou[expected].clamp(0, 1).numpy())
    )


def test_duplicates_are_removed_by_box_nms(sam_dir) -> None:
    everything = grid(sam_dir).propose(SourceImage(image()), Vocabulary.from_string("x"))
    deduplicated = grid(sam_dir, mask_nms_iou=0.3).propose(
        SourceImage(image()), Vocabulary.from_string("x")
    )
    assert 0 < len(deduplicated) < len(everything)
    assert deduplicated.scores[0] == everything.scores[0]  # the best one always survives
