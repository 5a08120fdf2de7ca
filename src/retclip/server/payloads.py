"""What the server answers: cached results for ``/rescore`` (byte-bounded LRU) and the JSON of
a result, whose segments are the records of the result files plus path scores."""

from __future__ import annotations

import base64
import collections
import dataclasses
import io
import threading
import uuid
from pathlib import PurePath
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from retclip.images import id2rgb
from retclip.outputs import (
    encode_rle,
    label_points,
    render_overlay,
    segment_colours,
    segment_record,
)
from retclip.panoptic import Segment
from retclip.segmenter import SegmentationResult
from retclip.server.config import ServerError

ImagesMode = Literal["base64", "url", "none"]


class ResultCache:
    """Recent results by id, bounded in count and bytes (least recently used evicted first)."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._items: collections.OrderedDict[str, tuple[SegmentationResult, int]] = (
            collections.OrderedDict()
        )
        self._bytes = 0
        self._lock = threading.Lock()

    @staticmethod
    def size_of(result: SegmentationResult) -> int:
        scores = result.scores.to_numpy().values()
        return int(
            result.image.nbytes
            + result.proposals.masks.nbytes
            + result.prediction.panoptic.nbytes
            + result.prediction.semantic.nbytes
            + sum(a.nbytes for a in scores)
        )

    def __len__(self) -> int:
        return len(self._items)

    def put(self, result: SegmentationResult, result_id: str | None = None) -> str:
        result_id = result_id or uuid.uuid4().hex
        size = self.size_of(result)
        with self._lock:
            old = self._items.pop(result_id, None)
            if old is not None:
                self._bytes -= old[1]
            self._items[result_id] = (result, size)
            self._bytes += size
            while len(self._items) > 1 and (
                len(self._items) > self.max_entries or self._bytes > self.max_bytes
            ):
                _, (_, dropped) = self._items.popitem(last=False)
                self._bytes -= dropped
        return result_id

    def get(self, result_id: str) -> SegmentationResult:
        with self._lock:
            item = self._items.get(result_id)
            if item is None:
                raise ServerError(
                    404,
                    f"no result with id {result_id!r}: it expired from the cache or never "
                    "existed; segment the image again",
                )
            self._items.move_to_end(result_id)
            return item[0]


def png_base64(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _path_score(matrix: torch.Tensor | None, segment: Segment) -> float | None:
    return None if matrix is None else float(matrix[segment.mask_index, segment.category])


def overlay_of(result: SegmentationResult, *, labels: bool = True) -> np.ndarray:
    return render_overlay(
        result.image, result.panoptic, result.segments, result.vocabulary.names, labels=labels
    )


def _neighbours(result: SegmentationResult, segment: Segment) -> list[dict[str, Any]]:
    """The database rows behind the segment's ``s_ret`` (image names only: no server paths)."""
    if result.neighbours is None:
        return []
    records = result.neighbours.of(segment.mask_index)
    for record in records:
        record["source"] = PurePath(str(record["source"])).name
    return records


def result_payload(
    result: SegmentationResult, result_id: str, images: ImagesMode
) -> dict[str, Any]:
    """The JSON answer of ``/segment`` and ``/rescore``: each segment is the record of
    ``<stem>_panoptic.json`` (``records.segment_record``) plus its path scores, colour, RLE, an
    interior ``label_point`` ``[x, y]`` and the retrieved ``neighbours`` behind ``s_ret``. The
    base64 overlay has no labels burned in (the page draws them at ``label_point``, readable at
    any zoom); ``/results/{id}/overlay.png`` has them."""
    names = result.vocabulary.names
    colours = segment_colours(result.segments)  # the overlay's own colours, for the legend
    points = label_points(result.panoptic, [s.id for s in result.segments])
    scores = result.scores
    segments = [
        {
            **segment_record(s, names, result.vocabulary.ids),  # as in <stem>_panoptic.json
            "s_clip": _path_score(scores.s_clip, s),
            "s_ret": _path_score(scores.s_ret, s),
            "s_iv": _path_score(scores.s_iv, s),
            "color": "#{:02x}{:02x}{:02x}".format(*colours[s.id]),
            "rle": encode_rle(result.panoptic == s.id),
            "label_point": list(points.get(s.id, (0, 0))),
            "neighbours": _neighbours(result, s),
        }
        for s in result.segments
    ]
    height, width = result.panoptic.shape
    payload: dict[str, Any] = {
        "result_id": result_id,
        "width": int(width),
        "height": int(height),
        "classes": names,
        "settings": dataclasses.asdict(result.settings),
        "has_retrieval": scores.s_ret is not None,
        "segments": segments,
    }
    if images == "base64":
        payload["overlay_png"] = png_base64(overlay_of(result, labels=False))
        payload["panoptic_png"] = png_base64(id2rgb(result.panoptic))
    elif images == "url":
        payload["overlay_url"] = f"/results/{result_id}/overlay.png"
        payload["panoptic_url"] = f"/results/{result_id}/panoptic.png"
    return payload


#: The three settings of the paper's comparison (Table 2): γ of each, RetCLIP's from the request.
COMPARE_MODES = (("clip", "CLIP only", 0.0), ("retrieval", "retrieval only", 1.0))


def compare_payload(result: SegmentationResult) -> list[dict[str, Any]]:
    """CLIP only (γ = 0), retrieval only (γ = 1) and RetCLIP (the result's own γ) side by side:
    per mode its label-free overlay and the classes found with their segment counts. Re-merges
    the cached scores; no model pass."""
    modes = [*COMPARE_MODES, ("retclip", "RetCLIP", result.settings.gamma)]
    out = []
    for key, title, gamma in modes:
        rescored = result if gamma == result.settings.gamma else result.rescore(gamma=gamma)
        counts = collections.Counter(rescored.label_of(s) for s in rescored.segments)
        out.append(
            {
                "mode": key,
                "title": title,
                "gamma": gamma,
                "overlay_png": png_base64(overlay_of(rescored, labels=False)),
                "classes": [{"name": n, "segments": c} for n, c in sorted(counts.items())],
            }
        )
    return out
