"""Loading FC-CLIP's released checkpoints (``fcclip_cocopan.pth``) onto :class:`FCCLIP`.

The original is a detectron2 model; its checkpoint wraps the state dict under ``"model"``.
Keys are renamed by :data:`KEY_RULES` (first matching rule wins):

==========================================================  =====================================
original                                                    ours
==========================================================  =====================================
``backbone.clip_model.*``                                   ``clip_model.*``
``sem_seg_head.pixel_decoder.transformer.encoder.layers.i`` ``pixel_decoder.layers.i``
``sem_seg_head.pixel_decoder.transformer.level_embed``      ``pixel_decoder.level_embed``
``sem_seg_head.pixel_decoder.adapter_k.{weight,norm.*}``    ``pixel_decoder.lateral_convs.k-1.*``
``sem_seg_head.pixel_decoder.layer_k.{weight,norm.*}``      ``pixel_decoder.output_convs.k-1.*``
``sem_seg_head.pixel_decoder.*``                            ``pixel_decoder.*``
``sem_seg_head.predictor.transformer_self_attention_layers.i.{self_attn,norm}``
                                                            ``predictor.layers.i.{self_attn,self_norm}``
``sem_seg_head.predictor.transformer_cross_attention_layers.i.{multihead_attn,norm}``
                                                            ``predictor.layers.i.{cross_attn,cross_norm}``
``sem_seg_head.predictor.transformer_ffn_layers.i.{linear1,linear2,norm}``
                                                            ``predictor.layers.i.{linear1,linear2,ffn_norm}``
``sem_seg_head.predictor._mask_pooling_proj.*``             ``predictor.mask_pooling_proj.*``
``sem_seg_head.predictor.*``                                ``predictor.*``
``void_embedding.weight``                                   ``void_embedding.weight``
==========================================================  =====================================

``criterion.empty_weight`` (training only) and the normalisation buffers are ignored. Loading is
strict: any unmapped, missing or mis-shaped key fails with a :class:`ConversionReport` listing
them all.

The backbone is frozen in FC-CLIP, so the checkpoint's ``backbone.clip_model.*`` are OpenCLIP's
pretrained weights. retclip loads the backbone from OpenCLIP (shared by the proposal, the CLIP
and the retrieval paths, so database rows and queries live in one feature space) and *verifies*
the checkpoint's copy against it; :func:`convert_fcclip` writes only the FC-CLIP head unless asked
for the backbone too.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors.torch import load_file, save
from torch import nn

from retclip.errors import InputError
from retclip.fcclip.model import CONVNEXT_LARGE, FCCLIP, RN50X64, FCCLIPConfig
from retclip.files import atomic_writer

#: FC-CLIP variants: name → (OpenCLIP architecture, head config).
VARIANTS: dict[str, tuple[str, FCCLIPConfig]] = {
    "convnext-l": ("convnext_large_d_320", CONVNEXT_LARGE),
    "rn50x64": ("RN50x64", RN50X64),
}
BACKBONE_PREFIX = "clip_model."
FORMAT = "retclip-fcclip/1"

_Rule = tuple[re.Pattern[str], str | Callable[[re.Match[str]], str]]


def _conv_norm(target: str) -> Callable[[re.Match[str]], str]:
    """``<name>_k.weight`` → ``target.k-1.0.weight``; ``<name>_k.norm.x`` → ``target.k-1.1.x``."""

    def rename(match: re.Match[str]) -> str:
        index = int(match.group(1)) - 1
        rest = match.group(2)
        if rest.startswith("norm."):
            return f"pixel_decoder.{target}.{index}.1.{rest[len('norm.') :]}"
        return f"pixel_decoder.{target}.{index}.0.{rest}"

    return rename


_PD = r"sem_seg_head\.pixel_decoder\."
_PR = r"sem_seg_head\.predictor\."
_SA, _CA, _FF = (
    _PR + r"transformer_self_attention_layers\.(\d+)\.",
    _PR + r"transformer_cross_attention_layers\.(\d+)\.",
    _PR + r"transformer_ffn_layers\.(\d+)\.",
)
_PR_PLAIN = r"((?:decoder_norm|query_feat|query_embed|level_embed|mask_embed|class_embed)\..+)"
_CONV_NORM = r"_(\d+)\.(weight|norm\.weight|norm\.bias)"
_RULE_TABLE: list[tuple[str, str | Callable[[re.Match[str]], str]]] = [
    (r"backbone\.clip_model\.(.+)", r"clip_model.\1"),
    (_PD + r"transformer\.encoder\.layers\.(\d+)\.(.+)", r"pixel_decoder.layers.\1.\2"),
    (_PD + r"transformer\.level_embed", "pixel_decoder.level_embed"),
    (_PD + "adapter" + _CONV_NORM, _conv_norm("lateral_convs")),
    (_PD + "layer" + _CONV_NORM, _conv_norm("output_convs")),
    (_PD + r"((?:input_proj|mask_features)\..+)", r"pixel_decoder.\1"),
    (_SA + r"self_attn\.(.+)", r"predictor.layers.\1.self_attn.\2"),
    (_SA + r"norm\.(.+)", r"predictor.layers.\1.self_norm.\2"),
    (_CA + r"multihead_attn\.(.+)", r"predictor.layers.\1.cross_attn.\2"),
    (_CA + r"norm\.(.+)", r"predictor.layers.\1.cross_norm.\2"),
    (_FF + r"(linear[12]\..+)", r"predictor.layers.\1.\2"),
    (_FF + r"norm\.(.+)", r"predictor.layers.\1.ffn_norm.\2"),
    (_PR + r"_mask_pooling_proj\.(.+)", r"predictor.mask_pooling_proj.\1"),
    (_PR + _PR_PLAIN, r"predictor.\1"),
    (_PR + r"(logit_scale)", r"predictor.\1"),
    (r"void_embedding\.weight", "void_embedding.weight"),
]
#: Original key → our key, first match wins.
KEY_RULES: list[_Rule] = [(re.compile(pattern), target) for pattern, target in _RULE_TABLE]
#: Original keys that inference does not use.
IGNORED_KEYS = re.compile(r"criterion\..*|pixel_mean|pixel_std|backbone\.clip_model\.attn_mask")


def map_key(key: str) -> str | None:
    """Our name for the original ``key``, or ``None`` if no rule matches."""
    for pattern, target in KEY_RULES:
        match = pattern.fullmatch(key)
        if match:
            return target(match) if callable(target) else match.expand(target)
    return None


@dataclasses.dataclass
class ConversionReport:
    """What mapping a checkpoint onto the model found.

    Attributes:
        loaded: number of tensors mapped onto the model.
        missing: our keys the checkpoint does not provide.
        unexpected: checkpoint keys no rule maps, or mapped to a key we do not have.
        mismatched: ``(our key, expected shape, checkpoint shape)``.
        ignored: checkpoint keys deliberately skipped (training-only).
        backbone_max_diff: largest absolute difference between the checkpoint's backbone and the
            OpenCLIP weights in use, when verified (``None`` otherwise).
    """

    loaded: int = 0
    missing: list[str] = dataclasses.field(default_factory=list)
    unexpected: list[str] = dataclasses.field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = dataclasses.field(
        default_factory=list
    )
    ignored: list[str] = dataclasses.field(default_factory=list)
    backbone_max_diff: float | None = None

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def format(self, limit: int = 20) -> str:
        """A readable multi-line summary (at most ``limit`` keys per list)."""

        def listing(title: str, items: list[str]) -> list[str]:
            if not items:
                return []
            shown = [f"    {item}" for item in items[:limit]]
            if len(items) > limit:
                shown.append(f"    ... and {len(items) - limit} more")
            return [f"  {title} ({len(items)}):", *shown]

        lines = [f"loaded {self.loaded} tensors"]
        if self.backbone_max_diff is not None:
            lines.append(
                f"  backbone vs OpenCLIP weights: max |diff| = {self.backbone_max_diff:.3g}"
            )
        lines += listing("missing from the checkpoint", self.missing)
        lines += listing("unexpected in the checkpoint", self.unexpected)
        lines += listing(
            "shape mismatches (ours vs checkpoint)",
            [f"{k}: {list(a)} vs {list(b)}" for k, a, b in self.mismatched],
        )
        lines += listing("ignored (training only)", self.ignored)
        return "\n".join(lines)


class CheckpointError(InputError):
    """A checkpoint that does not fit the model; ``report`` says how."""

    def __init__(self, message: str, report: ConversionReport) -> None:
        super().__init__(f"{message}\n{report.format()}")
        self.report = report


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The original's state dict from ``path`` (unwrapping detectron2's ``"model"``)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"FC-CLIP checkpoint not found: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for foreign pickles
        raise InputError(f"cannot read FC-CLIP checkpoint {path}: {exc}") from None
    if isinstance(data, Mapping) and "model" in data:
        data = data["model"]
    if not isinstance(data, Mapping):
        raise InputError(
            f"{path}: expected a state dict (under 'model'), got {type(data).__name__}"
        )
    return {
        str(k): torch.as_tensor(v) if isinstance(v, np.ndarray) else v
        for k, v in data.items()
        if isinstance(v, torch.Tensor | np.ndarray)
    }


def map_state_dict(
    state: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Rename the original's keys: ``(ours, unmapped original keys, ignored original keys)``."""
    mapped: dict[str, torch.Tensor] = {}
    unexpected, ignored = [], []
    for key, value in state.items():
        if IGNORED_KEYS.fullmatch(key):
            ignored.append(key)
            continue
        target = map_key(key)
        if target is None:
            unexpected.append(key)
        else:
            mapped[target] = value
    return mapped, unexpected, ignored


def check_state(
    expected: Mapping[str, tuple[int, ...]],
    state: Mapping[str, torch.Tensor],
    report: ConversionReport,
) -> None:
    """Compare ``state`` (our names) with ``expected`` shapes, filling ``report``."""
    report.missing += sorted(set(expected) - set(state))
    report.unexpected += sorted(set(state) - set(expected))
    for key in sorted(set(expected) & set(state)):
        got = tuple(state[key].shape)
        if got != tuple(expected[key]):
            report.mismatched.append((key, tuple(expected[key]), got))
    report.loaded = len(set(expected) & set(state)) - len(report.mismatched)


def head_shapes(config: FCCLIPConfig) -> dict[str, tuple[int, ...]]:
    """Our head keys (everything but ``clip_model.*``) and shapes for ``config``, built on the
    meta device (no memory, no weights)."""
    with torch.device("meta"):
        model = FCCLIP(config, _NoClip(config.embed_dim))
    return {
        k: tuple(v.shape)
        for k, v in model.state_dict().items()
        if not k.startswith(BACKBONE_PREFIX)
    }


class _NoClip(nn.Module):
    """A stand-in CLIP with a ConvNeXt-like ``visual.trunk`` and no parameters (shapes only)."""

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.visual = nn.Module()
        self.visual.trunk = nn.Module()
        self.embed_dim = embed_dim


def load_fcclip_weights(
    model: FCCLIP,
    state: Mapping[str, torch.Tensor],
    *,
    backbone: Literal["load", "verify", "skip"] = "verify",
    atol: float = 1e-6,
) -> ConversionReport:
    """Load the original's ``state`` (its key names) into ``model``, strictly.

    Args:
        model: the model to fill.
        state: the original's state dict (from :func:`read_checkpoint`) or an already converted
            one (our names: see :func:`load_converted`).
        backbone: ``"load"`` copies ``backbone.clip_model.*`` into ``model.clip_model``;
            ``"verify"`` requires them to equal the weights already there (within ``atol``)
            so that retclip's other paths share the backbone; ``"skip"`` ignores them.
            Checkpoints without backbone keys pass ``"verify"`` and ``"skip"``.
        atol: tolerance of ``"verify"``.

    Raises:
        CheckpointError: unmapped, missing or mis-shaped keys, or a backbone that differs.
    """
    if any(k.startswith(("sem_seg_head.", "backbone.")) for k in state):
        mapped, unexpected, ignored = map_state_dict(state)
    else:
        mapped, unexpected, ignored = dict(state), [], []
    report = ConversionReport(unexpected=unexpected, ignored=ignored)
    ours = model.state_dict()
    head = {k: v for k, v in mapped.items() if not k.startswith(BACKBONE_PREFIX)}
    clip = {k: v for k, v in mapped.items() if k.startswith(BACKBONE_PREFIX)}
    expected_head = {
        k: tuple(v.shape) for k, v in ours.items() if not k.startswith(BACKBONE_PREFIX)
    }
    check_state(expected_head, head, report)
    expected_clip = {k: tuple(v.shape) for k, v in ours.items() if k.startswith(BACKBONE_PREFIX)}
    if clip and backbone != "skip":
        clip_report = ConversionReport()
        check_state(expected_clip, clip, clip_report)
        report.missing += clip_report.missing
        report.unexpected += clip_report.unexpected
        report.mismatched += clip_report.mismatched
        report.loaded += clip_report.loaded
    if not report.ok:
        raise CheckpointError("the FC-CLIP checkpoint does not fit the model:", report)
    with torch.no_grad():
        for key, value in head.items():
            ours[key].copy_(value)
        if clip and backbone == "load":
            for key, value in clip.items():
                ours[key].copy_(value)
        elif clip and backbone == "verify":
            report.backbone_max_diff = max(
                float((ours[k].float() - v.to(ours[k].device).float()).abs().max())
                if v.numel()
                else 0.0
                for k, v in clip.items()
            )
            if report.backbone_max_diff > atol:
                raise CheckpointError(
                    "the checkpoint's CLIP backbone differs from the OpenCLIP weights in use, so "
                    "FC-CLIP's features would not match the database's; load the matching "
                    "--backbone or pass backbone='load'",
                    report,
                )
    return report


def save_converted(
    path: str | Path,
    state: Mapping[str, torch.Tensor],
    *,
    variant: str,
    source: str = "",
) -> Path:
    """Write ``state`` (our names) as safetensors with ``variant`` and ``source`` metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    metadata = {"format": FORMAT, "variant": variant, "source": source}
    with atomic_writer(path) as handle:
        handle.write(save(tensors, metadata=metadata))
    return path


def load_converted(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(state with our names, metadata)`` of a file written by :func:`convert_fcclip`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(f"converted FC-CLIP weights not found: {path}")
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
    if metadata.get("format") != FORMAT:
        raise InputError(
            f"{path} is not a converted FC-CLIP file (format {metadata.get('format')!r}); "
            "run `retclip convert-fcclip` on the original .pth first"
        )
    return load_file(str(path)), metadata


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from an original ``.pth`` (original names) or a converted ``.safetensors``."""
    if Path(path).suffix == ".safetensors":
        return load_converted(path)[0]
    return read_checkpoint(path)


def convert_fcclip(
    checkpoint: str | Path,
    output: str | Path,
    *,
    variant: str = "convnext-l",
    include_backbone: bool = False,
) -> ConversionReport:
    """``retclip convert-fcclip``: the original ``.pth`` → our names in ``.safetensors``.

    The head's keys and shapes are checked strictly against ``variant``'s architecture
    (``convnext-l`` for ``fcclip_cocopan.pth``, ``rn50x64``); the backbone's keys are counted and,
    with ``include_backbone``, written too (by default retclip loads the backbone from OpenCLIP
    and verifies the copy at load time).

    Raises:
        CheckpointError: the checkpoint does not fit ``variant`` (the report lists every key).
    """
    if variant not in VARIANTS:
        raise InputError(f"unknown FC-CLIP variant {variant!r}: expected one of {sorted(VARIANTS)}")
    state = read_checkpoint(checkpoint)
    mapped, unexpected, ignored = map_state_dict(state)
    report = ConversionReport(unexpected=unexpected, ignored=ignored)
    head = {k: v for k, v in mapped.items() if not k.startswith(BACKBONE_PREFIX)}
    check_state(head_shapes(VARIANTS[variant][1]), head, report)
    clip = {k: v for k, v in mapped.items() if k.startswith(BACKBONE_PREFIX)}
    if not clip and include_backbone:
        report.missing.append("backbone.clip_model.* (no backbone in the checkpoint)")
    if not report.ok:
        raise CheckpointError(
            f"{checkpoint} does not fit FC-CLIP {variant!r} (keys in our names):", report
        )
    written = {**head, **(clip if include_backbone else {})}
    report.loaded = len(written)
    save_converted(output, written, variant=variant, source=Path(checkpoint).name)
    return report


__all__ = [
    "KEY_RULES",
    "VARIANTS",
    "CheckpointError",
    "ConversionReport",
    "convert_fcclip",
    "head_shapes",
    "load_converted",
    "load_fcclip_weights",
    "load_weights",
    "map_key",
    "map_state_dict",
    "read_checkpoint",
    "save_converted",
]
