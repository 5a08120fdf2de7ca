"""The α/β/γ ensemble of ``s_ret``, ``s_clip`` and ``s_iv`` (paper §2.2, "Ensemble").

    s_oov = γ · s_ret + (1 − γ) · s_clip
    s     = α · s_oov + (1 − α) · s_iv     for seen classes (i ∈ C_train)
    s     = β · s_oov + (1 − β) · s_iv     for unseen classes

The paper writes the second step linearly (``"linear"``, the default); FC-CLIP combines its two
paths geometrically, ``s = s_oov^α · s_iv^(1−α)`` (``"geometric"``). Defaults α=0.4, β=0.7,
γ=0.3 are the paper's best setting (Table 4).
"""

from __future__ import annotations

from typing import Literal

import torch

from retclip.errors import InputError

CombineMode = Literal["linear", "geometric"]
DEFAULT_ALPHA = 0.4
DEFAULT_BETA = 0.7
DEFAULT_GAMMA = 0.3


def check_weight(name: str, value: float) -> float:
    """``value`` if it lies in ``[0, 1]``, else an :class:`InputError` naming ``name``."""
    if not 0.0 <= value <= 1.0:
        raise InputError(f"{name} must lie in [0, 1], got {value}")
    return float(value)


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
) -> torch.Tensor:
    """Final class scores ``s [N, C]``.

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
        mode: ``"linear"`` (paper) or ``"geometric"`` (FC-CLIP).
    """
    check_weight("gamma", gamma)
    s_oov = s_clip if s_ret is None else gamma * s_ret + (1.0 - gamma) * s_clip
    if s_iv is None:
        return s_oov
    if seen is None:
        raise InputError("an in-vocabulary score s_iv needs the seen flags of its classes")
    weight = torch.where(
        seen.to(s_oov.device, torch.bool),
        s_oov.new_tensor(check_weight("alpha", alpha)),
        s_oov.new_tensor(check_weight("beta", beta)),
    )  # [C], broadcast over masks
    if mode == "linear":
        return weight * s_oov + (1.0 - weight) * s_iv
    if mode == "geometric":
        return s_oov.clamp_min(0).pow(weight) * s_iv.clamp_min(0).pow(1.0 - weight)
    raise InputError(f"combine mode must be 'linear' or 'geometric', got {mode!r}")
