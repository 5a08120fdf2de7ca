"""mIoU, fwIoU, mAcc, pAcc by detectron2's rules, against a direct numpy computation."""

from __future__ import annotations

import numpy as np
import pytest

from retclip.evaluation.semantic import SemanticConfusion


def direct(preds, gts, k):
    """Per class: TP, GT and predicted pixel counts over non-ignored pixels, then the formulas."""
    tp, gt_px, pred_px = np.zeros(k), np.zeros(k), np.zeros(k)
    for pred, gt in zip(preds, gts, strict=True):
        valid = gt != 255
        for c in range(k):
            tp[c] += np.sum((pred == c) & (gt == c) & valid)
            gt_px[c] += np.sum((gt == c) & valid)
            pred_px[c] += np.sum((pred == c) & valid)
    has_gt = gt_px > 0
    iou = tp[has_gt] / (gt_px[has_gt] + pred_px[has_gt] - tp[has_gt])
    return {
        "mIoU": 100 * iou.mean(),
        "fwIoU": 100 * np.sum(iou * gt_px[has_gt] / gt_px.sum()),
        "mAcc": 100 * np.mean(tp[has_gt] / gt_px[has_gt]),
        "pAcc": 100 * tp.sum() / gt_px.sum(),
    }


@pytest.mark.parametrize("seed", range(10))
def test_equals_direct_confusion_matrix(seed: int) -> None:
    rng = np.random.default_rng(seed)
    k = 6
    confusion = SemanticConfusion(k)
    preds, gts = [], []
    for _ in range(3):
        gt = rng.integers(0, k - 1, size=(20, 30))  # class k-1 never in GT: left out of means
        gt[rng.random(gt.shape) < 0.1] = 255
        pred = np.where(rng.random(gt.shape) < 0.6, gt, rng.integers(0, k, size=gt.shape))
        pred = np.where(pred == 255, 0, pred)
        confusion.update(pred, gt)
        preds.append(pred)
        gts.append(gt)
    got = confusion.summary()
    for key, value in direct(preds, gts, k).items():
        assert got[key] == pytest.approx(value, rel=1e-12), key
    assert np.isnan(confusion.per_class()["IoU"][k - 1])


def test_void_prediction_is_a_miss() -> None:
    gt = np.array([[0, 0, 1, 1]])
    confusion = SemanticConfusion(2)
    confusion.update(np.array([[0, 255, 1, 1]]), gt)
    summary = confusion.summary()
    assert summary["pAcc"] == pytest.approx(75.0)
    assert confusion.per_class()["IoU"].tolist() == pytest.approx([50.0, 100.0])


def test_subset_means_use_only_its_classes() -> None:
    confusion = SemanticConfusion(3)
    confusion.update(np.array([[0, 1, 1, 2]]), np.array([[0, 0, 1, 2]]))
    part = confusion.summary(np.array([False, True, True]))
    assert part["mIoU"] == pytest.approx((50.0 + 100.0) / 2)
    assert part["pAcc"] == pytest.approx(100.0)  # classes 1 and 2: 2 GT pixels, both right
    assert np.isnan(SemanticConfusion(2).summary()["mIoU"])
