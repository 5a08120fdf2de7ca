"""Database construction (paper §2.1): proposals with a class per mask → one backbone pass per
image → mask pooling → labelled rows with provenance.

Two sources feed the same loop, through the :class:`MaskProposer` interface:
- images with image-level labels (a labels file here; captions, Open Images and image–text
  shards in ``captions.py`` and ``sources.py``): a class-prompted proposer (Grounding DINO →
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
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from tqdm import tqdm

from retclip.acceleration import Precision, autocast, check_precision
from retclip.backbones.base import Backbone, features_from_dense
from retclip.database.store import FeatureDatabase
from retclip.datasets.coco_panoptic import CocoPanopticDataset
from retclip.errors import InputError
from retclip.images import SourceImage, image_to_tensor, load_image
from retclip.pooling import PoolingMode
from retclip.proposers.base import MaskProposer
from retclip.vocabulary import VocabClass, Vocabulary


class ImageReader(Protocol):
    """Where the pixels of an item that is not an image file come from (a tar shard's member,
    :class:`retclip.datasets.image_text_shards.ShardImage`); picklable, for worker processes."""

    def load(self) -> np.ndarray:
        """``[H, W, 3]`` uint8 RGB; raises :class:`InputError` naming the image."""
        ...


@dataclasses.dataclass(frozen=True)
class BuildItem:
    """One image to add: its stable id, the class names to prompt the proposer with, and how
    to read it.

    ``source`` names the image in the database's provenance and in resumption (the sources a
    build completed are skipped when it runs again): the image file's path, or for an image
    that is not a file of its own an id such as ``shards/00003.tar#KEY`` with ``image`` saying
    how to read it.
    """

    source: str
    labels: tuple[str, ...]
    image: ImageReader | None = None

    def load(self) -> np.ndarray:
        """The image as ``[H, W, 3]`` uint8 RGB: ``image``'s, else the file at ``source``."""
        return load_image(self.source) if self.image is None else self.image.load()

    def missing(self) -> bool:
        """Whether the image file at ``source`` is missing (never for an ``image`` reader)."""
        return self.image is None and not Path(self.source).is_file()


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


@dataclasses.dataclass
class ImageRows:
    """The rows one image gives (:func:`image_rows`): features ``[n, D]`` float32 with their
    labels and provenance, and how many of the proposer's masks were dropped."""

    source: str
    features: np.ndarray
    labels: list[str]
    boxes: np.ndarray
    mask_areas: np.ndarray
    scores: np.ndarray
    dropped: int


def image_rows(
    backbone: Backbone,
    proposer: MaskProposer,
    item: BuildItem,
    image: np.ndarray,
    *,
    pooling: PoolingMode = "soft",
) -> ImageRows:
    """The per-image work of a build: proposals prompted with the item's labels → one backbone
    pass → mask pooling. Each mask whose class hint names a label becomes a row; masks without
    a hint (or empty ones) are dropped. The one definition for every build path (in-process,
    Ray workers), so they cannot drift: :func:`batch_rows` of one image."""
    return batch_rows(backbone, proposer, [item], [image], pooling=pooling)[0]


def batch_rows(
    backbone: Backbone,
    proposer: MaskProposer,
    items: Sequence[BuildItem],
    images: Sequence[np.ndarray],
    *,
    pooling: PoolingMode = "soft",
) -> list[ImageRows]:
    """:func:`image_rows` of several images in batched model passes: one proposer call
    (:meth:`MaskProposer.propose_batch`) and one backbone pass per image size; rows equal to
    :func:`image_rows` image by image, in item order."""
    vocabularies = [Vocabulary([VocabClass(label) for label in item.labels]) for item in items]
    sources = [SourceImage(image, item.source) for item, image in zip(items, images, strict=True)]
    if len(sources) == 1:
        found = [proposer.propose(sources[0], vocabularies[0])]
    else:
        found = proposer.propose_batch(sources, vocabularies)
    kept, keeps, areas = [], [], []
    for proposals in found:
        if proposals.class_hints is None:
            raise InputError(
                f"proposer {proposer.name!r} gives no class per mask, so its masks "
                "cannot label database rows: use a class-prompted proposer"
            )
        mask_areas = proposals.masks.sum(axis=(1, 2))
        keep = (proposals.class_hints >= 0) & (mask_areas > 0)
        kept.append(proposals.select(keep))
        keeps.append(keep)
        areas.append(mask_areas)
    # one backbone pass per image size over the images with rows
    by_size: dict[tuple[int, ...], list[int]] = {}
    for i, (image, proposals) in enumerate(zip(images, kept, strict=True)):
        if len(proposals):
            by_size.setdefault(image.shape, []).append(i)
    features: dict[int, np.ndarray] = {}
    with torch.inference_mode():
        for members in by_size.values():
            pixels = torch.stack([image_to_tensor(images[i]) for i in members])
            dense = backbone.encode_images(pixels.to(backbone.device))  # [B, D', h, w]
            for row, i in enumerate(members):
                pooled = features_from_dense(
                    backbone, dense[row : row + 1], kept[i].masks, mode=pooling
                )
                features[i] = pooled.cpu().numpy().astype(np.float32, copy=False)
    rows = []
    for i, (item, proposals) in enumerate(zip(items, kept, strict=True)):
        dropped = int((~keeps[i]).sum())
        if not len(proposals):
            rows.append(
                ImageRows(
                    item.source,
                    np.zeros((0, backbone.dim), np.float32),
                    [],
                    np.zeros((0, 4), np.float32),
                    np.zeros(0, np.int64),
                    np.zeros(0, np.float32),
                    dropped,
                )
            )
            continue
        assert proposals.class_hints is not None and proposals.boxes is not None
        rows.append(
            ImageRows(
                item.source,
                features[i],
                [item.labels[h] for h in proposals.class_hints],
                np.asarray(proposals.boxes, dtype=np.float32),
                np.asarray(areas[i][keeps[i]], dtype=np.int64),
                np.asarray(proposals.scores, dtype=np.float32),
                dropped,
            )
        )
    return rows


def commit_rows(
    db: FeatureDatabase,
    parts: Sequence[ImageRows],
    *,
    build_id: str,
    synonyms: Mapping[str, Sequence[str]] | None = None,
) -> int:
    """One atomic commit of the rows of a batch of images, recording every image of the batch
    (with rows or without) as completed by ``build_id``; returns the rows added (fewer when
    another writer of this build committed some of them first)."""

    def stacked(key: str, empty: np.ndarray) -> np.ndarray:
        return np.concatenate([getattr(p, key) for p in parts]) if parts else empty

    return db.add(
        stacked("features", np.zeros((0, db.dim), np.float32)),
        [label for p in parts for label in p.labels],
        sources=[p.source for p in parts for _ in p.labels],
        boxes=stacked("boxes", np.zeros((0, 4), np.float32)),
        mask_areas=stacked("mask_areas", np.zeros(0, np.int64)),
        scores=stacked("scores", np.zeros(0, np.float32)),
        build_id=build_id,
        synonyms=synonyms,
        completed_sources=[p.source for p in parts],
    )


def pending_items(
    db: FeatureDatabase,
    backbone: Backbone,
    proposer: MaskProposer,
    items: Sequence[BuildItem],
    *,
    build_id: str,
    batch_size: int,
    pooling: PoolingMode,
) -> list[BuildItem]:
    """Check that the models can add rows to ``db`` (its recipe, a class-prompted proposer, the
    batch size) and record the pooling rule; returns the items not yet completed by
    ``build_id``, in order (what a build, or a resumed one, still has to do). With any left,
    ``db`` must be writable (checked here, before any model pass)."""
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
    if todo:
        db.check_writable()
    return todo


def commit_images(batch_size: int, commit_every: int | None) -> int:
    """Images per commit: ``commit_every`` (default ``batch_size``), at least one batch."""
    if commit_every is None:
        return batch_size
    if commit_every < 1:
        raise InputError(f"--commit-every must be >= 1 image, got {commit_every}")
    return max(commit_every, batch_size)


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
    precision: Precision = "fp32",
    commit_every: int | None = None,
) -> BuildReport:
    """Add the rows of ``items`` to ``db``, one atomic commit per batch, skipping committed images.

    Each mask whose class hint names one of the item's labels becomes a row labelled with it;
    masks without a hint (or empty ones) are dropped and counted (:func:`image_rows`).
    ``on_commit`` is called with the number of commits so far (progress reporting).
    :func:`retclip.distributed.build_database_on_ray` is the same build on a Ray cluster.

    A commit holds the rows of consecutive batches, at least ``commit_every`` images (default
    ``batch_size``, one batch): every commit adds a shard, and a database of many shards makes
    each commit slower (``docs/scale.md``), so builds of millions of images commit less often
    than they batch.

    The images of one batch go through the models together (:func:`batch_rows`, under
    ``precision``'s autocast). Three things overlap: ``decode_workers`` threads decode the next
    batch (at most one batch ahead) while the models run, and one writer thread commits the
    previous batch; commits stay in batch order (at most one in flight) and an error of any
    thread is raised here, after the commit in flight has ended.
    """
    todo = pending_items(
        db, backbone, proposer, items, build_id=build_id, batch_size=batch_size, pooling=pooling
    )
    check_precision(precision, backbone.device)
    commit_size = commit_images(batch_size, commit_every)
    report = BuildReport(skipped=len(items) - len(todo))
    bar = tqdm(total=len(todo), unit="img", desc="db build", disable=not progress)
    batches = list(_batches(todo, batch_size))
    decoder = ThreadPoolExecutor(max_workers=max(1, decode_workers), thread_name_prefix="decode")
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="commit")
    decoded: deque[list[Future[np.ndarray]]] = deque()
    in_flight: tuple[Future[int], Sequence[BuildItem]] | None = None
    committed = 0
    gathered: list[ImageRows] = []  # rows of the batches the next commit holds
    gathered_items: list[BuildItem] = []

    def finish_commit() -> None:
        nonlocal in_flight, committed
        if in_flight is None:
            return
        future, batch = in_flight
        in_flight = None
        report.rows += future.result()
        report.images += len(batch)
        committed += 1
        bar.update(len(batch))
        bar.set_postfix(rows=report.rows)
        if on_commit is not None:
            on_commit(committed)

    try:
        for index, batch in enumerate(batches):
            while len(decoded) < 2 and index + len(decoded) < len(batches):  # this one + next
                upcoming = batches[index + len(decoded)]
                decoded.append([decoder.submit(BuildItem.load, item) for item in upcoming])
            images = [future.result() for future in decoded.popleft()]
            with autocast(precision, backbone.device):
                parts = batch_rows(backbone, proposer, batch, images, pooling=pooling)
            report.dropped_masks += sum(p.dropped for p in parts)
            gathered.extend(parts)
            gathered_items.extend(batch)
            if len(gathered_items) < commit_size and index + 1 < len(batches):
                continue
            finish_commit()  # the previous commit ends before this one starts (commit order)
            commit = writer.submit(commit_rows, db, gathered, build_id=build_id, synonyms=synonyms)
            in_flight = (commit, gathered_items)
            gathered, gathered_items = [], []
        finish_commit()
    finally:
        decoder.shutdown(wait=True, cancel_futures=True)
        writer.shutdown(wait=True)  # a commit in flight ends (atomically) before any error rises
        bar.close()
    return report
