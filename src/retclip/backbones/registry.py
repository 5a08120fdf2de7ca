"""Short backbone names → constructors, so that ``--backbone NAME`` and ``Segmenter(backbone=...)``
accept the same names. A new backbone registers one builder here.

Besides the registered names, :func:`load_backbone` accepts any Hugging Face hub id or local
directory of a CLIP model: ``config.json`` of a transformers CLIP → :class:`ClipVitBackbone`,
``open_clip_config.json`` → :class:`OpenClipBackbone` (see :mod:`retclip.hub`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from retclip.backbones.base import Backbone
from retclip.backbones.color import ColorBackbone
from retclip.errors import InputError


def _clip_vit(model: str) -> Callable[..., Backbone]:
    def build(**options: Any) -> Backbone:
        from retclip.backbones.clip_vit import ClipVitBackbone

        return ClipVitBackbone(model, **options)

    return build


def _open_clip(model: str) -> Callable[..., Backbone]:
    def build(**options: Any) -> Backbone:
        from retclip.backbones.open_clip_convnext import OpenClipBackbone

        return OpenClipBackbone(model, **options)

    return build


def _toy(device: torch.device, **options: Any) -> Backbone:
    from retclip.backbones.toy import ToyBackbone

    return ToyBackbone(**options).to(device)


BACKBONES: dict[str, Callable[..., Backbone]] = {
    "color": ColorBackbone,
    "toy": _toy,
    "clip-b16": _clip_vit("clip-b16"),
    "clip-l14": _clip_vit("clip-l14"),
    "convnext-l": _open_clip("convnext-l"),
    "rn50x64": _open_clip("rn50x64"),
}


def _builder(name: str) -> Callable[..., Backbone]:
    builder = BACKBONES.get(name)
    if builder is not None:
        return builder
    from retclip.hub import resolve_model

    try:
        resolved = resolve_model(name)
    except InputError as exc:
        known = ", ".join(sorted(BACKBONES))
        raise InputError(
            f"unknown backbone {name!r}: expected one of {known}, a CLIP hub id or a local "
            f"directory ({exc})"
        ) from exc
    if resolved.info is not None and resolved.info.kind != "backbone":
        raise InputError(f"{name!r} is a {resolved.info.kind}, not a backbone")
    return _open_clip(name) if resolved.format == "open_clip" else _clip_vit(name)


@functools.lru_cache(maxsize=4)
def _load_cached(name: str, device: torch.device, options: tuple[tuple[str, Any], ...]) -> Backbone:
    return _builder(name)(device=device, **dict(options))


def load_backbone(
    name: str | Backbone, device: str | torch.device = "cpu", **options: Any
) -> Backbone:
    """The backbone called ``name`` (or ``name`` itself if already built), on ``device``.

    ``name`` is a registered name, a hub id or a local model directory. ``options`` go to the
    backbone's constructor (e.g. ``resolution``, ``dense_mode``, ``window``, ``dtype``). A model
    backbone is built once per process for the same name, device and options (weights are loaded
    once); the colour backbone is cheap and built afresh.
    """
    if isinstance(name, Backbone):
        return name.to(device)
    if name == "color":
        return ColorBackbone(**options).to(device)
    resolved_device = torch.device(device)
    if resolved_device.type == "cuda" and resolved_device.index is None:
        resolved_device = torch.device("cuda", torch.cuda.current_device())
    return _load_cached(name, resolved_device, tuple(sorted(options.items())))


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
