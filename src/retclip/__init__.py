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

from retclip.lazy import lazy_exports

_EXPORTS = {
    "RetclipError": "retclip.errors",
    "InputError": "retclip.errors",
    "DatabaseError": "retclip.errors",
    "DatabaseMismatchError": "retclip.errors",
    "Segmenter": "retclip.segmenter",
    "SegmentationResult": "retclip.segmenter",
    "MaskScores": "retclip.segmenter",
    "Settings": "retclip.settings",
    "ModelSpec": "retclip.pipeline",
    "PipelineSpec": "retclip.pipeline",
    "build_segmenter": "retclip.pipeline",
    "Vocabulary": "retclip.vocabulary",
    "FeatureDatabase": "retclip.database",
}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports("retclip", _EXPORTS)
