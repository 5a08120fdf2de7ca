"""Models for the benchmarks: real-size architectures with random weights, or tiny ones.

Speed does not depend on weight values, so each model is built from its published configuration
with random weights, saved once under a cache folder (``save_pretrained`` / OpenCLIP
``local-dir``) and loaded through retclip's real loading code, exactly as downloaded weights
would be. ``size="tiny"`` uses the test suite's tiny models of the same architectures.

Names: ``clip-b16``, ``clip-l14`` (transformers CLIP), ``convnext-l`` (OpenCLIP
``convnext_large_d_320``), ``sam-vit-b`` (``SamConfig()``), ``sam2.1-tiny`` (``Sam2Config()``:
Hiera-T, SAM 2.1 tiny's architecture), ``edgetam`` (``EdgeTamConfig`` with timm RepViT-M1),
``gdino-tiny`` (Swin-T + BERT-base), ``gdino-base`` (Swin-B + BERT-base).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

# The tests' tiny-model builders and offline tokenizers, imported under the names the tests use
# (one module object, so the tiny timm model is registered once).
TESTS = Path(__file__).resolve().parents[1] / "tests"
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

import tiny_detectors  # noqa: E402
import tiny_models  # noqa: E402

MODELS = (
    "clip-b16",
    "clip-l14",
    "convnext-l",
    "rn50x64",
    "sam-vit-b",
    "sam2.1-tiny",
    "edgetam",
    "gdino-tiny",
    "gdino-base",
)
_VISION = {
    "clip-b16": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12, patch_size=16, image_size=224),
    "clip-l14": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                     num_attention_heads=16, patch_size=14, image_size=224),
}  # fmt: skip
_TEXT_WIDTH = {"clip-b16": (512, 8, 512), "clip-l14": (768, 12, 768)}  # width, heads, projection
_SWIN = {
    "gdino-tiny": dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7,
                       image_size=224),
    "gdino-base": dict(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32],
                       window_size=12, image_size=384),
}  # fmt: skip


def default_dir(size: str) -> Path:
    """``$RETCLIP_BENCH_MODELS`` or ``~/.cache/retclip-bench``, per size."""
    root = os.environ.get("RETCLIP_BENCH_MODELS") or Path.home() / ".cache" / "retclip-bench"
    return Path(root) / size


def model_dir(name: str, size: str = "real", root: Path | None = None) -> Path:
    """The saved model ``name`` (built and saved on first use); pass the path to retclip."""
    if name not in MODELS:
        raise ValueError(f"unknown bench model {name!r}; expected one of {', '.join(MODELS)}")
    directory = (root or default_dir(size)) / name
    if (directory / ".complete").exists():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    builder = _build_tiny if size == "tiny" else _build_real
    builder(name, directory)
    (directory / ".complete").write_text("ok\n")
    return directory


def _build_tiny(name: str, directory: Path) -> None:
    if name in ("clip-b16", "clip-l14"):
        tiny_models.save_tiny_clip(directory, image_size=32, patch=8)
    elif name == "convnext-l":
        tiny_models.save_tiny_open_clip_convnext(directory)
    elif name == "rn50x64":
        raise ValueError("no tiny RN50x64: its rows run at the real size only")
    elif name == "sam-vit-b":
        tiny_detectors.save_sam(directory)
    elif name == "sam2.1-tiny":
        tiny_detectors.save_sam2(directory)
    elif name == "edgetam":
        tiny_detectors.save_edgetam(directory)
    else:
        tiny_detectors.save_grounding_dino(directory)


def _build_real(name: str, directory: Path) -> None:
    torch.manual_seed(0)
    if name in ("clip-b16", "clip-l14"):
        _save_clip(name, directory)
    elif name == "convnext-l":
        _save_open_clip("convnext_large_d_320", directory)
    elif name == "rn50x64":
        _save_open_clip("RN50x64", directory)
    elif name == "sam-vit-b":
        _save_sam(directory)
    elif name in ("sam2.1-tiny", "edgetam"):
        _save_sam2(name, directory)
    else:
        _save_grounding_dino(name, directory)


def _save_clip(name: str, directory: Path) -> None:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    vocab, merges = tiny_models.clip_tokenizer_vocab()
    width, heads, projection = _TEXT_WIDTH[name]
    text = dict(
        vocab_size=49408,
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=12,
        num_attention_heads=heads,
        max_position_embeddings=77,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    config = CLIPConfig(text_config=text, vision_config=_VISION[name], projection_dim=projection)
    CLIPModel(config).eval().save_pretrained(directory)
    CLIPTokenizer(vocab=vocab, merges=merges).save_pretrained(directory)
    CLIPImageProcessor().save_pretrained(directory)


def _save_open_clip(architecture: str, directory: Path) -> None:
    """An OpenCLIP model (``convnext_large_d_320``: FC-CLIP's ConvNeXt-L; ``RN50x64``) with
    random weights, as an OpenCLIP folder."""
    import open_clip
    from safetensors.torch import save_file

    config = open_clip.get_model_config(architecture)
    if "timm_model_name" in config["vision_cfg"]:
        config = {**config, "vision_cfg": {**config["vision_cfg"], "timm_model_pretrained": False}}
    with open(directory / "open_clip_config.json", "w", encoding="utf-8") as handle:
        json.dump({"model_cfg": config, "preprocess_cfg": {}}, handle)
    model = open_clip.create_model(architecture, pretrained=None).eval()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / "open_clip_model.safetensors"))


def _save_sam(directory: Path) -> None:
    from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor

    SamModel(SamConfig()).eval().save_pretrained(directory)
    SamProcessor(image_processor=SamImageProcessor()).save_pretrained(directory)


def _save_sam2(name: str, directory: Path) -> None:
    """SAM 2.1 Hiera-T (``Sam2Config()``'s defaults) or EdgeTAM (RepViT-M1 trunk; transformers'
    default names the timm model under a misspelt key, so it is given here), 1024 px input."""
    from transformers import (
        EdgeTamConfig,
        EdgeTamModel,
        EdgeTamVisionConfig,
        Sam2Config,
        Sam2ImageProcessor,
        Sam2Model,
        Sam2Processor,
        TimmWrapperConfig,
    )

    if name == "sam2.1-tiny":
        Sam2Model(Sam2Config()).eval().save_pretrained(directory)
    else:
        repvit = TimmWrapperConfig(
            architecture="repvit_m1",
            do_pooling=False,
            model_args={"in_chans": 3, "features_only": True, "out_indices": [0, 1, 2, 3]},
        )
        config = EdgeTamConfig(vision_config=EdgeTamVisionConfig(backbone_config=repvit))
        EdgeTamModel(config).eval().save_pretrained(directory)
    Sam2Processor(image_processor=Sam2ImageProcessor()).save_pretrained(directory)


def _save_grounding_dino(name: str, directory: Path) -> None:
    from transformers import (
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    (directory / "vocab.txt").write_text("\n".join(tiny_detectors.bert_vocab()) + "\n")
    tokenizer = BertTokenizer(str(directory / "vocab.txt"), do_lower_case=True)
    swin = SwinConfig(**_SWIN[name], out_features=["stage2", "stage3", "stage4"])
    config = GroundingDinoConfig(backbone_config=swin)
    GroundingDinoForObjectDetection(config).eval().save_pretrained(directory)
    processor = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessor(), tokenizer=tokenizer
    )
    processor.save_pretrained(directory)


def test_image(height: int = 480, width: int = 640, seed: int = 0) -> np.ndarray:
    """A deterministic ``[H, W, 3]`` uint8 picture: smooth gradients with a few flat shapes."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([x * 255 // max(width, 1), y * 255 // max(height, 1), (x + y) % 256], -1)
    for _ in range(6):
        cy, cx = rng.integers(0, height), rng.integers(0, width)
        r = rng.integers(min(height, width) // 10, min(height, width) // 4 + 2)
        image[(y - cy) ** 2 + (x - cx) ** 2 < r**2] = rng.integers(0, 256, 3)
    return image.astype(np.uint8)


def random_masks(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """``[n, H, W]`` bool masks: random axis-aligned ellipses of varied sizes, none empty."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    masks = np.zeros((n, height, width), bool)
    for i in range(n):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        ry = rng.uniform(0.05, 0.3) * height
        rx = rng.uniform(0.05, 0.3) * width
        masks[i] = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1
        masks[i, int(min(cy, height - 1)), int(min(cx, width - 1))] = True
    return masks
