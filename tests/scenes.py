"""Synthetic COCO-panoptic scenes whose features the colour backbone knows.

Sky (blue) above grass (green), with red "apple" and yellow "banana" rectangles on top. The
class names are words the colour backbone's text tower does not know, so CLIP-style scoring is
at chance while retrieval from a database of such scenes is right: a test of *meaning*. Every
region is aligned to the backbone's 8-pixel grid, so pooled features are pure colours and the
right answers are known exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

CATEGORIES = [
    {"id": 1, "name": "apple", "isthing": 1, "color": (220, 40, 40)},
    {"id": 2, "name": "banana", "isthing": 1, "color": (235, 220, 50)},
    {"id": 3, "name": "sky", "isthing": 0, "color": (40, 70, 210)},
    {"id": 4, "name": "grass", "isthing": 0, "color": (50, 170, 60)},
]
HEIGHT, WIDTH = 48, 64


def id2rgb(ids: np.ndarray) -> np.ndarray:
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)


def make_scene(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """An image ``[H, W, 3]``, its segment-id map and segments_info."""
    image = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    ids = np.zeros((HEIGHT, WIDTH), np.int64)
    horizon = 8 * int(rng.integers(2, 4))
    segments = []
    regions = [
        (3, slice(0, horizon), slice(0, WIDTH)),
        (4, slice(horizon, HEIGHT), slice(0, WIDTH)),
    ]
    for _ in range(int(rng.integers(1, 4))):
        h, w = 8 * int(rng.integers(1, 3)), 8 * int(rng.integers(1, 3))
        y, x = (
            8 * int(rng.integers(0, (HEIGHT - h) // 8 + 1)),
            8 * int(rng.integers(0, (WIDTH - w) // 8 + 1)),
        )
        regions.append((int(rng.integers(1, 3)), slice(y, y + h), slice(x, x + w)))
    for seg_id, (cat, ys, xs) in enumerate(regions, start=1):
        color = next(c["color"] for c in CATEGORIES if c["id"] == cat)
        noise = rng.integers(-12, 13, size=(ys.stop - ys.start, xs.stop - xs.start, 3))
        image[ys, xs] = np.clip(np.array(color) + noise, 0, 255)
        ids[ys, xs] = seg_id
    for seg_id, (cat, _, _) in enumerate(regions, start=1):
        area = int((ids == seg_id).sum())
        if area:
            ys_, xs_ = np.nonzero(ids == seg_id)
            bbox = [int(xs_.min()), int(ys_.min()), int(np.ptp(xs_) + 1), int(np.ptp(ys_) + 1)]
            segments.append(
                {"id": seg_id, "category_id": cat, "iscrowd": 0, "area": area, "bbox": bbox}
            )
    return image, ids, segments


def write_scene_dataset(root: Path, n: int, seed: int, name: str = "scenes") -> tuple[Path, Path]:
    """Write ``n`` scenes as a COCO-panoptic dataset under ``root``; returns (JSON, images dir)."""
    rng = np.random.default_rng(seed)
    images_dir = root / "images"
    masks_dir = root / name
    images_dir.mkdir(parents=True, exist_ok=True)
    masks_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(n):
        image, ids, segments = make_scene(rng)
        stem = f"{name}_{seed}_{i:04d}"
        Image.fromarray(image).save(images_dir / f"{stem}.png")
        Image.fromarray(id2rgb(ids)).save(masks_dir / f"{stem}.png")
        images.append({"id": i, "file_name": f"{stem}.png", "height": HEIGHT, "width": WIDTH})
        annotations.append({"image_id": i, "file_name": f"{stem}.png", "segments_info": segments})
    categories = [{k: v for k, v in c.items() if k != "color"} for c in CATEGORIES]
    json_path = root / f"{name}.json"
    json_path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return json_path, images_dir
