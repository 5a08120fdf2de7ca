"""``s_clip``: out-of-vocabulary classification via CLIP text similarity (paper §2.2)."""

from __future__ import annotations

import torch

from retclip.text_embeddings import ClassEmbeddings


def clip_scores(
    features: torch.Tensor,
    classes: ClassEmbeddings,
    logit_scale: float,
    *,
    kept: torch.Tensor | None = None,
) -> torch.Tensor:
    """``s_clip [N, C]``: softmax over classes of ``logit_scale × cosine``.

    Args:
        features: ``[N, D]`` L2-normalised mask-pooled segment features.
        classes: the vocabulary's text embeddings; a class's cosine is the max over its synonyms.
        logit_scale: CLIP's temperature (100 for the released CLIP models, clamped there).
        kept: ``[C]`` bool, the classes left after the proposer pruned the absent ones (paper
            §2.2): the softmax runs over these only and pruned classes score 0. ``None``: all.
    """
    logits = logit_scale * classes.cosine(features)  # [N, C]
    if kept is None:
        return torch.softmax(logits, dim=-1)
    kept = kept.to(logits.device, torch.bool)
    if not bool(kept.any()):
        return torch.zeros_like(logits)
    return torch.softmax(logits.masked_fill(~kept, float("-inf")), dim=-1)
