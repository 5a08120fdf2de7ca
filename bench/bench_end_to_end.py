"""End to end: retclip's training-free segmentation against the naive chain, same models/images.

Naive chain (what one builds from off-the-shelf pieces): transformers'
``zero-shot-object-detection`` pipeline with Grounding DINO (it runs the detector once per
candidate label) → ``SamModel`` called once per box (image encoder included) → the CLIP image
encoder on each masked crop → argmax of cosine with the class text embeddings.

retclip: :class:`~retclip.Segmenter` with Grounding DINO (one pass for all classes) → SAM (one
image embedding, boxes batched) → one dense CLIP pass + mask pooling → scores and panoptic merge.
Both chains keep the ``--boxes`` best boxes.

    OMP_NUM_THREADS=1 python -m bench.bench_end_to_end --images 2 --boxes 5 --classes 3
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from bench.common import (
    PeakMemory,
    base_parser,
    interleaved,
    markdown_table,
    median,
    mib,
    report,
    results_path,
    set_threads,
)
from bench.models import model_dir, test_image
from bench.pipeline import make_backbone, make_proposer

CLASS_NAMES = ("cat", "dog", "car", "tree", "sky", "person", "wall", "road", "apple", "banana")


class NaiveChain:
    """Detector pipeline → SAM per box → CLIP per masked crop → argmax."""

    def __init__(self, detector: Path, sam: Path, clip: Path, boxes: int) -> None:
        from transformers import CLIPModel, CLIPProcessor, SamModel, SamProcessor, pipeline

        self.detect: Any = pipeline("zero-shot-object-detection", model=str(detector))
        self.sam_processor: Any = SamProcessor.from_pretrained(sam)
        self.sam: Any = SamModel.from_pretrained(sam).eval()
        self.clip_processor: Any = CLIPProcessor.from_pretrained(clip)
        self.clip: Any = CLIPModel.from_pretrained(clip).eval()
        self.boxes = boxes

    @torch.inference_mode()
    def __call__(self, image: np.ndarray, classes: Sequence[str]) -> list[tuple[np.ndarray, int]]:
        picture = Image.fromarray(image)
        found = self.detect(picture, candidate_labels=list(classes), threshold=0.0)
        text = self.clip_processor(text=[f"a photo of a {c}." for c in classes], padding=True,
                                   return_tensors="pt")  # fmt: skip
        text_emb = F.normalize(self.clip.get_text_features(**text).pooler_output, dim=-1)
        results = []
        for detection in found[: self.boxes]:
            box = detection["box"]
            xyxy = [float(box[k]) for k in ("xmin", "ymin", "xmax", "ymax")]
            inputs = self.sam_processor(picture, input_boxes=[[xyxy]], return_tensors="pt")
            out = self.sam(**inputs, multimask_output=False)
            mask = self.sam_processor.post_process_masks(
                out.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"]
            )[0][0, 0].numpy()
            ys, xs = np.nonzero(mask)
            if len(ys) == 0:
                continue
            crop = image[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].copy()
            crop[~mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]] = 127
            pixels = self.clip_processor(images=crop, return_tensors="pt")["pixel_values"]
            emb = F.normalize(
                self.clip.get_image_features(pixel_values=pixels).pooler_output, dim=-1
            )
            results.append((mask, int((emb @ text_emb.T).argmax())))
        return results


def main(argv: Sequence[str] | None = None) -> str:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--boxes", type=int, default=5, help="boxes kept per image (both chains)")
    parser.add_argument("--classes", type=int, default=3, help="classes in the vocabulary")
    parser.add_argument("--backbone", default="clip-b16", choices=("clip-b16", "clip-l14"))
    parser.add_argument("--detector", default="gdino-tiny", choices=("gdino-tiny", "gdino-base"))
    parser.add_argument("--image-size", type=int, nargs=2, default=[480, 640], metavar=("H", "W"))
    args = parser.parse_args(argv)
    set_threads(args.threads)
    os.environ.setdefault("RETCLIP_CACHE_DIR", tempfile.mkdtemp(prefix="retclip-bench-"))
    from retclip import Segmenter
    from retclip.vocabulary import Vocabulary

    classes = list(CLASS_NAMES[: args.classes])
    images = [test_image(*args.image_size, seed=i) for i in range(args.images)]
    root, size = args.models_dir, args.size
    naive = NaiveChain(
        model_dir(args.detector, size, root),
        model_dir("sam-vit-b", size, root),
        model_dir(args.backbone, size, root),
        args.boxes,
    )
    segmenter = Segmenter(
        make_backbone(args.backbone, size, root),
        make_proposer(args.detector, size, root, args.boxes),
    )
    vocab = Vocabulary.from_string(", ".join(classes))
    segmenter.class_embeddings(vocab)  # text embeddings are cached per vocabulary
    peaks = {"retclip": 0, "naive": 0}

    def run(name: str, fn: Any) -> Any:
        def go() -> None:
            with PeakMemory() as memory:
                for image in images:
                    fn(image)
            peaks[name] = max(peaks[name], memory.delta)

        return go

    times = interleaved(
        {
            "retclip": run("retclip", lambda image: segmenter(image, vocab)),
            "naive": run("naive", lambda image: naive(image, classes)),
        },
        args.repeats,
        warmup=0,
    )
    rows = []
    for name in ("naive", "retclip"):
        seconds = median(times[name])
        rows.append([name, seconds / len(images), len(images) / seconds, mib(peaks[name])])
    ratio = median(times["naive"]) / median(times["retclip"])
    rows.append(["speed-up (naive / retclip)", "", f"{ratio:.2f}×", ""])
    headers = ["chain", "s / image", "images / s", "peak memory above start (MiB)"]
    notes = (
        f"{args.detector} + SAM ViT-B + {args.backbone} ({size}, random weights), "
        f"{len(images)} images {args.image_size[0]}×{args.image_size[1]}, {args.classes} classes, "
        f"{args.boxes} boxes per image in both chains; medians of {args.repeats}, interleaved. "
        "Target: ≥ 3×."
    )
    return report(
        "End to end: retclip vs the naive chain",
        [markdown_table(headers, rows)],
        results=results_path(args),
        notes=notes,
    )


if __name__ == "__main__":
    main()
