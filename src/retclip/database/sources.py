"""Build items of downloaded dataset layouts: Open Images' image-level (or box) labels, and
image–text shards labelled by the caption rule of :mod:`retclip.database.captions`.

Each reader (``retclip.datasets.open_images``, ``retclip.datasets.image_text_shards``) is read to
the end here, before a database is created, so a bad file is one error and nothing half-built.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Sequence

from retclip.database.build import BuildItem
from retclip.database.captions import CaptionMatcher
from retclip.datasets.image_text_shards import read_shard_samples, shard_paths
from retclip.datasets.open_images import OpenImages
from retclip.errors import InputError
from retclip.vocabulary import Vocabulary


def items_from_open_images(
    dataset: OpenImages, *, vocabulary: Vocabulary | None = None, limit: int | None = None
) -> tuple[list[BuildItem], int]:
    """Build items of the downloaded images of an Open Images split, with their labels.

    With ``vocabulary`` only the labels that name one of its classes (its display name or a
    synonym, case-insensitive) are kept, as that class's display name; images left without a
    label are left out. Images listed but not downloaded (no ``<ImageID>.jpg``) are left out
    too: a download is often a subset. ``limit`` stops after that many items, reading no
    further. Returns the items and the number of listed images not downloaded.

    Raises:
        InputError: a bad annotation file (:meth:`OpenImages.image_labels`), or no item at all.
    """
    kept: dict[str, str | None] = {}

    def restrict(name: str) -> str | None:
        if vocabulary is None:
            return name
        if name not in kept:
            try:
                kept[name] = vocabulary[vocabulary.index_of(name)].name
            except InputError:
                kept[name] = None
        return kept[name]

    items: list[BuildItem] = []
    absent = labelled = 0
    with contextlib.closing(dataset.image_labels()) as images:
        for image_id, names in images:
            labels = tuple(dict.fromkeys(n for n in map(restrict, names) if n is not None))
            if not labels:
                continue
            labelled += 1
            path = dataset.image_path(image_id)
            if not path.is_file():
                absent += 1
                continue
            items.append(BuildItem(str(path), labels))
            if limit is not None and len(items) >= limit:
                break
    if not items:
        if labelled:
            raise InputError(
                f"none of the {labelled} labelled images of {dataset.annotations_csv} is in "
                f"{dataset.images_dir} (as <ImageID>.jpg, how downloader.py writes them)"
            )
        among = f" among the classes of {vocabulary.name!r}" if vocabulary is not None else ""
        raise InputError(f"no image of {dataset.annotations_csv} has a label{among}")
    return items, absent


#: Maps a function over shards, yielding its results in shard order (lazily: a ``limit`` stops
#: it early). The default is the builtin ``map``; on Ray, :class:`retclip.distributed.
#: RayShardMap` reads several shards at once on the cluster.
ShardMap = Callable[[Callable[[str], list[BuildItem]], Sequence[str]], Iterable[list[BuildItem]]]


def shard_items(shard: str, vocabulary: Vocabulary) -> list[BuildItem]:
    """The build items of one shard (headers and captions only), labelled with the classes of
    ``vocabulary`` their captions mention; samples mentioning none are left out.

    Raises:
        InputError: a missing or bad shard, naming it and the sample's key.
    """
    matcher = CaptionMatcher(vocabulary)
    items: list[BuildItem] = []
    with contextlib.closing(read_shard_samples(shard, images=False)) as samples:
        for sample in samples:
            found = {c for caption in sample.captions for c in matcher.classes(caption)}
            if found:
                labels = tuple(vocabulary[i].name for i in sorted(found))
                items.append(BuildItem(sample.source, labels, sample.image))
    return items


def items_from_shards(
    patterns: Sequence[str],
    vocabulary: Vocabulary,
    *,
    limit: int | None = None,
    map_shards: ShardMap = map,
) -> list[BuildItem]:
    """Build items of the samples of image–text shards, labelled with the classes their
    captions mention (:class:`CaptionMatcher`); samples mentioning none are left out.

    ``patterns`` are brace patterns (``data/{00000..00127}.tar``); each item's source is
    ``SHARD#KEY`` and it reads its image from the shard when the build needs it. Every shard is
    read here (headers and captions only, :func:`shard_items` through ``map_shards``), until
    ``limit`` items; the items are in shard order, then sample order, however they were read.

    Raises:
        InputError: a missing or bad shard, naming it and the sample's key; no sample mentions
            a class.
    """
    shards = shard_paths(patterns)
    items: list[BuildItem] = []
    results = iter(map_shards(functools.partial(shard_items, vocabulary=vocabulary), shards))
    try:
        for found in results:
            items.extend(found)
            if limit is not None and len(items) >= limit:
                return items[:limit]
    finally:  # a reader stopped at the limit stops reading (a generator's shards in flight)
        close = getattr(results, "close", None)
        if close is not None:
            close()
    if not items:
        raise InputError(
            f"no caption in {len(shards)} shard(s) ({shards[0]}, ...) mentions a class of "
            f"vocabulary {vocabulary.name!r}"
        )
    return items
