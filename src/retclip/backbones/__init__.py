"""Backbones: dense image features and text embeddings in a joint space."""

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
