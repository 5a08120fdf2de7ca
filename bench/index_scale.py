"""Indexes at scale: streaming FAISS builds over millions of clustered 768-d rows never in memory.

Rows are the clustered synthetic features of ``bench_retrieval`` (1000 classes around a shared
mean direction, unit norm), generated block by block from per-block seeds, so every pass (training
sample, adding, exact search) regenerates them and no pass holds them all: 10M x 768 float32 is
30 GB. For each size and index spec: build time (training part), peak resident memory of the
build, bytes per row on disk (``index.faiss`` plus on-disk lists), recall@10 against exact search
on sampled rows of the index itself (their own match left out, as ``retclip db index --evaluate``
does) and queries/s of the index loaded back memory-mapped (the serving path), next to exact
FAISS search streamed over the rows (generation time excluded). Then a projection of memory and
build time to 100M and 1B rows from the measured rates.

    OMP_NUM_THREADS=1 python -m bench.index_scale --rows 1000000 --threads 2
    python -m bench.index_scale --measured bench/measured/index_scale_10m.json  # the 10M run
    python -m bench.index_scale --quick --no-save          # seconds, for the smoke test
"""

from __future__ import annotations

import argparse
import datetime
import gc
import hashlib
import json
import math
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from bench.bench_retrieval import clustered_features
from bench.common import (
    PeakMemory,
    StageTimer,
    command_line,
    gib,
    machine_info,
    markdown_table,
    median,
    report,
    results_path,
    rss_bytes,
    set_threads,
)
from retclip.database import index_build
from retclip.database.index import IndexSpec, load_index, ondisk_file, save_index, search_index
from retclip.database.index_build import (
    CoarseLists,
    build_index_streaming,
    gather_rows,
    sample_ids,
)
from retclip.database.index_recall import recall_at

K = 10
BLOCK_ROWS = 65_536
#: ``auto`` with the memory budget, and two alternatives: compressed codes behind the same
#: coarse quantiser, and SQ8 lists kept on disk. ``{nlist}`` / ``{nprobe}`` are auto's for the
#: size; ``{pq_m}`` is 64 (FAISS's largest usual PQ code) or ``D / 8`` for small dimensions.
DEFAULT_SPECS = (
    "auto:memory_gb={memory_gb}",
    "factory:IVF{nlist}_HNSW32,PQ{pq_m}np,nprobe={nprobe},quantizer_efSearch={ef}",
    "factory:IVF{nlist}_HNSW32,SQ8,nprobe={nprobe},quantizer_efSearch={ef},ondisk=1",
)
#: One size's measurements (:func:`measure_size`): JSON, as ``--keep`` writes and ``--measured``
#: reads it.
Record = dict[str, Any]
QUICK = {"rows": [10_000], "dim": 64, "queries": 200, "memory_gb": 0.002, "classes": 100}


class Synthetic:
    """``rows`` clustered unit rows ``[rows, dim]`` as a re-iterable source of float32 blocks;
    counts the seconds spent generating them (so exact search can be timed without it)."""

    def __init__(self, rows: int, dim: int, classes: int) -> None:
        self.rows, self.dim, self.classes = rows, dim, classes
        self.generation_s = 0.0

    def __call__(self) -> Iterator[np.ndarray]:
        for number, start in enumerate(range(0, self.rows, BLOCK_ROWS)):
            began = time.perf_counter()
            n = min(BLOCK_ROWS, self.rows - start)
            block, _ = clustered_features(n, self.dim, self.classes, seed=10_000 + number)
            self.generation_s += time.perf_counter() - began
            yield block


def expand(text: str, rows: int, dim: int, memory_gb: float) -> str:
    """A spec template of :data:`DEFAULT_SPECS` with auto's lists, probes and quantiser search
    width for the size."""
    auto = IndexSpec("auto", memory_gb=memory_gb).resolve(rows, dim)
    found = dict(re.findall(r"(\w+)=(\d+)", auto.search))
    nlist = re.search(r"IVF(\d+)", auto.factory or "")
    return text.format(
        memory_gb=memory_gb,
        nlist=nlist.group(1) if nlist else 256,
        nprobe=found.get("nprobe", 16),
        ef=found.get("quantizer_efSearch", 128),
        pq_m=64 if dim >= 512 else dim // 8,
    )


def exact_search(queries: np.ndarray, source: Synthetic, k: int) -> tuple[np.ndarray, float]:
    """Exact top-``k`` ids ``[Q, k]`` streamed over the rows, and the seconds spent searching
    (generation excluded): FAISS flat search per block, merged in a ``ResultHeap``."""
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    flat = faiss.IndexFlatIP(source.dim)
    searching, start = 0.0, 0
    for block in source():
        began = time.perf_counter()
        flat.add(block)
        sims, ids = flat.search(queries, k)
        flat.reset()
        heap.add_result(sims, np.where(ids >= 0, ids + start, -1))
        searching += time.perf_counter() - began
        start += len(block)
    heap.finalize()
    return heap.I, searching


def cached_queries(source: Synthetic, own: np.ndarray, keep: Path | None) -> np.ndarray:
    """The rows ``own`` of ``source`` (one pass over the rows), kept in ``keep`` when given."""
    path = None
    if keep is not None:
        key = hashlib.sha1(own.tobytes()).hexdigest()[:12]
        path = keep / f"queries-{source.rows}-{source.dim}-{source.classes}-{key}.npy"
        if path.is_file():
            return np.load(path)
    queries = gather_rows(source, own, source.dim)
    if path is not None:
        np.save(path.with_suffix(".tmp.npy"), queries)
        path.with_suffix(".tmp.npy").replace(path)
    return queries


def cached_exact_search(
    queries: np.ndarray, source: Synthetic, keep: Path | None
) -> tuple[np.ndarray, float]:
    """:func:`exact_search` for the top ``K + 1``, kept in ``keep`` (when given) for a rerun."""
    path = None
    if keep is not None:
        key = hashlib.sha1(queries.tobytes()).hexdigest()[:12]
        path = keep / f"exact-{source.rows}-{source.dim}-{key}.npz"
        if path.is_file():
            with np.load(path) as kept:
                return kept["ids"], float(kept["seconds"])
    ids, seconds = exact_search(queries, source, K + 1)
    if path is not None:
        np.savez(path.with_suffix(".tmp.npz"), ids=ids, seconds=seconds)
        path.with_suffix(".tmp.npz").replace(path)
    print(f"exact search at {source.rows:,} rows: {seconds:.1f} s", flush=True)
    return ids, seconds


def bench_spec(
    template: str, source: Synthetic, queries: np.ndarray, own: np.ndarray, exact: np.ndarray,
    options: argparse.Namespace, workdir: Path, *,
    reuse: CoarseLists | None = None, give_lists: bool = False,
) -> tuple[dict[str, object], CoarseLists | None]:  # fmt: skip
    """Build, save, reload memory-mapped and search one index spec over ``source``; with
    ``reuse``, into those IVF lists (codes only); with ``give_lists``, also return its lists."""
    text = expand(template, source.rows, source.dim, options.memory_gb)
    repeats = options.repeats
    spec = IndexSpec.parse(text)
    built = spec.resolve(source.rows, source.dim)
    if options.keep is not None:  # a resumable run: one folder a spec and size, kept
        name = f"{source.rows} {source.dim} {text} {'reused' if reuse is not None else 'own'}"
        folder = workdir / f"{source.rows}-{hashlib.sha1(name.encode()).hexdigest()[:12]}"
        if (folder / "result.json").is_file():
            print(f"{text} at {source.rows:,} rows: measured before, in {folder}")
            lists = None
            if give_lists:
                lists = CoarseLists.of(load_index(folder / "index.faiss", mmap=True))
            return dict(json.loads((folder / "result.json").read_text())), lists
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    else:
        folder = Path(tempfile.mkdtemp(dir=workdir))
    timer = StageTimer()
    gc.collect()
    try:
        with PeakMemory() as memory, timer.patch([("train", index_build, "_train")]):
            began, cpu_began = time.perf_counter(), time.process_time()
            index = build_index_streaming(
                source, source.rows, source.dim, spec, ondisk_path=folder / "lists.ivfdata",
                lists=reuse,
            )  # fmt: skip
            build_s = time.perf_counter() - began
            build_cpu_s = time.process_time() - cpu_began
        save_index(index, folder / "index.faiss")
        ondisk = ondisk_file(index)
        given = CoarseLists.of(index) if give_lists else None
        del index
        gc.collect()
        size = sum(path.stat().st_size for path in folder.iterdir() if path.is_file())
        loaded = load_index(folder / "index.faiss", mmap=True)
        results = []
        times = []
        for _ in range(repeats + 1):  # the first search warms the page cache
            began = time.perf_counter()
            results.append(search_index(loaded, built, queries, K + 1)[1])
            times.append(time.perf_counter() - began)
        search_s = median(times[1:]) if repeats else times[0]
        recall = recall_at(results[-1], exact, own, [K])[K]
        del loaded
        result: dict[str, object] = {
            "rows": source.rows, "template": template, "spec": text, "built": str(built),
            "build_s": build_s, "build_cpu_s": build_cpu_s,
            "train_s": timer.seconds.get("train", 0.0),
            "peak_gib": gib(memory.peak), "bytes_per_row": size / source.rows, "recall": recall,
            "qps": len(queries) / search_s, "ondisk": ondisk is not None,
            "lists_reused": reuse is not None, "threads": options.threads,
        }  # fmt: skip
        if options.keep is not None:
            (folder / "result.json").write_text(json.dumps(result))
        print(f"{text} at {source.rows:,} rows: {json.dumps(result)}", flush=True)
        return result, given
    finally:
        if options.keep is None:
            shutil.rmtree(folder, ignore_errors=True)


def projection(
    measured: Sequence[Record], rows: int, dim: int, memory_gb: float
) -> list[list[object]]:
    """Each measured spec at 100M and 1B rows with the same codes: its template expanded for the
    size, the memory budget scaled with the rows. Index memory from the code size (codes and
    8-byte ids a row, float32 centroids with HNSW32 links), the float32 training sample, training
    time scaled from the measured one by the two-level k-means work (sample x 2 sqrt(nlist)),
    adding scaled from the measured rows/s by the work of assigning a row (:func:`assign_work`;
    the measured rate also includes generating and encoding the rows, which does not grow with
    the lists, so more lists over-estimate it). A spec built into another's lists is projected
    from that one's training and adding (a build anew trains and assigns alike; the codes cost
    little beside)."""
    table: list[list[object]] = []
    by_spec = {str(row["spec"]): row for row in measured}
    for row in measured:
        timed = by_spec.get(str(row.get("lists_of")), row)
        train_s = float(timed["train_s"])
        add_rate = rows / max(float(timed["build_s"]) - train_s, 1e-9)
        nlist_now = _shape(IndexSpec.parse(str(row["spec"])).resolve(rows, dim), rows, dim)[0]
        work_now = index_build.training_sample_size(nlist_now, rows) * math.sqrt(nlist_now)
        assign_now = assign_work(nlist_now)
        for target in (100_000_000, 1_000_000_000):
            budget = memory_gb * target / rows
            text = expand(str(row["template"]), target, dim, budget)
            at = IndexSpec.parse(text).resolve(target, dim)
            nlist, code_bytes, id_bytes = _shape(at, target, dim)
            index_gib = gib(target * (code_bytes + id_bytes) + nlist * (dim * 4 + 256))
            sample = index_build.training_sample_size(nlist, target)
            train_h = train_s * sample * math.sqrt(nlist) / max(work_now, 1.0) / 3600
            add_h = target / add_rate * assign_work(nlist) / assign_now / 3600
            shown = "—" if nlist_now <= 1 < nlist else f"{add_h:.1f}"  # no lists measured
            table.append(
                [f"{target:,}", text, str(at), f"{index_gib:.0f}", f"{gib(sample * dim * 4):.1f}",
                 f"{train_h:.1f}", shown]
            )  # fmt: skip
    return table


def assign_work(nlist: int) -> float:
    """Relative cost of assigning one row to one of ``nlist`` lists while adding: a flat search
    over the centroids (work ~ nlist) up to ``EXACT_ASSIGN_MAX_NLIST`` lists, the HNSW quantiser
    (~ log nlist) above, from the flat cost at that bound (``index_build``: HNSW at efSearch 128
    took 1.2-2.4 ms a 768-d row, flat search 0.7 ms over 32768 centroids); 1 without lists."""
    limit = index_build.EXACT_ASSIGN_MAX_NLIST
    if nlist <= limit:
        return float(nlist)
    return limit * math.log2(nlist) / math.log2(limit)


def plain_ivf_lists(template: str, rows: int, options: argparse.Namespace) -> int | None:
    """The list count of a template's index if it is a plain IVF index (its lists reusable)."""
    text = expand(template, rows, options.dim, options.memory_gb)
    spec = IndexSpec.parse(text).resolve(rows, options.dim)
    index = faiss.index_factory(options.dim, spec.factory_string(rows), faiss.METRIC_INNER_PRODUCT)
    index = faiss.downcast_index(index)
    return int(index.nlist) if isinstance(index, faiss.IndexIVF) else None


def _nlist(lists: CoarseLists) -> int:
    return int(lists.centroids.shape[0])


def _shape(spec: IndexSpec, rows: int, dim: int) -> tuple[int, int, int]:
    """``(nlist, code bytes a row, id bytes a row)`` of a concrete spec over ``rows`` rows."""
    index = faiss.index_factory(dim, spec.factory_string(rows), faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return 1, int(index.sa_code_size()), 0
    return int(ivf.nlist), int(ivf.code_size), 8


def measure_size(rows: int, args: argparse.Namespace, workdir: Path) -> Record:
    """Exact search and every spec of ``args.specs`` at ``rows`` rows: the size's record (what
    :func:`table_rows` and :func:`projection` read), also written to ``--keep``'s folder."""
    source = Synthetic(rows, args.dim, args.classes)
    own = sample_ids(rows, min(args.queries, rows), seed=0)
    queries = cached_queries(source, own, workdir if args.keep else None)
    source.generation_s = 0.0
    exact, exact_s = cached_exact_search(queries, source, workdir if args.keep else None)
    measured: list[Record] = []
    base: tuple[Record, CoarseLists] | None = None
    for number, template in enumerate(args.specs):
        reuse = None
        if base is not None and plain_ivf_lists(template, rows, args) == _nlist(base[1]):
            reuse = base[1]
        row, lists = bench_spec(
            template, source, queries, own, exact, args, workdir, reuse=reuse,
            give_lists=args.reuse_lists and number == 0
            and plain_ivf_lists(template, rows, args) is not None,
        )  # fmt: skip
        if lists is not None:
            base = (row, lists)
        if reuse is not None and base is not None:  # projected from the base's lists
            row["lists_of"] = base[0]["spec"]
        measured.append(row)
    record: Record = {
        "rows": rows, "dim": args.dim, "classes": args.classes, "queries": len(queries),
        "memory_gb": args.memory_gb, "threads": args.threads,
        "exact_qps": len(queries) / exact_s, "results": measured,
        "measured": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command_line(), "machine": machine_info(),
    }  # fmt: skip
    if args.keep is not None:
        path = workdir / f"measured-{rows}.json"
        path.with_suffix(".tmp").write_text(json.dumps(record, indent=1))
        path.with_suffix(".tmp").replace(path)
    return record


def table_rows(record: Record) -> list[list[object]]:
    """The measured table's rows of one size's record: exact search, then each spec."""
    rows, exact_qps = record["rows"], float(record["exact_qps"])
    table: list[list[object]] = [
        [rows, "exact (FAISS flat, streamed)", "—", "", "", "", "", "",
         4.0 * int(record["dim"]), 1.0, exact_qps, 1.0, record["threads"]]
    ]  # fmt: skip
    for row in record["results"]:
        table.append(
            [rows, row["spec"], row["built"], "reused" if row.get("lists_reused") else "own",
             row["build_s"], row["build_cpu_s"], row["train_s"], row["peak_gib"],
             row["bytes_per_row"], row["recall"], row["qps"], float(row["qps"]) / exact_qps,
             row.get("threads", record["threads"])]
        )  # fmt: skip
    return table


def load_records(paths: Sequence[Path]) -> list[Record]:
    """Size records written by an earlier run (``--keep``'s ``measured-ROWS.json``, or the
    recorded runs under ``bench/measured/``), checked for the fields the report reads."""
    records = []
    needed = {"rows", "dim", "memory_gb", "threads", "exact_qps", "results"}
    per_spec = {"spec", "template", "built", "build_s", "build_cpu_s", "train_s", "peak_gib",
                "bytes_per_row", "recall", "qps"}  # fmt: skip
    for path in paths:
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise SystemExit(f"Error: cannot read the measurements {path}: {error}") from None
        missing = needed - set(record) if isinstance(record, dict) else needed
        if not missing:
            results = record["results"]
            if not isinstance(results, list) or not all(isinstance(r, dict) for r in results):
                missing = {"results (a list of objects)"}
            else:
                for row in results:
                    missing |= per_spec - set(row)
        if missing:
            raise SystemExit(
                f"Error: {path} is not an index_scale record: missing {', '.join(sorted(missing))}"
            )
        records.append(record)
    return records


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=1000, help="sampled rows searched")
    parser.add_argument("--memory-gb", type=float, default=8.0, help="auto's memory budget")
    parser.add_argument("--specs", nargs="+", default=list(DEFAULT_SPECS))
    parser.add_argument("--threads", type=int, default=1, help="FAISS (OpenMP) threads")
    parser.add_argument("--repeats", type=int, default=3, help="timed searches (median)")
    parser.add_argument("--workdir", type=Path, default=None, help="where indexes are written")
    parser.add_argument(
        "--keep", type=Path, default=None,
        help="keep each index, its results and the exact top-k in this folder, and reuse them: "
        "a rerun measures only the specs and sizes not measured yet; each size's record is "
        "written there as measured-ROWS.json",
    )  # fmt: skip
    parser.add_argument(
        "--measured", type=Path, nargs="+", default=None, metavar="RECORD",
        help="build nothing: report (and project) from size records an earlier run wrote "
        "(measured-ROWS.json of --keep, or bench/measured/*.json)",
    )  # fmt: skip
    parser.add_argument(
        "--no-reuse-lists", dest="reuse_lists", action="store_false",
        help="train and assign every spec anew (by default a spec with the first one's IVF lists "
        "reuses them: its build is timed as the codes only, and reported as the first one's "
        "training and assignment plus nothing else, which is what a build anew does alike)",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="a small run in seconds")
    parser.add_argument("--no-save", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.dim, args.queries = QUICK["rows"], QUICK["dim"], QUICK["queries"]
        args.memory_gb, args.classes, args.repeats = QUICK["memory_gb"], QUICK["classes"], 1
    set_threads(args.threads)
    baseline = rss_bytes()
    if args.measured is not None:
        records = load_records(args.measured)
    else:
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
        workdir = args.keep or Path(tempfile.mkdtemp(prefix="index-scale-", dir=args.workdir))
        try:
            records = [measure_size(rows, args, workdir) for rows in args.rows]
        finally:
            if args.keep is None:
                shutil.rmtree(workdir, ignore_errors=True)
    table = [line for record in records for line in table_rows(record)]
    headers = ["rows", "index", "built as", "IVF lists", "build s", "build CPU s", "train s",
               "peak RSS GiB", "bytes/row", "recall@10", "queries/s", "× exact",
               "FAISS threads"]  # fmt: skip
    largest = max(records, key=lambda record: int(record["rows"]))
    rows, dim = int(largest["rows"]), int(largest["dim"])
    proj_headers = ["rows", "index", "resolves to", "index GiB", "training sample GiB",
                    "train h (est.)", "add h (est.)"]  # fmt: skip
    if args.measured is not None:
        origin = "; ".join(
            f"{int(record['rows']):,} rows measured {record.get('measured', '(date not kept)')} "
            f"by `{record.get('command', '(command not kept)')}`"
            + (f" ({record['source']})" if record.get("source") else "")
            for record in records
        )
        setting = f"Reported from the records {', '.join(map(str, args.measured))}: {origin}. "
        baseline_text = ""
    else:
        setting = ""
        baseline_text = f", {gib(baseline):.2f} GiB before any (interpreter, torch, FAISS)"
    notes = (
        f"{setting}dim {dim}, {largest.get('classes', args.classes)} clustered classes, "
        f"generated in {BLOCK_ROWS}-row blocks (never all in memory); "
        f"{largest.get('queries', args.queries)} sampled rows as queries, their own match left "
        f"out; top-{K}; FAISS threads as in the last column (a row kept by --keep from an "
        "earlier run keeps its own); queries/s of one batched search of the "
        "index reloaded memory-mapped (median of the repeats after a warm-up). Peak RSS: the "
        f"build's resident memory{baseline_text}; the training sample is 39-64 rows a list as "
        f"float32. Projection from the {rows:,}-row measurements below, in wall hours at the "
        "threads of the row each is timed from (a spec built into another's lists: that one's)."
    )
    projected = projection(largest["results"], rows, dim, float(largest["memory_gb"]))
    return report(
        "Indexes at scale (bench/index_scale.py"
        + (", reported from recorded measurements)" if args.measured is not None else ")"),
        [markdown_table(headers, table), markdown_table(proj_headers, projected)],
        results=None if args.no_save else results_path(args),
        notes=notes,
    )


if __name__ == "__main__":
    main()
