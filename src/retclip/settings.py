"""How per-mask scores become a panoptic result: the ensemble weights and merge thresholds.

Torch-free on purpose: the command line builds its option groups from these fields (one place
for each default) and starts without loading a model library. The formulas that use them live in
:mod:`retclip.scores.ensemble` (paper §2.2) and :mod:`retclip.panoptic`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import field
from typing import Literal

from retclip.errors import InputError

CombineMode = Literal["linear", "fcclip"]
COMBINE_MODES: tuple[str, ...] = ("linear", "fcclip")
#: The paper's best ensemble (Table 4); FC-CLIP's own is α = 0.4, β = 0.8.
DEFAULT_ALPHA = 0.4
DEFAULT_BETA = 0.7
DEFAULT_GAMMA = 0.3
#: Neighbours retrieved per segment. The paper does not give its k; 10 lets a class be supported
#: by several rows while keeping the min-max range local to the query.
DEFAULT_K = 10


def check_weight(name: str, value: float) -> float:
    """``value`` if it lies in ``[0, 1]``, else an :class:`InputError` naming ``name``."""
    if not (isinstance(value, int | float) and 0.0 <= value <= 1.0):
        raise InputError(f"{name} must lie in [0, 1], got {value}")
    return float(value)


def check_combine_mode(mode: str) -> CombineMode:
    """``mode`` if it is a combine mode, else an :class:`InputError` listing them."""
    if mode not in COMBINE_MODES:
        hint = " (FC-CLIP's geometric ensemble is 'fcclip')" if mode == "geometric" else ""
        raise InputError(f"combine mode must be 'linear' or 'fcclip', got {mode!r}{hint}")
    return mode  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class Settings:
    """How per-mask scores become a panoptic result (no model pass depends on these)."""

    alpha: float = field(default=DEFAULT_ALPHA, metadata={"help": "Weight of s_oov, seen classes."})
    beta: float = field(default=DEFAULT_BETA, metadata={"help": "Weight of s_oov, unseen classes."})
    gamma: float = field(default=DEFAULT_GAMMA, metadata={"help": "Weight of s_ret within s_oov."})
    combine: CombineMode = field(
        default="linear",
        metadata={"help": "linear: the paper's ensemble; fcclip: FC-CLIP's renormalised one."},
    )
    score_threshold: float = field(
        default=0.0, metadata={"help": "Panoptic merge: drop proposals scoring at most this."}
    )
    overlap_threshold: float = field(
        default=0.8, metadata={"help": "Panoptic merge: drop a proposal keeping less of its mask."}
    )
    max_instances: int = field(
        default=100, metadata={"help": "Instances: top-k (mask, class) pairs per image."}
    )

    def __post_init__(self) -> None:
        for name in ("alpha", "beta", "gamma", "overlap_threshold"):
            check_weight(name, getattr(self, name))
        if not math.isfinite(self.score_threshold):
            raise InputError(f"score_threshold must be a finite number, got {self.score_threshold}")
        check_combine_mode(self.combine)
        if self.max_instances < 1:
            raise InputError(f"max_instances must be >= 1, got {self.max_instances}")
