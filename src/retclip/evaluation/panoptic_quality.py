"""Panoptic quality (PQ, SQ, RQ) exactly by panopticapi's rules (``evaluation.py``).

Per image, one joint histogram of (ground-truth segment, predicted segment) pixel pairs gives
every intersection at once; the rules are then applied to small ``[G, P]`` matrices:

* a prediction matches a non-crowd ground-truth segment of the same category when
  ``IoU > 0.5`` (strict), with ``union = pred_area + gt_area − intersection − pred∩VOID``;
* unmatched non-crowd ground truth is a false negative; crowd ground truth never is;
* an unmatched prediction is a false positive unless more than half of it lies on VOID plus the
  crowd segment of its category (the last crowd segment of that category, as panopticapi keeps);
* ground-truth areas come from the JSON, predicted areas from the PNG.

Per category ``PQ = ΣIoU / (TP + FP/2 + FN/2)``, ``SQ = ΣIoU / TP``, ``RQ = TP / (TP + FP/2 +
FN/2)``; averages skip categories with ``TP + FP + FN = 0``. Statistics are per-category sums, so
memory does not grow with the number of images.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from retclip.errors import InputError

__all__ = ["PQStats", "SegmentsInfo", "pq_image", "pq_per_class", "pq_summary"]


@dataclasses.dataclass
class SegmentsInfo:
    """The segments of one panoptic map (a ``segments_info`` list as arrays).

    Attributes:
        ids: ``[S]`` segment ids as in the PNG (``R + 256·G + 256²·B``; 0 is VOID).
        categories: ``[S]`` category index (position in the dataset's category list).
        iscrowd: ``[S]`` bool; ``None`` means no crowd segments (predictions).
        areas: ``[S]`` areas from the JSON; ``None`` to count them in the map (predictions).
    """

    ids: np.ndarray
    categories: np.ndarray
    iscrowd: np.ndarray | None = None
    areas: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.ids = np.asarray(self.ids, dtype=np.int64).reshape(-1)
        self.categories = np.asarray(self.categories, dtype=np.int64).reshape(-1)
        n = self.ids.shape[0]
        if self.categories.shape[0] != n:
            raise ValueError(f"{n} segment ids but {self.categories.shape[0]} categories")
        if self.iscrowd is not None:
            self.iscrowd = np.asarray(self.iscrowd, dtype=bool).reshape(n)
        if self.areas is not None:
            self.areas = np.asarray(self.areas, dtype=np.float64).reshape(n)
        if len(np.unique(self.ids)) != n or (n and self.ids.min() <= 0):
            raise InputError(f"segment ids must be distinct and positive, got {self.ids.tolist()}")


@dataclasses.dataclass
class PQStats:
    """Per-category sums over images, each ``[K]``: ``tp``, ``fp``, ``fn`` and ``iou``."""

    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    iou: np.ndarray

    @classmethod
    def zeros(cls, num_categories: int) -> PQStats:
        z = np.zeros(num_categories, dtype=np.int64)
        return cls(z.copy(), z.copy(), z.copy(), np.zeros(num_categories, dtype=np.float64))

    def __iadd__(self, other: PQStats) -> PQStats:
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        self.iou += other.iou
        return self


def _dense_index(ids: np.ndarray, segment_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map ``ids [H·W]`` to ``1 + position`` in ``segment_ids [S]``; VOID → 0, unlisted → S + 1.

    Returns the index map and a bool ``[H·W]`` of the pixels whose id is neither VOID nor listed.
    """
    s = len(segment_ids)
    index = np.zeros(ids.shape, dtype=np.int64)
    listed = np.zeros(ids.shape, dtype=bool)
    if s:
        order = np.argsort(segment_ids)
        sorted_ids = segment_ids[order]
        pos = np.minimum(np.searchsorted(sorted_ids, ids), s - 1)
        listed = sorted_ids[pos] == ids
        index = np.where(listed, order[pos] + 1, 0)
    unlisted = ~listed & (ids != 0)
    index[unlisted] = s + 1
    return index, unlisted


def pq_image(
    gt_map: np.ndarray,
    gt: SegmentsInfo,
    pred_map: np.ndarray,
    pred: SegmentsInfo,
    num_categories: int,
    *,
    image: object = "",
) -> PQStats:
    """PQ statistics of one image.

    Args:
        gt_map: ``[H, W]`` ground-truth segment ids (0 = VOID).
        gt: its segments, with ``iscrowd`` and JSON ``areas`` (counted in ``gt_map`` if ``None``).
        pred_map: ``[H, W]`` predicted segment ids (0 = VOID).
        pred: the predicted segments.
        num_categories: ``K``; categories are indices ``0..K-1``.
        image: the image's name, for error messages.

    Raises:
        InputError: sizes differ, a predicted id is in the PNG but not the JSON (or the other way
            round), or a category index is out of range (panopticapi's sanity checks).
    """
    if gt_map.shape != pred_map.shape:
        raise InputError(
            f"image {image}: prediction is {pred_map.shape[1]}x{pred_map.shape[0]}, ground truth "
            f"{gt_map.shape[1]}x{gt_map.shape[0]}"
        )
    for what, seg in (("ground-truth", gt), ("predicted", pred)):
        bad = (seg.categories < 0) | (seg.categories >= num_categories)
        if bad.any():
            raise InputError(
                f"image {image}: {what} segment {int(seg.ids[bad][0])} has an unknown category"
            )
    g, p = len(gt.ids), len(pred.ids)
    gt_index, _ = _dense_index(gt_map.reshape(-1).astype(np.int64), gt.ids)
    pred_index, pred_unlisted = _dense_index(pred_map.reshape(-1).astype(np.int64), pred.ids)
    if pred_unlisted.any():
        missing = int(pred_map.reshape(-1)[pred_unlisted][0])
        raise InputError(f"image {image}: segment {missing} is in the PNG but not in the JSON")
    # Joint histogram: rows 0 = VOID, 1..G = gt segments, G+1 = unlisted ids; cols 0..P.
    hist = np.bincount(gt_index * (p + 1) + pred_index, minlength=(g + 2) * (p + 1))
    hist = hist.reshape(g + 2, p + 1).astype(np.float64)
    pred_area = hist[:, 1:].sum(0)  # [P]
    if p and (pred_area == 0).any():
        absent = pred.ids[pred_area == 0].tolist()
        raise InputError(f"image {image}: segments {absent} are in the JSON but not in the PNG")
    gt_area = gt.areas if gt.areas is not None else hist[1 : g + 1].sum(1)
    crowd = gt.iscrowd if gt.iscrowd is not None else np.zeros(g, dtype=bool)
    inter = hist[1 : g + 1, 1:]  # [G, P]
    pred_void = hist[0, 1:]  # [P]

    union = pred_area[None, :] + gt_area[:, None] - inter - pred_void[None, :]
    same = gt.categories[:, None] == pred.categories[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(inter > 0, inter / union, 0.0)
    matched = (inter > 0) & same & ~crowd[:, None] & (iou > 0.5)  # [G, P]

    stats = PQStats.zeros(num_categories)
    rows, _ = np.nonzero(matched)
    stats.tp += np.bincount(gt.categories[rows], minlength=num_categories)
    stats.iou += np.bincount(gt.categories[rows], weights=iou[matched], minlength=num_categories)
    missed = ~matched.any(1) & ~crowd
    stats.fn += np.bincount(gt.categories[missed], minlength=num_categories)

    crowd_of = np.full(num_categories, -1, dtype=np.int64)  # last crowd segment per category
    for i in np.flatnonzero(crowd):
        crowd_of[gt.categories[i]] = i
    on_crowd = np.zeros(p)
    has_crowd = crowd_of[pred.categories] >= 0
    on_crowd[has_crowd] = inter[crowd_of[pred.categories[has_crowd]], np.flatnonzero(has_crowd)]
    ignored = (pred_void + on_crowd) / np.maximum(pred_area, 1) > 0.5
    false_pos = ~matched.any(0) & ~ignored
    stats.fp += np.bincount(pred.categories[false_pos], minlength=num_categories)
    return stats


def _pq_sq_rq(stats: PQStats) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-category PQ, SQ, RQ (fractions, NaN where TP+FP+FN = 0) and the valid mask."""
    denom = stats.tp + 0.5 * stats.fp + 0.5 * stats.fn
    valid = (stats.tp + stats.fp + stats.fn) > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        pq = np.where(valid, stats.iou / denom, np.nan)
        sq = np.where(
            valid, np.where(stats.tp > 0, stats.iou / np.maximum(stats.tp, 1), 0.0), np.nan
        )
        rq = np.where(valid, stats.tp / denom, np.nan)
    return pq, sq, rq, valid


def pq_summary(
    stats: PQStats, isthing: np.ndarray, select: np.ndarray | None = None
) -> dict[str, float]:
    """``PQ, SQ, RQ`` for All, Things (``_th``) and Stuff (``_st``) in percent, and class counts.

    Args:
        stats: accumulated statistics ``[K]``.
        isthing: ``[K]`` bool thing flags.
        select: ``[K]`` bool, the categories to average over (e.g. the unseen ones); all if None.

    Returns:
        Keys ``PQ SQ RQ PQ_th SQ_th RQ_th PQ_st SQ_st RQ_st`` (NaN when no category counts) and
        ``n``, ``n_th``, ``n_st`` (categories in each mean).
    """
    pq, sq, rq, valid = _pq_sq_rq(stats)
    chosen = np.ones_like(valid) if select is None else np.asarray(select, dtype=bool)
    thing = np.asarray(isthing, dtype=bool)
    out: dict[str, float] = {}
    for suffix, group in (("", chosen), ("_th", chosen & thing), ("_st", chosen & ~thing)):
        use = group & valid
        n = int(use.sum())
        for name, values in (("PQ", pq), ("SQ", sq), ("RQ", rq)):
            out[name + suffix] = 100.0 * float(values[use].mean()) if n else float("nan")
        out["n" + suffix] = float(n)
    return out


def pq_per_class(stats: PQStats) -> dict[str, np.ndarray]:
    """Per-category ``PQ``, ``SQ``, ``RQ`` in percent (NaN if TP+FP+FN = 0) and TP/FP/FN."""
    pq, sq, rq, _ = _pq_sq_rq(stats)
    return {
        "PQ": 100.0 * pq,
        "SQ": 100.0 * sq,
        "RQ": 100.0 * rq,
        "TP": stats.tp.copy(),
        "FP": stats.fp.copy(),
        "FN": stats.fn.copy(),
    }
