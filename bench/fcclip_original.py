"""Driver of the ORIGINAL FC-CLIP for ``bench/bench_fcclip_forward.py``; run it with the FC-CLIP
venv's python, never from retclip (it imports detectron2 and ``fcclip``, which retclip does not
ship or import).

It builds FC-CLIP from its ADE20k evaluation config (``fcclip_convnext_large_eval_ade20k.yaml``:
ConvNeXt-L CLIP ``convnext_large_d_320``, 250 queries, 150 ADE20k classes) with random weights
(``torch.manual_seed(0)``, no download), or with ``--reduced`` the tiny architecture of
``tests/fixtures/fcclip`` (its README says how), saves ``model.state_dict()`` with the original
key names as ``{"model": state}`` (``.pth``, what ``retclip convert-fcclip`` reads), computes its
text classifier once (``--text computed``; by default random unit rows of its shape, as computing
150 classes × synonyms × 14 templates with the real text tower takes tens of minutes on one CPU
thread), prints one JSON line, then serves one JSON line per command read from stdin:

- ``{"image": "x.npy"}``: load an ``[H, W, 3]`` uint8 image and resize it as the test
  ``DatasetMapper`` does (``ResizeShortestEdge`` 800 / 1333); reply its resized size;
- ``{"run": true}``: one forward of the model on it (``model([{"image", "height", "width"}])``,
  ``torch.no_grad``, semantic + panoptic + instance inference as the config sets them); reply the
  seconds and the number of panoptic segments;
- ``{"quit": true}``.

Usage: ``python bench/fcclip_original.py --fcclip-root FC_CLIP --state OUT.pth [--reduced]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types
from pathlib import Path

CONFIG = "configs/coco/panoptic-segmentation/fcclip/fcclip_convnext_large_eval_ade20k.yaml"
#: ``--reduced``: the architecture of tests/fixtures/fcclip (its README, step 4).
REDUCED = [
    "MODEL.FC_CLIP.CLIP_MODEL_NAME", "convnext_large_fxtest",
    "MODEL.FC_CLIP.EMBED_DIM", 16,
    "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", 10,
    "MODEL.MASK_FORMER.DEC_LAYERS", 4,
    "MODEL.MASK_FORMER.HIDDEN_DIM", 64,
    "MODEL.MASK_FORMER.NHEADS", 4,
    "MODEL.MASK_FORMER.DIM_FEEDFORWARD", 128,
    "MODEL.SEM_SEG_HEAD.CONVS_DIM", 64,
    "MODEL.SEM_SEG_HEAD.MASK_DIM", 64,
    "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", 2,
    "TEST.DETECTIONS_PER_IMAGE", 20,
]  # fmt: skip
TINY_CHANNELS = (8, 16, 24, 32)


def reply(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fcclip-root", type=Path, required=True)
    parser.add_argument("--state", type=Path, required=True, help="where to save the weights")
    parser.add_argument("--reduced", action="store_true", help="the fixtures' tiny architecture")
    parser.add_argument("--tests", type=Path, help="retclip's tests/ (tiny models, --reduced)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--text",
        choices=("random", "computed"),
        default="random",
        help="text classifier: random unit rows of its shape, or computed by its text tower",
    )
    args = parser.parse_args()

    # the compiled deformable-attention op is absent on CPU: an empty stand-in lets the import
    # succeed and the original runs its own pure-PyTorch fallback (as for the fixtures)
    sys.modules["MultiScaleDeformableAttention"] = types.ModuleType("MultiScaleDeformableAttention")
    import numpy as np
    import open_clip
    import torch

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    os.chdir(args.fcclip_root)  # the original opens its class lists by relative path
    sys.path.insert(0, str(args.fcclip_root))
    from detectron2.config import get_cfg
    from detectron2.data import transforms as T
    from detectron2.modeling import build_model
    from detectron2.projects.deeplab import add_deeplab_config
    from fcclip import add_fcclip_config, add_maskformer2_config
    from fcclip.modeling.backbone.clip import CLIP

    overrides: list[object] = ["MODEL.FC_CLIP.CLIP_PRETRAINED_WEIGHTS", "", "MODEL.DEVICE", "cpu"]
    channels: tuple[int, ...] | None = None
    if args.reduced:
        sys.path.insert(0, str(args.tests))
        import tiny_models  # registers the tiny timm ConvNeXt

        config_dir = args.state.parent / "open_clip_configs"
        config_dir.mkdir(parents=True, exist_ok=True)
        (config_dir / "convnext_large_fxtest.json").write_text(
            json.dumps(tiny_models.tiny_convnext_cfg())
        )
        open_clip.add_model_config(config_dir)
        overrides += REDUCED
        channels = TINY_CHANNELS
    init = CLIP.__init__

    def clip_init(self: CLIP, cfg: object, input_shape: object) -> None:
        init(self, cfg, input_shape)
        if channels is not None:  # the original's table knows only the released sizes
            self.output_channels = [channels[0], *channels]
            for i, name in enumerate(["stem", "res2", "res3", "res4", "res5"]):
                self._out_feature_channels[name] = self.output_channels[i]
        # OpenCLIP >= 2.20 builds its text transformer batch-first; FC-CLIP feeds it
        # sequence-first (with this its text features equal OpenCLIP's)
        self.clip_model.transformer.batch_first = False

    CLIP.__init__ = clip_init
    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_maskformer2_config(cfg)
    add_fcclip_config(cfg)
    cfg.merge_from_file(CONFIG)
    cfg.merge_from_list(overrides)
    cfg.freeze()
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    args.state.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state}, args.state)
    if args.text == "computed":
        with torch.no_grad():
            model.get_text_classifier()  # computed once, kept as model.test_text_classifier
    else:  # one row per synonym, as get_text_classifier gives (its values do not change cost)
        rows = sum(model.test_num_templates)
        text = torch.randn(
            rows, cfg.MODEL.FC_CLIP.EMBED_DIM, generator=torch.Generator().manual_seed(0)
        )
        model.test_text_classifier = torch.nn.functional.normalize(text, dim=-1)
    resize = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, "choice")
    reply(
        ready=True,
        clip=cfg.MODEL.FC_CLIP.CLIP_MODEL_NAME,
        queries=cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES,
        classes=len(model.test_metadata.stuff_classes),
        keys=len(state),
        text=args.text,
        synonyms=int(model.test_text_classifier.shape[0]),
        threads=torch.get_num_threads(),
    )
    inputs: dict[str, object] | None = None
    for line in sys.stdin:
        command = json.loads(line)
        if command.get("quit"):
            break
        if "image" in command:
            image = np.load(command["image"])
            resized = resize.get_transform(image).apply_image(image)
            tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)))
            inputs = {"image": tensor, "height": image.shape[0], "width": image.shape[1]}
            reply(resized=list(tensor.shape[-2:]))
        elif command.get("run"):
            assert inputs is not None, "send an image first"
            start = time.perf_counter()
            with torch.no_grad():
                out = model([inputs])[0]
            seconds = time.perf_counter() - start
            reply(seconds=seconds, segments=len(out["panoptic_seg"][1]))


if __name__ == "__main__":
    main()
