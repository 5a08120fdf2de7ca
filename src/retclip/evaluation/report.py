"""The files of a run: ``metrics.json``, ``metrics.md`` (a table laid out like the paper's: Method,
Backbone, Database, PQ, mAP, mIoU as fractions) and ``per_class.csv`` (:func:`write_report`)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from retclip.evaluation.evaluator import METRIC_KEYS, Evaluator, is_nan
from retclip.files import atomic_write

__all__ = ["METRIC_KEYS", "Evaluator", "markdown_table", "write_report"]


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
        writer.writerow({k: "" if is_nan(v) or v is None else v for k, v in row.items()})
    atomic_write(paths["csv"], buffer.getvalue())
    return paths
