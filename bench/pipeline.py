"""retclip's training-free pipeline on the bench models, with the number of boxes fixed.

Random weights make detector scores meaningless, so both chains keep exactly the ``max_boxes``
best boxes of Grounding DINO (thresholds 0, NMS off): every run does the same work per image.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from bench.common import StageTimer
from bench.models import model_dir
from retclip.backbones.base import Backbone
from retclip.backbones.registry import load_backbone
from retclip.proposers.grounded_sam import GroundingDinoDetector
from retclip.proposers.sam import Detections, DetectorSamProposer, SamSegmenter

BACKBONES = ("clip-b16", "clip-l14", "convnext-l")
DETECTORS = ("gdino-tiny", "gdino-base")


class TopKDetector(GroundingDinoDetector):
    """Grounding DINO keeping its ``max_boxes`` best boxes (thresholds 0)."""

    def __init__(self, model: str, max_boxes: int, **options: object) -> None:
        super().__init__(model, box_threshold=0.0, text_threshold=0.0, **options)  # type: ignore[arg-type]
        self.max_boxes = max_boxes

    def detect(self, image: np.ndarray, classes: Sequence[str]) -> Detections:
        return self._top(super().detect(image, classes))

    def detect_batch(
        self, images: Sequence[np.ndarray], classes: Sequence[Sequence[str]]
    ) -> list[Detections]:
        if len(images) <= 1:
            return [self.detect(image, names) for image, names in zip(images, classes, strict=True)]
        return [self._top(found) for found in super().detect_batch(images, classes)]

    def _top(self, found: Detections) -> Detections:
        return found.select(found.scores.argsort(descending=True)[: self.max_boxes])


def make_proposer(
    detector: str, size: str, root: Path | None, max_boxes: int
) -> DetectorSamProposer:
    """Grounding DINO (top ``max_boxes``) → SAM ViT-B, with box/mask NMS and area filter off."""
    # the tiny test models are sized for 64 px inputs; real ones use Grounded-SAM's 800 / 1333
    edges = {"shortest_edge": 64, "longest_edge": 96} if size == "tiny" else {}
    return DetectorSamProposer(
        TopKDetector(str(model_dir(detector, size, root)), max_boxes, **edges),
        SamSegmenter(str(model_dir("sam-vit-b", size, root))),
        nms_iou=1.0,
        min_area=0,
        mask_nms_iou=1.0,
    )


def make_backbone(name: str, size: str, root: Path | None, **options: object) -> Backbone:
    return load_backbone(str(model_dir(name, size, root)), "cpu", **options)


def stage_targets(
    proposer: DetectorSamProposer, backbone: Backbone
) -> list[tuple[str, object, str]]:
    """``StageTimer.patch`` targets: the model stages of a proposer + backbone."""
    return [
        ("detector", proposer.detector, "detect"),
        ("SAM encoder", proposer.sam, "embed"),
        ("SAM decoder", proposer.sam, "segment_boxes"),
        ("backbone", backbone, "encode_images"),
        ("pooling", backbone, "embed_segments"),
    ]


def models_of(proposer: DetectorSamProposer, backbone: Backbone) -> list[torch.nn.Module]:
    """The ``nn.Module`` of every model (for :meth:`StageTimer.forward_time`)."""
    detector = proposer.detector
    assert isinstance(detector, GroundingDinoDetector)
    models: list[torch.nn.Module] = [detector.model, proposer.sam.model]
    model = getattr(backbone, "model", None)
    if isinstance(model, torch.nn.Module):
        models.append(model)
    return models


def breakdown_rows(timer: StageTimer, total: float, images: int) -> list[list[object]]:
    """``[stage, s/image, % of total]`` rows, with the remainder as ``other``."""
    rows: list[list[object]] = []
    for stage, seconds in timer.seconds.items():
        rows.append([stage, seconds / images, 100.0 * seconds / total])
    return rows
