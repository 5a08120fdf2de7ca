"""Mask AP equals pycocotools' COCOeval run directly on the same ground truth and detections."""

from __future__ import annotations

import contextlib
import copy
import io

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from retclip.evaluation.mask_ap import MaskAPAccumulator
from retclip.outputs.records import encode_rle

CATEGORY_IDS = [3, 5, 8, 13]
ISTHING = np.array([True, True, True, False])


def random_images(rng: np.random.Generator, n_images: int, dets_per_image: int):
    """Boxes as masks: GT instances (some crowd), noisy detections around them (scores below
    0.5) and spurious ones up to ``dets_per_image`` (scores above 0.5)."""
    images = []
    for image_id in range(n_images):
        gt, dets = [], []
        for _ in range(int(rng.integers(1, 5))):
            cls = int(rng.integers(0, 4))
            mask = np.zeros((32, 40), dtype=bool)
            y, x = int(rng.integers(0, 24)), int(rng.integers(0, 30))
            mask[y : y + int(rng.integers(4, 9)), x : x + int(rng.integers(4, 11))] = True
            gt.append((cls, encode_rle(mask), bool(rng.random() < 0.15), None))
            for _ in range(int(rng.integers(0, 3))):
                moved = np.roll(mask, (int(rng.integers(-2, 3)), int(rng.integers(-2, 3))), (0, 1))
                det_cls = cls if rng.random() < 0.8 else int(rng.integers(0, 4))
                dets.append((det_cls, encode_rle(moved), 0.5 * float(rng.random())))
        while len(dets) < dets_per_image:
            mask = np.zeros((32, 40), dtype=bool)
            y, x = int(rng.integers(0, 24)), int(rng.integers(0, 30))
            mask[y : y + 5, x : x + 6] = True
            dets.append(
                (int(rng.integers(0, 4)), encode_rle(mask), 0.5 + 0.5 * float(rng.random()))
            )
        images.append((image_id, gt, dets))
    return images


def direct_cocoeval(images, cat_ids=None, max_dets=100):
    """COCOeval on a GT dataset and a results list built here from the same inputs."""
    annotations, results = [], []
    for image_id, gt, dets in images:
        for cls, rle, crowd, _ in gt:
            if ISTHING[cls]:
                annotations.append(
                    {"id": len(annotations) + 1, "image_id": image_id,
                     "category_id": CATEGORY_IDS[cls], "segmentation": rle,
                     "area": float(rle_area(rle)), "iscrowd": int(crowd),
                     "bbox": [0, 0, 1, 1]}
                )  # fmt: skip
        kept = sorted([d for d in dets if ISTHING[d[0]]], key=lambda d: -d[2])[:max_dets]
        results += [
            {"image_id": image_id, "category_id": CATEGORY_IDS[c], "segmentation": r, "score": s}
            for c, r, s in kept
        ]
    gt_coco = COCO()
    gt_coco.dataset = {
        "images": [{"id": i, "height": 32, "width": 40} for i, _, _ in images],
        "annotations": annotations,
        "categories": [{"id": c} for c, t in zip(CATEGORY_IDS, ISTHING, strict=True) if t],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        gt_coco.createIndex()
        evaluator = COCOeval(gt_coco, gt_coco.loadRes(copy.deepcopy(results)), "segm")
        if cat_ids is not None:
            evaluator.params.catIds = cat_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return 100 * evaluator.stats[:3]


def rle_area(rle) -> int:
    from pycocotools import mask

    return int(mask.area(rle))


def accumulate(images, max_dets=100) -> MaskAPAccumulator:
    acc = MaskAPAccumulator(CATEGORY_IDS, ISTHING, max_detections=max_dets)
    for image_id, gt, dets in images:
        acc.add_image(image_id, 32, 40, gt, dets)
    return acc


@pytest.mark.parametrize("seed", range(4))
def test_equals_cocoeval(seed: int) -> None:
    images = random_images(np.random.default_rng(seed), 6, 0)
    subset = np.array([True, False, True, True])
    results, per_class = accumulate(images).evaluate({"seen": subset})
    expected = direct_cocoeval(images)
    got = [results["all"][k] for k in ("mAP", "AP50", "AP75")]
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert 0 < results["all"]["mAP"] < 100
    # a subset of classes = COCOeval restricted to those categories
    seen = direct_cocoeval(images, cat_ids=[CATEGORY_IDS[0], CATEGORY_IDS[2]])
    np.testing.assert_allclose([results["seen"][k] for k in ("mAP", "AP50", "AP75")], seen)
    # per class = COCOeval restricted to that one category (NaN without GT), stuff left out
    for cls in range(3):
        alone = direct_cocoeval(images, cat_ids=[CATEGORY_IDS[cls]])[0]
        assert per_class[cls] == pytest.approx(alone) or (np.isnan(per_class[cls]) and alone < 0)
    assert np.isnan(per_class[3])


def test_evaluate_can_be_called_again() -> None:
    # pycocotools' loadRes mutates the detections it is given; a second call must not see that
    accumulator = accumulate(random_images(np.random.default_rng(3), 4, 0))
    first, _ = accumulator.evaluate({})
    second, _ = accumulator.evaluate({})
    assert first == second


def test_at_most_100_detections_per_image_highest_first() -> None:
    images = random_images(np.random.default_rng(7), 3, 150)
    results, _ = accumulate(images).evaluate()
    np.testing.assert_allclose(
        [results["all"][k] for k in ("mAP", "AP50", "AP75")], direct_cocoeval(images, max_dets=100)
    )
    assert results["all"]["mAP"] != pytest.approx(direct_cocoeval(images, max_dets=150)[0])


def test_no_detections_gives_zero_and_no_ground_truth_gives_nan() -> None:
    images = [(i, gt, []) for i, gt, _ in random_images(np.random.default_rng(1), 3, 0)]
    results, _ = accumulate(images).evaluate()
    assert results["all"]["mAP"] == 0.0
    empty = MaskAPAccumulator(CATEGORY_IDS, ISTHING)
    empty.add_image(0, 8, 8, [], [])
    assert np.isnan(empty.evaluate()[0]["all"]["mAP"])
