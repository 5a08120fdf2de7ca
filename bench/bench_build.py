"""Database build: images/s of ``build_database`` with a per-stage breakdown.

Images with image-level labels go through the training-free build (paper §2.1): decode →
Grounding DINO → SAM (encoder once, boxes batched) → one backbone pass → mask pooling → commit
(``index add``: shard written, rows appended), then the index is built (``auto``). Stages are timed
by wrapping the library's functions from outside for the run (the library has no timing code);
``other`` is the rest of the wall time (decoding runs in worker threads, overlapping the rest).

    OMP_NUM_THREADS=1 python -m bench.bench_build --images 4 --boxes 5
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

import retclip.database.build as build_module
from bench.common import (
    PeakMemory,
    StageTimer,
    base_parser,
    markdown_table,
    mib,
    report,
    results_path,
    set_threads,
)
from bench.models import test_image
from bench.pipeline import breakdown_rows, make_backbone, make_proposer, stage_targets
from retclip.database import FeatureDatabase
from retclip.database.build import BuildItem, build_database
from retclip.database.index import IndexSpec

LABELS = ("cat", "dog", "car", "tree", "sky", "person", "wall", "road")


def main(argv: Sequence[str] | None = None) -> str:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--boxes", type=int, default=5, help="boxes kept per image")
    parser.add_argument("--labels", type=int, default=3, help="labels per image")
    parser.add_argument("--batch-size", type=int, default=2, help="images per commit")
    parser.add_argument("--backbone", default="clip-b16")
    parser.add_argument("--detector", default="gdino-tiny")
    parser.add_argument("--image-size", type=int, nargs=2, default=[480, 640], metavar=("H", "W"))
    args = parser.parse_args(argv)
    set_threads(args.threads)
    backbone = make_backbone(args.backbone, args.size, args.models_dir)
    proposer = make_proposer(args.detector, args.size, args.models_dir, args.boxes)
    with tempfile.TemporaryDirectory(prefix="retclip-bench-build-") as tmp:
        items = []
        for i in range(args.images):
            path = Path(tmp) / f"image_{i:04d}.jpg"
            Image.fromarray(test_image(*args.image_size, seed=i)).save(path, quality=90)
            labels = tuple(LABELS[(i + j) % len(LABELS)] for j in range(args.labels))
            items.append(BuildItem(str(path), labels))
        # one warm-up image, so lazy initialisation is not counted
        warm = FeatureDatabase.create(Path(tmp) / "warm", fingerprint=backbone.fingerprint,
                                      dim=backbone.dim)  # fmt: skip
        build_database(warm, backbone, proposer, items[:1], build_id="warm", progress=False)
        db = FeatureDatabase.create(Path(tmp) / "db", fingerprint=backbone.fingerprint,
                                    dim=backbone.dim, index=IndexSpec("auto"))  # fmt: skip
        timer = StageTimer()
        targets = [
            ("decode", build_module, "load_image"),
            *stage_targets(proposer, backbone),
            ("index add", db, "add"),
        ]
        with timer.patch(targets), PeakMemory() as memory:
            start = time.perf_counter()
            report_ = build_database(
                db, backbone, proposer, items, build_id=os.urandom(4).hex(),
                batch_size=args.batch_size, progress=False,
            )  # fmt: skip
            with timer.patch([("index build", db, "set_index")]):
                db.set_index(IndexSpec("auto"))
            total = time.perf_counter() - start
    rows = breakdown_rows(timer, total, args.images)
    accounted = sum(s for name, s in timer.seconds.items() if name != "decode")
    rows.append(["other (not in a stage above)", (total - accounted) / args.images,
                 100.0 * (total - accounted) / total])  # fmt: skip
    rows.append(["total", total / args.images, 100.0])
    notes = (
        f"{args.images} JPEG images {args.image_size[0]}×{args.image_size[1]}, "
        f"{args.labels} labels each, {args.boxes} boxes per image, {report_.rows} rows, "
        f"batch {args.batch_size}; "
        f"{args.detector} + SAM ViT-B + {args.backbone} ({args.size}, random weights). "
        f"**{args.images / total:.3g} images/s**, peak memory +{mib(memory.delta):.0f} MiB. "
        "Decoding runs in worker threads, overlapping the other stages."
    )
    return report(
        "Database build: per-stage breakdown",
        [markdown_table(["stage", "s / image", "% of wall time"], rows)],
        results=results_path(args),
        notes=notes,
    )


if __name__ == "__main__":
    main()
