"""Backbones: dense image features and text embeddings in a joint space.

The model backbones (:class:`~retclip.backbones.clip_vit.ClipVitBackbone`,
:class:`~retclip.backbones.open_clip_convnext.OpenClipBackbone`) import transformers/OpenCLIP and
are loaded lazily through :func:`load_backbone`.
"""

from retclip.backbones.base import Backbone, BackboneFingerprint
from retclip.backbones.color import ColorBackbone
from retclip.backbones.registry import BACKBONES, load_backbone, resolve_device

__all__ = [
    "BACKBONES",
    "Backbone",
    "BackboneFingerprint",
    "ColorBackbone",
    "load_backbone",
    "resolve_device",
]
