"""The on-disk feature database: round trips, search, editing, merging, corruption and crashes."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

from retclip.backbones.base import BackboneFingerprint
from retclip.database import DatabaseLabel, FeatureDatabase, IndexSpec
from retclip.errors import DatabaseError, DatabaseMismatchError, InputError

DIM = 16
FP = BackboneFingerprint("test/clip", revision="r1", dense_mode="maskclip", input_resolution=224)
SRC = Path(__file__).resolve().parents[1] / "src"


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def rows(n: int, seed: int, dim: int = DIM) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def make_db(path: Path, **kwargs: object) -> tuple[FeatureDatabase, np.ndarray]:
    """A database with two commits: 6 rows (cat/dog, images a-c) then 4 rows (dog/car, d-e)."""
    db = FeatureDatabase.create(path, fingerprint=FP, dim=DIM, **kwargs)  # type: ignore[arg-type]
    first, second = rows(6, 1), rows(4, 2)
    db.add(
        first,
        ["cat", "dog", "cat", "dog", "cat", "cat"],
        sources=["a", "a", "b", "b", "c", "c"],
        boxes=np.arange(24, dtype=np.float32).reshape(6, 4),
        mask_areas=np.arange(6) * 10,
        scores=np.linspace(0.5, 1, 6),
        build_id="run1",
        synonyms={"cat": ["cat", "kitty"]},
        completed_sources=["a", "b", "c", "empty.jpg"],
    )
    db.add(
        second,
        ["dog", "car", "car", "dog"],
        sources=["d", "d", "e", "e"],
        build_id="run2",
        synonyms={"dog": ["puppy"], "car": ["automobile"]},
    )
    return db, unit(np.concatenate([first, second]))


def exact(features: np.ndarray, queries: np.ndarray, k: int, allowed: np.ndarray) -> np.ndarray:
    """Brute-force top-k similarities, ``-inf`` padded (rows outside ``allowed`` excluded)."""
    sims = unit(queries) @ features.T
    sims[:, ~allowed] = -np.inf
    top = -np.sort(-sims, axis=1)[:, :k]
    return np.pad(top, ((0, 0), (0, max(0, k - top.shape[1]))), constant_values=-np.inf)


def test_round_trip(tmp_path: Path) -> None:
    db, expected = make_db(tmp_path / "db")
    assert len(db) == db.num_rows == 10 and db.generation == 2 and db.dtype == "float16"
    again = FeatureDatabase.open(tmp_path / "db")
    assert again.fingerprint == FP and again.dim == DIM and again.generation == 2
    np.testing.assert_allclose(again.features(), expected, atol=2e-3)
    assert again.features().dtype == np.float32 and again.features().shape == (10, DIM)
    assert again.labels == [
        DatabaseLabel("cat", ("cat", "kitty")),
        DatabaseLabel("dog", ("dog", "puppy")),
        DatabaseLabel("car", ("automobile",)),
    ]
    np.testing.assert_array_equal(again.label_ids(), [0, 1, 0, 1, 0, 0, 1, 2, 2, 1])
    assert again.label_ids().dtype == np.int32
    assert again.rows_per_class() == {"cat": 4, "dog": 4, "car": 2}
    prov = again.provenance()
    assert prov["sources"].tolist() == list("aabbccddee")
    np.testing.assert_array_equal(prov["boxes"][:6], np.arange(24).reshape(6, 4))
    assert np.isnan(prov["boxes"][6:]).all() and np.isnan(prov["scores"][6:]).all()
    np.testing.assert_array_equal(prov["mask_areas"], [0, 10, 20, 30, 40, 50, -1, -1, -1, -1])
    np.testing.assert_allclose(prov["scores"][:6], np.linspace(0.5, 1, 6))
    assert prov["build_ids"].tolist() == ["run1"] * 6 + ["run2"] * 4
    info = again.info()
    for key in ("rows", "rows_per_class", "dim", "fingerprint", "dtype", "metric", "index"):
        assert key in info
    assert info["format_version"] == 2 and info["shards"] == 2 and info["path"] == str(db.path)
    assert info["completed_sources"] == 6
    assert info["fingerprint"] == FP.to_dict() and info["build_ids"] == ["run1", "run2"]
    assert info["metric"] == "inner_product" and info["index"]["type"] == "auto"
    meta = json.loads((tmp_path / "db" / "meta.json").read_text())
    assert meta["rows"] == 10 and [s["file"] for s in meta["shards"]] == [
        "000001.npz",
        "000002.npz",
    ]


def test_float32_is_exact(tmp_path: Path) -> None:
    _, expected = make_db(tmp_path / "db", dtype="float32")
    np.testing.assert_array_equal(FeatureDatabase.open(tmp_path / "db").features(), expected)


def test_add_validates_input(tmp_path: Path) -> None:
    db = FeatureDatabase.create(tmp_path / "db", fingerprint=FP, dim=DIM)
    with pytest.raises(InputError, match=r"shape \(2, 8\); expected \[n, 16\]"):
        db.add(rows(2, 0, dim=8), ["a", "b"], sources=["x", "y"])
    bad = rows(2, 0)
    bad[1, 3] = np.nan
    with pytest.raises(InputError, match="NaN"):
        db.add(bad, ["a", "b"], sources=["x", "y"])
    with pytest.raises(InputError, match="labels has 1 entries; expected 2"):
        db.add(rows(2, 0), ["a"], sources=["x", "y"])
    with pytest.raises(InputError, match="all zeros"):
        db.add(np.zeros((1, DIM)), ["a"], sources=["x"])
    with pytest.raises(InputError, match="nothing to add"):
        db.add(np.zeros((0, DIM)), [], sources=[])
    with pytest.raises(InputError, match="boxes"):
        db.add(rows(2, 0), ["a", "b"], sources=["x", "y"], boxes=np.zeros((2, 3)))
    with pytest.raises(InputError, match="dtype 'float64'"):
        FeatureDatabase.create(tmp_path / "db2", fingerprint=FP, dim=DIM, dtype="float64")
    assert len(FeatureDatabase.open(tmp_path / "db")) == 0


@pytest.mark.parametrize("k", [3, 25])
def test_flat_search_is_exact(tmp_path: Path, k: int) -> None:
    db, features = make_db(tmp_path / "db", dtype="float32")
    queries = rows(5, 9)
    everything = np.ones(10, dtype=bool)
    sims, ids = db.search(queries, k)
    assert sims.shape == (5, min(k, 10))  # more neighbours than rows are not searched for
    reference = exact(features, queries, k, everything)[:, : min(k, 10)]
    np.testing.assert_allclose(sims, reference, atol=1e-5)
    valid = ids >= 0
    assert valid.all()
    # The returned ids are the rows with those similarities.
    np.testing.assert_allclose(
        np.einsum("qd,qkd->qk", unit(queries), features[np.where(valid, ids, 0)])[valid],
        sims[valid],
        atol=1e-5,
    )
    # Restricted to car (label 2) and cat (label 0) rows.
    allowed = np.isin(db.label_ids(), [0, 2])
    sims, ids = db.search(queries, k, allowed_labels=np.array([0, 2]))
    reference = exact(features, queries, k, allowed)[:, : min(k, 10)]
    np.testing.assert_allclose(sims, reference, atol=1e-5)  # -inf pads up to the rows
    assert allowed[ids[ids >= 0]].all() and (ids >= 0).sum() == 5 * min(k, 6)
    sims, ids = db.search(queries, k, allowed_labels=np.array([], dtype=np.int64))
    assert (ids == -1).all() and np.isneginf(sims).all()
    with pytest.raises(InputError, match=r"allowed_labels must lie in \[0, 3\)"):
        db.search(queries, k, allowed_labels=[7])


def test_search_empty_database(tmp_path: Path) -> None:
    db = FeatureDatabase.create(tmp_path / "db", fingerprint=FP, dim=DIM)
    sims, ids = db.search(rows(2, 0), 4)
    assert ids.shape == sims.shape == (2, 0)  # k is clamped to the rows: none
    with pytest.raises(InputError, match=r"queries have shape \(2, 8\)"):
        db.search(rows(2, 0, dim=8), 4)


def test_index_is_persisted_and_reused(tmp_path: Path) -> None:
    db, _ = make_db(tmp_path / "db")
    spec = IndexSpec(type="hnsw", hnsw_m=8, ef_construction=32)
    db.set_index(spec)
    record = json.loads((tmp_path / "db" / "meta.json").read_text())["index_file"]
    assert record["generation"] == db.generation and (tmp_path / "db" / "index.faiss").is_file()
    result = db.search(rows(3, 5), 4)
    again = FeatureDatabase.open(tmp_path / "db")
    assert again.index_spec == spec and again.info()["index"]["persisted"]
    np.testing.assert_array_equal(again.search(rows(3, 5), 4)[1], result[1])
    # A commit makes the index stale: the next search rebuilds it over the new rows.
    again.add(rows(1, 3), ["cow"], sources=["f"])
    sims, ids = again.search(unit(rows(1, 3)), 1)
    assert ids[0, 0] == 10 and sims[0, 0] == pytest.approx(1, abs=2e-3)
    meta = json.loads((tmp_path / "db" / "meta.json").read_text())
    assert meta["index_file"]["generation"] == 3 and meta["index_file"]["rows"] == 11


def test_corrupt_index_file_is_rebuilt(tmp_path: Path) -> None:
    db, _ = make_db(tmp_path / "db")
    db.set_index(IndexSpec(type="hnsw", hnsw_m=4, ef_construction=16))
    expected = db.search(rows(3, 5), 4)
    index_file = tmp_path / "db" / "index.faiss"
    data = bytearray(index_file.read_bytes())
    data[-20:] = bytes(20)
    index_file.write_bytes(bytes(data))
    again = FeatureDatabase.open(tmp_path / "db")
    with pytest.warns(UserWarning, match="does not match its sha256"):
        result = again.search(rows(3, 5), 4)
    np.testing.assert_array_equal(result[1], expected[1])
    assert index_file.read_bytes() != bytes(data)  # rewritten
    record = json.loads((tmp_path / "db" / "meta.json").read_text())["index_file"]
    assert record["sha256"] == hashlib.sha256(index_file.read_bytes()).hexdigest()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # intact again: loaded without a warning
        FeatureDatabase.open(tmp_path / "db").search(rows(1, 1), 1)


def test_remove_classes(tmp_path: Path) -> None:
    db, features = make_db(tmp_path / "db", dtype="float32")
    assert db.remove_classes(["dog"]) == 4
    again = FeatureDatabase.open(tmp_path / "db")
    assert [label.name for label in again.labels] == ["cat", "car"]
    np.testing.assert_array_equal(again.label_ids(), [0, 0, 0, 0, 1, 1])
    np.testing.assert_array_equal(again.features(), features[[0, 2, 4, 5, 7, 8]])
    assert again.provenance()["sources"].tolist() == ["a", "b", "c", "c", "d", "e"]
    assert again.rows_per_class() == {"cat": 4, "car": 2} and again.info()["shards"] == 1
    shards = sorted(p.name for p in (tmp_path / "db" / "shards").iterdir())
    assert shards == ["000003.completed.json", "000003.npz"]
    assert again.completed_sources("run1") == {"a", "b", "c", "empty.jpg"}
    assert again.completed_sources("run2") == {"d", "e"}
    with pytest.raises(InputError, match=r"unknown class\(es\) 'horse'.*known labels: cat, car"):
        again.remove_classes(["horse", "cat"])
    assert len(FeatureDatabase.open(tmp_path / "db")) == 6


def test_remove_sources(tmp_path: Path) -> None:
    db, features = make_db(tmp_path / "db", dtype="float32")
    assert db.remove_sources(["d", "e", "nowhere"]) == 4
    assert [label.name for label in db.labels] == ["cat", "dog"]  # car had rows only in d, e
    np.testing.assert_array_equal(db.features(), features[:6])
    assert db.completed_sources("run2") == set()
    assert db.remove_sources(["nowhere"]) == 0 and db.generation == 3
    assert db.remove_sources(["empty.jpg"]) == 0  # no rows, but forgotten as completed
    assert db.completed_sources("run1") == {"a", "b", "c"} and db.generation == 4


def test_completed_sources(tmp_path: Path) -> None:
    db, _ = make_db(tmp_path / "db")
    assert db.completed_sources("run1") == {"a", "b", "c", "empty.jpg"}
    assert db.completed_sources("run2") == {"d", "e"}  # sources of added rows count as done
    assert db.completed_sources("other") == set()
    assert db.add(np.zeros((0, DIM)), [], sources=[], build_id="run2", completed_sources=["z"]) == 0
    again = FeatureDatabase.open(tmp_path / "db")
    assert again.completed_sources("run2") == {"d", "e", "z"} and len(again) == 10


def test_merge(tmp_path: Path) -> None:
    first, features = make_db(tmp_path / "one", dtype="float32")
    second = FeatureDatabase.create(tmp_path / "two", fingerprint=FP, dim=DIM)
    extra = rows(3, 7)
    second.add(extra, ["car", "boat", "cat"], sources=["x", "y", "z"], build_id="run3")
    merged = FeatureDatabase.merge(tmp_path / "merged", [first, second])
    assert merged.dtype == "float32"  # the inputs differ
    assert [label.name for label in merged.labels] == ["cat", "dog", "car", "boat"]
    assert merged.labels[2].synonyms == ("automobile", "car")
    np.testing.assert_array_equal(merged.label_ids(), [0, 1, 0, 1, 0, 0, 1, 2, 2, 1, 2, 3, 0])
    np.testing.assert_allclose(merged.features()[:10], features)
    np.testing.assert_allclose(merged.features()[10:], unit(extra), atol=2e-3)
    assert merged.provenance()["sources"].tolist() == [*"aabbccddee", "x", "y", "z"]
    assert merged.rows_per_class() == {"cat": 5, "dog": 4, "car": 3, "boat": 1}
    assert merged.completed_sources("run1") == first.completed_sources("run1")
    assert merged.completed_sources("run3") == {"x", "y", "z"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "one", "two"]
    with pytest.raises(DatabaseError, match="not an empty directory"):
        FeatureDatabase.merge(tmp_path / "merged", [first])

    other = FeatureDatabase.create(
        tmp_path / "other", fingerprint=BackboneFingerprint("other/clip"), dim=DIM
    )
    with pytest.raises(DatabaseMismatchError, match="must share one backbone"):
        FeatureDatabase.merge(tmp_path / "bad", [first, other])
    assert not (tmp_path / "bad").exists()


def test_backbone_mismatch(tmp_path: Path) -> None:
    db, _ = make_db(tmp_path / "db")
    db.check_compatible(FP, DIM)
    other = BackboneFingerprint("other/clip", dense_mode="maskclip")
    with pytest.raises(DatabaseMismatchError) as error:
        db.check_compatible(other, 768)
    assert str(error.value) == (
        f"database {db.path} was built with backbone test/clip rev=r1 dense=maskclip res=224 "
        "(dim 16); the query backbone is other/clip dense=maskclip (dim 768): rebuild the "
        "database with this backbone or pick the matching one"
    )
    with pytest.raises(DatabaseMismatchError, match="dim 16"):
        FeatureDatabase.create(tmp_path / "db", fingerprint=FP, dim=32, exist_ok=True)
    with pytest.raises(DatabaseError, match="already exists"):
        FeatureDatabase.create(tmp_path / "db", fingerprint=FP, dim=DIM)
    reopened = FeatureDatabase.create(tmp_path / "db", fingerprint=FP, dim=DIM, exist_ok=True)
    assert len(reopened) == 10


def _shard(path: Path, number: int = 1) -> Path:
    return path / "shards" / f"{number:06d}.npz"


def test_missing_database(tmp_path: Path) -> None:
    with pytest.raises(DatabaseError, match=f"no feature database at {tmp_path / 'nope'}"):
        FeatureDatabase.open(tmp_path / "nope")


def test_corrupt_shard(tmp_path: Path) -> None:
    make_db(tmp_path / "db")
    shard = _shard(tmp_path / "db")
    data = bytearray(shard.read_bytes())
    data[300:310] = bytes(255 - b for b in data[300:310])  # flip bytes inside the features
    shard.write_bytes(bytes(data))
    with pytest.raises(DatabaseError, match=f"corrupt shard {shard}: sha256"):
        FeatureDatabase.open(tmp_path / "db")
    # Unverified opening still catches it when the data is read (zip CRC).
    with pytest.raises(DatabaseError, match=f"corrupt shard {shard}"):
        FeatureDatabase.open(tmp_path / "db", verify=False).features()


def test_truncated_shard(tmp_path: Path) -> None:
    make_db(tmp_path / "db")
    shard = _shard(tmp_path / "db", 2)
    shard.write_bytes(shard.read_bytes()[:-100])
    for verify in (True, False):
        with pytest.raises(DatabaseError, match=f"corrupt shard {shard}: .* bytes"):
            FeatureDatabase.open(tmp_path / "db", verify=verify)


def test_deleted_shard(tmp_path: Path) -> None:
    make_db(tmp_path / "db")
    _shard(tmp_path / "db", 2).unlink()
    with pytest.raises(DatabaseError, match=r"shard .*000002\.npz listed in meta\.json is missing"):
        FeatureDatabase.open(tmp_path / "db")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"format_version": 0}', "format_version 0; expected 1 or 2"),
        ('{"format_version": "2"}', "format_version '2'; expected 1 or 2"),
        ('{"format_version": 1, "dim": 16}', "missing or malformed 'fingerprint'"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_garbage_meta(tmp_path: Path, text: str, message: str) -> None:
    make_db(tmp_path / "db")
    (tmp_path / "db" / "meta.json").write_text(text)
    with pytest.raises(DatabaseError, match=f"corrupt feature database meta file .*: {message}"):
        FeatureDatabase.open(tmp_path / "db")


def test_orphan_shard_is_ignored_and_cleaned(tmp_path: Path) -> None:
    make_db(tmp_path / "db")
    orphan = _shard(tmp_path / "db", 3)
    orphan.write_bytes(_shard(tmp_path / "db", 2).read_bytes())  # committed shard, meta not
    temp = tmp_path / "db" / "shards" / ".000003.npz.tmp-123-abc"
    temp.write_bytes(b"half a shard")
    for name in ("000003.completed.json", "000009.completed.json"):  # written, never committed
        (tmp_path / "db" / "shards" / name).write_text('{"run1": ["q", "zz"]}')
    db = FeatureDatabase.open(tmp_path / "db")
    assert len(db) == 10 and db.features().shape == (10, DIM)
    assert db.completed_sources("run1") == {"a", "b", "c", "empty.jpg"}
    db.add(rows(1, 4), ["cat"], sources=["q"])
    assert not temp.exists()
    assert sorted(p.name for p in (tmp_path / "db" / "shards").iterdir()) == [
        f"00000{i}.{kind}" for i in (1, 2, 3) for kind in ("completed.json", "npz")
    ]
    again = FeatureDatabase.open(tmp_path / "db")
    assert len(again) == 11 and again.completed_sources("") == {"q"}
    assert again.completed_sources("run1") == {"a", "b", "c", "empty.jpg"}


CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    from retclip.database import FeatureDatabase

    path, target = sys.argv[1], sys.argv[2]
    real_replace = os.replace

    def dying_replace(src, dst):
        # Die like a power cut: after the temp file is complete, before it takes its name.
        if str(dst).endswith(target):
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst)

    os.replace = dying_replace
    db = FeatureDatabase.open(path)
    db.add(np.ones((3, db.dim)), ["cat", "ghost", "ghost"], sources=["k", "k", "k"])
    """
)


@pytest.mark.parametrize("target", ["000003.npz", "meta.json"])
def test_crash_during_commit_keeps_previous_state(tmp_path: Path, target: str) -> None:
    _, features = make_db(tmp_path / "db", dtype="float32")
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "db"), target], env=env, capture_output=True
    )
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()
    leftovers = [p.name for p in (tmp_path / "db").rglob("*") if ".tmp-" in p.name]
    assert leftovers  # the killed child left its temp file behind

    again = FeatureDatabase.open(tmp_path / "db")
    assert len(again) == 10 and again.generation == 2
    assert [label.name for label in again.labels] == ["cat", "dog", "car"]
    np.testing.assert_array_equal(again.features(), features)
    # Redoing the commit adds its rows exactly once and removes the crash's leftovers.
    again.add(np.ones((3, DIM)), ["cat", "ghost", "ghost"], sources=["k", "k", "k"])
    final = FeatureDatabase.open(tmp_path / "db")
    assert len(final) == 13 and final.rows_per_class()["ghost"] == 2
    assert not [p for p in (tmp_path / "db").rglob("*") if ".tmp-" in p.name]


def test_auto_index_is_exact_for_small_databases_and_writes_no_index_file(tmp_path) -> None:
    from retclip.database import IndexSpec

    db = FeatureDatabase.create(
        tmp_path / "db", fingerprint=BackboneFingerprint("m"), dim=8, index=IndexSpec.parse("auto")
    )
    rng = np.random.default_rng(0)
    db.add(rng.standard_normal((50, 8)).astype(np.float32), ["a"] * 50, sources=["s"] * 50)
    sims, rows = db.search(rng.standard_normal((2, 8)).astype(np.float32), 5)
    assert (rows >= 0).all() and np.all(np.diff(sims, axis=1) <= 1e-6)
    assert not (tmp_path / "db" / "index.faiss").exists()  # flat: rebuilt from the features
    assert FeatureDatabase.open(tmp_path / "db").info()["index"]["type"] == "auto"


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("dtype", "int8", "'dtype'"),
        ("dim", "16", "'dim'"),
        ("rows", 999, "shard row counts do not add up"),
        ("labels", [{"name": 3, "synonyms": []}], "'labels.0.name'"),
        ("generation", -1, "'generation'"),
    ],
)
def test_meta_fields_are_validated_against_the_declared_schema(
    tmp_path: Path, key: str, value: object, message: str
) -> None:
    make_db(tmp_path / "db")
    meta_path = tmp_path / "db" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta[key] = value
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DatabaseError, match=f"corrupt feature database meta file .*{message}"):
        FeatureDatabase.open(tmp_path / "db")


def test_a_shard_name_outside_the_shard_folder_is_refused(tmp_path: Path) -> None:
    make_db(tmp_path / "db")
    meta_path = tmp_path / "db" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["shards"][0]["file"] = "../../etc/passwd"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DatabaseError, match=r"'shards\.0\.file'"):
        FeatureDatabase.open(tmp_path / "db")


def test_removing_classes_and_sources_is_one_commit(tmp_path: Path) -> None:
    db, _ = make_db(tmp_path / "db")
    before = db.generation
    rows = len(db)
    sources = db.provenance()["sources"]
    labels = db.label_ids()
    name = db.labels[int(labels[0])].name
    other = next(s for s, label in zip(sources, labels, strict=True) if label != labels[0])
    expected = int(((labels == labels[0]) | (sources == other)).sum())
    removed = db.remove(classes=[name], sources=[other])
    assert removed == expected and len(db) == rows - removed
    assert db.generation == before + 1  # one commit, so a crash leaves all or nothing
    with pytest.raises(InputError, match="unknown class"):
        db.remove(classes=["no such class"], sources=[str(sources[0])])
    assert db.generation == before + 1  # the bad request changed nothing


def test_info_says_not_persisted_when_the_index_file_is_gone(tmp_path: Path) -> None:
    db, _ = make_db(tmp_path / "db")
    db.set_index(IndexSpec(type="hnsw", hnsw_m=8, ef_construction=32))
    assert FeatureDatabase.open(tmp_path / "db").info()["index"]["persisted"]
    (tmp_path / "db" / "index.faiss").unlink()
    reopened = FeatureDatabase.open(tmp_path / "db")
    assert not reopened.info()["index"]["persisted"]
    assert reopened.search(rows(1, 5), 2)[1].shape == (1, 2)  # rebuilt when needed


@pytest.mark.parametrize(
    "edit",
    [
        lambda meta: meta["labels"][0].update(name="renamed"),
        lambda meta: meta["rows_per_class"].update(cat=99),
        lambda meta: meta.update(dtype="float32" if meta["dtype"] == "float16" else "float16"),
    ],
)
def test_a_hand_edited_meta_json_is_reported_as_corruption(tmp_path: Path, edit) -> None:
    make_db(tmp_path / "db")
    meta_path = tmp_path / "db" / "meta.json"
    meta = json.loads(meta_path.read_text())
    edit(meta)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DatabaseError, match="does not match its checksum"):
        FeatureDatabase.open(tmp_path / "db")


def test_a_database_written_before_checksums_still_opens(tmp_path: Path) -> None:
    make_db(tmp_path / "db")
    meta_path = tmp_path / "db" / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["checksum"]
    meta_path.write_text(json.dumps(meta))
    db = FeatureDatabase.open(tmp_path / "db")
    db.add(rows(1, 7), ["cat"], sources=["z"])  # the next commit records a checksum
    assert "checksum" in json.loads(meta_path.read_text())


def test_check_writable_does_not_wait_for_another_writer(tmp_path: Path) -> None:
    """A build's up-front write check returns at once while another process holds the writer
    lock (a long index build may), and leaves no probe file behind."""
    make_db(tmp_path / "db")
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(
            """
            import sys, time, filelock
            with filelock.FileLock(sys.argv[1]):
                print("held", flush=True)
                time.sleep(60)
            """
        ), str(tmp_path / "db" / ".lock")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        done = subprocess.run(
            [sys.executable, "-c", "import sys; from retclip.database import FeatureDatabase; "
             "FeatureDatabase.open(sys.argv[1]).check_writable()", str(tmp_path / "db")],
            timeout=30, capture_output=True, text=True,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
    finally:
        holder.kill()
        holder.wait()
    assert not list((tmp_path / "db").glob(".write-probe*"))
