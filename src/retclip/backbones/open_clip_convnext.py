"""OpenCLIP convolutional backbones: ConvNeXt-L (FC-CLIP's) and RN50x64, dense and per mask.

``convnext-l`` is ``convnext_large_d_320`` / ``laion2b_s29b_b131k_ft_soup``; ``rn50x64`` is OpenAI's
RN50x64. Any OpenCLIP directory (``open_clip_config.json`` + weights) or hub repository with a
timm ConvNeXt-style trunk (``NormMlpClassifierHead``) or a ``ModifiedResNet`` also loads.

**Input.** Convolutions accept any size, so (as FC-CLIP) the image is resized, aspect kept, to a
short side of ``resolution`` (default 800, FC-CLIP's test size; long side ≤ 1333/800 of it), both
sides multiples of 32, and normalised with the model's own mean/std. The feature grid (stride
32) covers the image uniformly.

**Dense map and segments.** :meth:`OpenClipBackbone.encode_images` returns the last stage map
(stride 32, before any head); :meth:`OpenClipBackbone.embed_segments` embeds each mask from it the
way FC-CLIP does, because the model's image embedding pools *before* its non-linear head (layer
norm and the MLP's GELU, or the attention pool, do not commute with averaging):

- ConvNeXt: mean-pool the map under the mask, then the trunk head's norm and ``visual.head``.
- ResNet: the attention pool restricted to the mask's cells, with the mask's mean as the query
  token (FC-CLIP uses the image mean as query; ours makes the full-image case exact).

With a mask covering the whole image both equal ``model.encode_image`` exactly (tested).

**FC-CLIP's recipe** (``preprocessing="fcclip"``, chosen with ``--recipe fcclip`` and implied by
``--proposer fcclip``): the input is FC-CLIP's instead (:mod:`retclip.backbones.preprocessing`:
detectron2's shortest-edge resize to ``resolution`` with the long side at most ``max_size``, PIL
bilinear on the uint8 image, CLIP mean/std, zero padding to multiples of 32), and masks are
mapped onto the grid of the padded frame. With ``"binary"`` pooling this is FC-CLIP's
out-of-vocabulary rule for image-size masks (a cell is in the mask when the mask covers at least
half of it, FC-CLIP's ``logit > 0`` after bilinear resizing), so a database built this way shares
the feature space of the FC-CLIP proposer's queries. The fingerprint records the recipe.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import open_clip
import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from open_clip.timm_model import TimmModel

from retclip.backbones.base import Backbone, BackboneFingerprint
from retclip.backbones.preprocessing import (
    MAX_SIZE,
    fcclip_preprocess,
    padded_size,
    resize_for_grid,
    resize_size,
)
from retclip.errors import InputError
from retclip.hub import open_clip_dir, parse_dtype, resolve_model
from retclip.pooling import Frame, PoolingMode, mask_pool, masks_to_grid

#: Output stride of both trunks' last stage.
STRIDE = 32
DEFAULT_RESOLUTION = 800
Preprocessing = Literal["grid", "fcclip"]


class OpenClipBackbone(Backbone):
    """Dense features ``[B, D, H'/32, W'/32]`` of an OpenCLIP ConvNeXt or ModifiedResNet.

    Args:
        model: short name (``convnext-l``, ``rn50x64``), hub id or local OpenCLIP directory.
        resolution: short side in pixels after resizing (default 800).
        device: where the model runs.
        dtype: weights' dtype (``float16``/``bfloat16`` on CUDA only); outputs are float32.
        preprocessing: ``"grid"`` (resize so both sides are multiples of 32) or ``"fcclip"``
            (FC-CLIP's resize and padding, see the module docstring).
        max_size: ``"fcclip"``: the long side's limit after resizing (default 1333).
    """

    def __init__(
        self,
        model: str = "convnext-l",
        *,
        resolution: int = DEFAULT_RESOLUTION,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        preprocessing: Preprocessing = "grid",
        max_size: int = MAX_SIZE,
    ) -> None:
        if preprocessing not in ("grid", "fcclip"):
            raise InputError(f"preprocessing must be 'grid' or 'fcclip', got {preprocessing!r}")
        self.device = torch.device(device)
        self.dtype = parse_dtype(dtype, self.device)
        resolved = resolve_model(model)
        if resolved.format != "open_clip":
            raise InputError(f"{model!r} is not an OpenCLIP model (no open_clip_config.json)")
        name = f"local-dir:{open_clip_dir(resolved)}"
        self.model: Any = open_clip.create_model(name, load_weights=True).eval()
        self.model.to(device=self.device, dtype=self.dtype)
        self.tokenizer = open_clip.get_tokenizer(name)
        visual = self.model.visual
        if isinstance(visual, ModifiedResNet):
            self.kind: Literal["convnext", "resnet"] = "resnet"
            self.dense_mode = "trunk+masked-attention-pool"
        elif isinstance(visual, TimmModel) and hasattr(visual.trunk.head, "norm"):
            self.kind, self.dense_mode = "convnext", "trunk+head-after-pooling"
        else:
            raise InputError(
                f"{model!r}: unsupported OpenCLIP vision tower {type(visual).__name__}"
            )
        if resolution < STRIDE:
            raise InputError(f"resolution must be >= {STRIDE}, got {resolution}")
        if max_size < resolution:
            raise InputError(f"max_size ({max_size}) must be >= resolution ({resolution})")
        self.resolution = resolution
        self.preprocessing: Preprocessing = preprocessing
        self.max_size = max_size
        self.mean = [float(v) for v in visual.image_mean]
        self.std = [float(v) for v in visual.image_std]
        self.dim = int(self.model.text_projection.shape[-1])
        self.logit_scale = float(self.model.logit_scale.detach().exp().clamp(max=100).item())
        self.fingerprint = BackboneFingerprint(
            model_id=resolved.model_id,
            revision="",
            dense_mode=self.dense_mode,
            input_resolution=resolution,
            preprocessing=(
                f"fcclip:short{resolution}/max{max_size}/pad{STRIDE}"
                if preprocessing == "fcclip"
                else ""
            ),
        )

    def to(self, device: torch.device | str) -> OpenClipBackbone:
        self.device = torch.device(device)
        if self.dtype != torch.float32 and self.device.type != "cuda":
            self.dtype = torch.float32
        self.model.to(device=self.device, dtype=self.dtype)
        return self

    def frame(self, height: int, width: int) -> Frame | None:
        """Where an image of ``height × width`` lies in its padded input (``"fcclip"``), else
        ``None`` (the grid covers the image)."""
        if self.preprocessing != "fcclip":
            return None
        resized = resize_size(height, width, self.resolution, self.max_size)
        return (*resized, *padded_size(*resized))

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` RGB in [0, 255] → resized, normalised ``[B, 3, H', W']`` (with
        ``"fcclip"``: FC-CLIP's resize, then zero padding to multiples of 32)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
        if self.preprocessing == "fcclip":
            size = resize_size(
                int(images.shape[2]), int(images.shape[3]), self.resolution, self.max_size
            )
            uint8 = images.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()
            batch = [fcclip_preprocess(img.numpy(), size, self.device)[0] for img in uint8]
            return torch.cat(batch).to(self.dtype)
        pixels = resize_for_grid(images.to(self.device, torch.float32), self.resolution, STRIDE)
        mean = torch.tensor(self.mean, device=self.device)[:, None, None] * 255.0
        std = torch.tensor(self.std, device=self.device)[:, None, None] * 255.0
        return ((pixels - mean) / std).to(self.dtype)

    def trunk_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed pixels → the last stage map ``[B, C, H'/32, W'/32]`` (before any head)."""
        visual = self.model.visual
        if self.kind == "convnext":
            return visual.trunk.forward_features(pixels)
        x = visual.stem(pixels)
        return visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))

    @torch.inference_mode()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` RGB in [0, 255] → trunk map ``[B, C, H'/32, W'/32]`` float32."""
        return self.trunk_features(self.preprocess(images)).float()

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        """ConvNeXt: trunk-head norm and ``visual.head`` on pooled trunk features ``[N, C]``."""
        trunk_head = self.model.visual.trunk.head
        x = trunk_head.norm(pooled[:, :, None, None]).flatten(1)  # LayerNorm2d over channels
        for layer in (trunk_head.pre_logits, trunk_head.drop, trunk_head.fc):
            x = layer(x)
        return self.model.visual.head(x)

    @torch.inference_mode()
    def embed_segments(
        self, dense: torch.Tensor, masks: torch.Tensor, *, mode: PoolingMode = "soft"
    ) -> torch.Tensor:
        """FC-CLIP's per-mask embeddings ``[B, N, D]`` (not normalised) from the trunk map.

        Args:
            dense: ``[B, C, h, w]`` trunk map from :meth:`encode_images`.
            masks: ``[B, N, H, W]`` bool or soft masks at image size.
            mode: pooling mode for ConvNeXt; the ResNet attends to the cells the mask touches.

        A full mask gives ``model.encode_image`` of the preprocessed image.
        """
        trunk = dense.to(self.device, self.dtype)
        frame = self.frame(int(masks.shape[-2]), int(masks.shape[-1]))
        if frame is not None and (frame[2] // STRIDE, frame[3] // STRIDE) != trunk.shape[-2:]:
            raise ValueError(
                f"masks of {tuple(masks.shape[-2:])} do not fit the padded grid "
                f"{tuple(trunk.shape[-2:])}: pass masks at the encoded image's size"
            )
        if self.kind == "convnext":
            pooled = mask_pool(
                trunk, masks.to(self.device), mode=mode, normalize=False, frame=frame
            )
            b, n, c = pooled.shape
            return self.head(pooled.reshape(b * n, c)).reshape(b, n, -1).float()
        grid = (int(trunk.shape[-2]), int(trunk.shape[-1]))
        weights = masks_to_grid(masks.to(self.device), grid, frame)
        return self._masked_attention_pool(trunk, weights > 0).float()

    def _masked_attention_pool(self, trunk: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
        """The ResNet attention pool over each mask's cells ``inside [B, N, h, w]`` → ``[B, N, D]``.

        Tokens are the mask's mean plus the mask's cells (positional embedding interpolated to the
        grid); the mean token is the query. Keys and values of cells are computed once per image.
        """
        pool = self.model.visual.attnpool
        b, c, h, w = trunk.shape
        heads, head_dim = pool.num_heads, c // pool.num_heads
        pos = pool.positional_embedding.to(trunk.dtype)  # [1 + s², C]
        side = math.isqrt(pos.shape[0] - 1)
        spatial = pos[1:].T.reshape(1, c, side, side)
        if (h, w) != (side, side):
            spatial = F.interpolate(spatial, size=(h, w), mode="bicubic", align_corners=False)
        cells = (trunk + spatial).flatten(2).transpose(1, 2)  # [B, hw, C]
        inside = inside.flatten(2)  # [B, N, hw]
        counts = inside.sum(-1, keepdim=True).clamp_min(1).to(trunk.dtype)
        mean = torch.bmm(inside.to(trunk.dtype), trunk.flatten(2).transpose(1, 2)) / counts
        query_tok = mean + pos[0]  # [B, N, C]

        def split(x: torch.Tensor) -> torch.Tensor:  # [B, L, C] → [B, heads, L, head_dim]
            return x.reshape(b, x.shape[1], heads, head_dim).transpose(1, 2)

        q = split(pool.q_proj(query_tok)) * head_dim**-0.5
        k_self, v_self = split(pool.k_proj(query_tok)), split(pool.v_proj(query_tok))
        k_cells, v_cells = split(pool.k_proj(cells)), split(pool.v_proj(cells))
        score_self = (q * k_self).sum(-1, keepdim=True)  # [B, heads, N, 1]
        score_cells = q @ k_cells.transpose(-1, -2)  # [B, heads, N, hw]
        score_cells = score_cells.masked_fill(~inside[:, None], float("-inf"))
        attn = torch.softmax(torch.cat([score_self, score_cells], -1), dim=-1)
        out = attn[..., :1] * v_self + attn[..., 1:] @ v_cells  # [B, heads, N, head_dim]
        return pool.c_proj(out.transpose(1, 2).reshape(b, -1, c))

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """``[T, D]`` float32 text embeddings (OpenCLIP ``encode_text``), not normalised."""
        tokens = self.tokenizer(list(texts)).to(self.device)
        return self.model.encode_text(tokens).float()
