"""The Hugging Face CLIP ViT backbone on a tiny random CLIP loaded through ``from_pretrained``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from retclip.backbones import load_backbone
from retclip.backbones.base import segment_features
from retclip.backbones.clip_vit import ClipVitBackbone
from retclip.errors import InputError
from tiny_models import save_tiny_clip

PATCH = 8


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("clip"), seed=0, image_size=32, patch=PATCH)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(2, 3, 48, 64, generator=generator) * 255


def reference_pixels(backbone: ClipVitBackbone, images: torch.Tensor) -> torch.Tensor:
    """CLIP normalisation by hand (images already at the backbone's size)."""
    mean = torch.tensor(backbone.mean)[:, None, None] * 255
    std = torch.tensor(backbone.std)[:, None, None] * 255
    return (images - mean) / std


def to_grid(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)


def test_tokens_mode_is_the_vision_models_last_layer_at_an_interpolated_resolution(
    clip_dir: Path, images: torch.Tensor
) -> None:
    backbone = ClipVitBackbone(str(clip_dir), resolution=48, dense_mode="tokens")
    dense = backbone.encode_images(images)  # 48x64 stays 48x64: 6x8 patches, 32 px native
    assert dense.shape == (2, 16, 6, 8) and dense.dtype == torch.float32
    model = backbone.model
    with torch.no_grad():
        out = model.vision_model(reference_pixels(backbone, images), interpolate_pos_encoding=True)
        tokens = model.visual_projection(model.vision_model.post_layernorm(out.last_hidden_state))
    torch.testing.assert_close(dense, to_grid(tokens[:, 1:], 6, 8), atol=1e-5, rtol=1e-5)


def test_value_mode_is_maskclips_value_path(clip_dir: Path, images: torch.Tensor) -> None:
    backbone = ClipVitBackbone(str(clip_dir), resolution=48, dense_mode="value")
    dense = backbone.encode_images(images)
    model = backbone.model
    last = model.vision_model.encoder.layers[-1]
    with torch.no_grad():
        out = model.vision_model(
            reference_pixels(backbone, images),
            interpolate_pos_encoding=True,
            output_hidden_states=True,
        )
        x = out.hidden_states[-2]  # input of the last block
        y = x + last.self_attn.out_proj(last.self_attn.v_proj(last.layer_norm1(x)))
        y = y + last.mlp(last.layer_norm2(y))
        tokens = model.visual_projection(model.vision_model.post_layernorm(y))
    torch.testing.assert_close(dense, to_grid(tokens[:, 1:], 6, 8), atol=1e-5, rtol=1e-5)


def test_value_mode_ignores_the_last_blocks_query_and_key(clip_dir: Path) -> None:
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 255
    value = ClipVitBackbone(str(clip_dir), dense_mode="value")
    tokens = ClipVitBackbone(str(clip_dir), dense_mode="tokens")
    before_value, before_tokens = value.encode_images(images), tokens.encode_images(images)
    assert not torch.allclose(before_value, before_tokens, atol=1e-3)
    for backbone in (value, tokens):
        attn = backbone.model.vision_model.encoder.layers[-1].self_attn
        with torch.no_grad():
            attn.q_proj.weight.mul_(-3.0)
            attn.k_proj.weight.add_(0.5)
    torch.testing.assert_close(value.encode_images(images), before_value)
    assert not torch.allclose(tokens.encode_images(images), before_tokens, atol=1e-4)


def test_default_resolution_is_twice_the_pretraining_size_and_keeps_the_aspect(
    clip_dir: Path,
) -> None:
    backbone = ClipVitBackbone(str(clip_dir))
    assert backbone.resolution == 64 and backbone.dense_mode == "value"
    assert backbone.encode_images(torch.zeros(1, 3, 30, 40)).shape == (1, 16, 8, 11)
    # a very long image: the long side is capped at 1333/800 of the short one
    assert backbone.encode_images(torch.zeros(1, 3, 20, 200)).shape[-2:] == (8, 13)


def test_sliding_window(clip_dir: Path, images: torch.Tensor) -> None:
    square = images[..., :48]  # one 48 px window covers a 48x48 image: a single pass
    same = ClipVitBackbone(str(clip_dir), resolution=48, window=48, window_stride=16)
    whole_backbone = ClipVitBackbone(str(clip_dir), resolution=48)
    torch.testing.assert_close(same.encode_images(square), whole_backbone.encode_images(square))

    whole = whole_backbone.encode_images(images)

    windowed = ClipVitBackbone(str(clip_dir), resolution=48, window=32, window_stride=16)
    dense = windowed.encode_images(images)  # windows at x = 0, 16, 32 and y = 0, 16
    assert dense.shape == whole.shape
    assert not torch.allclose(dense, whole, atol=1e-3)
    # the top-left 2x2 cells are covered by the first window only
    alone = windowed.dense_tokens(reference_pixels(windowed, images)[:, :, :32, :32])
    torch.testing.assert_close(dense[:, :, :2, :2], alone[:, :, :2, :2], atol=1e-5, rtol=1e-5)
    fingerprints = {windowed.fingerprint, same.fingerprint, whole_backbone.fingerprint}
    assert len(fingerprints) == 3


def test_text_features_logit_scale_and_fingerprint(clip_dir: Path) -> None:
    backbone = ClipVitBackbone(str(clip_dir))
    texts = ["a photo of the cat.", "a dog", "a photo of a very long sentence " * 5]
    out = backbone.encode_texts(texts)
    assert out.shape == (3, backbone.dim) == (3, 16)
    tokens = backbone.tokenizer(texts[:2], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = backbone.model.get_text_features(**tokens).pooler_output
    torch.testing.assert_close(out[:2], expected)
    assert backbone.logit_scale == pytest.approx(float(np.exp(2.6592)), rel=1e-4)
    fp = backbone.fingerprint
    assert (fp.model_id, fp.dense_mode, fp.input_resolution) == (str(clip_dir), "value", 64)
    tokens_fp = ClipVitBackbone(str(clip_dir), dense_mode="tokens").fingerprint
    assert tokens_fp != fp


@pytest.mark.parametrize(
    "options",
    [
        {"dense_mode": "keys"},
        {"resolution": 4},
        {"window": 12},
        {"window": 128},
        {"window": 32, "window_stride": 3},
        {"dtype": "float16"},  # half precision needs CUDA
        {"dtype": "int8"},
    ],
)
def test_invalid_options_are_input_errors(clip_dir: Path, options: dict) -> None:
    with pytest.raises(InputError):
        ClipVitBackbone(str(clip_dir), **options)


def test_registry_loads_a_local_directory_once_and_pools_masks(clip_dir: Path) -> None:
    backbone = load_backbone(str(clip_dir), "cpu", resolution=48)
    assert isinstance(backbone, ClipVitBackbone)
    assert load_backbone(str(clip_dir), "cpu", resolution=48) is backbone
    image = np.zeros((48, 64, 3), dtype=np.uint8)
    image[:, 32:] = (200, 30, 30)
    masks = np.zeros((2, 48, 64), dtype=bool)
    masks[0, :, :32] = True
    masks[1, :, 32:] = True
    features = segment_features(backbone, image, masks)
    assert features.shape == (2, 16)
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(2))
