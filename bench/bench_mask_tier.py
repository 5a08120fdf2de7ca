"""Mask tier: SAM ViT-B vs SAM 2.1 tiny vs EdgeTAM, encoder + decoder time per image.

What ``grounded-sam`` runs per image through :class:`~retclip.proposers.sam.SamSegmenter`: the
image encoder once, then all ``--boxes`` box prompts decoded in one batch and upscaled to image
size. Models run interleaved (one image each per round); medians. Target: the fast tier
(SAM 2.1 tiny, EdgeTAM) ≥ 3× the SAM ViT-B pipeline.

    OMP_NUM_THREADS=1 python -m bench.bench_mask_tier --boxes 10 --repeats 3
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch

from bench.common import (
    base_parser,
    interleaved,
    markdown_table,
    median,
    report,
    results_path,
    set_threads,
)
from bench.models import model_dir, test_image
from retclip.proposers.sam import SamSegmenter

TIERS = ("sam-vit-b", "sam2.1-tiny", "edgetam")


def main(argv: Sequence[str] | None = None) -> str:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(TIERS), choices=TIERS)
    parser.add_argument("--boxes", type=int, default=10)
    parser.add_argument("--image-size", type=int, nargs=2, default=[480, 640], metavar=("H", "W"))
    args = parser.parse_args(argv)
    set_threads(args.threads)
    height, width = args.image_size
    image = test_image(height, width)
    rng = np.random.default_rng(0)
    corner = rng.uniform(0, 0.6, (args.boxes, 2)) * [width, height]
    size = rng.uniform(0.1, 0.4, (args.boxes, 2)) * [width, height]
    boxes = torch.tensor(np.concatenate([corner, corner + size], 1), dtype=torch.float32)
    segmenters = {
        name: SamSegmenter(str(model_dir(name, args.size, args.models_dir)), device="cpu")
        for name in args.models
    }
    stages: dict[str, dict[str, list[float]]] = {
        n: {"encoder": [], "decoder": []} for n in segmenters
    }

    def run(name: str) -> None:
        start = time.perf_counter()
        embedded = segmenters[name].embed(image)
        middle = time.perf_counter()
        segmenters[name].segment_boxes(embedded, boxes)
        stages[name]["encoder"].append(middle - start)
        stages[name]["decoder"].append(time.perf_counter() - middle)

    times = interleaved({n: (lambda n=n: run(n)) for n in segmenters}, args.repeats)
    base = median(times[args.models[0]])
    rows = [
        [
            name,
            f"{sum(p.numel() for p in segmenters[name].model.parameters()) / 1e6:.1f} M",
            median(stages[name]["encoder"][-args.repeats :]),
            median(stages[name]["decoder"][-args.repeats :]),
            median(t),
            base / median(t),
        ]
        for name, t in times.items()
    ]
    headers = ["model", "params", "encoder s", f"decoder s ({args.boxes} boxes)", "s/image",
               f"× {args.models[0]}"]  # fmt: skip
    notes = (
        f"{args.size} architectures, random weights; image {height}×{width}, {args.boxes} boxes; "
        f"{args.repeats} interleaved rounds after one warm-up."
    )
    return report(
        "Mask tier: encoder + decoder per image", [markdown_table(headers, rows)],
        results=results_path(args), notes=notes,
    )  # fmt: skip


if __name__ == "__main__":
    main()
