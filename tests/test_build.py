"""Database construction: from ground-truth masks, from image-level labels, and resume."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import retclip
from retclip.backbones import ColorBackbone
from retclip.backbones.color import COLOUR_PROTOTYPES
from retclip.database import FeatureDatabase
from retclip.database.build import (
    build_database,
    items_from_dataset,
    items_from_labels_file,
)
from retclip.datasets import CocoPanopticDataset
from retclip.errors import InputError
from retclip.proposers import GroundTruthProposer, MaskProposer, Proposals

LABEL_COLOURS = {"apple": "red", "banana": "yellow", "sky": "blue", "grass": "green"}


class ColourProposer(MaskProposer):
    """A class-prompted proposer for tests: a label's mask is the pixels nearest its colour."""

    name = "test-colour"
    gives_class_hints = True

    def propose(self, image, vocabulary, text_embeddings=None) -> Proposals:
        names = list(COLOUR_PROTOTYPES)
        prototypes = np.array(list(COLOUR_PROTOTYPES.values()), dtype=float)
        pixels = image.pixels
        nearest = ((pixels[:, :, None, :] - prototypes) ** 2).sum(-1).argmin(-1)  # [H, W]
        masks, hints = [], []
        for i, label in enumerate(vocabulary.names):
            mask = nearest == names.index(LABEL_COLOURS[label])
            if mask.any():
                masks.append(mask)
                hints.append(i)
        stacked = np.stack(masks) if masks else np.zeros((0, *image.size), bool)
        return Proposals(stacked, np.full(len(masks), 0.9), class_hints=np.array(hints))


def new_db(path: Path) -> FeatureDatabase:
    backbone = ColorBackbone()
    return FeatureDatabase.create(path, fingerprint=backbone.fingerprint, dim=backbone.dim)


def test_build_from_ground_truth_has_one_row_per_segment(scenes, tmp_path) -> None:
    dataset = CocoPanopticDataset(*scenes["db"])
    db = new_db(tmp_path / "db")
    report = build_database(
        db,
        ColorBackbone(),
        GroundTruthProposer(dataset),
        items_from_dataset(dataset),
        build_id="gt",
        batch_size=5,
        progress=False,
    )
    truth = [dataset.annotation(i) for i in range(len(dataset))]
    expected = Counter(dataset.vocabulary.names[c] for t in truth for c in t.categories)
    assert report.images == len(dataset) and report.rows == sum(expected.values())
    assert db.rows_per_class() == dict(expected)
    provenance = db.provenance()
    areas = np.concatenate([t.masks.sum(axis=(1, 2)) for t in truth])
    np.testing.assert_array_equal(provenance["mask_areas"], areas)
    assert provenance["sources"][0] == str(dataset.image_path(0))
    assert set(provenance["build_ids"]) == {"gt"}


def test_build_from_image_labels_through_a_proposer(scenes, tmp_path) -> None:
    dataset = CocoPanopticDataset(*scenes["db"])
    labels_file = tmp_path / "labels.json"
    entries = {
        dataset.image_path(i).name: [
            dataset.vocabulary.names[c] for c in dataset.annotation(i).categories
        ]
        for i in range(4)
    }
    labels_file.write_text(__import__("json").dumps(entries))
    items = items_from_labels_file(labels_file, dataset.images_dir)
    db = new_db(tmp_path / "db")
    report = build_database(
        db, ColorBackbone(), ColourProposer(), items, build_id="labels", progress=False
    )
    assert report.rows > 0 and set(db.rows_per_class()) <= set(LABEL_COLOURS)
    # each labelled row's feature is nearest its label's colour prototype
    names = list(COLOUR_PROTOTYPES)
    labels = [db.labels[i].name for i in db.label_ids()]
    nearest = db.features().argmax(axis=1)
    assert all(names[n] == LABEL_COLOURS[label] for n, label in zip(nearest, labels, strict=True))


def test_labels_file_formats_and_errors(tmp_path) -> None:
    csv_file = tmp_path / "labels.csv"
    csv_file.write_text("image,labels\na.jpg,cat;dog\nb.jpg,sofa\n")
    items = items_from_labels_file(csv_file, tmp_path)
    assert [i.labels for i in items] == [("cat", "dog"), ("sofa",)]
    listed = tmp_path / "labels.json"
    listed.write_text('[{"image": "a.jpg", "labels": ["cat"]}]')
    assert items_from_labels_file(listed, tmp_path)[0].source == str(tmp_path / "a.jpg")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match=r"bad\.json"):
        items_from_labels_file(bad, tmp_path)
    with pytest.raises(InputError, match="not found"):
        items_from_labels_file(tmp_path / "missing.json", tmp_path)
    wrong = tmp_path / "wrong.json"
    wrong.write_text('{"a.jpg": "cat"}')
    with pytest.raises(InputError, match="list of strings"):
        items_from_labels_file(wrong, tmp_path)


def test_proposer_without_class_hints_cannot_label_rows(scenes, tmp_path) -> None:
    class Agnostic(MaskProposer):
        name = "agnostic"

        def propose(self, image, vocabulary, text_embeddings=None):
            return Proposals(np.ones((1, *image.size), bool), np.ones(1))

    dataset = CocoPanopticDataset(*scenes["db"])
    with pytest.raises(InputError, match="class-prompted"):
        build_database(
            new_db(tmp_path / "db"),
            ColorBackbone(),
            Agnostic(),
            items_from_dataset(dataset)[:1],
            build_id="x",
            progress=False,
        )


KILLED_BUILD = textwrap.dedent(
    """
    import os, signal, sys
    from retclip.backbones import ColorBackbone
    from retclip.database import FeatureDatabase
    from retclip.database.build import build_database, items_from_dataset
    from retclip.datasets import CocoPanopticDataset
    from retclip.proposers import GroundTruthProposer

    db_path, json_path, images = sys.argv[1:4]
    backbone = ColorBackbone()
    dataset = CocoPanopticDataset(json_path, images)
    db = FeatureDatabase.create(db_path, fingerprint=backbone.fingerprint, dim=backbone.dim)

    def die_after_two(committed):
        if committed == 2:
            os.kill(os.getpid(), signal.SIGKILL)

    build_database(db, backbone, GroundTruthProposer(dataset), items_from_dataset(dataset),
                   build_id="resume", batch_size=3, progress=False, on_commit=die_after_two)
    """
)


def test_killed_build_resumes_to_the_same_rows(scenes, tmp_path) -> None:
    json_path, images = scenes["db"]
    script = tmp_path / "build.py"
    script.write_text(KILLED_BUILD)
    env = {**os.environ, "PYTHONPATH": str(Path(retclip.__file__).parents[1])}
    killed = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "resumed"), str(json_path), str(images)],
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    dataset = CocoPanopticDataset(json_path, images)
    partial = FeatureDatabase.open(tmp_path / "resumed")
    assert len(partial.completed_sources("resume")) == 6  # two committed batches of three

    def run(db: FeatureDatabase):
        return build_database(
            db,
            ColorBackbone(),
            GroundTruthProposer(dataset),
            items_from_dataset(dataset),
            build_id="resume",
            batch_size=3,
            progress=False,
        )

    report = run(partial)
    assert report.skipped == 6 and report.images == len(dataset) - 6
    reference = new_db(tmp_path / "reference")
    run(reference)
    resumed = FeatureDatabase.open(tmp_path / "resumed")
    assert len(resumed) == len(reference)
    np.testing.assert_array_equal(resumed.features(), reference.features())
    names = lambda db: [db.labels[i].name for i in db.label_ids()]  # noqa: E731
    assert names(resumed) == names(reference)
    for key, values in reference.provenance().items():
        np.testing.assert_array_equal(resumed.provenance()[key], values, err_msg=key)


def test_commit_every_gathers_whole_batches_into_one_commit(scenes, tmp_path) -> None:
    """``commit_every``: a commit (a shard) holds consecutive batches until it has that many
    images, the last one the rest; the rows are those of a commit per batch. Below one batch
    it is one batch; below one image, an error before anything is written."""
    dataset = CocoPanopticDataset(*scenes["db"])
    items = items_from_dataset(dataset)
    shards, features = {}, {}
    for every in (None, 5, 1):
        db = new_db(tmp_path / f"db{every}")
        report = build_database(
            db, ColorBackbone(), GroundTruthProposer(dataset), items, build_id="b",
            batch_size=2, commit_every=every, progress=False,
        )  # fmt: skip
        assert report.images == len(items) > 6
        shards[every], features[every] = len(db._meta["shards"]), db.features()
    assert shards[None] == shards[1] == -(-len(items) // 2)  # a commit per batch of 2
    assert shards[5] == -(-len(items) // 6)  # three batches (6 images) a commit
    for every in (5, 1):
        np.testing.assert_array_equal(features[every], features[None])
    with pytest.raises(InputError, match="commit-every"):
        build_database(
            new_db(tmp_path / "bad"), ColorBackbone(), GroundTruthProposer(dataset), items,
            build_id="b", commit_every=0, progress=False,
        )  # fmt: skip
    assert not FeatureDatabase.open(tmp_path / "bad").completed_sources("b")


def test_two_runs_of_one_build_at_once_add_every_row_once(scenes, tmp_path) -> None:
    """Two identical `db add` runs: each read the finished images when it started; the commits
    re-check under the lock, so no row is added twice, sequentially or in parallel threads."""
    import threading

    dataset = CocoPanopticDataset(*scenes["db"])
    items = items_from_dataset(dataset)
    path = tmp_path / "db"
    new_db(path)

    def build(db: FeatureDatabase) -> int:
        report = build_database(
            db,
            ColorBackbone(),
            GroundTruthProposer(dataset),
            items,
            build_id="same",
            batch_size=2,
            progress=False,
        )
        return report.rows

    first, stale = FeatureDatabase.open(path), FeatureDatabase.open(path)  # both before any commit
    total = build(first) + build(stale)
    expected = sum(len(dataset.annotation(i).categories) for i in range(len(dataset)))
    assert total == expected == len(FeatureDatabase.open(path))
    # and two threads racing on a fresh database
    racing = tmp_path / "race"
    new_db(racing)
    added: list[int] = []
    threads = [
        threading.Thread(target=lambda: added.append(build(FeatureDatabase.open(racing))))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(added) == expected == len(FeatureDatabase.open(racing))
    assert sorted(FeatureDatabase.open(racing).provenance()["sources"]) == sorted(
        FeatureDatabase.open(path).provenance()["sources"]
    )


def test_a_labels_csv_with_a_byte_order_mark(tmp_path) -> None:
    (tmp_path / "a.png").write_bytes(b"")
    csv_path = tmp_path / "labels.csv"
    csv_path.write_bytes("\ufeffimage,labels\na.png,cat;dog\n".encode())
    items = items_from_labels_file(csv_path, tmp_path)
    assert [item.labels for item in items] == [("cat", "dog")]
