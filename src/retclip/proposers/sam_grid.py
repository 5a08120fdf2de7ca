"""SAM prompted by a regular point grid (the paper's "Grid Sampling + SAM" ablation, Table 3).

SAM's automatic mask generation, single crop: the image is encoded once; a ``points_per_side²``
grid of foreground points is decoded ``points_per_batch`` at a time, three candidate masks per
point; candidates below the predicted-IoU or the stability-score threshold are dropped, then tiny
masks, then duplicates by mask NMS. Class-agnostic: no class hints, no pruning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from retclip.errors import InputError
from retclip.proposers.base import MaskProposer, Proposals, TextEmbeddings
from retclip.proposers.mask_ops import mask_nms, stability_score
from retclip.proposers.sam import DEFAULT_SAM, SamSegmenter

if TYPE_CHECKING:
    from retclip.images import SourceImage
    from retclip.vocabulary import Vocabulary


def point_grid(points_per_side: int, height: int, width: int) -> torch.Tensor:
    """``[n², 2]`` xy pixel coordinates of cell centres of an ``n×n`` grid over an image."""
    offsets = (torch.arange(points_per_side, dtype=torch.float32) + 0.5) / points_per_side
    ys, xs = torch.meshgrid(offsets * height, offsets * width, indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten()], dim=1)


class SamGridProposer(MaskProposer):
    """``sam-grid``: SAM masks from a point grid, filtered as in SAM's automatic generator.

    Args:
        sam: short name, hub id or directory of the SAM model (``sam-vit-base``).
        points_per_side: grid size ``n`` (``n²`` point prompts; 32 as in SAM).
        points_per_batch: point prompts decoded per mask-decoder call.
        pred_iou_threshold: minimum predicted IoU of a mask (0.88).
        stability_threshold: minimum stability score (0.95): IoU of the mask binarised at logit
            ``+offset`` and ``-offset``.
        stability_offset: that offset (1.0).
        mask_nms_iou: masks overlapping a higher-scored one above this IoU are dropped (0.7).
        min_area: smallest mask kept, in pixels.
        device, dtype: see :class:`~retclip.proposers.sam.SamSegmenter`.
    """

    name = "sam-grid"

    def __init__(
        self,
        sam: str = DEFAULT_SAM,
        *,
        points_per_side: int = 32,
        points_per_batch: int = 64,
        pred_iou_threshold: float = 0.88,
        stability_threshold: float = 0.95,
        stability_offset: float = 1.0,
        mask_nms_iou: float = 0.7,
        min_area: int = 100,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> None:
        if points_per_side < 1:
            raise InputError(f"points per side must be >= 1, got {points_per_side}")
        self.sam = SamSegmenter(sam, device=device, dtype=dtype, prompt_batch=points_per_batch)
        self.points_per_side = points_per_side
        self.pred_iou_threshold = pred_iou_threshold
        self.stability_threshold = stability_threshold
        self.stability_offset = stability_offset
        self.mask_nms_iou = mask_nms_iou
        self.min_area = min_area

    def propose(
        self, image: SourceImage, vocabulary: Vocabulary, text_embeddings: TextEmbeddings = None
    ) -> Proposals:
        height, width = image.size
        sam_image = self.sam.embed(image.pixels)
        points = point_grid(self.points_per_side, height, width)
        masks: list[torch.Tensor] = []
        scores: list[torch.Tensor] = []
        for start in range(0, len(points), self.sam.prompt_batch):
            logits, iou = self.sam.segment_points(
                sam_image, points[start : start + self.sam.prompt_batch]
            )
            logits, iou = logits.flatten(0, 1), iou.flatten()  # [3P, H, W], [3P]
            stable = stability_score(logits, 0.0, self.stability_offset)
            keep = (iou > self.pred_iou_threshold) & (stable >= self.stability_threshold)
            masks.append(logits[keep] > 0)
            scores.append(iou[keep])
        all_masks, all_scores = torch.cat(masks), torch.cat(scores)
        large = all_masks.sum(dim=(1, 2)) >= self.min_area
        all_masks, all_scores = all_masks[large], all_scores[large]
        keep = mask_nms(all_masks, all_scores, self.mask_nms_iou)
        return Proposals(all_masks[keep].cpu().numpy(), all_scores[keep].clamp(0, 1).cpu().numpy())
