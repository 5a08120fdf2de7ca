"""Pieces shared by every ``retclip`` command: clean error reporting, the option groups for
models, retrieval and the ensemble, and building the backbone and proposer they describe.

Commands in other modules (``retclip eval``, ``retclip serve``) use the same groups, so one option
means the same thing everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from retclip.errors import InputError, RetclipError


def _clean_errors(invoke: Callable[[click.Context], Any], ctx: click.Context) -> Any:
    try:
        return invoke(ctx)
    except RetclipError as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        raise click.ClickException("interrupted") from None


class CleanErrorsGroup(click.Group):
    """A group whose :class:`RetclipError` ends as one ``Error: ...`` line and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        return _clean_errors(super().invoke, ctx)


class CleanErrorsCommand(click.Command):
    """A command whose :class:`RetclipError` ends as one ``Error: ...`` line and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        return _clean_errors(super().invoke, ctx)


def with_options(options: Sequence[Callable[[Any], Any]]) -> Callable[[Any], Any]:
    """Apply a list of click options to a command, in list order."""

    def decorate(func: Any) -> Any:
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


def check_output_dir(out: Path) -> None:
    """Fail before any model work if ``out`` cannot be created or written."""
    if out.exists() and not out.is_dir():
        raise InputError(f"output path {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".retclip-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise InputError(f"output directory {out} is not writable: {exc.strerror}") from None


#: Backbone options: CLI name → ``load_backbone`` keyword (``None`` = the backbone's default).
BACKBONE_OPTIONS = {
    "resolution": "resolution",
    "dense_mode": "dense_mode",
    "recipe": "preprocessing",
}
#: ``--combine`` values (``retclip.scores.ensemble.COMBINE_MODES``, kept free of torch imports).
COMBINE_MODES = ("linear", "fcclip")
#: ``--recipe`` values → the OpenCLIP backbones' ``preprocessing``.
RECIPES = {"retclip": "grid", "fcclip": "fcclip"}
#: Proposer options: CLI name → ``load_proposer`` keyword (``None`` = the proposer's default).
PROPOSER_OPTIONS = {
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


def model_options(*, backbone_required: bool = True) -> list[Callable[[Any], Any]]:
    """``--backbone`` and its settings, the proposer settings, ``--dtype`` and ``--device``."""
    return [
        click.option(
            "--backbone",
            required=backbone_required,
            help="color, toy, clip-b16, clip-l14, convnext-l, rn50x64, a hub id or a folder.",
        ),
        click.option("--resolution", type=int, help="Backbone input short side in pixels."),
        click.option(
            "--recipe",
            type=click.Choice(sorted(RECIPES)),
            help="Input recipe of OpenCLIP backbones: fcclip = FC-CLIP's resize (800/1333) and "
            "padding [default: fcclip with --proposer fcclip, else retclip].",
        ),
        click.option(
            "--dense-mode", type=click.Choice(["value", "tokens"]), help="CLIP ViT dense features."
        ),
        click.option(
            "--gt",
            "gt_json",
            type=click.Path(path_type=Path),
            help="COCO-panoptic JSON with ground-truth masks (for --proposer gt).",
        ),
        click.option(
            "--gt-masks",
            type=click.Path(path_type=Path),
            help="Folder of its panoptic PNGs [default: the JSON path without .json].",
        ),
        click.option("--detector", help="Detector of grounded-sam / owl-sam (name or hub id)."),
        click.option("--sam", help="SAM model of the SAM-based proposers (name or hub id)."),
        click.option("--box-threshold", type=float, help="Detector box score threshold."),
        click.option("--text-threshold", type=float, help="Grounding DINO text threshold."),
        click.option("--nms-iou", type=float, help="Per-class box NMS IoU."),
        click.option(
            "--min-mask-area", type=float, help="Smallest mask kept (pixels; regions: a fraction)."
        ),
        click.option("--mask-nms-iou", type=float, help="Duplicate-mask NMS IoU."),
        click.option("--points-per-side", type=int, help="sam-grid: points per image side."),
        click.option("--points-per-batch", type=int, help="sam-grid: prompts per decoder call."),
        click.option("--pred-iou-threshold", type=float, help="sam-grid: predicted-IoU filter."),
        click.option("--stability-threshold", type=float, help="sam-grid: stability filter."),
        click.option(
            "--fcclip-checkpoint",
            type=click.Path(path_type=Path),
            help="fcclip: fcclip_cocopan.pth or its converted .safetensors.",
        ),
        click.option(
            "--fcclip-config",
            type=click.Path(path_type=Path),
            help="fcclip: JSON of the head's architecture (FCCLIPConfig fields) [default: the "
            "released model's for the backbone].",
        ),
        click.option(
            "--dtype",
            type=click.Choice(["float32", "float16", "bfloat16"]),
            help="Model weights' dtype (half precision on CUDA only).",
        ),
        click.option(
            "--device",
            default="auto",
            show_default=True,
            help="auto (CUDA if available), cpu, cuda:N.",
        ),
    ]


retrieval_options = [
    click.option("--db", type=click.Path(path_type=Path), help="Feature database for s_ret."),
    click.option(
        "--fallback-db",
        type=click.Path(path_type=Path),
        help="Database for the classes the primary one lacks.",
    ),
    click.option("-k", "--k", "k", default=10, show_default=True, help="Neighbours retrieved."),
    click.option(
        "--pooling",
        type=click.Choice(["soft", "binary"]),
        help="Mask pooling of the queries [default: binary with --proposer fcclip, else soft].",
    ),
]
ensemble_options = [
    click.option("--alpha", default=0.4, show_default=True, help="Weight of s_oov, seen classes."),
    click.option("--beta", default=0.7, show_default=True, help="Weight of s_oov, unseen classes."),
    click.option("--gamma", default=0.3, show_default=True, help="Weight of s_ret within s_oov."),
    click.option(
        "--combine",
        type=click.Choice(list(COMBINE_MODES)),
        default="linear",
        show_default=True,
        help="linear: the paper's ensemble; fcclip: FC-CLIP's renormalised geometric one.",
    ),
    click.option("--score-threshold", default=0.0, show_default=True, help="Panoptic merge."),
    click.option("--overlap-threshold", default=0.8, show_default=True, help="Panoptic merge."),
    click.option(
        "--max-instances",
        default=100,
        show_default=True,
        help="Instance results: top-k (mask, class) pairs (FC-CLIP's DETECTIONS_PER_IMAGE).",
    ),
]
#: The ensemble option names, as :class:`retclip.segmenter.Settings` fields.
ENSEMBLE_FIELDS = (
    "alpha",
    "beta",
    "gamma",
    "combine",
    "score_threshold",
    "overlap_threshold",
    "max_instances",
)


def resolve_recipe(proposer: str | None, options: dict[str, Any]) -> None:
    """Fill ``options["recipe"]`` (and ``"pooling"`` where present) for ``proposer``.

    ``--proposer fcclip`` shares its backbone and its segment features with the segmenter, so
    it implies FC-CLIP's recipe (``--recipe fcclip``) and FC-CLIP's binarised pooling; asking for
    another recipe or pooling with it is an error. Elsewhere the defaults are ``retclip``/soft.
    """
    if proposer == "fcclip":
        if options.get("recipe") not in (None, "fcclip"):
            raise InputError(
                "--proposer fcclip uses FC-CLIP's input recipe; drop --recipe "
                f"{options['recipe']} (or use --recipe fcclip)"
            )
        options["recipe"] = "fcclip"
        if options.get("pooling") not in (None, "binary"):
            raise InputError(
                f"--proposer fcclip pools segments with FC-CLIP's binarised rule; --pooling "
                f"{options['pooling']} cannot apply (drop it, or use --pooling binary)"
            )
    if "pooling" in options and options["pooling"] is None:
        options["pooling"] = "binary" if options.get("recipe") == "fcclip" else "soft"


def model_description(proposer: str | None, options: dict[str, Any]) -> dict[str, Any]:
    """The options that decide a model's outputs (for caches and build ids), JSON-ready."""
    keys = ["backbone", *BACKBONE_OPTIONS, "dtype", *PROPOSER_OPTIONS]
    return {"proposer": proposer, **{k: options.get(k) for k in keys}}


def load_models(proposer: str | None, options: dict[str, Any]) -> tuple[Any, Any]:
    """The backbone and proposer (``None`` if not named) that the model options describe."""
    from retclip.backbones import load_backbone, resolve_device
    from retclip.proposers import load_proposer
    from retclip.proposers.registry import MODEL_PROPOSERS

    device = resolve_device(options["device"])
    resolve_recipe(proposer, options)
    backbone_kwargs = {
        keyword: options[name] for name, keyword in BACKBONE_OPTIONS.items() if options[name]
    }
    if "preprocessing" in backbone_kwargs:
        backbone_kwargs["preprocessing"] = RECIPES[backbone_kwargs["preprocessing"]]
    if options["dtype"]:
        backbone_kwargs["dtype"] = options["dtype"]
    backbone = load_backbone(options["backbone"], device, **backbone_kwargs)
    if proposer is None:
        return backbone, None
    proposer_kwargs = {
        keyword: options[name]
        for name, keyword in PROPOSER_OPTIONS.items()
        if options[name] is not None
    }
    if proposer in MODEL_PROPOSERS:
        proposer_kwargs.update(device=device, dtype=options["dtype"])
    if proposer == "fcclip":
        proposer_kwargs["backbone"] = backbone  # one ConvNeXt for proposals and classification
    built = load_proposer(
        proposer, gt_json=options["gt_json"], gt_masks=options["gt_masks"], **proposer_kwargs
    )
    return backbone, built
