from __future__ import annotations

import numpy as np
import pytest
import torch

from retclip.pooling import area_weights, mask_pool, masks_to_grid


def naive_cell_weights(mask: np.ndarray, h: int, w: int) -> np.ndarray:
    """Covered fraction of each grid cell, by summing pixel overlaps one cell at a time."""
    big_h, big_w = mask.shape
    out = np.zeros((h, w))
    for i in range(h):
        y0, y1 = i * big_h / h, (i + 1) * big_h / h
        for j in range(w):
            x0, x1 = j * big_w / w, (j + 1) * big_w / w
            total = 0.0
            for y in range(int(np.floor(y0)), int(np.ceil(y1))):
                oy = min(y1, y + 1) - max(y0, y)
                for x in range(int(np.floor(x0)), int(np.ceil(x1))):
                    ox = min(x1, x + 1) - max(x0, x)
                    total += oy * ox * mask[y, x]
            out[i, j] = total / ((y1 - y0) * (x1 - x0))
    return out


def naive_pool(features: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Per-mask loop: weighted mean of feature cells, then L2 normalisation."""
    b, d, h, w = features.shape
    out = np.zeros((b, masks.shape[1], d))
    for bi in range(b):
        for ni in range(masks.shape[1]):
            weights = naive_cell_weights(masks[bi, ni].astype(float), h, w)
            pooled = (features[bi] * weights).sum(axis=(1, 2)) / (weights.sum() + 1e-8)
            norm = np.linalg.norm(pooled)
            out[bi, ni] = pooled / norm if norm > 0 else pooled
    return out


@pytest.mark.parametrize("size", [(24, 32), (25, 29)])
def test_mask_pool_matches_naive_loop(size: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    features = rng.standard_normal((2, 5, 6, 8)).astype(np.float32)
    masks = rng.random((2, 4, *size)) > 0.6
    masks[1, 3] = False  # an empty (padding) mask
    pooled = mask_pool(torch.from_numpy(features), torch.from_numpy(masks))
    expected = naive_pool(features, masks)
    np.testing.assert_allclose(pooled.numpy(), expected, atol=1e-5)
    assert torch.all(pooled[1, 3] == 0)
    np.testing.assert_allclose(pooled[0].norm(dim=-1).numpy(), 1.0, atol=1e-5)


def test_area_weights_rows_sum_to_one_and_divisible_case_is_block_mean() -> None:
    weights = area_weights(10, 3)
    np.testing.assert_allclose(weights.sum(1).numpy(), 1.0, atol=1e-6)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4, :2] = 1
    grid = masks_to_grid(mask, (2, 2))
    np.testing.assert_allclose(grid[0, 0].numpy(), [[0.5, 0.0], [0.0, 0.0]])


def test_binary_pooling_uses_cells_covered_by_half() -> None:
    features = torch.zeros(1, 2, 1, 2)
    features[0, 0, 0, 0] = 1.0  # left cell points along dim 0
    features[0, 1, 0, 1] = 1.0  # right cell along dim 1
    mask = torch.zeros(1, 1, 4, 8, dtype=torch.bool)
    mask[..., :4] = True  # all of the left cell
    mask[..., 4:5] = True  # a quarter of the right cell
    soft = mask_pool(features, mask, mode="soft")[0, 0]
    binary = mask_pool(features, mask, mode="binary")[0, 0]
    np.testing.assert_allclose(binary.numpy(), [1.0, 0.0], atol=1e-6)
    assert soft[1] > 0.2  # the soft mode keeps the partial cell's contribution
    tiny = torch.zeros(1, 1, 4, 8, dtype=torch.bool)
    tiny[0, 0, 0, 6] = True  # too small to cover half a cell: binary falls back to soft
    np.testing.assert_allclose(mask_pool(features, tiny, mode="binary")[0, 0], [0.0, 1.0])


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match=r"\[B, D, h, w\]"):
        mask_pool(torch.zeros(2, 3, 4, 4), torch.zeros(1, 2, 8, 8))


def test_segment_features_apply_the_backbone_head_after_pooling() -> None:
    from retclip.backbones import ColorBackbone
    from retclip.backbones.base import segment_features

    class HeadAfterPooling(ColorBackbone):
        """A non-linear head, which does not commute with averaging."""

        def project_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.relu(pooled - 0.4)

        def embed_segments(self, dense, masks, *, mode="soft"):
            return self.project_pooled(mask_pool(dense, masks, mode=mode, normalize=False))

    image = np.zeros((16, 16, 3), np.uint8)
    image[:, :8] = (220, 40, 40)  # red
    image[:, 8:] = (40, 70, 210)  # blue
    masks = np.zeros((2, 16, 16), bool)
    masks[0, :, 4:] = True  # 1/3 red, 2/3 blue
    backbone = HeadAfterPooling(stride=4)
    features = segment_features(backbone, image, masks)
    dense = backbone.encode_images(torch.from_numpy(image).permute(2, 0, 1)[None].float())
    pooled = (dense[0] * torch.from_numpy(masks[0])[::4, ::4]).sum((1, 2)) / 12  # 12 cells
    head_after = torch.nn.functional.normalize(backbone.project_pooled(pooled), dim=0)
    torch.testing.assert_close(features[0], head_after)
    head_before = backbone.project_pooled(dense[0])[:, torch.from_numpy(masks[0])[::4, ::4]]
    head_before = torch.nn.functional.normalize(head_before.mean(1), dim=0)
    assert not torch.allclose(features[0], head_before, atol=1e-2)
    assert torch.all(features[1] == 0)  # an empty mask stays zero through the head


def test_masks_are_resized_in_chunks_with_the_same_result(monkeypatch) -> None:
    import retclip.pooling as pooling

    masks = torch.from_numpy(np.random.default_rng(1).random((2, 7, 20, 24)) > 0.5)
    whole = pooling.area_resize(masks, (5, 6))
    monkeypatch.setattr(pooling, "MASK_CHUNK", 3)  # 14 masks in chunks of 3
    torch.testing.assert_close(pooling.masks_to_grid(masks, (5, 6)), whole)
    assert pooling.masks_to_grid(masks[:, :0], (5, 6)).shape == (2, 0, 5, 6)
