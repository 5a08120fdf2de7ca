"""COCO-compatible records of one result, built in one place for every consumer.

The output files (``<stem>_panoptic.json``, ``<stem>_instances.json``), the server's JSON and
anything else that reports segments use these functions, so a segment is described the same way
everywhere: panopticapi's ``segments_info`` entry (``id``, ``category_id``, ``isthing``,
``iscrowd``, ``area``, ``bbox`` XYWH) plus ``category_name`` and ``score``; instances are COCO
detection results with an RLE ``segmentation``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_util

from retclip.panoptic import PanopticPrediction, Segment

__all__ = ["categories", "category_flags", "encode_rle", "instance_records", "segment_record"]


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO RLE of an ``[H, W]`` mask: ``{"size": [H, W], "counts": str}`` (JSON-safe)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"expected an [H, W] mask, got shape {tuple(mask.shape)}")
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    counts = rle["counts"]
    return {
        "size": [int(v) for v in rle["size"]],
        "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts,
    }


def category_flags(prediction: PanopticPrediction, num_classes: int) -> list[bool]:
    """``[C]`` thing flags of the vocabulary (from the prediction, else from its segments)."""
    if prediction.isthing is not None:
        flags = [bool(v) for v in np.asarray(prediction.isthing).reshape(-1)[:num_classes]]
        if len(flags) == num_classes:
            return flags
    flags = [False] * num_classes
    for segment in prediction.segments:
        flags[segment.category] = segment.isthing
    for instance in prediction.instances:
        flags[instance.category] = True
    return flags


def segment_record(
    segment: Segment, class_names: Sequence[str], category_ids: Sequence[int]
) -> dict[str, Any]:
    """panopticapi's ``segments_info`` entry of ``segment``, with ``category_name`` and
    ``score`` (NaN for ground truth is written as ``null`` by JSON writers that allow it)."""
    return {
        "id": int(segment.id),
        "category_id": int(category_ids[segment.category]),
        "category_name": class_names[segment.category],
        "isthing": bool(segment.isthing),
        "iscrowd": 0,
        "area": int(segment.area),
        "bbox": [float(v) for v in segment.bbox],
        "score": float(segment.score),
    }


def categories(
    prediction: PanopticPrediction, class_names: Sequence[str], category_ids: Sequence[int]
) -> list[dict[str, Any]]:
    """COCO ``categories`` of the vocabulary: ``id``, ``name``, ``isthing``."""
    flags = category_flags(prediction, len(class_names))
    return [
        {"id": int(cid), "name": name, "isthing": flag}
        for cid, name, flag in zip(category_ids, class_names, flags, strict=True)
    ]


def instance_records(
    prediction: PanopticPrediction,
    masks: np.ndarray,
    category_ids: Sequence[int],
    image_id: str | int,
) -> list[dict[str, Any]]:
    """COCO detection results of the instances: ``image_id``, ``category_id``, RLE
    ``segmentation`` of the proposal's mask, ``score`` and the mask's ``bbox``."""
    records = []
    for inst in prediction.instances:
        rle = encode_rle(np.asarray(masks[inst.mask_index], dtype=bool))
        bbox = mask_util.toBbox({"size": rle["size"], "counts": rle["counts"].encode("ascii")})
        records.append(
            {
                "image_id": image_id,
                "category_id": int(category_ids[inst.category]),
                "segmentation": rle,
                "score": float(inst.score),
                "bbox": [float(v) for v in bbox],
            }
        )
    return records
