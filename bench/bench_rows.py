"""Cost per image of each pipeline behind a row of the paper's tables (``docs/reproduce.md``).

One ADE20k-sized image (512×683) with the 150 ADE20k classes through :func:`build_segmenter` —
the object ``retclip eval --config tableN-...`` builds — on real-size architectures with random
weights (speed does not depend on weight values), with a 10 000-row database for retrieval.
Text embeddings are computed once before timing (they are cached on disk in real use): timed
on ``--text-classes`` classes and scaled to 150, the rest random (see :func:`text_embeddings`).

Random weights make detector and SAM scores meaningless, so the amount of work is pinned: the
detector keeps its ``--boxes`` best boxes, the SAM grid keeps every mask (thresholds 0), and the
ground-truth row pools ``--gt-masks`` fixed masks (ADE20k has ~20 segments per image).

    OMP_NUM_THREADS=1 python -m bench.bench_rows
    OMP_NUM_THREADS=1 python -m bench.bench_rows --rows gt-clip-b16 --size tiny --no-save
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import base_parser, markdown_table, max_rss_bytes, mib, report, set_threads
from bench.gpu_check import fcclip_checkpoint
from bench.models import model_dir, random_masks, test_image
from bench.pipeline import make_proposer
from retclip.backbones.base import Backbone
from retclip.backbones.registry import load_backbone
from retclip.database import FeatureDatabase
from retclip.pipeline import ModelSpec, PipelineSpec, build_segmenter
from retclip.proposers.base import MaskProposer, Proposals
from retclip.proposers.registry import load_proposer
from retclip.vocabulary import Vocabulary

#: row → (the configs it serves, backbone, proposer kind)
ROWS: dict[str, tuple[str, str, str]] = {
    "fcclip-convnext-l": ("table1-convnext-*", "convnext-l", "fcclip"),
    "fcclip-rn50x64": ("table1-rn50x64-*", "rn50x64", "fcclip"),
    "gdino-sam-clip-b16": ("table2-vitb-*, table3-vitb-gdino-sam", "clip-b16", "grounded-sam"),
    "gdino-sam-clip-l14": ("table2-vitl-*, table3-vitl-gdino-sam", "clip-l14", "grounded-sam"),
    "sam-grid-clip-b16": ("table3-vitb-sam-grid", "clip-b16", "sam-grid"),
    "sam-grid-clip-l14": ("table3-vitl-sam-grid", "clip-l14", "sam-grid"),
    "gt-clip-b16": ("table3-vitb-gt", "clip-b16", "gt"),
    "gt-clip-l14": ("table3-vitl-gt", "clip-l14", "gt"),
}


class FixedMasks(MaskProposer):
    """The ground-truth row's proposer: ``n`` fixed masks, as a panoptic annotation gives."""

    name = "gt"

    def __init__(self, n: int, height: int, width: int) -> None:
        self.masks = random_masks(n, height, width)

    def propose(self, image: Any, vocabulary: Any, text_embeddings: Any = None) -> Proposals:
        return Proposals(masks=self.masks, scores=np.ones(len(self.masks), np.float32))


def build_models(row: str, size: str, root: Path | None, args: Any) -> tuple[Any, ...]:
    """The backbone, proposer and spec of one row, as ``retclip eval`` builds them."""
    _, backbone_name, kind = ROWS[row]
    backbone_dir = str(model_dir(backbone_name, size, root))
    proposer: MaskProposer
    if kind == "fcclip":
        from retclip.fcclip.proposer import FcclipProposer

        backbone = load_backbone(backbone_dir, "cpu", preprocessing="fcclip")
        checkpoint = fcclip_checkpoint(
            backbone, model_dir(backbone_name, size, root).parent, backbone_name
        )
        proposer = FcclipProposer(checkpoint, backbone=backbone)  # type: ignore[arg-type]
    else:
        backbone = load_backbone(backbone_dir, "cpu")
        if kind == "grounded-sam":
            proposer = make_proposer("gdino-base", size, root, args.boxes)
        elif kind == "sam-grid":
            proposer = load_proposer(
                "sam-grid",
                sam=str(model_dir("sam-vit-b", size, root)),
                points_per_side=args.points_per_side,
                pred_iou_threshold=0.0,
                stability_threshold=0.0,
            )
        else:
            proposer = FixedMasks(args.gt_masks, *args.image_size)
    spec = PipelineSpec(model=ModelSpec(backbone=backbone_dir, proposer=kind))
    return backbone, proposer, spec


def database(backbone: Backbone, pooling: str, rows: int, names: Sequence[str], path: Path):
    """A database of ``rows`` random rows labelled with ``names`` in turn."""
    db = FeatureDatabase.create(
        path, fingerprint=backbone.fingerprint, dim=backbone.dim, pooling=pooling
    )
    rng = np.random.default_rng(0)
    labels = [names[i % len(names)] for i in range(rows)]
    db.add(rng.standard_normal((rows, backbone.dim)).astype(np.float32), labels, sources=labels)
    return db


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def cpu_timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """Wall and CPU seconds of ``fn()`` (this process, all its threads), and its result. With
    one thread the CPU time is what the call takes on an idle core, also on a shared machine."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def text_embeddings(segmenter: Any, vocabulary: Vocabulary, measured: int) -> float:
    """Seconds the text embeddings of ``vocabulary`` take (once; cached on disk in real use),
    measured on its first ``measured`` classes and scaled by the number of synonyms (every
    prompt costs the same: the tokenizer pads to the context length). Unless every class is
    measured, the segmenter is handed random unit embeddings of the same shapes: with random
    weights their values mean nothing, and a real-size text tower takes tens of CPU minutes
    for the 150 classes' ~2000 prompts."""
    from retclip.text_embeddings import ClassEmbeddings, embed_vocabulary

    backbone = segmenter.backbone
    if measured >= len(vocabulary):
        seconds, _ = timed(lambda: segmenter.class_embeddings(vocabulary))
        return seconds
    part = Vocabulary(vocabulary.classes[:measured], name=vocabulary.name + "-part")
    seconds, _ = timed(lambda: embed_vocabulary(backbone, part, cache=False))
    synonym_class = [i for i, cls in enumerate(vocabulary) for _ in cls.synonyms]
    share = len(synonym_class) / sum(len(cls.synonyms) for cls in part)
    rng = np.random.default_rng(0)

    def random_embeddings(synonym_class: list[int]) -> ClassEmbeddings:
        rows = rng.standard_normal((len(synonym_class), backbone.dim)).astype(np.float32)
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        return ClassEmbeddings(
            synonym_embeddings=torch.from_numpy(rows).to(backbone.device),
            synonym_class=torch.tensor(synonym_class, dtype=torch.long, device=backbone.device),
            num_classes=max(synonym_class) + 1,
        )

    embeddings = random_embeddings(synonym_class)
    segmenter._class_embeddings.get_or_create(vocabulary.key(), lambda: embeddings)
    if segmenter.retriever is not None:  # the database labels' embeddings (label matching)
        segmenter.retriever._label_embeddings = lambda db: random_embeddings(
            list(range(len(db.labels)))
        )
    return seconds * share


def main(argv: Sequence[str] | None = None) -> str:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--image-size", type=int, nargs=2, default=[512, 683], metavar=("H", "W"))
    parser.add_argument("--boxes", type=int, default=20, help="detector boxes kept per image")
    parser.add_argument("--points-per-side", type=int, default=32, help="SAM grid points")
    parser.add_argument("--gt-masks", type=int, default=20, help="ground-truth masks per image")
    parser.add_argument("--db-rows", type=int, default=10_000)
    parser.add_argument(
        "--text-classes",
        type=int,
        default=10,
        help="classes whose text embeddings are computed and timed (the rest scaled; 150: all)",
    )
    parser.set_defaults(repeats=1)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    vocabulary = Vocabulary.load("ade20k-150")
    image = test_image(*args.image_size)
    table = []
    rows = [r for r in args.rows if args.size == "real" or ROWS[r][2] != "fcclip"]
    with tempfile.TemporaryDirectory() as tmp:
        for row in rows:
            start = time.perf_counter()
            backbone, proposer, spec = build_models(row, args.size, args.models_dir, args)
            pooling = proposer.feature_pooling or "soft"
            names = [c.name for c in vocabulary.classes]
            db = database(backbone, pooling, args.db_rows, names, Path(tmp) / row)
            segmenter = build_segmenter(spec, models=(backbone, proposer), database=db)
            load_s = time.perf_counter() - start
            text_s = text_embeddings(segmenter, vocabulary, args.text_classes)
            times, cpu_times, masks = [], [], 0
            for _ in range(args.repeats):
                seconds, cpu, result = cpu_timed(lambda s=segmenter: s(image, vocabulary))
                times.append(seconds)
                cpu_times.append(cpu)
                masks = len(result.proposals)
            configs = ROWS[row][0]
            table.append(
                [
                    row, configs, f"{min(cpu_times):.3g}", f"{min(times):.3g}", masks,
                    f"{text_s:.3g}", f"{load_s:.3g}",
                ]
            )  # fmt: skip
            print(f"{row}: {min(cpu_times):.3g} CPU s / image, {masks} masks", flush=True)
    headers = [
        "pipeline", "configs", "CPU s / image", "wall s / image", "masks",
        "text embeddings s (once, scaled)", "load s",
    ]  # fmt: skip
    notes = (
        f"One {args.image_size[0]}×{args.image_size[1]} image, the 150 ADE20k classes, "
        f"{args.db_rows} database rows; {args.boxes} detector boxes, a "
        f"{args.points_per_side}² SAM grid (every mask kept), {args.gt_masks} ground-truth masks; "
        f"{args.size} architectures, random weights; best of {args.repeats}. 'CPU s' is the "
        f"process's CPU time ({args.threads} thread(s)): what the image takes on idle cores; "
        "'wall s' is longer when other work shares the cores. "
        f"Peak RSS {mib(max_rss_bytes()):.0f} MiB."
    )
    return report(
        "Cost per image of each table row",
        [markdown_table(headers, table)],
        results=None if args.no_save else Path(__file__).with_name("RESULTS.md"),
        notes=notes,
    )


if __name__ == "__main__":
    main()
