"""Known pretrained models: short name → hub id, size, licence and kind (data only).

``retclip models`` lists these; ``--backbone NAME`` and the proposers accept the short names, and
any other Hugging Face hub id or local directory as well. Weights are never bundled: fetch them
once (``hf download <hub_id>``) and run with ``HF_HUB_OFFLINE=1`` (docs/models.md).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

ModelKind = Literal["backbone", "detector", "segmenter"]
ModelLibrary = Literal["transformers", "open_clip"]


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """One registered model.

    Attributes:
        name: the short name (``clip-b16``).
        hub_id: Hugging Face hub repository holding the weights.
        kind: ``backbone`` (dense CLIP features + text), ``detector`` (boxes from text) or
            ``segmenter`` (masks from prompts).
        library: which library loads it: ``transformers`` (``from_pretrained``) or ``open_clip``
            (``open_clip_config.json`` + weights in the hub repository).
        params_m: approximate parameter count in millions (all towers).
        licence: the licence of the released weights.
        description: one line for listings.
        dim: joint embedding dimension (backbones; 0 otherwise).
        resolution: default input resolution in pixels for retclip (backbones; 0 otherwise).
        dense_mode: default dense-feature mode (backbones; empty otherwise).
    """

    name: str
    hub_id: str
    kind: ModelKind
    library: ModelLibrary
    params_m: float
    licence: str
    description: str
    dim: int = 0
    resolution: int = 0
    dense_mode: str = ""

    def to_dict(self) -> dict[str, str | int | float]:
        return dataclasses.asdict(self)


MODELS: dict[str, ModelInfo] = {
    info.name: info
    for info in (
        ModelInfo(
            "clip-b16",
            "openai/clip-vit-base-patch16",
            "backbone",
            "transformers",
            150.0,
            "MIT",
            "OpenAI CLIP ViT-B/16 (the paper's ViT-base)",
            dim=512,
            resolution=448,
            dense_mode="value",
        ),
        ModelInfo(
            "clip-l14",
            "openai/clip-vit-large-patch14",
            "backbone",
            "transformers",
            428.0,
            "MIT",
            "OpenAI CLIP ViT-L/14 (the paper's ViT-large)",
            dim=768,
            resolution=448,
            dense_mode="value",
        ),
        ModelInfo(
            "convnext-l",
            "laion/CLIP-convnext_large_d_320.laion2B-s29B-b131K-ft-soup",
            "backbone",
            "open_clip",
            352.0,
            "MIT",
            "OpenCLIP ConvNeXt-L (convnext_large_d_320, laion2b_s29b_b131k_ft_soup; FC-CLIP's)",
            dim=768,
            resolution=800,
            dense_mode="trunk+head-after-pooling",
        ),
        ModelInfo(
            "rn50x64",
            "timm/resnet50x64_clip.openai",
            "backbone",
            "open_clip",
            623.0,
            "MIT",
            "OpenAI CLIP RN50x64 via OpenCLIP (FC-CLIP's ResNet variant)",
            dim=1024,
            resolution=800,
            dense_mode="trunk+masked-attention-pool",
        ),
        ModelInfo(
            "grounding-dino-base",
            "IDEA-Research/grounding-dino-base",
            "detector",
            "transformers",
            233.0,
            "Apache-2.0",
            "Grounding DINO (Swin-B), text-prompted boxes (Grounded-SAM's detector)",
        ),
        ModelInfo(
            "grounding-dino-tiny",
            "IDEA-Research/grounding-dino-tiny",
            "detector",
            "transformers",
            172.0,
            "Apache-2.0",
            "Grounding DINO (Swin-T), faster and less accurate",
        ),
        ModelInfo(
            "sam-vit-base",
            "facebook/sam-vit-base",
            "segmenter",
            "transformers",
            94.0,
            "Apache-2.0",
            "Segment Anything ViT-B (the paper's SAM)",
        ),
        ModelInfo(
            "sam2.1-hiera-tiny",
            "facebook/sam2.1-hiera-tiny",
            "segmenter",
            "transformers",
            38.9,
            "Apache-2.0",
            "SAM 2.1 Hiera-T, images only: the fast mask tier",
        ),
        ModelInfo(
            "sam2.1-hiera-small",
            "facebook/sam2.1-hiera-small",
            "segmenter",
            "transformers",
            46.0,
            "Apache-2.0",
            "SAM 2.1 Hiera-S, images only",
        ),
        ModelInfo(
            "sam2.1-hiera-base-plus",
            "facebook/sam2.1-hiera-base-plus",
            "segmenter",
            "transformers",
            80.8,
            "Apache-2.0",
            "SAM 2.1 Hiera-B+, images only",
        ),
        ModelInfo(
            "sam2.1-hiera-large",
            "facebook/sam2.1-hiera-large",
            "segmenter",
            "transformers",
            224.4,
            "Apache-2.0",
            "SAM 2.1 Hiera-L, images only",
        ),
        ModelInfo(
            "edgetam",
            "yonigozlan/EdgeTAM-hf",
            "segmenter",
            "transformers",
            13.9,
            "Apache-2.0",
            "EdgeTAM (RepViT-M1 + SAM 2 decoder; transformers' conversion), the fastest mask tier",
        ),
        ModelInfo(
            "owlv2",
            "google/owlv2-base-patch16-ensemble",
            "detector",
            "transformers",
            155.0,
            "Apache-2.0",
            "OWLv2 base/16 ensemble, text-prompted boxes (alternative detector)",
        ),
    )
}


def list_models(kind: ModelKind | None = None) -> list[ModelInfo]:
    """Registered models, in registration order; only those of ``kind`` if given."""
    return [info for info in MODELS.values() if kind is None or info.kind == kind]


def get_model_info(name: str) -> ModelInfo | None:
    """The entry registered under short ``name`` or with hub id ``name``, else ``None``."""
    if name in MODELS:
        return MODELS[name]
    return next((info for info in MODELS.values() if info.hub_id == name), None)
