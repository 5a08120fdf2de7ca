"""Mask2Former's masked-attention transformer decoder with FC-CLIP's class head.

Learned queries are refined by layers of (masked cross-attention to one pixel-decoder level,
self-attention, FFN), all post-norm, cycling through the levels coarsest first. Before the first
layer and after each one, the prediction heads run on the normalised queries:

- mask logits ``[B, Q, H/4, W/4]`` = ``mask_embed(query) · mask_features``;
- FC-CLIP's in-vocabulary class embedding: the mask features mean-pooled under the binarised
  mask logits (``> 0``), through ``LayerNorm + Linear``, added to the query, through the
  ``class_embed`` MLP to the CLIP embedding size;
- the attention mask of the next layer: a query sees only the positions where its mask,
  bilinearly resized to that level, has probability ``>= 0.5`` (all positions if none).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from retclip.fcclip.pixel_decoder import sine_position_embedding


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (``layers.0``, ``layers.1``, ...)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(dims))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index < len(self.layers) - 1:
                x = F.relu(x)
        return x


def mask_pool(features: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
    """FC-CLIP's mask pooling: mean of ``features [B, C, h, w]`` where ``mask_logits > 0``.

    ``mask_logits`` ``[B, Q, H, W]`` are resized bilinearly to ``(h, w)`` first if needed; the
    mean is ``sum(x·m) / (sum(m) + 1e-8)`` (zeros for an empty mask). Returns ``[B, Q, C]``.
    """
    if mask_logits.shape[-2:] != features.shape[-2:]:
        mask_logits = F.interpolate(
            mask_logits, size=features.shape[-2:], mode="bilinear", align_corners=False
        )
    mask = (mask_logits > 0).to(features.dtype)
    mask = mask / (mask.sum(dim=(-1, -2), keepdim=True) + 1e-8)
    return torch.einsum("bchw,bqhw->bqc", features, mask)


class DecoderLayer(nn.Module):
    """Masked cross-attention, self-attention and FFN, each residual + post-LayerNorm."""

    def __init__(self, hidden_dim: int, n_heads: int, ffn_dim: int) -> None:
        super().__init__()
        self.cross_attn = nn.MultiheadAttention(hidden_dim, n_heads, batch_first=True)
        self.cross_norm = nn.LayerNorm(hidden_dim)
        self.self_attn = nn.MultiheadAttention(hidden_dim, n_heads, batch_first=True)
        self.self_norm = nn.LayerNorm(hidden_dim)
        self.linear1 = nn.Linear(hidden_dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, hidden_dim)
        self.ffn_norm = nn.LayerNorm(hidden_dim)

    def forward(
        self,
        query: torch.Tensor,
        query_pos: torch.Tensor,
        memory: torch.Tensor,
        memory_pos: torch.Tensor,
        attn_mask: torch.Tensor,
    ) -> torch.Tensor:
        """``query``/``query_pos`` ``[B, Q, C]``, ``memory``/``memory_pos`` ``[B, S, C]``;
        ``attn_mask`` ``[B·heads, Q, S]`` bool, ``True`` = may not attend."""
        attended = self.cross_attn(
            query + query_pos, memory + memory_pos, memory, attn_mask=attn_mask, need_weights=False
        )[0]
        query = self.cross_norm(query + attended)
        q = query + query_pos
        query = self.self_norm(query + self.self_attn(q, q, query, need_weights=False)[0])
        return self.ffn_norm(query + self.linear2(F.relu(self.linear1(query))))


class TransformerDecoder(nn.Module):
    """FC-CLIP's ``MultiScaleMaskedTransformerDecoder`` (inference).

    Args:
        hidden_dim: query width, equal to the pixel decoder's ``conv_dim`` (256).
        num_queries: learned queries (250 for FC-CLIP's ADE20k/COCO models).
        n_heads: attention heads (8).
        ffn_dim: FFN width (2048).
        num_layers: decoder layers (9; Mask2Former's ``DEC_LAYERS`` minus one).
        mask_dim: mask feature channels (256).
        embed_dim: CLIP embedding size of the class head (768 for ConvNeXt-L).
    """

    num_levels = 3

    def __init__(
        self,
        *,
        hidden_dim: int = 256,
        num_queries: int = 250,
        n_heads: int = 8,
        ffn_dim: int = 2048,
        num_layers: int = 9,
        mask_dim: int = 256,
        embed_dim: int = 768,
    ) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.layers = nn.ModuleList(
            DecoderLayer(hidden_dim, n_heads, ffn_dim) for _ in range(num_layers)
        )
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.level_embed = nn.Embedding(self.num_levels, hidden_dim)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)
        self.mask_pooling_proj = nn.Sequential(
            nn.LayerNorm(hidden_dim), nn.Linear(hidden_dim, hidden_dim)
        )
        self.class_embed = MLP(hidden_dim, hidden_dim, embed_dim, 3)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def heads(
        self, query: torch.Tensor, mask_features: torch.Tensor, target_size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prediction heads on ``query [B, Q, C]``.

        Returns mask logits ``[B, Q, H/4, W/4]``, class embeddings ``[B, Q, E]`` (not
        normalised) and the attention mask ``[B·heads, Q, h·w]`` for a level of ``target_size``.
        """
        decoded = self.decoder_norm(query)
        mask_logits = torch.einsum("bqc,bchw->bqhw", self.mask_embed(decoded), mask_features)
        pooled = self.mask_pooling_proj(mask_pool(mask_features, mask_logits))
        class_embeddings = self.class_embed(pooled + decoded)
        small = F.interpolate(mask_logits, size=target_size, mode="bilinear", align_corners=False)
        blocked = small.sigmoid().flatten(2) < 0.5  # [B, Q, h*w]
        blocked = blocked & ~blocked.all(-1, keepdim=True)  # a query blocked everywhere sees all
        attn_mask = blocked.repeat_interleave(self.n_heads, dim=0)
        return mask_logits, class_embeddings, attn_mask.detach()

    def forward(
        self, levels: Sequence[torch.Tensor], mask_features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Refine the queries against ``levels`` (three ``[B, C, h_l, w_l]``, coarsest first).

        Returns the last layer's mask logits ``[B, Q, H/4, W/4]`` and class embeddings
        ``[B, Q, E]``.
        """
        if len(levels) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} feature levels, got {len(levels)}")
        memories, positions, sizes = [], [], []
        for index, x in enumerate(levels):
            b, c, h, w = x.shape
            sizes.append((h, w))
            pos = sine_position_embedding((b, c, h, w), c // 2, device=x.device)
            positions.append(pos.flatten(2).transpose(1, 2))
            memories.append(x.flatten(2).transpose(1, 2) + self.level_embed.weight[index])
        batch = levels[0].shape[0]
        query_pos = self.query_embed.weight[None].expand(batch, -1, -1)
        query = self.query_feat.weight[None].expand(batch, -1, -1)
        mask_logits, class_embeddings, attn_mask = self.heads(query, mask_features, sizes[0])
        for index, layer in enumerate(self.layers):
            level = index % self.num_levels
            query = layer(query, query_pos, memories[level], positions[level], attn_mask)
            next_size = sizes[(index + 1) % self.num_levels]
            mask_logits, class_embeddings, attn_mask = self.heads(query, mask_features, next_size)
        return mask_logits, class_embeddings
