"""Recall of an index measured against exact search on a sample of the indexed rows themselves.

:func:`evaluate_recall` draws a seeded sample of the rows as queries, finds their exact top-``k``
by streaming the rows block by block through an exact FAISS search
(``faiss.contrib.exhaustive_search.knn_ground_truth``, so the rows need not fit in memory), searches
the index with its search settings, and reports recall@k: the fraction of the exact top ``k`` found
in the index's top ``k``. A row trivially finds itself, so each query's own row is left out of
both lists first (recall is then about its neighbours, as for a fresh query).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import faiss
import numpy as np
from faiss.contrib.exhaustive_search import knn_ground_truth

from retclip.database.index import IndexSpec, search_index
from retclip.database.index_build import Blocks, float_blocks, gather_rows, sample_ids
from retclip.errors import InputError

#: Default neighbours counts reported.
DEFAULT_KS = (1, 10, 100)


@dataclasses.dataclass(frozen=True)
class RecallReport:
    """Recall@k of an index against exact search, and the search speed of both."""

    index: str  #: the index as built (resolved spec text)
    rows: int
    sample: int  #: query rows drawn from the indexed rows
    seed: int
    recall: dict[int, float]  #: k -> mean recall@k over the sampled rows
    index_ms: float  #: per query, one batched search of the index
    exact_ms: float  #: per query, exact search streaming every row

    def table(self) -> str:
        """A short text table (what ``retclip db index --evaluate`` prints)."""
        lines = [
            f"index {self.index}: {self.rows} rows, {self.sample} sampled rows as queries "
            f"(seed {self.seed}), each row's own match left out",
            f"{'k':>6}  recall@k",
            *(f"{k:>6}  {value:.3f}" for k, value in self.recall.items()),
            f"search {self.index_ms:.3g} ms/query (index), {self.exact_ms:.3g} ms/query (exact)",
        ]
        return "\n".join(lines)


def _without_self(ids: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
    """``ids`` ``[Q, k + 1]`` less each row's first occurrence of its own id: ``[Q, k]``."""
    is_self = ids == own[:, None]
    is_self &= np.cumsum(is_self, axis=1) == 1
    order = np.argsort(is_self, axis=1, kind="stable")  # the own id (if found) moves last
    return np.take_along_axis(ids, order, axis=1)[:, :k]


def exact_neighbours(queries: np.ndarray, blocks: Blocks, k: int) -> np.ndarray:
    """Ids ``[Q, k]`` of the exact top-``k`` inner products of ``queries`` ``[Q, D]`` over the
    rows ``blocks`` yields, streamed block by block (the rows need not fit in memory)."""
    _, ids = knn_ground_truth(
        np.ascontiguousarray(queries, dtype=np.float32),
        float_blocks(blocks),
        k,
        metric_type=faiss.METRIC_INNER_PRODUCT,
        ngpu=0,
    )
    return ids


def recall_at(
    found: np.ndarray, exact: np.ndarray, own: np.ndarray, ks: Sequence[int]
) -> dict[int, float]:
    """Mean recall@k for each ``k`` of ``ks``: of the exact top ``k`` (``exact`` ``[Q, K+1]``),
    the fraction in ``found``'s top ``k`` (``[Q, K+1]``, ``-1`` padded), once each query's own
    row id ``own`` ``[Q]`` is left out of both."""
    top = max(ks)
    found, exact = _without_self(found, own, top), _without_self(exact, own, top)
    recall = {}
    for k in ks:
        hits = (found[:, :k, None] == exact[:, None, :k]) & (found[:, :k, None] >= 0)
        recall[k] = float(hits.any(axis=2).sum(axis=1).mean() / k)
    return recall


def evaluate_recall(
    index: faiss.Index,
    spec: IndexSpec,
    blocks: Blocks,
    rows: int,
    *,
    sample: int = 1000,
    ks: Sequence[int] = DEFAULT_KS,
    seed: int = 0,
) -> RecallReport:
    """Recall@k of ``index`` (searched with ``spec``'s settings) over the ``rows`` rows that
    ``blocks`` yields in index order, on ``sample`` rows drawn with ``seed``.

    ``ks`` larger than the other rows are clamped to them. Raises :class:`InputError` for a
    non-positive ``sample`` or ``k``, or fewer than two rows.
    """
    if sample < 1 or not ks or any(k < 1 for k in ks):
        raise InputError(f"sample={sample}, k={list(ks)}; expected positive integers")
    if rows < 2:
        raise InputError(f"recall needs at least 2 rows; the index has {rows}")
    ks = sorted({min(int(k), rows - 1) for k in ks})
    ids = sample_ids(rows, min(sample, rows), seed)
    queries = gather_rows(blocks, ids, int(index.d))
    start = time.perf_counter()
    exact = exact_neighbours(queries, blocks, ks[-1] + 1)
    exact_s = time.perf_counter() - start
    start = time.perf_counter()
    _, found = search_index(index, spec, queries, ks[-1] + 1)
    index_s = time.perf_counter() - start
    return RecallReport(
        index=_describe(spec.resolve(rows, int(index.d)), index),
        rows=rows,
        sample=len(ids),
        seed=seed,
        recall=recall_at(found, exact, ids, ks),
        index_ms=1000 * index_s / len(ids),
        exact_ms=1000 * exact_s / len(ids),
    )


def _describe(spec: IndexSpec, index: faiss.Index) -> str:
    """The resolved spec, or "flat (exact)" where too few rows made the build exact."""
    if isinstance(faiss.downcast_index(index), faiss.IndexFlat):
        return "flat (exact)"
    return str(spec)
