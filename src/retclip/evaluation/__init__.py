"""Evaluation: panoptic quality, semantic and mask-AP metrics, the eval loop and reports.

Modules: :mod:`~retclip.evaluation.panoptic_quality` (PQ), :mod:`~retclip.evaluation.semantic`
(mIoU), :mod:`~retclip.evaluation.mask_ap` (COCOeval), :mod:`~retclip.evaluation.report` (the
files), :mod:`~retclip.evaluation.evaluator` (the numbers), :mod:`~retclip.evaluation.datasets`,
:mod:`~retclip.evaluation.cache`, :mod:`~retclip.evaluation.loop` and
:mod:`~retclip.evaluation.predictions` (scoring outside predictions); the
commands are :mod:`retclip.cli.eval` (``retclip eval`` / ``retclip sweep``). Names below load on
first use, so that the command line starts without loading torch.
"""

from __future__ import annotations

from retclip.lazy import lazy_exports

_EXPORTS = {
    "MaskAPAccumulator": "mask_ap",
    "PQStats": "panoptic_quality",
    "SegmentsInfo": "panoptic_quality",
    "pq_image": "panoptic_quality",
    "pq_per_class": "panoptic_quality",
    "pq_summary": "panoptic_quality",
    "SemanticConfusion": "semantic",
    "Evaluator": "evaluator",
    "markdown_table": "report",
    "write_report": "report",
    "DatasetSpec": "datasets",
    "EvalDataset": "datasets",
    "GroundTruth": "datasets",
    "PredictionFolder": "predictions",
    "ScoreCache": "cache",
    "run_model": "loop",
    "score_cache": "loop",
    "score_predictions": "predictions",
    "sweep_grid": "loop",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(
    "retclip.evaluation", {n: f"retclip.evaluation.{m}" for n, m in _EXPORTS.items()}
)
