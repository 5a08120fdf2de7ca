"""Ground-truth masks as proposals (the paper's "Ground Truth" ablation, Table 3, and the
upper-bound database built from annotated masks)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from retclip.datasets.coco_panoptic import CocoPanopticDataset
from retclip.errors import InputError
from retclip.proposers.base import MaskProposer, Proposals
from retclip.vocabulary import Vocabulary, normalize_name


class GroundTruthProposer(MaskProposer):
    """The non-crowd ground-truth segments of the image, looked up by file name.

    Class hints index the ``classes`` passed to :meth:`propose` (matched by the dataset's category
    name against each class's name), or the dataset's categories when ``classes`` is ``None``.
    """

    name = "gt"
    gives_class_hints = True

    def __init__(self, dataset: CocoPanopticDataset, *, include_crowd: bool = False) -> None:
        self.dataset = dataset
        self.include_crowd = include_crowd

    def propose(
        self,
        image: np.ndarray,
        classes: Sequence[str] | None = None,
        *,
        source: str | Path | None = None,
        vocabulary: Vocabulary | None = None,
    ) -> Proposals:
        if source is None:
            raise InputError("the ground-truth proposer needs the image's file name")
        ann = self.dataset.annotation(self.dataset.index_of(source))
        if ann.masks.shape[1:] != image.shape[:2]:
            raise InputError(
                f"ground truth of {source} is {ann.masks.shape[2]}x{ann.masks.shape[1]} but the "
                f"image is {image.shape[1]}x{image.shape[0]}"
            )
        keep = np.ones(len(ann.categories), dtype=bool) if self.include_crowd else ~ann.iscrowd
        hints = ann.categories[keep]
        if classes is not None:
            position = {normalize_name(name): i for i, name in enumerate(classes)}
            names = self.dataset.vocabulary.names
            lookup = np.array([position.get(normalize_name(n), -1) for n in names], dtype=np.int64)
            hints = lookup[hints] if len(hints) else hints
        return Proposals(masks=ann.masks[keep], scores=np.ones(int(keep.sum())), class_hints=hints)
