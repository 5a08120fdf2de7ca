"""``--proposer fcclip``: FC-CLIP's masks and in-vocabulary scores for RetCLIP (paper §2.2).

FC-CLIP runs on the OpenCLIP model of a retclip :class:`OpenClipBackbone` (``convnext-l`` by
default), obtained through :func:`load_backbone`, which builds one instance per process and
name: the :class:`~retclip.segmenter.Segmenter` given the same backbone name shares it. The
proposer gives:

- ``masks``: the decoder's mask logits at image size, ``>= 0`` (sigmoid ``>= 0.5``, FC-CLIP's
  segment rule), for the queries FC-CLIP itself keeps (label ≠ void and score above
  ``object_mask_threshold``, under its own geometric ensemble) with a non-empty mask;
- ``s_iv``: the in-vocabulary path's softmax over the ``C`` classes (void dropped);
- ``scores``: ``1 − p_void``.

``s_clip`` and ``s_ret`` are not taken from FC-CLIP's out-of-vocabulary head: the segmenter pools
the same backbone's map under these masks, exactly as the feature database was built, so database
rows and queries share one feature space; the α/β/γ ensemble (linear or geometric) then combines
them with ``s_iv``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from retclip.backbones.open_clip_convnext import OpenClipBackbone
from retclip.backbones.registry import load_backbone, resolve_device
from retclip.errors import InputError
from retclip.fcclip.checkpoint import load_fcclip_weights, load_weights
from retclip.fcclip.model import (
    CONVNEXT_LARGE,
    FCCLIP,
    FCCLIP_ALPHA,
    FCCLIP_BETA,
    RN50X64,
    FCCLIPConfig,
    masks_to_image,
    preprocess,
    resize_size,
)
from retclip.proposers.base import MaskProposer, Proposals
from retclip.text_embeddings import embed_vocabulary
from retclip.vocabulary import VocabClass, Vocabulary


class FcclipProposer(MaskProposer):
    """FC-CLIP mask proposals with in-vocabulary class probabilities.

    Args:
        checkpoint: ``fcclip_cocopan.pth`` (original key names) or the ``.safetensors`` written
            by ``retclip convert-fcclip``.
        backbone: retclip backbone name (``convnext-l``, ``rn50x64``, an OpenCLIP directory) or
            an :class:`OpenClipBackbone`; the checkpoint's backbone copy must equal it.
        config: head architecture; default by backbone kind (:data:`CONVNEXT_LARGE` /
            :data:`RN50X64`).
        train_vocab: FC-CLIP's training vocabulary (its seen classes, for its own void decision).
        vocabulary: builtin name or file whose synonyms complete class names given as plain
            strings (the segmenter passes each class's first synonym); classes given as
            :class:`VocabClass` keep their own synonyms.
        alpha, beta: FC-CLIP's geometric-ensemble weights for the void decision (0.4, 0.8).
        object_mask_threshold: FC-CLIP keeps queries scoring above this (0.0 for ADE20k).
        short_side, max_size: test resize (800 / 1333, FC-CLIP's ADE20k setting).
        backbone_check: ``"verify"`` (default) the checkpoint's CLIP weights against the
            backbone's, ``"load"`` them into it, or ``"skip"``.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...
        dtype: the backbone's weights' dtype when built here by name (the head runs float32).
    """

    name = "fcclip"

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        *,
        backbone: str | OpenClipBackbone = "convnext-l",
        config: FCCLIPConfig | None = None,
        train_vocab: str = "coco-panoptic-133",
        vocabulary: str | None = None,
        alpha: float = FCCLIP_ALPHA,
        beta: float = FCCLIP_BETA,
        object_mask_threshold: float = 0.0,
        short_side: int = 800,
        max_size: int = 1333,
        backbone_check: Literal["load", "verify", "skip"] = "verify",
        device: str = "auto",
        dtype: str | None = None,
    ) -> None:
        if checkpoint is None:
            raise InputError(
                "proposer 'fcclip' needs FC-CLIP's weights: pass --fcclip-checkpoint "
                "fcclip_cocopan.pth (or its converted .safetensors)"
            )
        self.device = resolve_device(device)
        if isinstance(backbone, str):
            loaded = load_backbone(backbone, self.device, **({"dtype": dtype} if dtype else {}))
            if not isinstance(loaded, OpenClipBackbone):
                raise InputError(
                    f"proposer 'fcclip' needs an OpenCLIP ConvNeXt or ResNet backbone, "
                    f"got {backbone!r}"
                )
            backbone = loaded
        self.backbone = backbone
        if config is None:
            config = RN50X64 if backbone.kind == "resnet" else CONVNEXT_LARGE
        self.model = FCCLIP(config, backbone.model).to(backbone.device).eval()
        self.report = load_fcclip_weights(
            self.model, load_weights(checkpoint), backbone=backbone_check
        )
        self.train_vocab = Vocabulary.load(train_vocab)
        self.vocabulary = Vocabulary.load(vocabulary) if vocabulary else None
        self.alpha, self.beta = alpha, beta
        self.object_mask_threshold = object_mask_threshold
        self.short_side, self.max_size = short_side, max_size

    def vocabulary_of(self, classes: Sequence[str | VocabClass]) -> Vocabulary:
        """The classes as a :class:`Vocabulary`, plain names completed from ``vocabulary``."""
        entries = []
        for index, cls in enumerate(classes):
            if isinstance(cls, VocabClass):
                entries.append(cls)
                continue
            synonyms: tuple[str, ...] = (cls,)
            if self.vocabulary is not None:
                with contextlib.suppress(InputError):
                    synonyms = self.vocabulary[self.vocabulary.index_of(cls)].synonyms
            entries.append(VocabClass(cls, synonyms, id=index))
        return Vocabulary(entries, name="fcclip-query")

    @torch.inference_mode()
    def propose(
        self,
        image: np.ndarray,
        classes: Sequence[str] | None = None,
        *,
        source: str | Path | None = None,
        vocabulary: Vocabulary | None = None,
    ) -> Proposals:
        """FC-CLIP's kept masks of ``image`` ``[H, W, 3]`` uint8 for ``classes`` (or, when
        given, ``vocabulary`` with all its synonyms)."""
        if not classes:
            raise InputError("proposer 'fcclip' classifies its queries: it needs the class names")
        # the full vocabulary keeps every synonym (the class score is the max over them)
        vocab = vocabulary if vocabulary is not None else self.vocabulary_of(classes)
        text = embed_vocabulary(self.backbone, vocab).to(self.backbone.device)
        h, w = image.shape[:2]
        size = resize_size(h, w, self.short_side, self.max_size)
        pixels, resized = preprocess(image, size, self.backbone.device)
        output = self.model(pixels, text)
        seen = torch.from_numpy(vocab.seen_mask(self.train_vocab))
        probs = self.model.class_probs(output, seen, alpha=self.alpha, beta=self.beta)[0]
        scores, labels = torch.log(probs + 1e-8).softmax(-1).max(-1)  # as FC-CLIP re-softmaxes
        masks = masks_to_image(output.mask_logits, resized, (h, w))[0] >= 0  # [Q, H, W]
        keep = (labels != len(vocab)) & (scores > self.object_mask_threshold)
        keep &= masks.flatten(1).any(-1)
        s_iv = output.in_vocab_logits[0, :, :-1].softmax(-1)
        return Proposals(
            masks=masks[keep].cpu().numpy(),
            scores=(1.0 - probs[keep, -1]).float().cpu().numpy(),
            s_iv=s_iv[keep].float().cpu().numpy(),
        )
