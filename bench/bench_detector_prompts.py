"""Grounding DINO over a large vocabulary: the image backbone once per image vs once per prompt.

The ADE20k vocabulary's first ``--classes`` names need several 256-token prompts. ``shared`` is
retclip's detector (Swin + input projections once per image, :func:`image_pass_once`); ``per
prompt`` is transformers' forward on the image repeated per prompt (retclip before). Both run
the same batched call on the same image, interleaved; the detections are checked identical.
Target: shared ≥ 1.5× per prompt at 150 classes.

    OMP_NUM_THREADS=1 python -m bench.bench_detector_prompts --classes 150 --repeats 2
"""

from __future__ import annotations

from collections.abc import Sequence

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
from retclip.proposers.grounded_sam import GroundingDinoDetector
from retclip.vocabulary import Vocabulary


def main(argv: Sequence[str] | None = None) -> str:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--detector", default="gdino-tiny", choices=("gdino-tiny", "gdino-base"))
    parser.add_argument("--classes", type=int, default=150, help="first N ADE20k classes")
    parser.add_argument("--image-size", type=int, nargs=2, default=[480, 640], metavar=("H", "W"))
    parser.add_argument("--shortest-edge", type=int, default=800)
    parser.add_argument("--longest-edge", type=int, default=1333)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    path = model_dir(args.detector, args.size, args.models_dir)
    names = [c.synonyms[0] for c in Vocabulary.builtin("ade20k-150").classes][: args.classes]
    image = test_image(*args.image_size)
    detectors = {
        mode: GroundingDinoDetector(
            str(path),
            box_threshold=0.0,
            text_threshold=0.0,
            shortest_edge=args.shortest_edge,
            longest_edge=args.longest_edge,
            device="cpu",
            share_image_pass=mode == "shared",
        )
        for mode in ("per prompt", "shared")
    }
    found = {mode: det.detect(image, names) for mode, det in detectors.items()}
    same = all(
        torch.equal(getattr(found["shared"], key), getattr(found["per prompt"], key))
        for key in ("boxes", "scores", "labels")
    )
    prompts = len(detectors["shared"].prompts(names))
    times = interleaved(
        {mode: (lambda det=det: det.detect(image, names)) for mode, det in detectors.items()},
        args.repeats,
        warmup=0,
    )
    base = median(times["per prompt"])
    rows = [
        [mode, prompts, median(t), 1 / median(t), base / median(t)] for mode, t in times.items()
    ]
    table = markdown_table(["detector call", "prompts", "s/image", "images/s", "speed-up"], rows)
    notes = (
        f"{args.detector} ({args.size}), {len(names)} ADE20k classes → {prompts} prompts (the "
        f"benchmark's offline BERT vocabulary spells most names letter by letter, so more prompts "
        f"than the real tokenizer's), image {args.image_size[0]}×{args.image_size[1]} resized to "
        f"short side {args.shortest_edge}; {args.repeats} interleaved rounds; detections "
        f"identical: {same} ({len(found['shared'].boxes)} boxes at threshold 0)."
    )
    return report(
        "Grounding DINO: image backbone once per image", [table], results=results_path(args),
        notes=notes,
    )  # fmt: skip


if __name__ == "__main__":
    main()
