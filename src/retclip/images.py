"""Image loading: any file PIL reads, as an upright 8-bit RGB array.

Conversions (after applying the EXIF orientation; multi-frame files give their first frame):

* transparency (RGBA, LA, PA, P with a transparent colour, premultiplied modes) is composited
  onto **white**, as a viewer shows it; CLIP saw few black-filled cut-outs;
* 16-bit grayscale (``I;16``, ``I;16B``, ...) is scaled by ``1/257`` and rounded, so 65535 maps
  to 255 (no clipping of the upper range);
* 32-bit integer ``I``: kept when within ``[0, 255]``, divided by 257 when within ``[0, 65535]``
  (how PIL used to open 16-bit PNGs), otherwise stretched linearly from its min–max range;
* float ``F``: multiplied by 255 when within ``[0, 1]``, kept when within ``[0, 255]``, otherwise
  stretched from its min–max range (a constant image becomes black); NaNs become 0;
* every other mode (L, 1, CMYK, YCbCr, HSV, ...) through PIL's own ``convert("RGB")``. PIL
  opens 16-bit-per-channel RGB PNGs as 8-bit RGB itself.
"""

from __future__ import annotations

import dataclasses
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from retclip.errors import InputError
from retclip.files import atomic_write

__all__ = ["decode_image", "image_to_tensor", "load_image"]

# What PIL raises for damaged files besides OSError (SyntaxError for bad PNG chunks, ...).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, IndexError)


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def _on_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)


def _stretch(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (values.astype(np.float64) - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _high_depth_gray(image: Image.Image) -> np.ndarray:
    """``[H, W]`` uint8 from an ``I;16*``, ``I`` or ``F`` image (rules in the module docs)."""
    values = np.asarray(image)
    if image.mode.startswith("I;16"):
        return np.rint(values.astype(np.float64) / 257.0).astype(np.uint8)
    if image.mode == "F":
        values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        low, high = float(values.min()), float(values.max())
        if low >= 0.0 and high <= 1.0:
            return np.rint(values * 255.0).astype(np.uint8)
        if low >= 0.0 and high <= 255.0:
            return np.rint(values).astype(np.uint8)
        return _stretch(values)
    values = values.astype(np.int64)
    low_i, high_i = int(values.min()), int(values.max())
    if low_i >= 0 and high_i <= 255:
        return values.astype(np.uint8)
    if low_i >= 0 and high_i <= 65535:
        return np.rint(values / 257.0).astype(np.uint8)
    return _stretch(values)


def _to_rgb(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _gray_to_rgb(_high_depth_gray(image))
    alpha_palette = mode == "P" and image.palette is not None and image.palette.mode == "RGBA"
    if mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info or alpha_palette:
        return np.asarray(_on_white(image))
    if mode == "RGB":
        return np.asarray(image)
    return np.asarray(image.convert("RGB"))


@dataclasses.dataclass(frozen=True)
class SourceImage:
    """An image to segment: its pixels and, when it came from a file, where from.

    Attributes:
        pixels: ``[H, W, 3]`` uint8 RGB.
        source: the file it was read from (ground-truth look-ups, outputs' names), or ``None``.
    """

    pixels: np.ndarray
    source: str | None = None

    def __post_init__(self) -> None:
        if self.pixels.ndim != 3 or self.pixels.shape[2] != 3 or self.pixels.dtype != np.uint8:
            raise InputError(
                f"image must be [H, W, 3] uint8 RGB, got shape {self.pixels.shape} "
                f"{self.pixels.dtype}"
            )

    @classmethod
    def read(cls, path: str | Path) -> SourceImage:
        """The image file at ``path`` (:func:`load_image`)."""
        return cls(load_image(path), str(path))

    @property
    def size(self) -> tuple[int, int]:
        """``(H, W)``."""
        return int(self.pixels.shape[0]), int(self.pixels.shape[1])


def load_image(path: str | Path) -> np.ndarray:
    """Read an image file as an upright RGB array.

    Args:
        path: image file in any format PIL reads.

    Returns:
        ``[H, W, 3]`` uint8 RGB.

    Raises:
        InputError: the file is missing, a directory, unreadable, not an image, corrupt,
            truncated, empty, or of a mode that cannot be converted to RGB.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"image not found: {path}")
    if path.is_dir():
        raise InputError(f"image path is a directory, expected an image file: {path}")
    return _decode(path, str(path))


def decode_image(data: bytes, name: str) -> np.ndarray:
    """:func:`load_image` of an encoded image held in memory (e.g. a member of a tar shard);
    ``name`` stands for it in error messages."""
    if not data:
        raise InputError(f"image {name} is empty (0 bytes)")
    return _decode(io.BytesIO(data), name)


def _decode(file: Path | io.BytesIO, name: str) -> np.ndarray:
    try:
        with Image.open(file) as opened:
            opened.load()  # force a full decode: truncated or corrupt data fails here
            image = ImageOps.exif_transpose(opened)
            if image.width == 0 or image.height == 0:
                raise InputError(f"image {name} is empty ({image.width}x{image.height} pixels)")
            try:
                array = _to_rgb(image)
            except ValueError as error:
                raise InputError(
                    f"cannot convert image {name} (mode {image.mode}) to RGB: {_short(error)}"
                ) from error
    except InputError:
        raise
    except PermissionError as error:
        raise InputError(f"cannot read image {name}: permission denied") from error
    except UnidentifiedImageError as error:
        raise InputError(f"not a recognised image file: {name}") from error
    except Image.DecompressionBombError as error:
        raise InputError(f"image {name} is too large to decode safely: {_short(error)}") from error
    except _DECODE_ERRORS as error:
        raise InputError(f"corrupt or truncated image {name}: {_short(error)}") from error
    # a writable copy: PIL-backed arrays are read-only, which torch.from_numpy warns about
    return np.array(array, dtype=np.uint8, order="C", copy=True)


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """``[H, W, 3]`` uint8 RGB array to a ``[3, H, W]`` float32 tensor with values in 0–255."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an [H, W, 3] RGB image, got shape {tuple(image.shape)}")
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).to(torch.float32)


def png_bytes(array: np.ndarray) -> bytes:
    """``array`` (``[H, W]`` or ``[H, W, 3]``, uint8/uint16) encoded as PNG."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def save_png(path: str | Path, array: np.ndarray) -> None:
    """Write ``array`` as a PNG at ``path`` atomically (never a half-written image)."""
    atomic_write(path, png_bytes(array))


def id2rgb(ids: np.ndarray) -> np.ndarray:
    """``[H, W]`` non-negative segment ids to ``[H, W, 3]`` uint8 (``id = R + 256 G + 256² B``)."""
    ids = np.asarray(ids).astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= 256**3):
        raise ValueError(f"segment ids must lie in [0, 256**3), got {ids.min()}..{ids.max()}")
    rgb = np.empty((*ids.shape, 3), dtype=np.uint8)
    for channel in range(3):
        rgb[..., channel] = (ids >> (8 * channel)) & 255
    return rgb


def rgb2id(rgb: np.ndarray) -> np.ndarray:
    """``[H, W, 3]`` colours to ``[H, W]`` int64 segment ids (inverse of :func:`id2rgb`)."""
    rgb = np.asarray(rgb).astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def read_panoptic_png(path: str | Path) -> np.ndarray:
    """``[H, W]`` int64 segment ids of a COCO-panoptic PNG (:func:`rgb2id`)."""
    try:
        with Image.open(path) as im:
            return rgb2id(np.asarray(im.convert("RGB")))
    except FileNotFoundError:
        raise InputError(f"panoptic PNG not found: {path}") from None
    except OSError as exc:
        raise InputError(f"cannot read panoptic PNG {path}: {exc}") from None


def read_label_png(path: str | Path) -> np.ndarray:
    """``[H, W]`` int64 class labels of a one-channel PNG (8- or 16-bit; semantic maps)."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16"):
                raise InputError(f"semantic PNG {path} has mode {im.mode}; expected one channel")
            return np.asarray(im).astype(np.int64)
    except FileNotFoundError:
        raise InputError(f"semantic PNG not found: {path}") from None
    except InputError:
        raise
    except OSError as exc:
        raise InputError(f"cannot read semantic PNG {path}: {exc}") from None
