"""Short backbone names → constructors, so that ``--backbone NAME`` and ``Segmenter(backbone=...)``
accept the same names. A new backbone registers one builder here."""

from __future__ import annotations

from collections.abc import Callable

import torch

from retclip.backbones.base import Backbone
from retclip.backbones.color import ColorBackbone
from retclip.errors import InputError

BACKBONES: dict[str, Callable[[], Backbone]] = {
    "color": ColorBackbone,
}


def load_backbone(name: str | Backbone, device: str | torch.device = "cpu") -> Backbone:
    """The backbone called ``name`` (or ``name`` itself if already built), moved to ``device``."""
    if isinstance(name, Backbone):
        return name.to(device)
    builder = BACKBONES.get(name)
    if builder is None:
        known = ", ".join(sorted(BACKBONES))
        raise InputError(f"unknown backbone {name!r}: expected one of {known}")
    return builder().to(device)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"``/``None`` → CUDA when available, else CPU; anything else as given (checked)."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise InputError(f"invalid device {device!r}: expected auto, cpu, cuda or cuda:N") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} requested but CUDA is not available on this machine")
    return resolved
