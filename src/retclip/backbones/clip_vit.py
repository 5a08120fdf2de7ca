"""Hugging Face CLIP ViT backbone: dense patch features in CLIP's joint space (paper §2.1).

``openai/clip-vit-base-patch16`` (``clip-b16``) and ``openai/clip-vit-large-patch14``
(``clip-l14``) are the paper's ViT-base and ViT-large; any CLIP hub id or local directory works.

**Resolution.** The image is resized (never cropped) so its short side is ``resolution`` pixels and
both sides are multiples of the patch size; position embeddings are interpolated (bicubic, as
``interpolate_pos_encoding=True`` in transformers). The default is twice the pretraining size:
448 px, i.e. a 28×28 grid for B/16 (32×32 for L/14) on a square image instead of 14×14 (16×16) at
224 px, which is too coarse for masks of small segments. It costs ~4.5× the 224 px pass (B/16
on one CPU thread: 2.0 s vs 0.45 s), and is what dense CLIP methods use (MaskCLIP, SCLIP).

**Dense modes.** ``tokens``: the last layer's patch tokens → ``post_layernorm`` →
``visual_projection``. ``value`` (MaskCLIP, Zhou et al. 2022, its ``vit.py``/``maskclip_head.py``):
the last block's query–key attention is dropped and each token keeps its own value path,
``v = out_proj(v_proj(ln_1(x)))``, ``y = x + v``, ``y = y + mlp(ln_2(y))``, then ``post_layernorm``
and ``visual_projection`` per token. The default is ``value``: CLIP's last attention layer mixes
global context into every patch token (its tokens attend to a few image-wide tokens), so last-layer
tokens localise poorly; MaskCLIP reports large gains in zero-shot segmentation from the value path
with no training, and masks pooled from it stay faithful to the region's content.

**Sliding window** (``window``): the resized image is covered by ``window``-pixel squares at
``window_stride``; each is encoded alone and overlapping cells are averaged. It keeps every pass at
the window's resolution (e.g. the pretraining 224) on large images, at the cost of context.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel
from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from retclip.backbones.base import Backbone, BackboneFingerprint
from retclip.backbones.preprocessing import resize_for_grid
from retclip.errors import InputError, ModelUnavailableError
from retclip.hub import ResolvedModel, hf_load, parse_dtype, resolve_model

ClipDenseMode = Literal["tokens", "value"]
#: Windows encoded per forward pass in sliding-window mode.
WINDOW_BATCH = 16


class ClipVitBackbone(Backbone):
    """CLIP ViT dense features ``[B, D, H'/p, W'/p]`` (``H', W'`` the resized image).

    Args:
        model: short name (``clip-b16``), hub id or local directory of a ``CLIPModel``.
        resolution: short side in pixels after resizing; default 2 × the model's image size.
        dense_mode: ``"value"`` (MaskCLIP, default) or ``"tokens"`` (see the module docstring).
        window: sliding-window size in pixels (a multiple of the patch size, at most
            ``resolution``), or ``None`` for one pass over the whole resized image.
        window_stride: window step in pixels (multiple of the patch size); default ``window // 2``
            rounded to the patch size.
        device: where the model runs.
        dtype: weights' dtype (``float16``/``bfloat16`` on CUDA only); outputs are float32.
    """

    def __init__(
        self,
        model: str = "clip-b16",
        *,
        resolution: int | None = None,
        dense_mode: ClipDenseMode = "value",
        window: int | None = None,
        window_stride: int | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
    ) -> None:
        if dense_mode not in ("tokens", "value"):
            raise InputError(f"dense_mode must be 'tokens' or 'value', got {dense_mode!r}")
        self.device = torch.device(device)
        self.dtype = parse_dtype(dtype, self.device)
        resolved = resolve_model(model)
        if resolved.format != "transformers":
            raise InputError(f"{model!r} is an OpenCLIP model, not a Hugging Face CLIP model")
        self.model: Any = hf_load(CLIPModel.from_pretrained, resolved.source)
        self.model.to(device=self.device, dtype=self.dtype).eval()
        self.tokenizer = hf_load(AutoTokenizer.from_pretrained, resolved.source)
        self.mean, self.std = _normalisation(resolved)

        vision = self.model.config.vision_config
        self.patch = int(vision.patch_size)
        self.resolution = int(resolution or 2 * vision.image_size)
        if self.resolution < self.patch:
            raise InputError(f"resolution must be >= the patch size {self.patch}")
        self.window, self.window_stride = self._check_window(window, window_stride)
        self.dense_mode: ClipDenseMode = dense_mode
        self.dim = int(self.model.config.projection_dim)
        self.logit_scale = float(self.model.logit_scale.detach().exp().clamp(max=100).item())
        mode = dense_mode if window is None else f"{dense_mode}/window{window}s{self.window_stride}"
        self.fingerprint = BackboneFingerprint(
            model_id=resolved.model_id,
            revision=str(getattr(self.model.config, "_commit_hash", None) or ""),
            dense_mode=mode,
            input_resolution=self.resolution,
        )

    def _check_window(self, window: int | None, stride: int | None) -> tuple[int | None, int]:
        if window is None:
            return None, 0
        stride = stride or max(self.patch, window // 2 // self.patch * self.patch)
        for name, value in (("window", window), ("window_stride", stride)):
            if value <= 0 or value % self.patch:
                raise InputError(f"{name} must be a positive multiple of {self.patch}, got {value}")
        if window > self.resolution:
            raise InputError(f"window {window} exceeds the resolution {self.resolution}")
        return window, stride

    def to(self, device: torch.device | str) -> ClipVitBackbone:
        self.device = torch.device(device)
        if self.dtype != torch.float32 and self.device.type != "cuda":
            self.dtype = torch.float32
        self.model.to(device=self.device, dtype=self.dtype)
        return self

    def compile_image_tower(self) -> None:
        """``--compile``: the vision transformer (:meth:`dense_tokens`) through
        ``torch.compile``; resizing and normalising stay eager."""
        from retclip.acceleration import Compiled

        if not isinstance(self.dense_tokens, Compiled):
            self.dense_tokens = Compiled(  # type: ignore[method-assign]
                self.dense_tokens, "CLIP ViT image tower"
            )

    @torch.inference_mode()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` RGB in [0, 255] → ``[B, D, h, w]`` float32 (not normalised)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
        pixels = resize_for_grid(images.to(self.device, torch.float32), self.resolution, self.patch)
        mean = torch.tensor(self.mean, device=self.device)[:, None, None] * 255.0
        std = torch.tensor(self.std, device=self.device)[:, None, None] * 255.0
        pixels = ((pixels - mean) / std).to(self.dtype)
        if self.window is None:
            return self.dense_tokens(pixels).float()
        return self._sliding(pixels, self.window).float()

    def dense_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels ``[B, 3, H, W]`` (multiples of the patch) → ``[B, D, H/p, W/p]``."""
        vision = self.model.vision_model
        hidden = vision.embeddings(pixels, interpolate_pos_encoding=True)  # [B, 1 + hw, C]
        hidden = vision.pre_layrnorm(hidden)
        *layers, last = vision.encoder.layers
        for layer in layers:
            hidden = layer(hidden, None)
        if self.dense_mode == "tokens":
            hidden = last(hidden, None)
        else:  # MaskCLIP: value path of the last block, no query-key mixing
            value = last.self_attn.out_proj(last.self_attn.v_proj(last.layer_norm1(hidden)))
            hidden = hidden + value
            hidden = hidden + last.mlp(last.layer_norm2(hidden))
        tokens = self.model.visual_projection(vision.post_layernorm(hidden[:, 1:]))  # [B, hw, D]
        b, _, h, w = pixels.shape
        return tokens.transpose(1, 2).reshape(b, -1, h // self.patch, w // self.patch)

    def _sliding(self, pixels: torch.Tensor, window: int) -> torch.Tensor:
        """Average of window features over the grid; windows batched ``WINDOW_BATCH`` at a time."""
        b, _, height, width = pixels.shape
        win, p = min(window, height, width), self.patch
        starts_y = _starts(height, win, self.window_stride)
        starts_x = _starts(width, win, self.window_stride)
        boxes = [(y, x) for y in starts_y for x in starts_x]
        out = pixels.new_zeros((b, self.dim, height // p, width // p), dtype=torch.float32)
        count = pixels.new_zeros((1, 1, height // p, width // p), dtype=torch.float32)
        for i in range(0, len(boxes), WINDOW_BATCH):
            chunk = boxes[i : i + WINDOW_BATCH]
            crops = torch.cat([pixels[:, :, y : y + win, x : x + win] for y, x in chunk])
            feats = self.dense_tokens(crops).float().split(b)  # each [B, D, win/p, win/p]
            for (y, x), feat in zip(chunk, feats, strict=True):
                cells = (slice(None), slice(None), slice(y // p, (y + win) // p))
                out[(*cells, slice(x // p, (x + win) // p))] += feat
                count[(*cells, slice(x // p, (x + win) // p))] += 1
        return out / count

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """``[T, D]`` float32 text embeddings (``get_text_features``), not normalised."""
        max_length = int(self.model.config.text_config.max_position_embeddings)
        tokens = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        ).to(self.device)
        out = self.model.get_text_features(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        )
        return out.pooler_output.float()


def _starts(size: int, window: int, stride: int) -> list[int]:
    """Window offsets covering ``[0, size)``; the last window ends at ``size``."""
    count = max(1, math.ceil((size - window) / stride) + 1)
    return sorted({min(i * stride, size - window) for i in range(count)})


def _normalisation(resolved: ResolvedModel) -> tuple[list[float], list[float]]:
    """CLIP's mean/std (fractions of 1) from the model's image processor, else OpenAI's."""
    try:
        processor = hf_load(CLIPImageProcessor.from_pretrained, resolved.source)
    except ModelUnavailableError:
        return list(OPENAI_CLIP_MEAN), list(OPENAI_CLIP_STD)
    return list(processor.image_mean), list(processor.image_std)
