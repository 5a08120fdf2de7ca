"""The Backbone interface: one model that embeds images densely and texts in a joint space.

A backbone is the only model every path of RetCLIP shares (paper §2.1 "Dense Feature Generation",
§2.2 "Shared Backbone"): one pass per image gives the dense map from which every mask is pooled,
both for database rows and for queries, and its text tower embeds class names for ``s_clip``.
A new backbone is one new file in this package implementing :class:`Backbone`.
"""

from __future__ import annotations

import abc
import dataclasses
import json
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from retclip.acceleration import Compiled
from retclip.images import image_to_tensor
from retclip.pooling import PoolingMode, mask_pool


@dataclasses.dataclass(frozen=True)
class BackboneFingerprint:
    """What makes two backbones' features comparable.

    A feature database stores the fingerprint of the backbone that built it; queries from a backbone
    with another fingerprint are refused, because features from different models (or the same model
    at another resolution or dense mode) do not live in the same space.
    """

    model_id: str
    revision: str = ""
    dense_mode: str = ""
    input_resolution: int = 0
    #: The input recipe when it is not the backbone's default (``""``), e.g. FC-CLIP's resize
    #: and padding (``"fcclip:short800/max1333/pad32"``).
    preprocessing: str = ""

    def to_dict(self) -> dict[str, str | int]:
        data = dataclasses.asdict(self)
        if not self.preprocessing:  # the default recipe keeps its earlier form (and cache keys)
            del data["preprocessing"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> BackboneFingerprint:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})  # type: ignore[arg-type]

    def key(self) -> str:
        """A stable string form, used in cache keys."""
        return json.dumps(self.to_dict(), sort_keys=True)

    def __str__(self) -> str:
        parts = [self.model_id]
        if self.revision:
            parts.append(f"rev={self.revision}")
        if self.dense_mode:
            parts.append(f"dense={self.dense_mode}")
        if self.input_resolution:
            parts.append(f"res={self.input_resolution}")
        if self.preprocessing:
            parts.append(f"input={self.preprocessing}")
        return " ".join(parts)


class Backbone(abc.ABC):
    """Images → dense features ``[B, D, h, w]``; texts → ``[T, D]``; both L2-normalisable.

    Subclasses set :attr:`fingerprint`, :attr:`dim` and :attr:`logit_scale`, and implement
    :meth:`encode_images` and :meth:`encode_texts`. Image preprocessing (resizing, normalising)
    belongs to the backbone, so callers always pass plain RGB images.
    """

    fingerprint: BackboneFingerprint
    dim: int
    #: Multiplier of cosine similarities before the softmax of ``s_clip`` (CLIP's is 100).
    logit_scale: float = 100.0
    #: Prompt templates filled with each synonym to embed a class name (paper: CLIP prompts).
    #: ``None`` means the library's default (the 14 ViLD templates FC-CLIP uses).
    prompt_templates: Sequence[str] | None = None
    device: torch.device = torch.device("cpu")

    @abc.abstractmethod
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Dense features of a batch of images.

        Args:
            images: ``[B, 3, H, W]`` float RGB in ``[0, 255]`` (one size per batch).

        Returns:
            ``[B, D', h, w]`` float features covering the image uniformly, *not* normalised per
            position (mask pooling averages first and normalises after, as CLIP pools). By
            default ``D' = dim`` and the map is in the joint image–text space; a backbone whose
            head must follow pooling returns its pre-head map and overrides
            :meth:`embed_segments`.
        """

    def embed_segments(
        self, dense: torch.Tensor, masks: torch.Tensor, *, mode: PoolingMode = "soft"
    ) -> torch.Tensor:
        """Segment embeddings ``[B, N, D]`` (not normalised) from ``dense [B, D', h, w]``.

        Args:
            dense: the output of :meth:`encode_images`.
            masks: ``[B, N, H, W]`` bool or soft masks at image size (zero masks for padding).
            mode: mask pooling mode (:func:`retclip.pooling.mask_pool`).

        The default is the mean of the dense map under each mask. Backbones whose image head is
        applied after pooling (OpenCLIP ConvNeXt: the trunk's norm and an MLP head, FC-CLIP's
        out-of-vocabulary path; the toy model) pool first and apply the head here, since a
        non-linear head does not commute with averaging.
        """
        return mask_pool(dense, masks, mode=mode, normalize=False)

    @abc.abstractmethod
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Embeddings ``[T, D]`` of full prompt strings (not normalised)."""

    def to(self, device: torch.device | str) -> Backbone:
        """Move the backbone's weights to ``device``; returns ``self``."""
        self.device = torch.device(device)
        return self

    def compile_image_tower(self) -> None:
        """``--compile``: run :meth:`encode_images` through ``torch.compile`` from now on (a
        warning and eager mode where compiling fails; see :class:`~retclip.acceleration.
        Compiled`). Backbones with a pure model part override this to compile only that."""
        if not isinstance(self.encode_images, Compiled):
            self.encode_images = Compiled(  # type: ignore[method-assign]
                self.encode_images, f"{type(self).__name__} image tower"
            )


def segment_features(
    backbone: Backbone, image: np.ndarray, masks: np.ndarray, *, mode: PoolingMode = "soft"
) -> torch.Tensor:
    """``[N, D]`` unit-norm features of ``[N, H, W]`` bool masks from one pass over the image.

    This is the one place where an image meets the backbone: the dense map ``[1, D', h, w]`` is
    computed once and every mask is embedded from it (:func:`features_from_dense`).
    """
    with torch.inference_mode():
        pixels = image_to_tensor(image).unsqueeze(0).to(backbone.device)  # [1, 3, H, W]
        return features_from_dense(backbone, backbone.encode_images(pixels), masks, mode=mode)


def features_from_dense(
    backbone: Backbone, dense: torch.Tensor, masks: np.ndarray, *, mode: PoolingMode = "soft"
) -> torch.Tensor:
    """``[N, D]`` unit-norm features of ``[N, H, W]`` bool masks from one image's dense map
    ``[1, D', h, w]``, by the backbone's
    :meth:`~retclip.backbones.base.Backbone.embed_segments`. Empty masks give all-zero rows."""
    with torch.inference_mode():
        mask_tensor = torch.from_numpy(masks).to(dense.device).unsqueeze(0)  # [1, N, H, W]
        embedded = backbone.embed_segments(dense, mask_tensor, mode=mode)[0]  # [N, D]
        empty = ~mask_tensor[0].flatten(1).any(1, keepdim=True)  # [N, 1]
        return F.normalize(embedded.float(), dim=-1).masked_fill(empty, 0.0)
