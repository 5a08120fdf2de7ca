"""The reported numbers of a run: PQ, mIoU and mask AP together, and their seen / unseen split.

:class:`Evaluator` feeds one image's ground truth and prediction to the three metrics;
:meth:`Evaluator.metrics` gives ``metrics.json``'s content (percent, as detectron2 reports):
``PQ SQ RQ PQ_th SQ_th RQ_th PQ_st SQ_st RQ_st mIoU fwIoU mAcc pAcc mAP AP50 AP75`` and, given a
training vocabulary, the same under ``seen`` and ``unseen`` (classes of the training vocabulary
or not). The files: :mod:`retclip.evaluation.report`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from retclip.evaluation.mask_ap import MaskAPAccumulator
from retclip.evaluation.panoptic_quality import PQStats, SegmentsInfo, pq_image, pq_per_class
from retclip.evaluation.panoptic_quality import pq_summary as _pq_summary
from retclip.evaluation.semantic import SemanticConfusion
from retclip.vocabulary import Vocabulary

__all__ = ["METRIC_KEYS", "Evaluator"]

#: Keys every metrics dict (and its ``seen`` / ``unseen`` parts) has.
METRIC_KEYS = (
    "PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st",
    "mIoU", "fwIoU", "mAcc", "pAcc", "mAP", "AP50", "AP75",
)  # fmt: skip


class Evaluator:
    """Accumulates PQ statistics, the semantic confusion matrix and mask-AP inputs.

    Args:
        vocabulary: the dataset's classes (index = category index; ``ids`` = category ids).
        seen: ``[K]`` bool classes of the training vocabulary, or ``None`` for no split.
        max_detections: mask-AP detections kept per image.
    """

    def __init__(
        self, vocabulary: Vocabulary, seen: np.ndarray | None = None, max_detections: int = 100
    ) -> None:
        self.vocabulary = vocabulary
        self.isthing = vocabulary.isthing
        self.seen = None if seen is None else np.asarray(seen, dtype=bool)
        k = len(vocabulary)
        self.pq = PQStats.zeros(k)
        self.semantic = SemanticConfusion(k)
        self.ap = MaskAPAccumulator(vocabulary.ids, self.isthing, max_detections)
        self.images = 0

    def add(
        self,
        image_id: int,
        gt_map: np.ndarray,
        gt_segments: SegmentsInfo,
        gt_semantic: np.ndarray,
        gt_instances: Sequence[tuple[int, dict[str, Any], bool, float | None]],
        pred_map: np.ndarray,
        pred_segments: SegmentsInfo,
        pred_semantic: np.ndarray,
        detections: Sequence[tuple[int, dict[str, Any], float]] | None,
        *,
        name: object = "",
    ) -> None:
        """Add one image: ``[H, W]`` maps, segments, instances as for
        :meth:`MaskAPAccumulator.add_image`; ``detections=None`` leaves AP out of this image."""
        self.pq += pq_image(
            gt_map, gt_segments, pred_map, pred_segments, len(self.vocabulary), image=name
        )
        self.semantic.update(pred_semantic, gt_semantic)
        if detections is not None:
            h, w = gt_map.shape
            self.ap.add_image(image_id, h, w, gt_instances, detections)
        self.images += 1

    def _subsets(self) -> dict[str, np.ndarray]:
        if self.seen is None:
            return {}
        return {"seen": self.seen, "unseen": ~self.seen}

    def metrics(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """``metrics.json``'s content and one row per class (for ``per_class.csv``)."""
        subsets = self._subsets()
        ap, ap_per_class = self.ap.evaluate(subsets)
        result: dict[str, Any] = {}
        for name, select in {"all": None, **subsets}.items():
            part: dict[str, Any] = dict(_pq_summary(self.pq, self.isthing, select))
            part.update(self.semantic.summary(select))
            part.update(ap[name])
            ordered = {key: part[key] for key in METRIC_KEYS}
            ordered.update({k: int(part[k]) for k in ("n", "n_th", "n_st")})
            if name == "all":
                result.update(ordered)
            else:
                result[name] = ordered
        result["images"] = self.images
        pq = pq_per_class(self.pq)
        sem = self.semantic.per_class()
        rows = []
        for i, cls in enumerate(self.vocabulary.classes):
            row: dict[str, Any] = {
                "id": cls.id,
                "name": cls.name,
                "isthing": cls.isthing,
                "seen": None if self.seen is None else bool(self.seen[i]),
            }
            row.update({key: pq[key][i].item() for key in ("PQ", "SQ", "RQ", "TP", "FP", "FN")})
            row.update(
                {"IoU": sem["IoU"][i].item(), "Acc": sem["Acc"][i].item(), "AP": ap_per_class[i]}
            )
            rows.append(row)
        return json_safe(result), rows


def is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def json_safe(value: Any) -> Any:
    """NaN → ``None`` (JSON ``null``), recursively."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
