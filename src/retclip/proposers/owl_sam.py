"""OWLv2 boxes → SAM masks: an alternative open-vocabulary detector behind the same interface.

OWLv2 scores every image patch's box against one text query per class (the lowercased class
name), so any number of classes fits in one pass. A box takes its best class if that class's
sigmoid score exceeds the threshold. OWLv2 pads the image to a square before resizing, so its
normalised boxes are relative to the padded square of side ``max(H, W)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from retclip.proposers.sam import (
    DEFAULT_SAM,
    Detections,
    Detector,
    DetectorSamProposer,
    SamSegmenter,
    load_hf,
    resolve_device,
    resolve_dtype,
)

#: ``google/owlv2-base-patch16-ensemble``.
DEFAULT_OWL = "owlv2"


class Owlv2Detector(Detector):
    """OWLv2 prompted with class names.

    Args:
        model: ``owlv2`` (registered short name), a hub id or a local directory.
        threshold: minimum sigmoid class score of a box (0.1, OWL-ViT's usual value).
        device, dtype: see :class:`~retclip.proposers.sam.SamSegmenter`.
    """

    def __init__(
        self,
        model: str = DEFAULT_OWL,
        *,
        threshold: float = 0.1,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> None:
        from transformers import AutoProcessor, Owlv2ForObjectDetection

        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.processor: Any = load_hf(AutoProcessor, model)
        detector = load_hf(Owlv2ForObjectDetection, model)
        self.model: Any = detector.to(self.device, self.dtype).eval()
        self.max_tokens = int(self.model.config.text_config.max_position_embeddings)
        self.threshold = threshold

    @torch.inference_mode()
    def detect(self, image: np.ndarray, classes: Sequence[str]) -> Detections:
        inputs = self.processor(
            images=image,
            text=[[name.strip().lower() for name in classes]],
            padding="max_length",
            truncation=True,
            max_length=self.max_tokens,
            return_tensors="pt",
        )
        outputs = self.model(
            input_ids=inputs["input_ids"].to(self.device),
            attention_mask=inputs["attention_mask"].to(self.device),
            pixel_values=inputs["pixel_values"].to(self.device, self.dtype),
        )
        probs = outputs.logits[0].float().sigmoid()  # [P, C]
        scores, labels = probs.max(dim=1)
        keep = scores > self.threshold
        height, width = image.shape[:2]
        side = float(max(height, width))
        cx, cy, w, h = (outputs.pred_boxes[0, keep].float() * side).unbind(-1)
        boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)
        limit = torch.tensor([width, height, width, height], device=boxes.device)
        return Detections(boxes.clamp_min(0).minimum(limit), scores[keep], labels[keep])


class OwlSamProposer(DetectorSamProposer):
    """``owl-sam``: OWLv2 → SAM. Options as in :class:`Owlv2Detector` and
    :class:`~retclip.proposers.sam.DetectorSamProposer`."""

    name = "owl-sam"

    def __init__(
        self,
        detector: str = DEFAULT_OWL,
        sam: str = DEFAULT_SAM,
        *,
        box_threshold: float = 0.1,
        nms_iou: float = 0.5,
        min_area: int = 100,
        mask_nms_iou: float = 0.8,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> None:
        super().__init__(
            Owlv2Detector(detector, threshold=box_threshold, device=device, dtype=dtype),
            SamSegmenter(sam, device=device, dtype=dtype),
            nms_iou=nms_iou,
            min_area=min_area,
            mask_nms_iou=mask_nms_iou,
        )
