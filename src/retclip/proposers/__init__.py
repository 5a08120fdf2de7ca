"""Mask proposers: class-agnostic (or class-prompted) binary masks for an image."""

from retclip.proposers.base import MaskProposer, Proposals, masks_to_boxes
from retclip.proposers.detections import DetectionsProposer
from retclip.proposers.ground_truth import GroundTruthProposer
from retclip.proposers.registry import PROPOSERS, load_proposer

__all__ = [
    "PROPOSERS",
    "DetectionsProposer",
    "GroundTruthProposer",
    "MaskProposer",
    "Proposals",
    "load_proposer",
    "masks_to_boxes",
]
