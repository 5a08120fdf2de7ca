"""Database construction (paper §2.1): proposals with a class per mask → one backbone pass per
image → mask pooling → labelled rows with provenance.

Two sources feed the same loop, through the :class:`MaskProposer` interface:
- images with image-level labels (a labels file): a class-prompted proposer (Grounding DINO →
  SAM) is prompted with each image's own labels and its class hints label the rows;
- a COCO-panoptic dataset with its ground-truth masks (the upper-bound database).

Builds commit one shard per batch of images; every commit records the images it covered under the
build's id, so an interrupted build run again with the same settings skips them and ends with
exactly the rows of an uninterrupted build, in the same order.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from retclip.backbones.base import Backbone, segment_features
from retclip.database.store import FeatureDatabase
from retclip.datasets.coco_panoptic import CocoPanopticDataset
from retclip.errors import InputError
from retclip.images import SourceImage, load_image
from retclip.pooling import PoolingMode
from retclip.proposers.base import MaskProposer
from retclip.vocabulary import VocabClass, Vocabulary


@dataclasses.dataclass(frozen=True)
class BuildItem:
    """One image to add: its path and the class names to prompt the proposer with."""

    source: str
    labels: tuple[str, ...]


@dataclasses.dataclass
class BuildReport:
    """What a build did: images processed now, images skipped as already committed, rows added,
    masks dropped (no class hint or empty)."""

    images: int = 0
    skipped: int = 0
    rows: int = 0
    dropped_masks: int = 0


def items_from_dataset(
    dataset: CocoPanopticDataset, *, image_labels: bool = False
) -> list[BuildItem]:
    """Every image of a panoptic dataset.

    By default each is prompted with all the dataset's categories (for ``gt`` masks, whose class
    hints index them). With ``image_labels``, only the categories present in the image: the
    dataset then serves as images with image-level tags, for a class-prompted proposer.
    """
    names = tuple(dataset.vocabulary.names)
    return [
        BuildItem(
            str(dataset.image_path(i)), tuple(dataset.image_labels(i)) if image_labels else names
        )
        for i in range(len(dataset))
    ]


def items_from_labels_file(path: str | Path, images_dir: str | Path) -> list[BuildItem]:
    """Images with image-level labels from a JSON or CSV file.

    JSON: ``{"img.jpg": ["cat", "dog"], ...}`` or ``[{"image": "img.jpg", "labels": [...]}]``.
    CSV: a header with ``image`` and ``labels`` columns, labels separated by ``;``.
    Image names are relative to ``images_dir``.
    """
    path, images_dir = Path(path), Path(images_dir)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputError(f"labels file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read labels file {path}: {exc}") from None
    pairs: list[tuple[str, list[str]]]
    if path.suffix.lower() == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        if rows and not {"image", "labels"} <= set(rows[0]):
            raise InputError(f"{path}: CSV needs 'image' and 'labels' columns, got {list(rows[0])}")
        pairs = [(r["image"], r["labels"].split(";")) for r in rows]
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path} is not valid JSON: {exc}") from None
        if isinstance(data, dict):
            pairs = list(data.items())
        elif isinstance(data, list) and all(isinstance(d, dict) for d in data):
            try:
                pairs = [(d["image"], d["labels"]) for d in data]
            except KeyError as exc:
                raise InputError(
                    f"{path}: every entry needs 'image' and 'labels' ({exc})"
                ) from None
        else:
            raise InputError(f"{path}: expected an object image → labels or a list of entries")
    items = []
    for image, labels in pairs:
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise InputError(f"{path}: labels of {image!r} must be a list of strings")
        names = tuple(dict.fromkeys(x.strip() for x in labels if x.strip()))
        if names:
            items.append(BuildItem(str(images_dir / image), names))
    if not items:
        raise InputError(f"{path} lists no image with labels")
    return items


def build_id_for(backbone: Backbone, proposer: MaskProposer, origin: str, pooling: str) -> str:
    """A short id of a build's settings: a re-run with the same settings resumes it."""
    key = json.dumps([backbone.fingerprint.key(), proposer.name, origin, pooling])
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def _batches(items: Sequence[BuildItem], size: int) -> Iterator[Sequence[BuildItem]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def build_database(
    db: FeatureDatabase,
    backbone: Backbone,
    proposer: MaskProposer,
    items: Sequence[BuildItem],
    *,
    build_id: str,
    batch_size: int = 8,
    pooling: PoolingMode = "soft",
    synonyms: Mapping[str, Sequence[str]] | None = None,
    decode_workers: int = 2,
    progress: bool = True,
    on_commit: Callable[[int], None] | None = None,
) -> BuildReport:
    """Add the rows of ``items`` to ``db``, one atomic commit per batch, skipping committed images.

    Each mask whose class hint names one of the item's labels becomes a row labelled with it;
    masks without a hint (or empty ones) are dropped and counted. ``on_commit`` is called with the
    number of batches committed so far (progress reporting).
    """
    db.check_compatible(backbone.fingerprint, backbone.dim, pooling=pooling)
    db.record_pooling(pooling)
    if not proposer.gives_class_hints:
        raise InputError(
            f"proposer {proposer.name!r} gives no class per mask, so its masks cannot label "
            "database rows: use a class-prompted proposer (grounded-sam, owl-sam) or gt"
        )
    if batch_size < 1:
        raise InputError(f"batch size must be >= 1, got {batch_size}")
    done = db.completed_sources(build_id)
    todo = [item for item in items if item.source not in done]
    report = BuildReport(skipped=len(items) - len(todo))
    bar = tqdm(total=len(todo), unit="img", desc="db build", disable=not progress)
    with ThreadPoolExecutor(max_workers=max(1, decode_workers)) as decoder:
        for committed, batch in enumerate(_batches(todo, batch_size), start=1):
            images = decoder.map(load_image, [item.source for item in batch])
            features: list[np.ndarray] = []
            labels: list[str] = []
            sources: list[str] = []
            boxes: list[np.ndarray] = []
            areas: list[np.ndarray] = []
            scores: list[np.ndarray] = []
            for item, image in zip(batch, images, strict=True):
                vocabulary = Vocabulary([VocabClass(label) for label in item.labels])
                proposals = proposer.propose(SourceImage(image, item.source), vocabulary)
                if proposals.class_hints is None:
                    raise InputError(
                        f"proposer {proposer.name!r} gives no class per mask, so its masks "
                        "cannot label database rows: use a class-prompted proposer"
                    )
                mask_areas = proposals.masks.sum(axis=(1, 2))
                keep = (proposals.class_hints >= 0) & (mask_areas > 0)
                report.dropped_masks += int((~keep).sum())
                kept = proposals.select(keep)
                if len(kept):
                    features.append(
                        segment_features(backbone, image, kept.masks, mode=pooling).cpu().numpy()
                    )
                    assert kept.class_hints is not None and kept.boxes is not None
                    labels.extend(item.labels[h] for h in kept.class_hints)
                    sources.extend([item.source] * len(kept))
                    boxes.append(kept.boxes)
                    areas.append(mask_areas[keep])
                    scores.append(kept.scores)
            rows = sum(len(f) for f in features)
            added = db.add(
                np.concatenate(features) if rows else np.zeros((0, backbone.dim), np.float32),
                labels,
                sources=sources,
                boxes=np.concatenate(boxes) if rows else np.zeros((0, 4), np.float32),
                mask_areas=np.concatenate(areas) if rows else np.zeros(0, np.int64),
                scores=np.concatenate(scores) if rows else np.zeros(0, np.float32),
                build_id=build_id,
                synonyms=synonyms,
                completed_sources=[item.source for item in batch],
            )
            report.images += len(batch)
            report.rows += added  # fewer when another writer of this build committed them first
            bar.update(len(batch))
            bar.set_postfix(rows=report.rows)
            if on_commit is not None:
                on_commit(committed)
    bar.close()
    return report
