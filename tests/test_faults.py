"""Fault injection: writers killed at random instants, concurrent writers, a disk that fills at
every point of a commit, and a table of bad inputs on the command line.

Each test states the invariant a user relies on: a database is always at a committed state, every
image's rows are in it exactly once after a resume, and every failure is one ``Error:`` line.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest
from click.testing import CliRunner, Result

import retclip
import retclip.files
from retclip.backbones.base import BackboneFingerprint
from retclip.cli import cli
from retclip.database import FeatureDatabase, IndexSpec
from retclip.errors import DatabaseError

SRC = Path(retclip.__file__).parents[1]
DIM = 16
IMAGES = 40  # one commit per image in the writer below
#: kills per run of the random-kill test (CI: 6; set more for a longer campaign)
KILLS = int(os.environ.get("RETCLIP_FAULT_KILLS", "6"))

# A writer that adds the rows of images 0..IMAGES-1 (deterministic features), skipping the images
# already committed under its build id, and rebuilds an HNSW index now and then and at the end (so
# a kill can land inside an index write too, and a resumed run with no image left still finishes
# the index). Prints "ready" once imported, then "done".
WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from retclip.backbones.base import BackboneFingerprint
    from retclip.database import FeatureDatabase, IndexSpec

    path, build_id, first, last = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    db = FeatureDatabase.create(path, fingerprint=BackboneFingerprint("fault"), dim=16,
                                dtype="float32", exist_ok=True)
    print("ready", flush=True)
    for image in range(first, last):
        if f"img{image}" in db.completed_sources(build_id):
            continue
        rows = 1 + image % 3
        rng = np.random.default_rng(image)
        db.add(rng.standard_normal((rows, 16)).astype(np.float32),
               [f"class{(image + r) % 5}" for r in range(rows)],
               sources=[f"img{image}"] * rows, build_id=build_id,
               completed_sources=[f"img{image}"])
        if image % 10 == 9:
            db.set_index(IndexSpec.parse("hnsw:hnsw_m=8"))
    db.set_index(IndexSpec.parse("hnsw:hnsw_m=8"))  # (again) after a kill inside the last one
    print("done", flush=True)
    """
)


def expected_rows(first: int = 0, last: int = IMAGES) -> dict[str, np.ndarray]:
    """The features each image's rows must have (unit rows, as the database stores them)."""
    out = {}
    for image in range(first, last):
        rows = 1 + image % 3
        feats = np.random.default_rng(image).standard_normal((rows, DIM)).astype(np.float32)
        out[f"img{image}"] = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    return out


def rows_by_source(db: FeatureDatabase) -> dict[str, np.ndarray]:
    sources = db.provenance()["sources"]
    features = db.features()
    return {str(s): features[sources == s] for s in np.unique(sources)}


def start_writer(path: Path, build_id: str, first: int = 0, last: int = IMAGES):
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), build_id, str(first), str(last)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def assert_committed_state(path: Path, first: int = 0, last: int = IMAGES) -> FeatureDatabase:
    """The database opens with every checksum verified, and each image it lists as done has
    exactly its rows (none lost, none twice)."""
    db = FeatureDatabase.open(path, verify=True)
    found = rows_by_source(db)
    wanted = expected_rows(first, last)
    for source, features in found.items():
        np.testing.assert_allclose(features, wanted[source], atol=1e-6, err_msg=source)
    assert sum(len(f) for f in found.values()) == len(db)
    assert set(found) <= db.completed_sources("b") | db.completed_sources("other")
    return db


def test_writers_killed_at_random_instants_lose_and_duplicate_nothing(tmp_path: Path) -> None:
    """SIGKILL at seeded random instants of a run of 40 commits with index rebuilds; after each
    kill the database is at a committed state, and resuming ends with every row exactly once."""
    path = tmp_path / "db"
    chooser = random.Random(13)
    kills = 0
    for _ in range(KILLS):
        writer = start_writer(path, "b")
        assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
        time.sleep(chooser.uniform(0.0, 0.3))
        if writer.poll() is None:
            writer.send_signal(signal.SIGKILL)
            kills += 1
        writer.wait(timeout=60)
        assert writer.returncode in (0, -signal.SIGKILL), writer.stderr and writer.stderr.read()
        if path.exists():
            assert_committed_state(path)
    finishing = start_writer(path, "b")
    out, err = finishing.communicate(timeout=120)
    assert finishing.returncode == 0 and out.split()[-1] == "done", err[-2000:]
    db = assert_committed_state(path)
    print(f"{kills} of {KILLS} kills landed inside a run")
    assert kills >= KILLS // 2  # the instants really fell inside the run
    assert set(rows_by_source(db)) == set(expected_rows())
    assert len(db) == sum(1 + i % 3 for i in range(IMAGES))
    # rows in image order, as an uninterrupted run commits them
    order = [str(s) for s in db.provenance()["sources"]]
    assert order == sorted(order, key=lambda s: int(s[3:]))
    leftovers = [p.name for p in path.rglob("*") if ".tmp-" in p.name]
    assert not leftovers  # the last run's writes cleaned up what the kills left


def test_concurrent_writers_lose_and_duplicate_nothing(tmp_path: Path) -> None:
    """Three processes at once on one new database: two run the same build (same images), one
    another build of other images. Every image's rows are in it exactly once."""
    path = tmp_path / "db"
    writers = [
        start_writer(path, "b", 0, 24),
        start_writer(path, "b", 0, 24),
        start_writer(path, "other", 24, IMAGES),
    ]
    for writer in writers:
        out, err = writer.communicate(timeout=180)
        assert writer.returncode == 0 and out.split()[-1] == "done", err[-2000:]
    db = assert_committed_state(path)
    assert set(rows_by_source(db)) == set(expected_rows())
    assert len(db) == sum(1 + i % 3 for i in range(IMAGES))


def test_two_creators_of_one_new_database_both_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second creator arriving while the first is still writing the new database's files
    opens the database instead of calling the half-made folder 'not a feature database'."""
    import threading

    from retclip.database import store

    path = tmp_path / "db"
    real_write_meta = store.write_meta
    first_is_writing, second_done = threading.Event(), threading.Event()

    def slow_write_meta(db_path: Path, meta: dict[str, Any]) -> None:
        if threading.current_thread().name == "first":
            first_is_writing.set()
            second_done.wait(10)
        real_write_meta(db_path, meta)

    monkeypatch.setattr(store, "write_meta", slow_write_meta)
    made: dict[str, tuple[FeatureDatabase, bool]] = {}

    def create(name: str) -> None:
        made[name] = FeatureDatabase.create_or_open(
            path, fingerprint=BackboneFingerprint("m"), dim=DIM
        )

    first = threading.Thread(target=create, args=("first",), name="first")
    first.start()
    assert first_is_writing.wait(10)
    create("second")  # while the first is inside its creation
    second_done.set()
    first.join(10)
    assert made["second"][1] is True and made["first"][1] is False  # one created, one opened
    assert FeatureDatabase.open(path).generation == 0
    assert [p.name for p in tmp_path.iterdir()] == ["db"]  # no staging folder left


def test_a_failed_build_discards_its_new_database_only_if_nobody_committed(
    tmp_path: Path,
) -> None:
    made, created = FeatureDatabase.create_or_open(
        tmp_path / "db", fingerprint=BackboneFingerprint("m"), dim=DIM
    )
    assert created
    other = FeatureDatabase.open(tmp_path / "db")  # a second writer joined the new database
    other.add(np.ones((1, DIM)), ["a"], sources=["x"])
    assert made.discard_if_empty() is False and len(FeatureDatabase.open(tmp_path / "db")) == 1
    lone, _ = FeatureDatabase.create_or_open(
        tmp_path / "lone", fingerprint=BackboneFingerprint("m"), dim=DIM
    )
    assert lone.discard_if_empty() is True and not (tmp_path / "lone").exists()
    with pytest.raises(DatabaseError, match="no longer exists"):
        lone.add(np.ones((1, DIM)), ["a"], sources=["x"])


# -- a disk that fills up --------------------------------------------------------------------


class FullDisk:
    """Every file retclip writes through :func:`retclip.files.atomic_writer` (shards, meta.json,
    outputs) and every FAISS index file shares a budget of ``budget`` bytes; the write that
    passes it fails with ENOSPC, as on a full disk."""

    def __init__(self, budget: int) -> None:
        self.budget = budget

    def take(self, n: int) -> None:
        if n > self.budget:
            self.budget = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.budget -= n

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        disk = self
        real_fdopen = os.fdopen

        class Handle:
            def __init__(self, raw: Any) -> None:
                self.raw = raw

            def write(self, data: bytes) -> int:
                disk.take(len(data))
                return int(self.raw.write(data))

            def __getattr__(self, name: str) -> Any:
                return getattr(self.raw, name)

            def __enter__(self) -> Handle:
                return self

            def __exit__(self, *exc: object) -> None:
                self.raw.close()

        def fdopen(fd: int, *args: Any, **kwargs: Any) -> Any:
            return Handle(real_fdopen(fd, *args, **kwargs))

        real_write_index = faiss.write_index

        def write_index(index: Any, name: str) -> None:
            real_write_index(index, name)
            try:
                disk.take(os.path.getsize(name))
            except OSError:
                raise RuntimeError(
                    f"Error in faiss::write_index: write error in {name} (No space left on device)"
                ) from None

        monkeypatch.setattr(retclip.files.os, "fdopen", fdopen)
        monkeypatch.setattr(faiss, "write_index", write_index)


def _snapshot(path: Path) -> tuple[int, int, bytes]:
    db = FeatureDatabase.open(path, verify=True)
    return db.generation, len(db), db.features().tobytes()


def test_a_disk_that_fills_at_any_byte_of_a_commit_leaves_a_committed_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The budget runs out at ~30 points spread over the bytes one add + index rebuild writes:
    each attempt either commits or fails with a DatabaseError, and the database stays intact."""
    path = tmp_path / "db"
    db = FeatureDatabase.create(path, fingerprint=BackboneFingerprint("m"), dim=DIM)
    rng = np.random.default_rng(0)
    db.add(rng.standard_normal((30, DIM)), [f"c{i % 4}" for i in range(30)], sources=["a"] * 30)
    before = _snapshot(path)
    measure = FullDisk(10**12)
    with monkeypatch.context() as patch:
        measure.install(patch)
        trial = tmp_path / "trial"
        import shutil

        shutil.copytree(path, trial)
        probe = FeatureDatabase.open(trial)
        probe.add(rng.standard_normal((8, DIM)), ["c9"] * 8, sources=["b"] * 8)
        probe.set_index(IndexSpec.parse("hnsw:hnsw_m=8"))
    needed = 10**12 - measure.budget
    outcomes: dict[str, int] = {"committed": 0, "refused": 0}
    # an HNSW file's size varies a little with the data: the last budget leaves room to spare
    budgets = {*range(0, needed + 1, max(1, needed // 30)), needed - 1, 2 * needed}
    for budget in sorted(budgets):
        with monkeypatch.context() as patch:
            FullDisk(budget).install(patch)
            db = FeatureDatabase.open(path)
            try:
                db.add(rng.standard_normal((8, DIM)), ["c9"] * 8, sources=["b"] * 8)
                db.set_index(IndexSpec.parse("hnsw:hnsw_m=8"))
                outcomes["committed"] += 1
            except DatabaseError as error:
                assert "No space left on device" in str(error), str(error)
                outcomes["refused"] += 1
        after = _snapshot(path)
        assert after[:2] in {before[:2], (before[0] + 1, before[1] + 8)}, budget
        assert after[2][: len(before[2])] == before[2]
        if after[1] != before[1]:  # the add committed; undo it for the next budget
            FeatureDatabase.open(path).remove(sources=["b"])
            before = _snapshot(path)
        assert not [p for p in path.rglob("*") if ".tmp-" in p.name]
    assert outcomes["refused"] >= 25 and outcomes["committed"] >= 1


def run(*args: object, **kwargs: Any) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False, **kwargs)


def assert_error(result: Result, *words: str) -> None:
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.output
    for word in words:
        assert word in errors[0], errors[0]
    assert "Traceback" not in result.output


@pytest.fixture(scope="module")
def built_db(scenes: dict[str, tuple[Path, Path]], tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("faults") / "db"
    json_path, images = scenes["db"]
    result = run(
        "db", "build", path, "--coco-panoptic", json_path, "--images", images, "--backbone", "color"
    )
    assert result.exit_code == 0, result.output
    return path


def test_full_disk_on_the_command_line(
    scenes: dict[str, tuple[Path, Path]],
    built_db: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import shutil

    path = tmp_path / "db"
    shutil.copytree(built_db, path)
    before = _snapshot(path)
    json_path, images = scenes["val"]
    with monkeypatch.context() as patch:
        FullDisk(0).install(patch)
        add = run(
            "db",
            "add",
            path,
            "--coco-panoptic",
            json_path,
            "--images",
            images,
            "--backbone",
            "color",
        )
        assert_error(add, "No space left on device", str(path))
        assert_error(run("db", "index", path, "hnsw"), "No space left on device")
    assert _snapshot(path) == before
    # a read that would save a rebuilt index goes on without saving it
    FeatureDatabase.open(path)._record_spec(IndexSpec.parse("hnsw:hnsw_m=8"))
    first = sorted(images.iterdir())[0]
    args = ["segment", first, "--classes", "apple, sky", "--backbone", "color", "--proposer"]
    args += ["gt", "--gt", json_path, "--db", path, "--out", tmp_path / "out"]
    with monkeypatch.context() as patch, pytest.warns(UserWarning, match="could not save"):
        FullDisk(0).install(patch)
        patch.setattr(os, "access", lambda *a, **k: True)  # writable, but full
        segmented = run(*args)
    # the outputs themselves cannot be written either: one error line naming the disk
    assert_error(segmented, "No space left on device")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# -- bad inputs on the command line -----------------------------------------------------------


def _files(tmp_path: Path) -> dict[str, Path]:
    """Small bad files, each wrong in one way."""
    made = {
        "empty_vocab": ("vocab.txt", ""),
        "bom_labels": ("labels.csv", "\ufeffimage,labels\nmissing.png,cat\n"),
        "no_column": ("cols.csv", "picture,tags\na.png,cat\n"),
        "bad_json": ("labels.json", "{not json"),
        "not_image": ("notes.png", "not an image"),
        "meta_garbage": ("broken_db/meta.json", "{]"),
    }
    out = {}
    for key, (name, text) in made.items():
        target = tmp_path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
        out[key] = target
    return out


def _bad_commands(scenes: dict[str, tuple[Path, Path]], db: Path, tmp: Path) -> Iterator[Any]:
    """(command line, words the error must name) for each bad input."""
    json_path, images = scenes["val"]
    first = sorted(images.iterdir())[0]
    files = _files(tmp)
    seg = ["segment", first, "--backbone", "color", "--proposer", "gt", "--gt", json_path]
    seg_db = [*seg, "--db", db, "--out", tmp / "out"]
    build = ["db", "build", tmp / "new", "--backbone", "color", "--images", images]
    yield [*seg_db, "--classes", "a", "-k", "0"], ["k"]
    yield [*seg_db, "--classes", "a", "--alpha", "nan"], ["alpha"]
    yield [*seg_db, "--classes", "a", "--beta", "-inf"], ["beta"]
    yield [*seg_db, "--classes", "a", "--resolution", "0"], ["resolution"]
    yield [*seg_db, "--vocab", tmp / "nope.txt"], ["nope.txt"]
    yield [*seg_db, "--vocab", files["empty_vocab"]], ["vocab.txt"]
    yield [*seg, "--db", tmp / "no_db", "--classes", "a", "--out", tmp / "out"], ["no_db"]
    yield (
        [*seg, "--db", files["meta_garbage"].parent, "--classes", "a", "--out", tmp / "out"],
        ["meta.json"],
    )
    yield [*seg, "--db", first, "--classes", "a", "--out", tmp / "out"], [first.name]
    plain = ["--classes", "a", "--backbone", "color", "--proposer", "regions", "--out", tmp / "out"]
    yield ["segment", files["not_image"], *plain], ["notes.png"]
    yield ["segment", tmp / "missing.png", *plain], ["missing"]
    yield [*seg_db, "--classes", "a", "--backbone", "nosuch"], ["nosuch"]
    yield [*build, "--labels", files["bom_labels"], "--proposer", "owl-sam"], ["missing.png"]
    yield [*build, "--labels", files["no_column"], "--proposer", "owl-sam"], ["image", "labels"]
    yield [*build, "--labels", files["bad_json"], "--proposer", "owl-sam"], ["labels.json"]
    yield [*build, "--coco-panoptic", json_path, "--batch-size", "0"], ["batch-size"]
    yield [*build, "--coco-panoptic", json_path, "--limit", "0"], ["limit"]
    yield [*build, "--coco-panoptic", tmp / "none.json"], ["none.json"]
    yield [*build, "--coco-panoptic", json_path, "--index", "ivf-pq:pq_m=7"], ["pq_m"]
    yield (
        ["db", "build", tmp / "x", "--coco-panoptic", json_path, "--backbone", "color"],
        ["images"],
    )
    yield ["db", "index", db, "ivf-pq:pq_m=7"], ["pq_m"]
    yield ["db", "index", db, "nosuch"], ["nosuch"]
    yield ["db", "remove", db, "--class", "unicorn"], ["unicorn"]
    yield ["db", "remove", db], ["nothing to remove"]
    yield ["db", "info", tmp / "absent"], ["absent"]
    yield ["db", "merge", tmp / "m", db, files["meta_garbage"].parent], ["meta.json"]


def test_bad_inputs_are_one_error_line_and_write_nothing(
    scenes: dict[str, tuple[Path, Path]], built_db: Path, tmp_path: Path
) -> None:
    """Each bad input (26 of them): exit 1, one ``Error:`` line naming the culprit, no
    traceback, no output folder, no new database, and the database used is unchanged."""
    before = _snapshot(built_db)
    tried = 0
    for args, words in _bad_commands(scenes, built_db, tmp_path):
        result = run(*args)
        assert_error(result, *words)
        assert not (tmp_path / "out").exists(), args
        assert not (tmp_path / "new").exists() and not (tmp_path / "m").exists(), args
        tried += 1
    assert tried == 26
    assert _snapshot(built_db) == before
    assert json.loads((built_db / "meta.json").read_text())["rows"] == before[1]
