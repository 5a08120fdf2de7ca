"""Tiny randomly initialised models of the real architectures, saved for the real loading paths.

Each builder seeds torch, builds a model small enough for CPU tests, saves it to ``directory`` in
the format the product loads (``save_pretrained`` for transformers; ``open_clip_config.json`` +
``open_clip_model.safetensors`` for OpenCLIP's ``local-dir:``) and returns the directory. Nothing
is downloaded: tokenizers come from a small in-memory vocabulary (CLIP's BPE) or OpenCLIP's
packaged one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from timm.models import register_model
from timm.models.convnext import ConvNeXt
from tokenizers.pre_tokenizers import ByteLevel

TINY_CONVNEXT = "retclip_test_convnext"
#: BPE merges of the tiny CLIP tokenizer: enough to exercise merging, no more.
_MERGES = [("t", "h"), ("th", "e</w>"), ("o", "t"), ("a", "t</w>"), ("c", "at</w>")]


def clip_tokenizer_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level CLIP BPE vocabulary (every byte, with and without ``</w>``) and merges."""
    chars = sorted(ByteLevel.alphabet())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in _MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(dict.fromkeys(tokens))}, list(_MERGES)


def save_tiny_clip(directory: Path, *, seed: int = 0, image_size: int = 32, patch: int = 8) -> Path:
    """A ``CLIPModel`` (2+2 layers, width 32, projection 16) with tokenizer and image processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    vocab, merges = clip_tokenizer_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    text = dict(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=24,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch,
    )
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    with torch.no_grad():  # non-trivial layer norms and biases, so no term can hide
        for name, param in model.named_parameters():
            if "layer_norm" in name or "layrnorm" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


@register_model
def retclip_test_convnext(pretrained: bool = False, **kwargs: object) -> ConvNeXt:
    """A 4-stage ConvNeXt with one block per stage and 8/16/24/32 channels."""
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    model = ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), **kwargs)  # type: ignore[arg-type]
    model.pretrained_cfg = model.default_cfg = {}
    return model


def _save_open_clip(directory: Path, model_cfg: dict, seed: int) -> Path:
    import open_clip

    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    with open(directory / "open_clip_config.json", "w", encoding="utf-8") as handle:
        json.dump({"model_cfg": model_cfg, "preprocess_cfg": {}}, handle)
    model = open_clip.create_model(f"local-dir:{directory}").eval()
    with torch.no_grad():  # random norms, so the head's affine terms matter
        for name, param in model.visual.named_parameters():
            if "norm" in name or "bn" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
        for name, buffer in model.visual.named_buffers():
            if name.endswith("running_var"):
                buffer.uniform_(0.5, 1.5)
            elif name.endswith("running_mean"):
                buffer.normal_(0.0, 0.1)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / "open_clip_model.safetensors"))
    return directory


_TEXT_CFG = {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}


def tiny_convnext_cfg(image_size: int = 64) -> dict:
    """OpenCLIP ``model_cfg`` as ``convnext_large_d_320`` (timm trunk, avg pool, MLP head) but
    tiny: the architecture of the FC-CLIP fixtures too."""
    return {
        "embed_dim": 16,
        "vision_cfg": {
            "timm_model_name": TINY_CONVNEXT,
            "timm_model_pretrained": False,
            "timm_pool": "",
            "timm_proj": "mlp",
            "timm_drop": 0.0,
            "timm_drop_path": 0.0,
            "image_size": image_size,
        },
        "text_cfg": _TEXT_CFG,
    }


def save_tiny_open_clip_convnext(directory: Path, *, seed: int = 0, image_size: int = 64) -> Path:
    """OpenCLIP config as ``convnext_large_d_320`` (timm trunk, avg pool, MLP head) but tiny."""
    return _save_open_clip(directory, tiny_convnext_cfg(image_size), seed)


def save_tiny_open_clip_resnet(directory: Path, *, seed: int = 0, image_size: int = 64) -> Path:
    """OpenCLIP ``ModifiedResNet`` as ``RN50x64`` (attention pool, QuickGELU) but tiny."""
    cfg = {
        "embed_dim": 16,
        "quick_gelu": True,
        "vision_cfg": {"image_size": image_size, "layers": [1, 1, 1, 1], "width": 8},
        "text_cfg": _TEXT_CFG,
    }
    return _save_open_clip(directory, cfg, seed)
