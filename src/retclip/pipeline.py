"""One assembly point: a typed description of a pipeline, and the one builder of it.

``retclip segment``, ``eval``, ``db build``/``add``, ``serve`` and the demo each describe what
they run as a :class:`ModelSpec` (backbone, proposer and their options) and, for segmenting, a
:class:`PipelineSpec` (the models plus databases, ``k``, pooling, training vocabulary and the merge
:class:`~retclip.settings.Settings`), and build it here: :meth:`ModelSpec.load` and
:func:`build_segmenter`. Defaults live on the fields; the command-line option groups are generated
from them (:mod:`retclip.cli.options`), so each default is written once. Two rules that used to be
special cases in every caller live here too: ``--proposer fcclip`` implies FC-CLIP's input recipe
and binarised pooling, and COCO-133 as its training vocabulary.

This module imports no model library; building does, when called.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from retclip.errors import InputError
from retclip.settings import DEFAULT_K, Settings

if TYPE_CHECKING:
    from retclip.backbones.base import Backbone
    from retclip.database import FeatureDatabase
    from retclip.proposers.base import MaskProposer
    from retclip.segmenter import Segmenter

__all__ = ["ModelSpec", "PipelineSpec", "build_segmenter", "spec_error"]

#: ``recipe`` → the OpenCLIP backbones' ``preprocessing``.
RECIPES = {"retclip": "grid", "fcclip": "fcclip"}
#: FC-CLIP's training vocabulary: its classes are "seen" (weight α) with ``--proposer fcclip``.
FCCLIP_TRAIN_VOCAB = "coco-panoptic-133"


def _cli(flag: str | None = None, **extra: Any) -> dict[str, Any]:
    """Command-line metadata of a field: its flag when not ``--field-name``, short flags."""
    return {"cli": {"flag": flag, **extra}}


class ModelSpec(BaseModel):
    """The models of a pipeline: a backbone, an optional proposer, and their options.

    ``None`` means "the model's own default". Options a proposer does not take are refused when
    it is built (``retclip.proposers.load_proposer``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    backbone: str = Field(
        description="color, toy, clip-b16, clip-l14, convnext-l, rn50x64, a hub id or a folder."
    )
    resolution: int | None = Field(None, ge=1, description="Backbone input short side in pixels.")
    dense_mode: Literal["value", "tokens"] | None = Field(
        None, description="CLIP ViT dense features."
    )
    recipe: Literal["retclip", "fcclip"] | None = Field(
        None,
        description="Input recipe of OpenCLIP backbones: fcclip = FC-CLIP's resize (800/1333) "
        "and padding [default: fcclip with --proposer fcclip, else retclip].",
    )
    dtype: Literal["float32", "float16", "bfloat16"] | None = Field(
        None, description="Model weights' dtype (half precision on CUDA only)."
    )
    device: str = Field("auto", description="auto (CUDA if available), cpu, cuda:N.")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        description="Autocast of the model passes: bf16/fp16 on CUDA, bf16 on CPU too; outputs "
        "stay float32.",
    )
    compile: bool = Field(
        False,
        description="torch.compile the backbone's image tower and SAM's image encoder (a warning "
        "and eager mode where compiling fails).",
    )
    batch_size: int = Field(
        1,
        ge=1,
        le=4096,
        description="Images per model batch (detector, mask model and backbone).",
    )
    proposer: str | None = Field(
        None, description="gt, regions, grounded-sam, owl-sam, sam-grid or fcclip."
    )
    gt_json: Path | None = Field(
        None,
        description="COCO-panoptic JSON with ground-truth masks (for --proposer gt).",
        json_schema_extra=_cli("--gt"),
    )
    gt_masks: Path | None = Field(
        None, description="Folder of its panoptic PNGs [default: the JSON path without .json]."
    )
    detector: str | None = Field(
        None, description="Detector of grounded-sam / owl-sam (name or hub id)."
    )
    sam: str | None = Field(None, description="SAM model of the SAM-based proposers.")
    box_threshold: float | None = Field(None, description="Detector box score threshold.")
    text_threshold: float | None = Field(None, description="Grounding DINO text threshold.")
    nms_iou: float | None = Field(None, description="Per-class box NMS IoU.")
    min_mask_area: float | None = Field(
        None, description="Smallest mask kept (pixels; regions: a fraction)."
    )
    mask_nms_iou: float | None = Field(None, description="Duplicate-mask NMS IoU.")
    points_per_side: int | None = Field(None, description="sam-grid: points per image side.")
    points_per_batch: int | None = Field(None, description="sam-grid: prompts per decoder call.")
    pred_iou_threshold: float | None = Field(None, description="sam-grid: predicted-IoU filter.")
    stability_threshold: float | None = Field(None, description="sam-grid: stability filter.")
    fcclip_checkpoint: Path | None = Field(
        None, description="fcclip: fcclip_cocopan.pth or its converted .safetensors."
    )
    fcclip_config: Path | None = Field(
        None,
        description="fcclip: JSON of the head's architecture (FCCLIPConfig fields) [default: "
        "the released model's for the backbone].",
    )

    #: Fields that configure the proposer, → ``load_proposer`` keyword.
    PROPOSER_KEYWORDS: ClassVar[dict[str, str]] = {
        "detector": "detector",
        "sam": "sam",
        "box_threshold": "box_threshold",
        "text_threshold": "text_threshold",
        "nms_iou": "nms_iou",
        "min_mask_area": "min_area",
        "mask_nms_iou": "mask_nms_iou",
        "points_per_side": "points_per_side",
        "points_per_batch": "points_per_batch",
        "pred_iou_threshold": "pred_iou_threshold",
        "stability_threshold": "stability_threshold",
        "fcclip_checkpoint": "checkpoint",
        "fcclip_config": "config",
    }

    def resolved(self) -> ModelSpec:
        """This spec with the recipe the proposer implies filled in (``fcclip`` for FC-CLIP,
        whose proposer shares the backbone and its features; else ``retclip``)."""
        if self.proposer == "fcclip":
            if self.recipe not in (None, "fcclip"):
                raise InputError(
                    "--proposer fcclip uses FC-CLIP's input recipe; drop --recipe "
                    f"{self.recipe} (or use --recipe fcclip)"
                )
            return self.model_copy(update={"recipe": "fcclip"})
        return self if self.recipe else self.model_copy(update={"recipe": "retclip"})

    def description(self) -> dict[str, Any]:
        """The options that decide the models' outputs, JSON-ready (for caches and build ids)."""
        spec = self.resolved()
        # batching and compiling do not change outputs; fp32 keeps the earlier description
        exclude = {"device", "gt_json", "gt_masks", "compile", "batch_size"}
        if spec.precision == "fp32":
            exclude.add("precision")
        data = spec.model_dump(mode="json", exclude=exclude)
        if spec.recipe == "retclip":  # the default recipe keeps its earlier description
            data["recipe"] = None
        return data

    def load_backbone(self) -> Backbone:
        """The backbone this spec describes (built once per process and options)."""
        from retclip.backbones import load_backbone, resolve_device

        spec = self.resolved()
        options: dict[str, Any] = {}
        for name in ("resolution", "dense_mode", "dtype"):
            if getattr(spec, name) is not None:
                options[name] = getattr(spec, name)
        if spec.recipe == "fcclip":
            options["preprocessing"] = RECIPES["fcclip"]
        backbone = load_backbone(spec.backbone, resolve_device(spec.device), **options)
        if spec.compile:
            backbone.compile_image_tower()
        return backbone

    def load_proposer(self, backbone: Backbone, *, strict: bool = True) -> MaskProposer | None:
        """The proposer this spec names (``None`` if none), built on ``backbone`` where it
        shares one (FC-CLIP). ``strict=False`` leaves out options the proposer does not take
        (a server's options serve several proposers) instead of refusing them."""
        from retclip.backbones import resolve_device
        from retclip.proposers import load_proposer
        from retclip.proposers.registry import MODEL_PROPOSERS, accepted_options

        if self.proposer is None:
            return None
        options: dict[str, Any] = {
            keyword: getattr(self, name)
            for name, keyword in self.PROPOSER_KEYWORDS.items()
            if getattr(self, name) is not None
        }
        if not strict:
            accepted = accepted_options(self.proposer)
            options = {k: v for k, v in options.items() if k in accepted}
        if self.proposer in MODEL_PROPOSERS:
            options.update(device=resolve_device(self.device), dtype=self.dtype)
        if self.proposer == "fcclip":
            options["backbone"] = backbone  # one ConvNeXt for proposals and classification
        proposer = load_proposer(
            self.proposer, gt_json=self.gt_json, gt_masks=self.gt_masks, **options
        )
        sam = getattr(proposer, "sam", None)
        if self.compile and sam is not None and hasattr(sam, "compile_encoder"):
            sam.compile_encoder()  # the mask model's image encoder too
        return proposer

    def load(self) -> tuple[Backbone, MaskProposer | None]:
        """The backbone and proposer (``None`` if not named) this spec describes."""
        backbone = self.load_backbone()
        return backbone, self.load_proposer(backbone)


class PipelineSpec(BaseModel):
    """Everything :func:`build_segmenter` needs: the models, retrieval and the merge settings."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    model: ModelSpec
    db: Path | None = Field(None, description="Feature database for s_ret.")
    fallback_db: Path | None = Field(
        None, description="Database for the classes the primary one lacks."
    )
    k: int = Field(
        DEFAULT_K,
        ge=1,
        le=2**31 - 1,
        description="Neighbours retrieved.",
        json_schema_extra=_cli("--k", short="-k"),
    )
    pooling: Literal["soft", "binary"] | None = Field(
        None,
        description="Mask pooling of the queries [default: binary with --proposer fcclip, else "
        "soft]; a database refuses queries pooled otherwise than its rows.",
    )
    train_vocab: str | None = Field(
        None,
        description="Training vocabulary of the proposer: its classes are 'seen' (weight "
        "alpha) [default: coco-panoptic-133 with --proposer fcclip].",
    )
    settings: Settings = Field(default_factory=Settings)

    @field_validator("settings", mode="before")
    @classmethod
    def _settings(cls, value: Any) -> Any:
        return Settings(**value) if isinstance(value, dict) else value

    def resolved(self) -> PipelineSpec:
        """Defaults that depend on the models filled in: the recipe, FC-CLIP's pooling rule and
        training vocabulary. Asking FC-CLIP for another pooling is an error."""
        model = self.model.resolved()
        pooling = self.pooling
        if model.proposer == "fcclip" and pooling not in (None, "binary"):
            raise InputError(
                f"--proposer fcclip pools segments with FC-CLIP's binarised rule; --pooling "
                f"{pooling} cannot apply (drop it, or use --pooling binary)"
            )
        if pooling is None:
            pooling = "binary" if model.recipe == "fcclip" else "soft"
        train_vocab = self.train_vocab
        if train_vocab is None and model.proposer == "fcclip":
            train_vocab = FCCLIP_TRAIN_VOCAB
        return self.model_copy(
            update={"model": model, "pooling": pooling, "train_vocab": train_vocab}
        )

    def description(self) -> dict[str, Any]:
        """What decides the per-mask scores, JSON-ready (the evaluation cache's key)."""
        spec = self.resolved()

        def path(value: Path | None) -> str | None:
            return str(Path(value).resolve()) if value else None

        return {
            **spec.model.description(),
            "gt": path(spec.model.gt_json) if spec.model.proposer == "gt" else None,
            "db": path(spec.db),
            "fallback_db": path(spec.fallback_db),
            "k": spec.k,
            "pooling": spec.pooling,
        }


def build_segmenter(
    spec: PipelineSpec,
    *,
    models: tuple[Backbone, MaskProposer] | None = None,
    database: FeatureDatabase | None = None,
) -> Segmenter:
    """The :class:`~retclip.segmenter.Segmenter` ``spec`` describes.

    ``models`` are already loaded models of ``spec.model`` to use instead of loading them, and
    ``database`` an already opened primary database instead of ``spec.db`` (a server shares its
    models between requests and reads database snapshots); the spec must name a proposer.
    """
    from retclip.segmenter import Segmenter

    spec = spec.resolved()
    if models is None:
        backbone, proposer = spec.model.load()
    else:
        backbone, proposer = models
    if proposer is None:
        raise InputError("a segmenter needs a proposer: give --proposer")
    return Segmenter(
        backbone,
        proposer,
        db=database if database is not None else spec.db,
        fallback_db=spec.fallback_db,
        train_vocab=spec.train_vocab,
        k=spec.k,
        pooling=spec.pooling,
        device=backbone.device,
        settings=spec.settings,
        precision=spec.model.precision,
    )


def spec_error(error: ValidationError) -> InputError:
    """A pydantic validation error as one line naming the option and what was expected."""
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "value"
        parts.append(f"{where}: {item['msg']}")
    return InputError("invalid options: " + "; ".join(parts))
