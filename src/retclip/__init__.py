"""retclip: open-vocabulary panoptic segmentation with retrieval augmentation (RetCLIP).

Quick start::

    from retclip import Segmenter
    from retclip.proposers import load_proposer

    segmenter = Segmenter("color", load_proposer("gt", gt_json="panoptic.json"), db="my_db")
    result = segmenter("photo.png", "sofa|couch, wall, lamp")
    result.save("out/")

Names are imported lazily, so ``import retclip`` (and the CLI's ``--help``) stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "RetclipError": "retclip.errors",
    "InputError": "retclip.errors",
    "DatabaseError": "retclip.errors",
    "DatabaseMismatchError": "retclip.errors",
    "Segmenter": "retclip.segmenter",
    "SegmentationResult": "retclip.segmenter",
    "MaskScores": "retclip.segmenter",
    "Settings": "retclip.segmenter",
    "Vocabulary": "retclip.vocabulary",
    "FeatureDatabase": "retclip.database",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'retclip' has no attribute {name!r}")
