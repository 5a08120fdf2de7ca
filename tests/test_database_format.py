"""Directory format 2 of the feature database: completed sources beside each shard (so a commit's
cost does not grow with the database), and the migration of format-1 databases.

``tests/fixtures/db_v1`` was written by the format-1 code (``tests/fixtures/make_db_v1.py``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from retclip.backbones.base import BackboneFingerprint
from retclip.database import FORMAT_VERSION, DatabaseLabel, FeatureDatabase
from retclip.errors import DatabaseError

V1 = Path(__file__).resolve().parent / "fixtures" / "db_v1"
SRC = Path(__file__).resolve().parents[1] / "src"
FP = BackboneFingerprint("test/clip", revision="r1", dense_mode="maskclip", input_resolution=224)
#: What the fixture holds, by build id.
COMPLETED = {"run1": {"a", "b", "c", "empty.jpg"}, "run2": {"d", "e", "z.jpg"}, "": {"f"}}


def v1_copy(tmp_path: Path, name: str = "db") -> Path:
    path = tmp_path / name
    shutil.copytree(V1, path)
    return path


def files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def version(path: Path) -> int:
    return int(json.loads((path / "meta.json").read_text())["format_version"])


def assert_fixture_rows(db: FeatureDatabase, reference: FeatureDatabase) -> None:
    """``db`` starts with every row of the fixture (``reference``), and keeps its completed
    sources."""
    n = len(reference)
    np.testing.assert_array_equal(db.features()[:n], reference.features())
    for key, values in reference.provenance().items():
        np.testing.assert_array_equal(db.provenance()[key][:n], values, err_msg=key)
    names = lambda d: [d.labels[i].name for i in d.label_ids()]  # noqa: E731
    assert names(db)[:n] == names(reference)
    for build_id, done in COMPLETED.items():
        assert done <= db.completed_sources(build_id), build_id


def test_the_fixture_is_format_1() -> None:
    meta = json.loads((V1 / "meta.json").read_text())
    assert meta["format_version"] == 1 and FORMAT_VERSION == 2
    assert all("completed_sources" in shard for shard in meta["shards"])
    assert not list(V1.rglob("*.completed.json"))


def test_a_format_1_database_reads_as_before_and_upgrades_on_its_first_write(
    tmp_path: Path,
) -> None:
    path = v1_copy(tmp_path)
    before = files(path)
    old = FeatureDatabase.open(path)  # verify=True: every shard's checksum
    assert old.info()["format_version"] == 1 and len(old) == 12
    assert old.provenance()["sources"].tolist() == list("aabbccddeeff")
    assert old.labels == [
        DatabaseLabel("cat", ("cat", "kitty")),
        DatabaseLabel("dog", ("dog",)),
        DatabaseLabel("car", ("car",)),
    ]
    assert old.rows_per_class() == {"cat": 5, "dog": 4, "car": 3}
    assert {b: old.completed_sources(b) for b in COMPLETED} == COMPLETED
    assert old.info()["completed_sources"] == 8
    sims, ids = old.search(old.features()[:2], 3)
    assert ids[:, 0].tolist() == [0, 1] and np.allclose(sims[:, 0], 1, atol=1e-3)
    assert files(path) == before  # reading (and an exact search) wrote nothing

    db = FeatureDatabase.open(path)
    # "d" was completed by run2 already (skipped); "g" is new
    added = db.add(np.ones((3, 16)), ["dog", "car", "car"], sources=["d", "g", "g"],
                   build_id="run2", completed_sources=["h.jpg"])  # fmt: skip
    assert added == 2 and version(path) == 2
    meta = json.loads((path / "meta.json").read_text())
    assert "completed_sources" not in json.dumps(meta)
    assert [s["completed"]["file"] for s in meta["shards"]] == [
        f"00000{i}.completed.json" for i in range(1, 6)
    ]
    for name in ("000001.npz", "000002.npz", "000003.npz", "000004.npz"):  # shards untouched
        assert (path / "shards" / name).read_bytes() == before[f"shards/{name}"]
    again = FeatureDatabase.open(path)
    assert again.info()["format_version"] == 2 and len(again) == 14
    assert_fixture_rows(again, old)
    assert again.completed_sources("run2") == COMPLETED["run2"] | {"g", "h.jpg"}
    assert again.provenance()["sources"].tolist()[12:] == ["g", "g"]
    assert again.rows_per_class() == {"cat": 5, "dog": 4, "car": 5}
    # the snapshot opened before the upgrade still reads (its shards are all still there)
    assert {b: old.completed_sources(b) for b in COMPLETED} == COMPLETED


def test_remove_and_merge_keep_the_completed_sources_of_format_1_and_2(tmp_path: Path) -> None:
    v1 = FeatureDatabase.open(v1_copy(tmp_path, "v1"))
    reference = FeatureDatabase.open(v1_copy(tmp_path, "reference"))
    v2 = FeatureDatabase.create(tmp_path / "v2", fingerprint=FP, dim=16, pooling="soft")
    v2.add(np.eye(16)[:2], ["cat", "horse"], sources=["x", "y"], build_id="run3",
           completed_sources=["x", "y", "w.jpg"])  # fmt: skip
    merged = FeatureDatabase.merge(tmp_path / "merged", [v1, v2])
    assert merged.info()["format_version"] == 2 and len(merged) == 14
    assert_fixture_rows(merged, reference)
    assert merged.completed_sources("run3") == {"x", "y", "w.jpg"}
    assert version(v1.path) == 1  # merging only reads its inputs

    removed = v1.remove(classes=["car"], sources=["e"])  # upgrade, then the compaction
    assert removed == 4 and version(v1.path) == 2 and len(v1) == 8
    again = FeatureDatabase.open(v1.path)
    assert again.completed_sources("run1") == COMPLETED["run1"]
    assert again.completed_sources("run2") == {"d", "z.jpg"}  # "e" is forgotten with its rows
    assert again.completed_sources("") == {"f"}
    assert sorted(p.name for p in (v1.path / "shards").iterdir()) == [
        "000005.completed.json",
        "000005.npz",
    ]


def test_a_newer_format_is_refused_with_the_path_and_the_versions(tmp_path: Path) -> None:
    path = v1_copy(tmp_path)
    meta = json.loads((path / "meta.json").read_text())
    meta["format_version"] = 3
    (path / "meta.json").write_text(json.dumps(meta))
    message = (
        f"feature database {path} has format_version 3; this retclip reads format versions "
        "1 to 2: upgrade retclip to open it"
    )
    with pytest.raises(DatabaseError) as error:
        FeatureDatabase.open(path)
    assert str(error.value) == message


def test_meta_json_does_not_grow_with_the_completed_sources(tmp_path: Path) -> None:
    """Format 2's point: meta.json (rewritten by every commit) is the same size whether the
    commits completed 2 sources or 4000 (format 1: 55 bytes more a source)."""
    sizes = []
    for n in (1, 2000):
        db = FeatureDatabase.create(tmp_path / f"db{n}", fingerprint=FP, dim=16)
        for commit in range(2):
            done = [f"/images/{commit}-{i:06d}.jpg" for i in range(n)]
            db.add(np.eye(16)[:1], ["cat"], sources=done[:1], build_id="b", completed_sources=done)
        assert len(db.completed_sources("b")) == 2 * n
        sizes.append((db.path / "meta.json").stat().st_size)
    assert abs(sizes[1] - sizes[0]) < 50, sizes  # digits of the sidecars' bytes and counts


def test_a_writer_sees_the_sources_other_writers_completed_or_forgot(tmp_path: Path) -> None:
    """A writer reads only the shards committed since its last read (its cache of completed
    sources): an append by another writer is seen, and so is a compaction that forgot one."""
    path = v1_copy(tmp_path)
    mine, other = FeatureDatabase.open(path), FeatureDatabase.open(path)
    assert mine.completed_sources("run1") == COMPLETED["run1"]  # cached, format 1 snapshot
    assert other.add(np.eye(16)[:1], ["cat"], sources=["q"], build_id="run1") == 1
    assert mine.add(np.eye(16)[:2], ["cat", "cat"], sources=["q", "r"], build_id="run1") == 1
    assert other.remove(sources=["a"]) == 2  # compaction: one shard, "a" forgotten
    assert mine.add(np.eye(16)[:1], ["cat"], sources=["a"], build_id="run1") == 1
    assert mine.add(np.eye(16)[:1], ["cat"], sources=["b"], build_id="run1") == 0
    again = FeatureDatabase.open(path)
    assert again.completed_sources("run1") == COMPLETED["run1"] | {"q", "r"}
    assert again.provenance()["sources"].tolist().count("a") == 1


# Upgrades copies of the fixture and adds a row to each, one forked process per copy, the one of
# copy k dying (SIGKILL) at the k-th rename of a finished file into place: each sidecar of the
# upgrade, its meta.json, then the add's shard, sidecar and meta.json. Prints each exit status.
KILLED_UPGRADES = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    from retclip.database import FeatureDatabase

    root, copies = sys.argv[1], int(sys.argv[2])
    real_replace = os.replace
    for kill_at in range(1, copies + 1):
        pid = os.fork()
        if pid == 0:
            calls = [0]

            def dying_replace(src, dst):
                calls[0] += 1
                if calls[0] == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                real_replace(src, dst)

            os.replace = dying_replace
            db = FeatureDatabase.open(os.path.join(root, f"db{kill_at}"))
            db.add(np.ones((1, 16)), ["cat"], sources=["g"], build_id="run2")
            os._exit(0)
        print(os.waitpid(pid, 0)[1], flush=True)
    """
)


def test_a_crash_at_any_step_of_the_upgrade_leaves_format_1_or_format_2(tmp_path: Path) -> None:
    reference = FeatureDatabase.open(v1_copy(tmp_path, "reference"))
    copies = 10
    for kill_at in range(1, copies + 1):
        shutil.copytree(V1, tmp_path / f"db{kill_at}")
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    child = subprocess.run([sys.executable, "-c", KILLED_UPGRADES, str(tmp_path), str(copies)],
                           env=env, capture_output=True, text=True)  # fmt: skip
    assert child.returncode == 0, child.stderr[-3000:]
    statuses = [int(line) for line in child.stdout.split()]
    # 4 sidecars + meta.json, then shard, sidecar, meta.json: killed at the first 8, then done
    assert statuses == [signal.SIGKILL] * 8 + [0, 0], statuses
    seen = []
    for kill_at in range(1, copies + 1):
        path = tmp_path / f"db{kill_at}"
        db = FeatureDatabase.open(path)  # verify=True
        state = (version(path), len(db))
        seen.append(state)
        assert state in {(1, 12), (2, 12), (2, 13)}, (kill_at, state)
        if state[0] == 1:
            assert (path / "meta.json").read_bytes() == (V1 / "meta.json").read_bytes()
        assert_fixture_rows(db, reference)
        # the next write finishes the job and leaves no leftovers
        db.add(np.ones((1, 16)), ["cat"], sources=["g"], build_id="run2")
        final = FeatureDatabase.open(path)
        assert version(path) == 2 and len(final) == 13
        assert final.completed_sources("run2") == COMPLETED["run2"] | {"g"}
        meta = json.loads((path / "meta.json").read_text())
        listed = {s["file"] for s in meta["shards"]} | {
            s["completed"]["file"] for s in meta["shards"]
        }
        assert {p.name for p in (path / "shards").iterdir()} == listed, kill_at
    assert seen == [(1, 12)] * 5 + [(2, 12)] * 3 + [(2, 13)] * 2, seen


def test_a_format_1_database_reads_on_a_read_only_file_system(tmp_path: Path) -> None:
    """Opened, searched and read where nothing can be written (a read-only bind mount; skipped
    where mounting is not permitted); a write fails with one DatabaseError."""
    source = v1_copy(tmp_path, "source")
    target = tmp_path / "ro"
    target.mkdir()
    mount = subprocess.run(["mount", "--bind", str(source), str(target)], capture_output=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {mount.stderr.decode().strip()}")
    try:
        remount = ["mount", "-o", "remount,ro,bind", str(target)]
        assert subprocess.run(remount, capture_output=True).returncode == 0
        assert not os.access(target, os.W_OK)
        db = FeatureDatabase.open(target)
        assert len(db) == 12 and db.info()["format_version"] == 1
        assert {b: db.completed_sources(b) for b in COMPLETED} == COMPLETED
        assert db.search(db.features()[:1], 2)[1][0, 0] == 0
        with pytest.raises(DatabaseError, match=f"cannot write to feature database {target}"):
            db.add(np.ones((1, 16)), ["cat"], sources=["g"], build_id="run2")
    finally:
        subprocess.run(["umount", str(target)], check=True)
    assert files(source) == files(V1)
