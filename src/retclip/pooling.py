"""Mask pooling: one feature vector per mask from an image's dense features (paper §2.1).

Pooling the dense map of one backbone pass is what makes RetCLIP cheap: every mask of an image,
for database rows and queries alike, costs one matrix product instead of one CLIP forward pass
per masked crop. Masks are brought to the feature grid by area weighting (each cell gets the
fraction of its area the mask covers), then pooled as a weighted mean and L2-normalised.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

PoolingMode = Literal["soft", "binary"]
#: Masks resized to the feature grid per step (bounds the float copy of bool masks).
MASK_CHUNK = 32


def area_weights(size_in: int, size_out: int, device: torch.device | None = None) -> torch.Tensor:
    """``[size_out, size_in]``: the fraction of each output cell covered by each input pixel.

    The output cells split ``[0, size_in)`` into ``size_out`` equal spans (as a backbone's grid
    covers its resized input); row ``i`` holds the overlap of pixel ``p`` (span ``[p, p + 1)``)
    with cell ``i``, divided by the cell's length, so each row sums to 1.
    """
    edges = torch.linspace(0.0, float(size_in), size_out + 1, device=device, dtype=torch.float64)
    pixels = torch.arange(size_in + 1, device=device, dtype=torch.float64)
    start = torch.maximum(edges[:-1, None], pixels[None, :-1])
    end = torch.minimum(edges[1:, None], pixels[None, 1:])
    overlap = (end - start).clamp_min(0)  # [size_out, size_in]
    return (overlap / (edges[1:] - edges[:-1])[:, None]).float()


#: Where an image lies in a padded input: ``(resized_h, resized_w, padded_h, padded_w)``; the
#: image, resized to ``resized``, fills the top-left of the ``padded`` frame the grid covers.
Frame = tuple[int, int, int, int]


def frame_weights(
    size_in: int, resized: int, padded: int, cells: int, device: torch.device | None = None
) -> torch.Tensor:
    """``[cells, size_in]``: area weights from image pixels to the cells of a grid covering a
    padded frame (``padded`` pixels, of which the image, resized, fills the first ``resized``).

    The product of two area resizes, image → resized frame and padded frame → grid (padding
    pixels are 0), so a mask's cell value is the fraction of the cell it covers.
    """
    to_frame = area_weights(size_in, resized, device)  # [resized, size_in]
    to_grid = area_weights(padded, cells, device)[:, :resized]  # [cells, resized]
    return to_grid @ to_frame


def area_resize(
    values: torch.Tensor, size: tuple[int, int], frame: Frame | None = None
) -> torch.Tensor:
    """Area-weighted resize of the last two dims ``[..., H, W] → [..., h, w]``.

    Each output cell is the exact area-weighted mean of the pixels it covers (fractional pixels
    included), computed as two small matrix products: ``R_y · X · R_xᵀ``. With a ``frame`` the
    output grid covers the padded frame instead of the image (:func:`frame_weights`).
    """
    if frame is None:
        r_y = area_weights(values.shape[-2], size[0], values.device)  # [h, H]
        r_x = area_weights(values.shape[-1], size[1], values.device)  # [w, W]
    else:
        r_y = frame_weights(values.shape[-2], frame[0], frame[2], size[0], values.device)
        r_x = frame_weights(values.shape[-1], frame[1], frame[3], size[1], values.device)
    x = values.float()
    return torch.matmul(torch.matmul(r_y, x), r_x.T)


def masks_to_grid(
    masks: torch.Tensor, grid_size: tuple[int, int], frame: Frame | None = None
) -> torch.Tensor:
    """Area-weighted resize of masks to the feature grid.

    Args:
        masks: ``[B, N, H, W]`` bool or float in ``[0, 1]``.
        grid_size: ``(h, w)`` of the dense features, which cover the image uniformly, or with
            ``frame`` the padded frame the image was placed in.
        frame: where the image lies in a padded input (FC-CLIP's recipe), or ``None``.

    Returns:
        ``[B, N, h, w]`` float: the covered fraction of each cell's area.

    Masks are converted to float a chunk at a time, so memory stays near ``chunk × H × W``
    floats rather than ``B × N × H × W`` (hundreds of full-size masks would need gigabytes).
    """
    flat = masks.flatten(0, 1)  # [B·N, H, W]
    chunk = MASK_CHUNK
    parts = [
        area_resize(flat[i : i + chunk], grid_size, frame) for i in range(0, flat.shape[0], chunk)
    ]
    grid = torch.cat(parts) if parts else flat.new_zeros((0, *grid_size), dtype=torch.float32)
    return grid.reshape(*masks.shape[:2], *grid_size)


def mask_pool(
    features: torch.Tensor,
    masks: torch.Tensor,
    *,
    mode: PoolingMode = "soft",
    eps: float = 1e-8,
    normalize: bool = True,
    frame: Frame | None = None,
) -> torch.Tensor:
    """Mean-pool dense features under each mask, then L2-normalise.

    Args:
        features: ``[B, D, h, w]`` dense features of ``B`` images.
        masks: ``[B, N, H, W]`` masks at image (or grid) resolution, bool or soft in ``[0, 1]``;
            pad images with fewer masks with all-zero masks.
        mode: ``"soft"`` weights each cell by the covered fraction of its area; ``"binary"``
            keeps cells covered by at least half (as FC-CLIP binarises masks on its grid), falling
            back to the soft weights for a mask too small to cover half of any cell.
        eps: added to the weight sum (FC-CLIP's ``sum(x·m) / (sum(m) + eps)``).
        normalize: L2-normalise the pooled features (off when a head follows pooling).
        frame: the features cover a padded frame holding the resized image (see
            :func:`masks_to_grid`), or ``None`` when they cover the image.

    Returns:
        ``[B, N, D]`` features (unit-norm if ``normalize``); all-zero rows for empty masks.
    """
    if features.ndim != 4 or masks.ndim != 4 or features.shape[0] != masks.shape[0]:
        raise ValueError(
            f"expected features [B, D, h, w] and masks [B, N, H, W] with the same B, "
            f"got {tuple(features.shape)} and {tuple(masks.shape)}"
        )
    h, w = features.shape[-2:]
    weights = masks_to_grid(masks, (h, w), frame).to(features.dtype)  # [B, N, h, w]
    if mode == "binary":
        binary = (weights >= 0.5).to(features.dtype)
        too_small = binary.flatten(2).sum(-1, keepdim=True) == 0  # [B, N, 1]
        weights = torch.where(too_small.unsqueeze(-1), weights, binary)
    elif mode != "soft":
        raise ValueError(f"pooling mode must be 'soft' or 'binary', got {mode!r}")
    weights = weights.flatten(2)  # [B, N, h*w]
    summed = torch.bmm(weights, features.flatten(2).transpose(1, 2))  # [B, N, D]
    pooled = summed / (weights.sum(-1, keepdim=True) + eps)
    return F.normalize(pooled, dim=-1) if normalize else pooled
