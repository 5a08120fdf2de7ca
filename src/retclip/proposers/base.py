"""The MaskProposer interface: an image and a vocabulary → mask proposals.

Proposals are class-agnostic masks that the classification paths then label (paper §2.2, "Mask
Proposal Generation"). A proposer that is prompted by class names (Grounding DINO → SAM) may also
give a class hint per mask and prune classes it found no evidence for from the image's vocabulary.
A new proposer is one new file in this package implementing :class:`MaskProposer`.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeAlias

import numpy as np

if TYPE_CHECKING:
    from retclip.backbones.base import Backbone
    from retclip.images import SourceImage
    from retclip.text_embeddings import ClassEmbeddings
    from retclip.vocabulary import Vocabulary


#: The optional text embeddings :meth:`MaskProposer.propose` receives (see there).
TextEmbeddings: TypeAlias = "ClassEmbeddings | None"


@dataclasses.dataclass
class Proposals:
    """Mask proposals of one image.

    Attributes:
        masks: ``[N, H, W]`` bool, at the image's size.
        scores: ``[N]`` float confidence in ``[0, 1]`` (1 for ground truth).
        class_hints: ``[N]`` int index into the class list given to the proposer, or -1 where the
            proposer has no hint; ``None`` if the proposer never gives hints.
        kept_classes: indices of the given classes the proposer kept for this image (it pruned
            the others); ``None`` means no pruning.
        boxes: ``[N, 4]`` float XYXY boxes in pixels; ``None`` to derive them from the masks.
        s_iv: ``[N, C]`` in-vocabulary class probabilities from a proposer trained on a
            labelled dataset (FC-CLIP's in-vocabulary path, paper §2.2), or ``None``.
        mask_probs: ``[N, H, W]`` float32 mask probabilities in ``[0, 1]`` (FC-CLIP's sigmoided
            mask logits), or ``None`` for binary proposals. When given, ``masks`` is
            ``mask_probs >= 0.5`` and the panoptic merge weighs pixels by these probabilities.
        p_void: ``[N]`` probability that a proposal is no object (FC-CLIP's void class), or
            ``None``. When given, final class probabilities are scaled by ``1 − p_void`` and a
            proposal whose void probability beats every class is dropped.
        features: ``[N, D]`` unit-norm segment embeddings the proposer computed from its own pass
            of the *shared* backbone (FC-CLIP pools its CLIP map under its mask logits); the
            segmenter then scores them (``s_clip``, ``s_ret``) instead of running the backbone
            again. ``None``: the segmenter pools the backbone's map under ``masks``.
        oov_valid: ``[N]`` bool, proposals whose mask covers a cell of the CLIP map; where
            ``False`` the out-of-vocabulary weights are 0 (FC-CLIP's ``ENSEMBLE_ON_VALID_MASK``,
            used with ResNet CLIPs); ``None``: all valid.
    """

    masks: np.ndarray
    scores: np.ndarray
    class_hints: np.ndarray | None = None
    kept_classes: np.ndarray | None = None
    boxes: np.ndarray | None = None
    s_iv: np.ndarray | None = None
    mask_probs: np.ndarray | None = None
    p_void: np.ndarray | None = None
    features: np.ndarray | None = None
    oov_valid: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.masks.ndim != 3:
            raise ValueError(f"masks must be [N, H, W], got shape {self.masks.shape}")
        self.masks = self.masks.astype(bool, copy=False)
        if self.mask_probs is not None:
            self.mask_probs = np.asarray(self.mask_probs, dtype=np.float32)
            if self.mask_probs.shape != self.masks.shape:
                raise ValueError(
                    f"mask_probs {self.mask_probs.shape} must match masks {self.masks.shape}"
                )
        for name in ("p_void", "oov_valid"):
            value = getattr(self, name)
            if value is not None and np.asarray(value).reshape(-1).shape[0] != len(self.masks):
                raise ValueError(f"{len(self.masks)} masks but {np.asarray(value).size} {name}")
        if self.features is not None and self.features.shape[0] != len(self.masks):
            raise ValueError(f"{len(self.masks)} masks but {self.features.shape[0]} features")
        self.scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
        n = self.masks.shape[0]
        if self.scores.shape[0] != n:
            raise ValueError(f"{n} masks but {self.scores.shape[0]} scores")
        if self.class_hints is not None:
            self.class_hints = np.asarray(self.class_hints, dtype=np.int64).reshape(-1)
            if self.class_hints.shape[0] != n:
                raise ValueError(f"{n} masks but {self.class_hints.shape[0]} class hints")
        if self.boxes is None:
            self.boxes = masks_to_boxes(self.masks)
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(n, 4)

    def __len__(self) -> int:
        return int(self.masks.shape[0])

    def select(self, keep: np.ndarray) -> Proposals:
        """The proposals at ``keep`` (bool mask or indices), vocabulary pruning unchanged."""
        return Proposals(
            masks=self.masks[keep],
            scores=self.scores[keep],
            class_hints=None if self.class_hints is None else self.class_hints[keep],
            kept_classes=self.kept_classes,
            boxes=None if self.boxes is None else self.boxes[keep],
            s_iv=None if self.s_iv is None else self.s_iv[keep],
            mask_probs=None if self.mask_probs is None else self.mask_probs[keep],
            p_void=None if self.p_void is None else self.p_void[keep],
            features=None if self.features is None else self.features[keep],
            oov_valid=None if self.oov_valid is None else self.oov_valid[keep],
        )

    @property
    def soft_masks(self) -> np.ndarray:
        """``[N, H, W]`` float32 mask probabilities: ``mask_probs``, or the binary masks as 0/1."""
        if self.mask_probs is not None:
            return self.mask_probs
        return self.masks.astype(np.float32)


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """Tight XYXY boxes ``[N, 4]`` (x1, y1 exclusive) of ``[N, H, W]`` bool masks; 0s if empty."""
    n = masks.shape[0]
    boxes = np.zeros((n, 4), dtype=np.float32)
    if n == 0:
        return boxes
    rows: np.ndarray = np.any(masks, axis=2)  # [N, H]
    cols: np.ndarray = np.any(masks, axis=1)  # [N, W]
    nonempty = np.any(rows, axis=1)
    h, w = masks.shape[1:]
    y0 = rows.argmax(axis=1)
    y1 = h - rows[:, ::-1].argmax(axis=1)
    x0 = cols.argmax(axis=1)
    x1 = w - cols[:, ::-1].argmax(axis=1)
    boxes[:] = np.stack([x0, y0, x1, y1], axis=1)
    boxes[~nonempty] = 0
    return boxes


class MaskProposer(abc.ABC):
    """An image and the vocabulary asked for → :class:`Proposals`.

    One contract for every proposer: :meth:`propose` takes the image, the vocabulary and the
    segmenter's text embeddings of it. What a proposer needs beyond that (a ground-truth dataset,
    weights, thresholds) it is given when it is built.
    """

    #: Short name used on the command line (``--proposer NAME``).
    name: str = ""
    #: Whether :meth:`propose` gives a class hint per mask (it can then label database rows).
    gives_class_hints: bool = False
    #: Pooling rule of the ``features`` the proposer returns (``None``: it returns none); a
    #: database queried with them must have been built with the same rule.
    feature_pooling: str | None = None
    #: The backbone whose single pass the proposer shares with the segmenter (FC-CLIP), or
    #: ``None``. A proposer that returns ``features`` computes them with this backbone.
    backbone: Backbone | None = None

    @abc.abstractmethod
    def propose(
        self, image: SourceImage, vocabulary: Vocabulary, text_embeddings: TextEmbeddings = None
    ) -> Proposals:
        """Masks for one image.

        Args:
            image: the pixels (``[H, W, 3]`` uint8) and the file they came from, if any.
            vocabulary: the classes asked for. A class-prompted proposer prompts with each
                class's first synonym and may prune classes (``kept_classes``); class hints and
                ``s_iv`` columns index these classes.
            text_embeddings: the segmenter's embeddings of ``vocabulary`` (for proposers that
                classify with text, FC-CLIP), or ``None`` when the caller has none (a database
                build); such a proposer then embeds the vocabulary itself.
        """

    def propose_batch(
        self,
        images: Sequence[SourceImage],
        vocabularies: Sequence[Vocabulary],
        text_embeddings: Sequence[TextEmbeddings] | None = None,
    ) -> list[Proposals]:
        """:meth:`propose` of several images (each with its own vocabulary), in order.

        Proposers whose models take a batch (the detector → SAM proposers, SAM's point grid)
        override this to run their models over the images together, with results equal to
        :meth:`propose` image by image; this default is that loop.
        """
        texts = text_embeddings if text_embeddings is not None else [None] * len(images)
        return [
            self.propose(image, vocabulary, text)
            for image, vocabulary, text in zip(images, vocabularies, texts, strict=True)
        ]
