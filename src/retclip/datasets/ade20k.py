"""ADE20k-150 as laid out by Mask2Former's preparation scripts, and semantic label PNGs.

``datasets/prepare_ade20k_sem_seg.py``, ``prepare_ade20k_pan_seg.py`` and
``prepare_ade20k_ins_seg.py`` turn ``ADEChallengeData2016`` into::

    ADEChallengeData2016/
      images/validation/ADE_val_00000001.jpg ...
      ade20k_panoptic_val.json          COCO panoptic JSON (150 categories, ids 0..149)
      ade20k_panoptic_val/*.png         panoptic PNGs
      ade20k_instance_val.json          COCO instance JSON (the 100 thing classes)
      annotations_detectron2/validation/*.png   semantic labels 0..149, 255 = ignore

:class:`Ade20kPanoptic` is a :class:`CocoPanopticDataset` on those files that also knows where
the semantic labels and the instance JSON are.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from retclip.datasets.coco_panoptic import CocoPanopticDataset
from retclip.errors import InputError
from retclip.images import read_label_png

__all__ = ["Ade20kPanoptic", "read_semantic"]

_PREPARE = "see docs/evaluation.md for Mask2Former's preparation scripts"


def read_semantic(path: str | Path) -> np.ndarray:
    """``[H, W]`` int64 class labels of a semantic PNG (8- or 16-bit, one channel; 255 = ignore)."""
    return read_label_png(path)


class Ade20kPanoptic(CocoPanopticDataset):
    """The ADE20k panoptic split of ``root`` (``ADEChallengeData2016``).

    Args:
        root: the ``ADEChallengeData2016`` folder.
        split: ``"val"`` (2000 images) or ``"train"``.

    Attributes:
        semantic_dir: ``annotations_detectron2/<validation|training>``, or ``None`` if absent.
        instances_json: ``ade20k_instance_<split>.json``, or ``None`` if absent.
    """

    def __init__(self, root: str | Path, split: str = "val") -> None:
        if split not in ("val", "train"):
            raise InputError(f"ADE20k split must be 'val' or 'train', got {split!r}")
        root = Path(root)
        if not root.is_dir():
            raise InputError(f"ADE20k folder not found: {root}")
        folder = "validation" if split == "val" else "training"
        panoptic_json = root / f"ade20k_panoptic_{split}.json"
        for needed in (panoptic_json, root / f"ade20k_panoptic_{split}", root / "images" / folder):
            if not needed.exists():
                raise InputError(f"ADE20k file missing: {needed} ({_PREPARE})")
        super().__init__(panoptic_json, root / "images" / folder, root / f"ade20k_panoptic_{split}")
        semantic_dir = root / "annotations_detectron2" / folder
        instances_json = root / f"ade20k_instance_{split}.json"
        self.semantic_dir: Path | None = semantic_dir if semantic_dir.is_dir() else None
        self.instances_json: Path | None = instances_json if instances_json.is_file() else None
