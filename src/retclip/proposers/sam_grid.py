"""SAM prompted by a regular point grid (the paper's "Grid Sampling + SAM" ablation, Table 3).

SAM's automatic mask generation, single crop: the image is encoded once; a ``points_per_side²``
grid of foreground points is decoded ``points_per_batch`` at a time, three candidate masks per
point. As in SAM's automatic mask generator, candidates are filtered on the mask decoder's
**low-resolution** logits (``[4h, 4w]``, 256² for SAM ViT-B, cropped to the image): predicted IoU,
then stability score; duplicates are removed by box NMS (``torchvision.ops.batched_nms`` on each
mask's bounding box); only the survivors are upscaled to image size, and masks under
``min_area`` pixels are dropped last. Upscaling all ``3·n²`` candidates, scoring stability and a
dense mask-IoU matrix at full resolution took ~45 s per 512×683 image at 32² points.
Class-agnostic: no class hints, no pruning.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torchvision.ops import batched_nms

from retclip.errors import InputError
from retclip.proposers.base import MaskProposer, Proposals, TextEmbeddings
from retclip.proposers.mask_ops import stability_score
from retclip.proposers.sam import DEFAULT_SAM, SamImage, SamSegmenter

if TYPE_CHECKING:
    from retclip.images import SourceImage
    from retclip.vocabulary import Vocabulary


def point_grid(points_per_side: int, height: int, width: int) -> torch.Tensor:
    """``[n², 2]`` xy pixel coordinates of cell centres of an ``n×n`` grid over an image."""
    offsets = (torch.arange(points_per_side, dtype=torch.float32) + 0.5) / points_per_side
    ys, xs = torch.meshgrid(offsets * height, offsets * width, indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten()], dim=1)


def low_res_boxes(masks: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """XYXY pixel boxes ``[K, 4]`` of low-resolution masks ``[K, h, w]`` bool covering an
    ``H×W`` image (each cell spans ``H/h × W/w`` pixels); all zeros for an empty mask."""
    k, h, w = masks.shape
    rows, cols = masks.any(dim=2), masks.any(dim=1)  # [K, h], [K, w]
    empty = ~rows.any(dim=1)

    def extent(hits: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.arange(size, device=hits.device)
        first = torch.where(hits, index, size).amin(dim=1)
        last = torch.where(hits, index, -1).amax(dim=1) + 1
        return first, last

    y0, y1 = extent(rows, h)
    x0, x1 = extent(cols, w)
    boxes = torch.stack([x0 * (width / w), y0 * (height / h), x1 * (width / w), y1 * (height / h)])
    return torch.where(empty, 0.0, boxes).T.float().reshape(k, 4)


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
        mask_nms_iou: masks whose bounding box overlaps a higher-scored one's above this IoU are
            dropped (0.7; SAM's ``box_nms_thresh``).
        min_area: smallest mask kept, in pixels (after NMS, at image size).
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
        return self._propose(image, self.sam.embed(image.pixels))

    def propose_batch(
        self,
        images: Sequence[SourceImage],
        vocabularies: Sequence[Vocabulary],
        text_embeddings: Sequence[TextEmbeddings] | None = None,
    ) -> list[Proposals]:
        """SAM's image encoder over all images in one pass; each image's grid decoded alone."""
        if len(images) <= 1:
            return super().propose_batch(images, vocabularies, text_embeddings)
        embedded = self.sam.embed_batch([image.pixels for image in images])
        return [self._propose(image, e) for image, e in zip(images, embedded, strict=True)]

    def _propose(self, image: SourceImage, sam_image: SamImage) -> Proposals:
        height, width = image.size
        points = point_grid(self.points_per_side, height, width)
        logits: list[torch.Tensor] = []
        scores: list[torch.Tensor] = []
        boxes: list[torch.Tensor] = []
        for start in range(0, len(points), self.sam.prompt_batch):
            low, iou = self.sam.point_logits(
                sam_image, points[start : start + self.sam.prompt_batch]
            )
            low, iou = low.flatten(0, 1), iou.flatten()  # [3P, 4h, 4w], [3P]
            confident = iou > self.pred_iou_threshold
            low, iou = low[confident], iou[confident]
            valid = self.sam.valid_low_res(low, sam_image)  # the image's part of the grid
            stable = stability_score(valid, 0.0, self.stability_offset) >= self.stability_threshold
            logits.append(low[stable])
            scores.append(iou[stable])
            boxes.append(low_res_boxes(valid[stable] > 0, height, width))
        all_logits, all_scores, all_boxes = torch.cat(logits), torch.cat(scores), torch.cat(boxes)
        classes = torch.zeros(len(all_scores), dtype=torch.long, device=all_scores.device)
        keep = batched_nms(all_boxes, all_scores, classes, self.mask_nms_iou)  # by score
        masks = [
            self.sam.upscale(all_logits[keep[i : i + self.sam.prompt_batch], None], sam_image)[:, 0]
            > 0
            for i in range(0, len(keep), self.sam.prompt_batch)
        ]
        if not masks:
            return Proposals(np.zeros((0, height, width), bool), np.zeros(0, np.float32))
        kept_masks, kept_scores = torch.cat(masks), all_scores[keep]
        large = kept_masks.sum(dim=(1, 2)) >= self.min_area
        return Proposals(
            kept_masks[large].cpu().numpy(), kept_scores[large].clamp(0, 1).cpu().numpy()
        )
