"""The α/β/γ ensemble of ``s_ret``, ``s_clip`` and ``s_iv`` (paper §2.2, "Ensemble").

The paper's form (``"linear"``, the default)::

    s_oov = γ · s_ret + (1 − γ) · s_clip
    s     = α · s_oov + (1 − α) · s_iv     for seen classes (i ∈ C_train)
    s     = β · s_oov + (1 − β) · s_iv     for unseen classes

FC-CLIP's own form (``"fcclip"``, its ``geometric ensemble``), with ``w`` = α or β::

    s = softmax_C( log(s_iv^(1−w) · s_oov^w) )          (renormalised over the C classes)

Both then apply the void probability of a proposer that has one (FC-CLIP's in-vocabulary softmax
over ``C + 1``): the final probabilities are ``[s · (1 − p_void), p_void]``, and in the ``"fcclip"``
form re-softmaxed as ``softmax(log(p + 1e-8))``, exactly as FC-CLIP's inference post-processes
them (:func:`final_probs`). With γ = 0 (or no database) and ``"fcclip"``, the result is FC-CLIP's.
Defaults α=0.4, β=0.7, γ=0.3 are the paper's best setting (Table 4); FC-CLIP's are α=0.4, β=0.8.
"""

from __future__ import annotations

import torch

from retclip.errors import InputError
from retclip.settings import (
    COMBINE_MODES,
    DEFAULT_ALPHA,
    DEFAULT_BETA,
    DEFAULT_GAMMA,
    CombineMode,
    check_combine_mode,
    check_weight,
)

__all__ = [
    "COMBINE_MODES",
    "FCCLIP_LOG_EPS",
    "CombineMode",
    "check_combine_mode",
    "check_weight",
    "ensemble",
    "final_probs",
]

#: FC-CLIP's ``torch.log(mask_cls_probs + 1e-8)`` before its post-processing softmax.
FCCLIP_LOG_EPS = 1e-8


def ensemble(
    s_clip: torch.Tensor,
    s_ret: torch.Tensor | None,
    *,
    gamma: float = DEFAULT_GAMMA,
    s_iv: torch.Tensor | None = None,
    seen: torch.Tensor | None = None,
    alpha: float = DEFAULT_ALPHA,
    beta: float = DEFAULT_BETA,
    mode: CombineMode = "linear",
    oov_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Class scores ``s [N, C]`` before any void handling.

    Args:
        s_clip: ``[N, C]`` CLIP-path probabilities.
        s_ret: ``[N, C]`` retrieval scores, or ``None`` without a database (then ``s_oov =
            s_clip``, as with γ = 0).
        gamma: weight of retrieval within the out-of-vocabulary score.
        s_iv: ``[N, C]`` in-vocabulary probabilities of a trained proposer (FC-CLIP), or
            ``None`` in the training-free setting (then ``s = s_oov``).
        seen: ``[C]`` bool, classes of the training vocabulary (weight α; others β). Required
            with ``s_iv``.
        alpha, beta: weights of ``s_oov`` for seen and unseen classes.
        mode: ``"linear"`` (paper) or ``"fcclip"`` (FC-CLIP's renormalised geometric form).
        oov_valid: ``[N]`` bool; where ``False`` the out-of-vocabulary weight is 0.
    """
    check_weight("gamma", gamma)
    check_combine_mode(mode)
    s_oov = s_clip if s_ret is None else gamma * s_ret + (1.0 - gamma) * s_clip
    if s_iv is None:
        if mode == "fcclip":
            raise InputError(
                "combine mode 'fcclip' needs the in-vocabulary scores of a trained proposer "
                "(--proposer fcclip); use 'linear'"
            )
        return s_oov
    if seen is None:
        raise InputError("an in-vocabulary score s_iv needs the seen flags of its classes")
    weight = torch.where(
        seen.to(s_oov.device, torch.bool),
        s_oov.new_tensor(check_weight("alpha", alpha)),
        s_oov.new_tensor(check_weight("beta", beta)),
    ).expand_as(s_oov)  # [N, C]
    if oov_valid is not None:
        weight = weight * oov_valid.to(s_oov.device, s_oov.dtype)[:, None]
    if mode == "linear":
        return weight * s_oov + (1.0 - weight) * s_iv
    # FC-CLIP: (p_in ** (1 − w) * p_out ** w).log(), then softmax over the classes
    return (s_iv ** (1.0 - weight) * s_oov.clamp_min(0) ** weight).log().softmax(-1)


def final_probs(
    s: torch.Tensor,
    p_void: torch.Tensor | None,
    *,
    mode: CombineMode = "linear",
    kept: torch.Tensor | None = None,
) -> torch.Tensor:
    """What the panoptic merge ranks: ``[N, C]``, or ``[N, C + 1]`` with void last.

    Args:
        s: ``[N, C]`` ensembled scores (:func:`ensemble`).
        p_void: ``[N]`` void probabilities of the proposer, or ``None`` (no void column).
        mode: in ``"fcclip"`` mode the void-scaled row is re-softmaxed as
            ``softmax(log(p + 1e-8))`` (FC-CLIP's post-processing input).
        kept: ``[C]`` bool; pruned classes get probability 0.
    """
    if kept is not None:
        s = s * kept.to(s.device, s.dtype)
    if p_void is None:
        return s
    void = p_void.to(s.device, s.dtype).reshape(-1, 1)
    probs = torch.cat([s * (1.0 - void), void], dim=-1)
    if mode == "fcclip":
        probs = torch.log(probs + FCCLIP_LOG_EPS).softmax(-1)
        if kept is not None:
            probs[:, :-1] = probs[:, :-1] * kept.to(s.device, s.dtype)
    return probs
