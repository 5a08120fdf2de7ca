"""``s_clip``: out-of-vocabulary classification via CLIP text similarity (paper §2.2)."""

from __future__ import annotations

import torch

from retclip.text_embeddings import ClassEmbeddings


def clip_scores(
    features: torch.Tensor, classes: ClassEmbeddings, logit_scale: float
) -> torch.Tensor:
    """``s_clip [N, C]``: softmax over classes of ``logit_scale × cosine``.

    Args:
        features: ``[N, D]`` L2-normalised mask-pooled segment features.
        classes: the vocabulary's text embeddings; a class's cosine is the max over its synonyms.
        logit_scale: CLIP's temperature (100 for the released CLIP models, clamped there).
    """
    cosine = classes.cosine(features)  # [N, C]
    return torch.softmax(logit_scale * cosine, dim=-1)
