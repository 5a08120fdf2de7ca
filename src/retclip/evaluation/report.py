"""The reported numbers: PQ, mIoU and mask AP together, their seen / unseen split, and the files.

:class:`Evaluator` feeds one image's ground truth and prediction to the three metrics;
:meth:`Evaluator.metrics` gives ``metrics.json``'s content (percent, as detectron2 reports):
``PQ SQ RQ PQ_th SQ_th RQ_th PQ_st SQ_st RQ_st mIoU fwIoU mAcc pAcc mAP AP50 AP75`` and, given a
training vocabulary, the same under ``seen`` and ``unseen`` (classes of the training vocabulary
or not). :func:`write_report` writes ``metrics.json``, ``metrics.md`` (a table laid out like the
paper's: Method, Backbone, Database, PQ, mAP, mIoU as fractions) and ``per_class.csv``.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retclip.evaluation.mask_ap import MaskAPAccumulator
from retclip.evaluation.panoptic_quality import PQStats, SegmentsInfo, pq_image, pq_per_class
from retclip.evaluation.panoptic_quality import pq_summary as _pq_summary
from retclip.evaluation.semantic import SemanticConfusion
from retclip.files import atomic_write
from retclip.vocabulary import Vocabulary

__all__ = ["Evaluator", "markdown_table", "write_report"]

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
        return _json_safe(result), rows


def _json_safe(value: Any) -> Any:
    """NaN → ``None`` (JSON ``null``), recursively."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _fraction(value: float | None) -> str:
    return "–" if value is None else f"{value / 100:.3f}"


def markdown_table(metrics: Mapping[str, Any], method: str, backbone: str, database: str) -> str:
    """The paper's table layout (Method, Backbone, Database, PQ, mAP, mIoU; fractions), then
    a detail table with PQ/SQ/RQ by things and stuff and, if present, seen / unseen rows."""
    lines = [
        "| Method | Backbone | Database | PQ | mAP | mIoU |",
        "|---|---|---|---|---|---|",
        f"| {method} | {backbone} | {database} | {_fraction(metrics.get('PQ'))} | "
        f"{_fraction(metrics.get('mAP'))} | {_fraction(metrics.get('mIoU'))} |",
        "",
    ]
    detail = ("PQ", "SQ", "RQ", "PQ_th", "PQ_st", "mAP", "AP50", "mIoU", "pAcc")
    lines.append("| Classes | " + " | ".join(detail) + " |")
    lines.append("|---" * (len(detail) + 1) + "|")
    for label in ("all", "seen", "unseen"):
        part = metrics if label == "all" else metrics.get(label)
        if part is not None:
            values = " | ".join(_fraction(part.get(key)) for key in detail)
            lines.append(f"| {label} | {values} |")
    return "\n".join(lines) + "\n"


def write_report(
    out_dir: Path,
    metrics: Mapping[str, Any],
    per_class: Sequence[Mapping[str, Any]],
    *,
    method: str,
    backbone: str,
    database: str,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write ``metrics.json`` (metrics + ``extra`` under ``"run"``), ``metrics.md`` and
    ``per_class.csv`` into ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / "metrics.json",
        "markdown": out_dir / "metrics.md",
        "csv": out_dir / "per_class.csv",
    }
    content = {**metrics, "run": dict(extra or {})}
    atomic_write(paths["json"], json.dumps(content, indent=2, allow_nan=False) + "\n")
    atomic_write(paths["markdown"], markdown_table(metrics, method, backbone, database))
    buffer = io.StringIO()
    fields = list(per_class[0]) if per_class else ["id", "name"]
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in per_class:
        writer.writerow({k: "" if _is_nan(v) or v is None else v for k, v in row.items()})
    atomic_write(paths["csv"], buffer.getvalue())
    return paths


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)
