"""Vectorised operations on batches of binary masks: pairwise IoU, mask NMS, stability score."""

from __future__ import annotations

import torch


def mask_iou(masks: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU ``[N, N]`` float of ``[N, H, W]`` bool masks (one matmul; empty pairs → 0)."""
    flat = masks.reshape(masks.shape[0], -1).float()
    inter = flat @ flat.T
    area = flat.sum(dim=1)
    union = area[:, None] + area[None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(1.0), torch.zeros_like(inter))


def mask_nms(masks: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS by mask IoU: indices ``[K]`` of the kept masks, by decreasing score.

    Args:
        masks: ``[N, H, W]`` bool.
        scores: ``[N]`` float.
        iou_threshold: a mask is dropped when its IoU with a kept, higher-scored mask exceeds it.

    The IoU matrix is one matmul; the greedy pass walks its rows (what torchvision's box NMS does
    in C++) and is exact, unlike the "fast NMS" shortcut that lets suppressed masks suppress.
    """
    if masks.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=masks.device)
    order = torch.argsort(scores, descending=True)
    overlap = (mask_iou(masks[order]) > iou_threshold).cpu()
    suppressed = torch.zeros(len(order), dtype=torch.bool)
    keep: list[int] = []
    for i in range(len(order)):
        if not suppressed[i]:
            keep.append(i)
            suppressed |= overlap[i]
    return order[torch.tensor(keep, dtype=torch.long, device=order.device)]


def stability_score(logits: torch.Tensor, threshold: float, offset: float) -> torch.Tensor:
    """SAM's stability score ``[...]`` of mask logits ``[..., H, W]``: the IoU of the masks
    binarised at ``threshold + offset`` and at ``threshold - offset``."""
    inter = (logits > threshold + offset).sum(dim=(-1, -2), dtype=torch.int32)
    union = (logits > threshold - offset).sum(dim=(-1, -2), dtype=torch.int32)
    return inter.float() / union.float().clamp_min(1.0)
