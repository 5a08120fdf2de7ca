"""A tiny CLIP-like dual encoder for the toy world, small enough to ship inside the package.

Image tower: five 3×3 convolutions (strides 2, 2, 2, 1, 1) give a dense map ``[B, 64, H/8, W/8]``;
the image embedding is the head (LayerNorm + Linear → ``dim``) applied to the map's global mean,
as OpenCLIP's ConvNeXt applies its head after pooling. Text tower: word embeddings, one
transformer layer, a masked mean and a linear projection. Trained contrastively on whole-scene
captions only (``retclip.toyworld.train``), so a mask-pooled region meets the domain shift the
paper describes: the model never saw a feature pooled from part of an image. The model lives
beside its backbone so that no library module imports the toy-world app.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from retclip.files import atomic_write, atomic_writer

_TOKEN = re.compile(r"[a-z]+|[.,]")
#: Class words of the toy world (things, then stuff), in the order the tokenizer numbers them;
#: ``retclip.toyworld.world`` draws its categories from these.
CLASS_WORDS: tuple[str, ...] = (
    *("circle", "square", "triangle", "star", "cross", "ring", "diamond", "hexagon"),
    *("stripes", "dots", "checks", "noise", "waves", "gradient"),
)
#: Colour words of the toy world, in tokenizer order (the world's colour table uses them).
COLOUR_WORDS: tuple[str, ...] = (
    *("red", "orange", "yellow", "green", "cyan", "blue"),
    *("purple", "pink", "white", "gray", "black", "brown"),
)
#: Every word the text tower knows (its tokenizer's vocabulary); anything else is ``[unk]``.
WORDS: tuple[str, ...] = (
    "[pad]",
    "[unk]",
    "a",
    "an",
    "photo",
    "of",
    "on",
    "and",
    "the",
    ",",
    ".",
    *CLASS_WORDS,
    *COLOUR_WORDS,
)


def tokenize(texts: Sequence[str], max_length: int = 32) -> torch.Tensor:
    """``[T, max_length]`` word ids (0 = padding; unknown words → ``[unk]``; truncated)."""
    index = {w: i for i, w in enumerate(WORDS)}
    ids = torch.zeros((len(texts), max_length), dtype=torch.long)
    for row, text in enumerate(texts):
        tokens = [index.get(t, 1) for t in _TOKEN.findall(text.lower())][:max_length]
        ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    return ids


class ToyDualEncoder(nn.Module):
    """Image tower with a dense map at stride 8, text tower, shared ``dim``-d space."""

    def __init__(self, dim: int = 64, width: int = 64, text_width: int = 64) -> None:
        super().__init__()
        self.config = {"dim": dim, "width": width, "text_width": text_width}
        chans = (3, 24, 32, width, width, width)
        strides = (2, 2, 2, 1, 1)
        layers: list[nn.Module] = []
        for c_in, c_out, stride in zip(chans[:-1], chans[1:], strides, strict=True):
            layers += [
                nn.Conv2d(c_in, c_out, 3, stride, padding=1, bias=False),
                nn.BatchNorm2d(c_out),  # a per-channel affine at inference: features stay local
                nn.GELU(),
            ]
        self.trunk = nn.Sequential(*layers)
        self.image_head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, dim))
        self.token_embedding = nn.Embedding(len(WORDS), text_width, padding_idx=0)
        self.position_embedding = nn.Parameter(torch.zeros(32, text_width))
        self.text_layer = nn.TransformerEncoderLayer(
            text_width, nhead=4, dim_feedforward=2 * text_width, batch_first=True
        )
        self.text_head = nn.Linear(text_width, dim)
        self.logit_scale = nn.Parameter(torch.tensor(2.659))  # log(1 / 0.07), as CLIP starts

    def dense(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` RGB in [0, 255] → trunk map ``[B, width, ceil(H/8), ceil(W/8)]``."""
        return self.trunk(images / 255.0 - 0.5)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Whole-image embeddings ``[B, dim]`` (head after global mean pooling; not normalised)."""
        return self.image_head(self.dense(images).mean(dim=(2, 3)))

    def encode_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        """``[T, L]`` word ids → ``[T, dim]`` (not normalised)."""
        padding = token_ids == 0
        x = self.token_embedding(token_ids) + self.position_embedding[: token_ids.shape[1]]
        x = self.text_layer(x, src_key_padding_mask=padding)
        keep = (~padding).unsqueeze(-1).float()
        return self.text_head((x * keep).sum(1) / keep.sum(1).clamp_min(1.0))


def save_checkpoint(model: ToyDualEncoder, path: Path, record: dict[str, Any]) -> None:
    """Weights as safetensors at ``path`` and ``record`` (+ config) beside it as JSON."""
    from safetensors.torch import save

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_writer(path) as handle:
        handle.write(save(state))
    record = {"config": model.config, **record}
    atomic_write(path.with_suffix(".json"), json.dumps(record, indent=2) + "\n")


def load_checkpoint(path: Path) -> ToyDualEncoder:
    """The model saved by :func:`save_checkpoint` at ``path`` (CPU, eval mode)."""
    from safetensors.torch import load_file

    record = json.loads(path.with_suffix(".json").read_text())
    model = ToyDualEncoder(**record["config"])
    model.load_state_dict(load_file(str(path)))
    return model.eval()
