"""FAISS index building and searching: exactness of flat/IVF, recall of approximate indexes."""

from __future__ import annotations

import warnings
from pathlib import Path

import faiss
import numpy as np
import pytest

from retclip.database import index as index_module
from retclip.database.index import (
    IndexSpec,
    build_index,
    default_nlist,
    load_index,
    save_index,
    search_index,
)
from retclip.errors import DatabaseError, InputError


def clustered(n: int, *, dim: int = 32, clusters: int = 20, seed: int = 0) -> np.ndarray:
    """``[n, dim]`` unit vectors around ``clusters`` fixed centres (same centres for any seed)."""
    centres = np.random.default_rng(1234).standard_normal((clusters, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    x = centres[rng.integers(0, clusters, n)] + 0.35 * rng.standard_normal((n, dim)) / dim**0.5
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def exact_topk(
    x: np.ndarray, q: np.ndarray, k: int, allowed: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    sims = q @ x.T
    if allowed is not None:
        sims[:, ~allowed] = -np.inf
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(sims, order, axis=1)
    pad = k - order.shape[1]  # k > rows: pad like FAISS
    top = np.pad(top, ((0, 0), (0, pad)), constant_values=-np.inf)
    order = np.pad(order, ((0, 0), (0, pad)), constant_values=-1)
    return top, np.where(np.isfinite(top), order, -1)


def assert_exact_topk(
    x: np.ndarray,
    q: np.ndarray,
    result: tuple[np.ndarray, np.ndarray],
    allowed: np.ndarray | None = None,
) -> None:
    """``result`` is an exact top-k: same similarities as brute force (ids may differ on ties)."""
    sims, ids = result
    ref_sims, ref_ids = exact_topk(x, q, sims.shape[1], allowed)
    np.testing.assert_allclose(sims, ref_sims, atol=1e-5)
    valid = ids >= 0
    np.testing.assert_array_equal(valid, np.isfinite(ref_sims))
    true_sims = np.einsum("qd,qkd->qk", q, x[np.where(valid, ids, 0)])
    np.testing.assert_allclose(true_sims[valid], ref_sims[valid], atol=1e-5)
    if allowed is not None:
        assert allowed[ids[valid]].all()
    assert (np.mean(ids == ref_ids)) > 0.99


def recall_at(ids: np.ndarray, truth: np.ndarray) -> float:
    hits = (ids[:, :, None] == truth[:, None, :]).any(axis=2)
    return float(hits.mean())


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    return clustered(2000), clustered(100, seed=1)


def test_spec_parse_round_trip() -> None:
    spec = IndexSpec.parse("ivf-pq:nlist=256,nprobe=32")
    assert spec == IndexSpec(type="ivf-pq", nlist=256, nprobe=32)
    assert IndexSpec.parse(str(spec)) == spec
    assert IndexSpec.from_dict(spec.to_dict()) == spec
    assert spec.to_dict() == {
        "type": "ivf-pq",
        "params": {"nlist": 256, "pq_m": 16, "pq_bits": 8, "nprobe": 32},
    }
    assert IndexSpec.parse("flat") == IndexSpec()
    assert str(IndexSpec(type="hnsw", ef_search=64)) == (
        "hnsw:hnsw_m=32,ef_construction=200,ef_search=64"
    )
    # Search-time parameters do not change what is built.
    assert IndexSpec("hnsw", ef_search=1).build_params() == IndexSpec("hnsw").build_params()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("annoy", "unknown type 'annoy'"),
        ("hnsw:nlist=4", "unknown parameter(s) nlist for hnsw"),
        ("ivf-flat:nlist=many", "nlist='many' is not an integer"),
        ("ivf-flat:nlist", "'nlist' is not key=value"),
        ("ivf-flat:nprobe=0", "nprobe=0; expected an integer >= 1"),
    ],
)
def test_spec_parse_errors(text: str, message: str) -> None:
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        IndexSpec.parse(text)


def test_default_nlist() -> None:
    assert default_nlist(2000) == 51  # capped by 2000 // 39
    assert default_nlist(1_000_000) == 4000  # 4 * sqrt(R)
    assert default_nlist(20) == 0


def test_flat_is_exact_with_restriction_and_large_k(data: tuple[np.ndarray, np.ndarray]) -> None:
    x, q = data
    spec = IndexSpec()
    index = build_index(x, spec)
    sims, ids = search_index(index, spec, q, 10)
    assert_exact_topk(x, q, (sims, ids))
    assert sims.dtype == np.float32 and ids.dtype == np.int64

    allowed = np.zeros(len(x), dtype=bool)
    allowed[::7] = True
    for selection in (allowed, np.flatnonzero(allowed)):
        assert_exact_topk(x, q, search_index(index, spec, q, 10, selection), allowed)

    small = build_index(x[:5], spec)
    sims, ids = search_index(small, spec, q[:3], 8, np.array([1, 3]))
    assert (ids[:, 2:] == -1).all() and np.isneginf(sims[:, 2:]).all()
    assert set(ids[:, :2].ravel()) <= {1, 3}
    assert_exact_topk(x[:5], q[:3], (sims, ids), np.isin(np.arange(5), [1, 3]))


def test_ivf_flat_with_all_lists_probed_is_exact(data: tuple[np.ndarray, np.ndarray]) -> None:
    x, q = data
    spec = IndexSpec(type="ivf-flat", nlist=40, nprobe=40)
    index = build_index(x, spec)
    assert index.nlist == 40
    assert_exact_topk(x, q, search_index(index, spec, q, 10))
    allowed = np.arange(len(x)) % 3 == 0
    assert_exact_topk(x, q, search_index(index, spec, q, 10, allowed), allowed)


@pytest.mark.parametrize(
    ("text", "bound"),
    [
        ("ivf-flat", 0.95),  # default nlist (51), nprobe 16
        ("hnsw:hnsw_m=16,ef_construction=64", 0.95),
        ("ivf-pq:pq_m=16", 0.8),
    ],
)
def test_approximate_recall(data: tuple[np.ndarray, np.ndarray], text: str, bound: float) -> None:
    x, q = data
    spec = IndexSpec.parse(text)
    index = build_index(x, spec)
    _, truth = exact_topk(x, q, 10)
    sims, ids = search_index(index, spec, q, 10)
    assert recall_at(ids, truth) >= bound
    assert (np.diff(sims, axis=1) <= 1e-6).all()  # best first
    # Restriction happens inside the search: results are allowed rows and the recall holds.
    allowed = np.arange(len(x)) % 2 == 1
    _, ids = search_index(index, spec, q, 10, allowed)
    assert allowed[ids].all()
    assert recall_at(ids, exact_topk(x, q, 10, allowed)[1]) >= bound - 0.1


def test_ivf_pq_needs_divisible_dim() -> None:
    with pytest.raises(InputError, match="pq_m=5 needs a feature dimension divisible by pq_m"):
        build_index(clustered(500), IndexSpec(type="ivf-pq", pq_m=5))


def test_too_few_rows_for_ivf_falls_back_to_flat() -> None:
    x = clustered(30)
    with pytest.warns(UserWarning, match="too few to train"):
        index = build_index(x, IndexSpec(type="ivf-flat"))
    spec = IndexSpec(type="ivf-flat")
    np.testing.assert_array_equal(search_index(index, spec, x[:4], 3)[1][:, 0], np.arange(4))
    with pytest.warns(UserWarning, match="using nlist=10 instead of 64"):
        index = build_index(clustered(400), IndexSpec(type="ivf-flat", nlist=64))
    assert index.nlist == 10
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert build_index(np.zeros((0, 32), np.float32), spec).ntotal == 0


def test_save_and_load(tmp_path: Path, data: tuple[np.ndarray, np.ndarray]) -> None:
    x, q = data
    spec = IndexSpec(type="hnsw", hnsw_m=8, ef_construction=32)
    index = build_index(x[:300], spec)
    digest = save_index(index, tmp_path / "index.faiss")
    assert len(digest) == 64 and list(tmp_path.iterdir()) == [tmp_path / "index.faiss"]
    loaded = load_index(tmp_path / "index.faiss")
    np.testing.assert_array_equal(
        search_index(loaded, spec, q, 5)[1], search_index(index, spec, q, 5)[1]
    )
    (tmp_path / "bad.faiss").write_bytes(b"not an index" * 10)
    with pytest.raises(DatabaseError, match=r"bad\.faiss is corrupt"):
        load_index(tmp_path / "bad.faiss")


def test_auto_spec_parses_and_round_trips() -> None:
    spec = IndexSpec.parse("auto")
    assert spec == IndexSpec("auto") and str(spec) == "auto"
    assert IndexSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(InputError, match="unknown parameter"):
        IndexSpec.parse("auto:nprobe=4")


def test_auto_resolves_by_size() -> None:
    assert IndexSpec("auto").resolve(index_module.AUTO_EXACT_MAX_ROWS) == IndexSpec("flat")
    large = IndexSpec("auto").resolve(1_000_000)
    assert large == IndexSpec("ivf-flat", nlist=1000, nprobe=index_module.AUTO_NPROBE)
    concrete = IndexSpec("hnsw", ef_search=7)
    assert concrete.resolve(10**7) is concrete


def test_auto_builds_exact_small_and_ivf_large(
    monkeypatch: pytest.MonkeyPatch, data: tuple[np.ndarray, np.ndarray]
) -> None:
    x, q = data
    small = build_index(x, IndexSpec("auto"))
    assert isinstance(small, faiss.IndexFlatIP)
    assert_exact_topk(x, q, search_index(small, IndexSpec("auto"), q, 5))
    monkeypatch.setattr(index_module, "AUTO_EXACT_MAX_ROWS", len(x) - 1)
    large = build_index(x, IndexSpec("auto"))
    ivf = faiss.extract_index_ivf(large)
    assert ivf.nlist == round(len(x) ** 0.5)
    _, ids = search_index(large, IndexSpec("auto"), q, 10)
    _, ref = exact_topk(x, q, 10)
    recall = np.mean([len(np.intersect1d(a, b)) / 10 for a, b in zip(ids, ref, strict=True)])
    assert recall >= 0.9


def test_an_index_spec_that_cannot_index_the_dimension_is_refused_before_writing(tmp_path) -> None:
    from retclip.backbones.base import BackboneFingerprint
    from retclip.database import FeatureDatabase
    from retclip.errors import InputError

    fingerprint = BackboneFingerprint("test")
    bad = IndexSpec.parse("ivf-pq:pq_m=7")
    with pytest.raises(InputError, match="pq_m=7 must divide the feature dimension 16"):
        FeatureDatabase.create(tmp_path / "new", fingerprint=fingerprint, dim=16, index=bad)
    assert not (tmp_path / "new").exists()  # nothing created
    db = FeatureDatabase.create(tmp_path / "db", fingerprint=fingerprint, dim=16)
    db.add(np.eye(16, dtype=np.float32)[:4], ["a", "b", "a", "b"], sources=list("wxyz"))
    with pytest.raises(InputError, match="must divide"):
        db.set_index(bad)
    reopened = FeatureDatabase.open(tmp_path / "db")
    assert reopened.index_spec == IndexSpec("auto")  # the bad spec was never recorded
    found, _ = reopened.search(np.eye(16, dtype=np.float32)[:1], 2)  # queries still work
    assert found.shape == (1, 2)
