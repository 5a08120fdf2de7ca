"""The ``<stem>_*`` result files of one image: their one writer and their one reader.

:func:`write_outputs` writes, all or nothing, ``<stem>_panoptic.png`` (segment ids as
``R + 256·G + 256²·B``, panopticapi's encoding), ``<stem>_panoptic.json`` (COCO panoptic
annotation of the image plus its categories), ``<stem>_semantic.png`` (class indices, 255 = void;
16-bit with 65535 = void for 255 or more classes), ``<stem>_instances.json`` (COCO detection
results with RLE masks) and ``<stem>_overlay.png``; :func:`read_outputs` reads them back (the
evaluation of a ``retclip segment`` folder uses it). Records: :mod:`retclip.outputs.records`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retclip.errors import InputError
from retclip.files import read_json, temp_path
from retclip.images import id2rgb, png_bytes, read_label_png, read_panoptic_png
from retclip.outputs.drawing import render_overlay
from retclip.outputs.records import categories, instance_records, segment_record
from retclip.panoptic import PanopticPrediction, semantic_void_value

__all__ = ["OUTPUT_SUFFIXES", "ResultFiles", "output_paths", "read_outputs", "write_outputs"]

OUTPUT_SUFFIXES: dict[str, str] = {
    "panoptic_png": "_panoptic.png",
    "panoptic_json": "_panoptic.json",
    "semantic_png": "_semantic.png",
    "instances_json": "_instances.json",
    "overlay_png": "_overlay.png",
}


def _json_bytes(data: Any) -> bytes:
    return (json.dumps(data, indent=2, allow_nan=False) + "\n").encode("utf-8")


def _render_all(
    stem: str,
    image: np.ndarray,
    prediction: PanopticPrediction,
    masks: np.ndarray,
    class_names: Sequence[str],
    category_ids: Sequence[int],
    image_id: str | int,
    extra: Mapping[str, Any] | None,
) -> dict[str, bytes]:
    num_classes = len(class_names)
    if len(category_ids) != num_classes:
        raise ValueError(
            f"{len(category_ids)} category ids for {num_classes} class names; expected one each"
        )
    panoptic = np.asarray(prediction.panoptic)
    if image.shape[:2] != panoptic.shape or prediction.semantic.shape != panoptic.shape:
        raise ValueError(
            f"image {tuple(image.shape)}, panoptic {tuple(panoptic.shape)} and semantic "
            f"{tuple(prediction.semantic.shape)} sizes differ"
        )
    if masks.ndim != 3 or masks.shape[1:] != panoptic.shape:
        raise ValueError(f"expected masks [N, H, W] at image size, got {tuple(masks.shape)}")
    panoptic_json: dict[str, Any] = {
        "image_id": image_id,
        "file_name": f"{stem}_panoptic.png",
        "segments_info": [
            segment_record(s, class_names, category_ids) for s in prediction.segments
        ],
        "categories": categories(prediction, class_names, category_ids),
    }
    for key, value in (extra or {}).items():
        if key in panoptic_json:
            raise ValueError(f"extra key {key!r} would overwrite a panoptic JSON field")
        panoptic_json[key] = value

    instances = instance_records(prediction, masks, category_ids, image_id)

    void = semantic_void_value(num_classes)
    semantic = np.asarray(prediction.semantic)
    semantic_png = semantic.astype(np.uint8 if void == 255 else np.uint16)
    if semantic.size and (semantic.min() < 0 or semantic.max() > void):
        raise ValueError(f"semantic labels must lie in [0, {void}], got {semantic.max()}")
    overlay = render_overlay(image, panoptic, prediction.segments, class_names)
    return {
        "panoptic_png": png_bytes(id2rgb(panoptic)),
        "panoptic_json": _json_bytes(panoptic_json),
        "semantic_png": png_bytes(semantic_png),
        "instances_json": _json_bytes(instances),
        "overlay_png": png_bytes(overlay),
    }


def _prepare_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"output directory {out_dir} exists and is not a directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise InputError(f"cannot create output directory {out_dir}: {reason}") from error


def write_outputs(
    out_dir: Path,
    stem: str,
    image: np.ndarray,
    prediction: PanopticPrediction,
    masks: np.ndarray,
    class_names: Sequence[str],
    category_ids: Sequence[int],
    *,
    image_id: str | int | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write the five result files of one image, all or nothing.

    Everything is rendered in memory, written to temporary files in ``out_dir`` and then renamed
    into place; on any failure the temporary files (and any files already renamed) are removed,
    so no partial set remains.

    Args:
        out_dir: output directory, created if missing.
        stem: file name prefix (no directory separators).
        image: ``[H, W, 3]`` uint8 RGB input image.
        prediction: the image's results (see :func:`retclip.panoptic.postprocess`).
        masks: ``[N, H, W]`` bool proposal masks, indexed by ``Instance.mask_index``.
        class_names: ``[C]`` class names.
        category_ids: ``[C]`` dataset category ids written to the JSON files.
        image_id: COCO image id; defaults to ``stem``.
        extra: more top-level keys for the panoptic JSON (e.g. settings); must be JSON-able.

    Returns:
        Paths by key: ``panoptic_png``, ``panoptic_json``, ``semantic_png``, ``instances_json``,
        ``overlay_png``.

    Raises:
        InputError: ``out_dir`` is not a directory, cannot be created or is not writable, or
            ``stem`` is not a plain file name prefix.
    """
    out_dir = Path(out_dir)
    if not stem or stem in (".", "..") or "/" in stem or os.sep in stem or "\0" in stem:
        raise InputError(f"output name {stem!r} must be a non-empty file name without '/'")
    contents = _render_all(
        stem,
        np.asarray(image),
        prediction,
        np.asarray(masks),
        class_names,
        category_ids,
        stem if image_id is None else image_id,
        extra,
    )
    _prepare_dir(out_dir)
    targets = output_paths(out_dir, stem)
    temps: dict[str, Path] = {}
    placed: list[Path] = []
    try:
        for key, data in contents.items():
            temp = temp_path(targets[key])
            # os.open with 0o666 honours the umask (mkstemp would make the results 0600).
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            temps[key] = temp
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
        for key, temp in temps.items():
            os.replace(temp, targets[key])
            placed.append(targets[key])
    except BaseException as error:
        for path in [*temps.values(), *placed]:
            path.unlink(missing_ok=True)
        if isinstance(error, PermissionError):
            raise InputError(f"output directory {out_dir} is not writable") from error
        if isinstance(error, OSError):
            reason = error.strerror or type(error).__name__
            raise InputError(f"cannot write outputs to {out_dir}: {reason}") from error
        raise
    return targets


@dataclasses.dataclass
class ResultFiles:
    """The ``<stem>_*`` files of one image, read back.

    Attributes:
        panoptic: ``[H, W]`` int64 segment ids (0 = void).
        annotation: the panoptic JSON: ``segments_info`` (``records.segment_record`` entries),
            ``categories`` and the writer's extra keys.
        semantic: ``[H, W]`` int64 class positions in ``categories`` (void 255 or 65535), or
            ``None`` when the file is absent.
        instances: COCO detection results, or ``None`` when the file is absent.
    """

    panoptic: np.ndarray
    annotation: dict[str, Any]
    semantic: np.ndarray | None
    instances: list[dict[str, Any]] | None


def output_paths(out_dir: Path, stem: str) -> dict[str, Path]:
    """Where :func:`write_outputs` puts each file of ``stem``."""
    return {key: Path(out_dir) / f"{stem}{suffix}" for key, suffix in OUTPUT_SUFFIXES.items()}


def read_outputs(out_dir: str | Path, stem: str) -> ResultFiles:
    """Read the files :func:`write_outputs` wrote for ``stem`` (panoptic PNG and JSON required).

    Raises:
        InputError: a required file is missing, or a file is unreadable (it names the file).
    """
    paths = output_paths(Path(out_dir), stem)
    annotation = read_json(paths["panoptic_json"], "prediction JSON")
    if not isinstance(annotation, dict) or not isinstance(annotation.get("segments_info"), list):
        raise InputError(f"{paths['panoptic_json']} has no 'segments_info' list")
    instances = None
    if paths["instances_json"].is_file():
        instances = read_json(paths["instances_json"], "instances JSON")
        if not isinstance(instances, list):
            raise InputError(f"{paths['instances_json']} is not a COCO results list")
    semantic = None
    if paths["semantic_png"].is_file():
        semantic = read_label_png(paths["semantic_png"])
    return ResultFiles(read_panoptic_png(paths["panoptic_png"]), annotation, semantic, instances)
