"""FAISS index building and searching: exactness of flat/IVF, recall of approximate indexes."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import faiss
import numpy as np
import pytest

from retclip.backbones.base import BackboneFingerprint
from retclip.database import FeatureDatabase
from retclip.database import index as index_module
from retclip.database.index import (
    IndexSpec,
    auto_nlist,
    default_nlist,
    load_index,
    ondisk_file,
    save_index,
    search_index,
)
from retclip.database.index_build import CoarseLists, build_index, build_index_streaming
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
    with pytest.raises(InputError, match="pq_m=5 must divide the feature dimension 32"):
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
    concrete = IndexSpec("hnsw", ef_search=7)
    assert concrete.resolve(10**7) is concrete


@pytest.mark.parametrize(
    ("rows", "factory", "search"),
    [
        (300_000, "IVF4096,Flat", "nprobe=16"),  # 4 sqrt(R) = 2191 -> the next power of two
        (999_999, "IVF4096,Flat", "nprobe=16"),
        (1_000_000, "IVF16384_HNSW32,Flat", "nprobe=64,quantizer_efSearch=128"),  # 39 a list
        (5_000_000, "IVF65536_HNSW32,Flat", "nprobe=256,quantizer_efSearch=512"),  # FAISS's
        (50_000_000, "IVF262144_HNSW32,Flat", "nprobe=256,quantizer_efSearch=512"),
        (500_000_000, "IVF1048576_HNSW32,Flat", "nprobe=256,quantizer_efSearch=512"),
    ],
)
def test_auto_follows_faiss_guidelines_by_size(rows: int, factory: str, search: str) -> None:
    spec = IndexSpec("auto").resolve(rows, 768)
    assert spec == IndexSpec("factory", factory=factory, search=search)
    spec.check_dim(768)  # a valid factory string with valid search settings


def test_auto_list_count_is_within_faiss_bounds_below_1m_rows() -> None:
    for rows in np.geomspace(index_module.AUTO_EXACT_MAX_ROWS + 1, 999_999, 20).astype(int):
        nlist = auto_nlist(int(rows))
        assert 4 * rows**0.5 <= nlist <= 16 * rows**0.5 and nlist & (nlist - 1) == 0
    assert auto_nlist(2000) == 32  # capped: 39 training points a list


@pytest.mark.parametrize(
    ("rows", "memory_gb", "expected"),
    [
        (10_000_000, 64, "IVF131072_HNSW32,Flat"),  # float32 fits: 29 GiB
        (10_000_000, 16, "IVF65536_HNSW32,SQ8"),  # 7.2 GiB of codes; the sample caps nlist
        (10_000_000, 4, "IVF16384_HNSW32,SQ4"),
        (10_000_000, 1, "IVF4096_HNSW32,PQ64np"),
        (100_000, 0.1, "SQ8"),  # exact-size database, floats over budget: exhaustive SQ8
        (100_000, 0.03, "IVF128,PQ64np"),  # PQ codes need an IVF to restrict searches
    ],
)
def test_auto_memory_budget_chooses_codes(rows: int, memory_gb: float, expected: str) -> None:
    spec = IndexSpec("auto", memory_gb=memory_gb).resolve(rows, 768)
    assert spec.factory == expected
    per_row = {"Flat": 3072, "SQ8": 768, "SQ4": 384, "PQ64np": 64}[expected.split(",")[-1]]
    assert rows * per_row <= memory_gb * 2**30
    assert IndexSpec.parse(f"auto:memory_gb={memory_gb}") == IndexSpec("auto", memory_gb=memory_gb)
    with pytest.raises(ValueError, match="needs the dimension"):
        IndexSpec("auto", memory_gb=1).resolve(rows)


def test_auto_budget_too_small_for_any_codes_warns() -> None:
    with pytest.warns(UserWarning, match="do not fit memory_gb=0.01 even as 4-byte codes"):
        spec = IndexSpec("auto", memory_gb=0.01).resolve(10_000_000, 768)
    assert spec.factory is not None and spec.factory.endswith(",PQ4np")


def test_factory_specs_parse_and_round_trip() -> None:
    spec = IndexSpec.parse("factory:IVF64,SQ8,nprobe=8,ondisk=1")
    assert spec == IndexSpec("factory", factory="IVF64,SQ8", search="nprobe=8", ondisk=True)
    assert IndexSpec.parse("IVF64,SQ8,nprobe=8,ondisk=1") == spec  # the raw FAISS string
    assert str(spec) == "factory:IVF64,SQ8,nprobe=8,ondisk=1"
    assert IndexSpec.parse(str(spec)) == spec and IndexSpec.from_dict(spec.to_dict()) == spec
    assert spec.to_dict() == {
        "type": "factory",
        "params": {"factory": "IVF64,SQ8", "ondisk": True, "search": "nprobe=8"},
    }
    # search settings are not build parameters: changing them needs no rebuild
    assert spec.build_params() == {"type": "factory", "factory": "IVF64,SQ8", "ondisk": True}
    assert IndexSpec.parse("HNSW16,efSearch=40").search_settings() == "efSearch=40"
    assert IndexSpec.parse("Flat").factory_string(10) == "Flat"
    assert IndexSpec.parse("ivf-pq:pq_m=4").factory_string(4000) == "IVF102,PQ4x8np"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("factory:IVF16,PQ7", "FAISS cannot build 'IVF16,PQ7' for dimension 16"),
        ("Foo12", "FAISS cannot build 'Foo12' for dimension 16 (could not parse"),
        ("factory:PQ4", "FAISS's IndexPQ cannot restrict a search to allowed rows"),
        ("factory:IVF16,RQ2x4", "IndexIVFResidualQuantizer cannot restrict a search"),
        ("factory:IDMap,Flat", "IDMap is not needed"),
        ("factory:IVF16,Flat,nprob=2", "could not set parameter nprob"),
        ("factory:HNSW16,ondisk=1", "ondisk=1 needs an IVF index"),
        ("factory:IVF16,Flat,RFlat,ondisk=1", "ondisk=1 needs an IVF index"),
    ],
)
def test_bad_factory_specs_are_refused_for_the_dimension(text: str, message: str) -> None:
    spec = IndexSpec.parse(text)  # the text parses; FAISS decides with the dimension
    with pytest.raises(InputError) as caught:
        spec.check_dim(16)
    assert message in str(caught.value) and f"bad index spec {str(spec)!r}" in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("factory:", "no FAISS index-factory string"),
        ("factory:nprobe=4", "no FAISS index-factory string"),
        ("factory:IVF16,Flat,nprobe=many", "nprobe='many' is not a number"),
        ("ivf-flat:ondisk=2", "ondisk=2; expected 0 or 1"),
        ("auto:memory_gb=-1", "memory_gb=-1.0; expected a number > 0"),
        ("auto:memory_gb=lots", "memory_gb='lots' is not a number"),
        ("hnsw:ondisk=1", "unknown parameter(s) ondisk for hnsw"),
    ],
)
def test_bad_spec_text_is_refused_naming_it(text: str, message: str) -> None:
    with pytest.raises(InputError) as caught:
        IndexSpec.parse(text)
    assert message in str(caught.value) and repr(text) in str(caught.value)
    assert "\n" not in str(caught.value)


def test_auto_builds_exact_small_and_ivf_large(
    monkeypatch: pytest.MonkeyPatch, data: tuple[np.ndarray, np.ndarray]
) -> None:
    x, q = data
    small = build_index(x, IndexSpec("auto"))
    assert isinstance(small, faiss.IndexFlat) and small.metric_type == faiss.METRIC_INNER_PRODUCT
    assert_exact_topk(x, q, search_index(small, IndexSpec("auto"), q, 5))
    monkeypatch.setattr(index_module, "AUTO_EXACT_MAX_ROWS", len(x) - 1)
    large = build_index(x, IndexSpec("auto"))
    ivf = faiss.extract_index_ivf(large)
    assert ivf.nlist == 32 and ivf.nprobe == 16  # 4 sqrt(R) lists, capped at 39 rows a list
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


def blocks_of(x: np.ndarray, size: int) -> Callable[[], Iterator[np.ndarray]]:
    """``x`` ``[N, D]`` as a re-iterable source of ``size``-row blocks."""
    return lambda: (x[start : start + size] for start in range(0, len(x), size))


@pytest.mark.parametrize(
    "text", ["flat", "ivf-flat:nlist=32,nprobe=8", "factory:IVF32,SQ8,nprobe=8"]
)  # not HNSW: its graph depends on how the rows are batched
def test_streaming_build_equals_the_in_memory_build(
    data: tuple[np.ndarray, np.ndarray], text: str
) -> None:
    x, q = data
    spec = IndexSpec.parse(text)
    whole = search_index(build_index(x, spec), spec, q, 10)
    streamed_index = build_index_streaming(blocks_of(x, 333), len(x), x.shape[1], spec)
    streamed = search_index(streamed_index, spec, q, 10)
    np.testing.assert_array_equal(streamed[1], whole[1])
    np.testing.assert_array_equal(streamed[0], whole[0])
    # float16 blocks (a database's stored dtype) are converted block by block
    half = x.astype(np.float16)
    from_half = build_index_streaming(blocks_of(half, 500), len(x), x.shape[1], spec)
    expected = search_index(build_index(half, spec), spec, q, 10)[1]
    np.testing.assert_array_equal(search_index(from_half, spec, q, 10)[1], expected)


@pytest.mark.parametrize(
    "text",
    ["factory:IVF32,SQ8,nprobe=8", "factory:IVF32,PQ8np,nprobe=8",
     "factory:IVF32_HNSW32,Flat,nprobe=8,ondisk=1"],
)  # fmt: skip
def test_reusing_another_index_lists_equals_building_the_index_anew(
    tmp_path: Path, data: tuple[np.ndarray, np.ndarray], text: str
) -> None:
    """Codes written into the lists of an index over the same rows (no k-means, no assignment)
    give the index a build from scratch gives: same lists, same results."""
    x, q = data
    spec = IndexSpec.parse(text)
    first = build_index_streaming(
        blocks_of(x, 250), len(x), x.shape[1], IndexSpec.parse("factory:IVF32,Flat,nprobe=8")
    )
    lists = CoarseLists.of(first)
    assert lists.centroids.shape == (32, x.shape[1]) and len(lists.list_of_row) == len(x)
    reused = build_index_streaming(
        blocks_of(x, 333), len(x), x.shape[1], spec, lists=lists,
        ondisk_path=tmp_path / "lists.ivfdata", part_rows=700,
    )  # fmt: skip
    anew = build_index_streaming(blocks_of(x, 333), len(x), x.shape[1], spec)
    np.testing.assert_array_equal(CoarseLists.of(reused).list_of_row, lists.list_of_row)
    np.testing.assert_array_equal(CoarseLists.of(anew).list_of_row, lists.list_of_row)
    allowed = np.arange(len(x)) % 3 == 0
    for mask in (None, allowed):
        a, b = search_index(reused, spec, q, 10, mask), search_index(anew, spec, q, 10, mask)
        np.testing.assert_array_equal(a[1], b[1])
        np.testing.assert_array_equal(a[0], b[0])


def test_reusing_lists_refuses_what_they_do_not_fit(data: tuple[np.ndarray, np.ndarray]) -> None:
    x, _ = data
    lists = CoarseLists.of(build_index(x, IndexSpec.parse("factory:IVF32,Flat")))
    cases = {
        "factory:IVF16,SQ8": "32 centroids",  # other list count
        "factory:PCA32,IVF32,Flat": "plain IVF",  # a transform before the lists
        "flat": "no IVF lists",
    }
    for text, message in cases.items():
        with pytest.raises(InputError, match=message):
            build_index_streaming(
                blocks_of(x, 500), len(x), x.shape[1], IndexSpec.parse(text), lists=lists
            )
    with pytest.raises(InputError, match="over 2000 rows"):
        build_index_streaming(
            blocks_of(x[:1000], 500), 1000, x.shape[1], IndexSpec.parse("factory:IVF32,SQ8"),
            lists=lists,
        )  # fmt: skip
    with pytest.raises(InputError, match="no IVF lists"):
        CoarseLists.of(build_index(x, IndexSpec.parse("flat")))


def test_ondisk_merge_gives_the_in_memory_ivf_results(
    tmp_path: Path, data: tuple[np.ndarray, np.ndarray]
) -> None:
    x, q = data
    spec = IndexSpec.parse("factory:IVF32,SQ8,nprobe=8,ondisk=1")
    build = tmp_path / "build"
    build.mkdir()
    ondisk = build_index_streaming(
        blocks_of(x, 250), len(x), x.shape[1], spec, ondisk_path=build / "lists.ivfdata",
        part_rows=700,
    )  # fmt: skip
    memory = build_index(x, dataclasses.replace(spec, ondisk=False))
    assert ondisk_file(ondisk) == build / "lists.ivfdata" and ondisk_file(memory) is None
    assert sorted(p.name for p in build.iterdir()) == ["lists.ivfdata"]  # parts removed
    allowed = np.arange(len(x)) % 3 == 0
    for mask in (None, allowed):
        a, b = search_index(ondisk, spec, q, 10, mask), search_index(memory, spec, q, 10, mask)
        np.testing.assert_array_equal(a[1], b[1])
        np.testing.assert_array_equal(a[0], b[0])
    # persisted and moved elsewhere: the lists are found beside the index file
    save_index(ondisk, build / "index.faiss")
    moved = tmp_path / "moved"
    build.rename(moved)
    loaded = load_index(moved / "index.faiss", mmap=True)
    assert ondisk_file(loaded) == moved / "lists.ivfdata"
    np.testing.assert_array_equal(
        search_index(loaded, spec, q, 10)[1], search_index(memory, spec, q, 10)[1]
    )


def _mapped_files() -> set[str]:
    with open("/proc/self/maps", encoding="utf-8") as handle:
        return {line.split(maxsplit=5)[-1].strip() for line in handle if "/" in line}


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc/self/maps")
@pytest.mark.parametrize("text", ["ivf-flat:nlist=32", "hnsw:hnsw_m=8", "factory:SQ8"])
def test_a_persisted_index_loads_memory_mapped(
    tmp_path: Path, data: tuple[np.ndarray, np.ndarray], text: str
) -> None:
    x, q = data
    spec = IndexSpec.parse(text)
    index = build_index(x, spec)
    path = tmp_path / "index.faiss"
    save_index(index, path)
    read = load_index(path)
    assert str(path) not in _mapped_files()  # read into memory
    mapped = load_index(path, mmap=True)
    assert str(path) in _mapped_files()  # served from the file's pages
    for loaded in (read, mapped):
        np.testing.assert_array_equal(
            search_index(loaded, spec, q, 10)[1], search_index(index, spec, q, 10)[1]
        )
    del mapped


def labelled_database(path: Path, *, shards: int = 6, per_shard: int = 500) -> FeatureDatabase:
    """Clustered rows (dim 32) in ``shards`` shards, labelled by their largest of 6 coordinates."""
    db = FeatureDatabase.create(path, fingerprint=BackboneFingerprint("test"), dim=32)
    for shard in range(shards):
        x = clustered(per_shard, seed=10 + shard)
        labels = [f"c{int(np.argmax(row[:6]))}" for row in x]
        db.add(x, labels, sources=[f"img{shard}"] * per_shard)
    return db


@pytest.mark.parametrize(
    ("text", "bound"),
    [
        ("ivf-pq:nlist=32,pq_m=8,nprobe=16", 0.6),
        ("hnsw:hnsw_m=8,ef_construction=40", 0.9),
        ("factory:IVF32,SQ8,nprobe=16", 0.9),
        ("factory:IVF32_HNSW16,PQ8np,RFlat,nprobe=16,quantizer_efSearch=32,k_factor_rf=4", 0.9),
        ("factory:HNSW16,SQ8,efSearch=128", 0.9),
        ("factory:IVF32,Flat,nprobe=32,ondisk=1", 1.0),
    ],
)
def test_label_restriction_works_on_every_index_kind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, bound: float
) -> None:
    db = labelled_database(tmp_path / "db")
    features = db.features().copy()
    labels = db.label_ids()
    monkeypatch.setattr(FeatureDatabase, "features", lambda self: pytest.fail("all rows loaded"))
    db.set_index(IndexSpec.parse(text))  # built shard by shard, never from all features
    queries = clustered(40, seed=99)
    names = [label.name for label in db.labels]
    allowed_labels = [names.index("c1"), names.index("c4")]
    allowed = np.isin(labels, allowed_labels)
    _, ids = db.search(queries, 10, allowed_labels=allowed_labels)
    assert (ids >= 0).all() and allowed[ids].all()
    truth = exact_topk(features, queries, 10, allowed)[1]
    assert recall_at(ids, truth) >= bound
    again = FeatureDatabase.open(tmp_path / "db")  # the persisted index, loaded memory-mapped
    np.testing.assert_array_equal(again.search(queries, 10, allowed_labels=allowed_labels)[1], ids)


def test_features_are_streamed_from_shards_memory_mapped(tmp_path: Path) -> None:
    from retclip.database.shards import iter_features, map_features, read_meta, read_rows

    db = labelled_database(tmp_path / "db", shards=3, per_shard=300)
    db.remove(sources=["img1"])  # compacted: one shard of all remaining rows
    meta = read_meta(tmp_path / "db")
    blocks = list(iter_features(tmp_path / "db", meta, 128))
    assert [len(b) for b in blocks] == [128, 128, 128, 128, 88]
    assert isinstance(blocks[0].base, np.memmap) or isinstance(blocks[0], np.memmap)
    np.testing.assert_array_equal(np.concatenate(blocks), read_rows(tmp_path / "db", meta).features)
    del blocks  # the mappings, before their file is truncated
    shard = meta["shards"][0]
    path = tmp_path / "db" / "shards" / shard["file"]
    path.write_bytes(path.read_bytes()[:200])  # truncated
    with pytest.raises(DatabaseError, match="corrupt shard"):
        map_features(tmp_path / "db", meta, shard)


def test_an_ondisk_database_index_persists_reloads_and_is_replaced(tmp_path: Path) -> None:
    import json

    db = labelled_database(tmp_path / "db", shards=4)
    db.set_index(IndexSpec.parse("factory:IVF32,SQ8,nprobe=8,ondisk=1"))
    record = json.loads((tmp_path / "db" / "meta.json").read_text())["index_file"]
    lists = tmp_path / "db" / record["ondisk"]["file"]
    assert lists.is_file() and lists.stat().st_size == record["ondisk"]["bytes"]
    assert not list((tmp_path / "db").glob(".index-build-*"))  # the build folder is gone
    queries = clustered(5, seed=7)
    expected = db.search(queries, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # loaded as persisted, not rebuilt
        again = FeatureDatabase.open(tmp_path / "db")
        np.testing.assert_array_equal(again.search(queries, 5)[1], expected[1])
    assert again.info()["index"]["persisted"]
    with open(lists, "r+b") as handle:  # damaged in place (truncating a file that FAISS still
        handle.write(bytes(lists.stat().st_size))  # maps and prefetches would crash the process)
    with pytest.warns(UserWarning, match="inverted lists .* do not match their sha256"):
        np.testing.assert_array_equal(FeatureDatabase.open(tmp_path / "db").search(queries, 5)[1],
                                      expected[1])  # fmt: skip
    db.set_index(IndexSpec.parse("ivf-flat:nlist=32"))  # in memory again: old lists removed
    assert not list((tmp_path / "db").glob("*.ivfdata"))


def test_recall_is_measured_against_exact_search(data: tuple[np.ndarray, np.ndarray]) -> None:
    from retclip.database.index_recall import evaluate_recall

    x, _ = data
    exhaustive = IndexSpec.parse("ivf-flat:nlist=32,nprobe=32")
    index = build_index(x, exhaustive)
    report = evaluate_recall(index, exhaustive, blocks_of(x, 300), len(x), sample=200, ks=(1, 10))
    assert report.recall == {1: 1.0, 10: 1.0} and report.sample == 200
    one_probe = IndexSpec.parse("ivf-flat:nlist=32,nprobe=1")
    worse = evaluate_recall(index, one_probe, blocks_of(x, 300), len(x), sample=200, ks=(1, 10))
    assert worse.recall[10] < 0.99 and "recall@k" in worse.table()
    assert evaluate_recall(index, one_probe, blocks_of(x, 300), len(x), sample=200, ks=(10,),
                           seed=0).recall[10] == worse.recall[10]  # fmt: skip
    with pytest.raises(InputError, match="expected positive integers"):
        evaluate_recall(index, one_probe, blocks_of(x, 300), len(x), sample=0)


def test_db_index_evaluate_reports_recall(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from retclip.cli import cli

    labelled_database(tmp_path / "db", shards=4)
    runner = CliRunner()
    spec = "factory:IVF32,Flat,nprobe=32"
    result = runner.invoke(cli, ["db", "index", str(tmp_path / "db"), spec, "--evaluate",
                                 "--sample", "100", "-k", "1", "-k", "10"])  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"{tmp_path / 'db'}: index {spec} built over 2000 rows"
    assert f"index {spec}: 2000 rows, 100 sampled rows" in lines[1]
    assert lines[2].split() == ["k", "recall@k"]
    assert lines[3].split() == ["1", "1.000"] and lines[4].split() == ["10", "1.000"]  # all lists
    assert "ms/query (index)" in lines[5]
    current = runner.invoke(cli, ["db", "index", str(tmp_path / "db"), "--evaluate",
                                  "--sample", "50", "-k", "10"])  # fmt: skip
    assert current.exit_code == 0 and "50 sampled rows" in current.output
    neither = runner.invoke(cli, ["db", "index", str(tmp_path / "db")])
    assert neither.exit_code == 1 and "give an index SPEC, --evaluate, or both" in neither.output
    bad = runner.invoke(cli, ["db", "index", str(tmp_path / "db"), "factory:PQ8"])
    assert bad.exit_code == 1 and bad.output.startswith("Error: bad index spec 'factory:PQ8'")
    assert len(bad.output.strip().splitlines()) == 1


def test_db_index_reuse_lists_writes_other_codes_into_the_saved_lists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`retclip db index DB SPEC --reuse-lists` builds SPEC into the saved index's IVF lists,
    giving the index a build anew gives, and refuses lists SPEC cannot use before writing."""
    from click.testing import CliRunner

    from retclip.cli import cli
    from retclip.database import index_build

    db, anew = tmp_path / "db", tmp_path / "anew"
    labelled_database(db, shards=4)
    labelled_database(anew, shards=4)
    runner = CliRunner()

    def run(*args: str) -> str:
        result = runner.invoke(cli, ["db", "index", *args])
        assert result.exit_code == 0, result.output
        return result.output

    first, other = "factory:IVF32,Flat,nprobe=8", "factory:IVF32_HNSW32,SQ8,nprobe=8"
    refused = runner.invoke(cli, ["db", "index", str(db), other, "--reuse-lists"])  # exact now
    assert refused.exit_code == 1 and "has no saved index of its current rows" in refused.output
    run(str(db), first)
    lists = CoarseLists.of(load_index(db / "index.faiss"))
    preassigned: list[int] = []
    real = index_build._add_preassigned

    def spy(index: faiss.Index, block: np.ndarray, first_id: int, given: CoarseLists) -> None:
        preassigned.append(len(block))
        real(index, block, first_id, given)

    monkeypatch.setattr(index_build, "_add_preassigned", spy)
    output = run(str(db), other, "--reuse-lists", "--evaluate", "--sample", "50", "-k", "10")
    assert output.startswith(f"{db}: index {other} built over 2000 rows")
    assert sum(preassigned) == 2000  # every row went into the list it had
    reused = FeatureDatabase.open(db)
    np.testing.assert_array_equal(
        CoarseLists.of(load_index(db / "index.faiss")).list_of_row, lists.list_of_row
    )
    run(str(anew), other)  # the same spec built anew
    q = clustered(20, seed=3)
    expected = FeatureDatabase.open(anew).search(q, 10)
    for got, want in zip(reused.search(q, 10), expected, strict=True):
        np.testing.assert_array_equal(got, want)
    for args, message in [
        ([other.replace("IVF32_", "IVF16_")], "32 centroids"),  # other list count
        (["factory:PCA16,IVF32,Flat"], "plain IVF"),
        ([], "--reuse-lists needs the index SPEC"),
    ]:
        bad = runner.invoke(cli, ["db", "index", str(db), *args, "--reuse-lists"])
        assert bad.exit_code == 1 and message in bad.output, bad.output
        assert len(bad.output.strip().splitlines()) == 1
    assert str(FeatureDatabase.open(db).index_spec) == other  # the refused specs not recorded


def test_two_level_kmeans_is_faiss_s_and_gives_every_cluster_a_centroid() -> None:
    """The same centroids as ``faiss.contrib.clustering.two_level_clustering`` where that works;
    where its rounding would give a small cluster no sub-cluster (and fail), one."""
    from faiss.contrib.clustering import two_level_clustering

    from retclip.database.index_build import apportion, two_level_kmeans

    faiss.omp_set_num_threads(1)
    x = clustered(256 * 39, seed=4)
    ours = two_level_kmeans(x, 256, niter=10, seed=1234)
    theirs, _ = two_level_clustering(x, 16, 256, clustering_niter=10, seed=1234)
    np.testing.assert_array_equal(ours, theirs)
    assert apportion(np.array([9990, 5, 5]), 256).tolist() == [254, 1, 1]  # FAISS: 256, 0, 0
    assert apportion(np.array([3, 0, 100]), 10).tolist() == [1, 0, 9]
    assert apportion(np.array([2, 2]), 4).tolist() == [2, 2]  # never more than the points
    far = np.zeros((5, x.shape[1]), np.float32)
    far[:, 0] = 1.0  # 5 rows far from the others: a top-level cluster of their own
    centroids = two_level_kmeans(np.concatenate([x, far]), 256, niter=10, seed=1234)
    assert centroids.shape == (256, x.shape[1])
    assert np.max(centroids @ far[0]) > 0.99  # the small cluster has its centroid


def test_an_index_that_fails_training_falls_back_to_exact_only_when_small(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A few rows too few for a spec's codebooks give an exact index with a warning; at a size
    where an exact index may not fit memory (10M x 768 float32 is 30 GB) the error is raised."""
    from retclip.database import index_build

    x = clustered(2000)
    spec = IndexSpec.parse("factory:IVF16,PQ8x12")  # 4096-code PQ: more codes than rows
    with pytest.warns(UserWarning, match="cannot be trained on 2000 rows"):
        assert isinstance(build_index(x, spec), faiss.IndexFlatIP)
    monkeypatch.setattr(index_build, "AUTO_EXACT_MAX_ROWS", 1000)
    with pytest.raises(DatabaseError, match=r"could not be trained on 2000 of 2000 rows: .*4096"):
        build_index(x, spec)
