"""Batched throughput: images/s of ``db build`` and ``segment`` at several ``--batch-size``.

Two tables, each one run with the batch sizes interleaved (A, B, C, A, B, C, ...; medians):

- **toy**: ``db build`` on toy-world scenes (96×96) with the ground-truth proposer and the toy
  backbone at batch 1, 4 and 8 — what the build's own machinery costs around a fast model
  (decoding ahead, one backbone pass per batch, one commit per batch in a writer thread);
- **real**: the real-size CLIP ViT-B/16 architecture (random weights, :mod:`bench.models`) at
  448 px on the same scenes with the ground-truth proposer, batch 1 vs 2, for ``db build`` and
  for ``segment``'s model path (``Segmenter.segment_batch``, retrieval off).

The issue sets no ratio target for these; on a CPU one thread already keeps the cores busy at
batch 1, so batching gains little there: the gains it exists for are on a GPU
(``bench/gpu_check.sh`` prints images/s at batch 1 and 4 in fp32 and bf16).

    OMP_NUM_THREADS=1 python -m bench.bench_throughput --repeats 3
    OMP_NUM_THREADS=1 python -m bench.bench_throughput --quick --no-save   # smoke test
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from bench.common import (
    base_parser,
    interleaved,
    markdown_table,
    median,
    report,
    results_path,
    set_threads,
)
from bench.models import model_dir
from retclip.backbones.base import Backbone
from retclip.backbones.registry import load_backbone
from retclip.database import FeatureDatabase
from retclip.database.build import BuildItem, build_database, items_from_dataset
from retclip.datasets import CocoPanopticDataset
from retclip.images import load_image
from retclip.proposers.ground_truth import GroundTruthProposer
from retclip.segmenter import Segmenter
from retclip.toyworld.dataset import toy_vocabulary, write_split

_RUNS = itertools.count()  # each build into a database folder of its own


def build_run(
    backbone: Backbone,
    proposer: GroundTruthProposer,
    items: Sequence[BuildItem],
    batch: int,
    root: Path,
) -> Callable[[], None]:
    """A fresh ``db build`` of ``items`` at ``batch`` images per model batch and commit."""

    def run() -> None:
        db = FeatureDatabase.create(
            root / f"db-{next(_RUNS)}", fingerprint=backbone.fingerprint, dim=backbone.dim
        )
        build_database(db, backbone, proposer, items, build_id="bench", batch_size=batch,
                       progress=False)  # fmt: skip

    return run


def segment_run(segmenter: Segmenter, paths: Sequence[Path], batch: int) -> Callable[[], None]:
    """``segment``'s model path over ``paths`` (decoded beforehand), ``batch`` at a time."""
    images = [load_image(p) for p in paths]
    vocabulary = toy_vocabulary()

    def run() -> None:
        for start in range(0, len(images), batch):
            chunk = slice(start, start + batch)
            outcomes = segmenter.segment_batch(
                images[chunk], vocabulary, sources=[str(p) for p in paths[chunk]]
            )
            assert not any(isinstance(o, Exception) for o in outcomes), outcomes

    return run


def table(times: dict[str, list[float]], images: int, baseline: str) -> list[list[object]]:
    base = median(times[baseline])
    return [[name, median(t), images / median(t), base / median(t)] for name, t in times.items()]


HEADERS = ["run", "s (all images)", "images/s", "× batch 1"]


def main(argv: Sequence[str] | None = None) -> str:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--toy-images", type=int, default=48, help="scenes of the toy build")
    parser.add_argument("--real-images", type=int, default=4, help="scenes of the real runs")
    parser.add_argument("--toy-batches", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--real-batches", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--backbone", default="clip-b16", help="bench model of the real runs")
    parser.add_argument("--quick", action="store_true", help="tiny models, few images, 1 round")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.repeats = "tiny", 1
        args.toy_images, args.real_images = min(args.toy_images, 8), min(args.real_images, 2)
        args.toy_batches, args.real_batches = [1, 4], [1, 2]
    set_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="retclip-bench-throughput-") as tmp:
        root = Path(tmp)
        world = write_split(root / "world", "db", max(args.toy_images, args.real_images), seed=0)
        dataset = CocoPanopticDataset(*world)
        items = items_from_dataset(dataset)
        proposer = GroundTruthProposer(dataset)
        toy = load_backbone("toy")
        toy_times = interleaved(
            {f"db build, batch {b}": build_run(toy, proposer, items[: args.toy_images], b, root)
             for b in args.toy_batches},
            args.repeats,
        )  # fmt: skip
        real = load_backbone(str(model_dir(args.backbone, args.size, args.models_dir)), "cpu")
        segmenter = Segmenter(real, proposer, device="cpu")
        real_items = items[: args.real_images]
        paths = [Path(item.source) for item in real_items]
        runs: dict[str, Callable[[], None]] = {}
        for b in args.real_batches:
            runs[f"db build, batch {b}"] = build_run(real, proposer, real_items, b, root)
        for b in args.real_batches:
            runs[f"segment, batch {b}"] = segment_run(segmenter, paths, b)
        real_times = interleaved(runs, args.repeats)
    first = args.real_batches[0]
    real_rows = table(
        {k: v for k, v in real_times.items() if k.startswith("db")},
        args.real_images,
        f"db build, batch {first}",
    ) + table(
        {k: v for k, v in real_times.items() if k.startswith("segment")},
        args.real_images,
        f"segment, batch {first}",
    )
    notes = (
        f"{args.repeats} interleaved rounds after one warm-up, medians. Toy: {args.toy_images} "
        "toy-world scenes 96×96, ground-truth masks, toy backbone, `build_database` at each "
        "batch size (images per model batch and per commit; each run a fresh database). Real: "
        f"{args.real_images} of the scenes through {args.backbone} ({args.size} architecture, "
        f"random weights, short side {getattr(real, 'resolution', '?')} px), ground-truth masks "
        f"(at batch b, 1/b as many commits and backbone calls); `segment` is "
        "`Segmenter.segment_batch` without a database (no ratio target in the issue)."
    )
    return report(
        "Batched throughput: db build and segment by batch size",
        [
            "Toy backbone, ground truth:\n\n"
            + markdown_table(
                HEADERS, table(toy_times, args.toy_images, f"db build, batch {args.toy_batches[0]}")
            ),
            f"{args.backbone} ({args.size} architecture), ground truth:\n\n"
            + markdown_table(HEADERS, real_rows),
        ],
        results=results_path(args),
        notes=notes,
    )


if __name__ == "__main__":
    main()
