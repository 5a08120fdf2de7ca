"""FC-CLIP (Yu et al., NeurIPS 2023) inference in plain PyTorch: one frozen CLIP, two classifiers.

The OpenCLIP backbone (ConvNeXt-L or RN50x64) is shared: its ``res2..res5`` maps feed the pixel
decoder and the masked-attention transformer decoder (mask proposals), and its last map is
mask-pooled for the out-of-vocabulary classifier. Per query and class:

- **in-vocabulary logits** ``[B, Q, C + 1]``: the decoder's class embedding against the text
  embeddings and a learned void embedding (cosine × the decoder's own logit scale);
- **out-of-vocabulary logits** ``[B, Q, C + 1]``: the CLIP map pooled under the binarised mask
  logits (bilinearly resized to stride 32), through CLIP's image head (ConvNeXt: trunk-head norm
  and MLP; ResNet: the attention pool restricted to the mask), cosine × CLIP's logit scale;
- :func:`geometric_ensemble`: FC-CLIP's combination into probabilities ``[B, Q, C + 1]`` whose
  last column is void.

A class's logit is the maximum over its synonyms (``ClassEmbeddings.cosine``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from torch import nn

from retclip.backbones.preprocessing import (
    PIXEL_MEAN,
    PIXEL_STD,
    SIZE_DIVISIBILITY,
    resize_size,
)
from retclip.backbones.preprocessing import fcclip_preprocess as preprocess
from retclip.errors import InputError
from retclip.fcclip.pixel_decoder import PixelDecoder
from retclip.fcclip.transformer_decoder import TransformerDecoder
from retclip.text_embeddings import ClassEmbeddings

__all__ = [
    "CONVNEXT_LARGE",
    "FCCLIP",
    "FCCLIP_ALPHA",
    "FCCLIP_BETA",
    "PIXEL_MEAN",
    "PIXEL_STD",
    "RN50X64",
    "SIZE_DIVISIBILITY",
    "FCCLIPConfig",
    "FCCLIPOutput",
    "classification_logits",
    "geometric_ensemble",
    "masks_to_image",
    "preprocess",
    "resize_size",
]

#: FC-CLIP's ensemble weights of the out-of-vocabulary path (seen / unseen classes).
FCCLIP_ALPHA, FCCLIP_BETA = 0.4, 0.8


@dataclasses.dataclass(frozen=True)
class FCCLIPConfig:
    """Architecture of the FC-CLIP head (the CLIP backbone comes with its own config).

    ``in_channels`` are the backbone's ``res2..res5`` channels; ``embed_dim`` its CLIP
    embedding size. :data:`CONVNEXT_LARGE` and :data:`RN50X64` are the released models;
    :meth:`reduced` is a small variant for tests and fixtures.
    """

    in_channels: tuple[int, int, int, int] = (192, 384, 768, 1536)
    embed_dim: int = 768
    num_queries: int = 250
    hidden_dim: int = 256
    n_heads: int = 8
    ffn_dim: int = 2048
    dec_layers: int = 9
    enc_layers: int = 6
    enc_ffn_dim: int = 1024
    mask_dim: int = 256
    n_points: int = 4
    gn_groups: int = 32
    #: Ensemble only on queries whose mask covers a cell of the CLIP map (FC-CLIP's ResNets).
    ensemble_on_valid_mask: bool = False

    @classmethod
    def from_json(cls, path: str | Path) -> FCCLIPConfig:
        """A config from a JSON object of field values (others keep their defaults).

        Raises:
            InputError: the file is missing, not a JSON object, or names an unknown field.
        """
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(f"FC-CLIP config not found: {path}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"FC-CLIP config {path} is not readable JSON ({exc})") from None
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if not isinstance(data, dict) or set(data) - set(fields):
            unknown = sorted(set(data) - set(fields)) if isinstance(data, dict) else data
            raise InputError(
                f"FC-CLIP config {path}: expected an object with fields of {', '.join(fields)}; "
                f"got {unknown!r}"
            )
        if "in_channels" in data:
            data["in_channels"] = tuple(data["in_channels"])
        try:
            return cls(**data)
        except TypeError as exc:
            raise InputError(f"FC-CLIP config {path}: {exc}") from None

    @classmethod
    def reduced(
        cls,
        in_channels: tuple[int, int, int, int],
        embed_dim: int,
        *,
        num_queries: int = 10,
        dec_layers: int = 3,
        enc_layers: int = 2,
    ) -> FCCLIPConfig:
        """A small head (width 64, 4 heads, FFN 128) on a given backbone, for tests."""
        return cls(
            in_channels=in_channels,
            embed_dim=embed_dim,
            num_queries=num_queries,
            hidden_dim=64,
            n_heads=4,
            ffn_dim=128,
            dec_layers=dec_layers,
            enc_layers=enc_layers,
            mask_dim=64,
        )


#: ``fcclip_cocopan.pth``: OpenCLIP ``convnext_large_d_320`` (laion2b_s29b_b131k_ft_soup).
CONVNEXT_LARGE = FCCLIPConfig()
#: FC-CLIP with OpenAI's RN50x64 (its configs turn on ``ENSEMBLE_ON_VALID_MASK``).
RN50X64 = FCCLIPConfig(
    in_channels=(512, 1024, 2048, 4096), embed_dim=1024, ensemble_on_valid_mask=True
)


@dataclasses.dataclass
class FCCLIPOutput:
    """Raw outputs for a batch of (padded) images.

    Attributes:
        mask_logits: ``[B, Q, H/4, W/4]``.
        in_vocab_logits: ``[B, Q, C + 1]``, last column void.
        out_vocab_logits: ``[B, Q, C + 1]``, last column void.
        valid: ``[B, Q]`` bool, the mask covers at least one cell of the CLIP map.
        clip_embeddings: ``[B, Q, E]`` the out-of-vocabulary path's mask-pooled CLIP embeddings
            (not normalised): RetCLIP's ``s_clip`` and retrieval query (paper §2.2).
    """

    mask_logits: torch.Tensor
    in_vocab_logits: torch.Tensor
    out_vocab_logits: torch.Tensor
    valid: torch.Tensor
    clip_embeddings: torch.Tensor


def classification_logits(
    embeddings: torch.Tensor,
    text: ClassEmbeddings,
    void: torch.Tensor,
    logit_scale: torch.Tensor,
) -> torch.Tensor:
    """``[B, Q, C + 1]``: ``min(exp(logit_scale), 100)`` × cosine of ``embeddings [B, Q, E]``
    with each class (max over its synonyms) and with the ``void [E]`` embedding (last)."""
    b, q, e = embeddings.shape
    x = F.normalize(embeddings, dim=-1).reshape(b * q, e)
    cos = text.cosine(x)  # [BQ, C]
    cos_void = x @ F.normalize(void, dim=-1).to(x.dtype)  # [BQ]
    scale = logit_scale.exp().clamp(max=100)
    return (scale * torch.cat([cos, cos_void[:, None]], -1)).reshape(b, q, -1)


def geometric_ensemble(
    in_vocab_logits: torch.Tensor,
    out_vocab_logits: torch.Tensor,
    seen: torch.Tensor,
    *,
    alpha: float = FCCLIP_ALPHA,
    beta: float = FCCLIP_BETA,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """FC-CLIP's class probabilities ``[..., C + 1]`` (last column void).

    Both paths drop void and are softmaxed over the ``C`` classes; seen classes take
    ``p_in^(1−α)·p_out^α``, unseen ``p_in^(1−β)·p_out^β``; the result is renormalised over
    classes and scaled by ``1 − p_void`` (``p_void`` from the in-vocabulary softmax with void).

    Args:
        in_vocab_logits, out_vocab_logits: ``[..., C + 1]``.
        seen: ``[C]`` bool, classes of the training vocabulary.
        alpha, beta: out-of-vocabulary weights of seen / unseen classes.
        valid: ``[...]`` bool; where ``False`` the weights are 0 (in-vocabulary only).
    """
    p_in = in_vocab_logits[..., :-1].softmax(-1)
    p_out = out_vocab_logits[..., :-1].softmax(-1)
    seen_f = seen.to(p_in.device, p_in.dtype)
    a: torch.Tensor | float = alpha
    b: torch.Tensor | float = beta
    if valid is not None:
        a = alpha * valid.to(p_in.dtype)[..., None]
        b = beta * valid.to(p_in.dtype)[..., None]
    seen_part = (p_in ** (1 - a) * p_out**a).log() * seen_f
    unseen_part = (p_in ** (1 - b) * p_out**b).log() * (1 - seen_f)
    p_void = in_vocab_logits.softmax(-1)[..., -1:]
    return torch.cat([(seen_part + unseen_part).softmax(-1) * (1.0 - p_void), p_void], -1)


class FCCLIP(nn.Module):
    """FC-CLIP on an OpenCLIP model (``clip_model``, frozen, shared with other users).

    Submodules: ``clip_model``, ``pixel_decoder``, ``predictor`` (the transformer decoder) and
    ``void_embedding``; :mod:`retclip.fcclip.checkpoint` maps the original's keys onto them.
    """

    def __init__(self, config: FCCLIPConfig, clip_model: Any) -> None:
        super().__init__()
        self.config = config
        self.clip_model = clip_model
        visual = clip_model.visual
        self.kind = "resnet" if isinstance(visual, ModifiedResNet) else "convnext"
        if self.kind == "convnext" and not hasattr(visual, "trunk"):
            raise ValueError(f"unsupported OpenCLIP vision tower {type(visual).__name__}")
        self.pixel_decoder = PixelDecoder(
            config.in_channels,
            conv_dim=config.hidden_dim,
            mask_dim=config.mask_dim,
            enc_layers=config.enc_layers,
            n_heads=config.n_heads,
            enc_ffn_dim=config.enc_ffn_dim,
            n_points=config.n_points,
            gn_groups=config.gn_groups,
        )
        self.predictor = TransformerDecoder(
            hidden_dim=config.hidden_dim,
            num_queries=config.num_queries,
            n_heads=config.n_heads,
            ffn_dim=config.ffn_dim,
            num_layers=config.dec_layers,
            mask_dim=config.mask_dim,
            embed_dim=config.embed_dim,
        )
        self.void_embedding = nn.Embedding(1, config.embed_dim)

    def backbone_features(self, pixels: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Normalised pixels ``[B, 3, H, W]`` → ``[res2, res3, res4, res5]`` and the CLIP map
        (``res5`` after the trunk's ``norm_pre``; ``res5`` for ResNets)."""
        visual = self.clip_model.visual
        feats = []
        if self.kind == "convnext":
            # contiguous like the original's: a strided (channels-last) map makes the next 1×1
            # convolution take another kernel, whose rounding differs by ~1e-5
            x = visual.trunk.stem(pixels)
            for stage in visual.trunk.stages:
                x = stage(x)
                feats.append(x.contiguous())
            return feats, visual.trunk.norm_pre(x).contiguous()
        x = visual.act1(visual.bn1(visual.conv1(pixels)))
        x = visual.act2(visual.bn2(visual.conv2(x)))
        x = visual.avgpool(visual.act3(visual.bn3(visual.conv3(x))))
        for layer in (visual.layer1, visual.layer2, visual.layer3, visual.layer4):
            x = layer(x)
            feats.append(x)
        return feats, x

    def embed_masks(self, dense: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
        """CLIP embeddings ``[B, Q, E]`` of masks from the CLIP map ``dense [B, D, h, w]``.

        ``mask_logits`` ``[B, Q, h, w]`` (already at the map's size) are binarised at 0.
        ConvNeXt: mean pooling, then ``trunk.head`` and ``visual.head``. ResNet: the attention
        pool with the image mean as query, attending only to the mask's cells.
        """
        visual = self.clip_model.visual
        b, d, h, w = dense.shape
        mask = (mask_logits > 0).to(dense.dtype)
        q = mask.shape[1]

        if self.kind == "convnext":
            weights = mask / (mask.sum(dim=(-1, -2), keepdim=True) + 1e-8)
            pooled = torch.einsum("bchw,bqhw->bqc", dense, weights)
            x = visual.head(visual.trunk.head(pooled.reshape(b * q, d, 1, 1)))
            return x.reshape(b, q, -1)
        pool = visual.attnpool
        pos = pool.positional_embedding.to(dense.dtype)
        side = math.isqrt(pos.shape[0] - 1)
        grid_pos = pos[1:].T.reshape(1, d, side, side)
        grid_pos = F.interpolate(grid_pos, size=(h, w), mode="bilinear", align_corners=False)
        cells = dense.flatten(2).transpose(1, 2)  # [B, hw, D]
        keys = cells + grid_pos.flatten(2).transpose(1, 2)
        query = (cells.mean(1, keepdim=True) + pos[:1]).expand(b, q, d)
        heads = pool.num_heads
        blocked = (mask.flatten(2) < 0.5).repeat_interleave(heads, dim=0)  # [B*heads, Q, hw]
        out = F.multi_head_attention_forward(
            query=query.transpose(0, 1),
            key=keys.transpose(0, 1),
            value=keys.transpose(0, 1),
            embed_dim_to_check=d,
            num_heads=heads,
            in_proj_weight=None,
            in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
            bias_k=None,
            bias_v=None,
            add_zero_attn=False,
            dropout_p=0.0,
            out_proj_weight=pool.c_proj.weight,
            out_proj_bias=pool.c_proj.bias,
            training=False,
            need_weights=False,
            attn_mask=blocked,
            use_separate_proj_weight=True,
            q_proj_weight=pool.q_proj.weight,
            k_proj_weight=pool.k_proj.weight,
            v_proj_weight=pool.v_proj.weight,
        )[0]
        return out.transpose(0, 1)

    def forward(self, pixels: torch.Tensor, text: ClassEmbeddings) -> FCCLIPOutput:
        """Normalised, padded pixels ``[B, 3, H, W]`` (H, W multiples of 32) and the class text
        embeddings → :class:`FCCLIPOutput`."""
        clip_dtype = self.clip_model.text_projection.dtype  # float16/bfloat16 CLIPs on CUDA
        feats, dense = self.backbone_features(pixels.to(clip_dtype))
        dense = dense.float()
        mask_features, levels = self.pixel_decoder(feats)
        mask_logits, class_embeddings = self.predictor(levels, mask_features)
        void = self.void_embedding.weight[0]
        in_vocab = classification_logits(class_embeddings, text, void, self.predictor.logit_scale)
        small = F.interpolate(
            mask_logits, size=dense.shape[-2:], mode="bilinear", align_corners=False
        )
        clip_embeddings = self.embed_masks(dense.to(clip_dtype), small).float()
        out_vocab = classification_logits(clip_embeddings, text, void, self.clip_model.logit_scale)
        valid = (small > 0).flatten(2).any(-1)
        return FCCLIPOutput(mask_logits, in_vocab, out_vocab, valid, clip_embeddings)

    def class_probs(
        self,
        output: FCCLIPOutput,
        seen: torch.Tensor,
        *,
        alpha: float = FCCLIP_ALPHA,
        beta: float = FCCLIP_BETA,
    ) -> torch.Tensor:
        """FC-CLIP's ensembled probabilities ``[B, Q, C + 1]`` (:func:`geometric_ensemble`)."""
        return geometric_ensemble(
            output.in_vocab_logits,
            output.out_vocab_logits,
            seen,
            alpha=alpha,
            beta=beta,
            valid=output.valid if self.config.ensemble_on_valid_mask else None,
        )


def masks_to_image(
    mask_logits: torch.Tensor, resized: tuple[int, int], original: tuple[int, int]
) -> torch.Tensor:
    """Mask logits ``[B, Q, H'/4, W'/4]`` of a padded input → ``[B, Q, H, W]`` at the original
    size: upsampled to the padded size, the padding cropped, resized (all bilinear)."""
    padded = (mask_logits.shape[-2] * 4, mask_logits.shape[-1] * 4)
    up = F.interpolate(mask_logits, size=padded, mode="bilinear", align_corners=False)
    up = up[..., : resized[0], : resized[1]]
    return F.interpolate(up, size=original, mode="bilinear", align_corners=False)
