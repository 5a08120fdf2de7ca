"""OpenCLIP ConvNeXt and ModifiedResNet backbones: tiny random models loaded via ``local-dir:``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from retclip.backbones import load_backbone
from retclip.backbones.open_clip_convnext import OpenClipBackbone
from retclip.errors import InputError
from tiny_models import save_tiny_open_clip_convnext, save_tiny_open_clip_resnet

NATIVE = 64  # tiny models' image size: a 2x2 grid at stride 32


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("open_clip")
    return {
        "convnext": save_tiny_open_clip_convnext(root / "convnext", seed=0, image_size=NATIVE),
        "resnet": save_tiny_open_clip_resnet(root / "resnet", seed=0, image_size=NATIVE),
    }


def embed(backbone: OpenClipBackbone, x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The segment path of the Backbone interface: one dense pass, then every mask."""
    return backbone.embed_segments(backbone.encode_images(x), masks)


def images(h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 255


@pytest.mark.parametrize("kind", ["convnext", "resnet"])
def test_whole_image_mask_embedding_is_the_model_image_embedding(
    model_dirs: dict[str, Path], kind: str
) -> None:
    backbone = OpenClipBackbone(str(model_dirs[kind]), resolution=NATIVE)
    assert backbone.kind == kind
    x = images(NATIVE, NATIVE)
    full = torch.ones(2, 1, NATIVE, NATIVE)
    pooled = embed(backbone, x, full)[:, 0]
    with torch.no_grad():
        expected = backbone.model.encode_image(backbone.preprocess(x))
    torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=1e-5)


def test_convnext_identity_holds_at_any_resolution(model_dirs: dict[str, Path]) -> None:
    backbone = OpenClipBackbone(str(model_dirs["convnext"]), resolution=96)
    x = images(96, 128)
    pooled = embed(backbone, x, torch.ones(2, 1, 96, 128))[:, 0]
    with torch.no_grad():
        expected = backbone.model.encode_image(backbone.preprocess(x))  # 3x4 grid, avg pool
    torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=1e-5)


def test_dense_map_is_the_trunk_map(model_dirs: dict[str, Path]) -> None:
    backbone = OpenClipBackbone(str(model_dirs["convnext"]), resolution=NATIVE)
    x = images(NATIVE, 96)
    dense = backbone.encode_images(x)
    with torch.no_grad():
        trunk = backbone.trunk_features(backbone.preprocess(x))  # [2, 32, 2, 3]
    assert dense.shape == trunk.shape == (2, 32, 2, 3)
    torch.testing.assert_close(dense, trunk)
    # the per-position head would not give the image embedding (the head is non-linear)
    per_position = backbone.head(trunk.permute(0, 2, 3, 1).reshape(-1, 32)).reshape(2, 6, -1)
    with torch.no_grad():
        expected = backbone.model.encode_image(backbone.preprocess(x))
    assert not torch.allclose(per_position.mean(1), expected, atol=1e-3)


def test_convnext_mask_embedding_pools_before_the_head(model_dirs: dict[str, Path]) -> None:
    backbone = OpenClipBackbone(str(model_dirs["convnext"]), resolution=NATIVE)
    x = images(NATIVE, NATIVE, seed=3)
    masks = torch.zeros(2, 2, NATIVE, NATIVE)
    masks[:, 0, :32, :] = 1  # the top row of cells
    masks[:, 1, 32:, 32:] = 1  # the bottom-right cell
    out = embed(backbone, x, masks)
    with torch.no_grad():
        trunk = backbone.trunk_features(backbone.preprocess(x))
    torch.testing.assert_close(
        out[:, 0], backbone.head(trunk[:, :, 0].mean(-1)), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(out[:, 1], backbone.head(trunk[:, :, 1, 1]), atol=1e-5, rtol=1e-5)


def test_resnet_mask_attention_pool_runs_at_other_resolutions(model_dirs: dict[str, Path]) -> None:
    backbone = OpenClipBackbone(str(model_dirs["resnet"]), resolution=96)
    x = images(96, 96)
    masks = torch.zeros(2, 3, 96, 96)
    masks[:, 0] = 1
    masks[:, 1, :32, :32] = 1
    masks[:, 2, 40:, 40:] = 1
    out = embed(backbone, x, masks)  # positional embedding interpolated 2x2 -> 3x3
    assert out.shape == (2, 3, backbone.dim) and torch.isfinite(out).all()
    assert not torch.allclose(out[:, 1], out[:, 2], atol=1e-4)


@pytest.mark.parametrize("kind", ["convnext", "resnet"])
def test_texts_logit_scale_and_registry(model_dirs: dict[str, Path], kind: str) -> None:
    backbone = load_backbone(str(model_dirs[kind]), "cpu", resolution=NATIVE)
    assert isinstance(backbone, OpenClipBackbone)
    texts = ["a photo of a cat.", "a dog"]
    out = backbone.encode_texts(texts)
    with torch.no_grad():
        expected = backbone.model.encode_text(backbone.tokenizer(texts))
    torch.testing.assert_close(out, expected)
    assert out.shape == (2, backbone.dim) == (2, 16)
    assert backbone.logit_scale == pytest.approx(1 / 0.07, rel=1e-4)
    fp = backbone.fingerprint
    assert (fp.model_id, fp.input_resolution) == (str(model_dirs[kind]), NATIVE)
    assert (
        fp.dense_mode
        == {"convnext": "trunk+head-after-pooling", "resnet": "trunk+masked-attention-pool"}[kind]
    )


def test_grid_covers_the_resized_image_and_bad_options(model_dirs: dict[str, Path]) -> None:
    backbone = OpenClipBackbone(str(model_dirs["convnext"]), resolution=NATIVE)
    assert backbone.encode_images(torch.zeros(1, 3, 50, 75)).shape[-2:] == (2, 3)
    with pytest.raises(InputError):
        OpenClipBackbone(str(model_dirs["convnext"]), resolution=16)
    with pytest.raises(InputError):
        OpenClipBackbone(str(model_dirs["convnext"]), dtype="bfloat16")  # CPU
