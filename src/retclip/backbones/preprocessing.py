"""Input recipes of the backbones: retclip's grid resize and FC-CLIP's resize-and-pad.

:func:`resize_for_grid` (retclip's default) resizes the whole image so both sides are multiples
of the stride. FC-CLIP's test-time recipe for convolutional CLIPs (detectron2's, reproduced):

FC-CLIP (and so RetCLIP's cross-dataset path, paper §2.2 "Shared Backbone") feeds its frozen CLIP
an image resized by detectron2's ``ResizeShortestEdge`` (PIL bilinear on the uint8 image),
normalised with CLIP's mean/std on 0–255 pixels, and zero-padded at the bottom and right to a
multiple of 32. The stride-32 map then covers the *padded* frame, in which the image occupies the
top-left ``resized`` rectangle; :func:`retclip.pooling.masks_to_grid` with a ``frame`` maps
image-size masks onto that grid.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

#: FC-CLIP's input normalisation (CLIP's mean/std on 0–255 pixels).
PIXEL_MEAN = (122.7709383, 116.7460125, 104.09373615)
PIXEL_STD = (68.5005327, 66.6321579, 70.32316305)
SIZE_DIVISIBILITY = 32
#: FC-CLIP's ADE20k / COCO test resize (shortest edge, longest edge at most).
SHORT_SIDE, MAX_SIZE = 800, 1333


def resize_size(
    height: int, width: int, short: int = SHORT_SIDE, max_size: int = MAX_SIZE
) -> tuple[int, int]:
    """detectron2's ``ResizeShortestEdge.get_output_shape``: ``(h, w)`` with the short side
    ``short`` and the long side at most ``max_size``, rounded half up (same float steps)."""
    size = short * 1.0
    scale = size / min(height, width)
    if height < width:
        new_h, new_w = size, scale * width
    else:
        new_h, new_w = scale * height, size
    if max(new_h, new_w) > max_size:
        scale = max_size * 1.0 / max(new_h, new_w)
        new_h, new_w = new_h * scale, new_w * scale
    return int(new_h + 0.5), int(new_w + 0.5)


def padded_size(height: int, width: int) -> tuple[int, int]:
    """``(h, w)`` rounded up to multiples of :data:`SIZE_DIVISIBILITY`."""
    return height + (-height % SIZE_DIVISIBILITY), width + (-width % SIZE_DIVISIBILITY)


def fcclip_preprocess(
    image: np.ndarray, size: tuple[int, int] | None, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, tuple[int, int]]:
    """``[H, W, 3]`` uint8 RGB → normalised pixels ``[1, 3, H', W']`` zero-padded to multiples
    of 32, and the resized ``(h, w)`` before padding.

    ``size`` is the resized ``(h, w)`` (PIL bilinear on the uint8 image, as detectron2's
    ``ResizeTransform``), or ``None`` to keep the image's size.
    """
    if size is not None and size != image.shape[:2]:
        image = np.asarray(
            Image.fromarray(image).resize((size[1], size[0]), Image.Resampling.BILINEAR)
        )
    h, w = image.shape[:2]
    x = torch.from_numpy(np.array(image)).to(device).permute(2, 0, 1).float()
    mean = torch.tensor(PIXEL_MEAN, device=x.device)[:, None, None]
    std = torch.tensor(PIXEL_STD, device=x.device)[:, None, None]
    x = (x - mean) / std
    pad_h, pad_w = padded_size(h, w)
    return F.pad(x, (0, pad_w - w, 0, pad_h - h))[None], (h, w)


#: Longest side / shortest side after resizing (FC-CLIP's 1333 / 800).
MAX_ASPECT = 1333 / 800


def resize_for_grid(
    images: torch.Tensor, short_side: int, multiple: int, max_aspect: float = MAX_ASPECT
) -> torch.Tensor:
    """Resize ``[B, 3, H, W]`` so the short side is ``short_side`` (aspect kept), both sides
    multiples of ``multiple`` (the backbone's stride), the long side at most ``max_aspect`` times
    the short one.

    The whole image is resized (never cropped or padded), so the ``[h, w]`` feature grid of the
    result covers the input image uniformly, as mask pooling assumes (:func:`retclip.pooling.
    masks_to_grid`). Bicubic with antialiasing, clamped to [0, 255].
    """
    h, w = images.shape[-2:]
    scale = short_side / min(h, w)
    long_cap = max_aspect * short_side

    def side(n: int) -> int:
        return max(multiple, round(min(n * scale, long_cap) / multiple) * multiple)

    size = (side(h), side(w))
    if size == (h, w):
        return images
    out = F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True)
    return out.clamp(0.0, 255.0)
