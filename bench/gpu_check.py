"""GPU check: every path in fp32 and bf16, at batch 1 and 4 — images/s and peak GPU memory
per stage.

Paths: training-free ``segment`` (Grounding DINO tiny → SAM ViT-B → CLIP ViT-B/16, 10 boxes),
the same with the fast mask tier (SAM 2.1 tiny, EdgeTAM), the FC-CLIP proposer (ConvNeXt-L), and
``db build`` (Grounding DINO → SAM ViT-B → CLIP ViT-B/16 rows). Real-size architectures with
random weights from :mod:`bench.models`: no downloads. Each path loads its models once (weights
in ``--dtypes``, float32 by default), then for each ``--precisions`` (``--precision``'s autocast:
fp32, bf16) and ``--batch-sizes`` (``--batch-size``: 1, 4) runs one warm-up batch and
``--images`` timed images, ``segment`` paths through ``Segmenter.segment_batch`` and ``db build``
through ``build_database``. Per stage (detector, SAM encoder, SAM decoder, FC-CLIP, backbone,
pooling, commit) it prints seconds per image and the peak of ``torch.cuda.max_memory_allocated``
during the stage's calls. Run through ``bench/gpu_check.sh`` (refuses to start without CUDA);
``--quick`` (``--device cpu --size tiny``, two images, fp32 and bf16 autocast on the CPU) is its
CPU dry run.
"""

from __future__ import annotations

import itertools
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from bench.common import (
    StageTimer,
    base_parser,
    markdown_table,
    mib,
    report,
    results_path,
    set_threads,
)
from bench.models import model_dir, test_image
from bench.pipeline import TopKDetector
from retclip import Segmenter
from retclip.backbones.base import Backbone
from retclip.backbones.registry import load_backbone
from retclip.database import FeatureDatabase
from retclip.database.build import BuildItem, build_database
from retclip.proposers.sam import DetectorSamProposer, SamSegmenter

PATHS = ("segment sam-vit-b", "segment sam2.1-tiny", "segment edgetam", "fcclip", "db build")
CLASSES = "cat, dog, car, tree, sky, person, wall, road"
STAGES = ("detector", "SAM encoder", "SAM decoder", "FC-CLIP", "backbone", "pooling", "commit")


class StageProfile(StageTimer):
    """Seconds and peak GPU memory of named stages, by wrapping the models' methods for a run
    (:meth:`StageTimer.patch`).

    A stage's outermost call resets CUDA's peak counter, synchronises around the call, and
    keeps the peak ``max_memory_allocated`` seen; nested calls of the same stage (``embed_batch``
    of one image calling ``embed``) count once."""

    def __init__(self, cuda: bool) -> None:
        super().__init__()
        self.cuda = cuda
        self.peak: dict[str, int] = defaultdict(int)
        self._depth: dict[str, int] = defaultdict(int)

    def wrap(self, stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            outer = self._depth[stage] == 0
            self._depth[stage] += 1
            if outer and self.cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth[stage] -= 1
                if outer:
                    if self.cuda:
                        torch.cuda.synchronize()
                        self.peak[stage] = max(self.peak[stage], torch.cuda.max_memory_allocated())
                    self.seconds[stage] += time.perf_counter() - start

        return timed

    def reset(self) -> None:
        self.seconds.clear()
        self.peak.clear()


def fcclip_checkpoint(backbone: Backbone, root: Path, variant: str = "convnext-l") -> Path:
    """A real-size FC-CLIP head (``variant`` ``convnext-l`` or ``rn50x64``) with random weights,
    saved as ``convert-fcclip`` writes it (built once, beside the bench models)."""
    from retclip.fcclip.checkpoint import save_converted
    from retclip.fcclip.model import CONVNEXT_LARGE, FCCLIP, RN50X64

    path = root / f"fcclip-{variant}-head.safetensors"
    if not path.exists():
        torch.manual_seed(0)
        config = {"convnext-l": CONVNEXT_LARGE, "rn50x64": RN50X64}[variant]
        model = FCCLIP(config, backbone.model)  # type: ignore[attr-defined]
        head = {k: v for k, v in model.state_dict().items() if not k.startswith("clip_model.")}
        save_converted(path, head, variant=variant, source="random weights (bench)")
    return path


class LoadedPath:
    """One path's loaded models: ``run(images, batch, precision)`` processes the images in
    batches of ``batch`` under ``precision``; ``targets`` are its stages for
    :meth:`StageProfile.patch`."""

    def __init__(
        self,
        run: Callable[[Sequence[int], int, str], None],
        targets: Sequence[tuple[str, object, str]],
    ) -> None:
        self.run = run
        self.targets = targets


def build_path(
    path: str, size: str, root: Path | None, device: str, dtype: str, work: Path
) -> LoadedPath:
    """Load the models of ``path`` (weights in ``dtype``)."""
    edges = {"shortest_edge": 64, "longest_edge": 96} if size == "tiny" else {}
    models = {"device": device, "dtype": dtype}
    if path == "fcclip":
        from retclip.fcclip.proposer import FcclipProposer

        convnext = str(model_dir("convnext-l", size, root))
        backbone = load_backbone(convnext, device, preprocessing="fcclip", dtype=dtype)
        checkpoint = fcclip_checkpoint(backbone, model_dir("convnext-l", size, root).parent)
        fcclip = FcclipProposer(checkpoint, backbone=backbone, device=device, dtype=dtype)  # type: ignore[arg-type]
        segmenter = Segmenter(backbone, fcclip, device=device)
        return LoadedPath(segment_runner(segmenter), [("FC-CLIP", fcclip, "propose")])
    sam = "sam-vit-b" if path == "db build" else path.split()[-1]
    proposer = DetectorSamProposer(
        TopKDetector(str(model_dir("gdino-tiny", size, root)), 10, **edges, **models),
        SamSegmenter(str(model_dir(sam, size, root)), **models),  # type: ignore[arg-type]
        nms_iou=1.0,
        min_area=0,
        mask_nms_iou=1.0,
    )
    backbone = load_backbone(str(model_dir("clip-b16", size, root)), device, dtype=dtype)
    targets: list[tuple[str, object, str]] = [
        ("detector", proposer.detector, "detect"),
        ("detector", proposer.detector, "detect_batch"),
        ("SAM encoder", proposer.sam, "embed"),
        ("SAM encoder", proposer.sam, "embed_batch"),
        ("SAM decoder", proposer.sam, "segment_boxes"),
        ("backbone", backbone, "encode_images"),
        ("pooling", backbone, "embed_segments"),
    ]
    if path == "db build":
        db = FeatureDatabase.create(work / "db", fingerprint=backbone.fingerprint, dim=backbone.dim)
        for i in range(64):
            Image.fromarray(test_image(seed=i)).save(work / f"image_{i}.jpg", quality=90)
        builds = iter(range(10**6))

        def build(images: Sequence[int], batch: int, precision: str) -> None:
            items = [
                BuildItem(str(work / f"image_{i % 64}.jpg"), ("cat", "dog", "car")) for i in images
            ]
            build_database(db, backbone, proposer, items, build_id=f"b{next(builds)}",
                           batch_size=batch, progress=False, precision=precision)  # fmt: skip

        return LoadedPath(build, [*targets, ("commit", db, "add")])
    segmenter = Segmenter(backbone, proposer, device=device)
    return LoadedPath(segment_runner(segmenter), targets)


def segment_runner(segmenter: Segmenter) -> Callable[[Sequence[int], int, str], None]:
    def run(images: Sequence[int], batch: int, precision: str) -> None:
        segmenter.precision = precision  # type: ignore[assignment]
        for start in range(0, len(images), batch):
            pixels = [test_image(seed=i) for i in images[start : start + batch]]
            for outcome in segmenter.segment_batch(pixels, CLASSES):
                if isinstance(outcome, Exception):
                    raise outcome

    return run


def main(argv: Sequence[str] | None = None) -> str:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtypes", nargs="+", default=["float32"], help="weights' dtypes")
    parser.add_argument(
        "--precisions",
        nargs="+",
        default=["fp32", "bf16"],
        choices=["fp32", "bf16", "fp16"],
        help="--precision (autocast)",
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    parser.add_argument("--images", type=int, default=8, help="timed images per run")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="CPU dry run: --device cpu --size tiny, two images, no fcclip",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.device, args.size, args.images = "cpu", "tiny", min(args.images, 2)
        args.precisions = [p for p in args.precisions if p != "fp16"]
        # FC-CLIP's random head is built at real size only (fcclip_checkpoint): not here
        args.paths = [p for p in args.paths if p != "fcclip"]
    set_threads(args.threads)
    cuda = torch.device(args.device).type == "cuda"
    rows: list[list[object]] = []
    stage_rows: list[list[object]] = []
    profile = StageProfile(cuda)
    for dtype in args.dtypes:
        for path in args.paths:
            if cuda:
                torch.cuda.empty_cache()
            with tempfile.TemporaryDirectory(prefix="retclip-gpu-check-") as tmp:
                loaded = build_path(path, args.size, args.models_dir, args.device, dtype, Path(tmp))
                for precision, batch in itertools.product(args.precisions, args.batch_sizes):
                    loaded.run(range(batch), batch, precision)  # warm-up: kernels, caches
                    if cuda:
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                    profile.reset()
                    with profile.patch(loaded.targets):
                        start = time.perf_counter()
                        loaded.run(range(1, args.images + 1), batch, precision)
                        if cuda:
                            torch.cuda.synchronize()
                        seconds = time.perf_counter() - start
                    peak = max(
                        [*profile.peak.values(), torch.cuda.max_memory_allocated() if cuda else 0]
                    )
                    shown = f"{mib(peak):.0f}" if cuda else "-"
                    key = [path, dtype, precision, batch]
                    rows.append([*key, args.images / seconds, seconds / args.images, shown])
                    stage_rows.append(
                        [*key, *(stage_cell(profile, s, args.images, cuda) for s in STAGES)]
                    )
                    print(f"{path} {dtype} {precision} batch {batch}: "
                          f"{args.images / seconds:.3g} images/s, peak {shown} MiB")  # fmt: skip
                del loaded
    headers = ["path", "weights", "precision", "batch", "images/s", "s/image", "peak GPU MiB"]
    stage_headers = ["path", "weights", "precision", "batch", *(f"{s} s/img (MiB)" for s in STAGES)]
    notes = (
        f"{args.size} architectures, random weights, 480×640 images, device {args.device}; "
        f"{args.images} timed images per run after one warm-up batch. Stage cells: seconds per "
        "image (peak GPU MiB during the stage's calls); – where a path has no such stage."
    )
    return report(
        "GPU check",
        [markdown_table(headers, rows), markdown_table(stage_headers, stage_rows)],
        results=results_path(args),
        notes=notes,
    )


def stage_cell(profile: StageProfile, stage: str, images: int, cuda: bool) -> str:
    if stage not in profile.seconds:
        return "–"
    memory = f" ({mib(profile.peak[stage]):.0f})" if cuda else ""
    return f"{profile.seconds[stage] / images:.3g}{memory}"


if __name__ == "__main__":
    main()
