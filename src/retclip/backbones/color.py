"""A weight-free backbone whose features are known: soft assignments of colours to colour names.

It makes every later stage testable for *meaning* without any model download: a red region pools
to a feature close to the text embedding of "red", and a database of red segments labelled
"apple" teaches retrieval a word the text tower has never seen. It is also a quick way to try the
command line on any image (classes such as "red, blue, white").

Image features: the image is area-averaged to a grid of about :attr:`ColorBackbone.stride` pixels;
each cell's colour becomes a softmax over its distances to :data:`COLOUR_PROTOTYPES` (dim 12).
Text features: the sum of the one-hot vectors of the colour words in the text; a text without a
colour word gets a fixed pseudo-random vector derived from its SHA-256, i.e. a word the model
"does not understand" (as CLIP on a masked segment of a rare class).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

import numpy as np
import torch

from retclip.backbones.base import Backbone, BackboneFingerprint
from retclip.pooling import area_resize

#: Colour names and their RGB prototypes; the order defines the feature dimensions.
COLOUR_PROTOTYPES: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (240, 140, 30),
    "yellow": (235, 220, 50),
    "green": (50, 170, 60),
    "cyan": (50, 200, 210),
    "blue": (40, 70, 210),
    "purple": (130, 50, 180),
    "pink": (235, 120, 190),
    "brown": (120, 75, 40),
    "white": (240, 240, 240),
    "gray": (128, 128, 128),
    "black": (20, 20, 20),
}
_WORD = re.compile(r"[a-z]+")


class ColorBackbone(Backbone):
    """Dense colour-name features ``[B, 12, round(H/stride), round(W/stride)]``."""

    def __init__(self, stride: int = 8, temperature: float = 30.0) -> None:
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        self.stride = stride
        self.temperature = temperature
        self.dim = len(COLOUR_PROTOTYPES)
        self.fingerprint = BackboneFingerprint(
            model_id="retclip/color",
            revision="1",
            dense_mode=f"colour-softmax-t{temperature:g}",
            input_resolution=stride,
        )
        self.prompt_templates = ("a photo of a {}.", "a {} region.")
        self._prototypes = torch.tensor(list(COLOUR_PROTOTYPES.values()), dtype=torch.float32)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` RGB in [0, 255] → ``[B, 12, h, w]`` colour-name probabilities."""
        h, w = images.shape[-2:]
        grid = (max(1, round(h / self.stride)), max(1, round(w / self.stride)))
        cells = area_resize(images, grid)  # [B, 3, h, w], cells cover the image uniformly
        prototypes = self._prototypes.to(cells.device)
        dist2 = ((cells.unsqueeze(1) - prototypes[None, :, :, None, None]) ** 2).sum(2)
        return torch.softmax(-dist2 / (2 * self.temperature**2), dim=1)  # [B, K, h, w]

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """``[T, 12]``: one-hot sum of colour words, or a fixed random vector if none."""
        names = list(COLOUR_PROTOTYPES)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            words = [w for w in _WORD.findall(text.lower()) if w in COLOUR_PROTOTYPES]
            if words:
                for word in words:
                    out[row, names.index(word)] = 1.0
            else:
                seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
                out[row] = np.random.default_rng(seed).standard_normal(self.dim)
        return torch.from_numpy(out).to(self.device)
