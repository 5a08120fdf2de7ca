"""Mask2Former's multi-scale deformable-attention pixel decoder (FC-CLIP's, unchanged).

The backbone's ``res3..res5`` maps are projected to ``conv_dim`` (1×1 conv + GroupNorm), refined
jointly by a deformable-attention transformer encoder (each position attends to points on all
three levels), and ``res2`` is added FPN-style (lateral 1×1 conv + upsampled coarser map, then a
3×3 conv). Outputs: per-pixel mask features at stride 4 and the three refined levels (coarsest
first) that the transformer decoder's queries attend to in turn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from retclip.fcclip.deformable_attention import MSDeformAttn


def sine_position_embedding(
    shape: tuple[int, int, int, int], num_feats: int, *, device: torch.device | None = None
) -> torch.Tensor:
    """DETR's normalised sine position embedding ``[B, 2·num_feats, H, W]`` (y half first).

    Positions are ``1..H`` (``1..W``) divided by ``H`` (``W``) + 1e-6, times 2π; channel pair
    ``2i, 2i+1`` holds ``sin, cos`` of position / 10000^(2i/num_feats).
    """
    b, _, h, w = shape
    scale, eps = 2.0 * math.pi, 1e-6
    y = torch.arange(1, h + 1, dtype=torch.float32, device=device) / (h + eps) * scale
    x = torch.arange(1, w + 1, dtype=torch.float32, device=device) / (w + eps) * scale
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=device)
    dim_t = 10000.0 ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)

    def encode(pos: torch.Tensor) -> torch.Tensor:  # [n] -> [n, num_feats]
        angles = pos[:, None] / dim_t
        return torch.stack((angles[:, 0::2].sin(), angles[:, 1::2].cos()), dim=2).flatten(1)

    pos_y = encode(y)[:, None, :].expand(h, w, num_feats)
    pos_x = encode(x)[None, :, :].expand(h, w, num_feats)
    pos = torch.cat((pos_y, pos_x), dim=2).permute(2, 0, 1)  # [2F, H, W]
    return pos[None].expand(b, -1, -1, -1)


class DeformableEncoderLayer(nn.Module):
    """Post-norm encoder layer: deformable self-attention, then a ReLU FFN."""

    def __init__(self, d_model: int, d_ffn: int, n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(
        self,
        src: torch.Tensor,
        pos: torch.Tensor,
        reference_points: torch.Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
    ) -> torch.Tensor:
        """``src``, ``pos``: ``[B, S, C]``; ``reference_points``: ``[B, S, L, 2]``."""
        src = self.norm1(src + self.self_attn(src + pos, reference_points, src, spatial_shapes))
        return self.norm2(src + self.linear2(F.relu(self.linear1(src))))


def encoder_reference_points(
    spatial_shapes: Sequence[tuple[int, int]], batch: int, device: torch.device
) -> torch.Tensor:
    """``[B, S, L, 2]``: each position's centre ``((j + 0.5)/w, (i + 0.5)/h)``, on every level."""
    points = []
    for h, w in spatial_shapes:
        ys = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h
        xs = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack((grid_x.reshape(-1), grid_y.reshape(-1)), -1))
    ref = torch.cat(points, 0)  # [S, 2]
    return ref[None, :, None, :].expand(batch, -1, len(spatial_shapes), -1)


class PixelDecoder(nn.Module):
    """``MSDeformAttnPixelDecoder`` of Mask2Former with FC-CLIP's settings.

    Args:
        in_channels: channels of ``res2, res3, res4, res5`` (strides 4, 8, 16, 32).
        conv_dim: transformer width and FPN channels (256).
        mask_dim: channels of the mask features (256).
        enc_layers: deformable encoder layers (6).
        n_heads: attention heads (8).
        enc_ffn_dim: encoder FFN width (1024, fixed in Mask2Former).
        n_points: sampling points per head and level (4).
        gn_groups: GroupNorm groups (32).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        *,
        conv_dim: int = 256,
        mask_dim: int = 256,
        enc_layers: int = 6,
        n_heads: int = 8,
        enc_ffn_dim: int = 1024,
        n_points: int = 4,
        gn_groups: int = 32,
    ) -> None:
        super().__init__()
        if len(in_channels) != 4:
            raise ValueError(f"expected channels of res2..res5, got {list(in_channels)}")
        self.conv_dim = conv_dim
        # res5, res4, res3: coarsest first, as the encoder flattens them
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, conv_dim, kernel_size=1), nn.GroupNorm(gn_groups, conv_dim))
            for c in reversed(in_channels[1:])
        )
        self.level_embed = nn.Parameter(torch.zeros(3, conv_dim))
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(conv_dim, enc_ffn_dim, 3, n_heads, n_points)
            for _ in range(enc_layers)
        )
        self.lateral_convs = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Conv2d(in_channels[0], conv_dim, kernel_size=1, bias=False),
                    nn.GroupNorm(gn_groups, conv_dim),
                )
            ]
        )
        self.output_convs = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Conv2d(conv_dim, conv_dim, kernel_size=3, padding=1, bias=False),
                    nn.GroupNorm(gn_groups, conv_dim),
                )
            ]
        )
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, kernel_size=1)
        nn.init.normal_(self.level_embed)

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``[res2, res3, res4, res5]`` maps ``[B, C_i, H/s_i, W/s_i]`` →

        mask features ``[B, mask_dim, H/4, W/4]`` and the refined levels
        ``[B, conv_dim, H/32, W/32]``, ``.../16``, ``.../8`` (coarsest first).
        """
        res2, *levels = (f.float() for f in features)
        srcs, pos, shapes = [], [], []
        for index, x in enumerate(reversed(levels)):
            y = self.input_proj[index](x)
            b, c, h, w = y.shape
            shapes.append((h, w))
            srcs.append(y.flatten(2).transpose(1, 2))
            embed = sine_position_embedding((b, c, h, w), c // 2, device=y.device)
            pos.append(embed.flatten(2).transpose(1, 2) + self.level_embed[index])
        src, pos_flat = torch.cat(srcs, 1), torch.cat(pos, 1)
        reference = encoder_reference_points(shapes, src.shape[0], src.device)
        for layer in self.layers:
            src = layer(src, pos_flat, reference, shapes)
        outs = []
        for chunk, (h, w) in zip(src.split([h * w for h, w in shapes], dim=1), shapes, strict=True):
            outs.append(chunk.transpose(1, 2).reshape(src.shape[0], self.conv_dim, h, w))
        fine = self.lateral_convs[0](res2)
        fine = fine + F.interpolate(
            outs[-1], size=fine.shape[-2:], mode="bilinear", align_corners=False
        )
        fine = F.relu(self.output_convs[0](fine))
        return self.mask_features(fine), outs
