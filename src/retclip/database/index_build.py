"""Building FAISS indexes from features that need not fit in memory.

:func:`build_index_streaming` takes a callable that yields the features ``[n_i, D]`` block by
block, in row order (a database's shards, read one at a time), and never holds more than one
block and the training sample as float32:

1. the spec becomes a FAISS index-factory string (:meth:`IndexSpec.factory_string`) and an empty
   index (``faiss.index_factory``);
2. it is trained on a seeded sample of rows (:func:`training_rows`: FAISS's 30-256 points per IVF
   list, here 64, at least 39 and at most :data:`TRAIN_MAX_ROWS` unless 39 a list need more), with
   FAISS's two-level k-means (``faiss.contrib.clustering``) for large list counts;
3. rows are added block by block; or, with ``ondisk``, each run of :data:`PART_ROWS` rows is added
   to its own copy of the trained index, written out, and the parts are merged into one on-disk
   inverted-list file (FAISS's ``OnDiskInvertedLists``, as ``faiss.contrib.ondisk`` does).
   Parts can come from several workers (:func:`index_part` on each, :func:`merge_parts` once).

With ``lists`` (:class:`CoarseLists` of an IVF index already built over the same rows), steps 2
and 3 skip the k-means training and the assignment of every row to its list, which dominate a
large build (0.7 ms of CPU a 768-d row at 32 768 lists): only the codes are trained and written.
That is how one database is indexed with other codes (SQ8 instead of float32, PQ, on disk)
behind the same lists.

:func:`build_index` is the same over an in-memory ``[R, D]`` array.
"""

from __future__ import annotations

import math
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from faiss.contrib.ivf_tools import add_preassigned

from retclip.database.index import (
    AUTO_EXACT_MAX_ROWS,
    MIN_POINTS_PER_CENTROID,
    TRAIN_SEED,
    IndexSpec,
    configure_search,
    faiss_message,
)
from retclip.errors import DatabaseError, InputError

#: A callable yielding the features ``[n_i, D]`` block by block, in row order, on each call.
Blocks = Callable[[], Iterable[np.ndarray]]

#: Training points per IVF list (FAISS recommends 30-256).
TRAIN_POINTS_PER_LIST = 64
#: Training rows for codes without IVF lists (PQ codebooks train on at most 256 points a code).
TRAIN_MIN_ROWS = 65_536
#: Cap on the training sample, unless 39 points a list need more.
TRAIN_MAX_ROWS = 1 << 20
#: From this many lists the coarse quantiser trains by FAISS's two-level k-means (sqrt(nlist)
#: clusters, then each split): ~sqrt(nlist)/2 times less work, slightly looser centroids.
TWO_LEVEL_MIN_NLIST = 8192
#: Up to this many lists, rows are assigned to them exactly while adding (a flat index over the
#: HNSW quantiser's centroids, BLAS-batched: 0.16 ms a 768-d row at 8192 lists, 0.7 at 32768,
#: where HNSW at efSearch 128 took 1.2-2.4 ms and still missed some nearest lists).
EXACT_ASSIGN_MAX_NLIST = 65_536
#: ``efSearch`` of an HNSW coarse quantiser assigning rows above that: with FAISS's 16, half of
#: 100k clustered 768-d rows missed their nearest of 1024 centroids (lists 55x imbalanced,
#: searches 10x slower); 128 found 92 %.
ADD_QUANTIZER_EF_SEARCH = 128
#: Rows converted to float32 at a time while adding.
BLOCK_ROWS = 65_536
#: Rows per part of an on-disk build (each part holds its codes in memory until written).
PART_ROWS = 1 << 20


@dataclass(frozen=True)
class CoarseLists:
    """The IVF lists of an index over ``R`` rows: its coarse centroids ``[nlist, D]`` float32 and
    the list of every row ``[R]`` int64, for another index over the same rows to reuse."""

    centroids: np.ndarray
    list_of_row: np.ndarray

    @classmethod
    def of(cls, index: faiss.Index) -> CoarseLists:
        """The lists of an IVF ``index`` whose rows have ids ``0 .. R-1`` (as built here; it may be
        loaded memory-mapped or keep its lists on disk)."""
        ivf: Any = faiss.try_extract_index_ivf(index)
        if ivf is None:
            raise InputError(f"index {type(index).__name__} has no IVF lists to reuse")
        centroids = ivf.quantizer.reconstruct_n(0, int(ivf.nlist))
        list_of_row = np.full(int(ivf.ntotal), -1, dtype=np.int64)
        invlists = ivf.invlists
        for number in range(int(ivf.nlist)):
            size = int(invlists.list_size(number))
            if size:  # the ids only (get_invlist would copy the codes too: 7.7 GB at 10M SQ8)
                pointer = invlists.get_ids(number)
                ids = faiss.rev_swig_ptr(pointer, size).copy()
                invlists.release_ids(number, pointer)
                if ids.min() < 0 or ids.max() >= len(list_of_row):
                    raise InputError("the index's row ids are not 0 .. ntotal-1; cannot reuse")
                list_of_row[ids] = number
        if (list_of_row < 0).any():
            raise InputError("the index's row ids are not 0 .. ntotal-1; cannot reuse its lists")
        return cls(np.ascontiguousarray(centroids, dtype=np.float32), list_of_row)


def build_index(features: np.ndarray, spec: IndexSpec) -> faiss.Index:
    """Build an inner-product index over unit ``features`` ``[R, D]``; row ``i`` gets id ``i``.

    Trained on a seeded sample of the rows (:func:`training_rows`). With too few rows to train an
    IVF index, a flat (exact) index is built instead, with a warning.
    """
    array = np.asarray(features)
    if array.ndim != 2:
        raise InputError(f"index features have shape {array.shape}; expected [N, D]")
    return build_index_streaming(lambda: [array], array.shape[0], array.shape[1], spec)


def training_rows(index: faiss.Index, rows: int) -> int:
    """How many of ``rows`` rows train ``index`` (:func:`training_sample_size`)."""
    ivf = faiss.try_extract_index_ivf(index)
    return training_sample_size(0 if ivf is None else int(ivf.nlist), rows)


def training_sample_size(nlist: int, rows: int) -> int:
    """Training rows for ``nlist`` IVF lists (0: none) out of ``rows``: 64 a list within
    [39 a list, :data:`TRAIN_MAX_ROWS`], at least :data:`TRAIN_MIN_ROWS`, at most ``rows``."""
    per_list = min(TRAIN_POINTS_PER_LIST * nlist, TRAIN_MAX_ROWS)
    return min(rows, max(TRAIN_MIN_ROWS, MIN_POINTS_PER_CENTROID * nlist, per_list))


def sample_ids(rows: int, count: int, seed: int) -> np.ndarray:
    """``count`` distinct row ids of ``rows``, sorted, drawn with ``seed``."""
    if count >= rows:
        return np.arange(rows, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(rows, count, replace=False))


def gather_rows(blocks: Blocks, ids: np.ndarray, dim: int) -> np.ndarray:
    """The rows ``ids`` (sorted) of the blocks, ``[len(ids), D]`` float32, in one pass."""
    out = np.empty((len(ids), dim), dtype=np.float32)
    start = filled = 0
    for block in blocks():
        n = len(block)
        stop = int(np.searchsorted(ids, start + n))
        if stop > filled:
            out[filled:stop] = block[ids[filled:stop] - start]
            filled = stop
        start += n
    if filled != len(ids):
        raise ValueError(f"the blocks hold {start} rows; row {ids[filled]} was asked for")
    return out


def float_blocks(blocks: Blocks, block_rows: int = BLOCK_ROWS) -> Iterator[np.ndarray]:
    """The blocks as contiguous float32 ``[n, D]`` of at most ``block_rows`` rows (slices of large
    blocks, so only one converted block is alive at a time)."""
    for block in blocks():
        for start in range(0, len(block), block_rows):
            yield np.ascontiguousarray(block[start : start + block_rows], dtype=np.float32)


def _seed(index: faiss.Index) -> None:
    """Fix the seeds of every k-means an index trains (IVF lists, PQ codebooks)."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        _seed(index.index)
    if isinstance(index, faiss.IndexRefine):
        _seed(index.base_index)
    if isinstance(index, faiss.IndexIVF):
        index.cp.seed = TRAIN_SEED
    pq = getattr(index, "pq", None)
    if pq is not None:
        pq.cp.seed = TRAIN_SEED


def _train(target: faiss.Index, x: np.ndarray) -> None:
    """Train ``target`` on ``x`` ``[n, D]``; a large IVF quantiser by two-level k-means."""
    index: Any = faiss.downcast_index(target)
    if isinstance(index, faiss.IndexPreTransform):
        chain: Any = index.chain
        for i in range(chain.size()):
            transform = chain.at(i)
            transform.train(x)
            x = transform.apply(x)
        _train(index.index, x)
        index.is_trained = True
        return
    if isinstance(index, faiss.IndexRefine):
        _train(index.base_index, x)
        index.refine_index.train(x)
        index.is_trained = True
        return
    if (
        isinstance(index, faiss.IndexIVF)
        and index.nlist >= TWO_LEVEL_MIN_NLIST
        and index.quantizer.ntotal == 0
    ):
        centroids = two_level_kmeans(
            x,
            int(index.nlist),
            niter=int(index.cp.niter),
            seed=int(index.cp.seed),
            spherical=bool(index.cp.spherical),
        )
        index.quantizer.add(centroids)
    index.train(x)  # IVF: only the codes when the quantiser already holds nlist centroids


def two_level_kmeans(
    x: np.ndarray, nlist: int, *, niter: int, seed: int, spherical: bool = False
) -> np.ndarray:
    """``nlist`` centroids ``[nlist, D]`` of ``x`` ``[n, D]`` by FAISS's two-level k-means:
    ``sqrt(nlist)`` clusters (``niter`` iterations), each split by its own k-means into
    sub-clusters in proportion to its points.

    This is ``faiss.contrib.clustering.two_level_clustering``'s method, except that every
    non-empty cluster gets at least one sub-cluster (and none more than its points): FAISS's
    rounding gives a small cluster none and then fails (``clus.k > 0``), which happened on a
    10M-row build's 1.3M-row sample. Sub-clusters train on ~39 points each, some a few less, so
    FAISS's "please provide at least" warning is turned off (``min_points_per_centroid=1``).
    """
    dim = x.shape[1]
    top = faiss.Kmeans(dim, int(math.sqrt(nlist)), niter=niter, seed=seed, spherical=spherical,
                       max_points_per_centroid=2000)  # fmt: skip
    top.train(x)
    _, assigned = top.assign(x)
    counts = np.bincount(assigned, minlength=top.k)
    shares = apportion(counts, nlist)
    order = assigned.argsort()  # as FAISS orders the points: the sub-k-means sample from it
    starts = np.concatenate([[0], np.cumsum(counts)])
    parts: list[Any] = []
    for cluster in np.flatnonzero(shares):
        members = x[order[starts[cluster] : starts[cluster + 1]]]
        if shares[cluster] == len(members):
            parts.append(members)
            continue
        # FAISS's sub-clusterings keep Kmeans' default 25 iterations
        sub = faiss.Kmeans(dim, int(shares[cluster]), seed=seed, spherical=spherical,
                           min_points_per_centroid=1)  # fmt: skip
        sub.train(members)
        parts.append(sub.centroids)
    return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)


def apportion(counts: np.ndarray, total: int) -> np.ndarray:
    """``total`` shares ``[C]`` in proportion to ``counts`` ``[C]`` (FAISS's rounding by
    cumulative sums), each non-empty count getting at least 1 and none more than its count."""
    counts = np.asarray(counts, dtype=np.int64)
    if total > counts.sum():
        raise ValueError(f"cannot share {total} among {counts.sum()} points")
    shares = np.diff(np.concatenate([[0], np.cumsum(counts) * total // counts.sum()]))
    shares = np.minimum(np.maximum(shares, (counts > 0).astype(np.int64)), counts)
    while shares.sum() > total:  # the minimum of 1 took a few: from the largest shares
        shares[np.argmax(shares)] -= 1
    while shares.sum() < total:  # the cap took a few: to the clusters with points to spare
        shares[np.argmax(counts - shares)] += 1
    return shares


def _empty_index(spec: IndexSpec, rows: int, dim: int) -> faiss.Index | None:
    """The untrained index of a concrete ``spec`` for ``rows`` rows, or ``None`` (with a warning)
    where the rows are too few to train its IVF lists or PQ codebooks."""
    index = faiss.index_factory(dim, spec.factory_string(rows), faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.try_extract_index_ivf(index)
    needs = max(MIN_POINTS_PER_CENTROID, 2**spec.pq_bits if spec.type == "ivf-pq" else 0)
    if spec.type == "factory":
        needs = int(ivf.nlist) if ivf is not None else 0  # FAISS warns below 39 a list
    elif ivf is None:
        needs = 0
    if rows < needs:
        if rows:
            _warn_exact(f"{rows} rows are too few to train index {spec} (needs >= {needs})")
        return None
    if spec.nlist is not None and ivf is not None and ivf.nlist < spec.nlist:
        warnings.warn(
            f"{rows} rows train at most {ivf.nlist} IVF lists (39 points each); using "
            f"nlist={ivf.nlist} instead of {spec.nlist}",
            stacklevel=3,
        )
    if spec.type == "hnsw":
        hnsw: Any = index
        hnsw.hnsw.efConstruction = spec.ef_construction
    _seed(index)
    return index


@contextmanager
def _assigning(index: faiss.Index) -> Iterator[None]:
    """While rows are added: an HNSW coarse quantiser of up to :data:`EXACT_ASSIGN_MAX_NLIST`
    centroids is replaced by an exact flat index over the same centroids (each row lands in its
    nearest list, faster), a larger one searches :data:`ADD_QUANTIZER_EF_SEARCH` wide; the HNSW
    quantiser serves the searches afterwards, as FAISS's guidelines intend."""
    ivf: Any = faiss.try_extract_index_ivf(index)
    quantizer: Any = None if ivf is None else faiss.downcast_index(ivf.quantizer)
    if not isinstance(quantizer, faiss.IndexHNSW):
        yield
        return
    if ivf.nlist > EXACT_ASSIGN_MAX_NLIST:
        quantizer.hnsw.efSearch = max(int(quantizer.hnsw.efSearch), ADD_QUANTIZER_EF_SEARCH)
        yield
        return
    exact = faiss.IndexFlat(int(ivf.d), quantizer.metric_type)
    exact.add(quantizer.storage.reconstruct_n(0, int(quantizer.ntotal)))
    ivf.quantizer = exact
    try:
        yield
    finally:
        ivf.quantizer = quantizer  # owned by the index again (own_fields), as before


def _add_rows(
    index: faiss.Index, block: np.ndarray, first_id: int, lists: CoarseLists | None
) -> None:
    """Add ``block`` ``[n, D]`` float32 to an IVF ``index`` as rows ``first_id ..``, each into its
    nearest list or, with ``lists``, into the list it gives."""
    if lists is None:
        index.add_with_ids(block, np.arange(first_id, first_id + len(block), dtype=np.int64))
    else:
        _add_preassigned(index, block, first_id, lists)


def _add_preassigned(
    index: faiss.Index, block: np.ndarray, first_id: int, lists: CoarseLists
) -> None:
    """Add ``block`` ``[n, D]`` float32 as rows ``first_id ..`` into the lists ``lists`` gives."""
    assigned = lists.list_of_row[first_id : first_id + len(block)]
    if len(assigned) != len(block):
        raise ValueError(f"rows {first_id}.. are beyond the {len(lists.list_of_row)} rows listed")
    ids = np.arange(first_id, first_id + len(block), dtype=np.int64)
    add_preassigned(faiss.downcast_index(index), block, np.ascontiguousarray(assigned), ids)


def check_lists(spec: IndexSpec, lists: CoarseLists, rows: int, dim: int) -> None:
    """Refuse (:class:`InputError`) ``lists`` that the concrete ``spec``'s index over ``rows``
    rows of dim ``dim`` cannot be built into (before anything is written)."""
    index = faiss.index_factory(dim, spec.factory_string(rows), faiss.METRIC_INNER_PRODUCT)
    _check_lists(index, spec, lists, rows, dim)


def _check_lists(
    index: faiss.Index, spec: IndexSpec, lists: CoarseLists, rows: int, dim: int
) -> None:
    """Refuse ``lists`` the empty ``index`` of ``spec`` cannot be built into."""
    if faiss.try_extract_index_ivf(index) is None:
        raise InputError(f"index {spec} has no IVF lists to reuse lists for")
    if not isinstance(faiss.downcast_index(index), faiss.IndexIVF):
        raise InputError(
            f"reusing IVF lists needs a plain IVF index (no transform or refinement); {spec} "
            f"builds {type(faiss.downcast_index(index)).__name__}"
        )
    ivf: Any = faiss.downcast_index(index)
    if lists.centroids.shape != (ivf.nlist, dim) or len(lists.list_of_row) != rows:
        raise InputError(
            f"the lists to reuse have {lists.centroids.shape[0]} centroids of dim "
            f"{lists.centroids.shape[1]} over {len(lists.list_of_row)} rows; index {spec} needs "
            f"{ivf.nlist} of dim {dim} over {rows} rows"
        )


def _warn_exact(reason: str) -> None:
    warnings.warn(f"{reason}; using an exact flat index instead", stacklevel=4)


def build_index_streaming(
    blocks: Blocks,
    rows: int,
    dim: int,
    spec: IndexSpec,
    *,
    ondisk_path: Path | None = None,
    part_rows: int = PART_ROWS,
    lists: CoarseLists | None = None,
) -> faiss.Index:
    """Build the index of ``spec`` (``auto`` resolved for ``rows``) over the ``rows`` rows that
    ``blocks`` yields (``[n_i, dim]``, any float dtype, read twice: sample, then add).

    Args:
        ondisk_path: where an ``ondisk`` IVF index keeps its inverted lists (the index records
            this file; :func:`~retclip.database.index.move_ondisk_file` moves it). Part files are
            written beside it and removed. Without it an ``ondisk`` spec is built in memory.
        part_rows: rows per part of an on-disk build.
        lists: the IVF lists of an index over these rows to reuse (:class:`CoarseLists`); ``spec``
            must be a plain IVF index (no transform or refinement) with as many lists.

    Returns:
        The index with ``spec``'s search settings; row ``i`` has id ``i``.
    """
    spec = spec.resolve(rows, dim).check_dim(dim)
    index = _empty_index(spec, rows, dim)
    if lists is not None:
        if index is None:
            raise InputError(f"index {spec} over {rows} rows has no IVF lists to reuse")
        _check_lists(index, spec, lists, rows, dim)
        ivf: Any = faiss.downcast_index(index)
        ivf.quantizer.add(lists.centroids)  # trained: index.train below trains only the codes
    if index is not None and not index.is_trained:
        sample = gather_rows(blocks, sample_ids(rows, training_rows(index, rows), TRAIN_SEED), dim)
        try:
            _train(index, sample)
        except RuntimeError as error:  # e.g. fewer rows than a PQ codebook's codes
            if rows > AUTO_EXACT_MAX_ROWS:  # an exact index this size may not even fit memory
                raise DatabaseError(
                    f"index {spec} could not be trained on {len(sample)} of {rows} rows: "
                    f"{faiss_message(error)}"
                ) from None
            _warn_exact(f"index {spec} cannot be trained on {rows} rows ({faiss_message(error)})")
            index = None
        del sample
    if index is None:
        index, spec = faiss.IndexFlatIP(dim), IndexSpec("flat")
    with _assigning(index):
        if spec.ondisk and ondisk_path is not None:
            part_dir = Path(tempfile.mkdtemp(prefix=".parts-", dir=ondisk_path.parent))
            try:
                parts = []
                for number, part in enumerate(index_parts(index, blocks, part_rows, lists)):
                    parts.append(part_dir / f"{number:05d}.faiss")
                    faiss.write_index(part, str(parts[-1]))
                    del part
                merge_parts(index, parts, ondisk_path)
            finally:
                for path in part_dir.iterdir():
                    path.unlink()
                part_dir.rmdir()
        else:
            start = 0
            for block in float_blocks(blocks):
                if lists is None:
                    index.add(block)
                else:
                    _add_preassigned(index, block, start, lists)
                start += len(block)
    if int(index.ntotal) != rows:
        raise ValueError(f"the blocks held {index.ntotal} rows; {rows} were announced")
    configure_search(index, spec)
    return index


def index_part(
    trained: faiss.Index, features: np.ndarray, first_id: int, lists: CoarseLists | None = None
) -> faiss.Index:
    """A copy of the empty ``trained`` IVF index holding ``features`` ``[n, D]`` as rows
    ``first_id ..`` (what one worker of a distributed build returns, or writes to a file)."""
    part = faiss.clone_index(trained)
    _add_rows(part, np.ascontiguousarray(features, dtype=np.float32), first_id, lists)
    return part


def index_parts(
    trained: faiss.Index, blocks: Blocks, part_rows: int, lists: CoarseLists | None = None
) -> Iterator[faiss.Index]:
    """The blocks' rows in consecutive parts of about ``part_rows`` rows (:func:`index_part`)."""
    start, part = 0, None
    for block in float_blocks(blocks):
        if part is None:
            part = index_part(trained, block, start, lists)
        else:
            _add_rows(part, block, start, lists)
        start += len(block)
        if part.ntotal >= part_rows:
            yield part
            part = None
    if part is not None:
        yield part


def merge_parts(trained: faiss.Index, parts: Sequence[Path], ondisk_path: Path) -> None:
    """Merge the part files (indexes of disjoint row ids, each a copy of ``trained``) into
    ``trained``'s inverted lists, kept on disk in ``ondisk_path`` (FAISS's ``OnDiskInvertedLists``;
    the parts are read memory-mapped, so together they need not fit in memory either). This is
    ``faiss.contrib.ondisk.merge_ondisk``, holding the parts only while it merges."""
    ivf: Any = faiss.extract_index_ivf(trained)
    if trained.ntotal:
        raise ValueError("merge_parts needs the empty trained index")
    loaded = [faiss.read_index(str(path), faiss.IO_FLAG_MMAP) for path in parts]
    sources: Any = getattr(faiss, "InvertedListsPtrVector")()  # noqa: B009 (not in faiss's stubs)
    for part in loaded:
        sources.push_back(faiss.extract_index_ivf(part).invlists)
    lists: Any = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(ondisk_path))
    ntotal = lists.merge_from_multiple(sources.data(), sources.size(), False)
    trained.ntotal = ivf.ntotal = ntotal
    ivf.replace_invlists(lists, True)
    lists.this.disown()  # owned by the index now
    del sources, loaded


__all__ = [
    "Blocks",
    "CoarseLists",
    "apportion",
    "build_index",
    "build_index_streaming",
    "check_lists",
    "gather_rows",
    "index_part",
    "index_parts",
    "merge_parts",
    "sample_ids",
    "training_rows",
    "training_sample_size",
    "two_level_kmeans",
]
