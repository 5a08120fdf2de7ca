"""Distributed database build on Ray: throughput with 1 vs 2 workers, a per-stage profile, and
the single writer's commit cost as the database grows.

Toy-world images (96 px scenes with their ground-truth masks, ``gt`` proposer) feed
``build_database_on_ray`` on a local Ray started once for the script; the backbone is a bench
model with random weights (``clip-b16`` by default, built and saved on first use) or ``toy``.
Each worker is a Ray actor holding one CPU (one torch thread). Reported per worker count: the
wall time of a build, of a start-up build (one image per worker: actors started, models loaded),
and from the two the rate once running (medians of interleaved runs). The per-stage profile
times the per-image function the workers run (``image_rows``) in a single-process build,
interleaved with the Ray runs, by wrapping library functions from outside (``StageTimer``); the
driver's commits are timed in the Ray runs too. The commit table times one commit of a batch
into a database that already holds S completed images: the rate one writer can sustain
(``--commit-only``: that table alone, without Ray or models).

    OMP_NUM_THREADS=1 python -m bench.ray_build --images 48 --workers 1 2
    OMP_NUM_THREADS=1 python -m bench.ray_build --commit-only --commit-sizes 1000 10000 100000
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

import retclip.database.build as build_module
from bench.common import (
    StageTimer,
    base_parser,
    markdown_table,
    median,
    report,
    results_path,
    set_threads,
)
from bench.models import model_dir
from retclip.backbones.base import BackboneFingerprint
from retclip.database import FeatureDatabase
from retclip.database.build import BuildItem, build_database, items_from_dataset
from retclip.datasets import CocoPanopticDataset
from retclip.distributed import RayCluster, build_database_on_ray
from retclip.pipeline import ModelSpec
from retclip.toyworld.dataset import write_split

STAGES = ("decode", "proposer", "backbone", "pooling", "commit")


def _spec(args, world: tuple[Path, Path]) -> ModelSpec:
    backbone = "toy" if args.backbone == "toy" else str(model_dir(args.backbone, args.size))
    options = {"resolution": args.resolution} if args.resolution else {}
    return ModelSpec(backbone=backbone, proposer="gt", gt_json=world[0], device="cpu", **options)


def _new_db(path: Path, spec: ModelSpec) -> FeatureDatabase:
    backbone = spec.load_backbone()
    return FeatureDatabase.create(path, fingerprint=backbone.fingerprint, dim=backbone.dim)


def _idle_cores(seconds: float = 2.0) -> float:
    """Cores the machine left idle over ``seconds`` (``/proc/stat``): how much of it other work
    took, which the workers' throughput depends on."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as handle:
            fields = [int(v) for v in handle.readline().split()[1:]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, all

    idle0, total0 = sample()
    time.sleep(seconds)
    idle1, total1 = sample()
    return (os.cpu_count() or 1) * (idle1 - idle0) / max(1, total1 - total0)


def _distributed_run(
    root: Path, spec: ModelSpec, items: Sequence[BuildItem], workers: int, batch: int
) -> dict[str, float]:
    """One distributed build into a fresh database: wall s, driver commit s per image."""
    backbone, proposer = spec.load()
    assert proposer is not None
    db = _new_db(Path(tempfile.mkdtemp(dir=root)) / "db", spec)
    timer = StageTimer()
    start, cpu = time.perf_counter(), time.process_time()
    with timer.patch([("commit", db, "add")]):
        build_database_on_ray(
            db, backbone, proposer, items, load_models=spec.load,
            cluster=RayCluster(workers=workers), build_id="bench", batch_size=batch,
            progress=False,
        )  # fmt: skip
    return {
        "wall": time.perf_counter() - start,
        "commit": timer.seconds["commit"] / len(items),
        "driver cpu": (time.process_time() - cpu) / len(items),
    }


def _stage_profile(
    path: Path, spec: ModelSpec, models: tuple, items: Sequence[BuildItem], batch: int
) -> dict[str, float]:
    """Seconds per image of each stage of a single-process build (and ``total``)."""
    backbone, proposer = models
    db = _new_db(path, spec)
    timer = StageTimer()
    targets = [
        ("decode", build_module, "load_image"),
        ("proposer", proposer, "propose"),
        ("backbone", backbone, "encode_images"),
        ("pooling", backbone, "embed_segments"),
        ("commit", db, "add"),
    ]
    start = time.perf_counter()
    with timer.patch(targets):
        build_database(db, backbone, proposer, items, build_id="profile", batch_size=batch,
                       decode_workers=1, progress=False)  # fmt: skip
    total = time.perf_counter() - start
    return {**{stage: timer.seconds[stage] / len(items) for stage in STAGES},
            "total": total / len(items)}  # fmt: skip


def _commit_cost(
    root: Path,
    sizes: Sequence[int],
    batch: int,
    rows_per_image: int,
    grow_step: int = 5000,
    repeats: int = 3,
) -> list[list]:
    """One writer's commit of ``batch`` images (``rows_per_image`` rows each) into a database
    already holding S completed images, for each S in ``sizes``: median seconds of ``repeats``
    commits, the shards and ``meta.json`` size at S, and the seconds a resume spends reading every
    completed source once (:meth:`FeatureDatabase.completed_sources` of a freshly opened
    database)."""
    dim = 768
    rng = np.random.default_rng(0)
    db = FeatureDatabase.create(root / "commits", fingerprint=BackboneFingerprint("bench"), dim=dim)
    done = 0
    out = []

    def commit(first: int, images: int, rows_each: int = rows_per_image) -> float:
        sources = [f"/data/open-images/train/{first + i:012d}.jpg" for i in range(images)]
        rows = [s for s in sources for _ in range(rows_each)]
        features = rng.standard_normal((len(rows), dim)).astype(np.float32)
        start = time.perf_counter()
        db.add(features, [f"class{i % 600}" for i in range(len(rows))], sources=rows,
               build_id="bench", completed_sources=sources)  # fmt: skip
        return time.perf_counter() - start

    for size in sizes:
        while done < size:  # grow in large commits of a row an image (not what is measured)
            step = min(size - done, grow_step)
            commit(done, step, rows_each=1)
            done += step
        start = time.perf_counter()
        resumed = FeatureDatabase.open(db.path, verify=False).completed_sources("bench")
        resume = time.perf_counter() - start
        assert len(resumed) == done
        seconds = [commit(done + i * batch, batch) for i in range(repeats)]
        done += repeats * batch
        meta = (db.path / "meta.json").stat().st_size
        cost = median(seconds)
        shards = len(list((db.path / "shards").glob("*.npz")))
        version = json.loads((db.path / "meta.json").read_text())["format_version"]
        out.append([version, size, batch, cost, batch / cost, shards, meta / 2**10, resume])
    return out


def _commit_cost_by_shards(
    root: Path, counts: Sequence[int], batch: int, repeats: int = 3
) -> list[list]:
    """The same commit (``batch`` images × 8 rows) into a database grown by commits of that
    size to each shard count in ``counts`` (what a build with ``--batch-size batch`` makes):
    ``meta.json`` lists every shard, so this is the part of a commit that still grows."""
    dim = 768
    rng = np.random.default_rng(1)
    db = FeatureDatabase.create(root / "shards", fingerprint=BackboneFingerprint("bench"), dim=dim)
    features = rng.standard_normal((8 * batch, dim)).astype(np.float32)
    labels = [f"class{i % 600}" for i in range(8 * batch)]
    out: list[list] = []
    shards = 0

    def commit() -> float:
        nonlocal shards
        sources = [f"/data/open-images/train/{shards * batch + i:012d}.jpg" for i in range(batch)]
        start = time.perf_counter()
        db.add(features, labels, sources=[s for s in sources for _ in range(8)],
               build_id="bench", completed_sources=sources)  # fmt: skip
        shards += 1
        return time.perf_counter() - start

    for count in counts:
        while shards < count:
            commit()
        meta = (db.path / "meta.json").stat().st_size
        at = shards
        cost = median([commit() for _ in range(repeats)])
        version = json.loads((db.path / "meta.json").read_text())["format_version"]
        out.append([version, at, at * batch, cost, batch / cost, meta / 2**10])
    return out


def _commit_table(commits: list[list]) -> str:
    headers = ["format", "completed images S", "images per commit", "commit s",
               "images/s one writer", "shards", "meta.json KiB", "resume read s"]  # fmt: skip
    return markdown_table(headers, commits)


def _commit_only(args) -> str:
    """The commit table alone (``--commit-only``): no Ray, no models."""
    sizes = [50, 200] if args.quick else args.commit_sizes
    batch = 2 if args.quick else args.batch_size
    grow = 50 if args.quick else 5000
    repeats = max(3, args.repeats)
    with tempfile.TemporaryDirectory(prefix="retclip-bench-commit-") as tmp:
        start = time.perf_counter()
        commits = _commit_cost(Path(tmp), sizes, batch, rows_per_image=8,
                               grow_step=grow, repeats=repeats)  # fmt: skip
        wall = time.perf_counter() - start
        counts = [5, 10] if args.quick else args.shard_counts
        by_shards = _commit_cost_by_shards(Path(tmp), counts, batch, repeats)
    flat = commits[-1][3] / commits[0][3]
    notes = (
        f"One writer, one process: each S is reached by commits of {grow} images of one row "
        f"each (untimed), then {repeats} commits of {batch} images × 8 rows (dim 768, float16) are "
        "timed (median). 'resume read s': opening the database and reading every completed "
        f"source once, what a resumed build does once per run. Commit time at the largest S is "
        f"{flat:.2f}× the smallest (target ≤ 1.5×: "
        f"{'met' if flat <= 1.5 else 'missed'}); this table's run took {wall:.0f} s."
    )
    tables = [_commit_table(commits)]
    if by_shards:
        headers = ["format", "shards", "completed images", "commit s", "images/s one writer",
                   "meta.json KiB"]  # fmt: skip
        tables.append(markdown_table(headers, by_shards))
        notes += (
            f" Second table: the same commit into a database grown by commits of {batch} images "
            "(one shard each, as a build with that --batch-size makes): meta.json lists every "
            "shard, the part of a commit that still grows."
        )
    return report(
        "Database commit cost vs completed images (one writer)",
        tables,
        results=results_path(args),
        notes=notes,
    )


def main(argv: Sequence[str] | None = None) -> str:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=8, help="images per commit")
    parser.add_argument("--backbone", default="clip-b16", help="a bench model name, or toy")
    parser.add_argument("--resolution", type=int, help="backbone input short side")
    parser.add_argument(
        "--commit-sizes", type=int, nargs="*", default=[1000, 10000, 100000],
        help="completed images already in the database, for the commit table",
    )  # fmt: skip
    parser.add_argument(
        "--shard-counts", type=int, nargs="*", default=[],
        help="with --commit-only: also time a commit at these shard counts (commits of "
        "--batch-size images)",
    )  # fmt: skip
    parser.add_argument(
        "--commit-only", action="store_true", help="only the commit table (no Ray, no models)"
    )
    parser.add_argument("--quick", action="store_true",
                        help="with --commit-only: two small sizes (smoke test)")  # fmt: skip
    args = parser.parse_args(argv)
    set_threads(args.threads)
    if args.commit_only:
        return _commit_only(args)
    import ray

    with tempfile.TemporaryDirectory(prefix="retclip-bench-ray-") as tmp:
        root = Path(tmp)
        world = write_split(root / "world", "db", args.images, seed=0)
        items = items_from_dataset(CocoPanopticDataset(*world))
        spec = _spec(args, world)
        started = not ray.is_initialized()  # a Ray the caller started is reused
        if started:
            ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
                     logging_level="warning")  # fmt: skip
        models = spec.load()  # the single-process runs' models, warmed up on one image
        build_database(_new_db(root / "warm", spec), *models, items[:1], build_id="warm",
                       progress=False)  # fmt: skip
        try:
            widest = max(args.workers)  # warm-up: Ray's worker processes, file caches
            _distributed_run(root, spec, items[:widest], widest, args.batch_size)
            idle = [_idle_cores()]
            runs: dict[tuple[int, int], list[dict[str, float]]] = {}
            profiles: list[dict[str, float]] = []
            for repeat in range(args.repeats):  # interleaved: 1, 2, one process, 1, 2, ...
                for workers in args.workers:
                    for n in (workers, len(items)):  # a start-up run, one image a worker
                        run = _distributed_run(root, spec, items[:n], workers, args.batch_size)
                        runs.setdefault((workers, n), []).append(run)
                path = root / f"profile-{repeat}"
                profiles.append(_stage_profile(path, spec, models, items, args.batch_size))
            idle.append(_idle_cores())
        finally:
            if started:
                ray.shutdown()
        stages = {stage: median([p[stage] for p in profiles]) for stage in STAGES}
        single = median([p["total"] for p in profiles])
        commits = _commit_cost(root, args.commit_sizes, args.batch_size, rows_per_image=8)
    throughput = []
    base = None
    for workers in args.workers:
        full = median([r["wall"] for r in runs[workers, len(items)]])
        short = median([r["wall"] for r in runs[workers, workers]])
        rate = (len(items) - workers) / (full - short)  # images/s once the actors are up
        base = base or rate
        commit = median([r["commit"] for r in runs[workers, len(items)]])
        driver = median([r["driver cpu"] for r in runs[workers, len(items)]])
        throughput.append([workers, full, short, len(items) / full, rate, rate / base,
                           1e3 * commit, 1e3 * driver])  # fmt: skip
    throughput.append(["1 process (no Ray)", single * len(items), "–", 1 / single, 1 / single,
                       1 / single / (base or 1), 1e3 * stages["commit"], "–"])  # fmt: skip
    # decode and commit run in threads beside the models (build_database), so the stages can
    # add up to more than the wall time: the rest is then negative, the overlap
    rest = median([p["total"] - sum(p[stage] for stage in STAGES) for p in profiles])
    profile = [[stage, 1e3 * s, 100 * s / single] for stage, s in stages.items()]
    profile.append(["wall − stages (negative: decode and commit overlapped the models)",
                    1e3 * rest, 100 * rest / single])  # fmt: skip
    profile.append(["total", 1e3 * single, 100.0])
    notes = (
        f"{args.images} toy-world images (96×96, ground-truth masks, {len(items)} items), "
        f"backbone {args.backbone} "
        + ("(the shipped toy model" if args.backbone == "toy" else f"({args.size}, random weights")
        + (f", resolution {args.resolution}" if args.resolution else "")
        + f"), {args.batch_size} images per commit; Ray {ray.__version__}, one CPU per worker; "
        f"medians of {args.repeats} interleaved runs. Idle cores (/proc/stat, 2 s) before the "
        f"runs: {idle[0]:.2f} of {os.cpu_count()}, after: {idle[-1]:.2f}: other work on the "
        "machine takes cores from the workers, and 2 workers can only beat 1 with a second "
        "free core. "
        "'start-up s': a build of one image per worker (actors started, models loaded); "
        "'images/s (running)': the rate once running, (images − workers) / (wall − start-up). "
        "'driver CPU': the driver process's CPU time per image (Ray Data's executor, "
        "unpickling results, commits). '1 process': build_database without Ray, interleaved "
        "with the Ray runs; its stage profile times the per-image function the workers run. "
        "Commit table: 8 rows per image, dim 768."
    )
    headers = {
        "throughput": ["workers", "wall s", "start-up s", "images/s (wall)",
                       "images/s (running)", "× 1 worker", "driver commit ms / image",
                       "driver CPU ms / image"],
    }  # fmt: skip
    return report(
        "Distributed build on Ray: 1 vs 2 workers, stages, commit cost",
        [
            markdown_table(headers["throughput"], throughput),
            markdown_table(["stage", "ms / image", "% of one process"], profile),
            _commit_table(commits),
        ],
        results=results_path(args),
        notes=notes,
    )


if __name__ == "__main__":
    main()
