"""Image loading: every PIL mode to upright 8-bit RGB, and one-line errors naming the file."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from retclip.errors import InputError
from retclip.images import image_to_tensor, load_image


def raw_png(array: np.ndarray, color_type: int, bit_depth: int) -> bytes:
    """A minimal PNG written by hand (PIL cannot save 16-bit RGB or empty images)."""
    h, w = array.shape[:2]

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    dtype = ">u2" if bit_depth == 16 else "u1"
    rows = b"".join(b"\x00" + array[y].astype(dtype).tobytes() for y in range(h))
    header = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def save(tmp_path: Path, image: Image.Image, name: str, **kwargs) -> Path:
    path = tmp_path / name
    image.save(path, **kwargs)
    return path


def check_rgb(array: np.ndarray, shape: tuple[int, int]) -> None:
    assert array.dtype == np.uint8 and array.shape == (*shape, 3) and array.flags.c_contiguous


def test_rgb_jpeg(tmp_path):
    path = save(tmp_path, Image.new("RGB", (16, 8), (200, 30, 60)), "a.jpg", quality=95)
    image = load_image(path)
    check_rgb(image, (8, 16))
    assert np.abs(image.astype(int) - [200, 30, 60]).max() <= 4


def test_grayscale_and_bilevel(tmp_path):
    gray = Image.fromarray(np.array([[0, 77, 255]], dtype=np.uint8))
    image = load_image(save(tmp_path, gray, "l.png"))
    check_rgb(image, (1, 3))
    assert image[0].tolist() == [[0, 0, 0], [77, 77, 77], [255, 255, 255]]
    bilevel = Image.fromarray(np.array([[0, 255, 255]], dtype=np.uint8)).convert("1")
    image = load_image(save(tmp_path, bilevel, "b.png"))
    assert image[0].tolist() == [[0, 0, 0], [255, 255, 255], [255, 255, 255]]


def test_alpha_is_composited_on_white(tmp_path):
    rgba = np.array([[[10, 20, 30, 255], [10, 20, 30, 0], [0, 0, 0, 128]]], dtype=np.uint8)
    image = load_image(save(tmp_path, Image.fromarray(rgba, "RGBA"), "rgba.png"))
    assert image[0, :2].tolist() == [[10, 20, 30], [255, 255, 255]]
    assert np.abs(image[0, 2].astype(int) - 127).max() <= 1
    la = Image.fromarray(np.array([[[40, 255], [40, 0]]], dtype=np.uint8), "LA")
    image = load_image(save(tmp_path, la, "la.png"))
    assert image[0].tolist() == [[40, 40, 40], [255, 255, 255]]


def test_palette_with_transparency(tmp_path):
    indexed = Image.fromarray(np.array([[0, 1, 2]], dtype=np.uint8), "P")
    indexed.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (253 * 3))
    image = load_image(save(tmp_path, indexed, "p.png", transparency=1))
    assert image[0].tolist() == [[255, 0, 0], [255, 255, 255], [0, 0, 255]]
    image = load_image(save(tmp_path, indexed, "p.gif"))
    assert image[0].tolist() == [[255, 0, 0], [0, 255, 0], [0, 0, 255]]


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 100, 32896, 65535]], dtype=np.uint16)
    path = save(tmp_path, Image.fromarray(values), "g16.png")
    assert Image.open(path).mode.startswith("I")
    assert load_image(path)[0, :, 0].tolist() == [0, 100, 128, 255]
    big_endian = save(tmp_path, Image.fromarray(values.astype(">u2")), "g16b.tiff")
    assert Image.open(big_endian).mode == "I;16B"
    assert load_image(big_endian)[0, :, 1].tolist() == [0, 100, 128, 255]


def test_sixteen_bit_rgb_png(tmp_path):
    values = np.zeros((2, 3, 3), dtype=np.uint16)
    values[..., 0], values[..., 1] = 65535, 32896
    path = tmp_path / "rgb16.png"
    path.write_bytes(raw_png(values, color_type=2, bit_depth=16))
    image = load_image(path)
    check_rgb(image, (2, 3))
    assert image[1, 2].tolist() == [255, 128, 0]


def test_thirty_two_bit_and_float(tmp_path):
    sixteen = np.array([[0, 1000, 65535]], dtype=np.int32)
    path = save(tmp_path, Image.fromarray(sixteen), "i.tiff")
    assert Image.open(path).mode == "I"
    assert load_image(path)[0, :, 0].tolist() == [0, 4, 255]
    eight = np.array([[0, 100, 255]], dtype=np.int32)
    assert load_image(save(tmp_path, Image.fromarray(eight), "i8.tiff"))[0, :, 0].tolist() == [
        0,
        100,
        255,
    ]
    signed = np.array([[-1000, 0, 1000]], dtype=np.int32)
    image = load_image(save(tmp_path, Image.fromarray(signed), "is.tiff"))
    assert image[0, :, 0].tolist() == [0, 128, 255]
    unit = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    image = load_image(save(tmp_path, Image.fromarray(unit), "f.tiff"))
    assert image[0, :, 0].tolist() == [0, 128, 255]
    wide = np.array([[-2.0, 0.0, 2.0]], dtype=np.float32)
    image = load_image(save(tmp_path, Image.fromarray(wide), "fw.tiff"))
    assert image[0, :, 0].tolist() == [0, 128, 255]


def test_cmyk_and_ycbcr_jpeg(tmp_path):
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # red
    image = load_image(save(tmp_path, cmyk, "cmyk.jpg", quality=95))
    check_rgb(image, (16, 16))
    assert np.abs(image.astype(int) - [255, 0, 0]).max() <= 6
    ycbcr = Image.new("RGB", (16, 16), (0, 0, 255)).convert("YCbCr")
    image = load_image(save(tmp_path, ycbcr, "ycc.jpg", quality=95))
    assert np.abs(image.astype(int) - [0, 0, 255]).max() <= 8


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((16, 32, 3), dtype=np.uint8)
    pixels[:, :16] = (255, 0, 0)  # stored: red left, blue right
    pixels[:, 16:] = (0, 0, 255)
    stored = Image.fromarray(pixels)
    exif = stored.getexif()
    exif[0x0112] = 6  # display rotated 90° clockwise
    image = load_image(save(tmp_path, stored, "rot.jpg", exif=exif, quality=95))
    check_rgb(image, (32, 16))
    assert image[4, 8, 0] > 200 and image[4, 8, 2] < 50  # red on top
    assert image[28, 8, 2] > 200 and image[28, 8, 0] < 50  # blue below


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file(tmp_path, fmt):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    path = tmp_path / f"cut.{fmt.lower()}"
    Image.fromarray(noise).save(path, format=fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="corrupt or truncated image") as info:
        load_image(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_corrupt_and_empty_files(tmp_path):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(InputError, match="not a recognised image file") as info:
        load_image(garbage)
    assert str(garbage) in str(info.value)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match=str(empty)):
        load_image(empty)
    zero = tmp_path / "zero.png"
    zero.write_bytes(raw_png(np.zeros((0, 0, 3), dtype=np.uint8), color_type=2, bit_depth=8))
    with pytest.raises(InputError, match=str(zero)):
        load_image(zero)


def test_missing_path_and_directory(tmp_path):
    missing = tmp_path / "nope.jpg"
    with pytest.raises(InputError, match=f"image not found: {missing}"):
        load_image(missing)
    with pytest.raises(InputError, match="is a directory") as info:
        load_image(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_image_to_tensor():
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    tensor = image_to_tensor(image)
    assert tensor.shape == (3, 2, 3) and tensor.dtype == torch.float32
    assert torch.equal(tensor[:, 1, 2], torch.tensor([15.0, 16.0, 17.0]))
    with pytest.raises(ValueError, match="RGB"):
        image_to_tensor(image[..., 0])


def test_loaded_images_are_writable(tmp_path):
    path = tmp_path / "rgb.png"
    Image.new("RGB", (4, 3), (1, 2, 3)).save(path)
    assert load_image(path).flags.writeable
