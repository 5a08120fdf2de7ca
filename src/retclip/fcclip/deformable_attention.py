"""Multi-scale deformable attention (Deformable DETR) in plain PyTorch, no compiled op.

Every query attends, per head, to ``P`` points on each of ``L`` feature levels around its
reference point; each point's value is bilinearly interpolated (``grid_sample``, zero padding,
``align_corners=False``, pixel centres at ``(i + 0.5) / size``) and the points are averaged with
softmax weights. One ``grid_sample`` call per level, and the levels' points summed in one
reduction, in the order of the original's pure-PyTorch path: its outputs are then equal to the
original's bit for bit on CPU (one call over the levels zero-padded to a common canvas gives the
same values only up to float rounding, ~2e-6 after the first encoder layer).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

SpatialShapes = Sequence[tuple[int, int]]


def ms_deform_attn_sample(
    value: torch.Tensor,
    spatial_shapes: SpatialShapes,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """The deformable-attention core.

    Args:
        value: ``[B, S, M, Dh]`` per-head values of the flattened levels, ``S = Σ h_l·w_l``.
        spatial_shapes: ``[(h_l, w_l)]`` of the ``L`` levels, in the order they are flattened.
        sampling_locations: ``[B, Q, M, L, P, 2]`` normalised ``(x, y)`` in ``[0, 1]``.
        attention_weights: ``[B, Q, M, L, P]`` (softmax over ``L·P`` already applied).

    Returns:
        ``[B, Q, M·Dh]`` attended values, heads concatenated.
    """
    b, s, m, dh = value.shape
    _, q, _, n_levels, n_points, _ = sampling_locations.shape
    if len(spatial_shapes) != n_levels or sum(h * w for h, w in spatial_shapes) != s:
        raise ValueError(f"spatial shapes {list(spatial_shapes)} do not match value length {s}")
    grid = 2.0 * sampling_locations - 1.0  # grid_sample's [-1, 1] on each level
    sampled = []
    start = 0
    for level, (h, w) in enumerate(spatial_shapes):
        level_value = value[:, start : start + h * w].flatten(2).transpose(1, 2)  # [B, M·Dh, hw]
        level_grid = grid[:, :, :, level].transpose(1, 2).flatten(0, 1)  # [B·M, Q, P, 2]
        sampled.append(
            F.grid_sample(
                level_value.reshape(b * m, dh, h, w),
                level_grid,
                mode="bilinear",
                padding_mode="zeros",
                align_corners=False,
            )  # [B·M, Dh, Q, P]
        )
        start += h * w
    weights = attention_weights.transpose(1, 2).reshape(b * m, 1, q, n_levels * n_points)
    # levels and points summed in one reduction, in the original's order
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)  # [B·M, Dh, Q]
    return out.view(b, m * dh, q).transpose(1, 2).contiguous()


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention with reference points ``[B, Q, L, 2]``.

    Parameter names follow Deformable DETR (``sampling_offsets``, ``attention_weights``,
    ``value_proj``, ``output_proj``); offsets are in pixels of each level.
    """

    def __init__(self, d_model: int, n_levels: int, n_heads: int, n_points: int) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = (
            d_model,
            n_levels,
            n_heads,
            n_points,
        )
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR's initialisation: offsets start on rays around the reference."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True).values
        grid = grid[:, None, None, :].repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32)[None, None, :, None]
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        source: torch.Tensor,
        spatial_shapes: SpatialShapes,
    ) -> torch.Tensor:
        """Attend from ``query [B, Q, C]`` to ``source [B, S, C]`` (flattened levels).

        ``reference_points`` are ``[B, Q, L, 2]`` normalised ``(x, y)``; returns ``[B, Q, C]``.
        """
        b, q, _ = query.shape
        m, n_levels, n_points = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(source).reshape(b, source.shape[1], m, self.d_model // m)
        offsets = self.sampling_offsets(query).reshape(b, q, m, n_levels, n_points, 2)
        weights = self.attention_weights(query).reshape(b, q, m, n_levels * n_points)
        weights = weights.softmax(-1).reshape(b, q, m, n_levels, n_points)
        # offsets are in pixels: divide by (w_l, h_l)
        normalizer = torch.tensor(
            [[w, h] for h, w in spatial_shapes], dtype=query.dtype, device=query.device
        )
        locations = (
            reference_points[:, :, None, :, None, :]
            + offsets / normalizer[None, None, None, :, None, :]
        )
        out = ms_deform_attn_sample(value, spatial_shapes, locations, weights)
        return self.output_proj(out)
