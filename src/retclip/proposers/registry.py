"""Proposer names for ``--proposer NAME`` → constructors. A new proposer registers one builder."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from retclip.datasets.coco_panoptic import CocoPanopticDataset
from retclip.errors import InputError
from retclip.proposers.base import MaskProposer
from retclip.proposers.ground_truth import GroundTruthProposer


def _ground_truth(gt_json: Path | None = None, gt_masks: Path | None = None) -> MaskProposer:
    if gt_json is None:
        raise InputError("proposer 'gt' needs the ground truth: pass --gt PANOPTIC_JSON")
    return GroundTruthProposer(CocoPanopticDataset(gt_json, masks_dir=gt_masks))


PROPOSERS: dict[str, Callable[..., MaskProposer]] = {
    "gt": _ground_truth,
}


def load_proposer(
    name: str, *, gt_json: str | Path | None = None, gt_masks: str | Path | None = None
) -> MaskProposer:
    """The proposer called ``name``; ``gt`` reads masks from a COCO-panoptic JSON + PNG folder."""
    builder = PROPOSERS.get(name)
    if builder is None:
        known = ", ".join(sorted(PROPOSERS))
        raise InputError(f"unknown proposer {name!r}: expected one of {known}")
    return builder(
        gt_json=Path(gt_json) if gt_json else None, gt_masks=Path(gt_masks) if gt_masks else None
    )
