"""The toy world's dual encoder as a :class:`Backbone` (``--backbone toy``), shipped in the package.

The dense map is the trunk's stride-8 output; its head (LayerNorm + Linear) is applied after mask
pooling, exactly as the model computes its whole-image embedding during training. Images are
resized to a multiple of 8 pixels so the grid covers them uniformly.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F

from retclip.backbones.base import Backbone, BackboneFingerprint
from retclip.backbones.toy_model import load_checkpoint, tokenize
from retclip.errors import ModelUnavailableError
from retclip.pooling import PoolingMode, mask_pool

CHECKPOINT = "toy_dual_encoder.safetensors"


def default_checkpoint() -> Path:
    """The checkpoint shipped in ``retclip/data/toy``."""
    return Path(str(resources.files("retclip") / "data" / "toy" / CHECKPOINT))


class ToyBackbone(Backbone):
    """Dense features ``[B, 64, H/8, W/8]`` of the toy dual encoder; ``dim`` 64 after the head."""

    def __init__(self, checkpoint: str | Path | None = None) -> None:
        path = Path(checkpoint) if checkpoint is not None else default_checkpoint()
        if not path.is_file() or not path.with_suffix(".json").is_file():
            raise ModelUnavailableError(
                f"toy model checkpoint not found: {path} (and its .json); train one with "
                "`python -m retclip.toyworld.train --out PATH`"
            )
        self.model = load_checkpoint(path)
        record = json.loads(path.with_suffix(".json").read_text())
        self.dim = int(record["config"]["dim"])
        self.fingerprint = BackboneFingerprint(
            model_id="retclip/toy",
            revision=hashlib.sha256(path.read_bytes()).hexdigest()[:12],  # weights' content
            dense_mode="trunk+head-after-pooling",
            input_resolution=0,
        )
        self.logit_scale = float(self.model.logit_scale.detach().exp().clamp(max=100))
        self.prompt_templates = ("a photo of a {}.",)

    def to(self, device: torch.device | str) -> ToyBackbone:
        super().to(device)
        self.model.to(self.device)
        return self

    def compile_image_tower(self) -> None:
        """``--compile``: the trunk (``model.dense``) through ``torch.compile``."""
        from retclip.acceleration import Compiled

        if not isinstance(self.model.dense, Compiled):
            self.model.dense = Compiled(self.model.dense, "toy image trunk")  # type: ignore[method-assign]

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` RGB in [0, 255] → trunk map ``[B, 64, round(H/8), round(W/8)]``."""
        h, w = images.shape[-2:]
        size = (max(8, 8 * round(h / 8)), max(8, 8 * round(w / 8)))
        if size != (h, w):
            images = F.interpolate(images.float(), size=size, mode="bilinear", antialias=True)
        with torch.inference_mode():
            return self.model.dense(images.float().to(self.device))

    def embed_segments(
        self, dense: torch.Tensor, masks: torch.Tensor, *, mode: PoolingMode = "soft"
    ) -> torch.Tensor:
        """Mask-pool the trunk map ``[B, 64, h, w]``, then the image head → ``[B, N, dim]``."""
        with torch.inference_mode():
            return self.model.image_head(mask_pool(dense, masks, mode=mode, normalize=False))

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        with torch.inference_mode():
            return self.model.encode_text(tokenize(texts).to(self.device))
