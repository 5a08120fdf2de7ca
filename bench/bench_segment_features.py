"""Segment features: one dense backbone pass + mask pooling against one CLIP pass per masked crop.

retclip's :func:`~retclip.pooling.segment_features` encodes the image once and pools every mask
from the dense map (paper §2.1). The baseline crops each mask's bounding box, greys out the pixels
outside the mask, resizes the crop to CLIP's 224 px and encodes it with the CLIP image encoder
(``get_image_features``), ``--crop-batch`` crops per call (1 = the usual per-mask loop). Same
model, same image, same masks; the two runs alternate and medians are reported.

    OMP_NUM_THREADS=1 python -m bench.bench_segment_features --masks 10 50 200
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from bench.common import (
    base_parser,
    interleaved,
    markdown_table,
    median,
    report,
    results_path,
    set_threads,
)
from bench.models import model_dir, random_masks, test_image
from retclip.backbones.base import segment_features
from retclip.backbones.clip_vit import ClipVitBackbone


def masked_crops(image: np.ndarray, masks: np.ndarray, size: int) -> torch.Tensor:
    """``[N, 3, size, size]`` float RGB 0–255: each mask's box, outside pixels grey (CLIP mean)."""
    grey = np.array([122.77, 116.75, 104.09], np.float32)
    crops = []
    for mask in masks:
        ys, xs = np.nonzero(mask)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        crop = np.where(mask[y0:y1, x0:x1, None], image[y0:y1, x0:x1], grey).astype(np.float32)
        tensor = torch.from_numpy(crop).permute(2, 0, 1)[None]
        crops.append(F.interpolate(tensor, (size, size), mode="bilinear", align_corners=False))
    return torch.cat(crops)


@torch.inference_mode()
def encode_crops(backbone: ClipVitBackbone, crops: torch.Tensor, batch: int) -> torch.Tensor:
    """Unit CLIP image embeddings of the crops, ``batch`` crops per forward pass."""
    mean = torch.tensor(backbone.mean)[:, None, None] * 255.0
    std = torch.tensor(backbone.std)[:, None, None] * 255.0
    outputs = []
    for start in range(0, len(crops), batch):
        pixels = (crops[start : start + batch] - mean) / std
        outputs.append(backbone.model.get_image_features(pixel_values=pixels).pooler_output)
    return F.normalize(torch.cat(outputs), dim=-1)


def main(argv: Sequence[str] | None = None) -> str:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="clip-b16", choices=("clip-b16", "clip-l14"))
    parser.add_argument("--masks", type=int, nargs="+", default=[10, 50, 200])
    parser.add_argument("--resolutions", type=int, nargs="+", default=[224, 448])
    parser.add_argument("--crop-batch", type=int, default=1)
    parser.add_argument("--image-size", type=int, nargs=2, default=[480, 640], metavar=("H", "W"))
    args = parser.parse_args(argv)
    set_threads(args.threads)
    path = model_dir(args.backbone, args.size, args.models_dir)
    image = test_image(*args.image_size)
    crop_size = int(ClipVitBackbone(str(path)).model.config.vision_config.image_size)
    table = []
    for resolution in args.resolutions:
        backbone = ClipVitBackbone(str(path), resolution=resolution)
        for count in args.masks:
            masks = random_masks(count, *args.image_size, seed=count)
            runs = {
                "pooling": lambda b=backbone, m=masks: segment_features(b, image, m),
                "crops": lambda b=backbone, m=masks: encode_crops(
                    b, masked_crops(image, m, crop_size), args.crop_batch
                ),
            }
            times = interleaved(runs, args.repeats)
            pool_s, crop_s = median(times["pooling"]), median(times["crops"])
            table.append([resolution, count, pool_s, crop_s, crop_s / pool_s])
    headers = ["dense resolution", "masks", "dense + pooling s", "per-crop CLIP s", "speed-up"]
    notes = (
        f"Backbone {args.backbone} ({args.size}, random weights), image "
        f"{args.image_size[0]}×{args.image_size[1]}, crops at {crop_size} px, "
        f"{args.crop_batch} crop(s) per forward; medians of {args.repeats}, interleaved. "
        "Target: speed-up ≥ 20× at 50 masks."
    )
    return report(
        "Segment features: mask pooling vs per-mask re-encoding",
        [markdown_table(headers, table)],
        results=results_path(args),
        notes=notes,
    )


if __name__ == "__main__":
    main()
