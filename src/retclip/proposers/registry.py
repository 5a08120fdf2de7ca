"""Proposer names for ``--proposer NAME`` → constructors. A new proposer registers one builder."""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from retclip.datasets.coco_panoptic import CocoPanopticDataset
from retclip.errors import InputError
from retclip.proposers.base import MaskProposer
from retclip.proposers.ground_truth import GroundTruthProposer


def _ground_truth(gt_json: Path | None = None, gt_masks: Path | None = None) -> MaskProposer:
    if gt_json is None:
        raise InputError("proposer 'gt' needs the ground truth: pass --gt PANOPTIC_JSON")
    return GroundTruthProposer(CocoPanopticDataset(gt_json, masks_dir=gt_masks))


#: Proposers backed by pretrained models: name → (module, class), imported when first used.
MODEL_PROPOSERS: dict[str, tuple[str, str]] = {
    "fcclip": ("retclip.fcclip.proposer", "FcclipProposer"),
    "grounded-sam": ("retclip.proposers.grounded_sam", "GroundedSamProposer"),
    "owl-sam": ("retclip.proposers.owl_sam", "OwlSamProposer"),
    "sam-grid": ("retclip.proposers.sam_grid", "SamGridProposer"),
}
#: Every proposer built from options (weight-free ones too), imported when first used.
_LAZY_PROPOSERS: dict[str, tuple[str, str]] = {
    **MODEL_PROPOSERS,
    "regions": ("retclip.proposers.regions", "RegionsProposer"),
}


def _model_proposer_class(name: str) -> type[MaskProposer]:
    module, attribute = _LAZY_PROPOSERS[name]
    cls: type[MaskProposer] = getattr(importlib.import_module(module), attribute)
    return cls


def _model_proposer(name: str, **options: Any) -> MaskProposer:
    cls = _model_proposer_class(name)
    accepted = set(inspect.signature(cls).parameters)
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise InputError(
            f"proposer {name!r} takes no option {', '.join(unknown)}; it takes "
            + ", ".join(sorted(accepted))
        )
    return cls(**options)


PROPOSERS: dict[str, Callable[..., MaskProposer]] = {
    "gt": _ground_truth,
    **{name: functools.partial(_model_proposer, name) for name in _LAZY_PROPOSERS},
}


def accepted_options(name: str) -> set[str]:
    """The keyword options proposer ``name`` takes (``gt``: its ground-truth paths)."""
    if name in _LAZY_PROPOSERS:
        return set(inspect.signature(_model_proposer_class(name)).parameters)
    return {"gt_json", "gt_masks"} if name == "gt" else set()


def load_proposer(
    name: str,
    *,
    gt_json: str | Path | None = None,
    gt_masks: str | Path | None = None,
    **options: Any,
) -> MaskProposer:
    """The proposer called ``name``, built once (its models are loaded here).

    ``gt`` reads masks from a COCO-panoptic JSON + PNG folder (``gt_json``, ``gt_masks``). The
    model proposers take keyword ``options``, ``None`` meaning "the default" (all listed in
    ``docs/proposers.md``): ``grounded-sam`` and ``owl-sam`` take ``detector``, ``sam``,
    ``box_threshold``, ``nms_iou``, ``min_area``, ``mask_nms_iou``, ``device``, ``dtype``
    (``grounded-sam`` also ``text_threshold``, ``shortest_edge``, ``longest_edge``); ``sam-grid``
    takes ``sam``, ``points_per_side``, ``points_per_batch``, ``pred_iou_threshold``,
    ``stability_threshold``, ``stability_offset``, ``mask_nms_iou``, ``min_area``, ``device``,
    ``dtype``; ``fcclip`` takes ``checkpoint`` (required), ``backbone``, ``config``,
    ``backbone_check``, ``device``, ``dtype``, ``resolution``, ``max_size``
    (``docs/fcclip.md``); the weight-free ``regions`` takes
    ``blur``, ``superpixels``, ``threshold``, ``min_area`` (a fraction of the image).

    Raises:
        InputError: unknown name, or an option the proposer does not take.
        ModelUnavailableError: a model's weights are not available locally.
    """
    builder = PROPOSERS.get(name)
    if builder is None:
        known = ", ".join(sorted(PROPOSERS))
        raise InputError(f"unknown proposer {name!r}: expected one of {known}")
    given = {key: value for key, value in options.items() if value is not None}
    if name in _LAZY_PROPOSERS:
        return builder(**given)
    if given:
        raise InputError(f"proposer {name!r} takes no option {', '.join(sorted(given))}")
    return builder(
        gt_json=Path(gt_json) if gt_json else None, gt_masks=Path(gt_masks) if gt_masks else None
    )
