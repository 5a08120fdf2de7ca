"""COCO-compatible result files and a readable overlay for one image.

:func:`write_outputs` writes, all or nothing, ``<stem>_panoptic.png`` (segment ids as
``R + 256·G + 256²·B``, panopticapi's encoding), ``<stem>_panoptic.json`` (COCO panoptic
annotation of the image plus its categories), ``<stem>_semantic.png`` (class indices, 255 = void;
16-bit with 65535 = void for 255 or more classes), ``<stem>_instances.json`` (COCO detection
results with RLE masks) and ``<stem>_overlay.png``.
"""

from __future__ import annotations

import colorsys
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pycocotools import mask as mask_util

from retclip.errors import InputError
from retclip.files import temp_path
from retclip.images import id2rgb, png_bytes
from retclip.panoptic import PanopticPrediction, Segment, semantic_void_value

__all__ = [
    "encode_rle",
    "palette",
    "render_overlay",
    "write_outputs",
]

OUTPUT_SUFFIXES: dict[str, str] = {
    "panoptic_png": "_panoptic.png",
    "panoptic_json": "_panoptic.json",
    "semantic_png": "_semantic.png",
    "instances_json": "_instances.json",
    "overlay_png": "_overlay.png",
}


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO RLE of an ``[H, W]`` mask: ``{"size": [H, W], "counts": str}`` (JSON-safe)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"expected an [H, W] mask, got shape {tuple(mask.shape)}")
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    counts = rle["counts"]
    return {
        "size": [int(v) for v in rle["size"]],
        "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts,
    }


def palette(n: int, seed: int = 0) -> np.ndarray:
    """``[n, 3]`` uint8 distinct, saturated colours; the same for the same ``(n, seed)``.

    Hues step by the golden ratio from a seed-dependent start, with saturation and value cycling
    over a few levels; any colliding colour is replaced by a fresh random one.
    """
    if n < 0:
        raise ValueError(f"palette size must be >= 0, got {n}")
    rng = np.random.default_rng(seed)
    start = float(rng.random())
    saturations = (0.85, 0.6, 0.95, 0.7)
    values = (0.95, 0.8, 0.65)
    colours = np.empty((n, 3), dtype=np.uint8)
    seen: set[tuple[int, int, int]] = set()
    for i in range(n):
        hue = (start + i * 0.6180339887498949) % 1.0
        r, g, b = colorsys.hsv_to_rgb(hue, saturations[i % 4], values[(i // 4) % 3])
        colour = (round(r * 255), round(g * 255), round(b * 255))
        while colour in seen:
            drawn = rng.integers(0, 256, size=3)
            colour = (int(drawn[0]), int(drawn[1]), int(drawn[2]))
        seen.add(colour)
        colours[i] = colour
    return colours


def _boundaries(panoptic: np.ndarray) -> np.ndarray:
    """``[H, W]`` bool: pixels whose right or lower neighbour has another id (either side)."""
    edge = np.zeros(panoptic.shape, dtype=bool)
    horizontal = panoptic[:, 1:] != panoptic[:, :-1]
    vertical = panoptic[1:, :] != panoptic[:-1, :]
    edge[:, 1:] |= horizontal
    edge[:, :-1] |= horizontal
    edge[1:, :] |= vertical
    edge[:-1, :] |= vertical
    return edge


def _run_depth(labels: np.ndarray) -> np.ndarray:
    """``[H, W]`` distance of each pixel to the nearest end of its same-id run along its row."""
    h, w = labels.shape
    cols = np.broadcast_to(np.arange(w), (h, w))
    is_start = np.ones((h, w), dtype=bool)
    is_start[:, 1:] = labels[:, 1:] != labels[:, :-1]
    start = np.maximum.accumulate(np.where(is_start, cols, 0), axis=1)
    is_end = np.ones((h, w), dtype=bool)
    is_end[:, :-1] = labels[:, :-1] != labels[:, 1:]
    end = np.minimum.accumulate(np.where(is_end, cols, w - 1)[:, ::-1], axis=1)[:, ::-1]
    return np.minimum(cols - start, end - cols)


def _label_points(panoptic: np.ndarray, ids: Sequence[int]) -> dict[int, tuple[int, int]]:
    """An interior ``(x, y)`` per segment id.

    The pixel deepest inside its segment (distance to the segment's edge along its row and
    column), ties broken by closeness to the centroid. Unlike the centroid, it is always inside.
    """
    h, w = panoptic.shape
    flat_ids = panoptic.reshape(-1)
    depth = np.minimum(_run_depth(panoptic), _run_depth(panoptic.T).T).reshape(-1)
    ys, xs = np.divmod(np.arange(h * w), w)
    counts = np.maximum(np.bincount(flat_ids), 1)
    cx = np.bincount(flat_ids, weights=xs) / counts
    cy = np.bincount(flat_ids, weights=ys) / counts
    off_centre = (xs - cx[flat_ids]) ** 2 + (ys - cy[flat_ids]) ** 2
    order = np.lexsort((off_centre, -depth, flat_ids))  # by id, deepest first, then central
    sorted_ids = flat_ids[order]
    firsts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
    points: dict[int, tuple[int, int]] = {}
    wanted = set(ids)
    for first in firsts:
        seg_id = int(sorted_ids[first])
        if seg_id in wanted:
            index = int(order[first])
            points[seg_id] = (index % w, index // w)
    return points


def render_overlay(
    image: np.ndarray,
    panoptic: np.ndarray,
    segments: Sequence[Segment],
    class_names: Sequence[str],
    *,
    alpha: float = 0.5,
) -> np.ndarray:
    """Image with segments tinted, outlined and labelled ``"<class> <score>"`` (the class alone
    for a NaN score, e.g. ground truth).

    Every segment (every instance, for things) gets its own colour, blended with weight
    ``alpha``; void stays as is. Outlines are drawn in white between segments and around void,
    and each label sits on a dark box at the segment's deepest interior pixel, clipped inside the
    image. The font size scales with the image.

    Args:
        image: ``[H, W, 3]`` uint8 RGB.
        panoptic: ``[H, W]`` segment ids, 0 = void.
        segments: the segments of ``panoptic``.
        class_names: names indexed by ``Segment.category``; a name's first comma-separated
            synonym is shown.
        alpha: tint opacity in ``[0, 1]``.

    Returns:
        ``[H, W, 3]`` uint8 RGB.
    """
    if image.ndim != 3 or image.shape[2] != 3 or panoptic.shape != image.shape[:2]:
        raise ValueError(
            f"expected image [H, W, 3] and panoptic [H, W], got {tuple(image.shape)} and "
            f"{tuple(panoptic.shape)}"
        )
    h, w = panoptic.shape
    ids = np.asarray(panoptic).astype(np.int64)
    ordered = sorted(segments, key=lambda s: s.id)
    lut_size = max([0, int(ids.max(initial=0))] + [s.id for s in ordered]) + 1
    colour_lut = np.zeros((lut_size, 3), dtype=np.float64)
    tinted = np.zeros(lut_size, dtype=bool)
    colours = palette(len(ordered))
    for segment, colour in zip(ordered, colours, strict=True):
        colour_lut[segment.id] = colour
        tinted[segment.id] = True
    weight = np.where(tinted[ids], alpha, 0.0)[..., None]
    blended = image.astype(np.float64) * (1.0 - weight) + colour_lut[ids] * weight
    out = np.clip(np.rint(blended), 0, 255).astype(np.uint8)

    edge = _boundaries(ids)
    thickness = max(1, round(min(h, w) / 400))
    for _ in range(thickness - 1):
        grown = edge.copy()
        grown[1:, :] |= edge[:-1, :]
        grown[:, 1:] |= edge[:, :-1]
        edge = grown
    out[edge] = (255, 255, 255)

    canvas = Image.fromarray(out)
    draw = ImageDraw.Draw(canvas)
    font_size = max(10, round(max(h, w) / 32))
    font = ImageFont.load_default(size=font_size)
    pad = max(2, font_size // 5)
    points = _label_points(ids, [s.id for s in ordered])
    colour_of = {s.id: tuple(int(v) for v in c) for s, c in zip(ordered, colours, strict=True)}
    # Large segments first, so labels of small ones stay on top.
    for segment in sorted(ordered, key=lambda s: -s.area):
        if segment.id not in points:
            continue
        name = class_names[segment.category].split(",")[0].strip()
        text = name if math.isnan(segment.score) else f"{name} {segment.score:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        box_w, box_h = right - left + 2 * pad, bottom - top + 2 * pad
        px, py = points[segment.id]
        x0 = min(max(px - box_w // 2, 0), max(w - box_w, 0))
        y0 = min(max(py - box_h // 2, 0), max(h - box_h, 0))
        draw.rectangle(
            (x0, y0, x0 + box_w - 1, y0 + box_h - 1),
            fill=(25, 25, 25),
            outline=colour_of[segment.id],
            width=max(1, pad // 2),
        )
        draw.text((x0 + pad - left, y0 + pad - top), text, font=font, fill=(255, 255, 255))
    return np.asarray(canvas)


def _json_bytes(data: Any) -> bytes:
    return (json.dumps(data, indent=2, allow_nan=False) + "\n").encode("utf-8")


def _category_flags(prediction: PanopticPrediction, num_classes: int) -> list[bool]:
    if prediction.isthing is not None:
        flags = [bool(v) for v in np.asarray(prediction.isthing).reshape(-1)[:num_classes]]
        if len(flags) == num_classes:
            return flags
    flags = [False] * num_classes
    for segment in prediction.segments:
        flags[segment.category] = segment.isthing
    for instance in prediction.instances:
        flags[instance.category] = True
    return flags


def _render_all(
    stem: str,
    image: np.ndarray,
    prediction: PanopticPrediction,
    masks: np.ndarray,
    class_names: Sequence[str],
    category_ids: Sequence[int],
    image_id: str | int,
    extra: Mapping[str, Any] | None,
) -> dict[str, bytes]:
    num_classes = len(class_names)
    if len(category_ids) != num_classes:
        raise ValueError(
            f"{len(category_ids)} category ids for {num_classes} class names; expected one each"
        )
    panoptic = np.asarray(prediction.panoptic)
    if image.shape[:2] != panoptic.shape or prediction.semantic.shape != panoptic.shape:
        raise ValueError(
            f"image {tuple(image.shape)}, panoptic {tuple(panoptic.shape)} and semantic "
            f"{tuple(prediction.semantic.shape)} sizes differ"
        )
    if masks.ndim != 3 or masks.shape[1:] != panoptic.shape:
        raise ValueError(f"expected masks [N, H, W] at image size, got {tuple(masks.shape)}")
    flags = _category_flags(prediction, num_classes)

    segments_info = [
        {
            "id": int(s.id),
            "category_id": int(category_ids[s.category]),
            "category_name": class_names[s.category],
            "isthing": bool(s.isthing),
            "iscrowd": 0,
            "area": int(s.area),
            "bbox": [float(v) for v in s.bbox],
            "score": float(s.score),
        }
        for s in prediction.segments
    ]
    panoptic_json: dict[str, Any] = {
        "image_id": image_id,
        "file_name": f"{stem}_panoptic.png",
        "segments_info": segments_info,
        "categories": [
            {"id": int(cid), "name": name, "isthing": flag}
            for cid, name, flag in zip(category_ids, class_names, flags, strict=True)
        ],
    }
    for key, value in (extra or {}).items():
        if key in panoptic_json:
            raise ValueError(f"extra key {key!r} would overwrite a panoptic JSON field")
        panoptic_json[key] = value

    instances = []
    for inst in prediction.instances:
        mask = np.asarray(masks[inst.mask_index], dtype=bool)
        rle = encode_rle(mask)
        bbox = mask_util.toBbox({"size": rle["size"], "counts": rle["counts"].encode("ascii")})
        instances.append(
            {
                "image_id": image_id,
                "category_id": int(category_ids[inst.category]),
                "segmentation": rle,
                "score": float(inst.score),
                "bbox": [float(v) for v in bbox],
            }
        )

    void = semantic_void_value(num_classes)
    semantic = np.asarray(prediction.semantic)
    semantic_png = semantic.astype(np.uint8 if void == 255 else np.uint16)
    if semantic.size and (semantic.min() < 0 or semantic.max() > void):
        raise ValueError(f"semantic labels must lie in [0, {void}], got {semantic.max()}")
    overlay = render_overlay(image, panoptic, prediction.segments, class_names)
    return {
        "panoptic_png": png_bytes(id2rgb(panoptic)),
        "panoptic_json": _json_bytes(panoptic_json),
        "semantic_png": png_bytes(semantic_png),
        "instances_json": _json_bytes(instances),
        "overlay_png": png_bytes(overlay),
    }


def _prepare_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"output directory {out_dir} exists and is not a directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise InputError(f"cannot create output directory {out_dir}: {reason}") from error


def write_outputs(
    out_dir: Path,
    stem: str,
    image: np.ndarray,
    prediction: PanopticPrediction,
    masks: np.ndarray,
    class_names: Sequence[str],
    category_ids: Sequence[int],
    *,
    image_id: str | int | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write the five result files of one image, all or nothing.

    Everything is rendered in memory, written to temporary files in ``out_dir`` and then renamed
    into place; on any failure the temporary files (and any files already renamed) are removed,
    so no partial set remains.

    Args:
        out_dir: output directory, created if missing.
        stem: file name prefix (no directory separators).
        image: ``[H, W, 3]`` uint8 RGB input image.
        prediction: the image's results (see :func:`retclip.panoptic.postprocess`).
        masks: ``[N, H, W]`` bool proposal masks, indexed by ``Instance.mask_index``.
        class_names: ``[C]`` class names.
        category_ids: ``[C]`` dataset category ids written to the JSON files.
        image_id: COCO image id; defaults to ``stem``.
        extra: more top-level keys for the panoptic JSON (e.g. settings); must be JSON-able.

    Returns:
        Paths by key: ``panoptic_png``, ``panoptic_json``, ``semantic_png``, ``instances_json``,
        ``overlay_png``.

    Raises:
        InputError: ``out_dir`` is not a directory, cannot be created or is not writable, or
            ``stem`` is not a plain file name prefix.
    """
    out_dir = Path(out_dir)
    if not stem or stem in (".", "..") or "/" in stem or os.sep in stem or "\0" in stem:
        raise InputError(f"output name {stem!r} must be a non-empty file name without '/'")
    contents = _render_all(
        stem,
        np.asarray(image),
        prediction,
        np.asarray(masks),
        class_names,
        category_ids,
        stem if image_id is None else image_id,
        extra,
    )
    _prepare_dir(out_dir)
    targets = {key: out_dir / f"{stem}{suffix}" for key, suffix in OUTPUT_SUFFIXES.items()}
    temps: dict[str, Path] = {}
    placed: list[Path] = []
    try:
        for key, data in contents.items():
            temp = temp_path(targets[key])
            # os.open with 0o666 honours the umask (mkstemp would make the results 0600).
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            temps[key] = temp
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
        for key, temp in temps.items():
            os.replace(temp, targets[key])
            placed.append(targets[key])
    except BaseException as error:
        for path in [*temps.values(), *placed]:
            path.unlink(missing_ok=True)
        if isinstance(error, PermissionError):
            raise InputError(f"output directory {out_dir} is not writable") from error
        if isinstance(error, OSError):
            reason = error.strerror or type(error).__name__
            raise InputError(f"cannot write outputs to {out_dir}: {reason}") from error
        raise
    return targets
