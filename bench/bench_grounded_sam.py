"""Training-free ``retclip segment`` vs Grounded-SAM as its users run it, same models and image.

Grounded-SAM (written here with transformers only, no retclip code): for each prompt chunk of
the class names (``"cat . dog ."``, greedily filled up to the model's 256-token limit) the
processor and the whole Grounding DINO model (``AutoModelForZeroShotObjectDetection``) run once,
then ``post_process_grounded_object_detection``; the ``--boxes`` best boxes over all chunks go
to SAM: one image embedding, all boxes in one prompt-encoder + mask-decoder call,
``post_process_masks``; the labels are the detector's text labels.

retclip: the ``grounded-sam`` proposer and the backbone built through
:func:`retclip.pipeline.build_segmenter` from a :class:`~retclip.pipeline.ModelSpec`, exactly as
``retclip segment`` builds them (Grounding DINO's image backbone once per image for all prompts,
one SAM embedding, boxes batched), then the backbone pass, mask pooling, ``s_clip`` + ``s_ret``
against a database of random rows and the panoptic merge (``Segmenter.__call__``, no file
writing). Random weights make detector scores meaningless, so both keep exactly the ``--boxes``
best boxes (thresholds 0, retclip's NMS and area filter off): equal SAM work.

Targets: retclip ≤ 1.15× Grounded-SAM's time at 8 classes, and faster than it at 150.

    OMP_NUM_THREADS=1 python -m bench.bench_grounded_sam --classes 8 150 --repeats 2
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import retclip.segmenter as segmenter_module
from bench.bench_fcclip_forward import random_text_tower
from bench.bench_segment_latency import random_database
from bench.common import (
    StageTimer,
    base_parser,
    interleaved,
    markdown_table,
    median,
    report,
    results_path,
    set_threads,
)
from bench.models import model_dir, test_image
from retclip.pipeline import ModelSpec, PipelineSpec, build_segmenter
from retclip.proposers.sam import Detections
from retclip.vocabulary import Vocabulary

EIGHT = ("cat", "dog", "car", "tree", "sky", "person", "wall", "road")
RETCLIP_STAGES = ("detector", "SAM encoder", "SAM decoder", "backbone", "pooling", "scores",
                  "merge")  # fmt: skip
USER_STAGES = ("detector", "SAM encoder", "SAM decoder")


class GroundedSam:
    """Grounded-SAM the way its users write it with transformers (see the module docstring).

    ``stages`` accumulates seconds per stage: ``detector`` (processor, model and
    post-processing, all chunks), ``SAM encoder`` (processor + image embedding), ``SAM decoder``
    (prompt encoder + mask decoder + ``post_process_masks``); ``detector forward`` is the
    model's forward alone (the rest of ``detector`` is pre- and post-processing).
    """

    def __init__(self, detector: Path, sam: Path, boxes: int, size: dict[str, int]) -> None:
        from transformers import (
            AutoModelForZeroShotObjectDetection,
            AutoProcessor,
            SamModel,
            SamProcessor,
        )

        self.processor: Any = AutoProcessor.from_pretrained(detector)
        self.detector: Any = AutoModelForZeroShotObjectDetection.from_pretrained(detector).eval()
        self.sam_processor: Any = SamProcessor.from_pretrained(sam)
        self.sam: Any = SamModel.from_pretrained(sam).eval()
        self.boxes = boxes
        self.size = size
        self.max_tokens = int(self.detector.config.max_text_len)
        self.stages: dict[str, float] = defaultdict(float)

    def chunks(self, classes: Sequence[str]) -> list[str]:
        """``"a . b ."`` prompts, each as many names as fit in ``max_text_len`` tokens."""
        prompts: list[str] = []
        current: list[str] = []
        for name in classes:
            text = " . ".join([*current, name.lower()]) + " ."
            if current and len(self.processor.tokenizer(text)["input_ids"]) > self.max_tokens:
                prompts.append(" . ".join(current) + " .")
                current = []
            current.append(name.lower())
        prompts.append(" . ".join(current) + " .")
        return prompts

    @torch.inference_mode()
    def __call__(self, image: np.ndarray, classes: Sequence[str]) -> tuple[torch.Tensor, list[str]]:
        """``[K, H, W]`` bool masks and their text labels."""
        from PIL import Image

        picture = Image.fromarray(image)
        height, width = image.shape[:2]
        start = time.perf_counter()
        boxes, scores, labels = [], [], []
        for prompt in self.chunks(classes):
            inputs = self.processor(
                images=picture, text=prompt, return_tensors="pt", images_kwargs={"size": self.size}
            )
            forward = time.perf_counter()
            outputs = self.detector(**inputs)
            self._lap("detector forward", forward)
            found = self.processor.post_process_grounded_object_detection(
                outputs, inputs.input_ids, threshold=0.0, target_sizes=[(height, width)]
            )[0]
            boxes.append(found["boxes"])
            scores.append(found["scores"])
            labels += found["text_labels"]
        order = torch.cat(scores).argsort(descending=True)[: self.boxes]
        top = torch.cat(boxes)[order]
        top_labels = [labels[i] for i in order.tolist()]
        start = self._lap("detector", start)
        inputs = self.sam_processor(picture, input_boxes=[top.tolist()], return_tensors="pt")
        embedding = self.sam.get_image_embeddings(inputs["pixel_values"])
        start = self._lap("SAM encoder", start)
        out = self.sam(
            image_embeddings=embedding, input_boxes=inputs["input_boxes"], multimask_output=False
        )
        masks = self.sam_processor.post_process_masks(
            out.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"]
        )[0][:, 0]
        self._lap("SAM decoder", start)
        return masks, top_labels

    def _lap(self, stage: str, start: float) -> float:
        now = time.perf_counter()
        self.stages[stage] += now - start
        return now


def retclip_segmenter(
    args: Any, db: Path
) -> tuple[segmenter_module.Segmenter, list[tuple[str, object, str]]]:
    """``retclip segment``'s segmenter (grounded-sam, thresholds 0, NMS and area filter off)
    keeping the ``--boxes`` best detections, and the :class:`StageTimer` targets of its stages."""
    from bench.pipeline import stage_targets

    model = ModelSpec(
        backbone=str(model_dir(args.backbone, args.size, args.models_dir)),
        proposer="grounded-sam",
        detector=str(model_dir(args.detector, args.size, args.models_dir)),
        sam=str(model_dir("sam-vit-b", args.size, args.models_dir)),
        box_threshold=0.0,
        text_threshold=0.0,
        nms_iou=1.0,
        min_mask_area=0,
        mask_nms_iou=1.0,
        device="cpu",
    )
    segmenter = build_segmenter(PipelineSpec(model=model, db=db))
    proposer: Any = segmenter.proposer
    detector = proposer.detector
    detector.size = dict(args.detector_size)  # the tiny models' inputs (real: 800 / 1333)
    detect = detector.detect

    def top_boxes(image: np.ndarray, classes: Sequence[str]) -> Detections:
        found = detect(image, classes)
        return found.select(found.scores.argsort(descending=True)[: args.boxes])

    detector.detect = top_boxes
    targets = [
        *stage_targets(proposer, segmenter.backbone),
        ("scores", segmenter_module, "clip_scores"),
        ("merge", segmenter_module, "merge"),
    ]
    if segmenter.retriever is not None:
        targets.append(("scores", segmenter.retriever, "scores"))
    return segmenter, targets


def vocabulary(classes: int) -> Vocabulary:
    """The 8 everyday classes for ``classes <= 8``, else the first ADE20k classes (all 150:
    ``--vocab ade20k-150``)."""
    if classes <= len(EIGHT):
        return Vocabulary.from_string(", ".join(EIGHT[:classes]))
    ade = Vocabulary.builtin("ade20k-150")
    return ade if classes >= len(ade) else Vocabulary(ade.classes[:classes], ade.name)


def prompt_names(vocab: Vocabulary) -> list[str]:
    """The detector's prompts: first synonyms (as retclip's proposers prompt)."""
    return [c.synonyms[0] for c in vocab.classes]


def main(argv: Sequence[str] | None = None) -> str:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[8, 150])
    parser.add_argument("--boxes", type=int, default=10, help="boxes kept per image (both)")
    parser.add_argument("--backbone", default="clip-b16", choices=("clip-b16", "convnext-l"))
    parser.add_argument("--detector", default="gdino-tiny", choices=("gdino-tiny", "gdino-base"))
    parser.add_argument("--db-rows", type=int, default=10_000)
    parser.add_argument("--image-size", type=int, nargs=2, default=[480, 640], metavar=("H", "W"))
    parser.add_argument(
        "--text",
        choices=("computed", "random"),
        default="computed",
        help="retclip's text embeddings: its CLIP text tower, or a seeded random one (they are "
        "computed once per vocabulary, untimed; 150 ADE20k classes × 402 synonyms × 14 templates)",
    )
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed calls each before the first vocabulary's"
    )
    parser.add_argument("--quick", action="store_true", help="tiny models, 48×64 image, 1 round")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.repeats, args.image_size, args.db_rows = "tiny", 1, [48, 64], 200
    # the tiny test detector is sized for 64 px inputs; real ones use Grounded-SAM's 800 / 1333
    args.detector_size = (
        {"shortest_edge": 64, "longest_edge": 96}
        if args.size == "tiny"
        else {"shortest_edge": 800, "longest_edge": 1333}
    )
    set_threads(args.threads)
    if args.text == "random":  # random text embeddings never enter a shared cache
        os.environ["RETCLIP_CACHE_DIR"] = tempfile.mkdtemp(prefix="retclip-bench-")
    else:
        os.environ.setdefault("RETCLIP_CACHE_DIR", tempfile.mkdtemp(prefix="retclip-bench-"))
    image = test_image(*args.image_size)
    vocabularies = {n: vocabulary(n) for n in args.classes}
    union = list(dict.fromkeys(name for v in vocabularies.values() for name in v.names))
    users = GroundedSam(
        model_dir(args.detector, args.size, args.models_dir),
        model_dir("sam-vit-b", args.size, args.models_dir),
        args.boxes,
        args.detector_size,
    )
    rows: list[list[object]] = []
    stage_rows: list[list[object]] = []
    checks: list[str] = []
    verdicts: list[str] = []
    with tempfile.TemporaryDirectory(prefix="retclip-bench-gsam-") as tmp:
        backbone = ModelSpec(
            backbone=str(model_dir(args.backbone, args.size, args.models_dir)), device="cpu"
        ).load_backbone()
        db = random_database(Path(tmp) / "db", backbone, args.db_rows, union)
        segmenter, targets = retclip_segmenter(args, db)
        if args.text == "random":  # classes and database labels (the retriever's backbone)
            tower = random_text_tower(segmenter.backbone.dim)
            segmenter.backbone.encode_texts = tower
        detector: Any = segmenter.proposer.detector
        for n, vocab in vocabularies.items():
            names = prompt_names(vocab)
            segmenter.class_embeddings(vocab)  # cached: computed once per vocabulary in a run
            for _ in range(args.warmup if not rows else 0):  # lazy initialisation
                segmenter(image, vocab)
                users(image, names)
            last: dict[str, Any] = {}

            def run(name: str, fn: Any, *args: Any, last: dict[str, Any] = last) -> Any:
                return lambda: last.__setitem__(name, fn(*args))

            users.stages.clear()
            timer = StageTimer()
            with timer.patch(targets):
                times = interleaved(
                    {
                        "Grounded-SAM": run("Grounded-SAM", users, image, names),
                        "retclip": run("retclip", segmenter, image, vocab),
                    },
                    args.repeats,
                    warmup=0,
                )
            prompts = len(users.chunks(names))
            checks.append(
                f"{n} classes: {prompts} prompt(s) (retclip: {len(detector.prompts(names))}), "
                f"{len(last['Grounded-SAM'][0])} vs {len(last['retclip'].proposals.masks)} masks"
            )
            base, ours_s = median(times["Grounded-SAM"]), median(times["retclip"])
            ratio = ours_s / base
            rows.append([n, prompts, args.boxes, base, ours_s, ratio])
            rounds = args.repeats
            stage_rows.append(
                [n, "Grounded-SAM", *(users.stages.get(s, 0.0) / rounds for s in USER_STAGES),
                 "", "", "", ""]
            )  # fmt: skip
            forward = users.stages["detector forward"] / rounds
            checks[-1] += (
                f" (Grounded-SAM's detector forward {forward:.3g} s of its detector stage)"
            )
            stage_rows.append(
                [n, "retclip", *(timer.seconds.get(s, 0.0) / rounds for s in RETCLIP_STAGES)]
            )
            goal = "≤ 1.15×" if n <= len(EIGHT) else "< 1×"
            met = ratio <= 1.15 if n <= len(EIGHT) else ratio < 1.0
            verdicts.append(
                f"{n} classes: {ratio:.3f}× (target {goal}: {'met' if met else 'missed'})"
            )
    table = markdown_table(
        ["classes", "prompts", "boxes", "Grounded-SAM s/image", "retclip s/image",
         "retclip / Grounded-SAM"],
        rows,
    )  # fmt: skip
    stages = markdown_table(["classes", "chain", *(f"{s} s" for s in RETCLIP_STAGES)], stage_rows)
    notes = (
        f"{args.detector} + SAM ViT-B + {args.backbone} ({args.size} architectures, random "
        f"weights), image {args.image_size[0]}×{args.image_size[1]} (detector input short side "
        f"{args.detector_size['shortest_edge']}), {args.boxes} boxes per image on both sides; "
        f"retclip with a database of {args.db_rows} random rows (flat index), text embeddings "
        f"({'a seeded random text tower' if args.text == 'random' else 'its CLIP text tower'}) "
        f"cached (computed once per vocabulary, as in a run); Grounded-SAM runs Grounding DINO "
        f"whole once per prompt chunk. Medians of {args.repeats} interleaved rounds ({args.warmup} "
        f"untimed call(s) each before the first vocabulary's); stage columns are means over the "
        f"timed rounds. Work: " + "; ".join(checks) + ". Targets: " + "; ".join(verdicts) + "."
    )
    return report(
        "Training-free segment vs Grounded-SAM as users run it",
        [table, stages],
        results=results_path(args),
        notes=notes,
    )


if __name__ == "__main__":
    main()
