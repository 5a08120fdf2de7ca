"""The fast mask tier: SAM 2.1 and EdgeTAM behind SamSegmenter, on tiny random models loaded
through the real loading code, against transformers' own pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import EdgeTamModel, Sam2Model, Sam2Processor

from retclip.errors import InputError
from retclip.images import SourceImage
from retclip.proposers import load_proposer
from retclip.proposers.sam import SamSegmenter, sam_model_type
from retclip.vocabulary import Vocabulary
from tiny_detectors import save_edgetam, save_grounding_dino, save_sam2

MODELS = {"sam2": Sam2Model, "edgetam": EdgeTamModel}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-fast-sam")
    return {
        "sam2": save_sam2(root / "sam2"),
        "edgetam": save_edgetam(root / "edgetam"),
        "gd": save_grounding_dino(root / "gd"),
    }


def image(seed: int = 0, shape: tuple[int, int] = (40, 70)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)


def reference(family: str, directory: Path, pixels: np.ndarray, multimask: bool, **prompts):
    """transformers' pipeline: processor → model(pixel_values, prompts) → post_process_masks."""
    processor = Sam2Processor.from_pretrained(directory)
    model = MODELS[family].from_pretrained(directory).eval()
    inputs = processor(images=pixels, **prompts, return_tensors="pt")
    with torch.inference_mode():
        out = model(
            pixel_values=inputs["pixel_values"],
            input_points=inputs.get("input_points"),
            input_labels=inputs.get("input_labels"),
            input_boxes=inputs.get("input_boxes"),
            multimask_output=multimask,
        )
    masks = processor.post_process_masks(out.pred_masks, inputs["original_sizes"])[0]
    return masks, out.iou_scores[0]


@pytest.mark.parametrize("family", ["sam2", "edgetam"])
def test_box_masks_match_the_transformers_pipeline(tiny, family) -> None:
    segmenter = SamSegmenter(str(tiny[family]), device="cpu")
    assert segmenter.model_type == family and sam_model_type(str(tiny[family])) == family
    pixels = image(2)
    boxes = torch.tensor([[2.0, 3.0, 30.0, 35.0], [10.0, 0.0, 69.0, 20.0], [0.0, 0.0, 70.0, 40.0]])
    masks, iou = segmenter.segment_boxes(segmenter.embed(pixels), boxes)
    expected, expected_iou = reference(
        family, tiny[family], pixels, False, input_boxes=[boxes.tolist()]
    )
    assert masks.shape == (3, 40, 70) and masks.dtype == torch.bool
    assert (masks == expected[:, 0]).float().mean().item() > 0.999
    torch.testing.assert_close(iou, expected_iou[:, 0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["sam2", "edgetam"])
def test_point_prompts_give_three_candidates_like_the_transformers_pipeline(tiny, family) -> None:
    segmenter = SamSegmenter(str(tiny[family]), device="cpu")
    pixels = image(3)
    points = torch.tensor([[10.0, 12.0], [50.0, 30.0]])
    logits, iou = segmenter.segment_points(segmenter.embed(pixels), points)
    expected, expected_iou = reference(
        family,
        tiny[family],
        pixels,
        True,
        input_points=[[[p] for p in points.tolist()]],
        input_labels=[[[1], [1]]],
    )
    assert logits.shape == (2, 3, 40, 70) and iou.shape == (2, 3)
    assert ((logits > 0) == expected).float().mean().item() > 0.999
    torch.testing.assert_close(iou, expected_iou, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["sam2", "edgetam"])
def test_fast_tier_behind_grounded_sam_and_the_grid(tiny, family) -> None:
    proposer = load_proposer(
        "grounded-sam",
        detector=str(tiny["gd"]),
        sam=str(tiny[family]),
        box_threshold=0.0,
        text_threshold=0.0,
        shortest_edge=64,
        longest_edge=96,
        min_area=0,
        device="cpu",
    )
    proposer.sam.prompt_batch = 4
    encoder, decoder = [0], [0]
    proposer.sam.model.vision_encoder.register_forward_hook(lambda *_: encoder.append(1))
    proposer.sam.model.mask_decoder.register_forward_hook(lambda *_: decoder.append(1))
    result = proposer.propose(SourceImage(image(1)), Vocabulary.from_string("cat, dog, car"))
    boxes = len(proposer.detector.detect(image(1), ["cat", "dog", "car"]).boxes)
    assert boxes > 4  # several decoder batches
    # embedded once; one decoder call per batch of (NMS-kept) boxes
    assert sum(encoder) == 1 and 1 < sum(decoder) <= -(-boxes // 4)
    assert result.masks.shape[1:] == (40, 70) and len(result) >= 1

    grid = load_proposer(
        "sam-grid",
        sam=str(tiny[family]),
        points_per_side=3,
        pred_iou_threshold=-1.0,
        stability_threshold=0.0,
        mask_nms_iou=1.0,
        min_area=0,
        device="cpu",
    )
    found = grid.propose(SourceImage(image(1)), Vocabulary.from_string("x"))
    assert found.class_hints is None and found.masks.shape[1:] == (40, 70) and len(found) >= 1


def test_a_model_that_is_not_a_mask_model_is_an_input_error(tiny) -> None:
    with pytest.raises(InputError, match="not a promptable mask model"):
        SamSegmenter(str(tiny["gd"]), device="cpu")
