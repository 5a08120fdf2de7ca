"""Ground-truth masks as proposals (the paper's "Ground Truth" ablation, Table 3, and the
upper-bound database built from annotated masks)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from retclip.datasets.coco_panoptic import CocoPanopticDataset
from retclip.errors import InputError
from retclip.proposers.base import MaskProposer, Proposals, TextEmbeddings
from retclip.vocabulary import Vocabulary, normalize_name

if TYPE_CHECKING:
    from retclip.images import SourceImage


class GroundTruthProposer(MaskProposer):
    """The non-crowd ground-truth segments of the image, looked up by file name.

    Class hints index the vocabulary passed to :meth:`propose` (a dataset category matches the
    class of the same name; -1 where none does).
    """

    name = "gt"
    gives_class_hints = True

    def __init__(self, dataset: CocoPanopticDataset, *, include_crowd: bool = False) -> None:
        self.dataset = dataset
        self.include_crowd = include_crowd

    def propose(
        self, image: SourceImage, vocabulary: Vocabulary, text_embeddings: TextEmbeddings = None
    ) -> Proposals:
        if image.source is None:
            raise InputError("the ground-truth proposer needs the image's file name")
        source = image.source
        ann = self.dataset.annotation(self.dataset.index_of(source))
        if ann.masks.shape[1:] != image.size:
            raise InputError(
                f"ground truth of {source} is {ann.masks.shape[2]}x{ann.masks.shape[1]} but the "
                f"image is {image.size[1]}x{image.size[0]}"
            )
        keep = np.ones(len(ann.categories), dtype=bool) if self.include_crowd else ~ann.iscrowd
        # class hints index the vocabulary: a dataset category is the class that names it
        names = self.dataset.vocabulary.names
        position = {normalize_name(name): i for i, name in enumerate(vocabulary.names)}
        lookup = np.array([position.get(normalize_name(n), -1) for n in names], dtype=np.int64)
        hints = ann.categories[keep]
        hints = lookup[hints] if len(hints) else hints
        return Proposals(masks=ann.masks[keep], scores=np.ones(int(keep.sum())), class_hints=hints)
