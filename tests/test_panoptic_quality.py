"""PQ by panopticapi's rules: the independent check case and a second, plain implementation."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest

from retclip.errors import InputError
from retclip.evaluation.panoptic_quality import PQStats, SegmentsInfo, pq_image, pq_summary

# mmdetection's tests/test_evaluation/test_metrics/test_coco_panoptic_metric.py, 60x80 image.
# Categories person, cat, dog (things) and wall (stuff); ids 0..3 = indices here.
CHECK_TARGET = {
    "PQ": 67.86874803219071,
    "SQ": 80.89770126158936,
    "RQ": 83.33333333333334,
    "PQ_th": 60.45252075318891,
    "SQ_th": 79.9959505972869,
    "RQ_th": 75.0,
    "PQ_st": 82.70120259019427,
    "SQ_st": 82.70120259019427,
    "RQ_st": 100.0,
}
CHECK_ISTHING = np.array([True, True, True, False])


def check_case() -> tuple[np.ndarray, SegmentsInfo, np.ndarray, SegmentsInfo]:
    """Ground truth: person boxes 1, 2, dog box 3 on wall 4 (JSON areas 400, 400, 50, 3950).
    Prediction: person (shifted by 1 px: TP), person (FP), cat on the dog's box, wall."""
    gt = np.full((60, 80), 4, dtype=np.int64)
    for seg_id, (x, y, w, h) in enumerate([(10, 10, 10, 40), (30, 10, 10, 40), (50, 10, 10, 5)]):
        gt[y : y + h, x : x + w] = seg_id + 1
    gt_info = SegmentsInfo(
        ids=[1, 2, 3, 4], categories=[0, 0, 2, 3], iscrowd=[0, 0, 0, 0], areas=[400, 400, 50, 3950]
    )
    pred = np.full((60, 80), 4, dtype=np.int64)
    for seg_id, (x, y, w, h) in enumerate([(11, 11, 10, 40), (38, 10, 10, 40), (51, 10, 10, 5)]):
        pred[y : y + h, x : x + w] = seg_id + 1
    # mmdetection's labels (person, dog, wall) → person 0, dog 2, wall 3
    pred_info = SegmentsInfo(ids=[1, 2, 3, 4], categories=[0, 0, 2, 3])
    return gt, gt_info, pred, pred_info


def test_independent_check_case() -> None:
    gt, gt_info, pred, pred_info = check_case()
    stats = pq_image(gt, gt_info, pred, pred_info, 4)
    summary = pq_summary(stats, CHECK_ISTHING)
    for key, value in CHECK_TARGET.items():
        assert summary[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
    assert (summary["n"], summary["n_th"], summary["n_st"]) == (3, 2, 1)  # cat left out
    assert stats.tp.tolist() == [1, 0, 1, 1] and stats.fp.tolist() == [1, 0, 0, 0]
    assert stats.fn.tolist() == [1, 0, 0, 0]


def reference_pq(gt, gt_segs, pred, pred_segs, num_categories):
    """A plain transcription of panopticapi's pq_compute_single_core, dicts and loops."""
    offset = 256 * 256 * 256
    pairs, counts = np.unique(
        gt.astype(np.uint64) * offset + pred.astype(np.uint64), return_counts=True
    )
    gt_pred = {
        (int(p // offset), int(p % offset)): int(c) for p, c in zip(pairs, counts, strict=True)
    }
    labels, areas = np.unique(pred, return_counts=True)
    pred_area = {int(lab): int(a) for lab, a in zip(labels, areas, strict=True) if lab != 0}
    tp, fp, fn, iou_sum = defaultdict(int), defaultdict(int), defaultdict(int), defaultdict(float)
    gt_matched, pred_matched = set(), set()
    for (g, p), inter in gt_pred.items():
        if g not in gt_segs or p not in pred_segs:
            continue
        if gt_segs[g]["iscrowd"] or gt_segs[g]["category"] != pred_segs[p]:
            continue
        union = pred_area[p] + gt_segs[g]["area"] - inter - gt_pred.get((0, p), 0)
        iou = inter / union
        if iou > 0.5:
            tp[gt_segs[g]["category"]] += 1
            iou_sum[gt_segs[g]["category"]] += iou
            gt_matched.add(g)
            pred_matched.add(p)
    crowd_by_cat = {}
    for g, info in gt_segs.items():
        if g in gt_matched:
            continue
        if info["iscrowd"]:
            crowd_by_cat[info["category"]] = g
            continue
        fn[info["category"]] += 1
    for p, cat in pred_segs.items():
        if p in pred_matched:
            continue
        inter = gt_pred.get((0, p), 0)
        if cat in crowd_by_cat:
            inter += gt_pred.get((crowd_by_cat[cat], p), 0)
        if inter / pred_area[p] > 0.5:
            continue
        fp[cat] += 1
    k = range(num_categories)
    return (
        [tp[c] for c in k],
        [fp[c] for c in k],
        [fn[c] for c in k],
        [iou_sum[c] for c in k],
    )


def random_case(rng: np.random.Generator, k: int):
    """Random rectangles on a 24x32 map: GT with VOID and crowd segments, a prediction made by
    jittering, relabelling, dropping and adding GT segments (so matches, FPs and FNs all occur)."""
    h, w = 24, 32
    gt = np.zeros((h, w), dtype=np.int64)
    if rng.random() < 0.7:
        gt[:] = 1
    boxes = []
    for seg_id in range(2, int(rng.integers(3, 9))):
        y, x = int(rng.integers(0, h - 4)), int(rng.integers(0, w - 4))
        bh, bw = int(rng.integers(3, 12)), int(rng.integers(3, 14))
        gt[y : y + bh, x : x + bw] = seg_id
        boxes.append((seg_id, y, x, bh, bw))
    gt[rng.random((h, w)) < 0.05] = 0  # VOID speckle
    gt_ids = [int(v) for v in np.unique(gt) if v != 0]
    gt_segs = {
        g: {
            "category": int(rng.integers(0, k)),
            "iscrowd": bool(rng.random() < 0.2),
            "area": int((gt == g).sum()),
        }
        for g in gt_ids
    }
    pred = np.zeros((h, w), dtype=np.int64)
    pred_segs: dict[int, int] = {}
    next_id = 1
    for g in gt_ids:
        if rng.random() < 0.15:
            continue
        ys, xs = np.nonzero(gt == g)
        dy, dx = int(rng.integers(-2, 3)), int(rng.integers(-2, 3))
        region = (np.clip(ys + dy, 0, h - 1), np.clip(xs + dx, 0, w - 1))
        pred[region] = next_id
        cat = gt_segs[g]["category"] if rng.random() < 0.8 else int(rng.integers(0, k))
        pred_segs[next_id] = cat
        next_id += 1
    for _ in range(int(rng.integers(0, 3))):
        y, x = int(rng.integers(0, h - 3)), int(rng.integers(0, w - 3))
        pred[y : y + 4, x : x + 5] = next_id
        pred_segs[next_id] = int(rng.integers(0, k))
        next_id += 1
    present = {int(v) for v in np.unique(pred)}
    pred_segs = {p: c for p, c in pred_segs.items() if p in present}
    return gt, gt_segs, pred, pred_segs


@pytest.mark.parametrize("seed", range(40))
def test_agrees_with_plain_implementation(seed: int) -> None:
    rng = np.random.default_rng(seed)
    k = 4
    gt, gt_segs, pred, pred_segs = random_case(rng, k)
    gt_info = SegmentsInfo(
        ids=list(gt_segs),
        categories=[s["category"] for s in gt_segs.values()],
        iscrowd=[s["iscrowd"] for s in gt_segs.values()],
        areas=[s["area"] for s in gt_segs.values()],
    )
    pred_info = SegmentsInfo(ids=list(pred_segs), categories=list(pred_segs.values()))
    stats = pq_image(gt, gt_info, pred, pred_info, k)
    tp, fp, fn, iou = reference_pq(gt, gt_segs, pred, pred_segs, k)
    assert stats.tp.tolist() == tp
    assert stats.fp.tolist() == fp
    assert stats.fn.tolist() == fn
    np.testing.assert_allclose(stats.iou, iou, rtol=1e-12)


def test_random_cases_exercise_every_rule() -> None:
    """The randomised cases above really contain matches, FPs, FNs, crowd-ignored FPs and VOID."""
    totals = PQStats.zeros(4)
    ignored_on_crowd = 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        gt, gt_segs, pred, pred_segs = random_case(rng, 4)
        crowd = [g for g, s in gt_segs.items() if s["iscrowd"]]
        for p, cat in pred_segs.items():
            on = (pred == p) & np.isin(gt, [g for g in crowd if gt_segs[g]["category"] == cat])
            ignored_on_crowd += int(on.sum() * 2 > (pred == p).sum())
        totals += PQStats(*[np.asarray(v) for v in reference_pq(gt, gt_segs, pred, pred_segs, 4)])
    assert totals.tp.sum() > 20 and totals.fp.sum() > 10 and totals.fn.sum() > 10
    assert ignored_on_crowd > 0


def test_strict_threshold_and_void_excluded_from_union() -> None:
    gt = np.zeros((1, 8), dtype=np.int64)
    gt[0, :4] = 1
    pred = np.zeros((1, 8), dtype=np.int64)
    pred[0, 2:6] = 1  # 2 px on the segment, 2 px on VOID
    info = SegmentsInfo(ids=[1], categories=[0], iscrowd=[0], areas=[4])
    stats = pq_image(gt, info, pred, SegmentsInfo(ids=[1], categories=[0]), 1)
    # intersection 2, union = 4 + 4 - 2 - 2 (VOID pixels of the prediction) = 4 → IoU 0.5 exactly
    assert stats.tp.tolist() == [0] and stats.fn.tolist() == [1]
    assert stats.fp.tolist() == [1]  # half on VOID is not more than half
    pred[0, 2:5] = 1
    pred[0, 5] = 0  # intersection 2, union 4 + 3 - 2 - 1 = 4: still 0.5
    stats = pq_image(gt, info, pred, SegmentsInfo(ids=[1], categories=[0]), 1)
    assert stats.tp.tolist() == [0]
    pred[0, 1:5] = 1  # intersection 3, union 4 + 4 - 3 - 1 = 4: IoU 0.75
    stats = pq_image(gt, info, pred, SegmentsInfo(ids=[1], categories=[0]), 1)
    assert stats.tp.tolist() == [1] and stats.iou[0] == pytest.approx(0.75)


def test_crowd_rule_needs_same_category() -> None:
    gt = np.zeros((4, 4), dtype=np.int64)
    gt[:, :] = 1  # one crowd segment of category 0
    info = SegmentsInfo(ids=[1], categories=[0], iscrowd=[1], areas=[16])
    pred = np.zeros((4, 4), dtype=np.int64)
    pred[:2, :] = 1
    same = pq_image(gt, info, pred, SegmentsInfo(ids=[1], categories=[0]), 2)
    other = pq_image(gt, info, pred, SegmentsInfo(ids=[1], categories=[1]), 2)
    assert same.fp.tolist() == [0, 0] and same.fn.tolist() == [0, 0]  # crowd never an FN
    assert other.fp.tolist() == [0, 1]


def test_json_areas_are_used_for_ground_truth() -> None:
    gt, gt_info, pred, pred_info = check_case()
    counted = SegmentsInfo(ids=gt_info.ids, categories=gt_info.categories, iscrowd=gt_info.iscrowd)
    assert pq_image(gt, counted, pred, pred_info, 4).iou.sum() == pytest.approx(
        pq_image(gt, gt_info, pred, pred_info, 4).iou.sum()
    )
    inflated = SegmentsInfo(
        ids=gt_info.ids, categories=gt_info.categories, iscrowd=gt_info.iscrowd,
        areas=[400, 400, 50, 9000],
    )  # fmt: skip
    assert pq_image(gt, inflated, pred, pred_info, 4).tp[3] == 0


def test_inconsistent_predictions_are_refused() -> None:
    gt, gt_info, pred, _ = check_case()
    with pytest.raises(InputError, match="in the PNG but not in the JSON"):
        pq_image(gt, gt_info, pred, SegmentsInfo(ids=[1, 2, 3], categories=[0, 0, 2]), 4)
    with pytest.raises(InputError, match="in the JSON but not in the PNG"):
        ids = [1, 2, 3, 4, 9]
        pq_image(gt, gt_info, pred, SegmentsInfo(ids=ids, categories=[0, 0, 2, 3, 1]), 4)
    with pytest.raises(InputError, match="unknown category"):
        pq_image(gt, gt_info, pred, SegmentsInfo(ids=[1, 2, 3, 4], categories=[0, 0, 7, 3]), 4)
    with pytest.raises(InputError, match="80x60"):
        pq_image(gt, gt_info, pred[:, :40], SegmentsInfo(ids=[1, 4], categories=[0, 3]), 4)


def test_summary_selects_classes_and_accumulates() -> None:
    gt, gt_info, pred, pred_info = check_case()
    total = PQStats.zeros(4)
    for _ in range(3):
        total += pq_image(gt, gt_info, pred, pred_info, 4)
    assert pq_summary(total, CHECK_ISTHING)["PQ"] == pytest.approx(CHECK_TARGET["PQ"])
    only_wall = pq_summary(total, CHECK_ISTHING, select=np.array([False, False, False, True]))
    assert only_wall["PQ"] == pytest.approx(CHECK_TARGET["PQ_st"])
    assert np.isnan(only_wall["PQ_th"]) and only_wall["n_th"] == 0
