"""Retrieval: FAISS flat / IVF-Flat / IVF-PQ / HNSW against exact NumPy search.

Features are clustered like real segment embeddings (many classes, a shared CLIP-like mean
direction, unit norm); queries are fresh samples of the same distribution. For each database size
and index: build time, memory the index keeps (RSS growth), queries/s of one batched search, and
recall@10 against the exact top-10. ``auto`` is :class:`~retclip.database.index.IndexSpec`'s
automatic choice by size.

    OMP_NUM_THREADS=1 python -m bench.bench_retrieval --rows 10000 100000 1000000
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence

import faiss
import numpy as np

from bench.common import (
    base_parser,
    interleaved,
    markdown_table,
    median,
    mib,
    report,
    results_path,
    set_threads,
)
from retclip.database.index import IndexSpec, search_index
from retclip.database.index_build import build_index

DIM = 768
K = 10
#: Index specs compared (besides exact NumPy); HNSW above ``--hnsw-max-rows`` is skipped.
DEFAULT_SPECS = (
    "flat",
    "ivf-flat:nprobe=8",
    "ivf-flat:nprobe=16",
    "ivf-flat:nprobe=32",
    "ivf-flat:nprobe=64",
    "ivf-pq:pq_m=48,nprobe=32",
    "hnsw:hnsw_m=32,ef_construction=80,ef_search=64",
    "auto",
)


def clustered_features(
    rows: int, dim: int = DIM, classes: int = 1000, *, seed: int = 0, spread: float = 0.8
) -> tuple[np.ndarray, np.ndarray]:
    """``[rows, dim]`` float32 unit vectors around ``classes`` centres, and ``[rows]`` labels.

    Each centre is a shared mean direction plus a random class direction (CLIP embeddings share
    a large common component); each row adds isotropic noise with ``spread`` times the class
    direction's norm, so a class's rows have cosine ~0.6 with their centre. Generated in chunks
    (float32 throughout) so 1M rows need no float64 copy.
    """
    centre_rng = np.random.default_rng(1234)
    common = centre_rng.standard_normal(dim).astype(np.float32)
    common /= np.linalg.norm(common)
    centres = centre_rng.standard_normal((classes, dim)).astype(np.float32) / np.sqrt(dim)
    centres += 0.7 * common
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, rows)
    out = np.empty((rows, dim), np.float32)
    for start in range(0, rows, 65536):
        part = labels[start : start + 65536]
        noise = rng.standard_normal((len(part), dim), dtype=np.float32) * (spread / np.sqrt(dim))
        chunk = centres[part] + noise
        out[start : start + len(part)] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    return out, labels


def exact_search(features: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """``[Q, k]`` ids of the exact top-``k`` inner products (NumPy, in blocks of queries)."""
    ids = np.empty((len(queries), k), np.int64)
    for start in range(0, len(queries), 64):
        sims = queries[start : start + 64] @ features.T
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1)
        ids[start : start + 64] = np.take_along_axis(top, order, axis=1)
    return ids


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of each query's exact top-k found in its returned top-k."""
    hits = [len(np.intersect1d(f[f >= 0], e)) for f, e in zip(found, exact, strict=True)]
    return float(np.mean(hits)) / exact.shape[1]


def index_bytes(index: faiss.Index) -> int:
    """Bytes an index keeps in memory: stored vectors or codes, ids, graph links, centroids."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        lists = ivf.invlists.compute_ntotal() * (ivf.code_size + 8)
        return int(lists + ivf.quantizer.ntotal * ivf.d * 4)
    if isinstance(index, faiss.IndexHNSW):
        links = index.hnsw.neighbors.size() * 4 + index.hnsw.offsets.size() * 8
        return int(index.storage.ntotal * index.d * 4 + links)
    return int(index.ntotal * index.code_size)


def _timed(fn: Callable[[], object], repeats: int) -> tuple[object, float]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return result, median(times)


def bench_size(
    rows: int, specs: Sequence[str], queries: int, repeats: int, hnsw_max_rows: int
) -> list[list[object]]:
    """Table rows for one database size."""
    features, _ = clustered_features(rows)
    query_set, _ = clustered_features(queries, seed=1 + rows)
    exact, exact_s = _timed(lambda: exact_search(features, query_set, K), repeats)
    assert isinstance(exact, np.ndarray)
    table: list[list[object]] = [
        [rows, "exact numpy", "—", 0.0, mib(features.nbytes), queries / exact_s, 1.0, 1.0]
    ]
    built: dict[str, tuple[faiss.Index, float]] = {}
    for text in specs:
        spec = IndexSpec.parse(text)
        if spec.type == "hnsw" and rows > hnsw_max_rows:
            table.append([rows, text, "skipped (build too slow here)", "", "", "", "", ""])
            continue
        resolved = spec.resolve(rows)
        key = str(resolved.build_params())
        if key not in built:  # specs differing only in search settings share one build
            gc.collect()
            start = time.perf_counter()
            built[key] = (build_index(features, spec), time.perf_counter() - start)
        index, build_s = built[key]
        kept = index_bytes(index)
        results: list[tuple[np.ndarray, np.ndarray]] = []
        times = interleaved(
            {
                "exact": lambda: exact_search(features, query_set, K),
                "index": lambda index=index, resolved=resolved, results=results: results.append(
                    search_index(index, resolved, query_set, K)
                ),
            },
            repeats,
            warmup=0,
        )
        exact_s, search_s = median(times["exact"]), median(times["index"])
        recall = recall_at_k(results[-1][1], exact)
        table.append(
            [rows, text, str(resolved), build_s, mib(kept), queries / search_s,
             exact_s / search_s, recall]
        )  # fmt: skip
    return table


def main(argv: Sequence[str] | None = None) -> str:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--specs", nargs="+", default=list(DEFAULT_SPECS))
    parser.add_argument("--hnsw-max-rows", type=int, default=100_000)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    table: list[list[object]] = []
    for rows in args.rows:
        table += bench_size(rows, args.specs, args.queries, args.repeats, args.hnsw_max_rows)
    headers = ["rows", "index", "resolved", "build s", "index MiB", "queries/s",
               "× exact", "recall@10"]  # fmt: skip
    notes = (
        f"dim {DIM}, 1000 clustered classes, {args.queries} queries in one batched search, "
        f"top-{K}; medians of {args.repeats}. '× exact' = speed relative to exact NumPy search."
    )
    return report(
        "Retrieval: FAISS indexes vs exact search",
        [markdown_table(headers, table)],
        results=results_path(args),
        notes=notes,
    )


if __name__ == "__main__":
    main()
