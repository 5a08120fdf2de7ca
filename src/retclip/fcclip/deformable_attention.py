"""Multi-scale deformable attention (Deformable DETR) in plain PyTorch, no compiled op.

Every query attends, per head, to ``P`` points on each of ``L`` feature levels around its
reference point; each point's value is bilinearly interpolated (``grid_sample``, zero padding,
``align_corners=False``, pixel centres at ``(i + 0.5) / size``) and the points are averaged with
softmax weights. All levels are zero-padded to the largest level's size so that one
``grid_sample`` call covers every (batch, head, level): a location on level ``l`` is rescaled by
``size_l / size_max``, and the padding reads as the zeros ``grid_sample`` would pad with anyway,
so the result equals sampling each level on its own.
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
    h_max = max(h for h, _ in spatial_shapes)
    w_max = max(w for _, w in spatial_shapes)
    padded = value.new_zeros(b, m, n_levels, dh, h_max, w_max)
    scale = value.new_empty(n_levels, 2)
    start = 0
    for level, (h, w) in enumerate(spatial_shapes):
        chunk = value[:, start : start + h * w]  # [B, h*w, M, Dh]
        padded[:, :, level, :, :h, :w] = chunk.permute(0, 2, 3, 1).reshape(b, m, dh, h, w)
        scale[level, 0], scale[level, 1] = w / w_max, h / h_max
        start += h * w
    # [B, Q, M, L, P, 2] -> [B, M, L, Q, P, 2], in grid_sample's [-1, 1] on the padded canvas
    grid = (sampling_locations * scale[:, None, :]).permute(0, 2, 3, 1, 4, 5) * 2.0 - 1.0
    sampled = F.grid_sample(
        padded.reshape(b * m * n_levels, dh, h_max, w_max),
        grid.reshape(b * m * n_levels, q, n_points, 2),
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    )  # [B*M*L, Dh, Q, P]
    sampled = sampled.reshape(b, m, n_levels, dh, q, n_points)
    weights = attention_weights.permute(0, 2, 3, 1, 4)[:, :, :, None]  # [B, M, L, 1, Q, P]
    out = (sampled * weights).sum(dim=(2, 5))  # [B, M, Dh, Q]
    return out.permute(0, 3, 1, 2).reshape(b, q, m * dh)


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
