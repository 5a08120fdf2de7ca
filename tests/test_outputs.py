"""Result files: id colours, RLE, overlay and the all-or-nothing writer."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_util

import retclip.outputs.drawing as drawing
import retclip.outputs.files as outputs
from retclip.errors import InputError
from retclip.images import id2rgb, rgb2id
from retclip.outputs import encode_rle, palette, render_overlay, write_outputs
from retclip.panoptic import PanopticPrediction, postprocess

NAMES = ["person", "car, automobile", "sky", "grass"]
CATEGORY_IDS = [1, 3, 119, 125]
ISTHING = [True, True, False, False]
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
SUFFIXES = ["_panoptic.png", "_panoptic.json", "_semantic.png", "_instances.json", "_overlay.png"]


def scene(h: int = 60, w: int = 80) -> tuple[np.ndarray, PanopticPrediction, np.ndarray]:
    """Sky over grass, two people and a car; returns image, prediction and binary masks."""
    masks = torch.zeros(6, h, w)
    masks[0, : h // 2] = 0.9  # sky
    masks[1, h // 2 :] = 0.9  # grass
    masks[2, 10:50, 8:22] = 0.95  # person
    masks[3, 12:52, 30:44] = 0.95  # person
    masks[4, 35:55, 50:76] = 0.95  # car
    masks[5, 0:2, 0:2] = 0.3  # weak proposal: no pixels >= 0.5
    probs = torch.tensor(
        [
            [0.0, 0.0, 0.9, 0.1],
            [0.0, 0.0, 0.2, 0.8],
            [0.95, 0.05, 0.0, 0.0],
            [0.7, 0.3, 0.0, 0.0],
            [0.1, 0.85, 0.05, 0.0],
            [0.25, 0.25, 0.25, 0.25],
        ]
    )
    prediction = postprocess(probs, masks, ISTHING, overlap_threshold=0.5)
    yy, xx = np.mgrid[:h, :w]
    image = np.stack([xx * 3, yy * 4, 255 - xx * 3], -1).clip(0, 255).astype(np.uint8)
    return image, prediction, (masks > 0.5).numpy()


def test_id_colour_round_trip():
    ids = np.array([[0, 1, 255], [256, 65536 + 513, 256**3 - 1]])
    rgb = id2rgb(ids)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 3, 3)
    assert rgb[1, 1].tolist() == [1, 2, 1]  # 65536 + 2·256 + 1
    np.testing.assert_array_equal(rgb2id(rgb), ids)
    with pytest.raises(ValueError):
        id2rgb(np.array([[256**3]]))


def test_rle_decodes_to_mask():
    mask = np.random.default_rng(0).random((7, 9)) > 0.6
    rle = encode_rle(mask)
    assert rle["size"] == [7, 9] and isinstance(rle["counts"], str)
    json.dumps(rle)
    decoded = mask_util.decode({"size": rle["size"], "counts": rle["counts"].encode()})
    np.testing.assert_array_equal(decoded.astype(bool), mask)


def test_palette_is_distinct_and_deterministic():
    colours = palette(500)
    assert colours.shape == (500, 3) and colours.dtype == np.uint8
    assert len({tuple(c) for c in colours.tolist()}) == 500
    np.testing.assert_array_equal(colours, palette(500))
    assert not np.array_equal(palette(5, seed=1), palette(5))
    assert palette(0).shape == (0, 3)


def test_overlay_tints_outlines_and_labels():
    image, prediction, _ = scene()
    overlay = render_overlay(image, prediction.panoptic, prediction.segments, NAMES)
    assert overlay.shape == image.shape and overlay.dtype == np.uint8
    segment_pixels = prediction.panoptic > 0
    assert (overlay[segment_pixels] != image[segment_pixels]).any(axis=-1).mean() > 0.9
    # Label boxes are dark and contain white text.
    assert ((overlay == 25).all(-1)).sum() > 50 and ((overlay == 255).all(-1)).sum() > 50
    # A segment whose centroid falls outside it (a ring) still gets its label on its pixels.
    ring = np.zeros((60, 80), dtype=np.int32)
    ring[5:55, 5:75] = 1
    ring[15:45, 15:65] = 0
    segment = next(s for s in prediction.segments if s.id == 1)
    x, y = drawing.label_points(ring, [1])[1]
    assert ring[y, x] == 1
    dark = render_overlay(np.zeros_like(image), ring, [segment], NAMES, alpha=0.0)
    assert (dark[y, x] != 0).all()  # the label box covers that point
    assert (dark == 255).all(-1).sum() > 10
    blank = render_overlay(image, np.zeros((60, 80), np.int32), [], NAMES)
    np.testing.assert_array_equal(blank, image)


def test_write_outputs_files(tmp_path):
    image, prediction, masks = scene()
    assert {s.category for s in prediction.segments} == {0, 1, 2, 3}
    out = tmp_path / "new" / "dir"
    paths = write_outputs(
        out,
        "img1",
        image,
        prediction,
        masks,
        NAMES,
        CATEGORY_IDS,
        image_id=7,
        extra={"settings": {"overlap_threshold": 0.5}},
    )
    assert sorted(p.name for p in out.iterdir()) == sorted(f"img1{s}" for s in SUFFIXES)
    assert set(paths.values()) == set(out.iterdir())
    umask = os.umask(0o022)
    os.umask(umask)
    assert all(p.stat().st_mode & 0o777 == 0o666 & ~umask for p in paths.values())

    pan_json = json.loads(paths["panoptic_json"].read_text())
    assert pan_json["image_id"] == 7 and pan_json["file_name"] == "img1_panoptic.png"
    assert pan_json["settings"] == {"overlap_threshold": 0.5}
    assert pan_json["categories"][1] == {"id": 3, "name": "car, automobile", "isthing": True}
    decoded = rgb2id(np.asarray(Image.open(paths["panoptic_png"]).convert("RGB")))
    np.testing.assert_array_equal(decoded, prediction.panoptic)
    for info, segment in zip(pan_json["segments_info"], prediction.segments, strict=True):
        assert info["id"] == segment.id and info["iscrowd"] == 0
        assert info["category_id"] == CATEGORY_IDS[segment.category]
        assert info["category_name"] == NAMES[segment.category]
        assert info["area"] == int((decoded == segment.id).sum())
        rle = mask_util.encode(np.asfortranarray((decoded == segment.id).astype(np.uint8)))
        assert info["bbox"] == mask_util.toBbox(rle).tolist()

    semantic = np.asarray(Image.open(paths["semantic_png"]))
    assert semantic.dtype == np.uint8
    np.testing.assert_array_equal(semantic, prediction.semantic)

    instances = json.loads(paths["instances_json"].read_text())
    assert len(instances) == len(prediction.instances) > 0
    for result, instance in zip(instances, prediction.instances, strict=True):
        assert result["image_id"] == 7
        assert result["category_id"] == CATEGORY_IDS[instance.category]
        rle = {"size": result["segmentation"]["size"]}
        rle["counts"] = result["segmentation"]["counts"].encode()
        np.testing.assert_array_equal(
            mask_util.decode(rle).astype(bool), masks[instance.mask_index]
        )
        assert result["bbox"] == mask_util.toBbox(rle).tolist()
    assert instances[0]["bbox"] == [8.0, 10.0, 14.0, 40.0]

    overlay = Image.open(paths["overlay_png"])
    assert overlay.mode == "RGB" and overlay.size == (80, 60)
    # Defaults: image_id is the stem; writing again replaces the files.
    paths = write_outputs(out, "img1", image, prediction, masks, NAMES, CATEGORY_IDS)
    assert json.loads(paths["panoptic_json"].read_text())["image_id"] == "img1"
    assert len(list(out.iterdir())) == 5


def test_semantic_png_is_sixteen_bit_for_large_vocabularies(tmp_path):
    image, prediction, masks = scene()
    names = [f"class{i}" for i in range(300)]
    prediction.isthing = None
    prediction.semantic = np.where(prediction.semantic == 255, 65535, prediction.semantic + 260)
    paths = write_outputs(tmp_path, "big", image, prediction, masks, names, list(range(300)))
    semantic = np.asarray(Image.open(paths["semantic_png"]))
    np.testing.assert_array_equal(semantic, prediction.semantic)
    assert semantic.max() > 255


@pytest.mark.parametrize("fail_at", [1, 3, 5])
def test_failed_replace_leaves_no_files(tmp_path, monkeypatch, fail_at):
    image, prediction, masks = scene()
    real_replace = os.replace
    calls = []

    def flaky_replace(src, dst):
        calls.append(dst)
        if len(calls) == fail_at:
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(outputs.os, "replace", flaky_replace)
    with pytest.raises(InputError, match="No space left on device"):
        write_outputs(tmp_path, "x", image, prediction, masks, NAMES, CATEGORY_IDS)
    assert len(calls) == fail_at
    assert list(tmp_path.iterdir()) == []


def test_failed_render_leaves_no_files(tmp_path, monkeypatch):
    image, prediction, masks = scene()

    def broken_overlay(*args, **kwargs):
        raise RuntimeError("render failed")

    monkeypatch.setattr(outputs, "render_overlay", broken_overlay)
    with pytest.raises(RuntimeError, match="render failed"):
        write_outputs(tmp_path, "x", image, prediction, masks, NAMES, CATEGORY_IDS)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    with pytest.raises(TypeError):  # extra must be JSON-able
        write_outputs(
            tmp_path, "x", image, prediction, masks, NAMES, CATEGORY_IDS, extra={"a": {1}}
        )
    assert list(tmp_path.iterdir()) == []


def test_unwritable_or_invalid_directory(tmp_path, monkeypatch):
    image, prediction, masks = scene()
    not_dir = tmp_path / "file.txt"
    not_dir.write_text("x")
    with pytest.raises(InputError, match=f"output directory {not_dir} exists and is not a dir"):
        write_outputs(not_dir, "x", image, prediction, masks, NAMES, CATEGORY_IDS)
    under_file = not_dir / "sub"
    with pytest.raises(InputError, match=f"cannot create output directory {under_file}"):
        write_outputs(under_file, "x", image, prediction, masks, NAMES, CATEGORY_IDS)

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(outputs.os, "open", denied)
    with pytest.raises(InputError, match=f"output directory {tmp_path} is not writable"):
        write_outputs(tmp_path, "x", image, prediction, masks, NAMES, CATEGORY_IDS)
    assert list(tmp_path.iterdir()) == [not_dir]
    with pytest.raises(InputError, match="output name"):
        write_outputs(tmp_path, "a/b", image, prediction, masks, NAMES, CATEGORY_IDS)
