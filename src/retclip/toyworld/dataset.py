"""Write toy-world scenes as a COCO-panoptic dataset with a captions file.

Layout of ``write_split(root, split, n, seed)``::

    root/images/<split>_<seed>_<i>.png        RGB scenes
    root/panoptic_<split>/<same name>.png     segment ids as R + 256·G + 256²·B
    root/panoptic_<split>.json                images, annotations (segments_info), categories
    root/captions_<split>.jsonl               {"image": file name, "caption": text} per line
    root/vocab.txt                            the 14 classes as a vocabulary file (with flags)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from retclip.files import atomic_write
from retclip.images import id2rgb, save_png
from retclip.toyworld.world import CATEGORIES, THINGS, generate_scenes
from retclip.vocabulary import VocabClass, Vocabulary


def toy_vocabulary() -> Vocabulary:
    """The toy world's classes: 8 shapes (things) then 6 textures (stuff); ids 1..14."""
    return Vocabulary(
        [
            VocabClass(name=name, synonyms=(name,), isthing=name in THINGS, id=i + 1)
            for i, name in enumerate(CATEGORIES)
        ],
        name="toyworld",
    )


def write_split(
    root: Path, split: str, n: int, seed: int = 0, *, progress: bool = False
) -> tuple[Path, Path]:
    """Generate ``n`` scenes of ``split`` under ``root``; returns (panoptic JSON, images dir)."""
    images_dir = root / "images"
    masks_dir = root / f"panoptic_{split}"
    images_dir.mkdir(parents=True, exist_ok=True)
    masks_dir.mkdir(parents=True, exist_ok=True)
    images, annotations, captions = [], [], []
    scenes = generate_scenes(split, n, seed)
    for i, scene in enumerate(tqdm(scenes, desc=f"write {split}", disable=not progress)):
        name = f"{split}_{seed}_{i:05d}.png"
        save_png(images_dir / name, scene.image)
        save_png(masks_dir / name, id2rgb(scene.segment_ids))
        segments = []
        for segment_id, category in scene.segments:
            ys, xs = np.nonzero(scene.segment_ids == segment_id)
            segments.append(
                {
                    "id": segment_id,
                    "category_id": category + 1,
                    "iscrowd": 0,
                    "area": int(ys.size),
                    "bbox": [
                        int(xs.min()),
                        int(ys.min()),
                        int(xs.max() - xs.min() + 1),
                        int(ys.max() - ys.min() + 1),
                    ],
                }
            )
        height, width = scene.segment_ids.shape
        images.append({"id": i, "file_name": name, "height": height, "width": width})
        annotations.append({"image_id": i, "file_name": name, "segments_info": segments})
        captions.append({"image": name, "caption": scene.caption})
    categories = [
        {"id": c.id, "name": c.name, "isthing": int(c.isthing), "supercategory": "toy"}
        for c in toy_vocabulary()
    ]
    json_path = root / f"panoptic_{split}.json"
    atomic_write(
        json_path,
        json.dumps({"images": images, "annotations": annotations, "categories": categories}),
    )
    atomic_write(root / f"captions_{split}.jsonl", "".join(json.dumps(c) + "\n" for c in captions))
    flags = [f"{c.name} ; {'thing' if c.isthing else 'stuff'}" for c in toy_vocabulary()]
    atomic_write(root / "vocab.txt", "\n".join(["# the toy world's classes", *flags]) + "\n")
    return json_path, images_dir
