"""``segment`` latency breakdown per backbone × proposer, with 1 and 2 threads.

One image through :class:`~retclip.Segmenter` (Grounding DINO → SAM → backbone → pooling →
``s_clip`` + ``s_ret`` against a database → panoptic merge), timed per stage by wrapping library
functions from outside; "model forward" is the time spent inside any ``nn.Module`` forward of the
detector, SAM and backbone, and "not forward" the rest of the wall time (pre/post-processing,
pooling, retrieval, merging). Target: "not forward" ≤ 10 % of the time.

    OMP_NUM_THREADS=1 python -m bench.bench_segment_latency --backbones clip-b16 convnext-l
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

import retclip.segmenter as segmenter_module
from bench.common import (
    StageTimer,
    base_parser,
    markdown_table,
    median,
    report,
    results_path,
    set_threads,
)
from bench.models import test_image
from bench.pipeline import BACKBONES, DETECTORS, make_backbone, make_proposer, models_of
from bench.pipeline import stage_targets as model_stages
from retclip import Segmenter
from retclip.backbones.base import Backbone
from retclip.database import FeatureDatabase
from retclip.vocabulary import Vocabulary

CLASSES = "cat, dog, car, tree, sky, person, wall, road"
STAGES = ("detector", "SAM encoder", "SAM decoder", "backbone", "pooling", "scores", "merge")


def random_database(path: Path, backbone: Backbone, rows: int, names: Sequence[str]) -> Path:
    """A database of ``rows`` random unit features labelled with ``names`` in turn."""
    db = FeatureDatabase.create(path, fingerprint=backbone.fingerprint, dim=backbone.dim)
    features = np.random.default_rng(0).standard_normal((rows, backbone.dim)).astype(np.float32)
    labels = [names[i % len(names)] for i in range(rows)]
    db.add(features, labels, sources=[f"random_{i}" for i in range(rows)])
    return path


def main(argv: Sequence[str] | None = None) -> str:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=["clip-b16"], choices=BACKBONES)
    parser.add_argument("--detectors", nargs="+", default=["gdino-tiny"], choices=DETECTORS)
    parser.add_argument("--thread-counts", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--boxes", type=int, default=10, help="boxes kept per image")
    parser.add_argument("--db-rows", type=int, default=10_000)
    parser.add_argument("--image-size", type=int, nargs=2, default=[480, 640], metavar=("H", "W"))
    args = parser.parse_args(argv)
    os.environ.setdefault("RETCLIP_CACHE_DIR", tempfile.mkdtemp(prefix="retclip-bench-"))
    image = test_image(*args.image_size)
    vocab = Vocabulary.from_string(CLASSES)
    rows: list[list[object]] = []
    with tempfile.TemporaryDirectory(prefix="retclip-bench-lat-") as tmp:
        for backbone_name in args.backbones:
            backbone = make_backbone(backbone_name, args.size, args.models_dir)
            db = random_database(Path(tmp) / backbone_name, backbone, args.db_rows, vocab.names)
            for detector in args.detectors:
                proposer = make_proposer(detector, args.size, args.models_dir, args.boxes)
                segmenter = Segmenter(backbone, proposer, db=db)
                segmenter(image, vocab)  # warm-up: text embeddings, index, lazy init
                for threads in args.thread_counts:
                    set_threads(threads)
                    timer = StageTimer()
                    targets = [
                        *model_stages(proposer, backbone),
                        ("scores", segmenter_module, "clip_scores"),
                        ("merge", segmenter_module, "merge"),
                    ]
                    if segmenter.retriever is not None:
                        targets.append(("scores", segmenter.retriever, "scores"))
                    totals = []
                    with timer.patch(targets), timer.forward_time(models_of(proposer, backbone)):
                        for _ in range(args.repeats):
                            start = time.perf_counter()
                            segmenter(image, vocab)
                            totals.append(time.perf_counter() - start)
                    n = len(totals)
                    total = sum(totals)
                    forward = timer.seconds["model forward"]
                    stage_s = [timer.seconds.get(stage, 0.0) / n for stage in STAGES]
                    rows.append([
                        backbone_name, detector, threads, median(totals), *stage_s,
                        forward / n, 100.0 * (total - forward) / total,
                    ])  # fmt: skip
    set_threads(args.threads)  # the machine line reports the base setting; rows give their own
    headers = ["backbone", "detector", "threads", "total s (median)", *(f"{s} s" for s in STAGES),
               "model forward s", "not forward %"]  # fmt: skip
    notes = (
        f"Image {args.image_size[0]}×{args.image_size[1]}, {len(vocab)} classes, {args.boxes} "
        f"boxes, database of {args.db_rows} random rows (flat index); SAM ViT-B; {args.size} "
        f"architectures with random weights; stage columns are means over {args.repeats} runs "
        "after a warm-up (text embeddings cached). Target: not forward ≤ 10 %."
    )
    return report(
        "segment latency breakdown",
        [markdown_table(headers, rows)],
        results=results_path(args),
        notes=notes,
    )


if __name__ == "__main__":
    main()
