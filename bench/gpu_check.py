"""GPU check: every path in float32 and bfloat16 — images/s and peak GPU memory per stage.

Paths: training-free ``segment`` (Grounding DINO tiny → SAM ViT-B → CLIP ViT-B/16, 10 boxes),
the same with the fast mask tier (SAM 2.1 tiny, EdgeTAM), the FC-CLIP proposer (ConvNeXt-L), and
``db build`` (Grounding DINO → SAM ViT-B → CLIP ViT-B/16 rows). Real-size architectures with
random weights from :mod:`bench.models`: no downloads. Each path loads its models once, runs one
warm-up image, then ``--images`` timed images; peak memory is ``torch.cuda.max_memory_allocated``
since the path's models were loaded. Run through ``bench/gpu_check.sh`` (refuses to start
without CUDA); ``--device cpu --size tiny`` is the CPU smoke test of this script.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image

from bench.common import base_parser, markdown_table, mib, report, results_path, set_threads
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


def fcclip_checkpoint(backbone: Backbone, root: Path) -> Path:
    """A real-size FC-CLIP ConvNeXt-L head with random weights, saved as ``convert-fcclip``
    writes it (built once, beside the bench models)."""
    from retclip.fcclip.checkpoint import save_converted
    from retclip.fcclip.model import CONVNEXT_LARGE, FCCLIP

    path = root / "fcclip-convnext-l-head.safetensors"
    if not path.exists():
        torch.manual_seed(0)
        model = FCCLIP(CONVNEXT_LARGE, backbone.model)  # type: ignore[attr-defined]
        head = {k: v for k, v in model.state_dict().items() if not k.startswith("clip_model.")}
        save_converted(path, head, variant="convnext-l", source="random weights (bench)")
    return path


def build_path(
    path: str, size: str, root: Path | None, device: str, dtype: str, work: Path
) -> Callable[[int], None]:
    """Load the models of ``path`` and return ``run(i)``, which processes image ``i``."""
    edges = {"shortest_edge": 64, "longest_edge": 96} if size == "tiny" else {}
    models = {"device": device, "dtype": dtype}
    if path == "fcclip":
        from retclip.fcclip.proposer import FcclipProposer

        convnext = str(model_dir("convnext-l", size, root))
        backbone = load_backbone(convnext, device, preprocessing="fcclip", dtype=dtype)
        checkpoint = fcclip_checkpoint(backbone, model_dir("convnext-l", size, root).parent)
        fcclip = FcclipProposer(checkpoint, backbone=backbone, device=device, dtype=dtype)  # type: ignore[arg-type]
        segmenter = Segmenter(backbone, fcclip, device=device)
        return lambda i: segmenter(test_image(seed=i), CLASSES) and None
    sam = "sam-vit-b" if path == "db build" else path.split()[-1]
    proposer = DetectorSamProposer(
        TopKDetector(str(model_dir("gdino-tiny", size, root)), 10, **edges, **models),
        SamSegmenter(str(model_dir(sam, size, root)), **models),  # type: ignore[arg-type]
        nms_iou=1.0,
        min_area=0,
        mask_nms_iou=1.0,
    )
    backbone = load_backbone(str(model_dir("clip-b16", size, root)), device, dtype=dtype)
    if path == "db build":
        db = FeatureDatabase.create(work / "db", fingerprint=backbone.fingerprint, dim=backbone.dim)

        def build(i: int) -> None:
            image = work / f"image_{i}.jpg"
            Image.fromarray(test_image(seed=i)).save(image, quality=90)
            item = BuildItem(str(image), ("cat", "dog", "car"))
            build_database(db, backbone, proposer, [item], build_id=f"b{i}", progress=False)

        return build
    segmenter = Segmenter(backbone, proposer, device=device)
    return lambda i: segmenter(test_image(seed=i), CLASSES) and None


def main(argv: Sequence[str] | None = None) -> str:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    parser.add_argument("--images", type=int, default=4, help="timed images per path")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    cuda = torch.device(args.device).type == "cuda"
    rows: list[list[object]] = []
    for dtype in args.dtypes:
        for path in args.paths:
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            with tempfile.TemporaryDirectory(prefix="retclip-gpu-check-") as tmp:
                run = build_path(path, args.size, args.models_dir, args.device, dtype, Path(tmp))
                run(0)  # warm-up: kernels, caches
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                for i in range(1, args.images + 1):
                    run(i)
                if cuda:
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - start
            peak = f"{mib(torch.cuda.max_memory_allocated()):.0f}" if cuda else "-"
            rows.append([path, dtype, args.images / seconds, seconds / args.images, peak])
            print(f"{path} {dtype}: {args.images / seconds:.3g} images/s, peak {peak} MiB")
    table = markdown_table(["path", "dtype", "images/s", "s/image", "peak GPU MiB"], rows)
    notes = f"{args.size} architectures, random weights, 480×640 images, device {args.device}."
    return report("GPU check", [table], results=results_path(args), notes=notes)


if __name__ == "__main__":
    main()
