"""The overlay: segments tinted, outlined and labelled, and the colour each segment gets."""

from __future__ import annotations

import colorsys
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from retclip.panoptic import Segment

__all__ = ["palette", "render_overlay", "segment_colours"]


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


def label_points(panoptic: np.ndarray, ids: Sequence[int]) -> dict[int, tuple[int, int]]:
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


def segment_colours(segments: Sequence[Segment]) -> dict[int, tuple[int, int, int]]:
    """The RGB colour of each segment id in the overlay (a legend must use the same)."""
    ordered = sorted(segments, key=lambda s: s.id)
    return {
        s.id: (int(c[0]), int(c[1]), int(c[2]))
        for s, c in zip(ordered, palette(len(ordered)), strict=True)
    }


def render_overlay(
    image: np.ndarray,
    panoptic: np.ndarray,
    segments: Sequence[Segment],
    class_names: Sequence[str],
    *,
    alpha: float = 0.5,
    labels: bool = True,
) -> np.ndarray:
    """Image with segments tinted, outlined and labelled ``"<class> <score>"`` (the class alone
    for a NaN score, e.g. ground truth); ``labels=False`` leaves the labels out (a viewer that
    draws its own at :func:`label_points`).

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
        labels: draw the labels.

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
    colour_of = segment_colours(ordered)
    for segment in ordered:
        colour_lut[segment.id] = colour_of[segment.id]
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
    points = label_points(ids, [s.id for s in ordered]) if labels else {}
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
