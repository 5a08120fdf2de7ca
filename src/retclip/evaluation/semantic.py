"""Semantic segmentation metrics by detectron2's ``SemSegEvaluator`` (rules since July 2022).

A confusion matrix over ``K + 1`` labels is accumulated per image with one ``bincount``; the
extra label holds ground-truth pixels marked ignore (255) and predicted pixels left void. From
the ``K × K`` block: ``IoU_c = TP / (GT + Pred − TP)``, ``Acc_c = TP / GT``; a class enters the
means only if it has ground-truth pixels. ``pAcc = ΣTP / ΣGT``, ``fwIoU = Σ (GT_c / ΣGT) IoU_c``.

Detectron2's predictions are never void (an argmax). Here a pixel the prediction leaves void while
the ground truth has a class counts as a ground-truth pixel of that class that no class predicted
(a miss): with no void predictions the numbers are detectron2's exactly.
"""

from __future__ import annotations

import numpy as np

__all__ = ["SemanticConfusion"]


class SemanticConfusion:
    """Confusion matrix ``[K + 1, K + 1]`` indexed ``[pred, gt]``; index ``K`` = void / ignore.

    Args:
        num_classes: ``K``.
        ignore_label: ground-truth value to ignore (255).
    """

    def __init__(self, num_classes: int, ignore_label: int = 255) -> None:
        self.num_classes = num_classes
        self.ignore_label = ignore_label
        self.matrix = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """Add one image: ``pred``, ``gt`` ``[H, W]`` class indices; any value outside ``0..K-1``
        (the ignore label, a void prediction) goes to the extra label ``K``."""
        if pred.shape != gt.shape:
            raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} sizes differ")
        k = self.num_classes
        p = pred.reshape(-1).astype(np.int64)
        g = gt.reshape(-1).astype(np.int64)
        p = np.where((p >= 0) & (p < k), p, k)
        g = np.where((g >= 0) & (g < k) & (g != self.ignore_label), g, k)
        self.matrix += np.bincount((k + 1) * p + g, minlength=(k + 1) ** 2).reshape(k + 1, k + 1)

    def per_class(self) -> dict[str, np.ndarray]:
        """``IoU``, ``Acc`` ``[K]`` in percent (NaN for classes without GT pixels) and ``GT``."""
        k = self.num_classes
        tp = np.diag(self.matrix)[:k].astype(np.float64)
        pos_gt = self.matrix[:, :k].sum(0).astype(np.float64)  # void predictions count as misses
        pos_pred = self.matrix[:k, :k].sum(1).astype(np.float64)
        valid = pos_gt > 0
        union = pos_gt + pos_pred - tp
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(valid & (union > 0), tp / union, np.nan)
            acc = np.where(valid, tp / pos_gt, np.nan)
        return {"IoU": 100.0 * iou, "Acc": 100.0 * acc, "GT": pos_gt}

    def summary(self, select: np.ndarray | None = None) -> dict[str, float]:
        """``mIoU``, ``fwIoU``, ``mAcc``, ``pAcc`` in percent over ``select`` ``[K]`` (all if None).

        Restricted to a subset, every sum runs over the subset's classes (their GT pixels).
        """
        k = self.num_classes
        chosen = np.ones(k, dtype=bool) if select is None else np.asarray(select, dtype=bool)
        per = self.per_class()
        tp = np.diag(self.matrix)[:k].astype(np.float64)
        gt = per["GT"]
        use = chosen & (gt > 0)
        total = gt[use].sum()
        if not use.any():
            nan = float("nan")
            return {"mIoU": nan, "fwIoU": nan, "mAcc": nan, "pAcc": nan}
        iou_ok = use & ~np.isnan(per["IoU"])
        return {
            "mIoU": float(per["IoU"][iou_ok].mean()),
            "fwIoU": float((per["IoU"][iou_ok] * gt[iou_ok]).sum() / total),
            "mAcc": float(per["Acc"][use].mean()),
            "pAcc": float(100.0 * tp[use].sum() / total),
        }
