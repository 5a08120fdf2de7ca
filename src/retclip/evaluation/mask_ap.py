"""Mask AP / AP50 / AP75 over thing classes with pycocotools' ``COCOeval`` (``iouType="segm"``).

Ground truth and detections are kept per image as COCO RLE (compressed, so memory grows with the
run-length code, not with pixels) and evaluated once at the end. At most ``max_detections`` (100)
detections per image are kept, the highest scoring. Per-class AP and the AP of a subset of
classes are read from ``COCOeval``'s precision array the way its ``summarize`` averages it (mean
over the valid entries), which equals running ``COCOeval`` with ``params.catIds`` set to the subset.
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

__all__ = ["MaskAPAccumulator"]


class MaskAPAccumulator:
    """Collects ground truth and detections image by image; :meth:`evaluate` runs COCOeval.

    Args:
        category_ids: ``[K]`` dataset category ids (index = class index).
        isthing: ``[K]`` bool; AP is computed over thing classes only.
        max_detections: detections kept per image (the highest scores).
    """

    def __init__(
        self, category_ids: Sequence[int], isthing: np.ndarray, max_detections: int = 100
    ) -> None:
        self.category_ids = [int(c) for c in category_ids]
        self.isthing = np.asarray(isthing, dtype=bool)
        self.max_detections = max_detections
        self._images: list[dict[str, Any]] = []
        self._gt: list[dict[str, Any]] = []
        self._dt: list[dict[str, Any]] = []

    def add_image(
        self,
        image_id: int,
        height: int,
        width: int,
        gt: Sequence[tuple[int, dict[str, Any], bool, float | None]],
        detections: Sequence[tuple[int, dict[str, Any], float]],
    ) -> None:
        """Add one image.

        Args:
            image_id: a unique integer id.
            height, width: image size.
            gt: ``(class index, RLE, iscrowd, area or None)`` per ground-truth instance; stuff
                classes are dropped.
            detections: ``(class index, RLE, score)`` per detection; stuff classes are dropped.
        """
        self._images.append({"id": int(image_id), "height": int(height), "width": int(width)})
        for cls, rle, crowd, area in gt:
            if not self.isthing[cls]:
                continue
            self._gt.append(
                {
                    "id": len(self._gt) + 1,
                    "image_id": int(image_id),
                    "category_id": self.category_ids[cls],
                    "segmentation": rle,
                    "area": float(mask_util.area(rle)) if area is None else float(area),
                    "bbox": [float(v) for v in mask_util.toBbox(rle)],
                    "iscrowd": int(bool(crowd)),
                }
            )
        things = [d for d in detections if self.isthing[d[0]]]
        things.sort(key=lambda d: -d[2])
        for cls, rle, score in things[: self.max_detections]:
            self._dt.append(
                {
                    "image_id": int(image_id),
                    "category_id": self.category_ids[cls],
                    "segmentation": rle,
                    "score": float(score),
                }
            )

    def _coco_eval(self) -> COCOeval | None:
        thing_ids = [c for c, t in zip(self.category_ids, self.isthing, strict=True) if t]
        if not self._images or not thing_ids:
            return None
        gt = COCO()
        gt.dataset = {
            "images": self._images,
            "annotations": self._gt,
            "categories": [{"id": c} for c in thing_ids],
        }
        with contextlib.redirect_stdout(io.StringIO()):
            gt.createIndex()
            dt = (
                gt.loadRes(copy.deepcopy(self._dt)) if self._dt else _empty_results(gt)
            )  # loadRes mutates
            evaluator = COCOeval(gt, dt, iouType="segm")
            evaluator.params.maxDets = [1, 10, self.max_detections]
            evaluator.evaluate()
            evaluator.accumulate()
        return evaluator

    def evaluate(
        self, subsets: dict[str, np.ndarray] | None = None
    ) -> tuple[dict[str, dict[str, float]], np.ndarray]:
        """Run COCOeval once.

        Args:
            subsets: name → ``[K]`` bool class selections (e.g. ``seen``), besides ``"all"``.

        Returns:
            ``{name: {"mAP", "AP50", "AP75"}}`` in percent (NaN when no class has ground truth)
            and per-class AP ``[K]`` in percent (NaN for stuff and classes without ground truth).
        """
        k = len(self.category_ids)
        selections = {"all": np.ones(k, dtype=bool), **(subsets or {})}
        per_class = np.full(k, np.nan)
        evaluator = self._coco_eval()
        nan = {"mAP": float("nan"), "AP50": float("nan"), "AP75": float("nan")}
        if evaluator is None:
            return {name: dict(nan) for name in selections}, per_class
        # precision [T, R, K_things, A, M]; area "all" is 0, maxDets 100 is the last
        precision = evaluator.eval["precision"][:, :, :, 0, -1]
        column = {c: i for i, c in enumerate(evaluator.params.catIds)}
        thresholds = evaluator.params.iouThrs
        results: dict[str, dict[str, float]] = {}
        for cls in range(k):
            if self.category_ids[cls] in column:
                values = precision[:, :, column[self.category_ids[cls]]]
                valid = values[values > -1]
                per_class[cls] = 100.0 * float(valid.mean()) if valid.size else np.nan
        for name, chosen in selections.items():
            cols = [
                column[self.category_ids[c]]
                for c in np.flatnonzero(chosen)
                if self.category_ids[c] in column
            ]
            block = precision[:, :, cols]
            row: dict[str, float] = {}
            for key, t in (("mAP", None), ("AP50", 0.5), ("AP75", 0.75)):
                part = block if t is None else block[np.flatnonzero(np.isclose(thresholds, t))]
                valid = part[part > -1]
                row[key] = 100.0 * float(valid.mean()) if valid.size else float("nan")
            results[name] = row
        return results, per_class


def _empty_results(gt: COCO) -> COCO:
    """A results COCO object with no detections (``loadRes`` refuses an empty list)."""
    dt = COCO()
    dt.dataset = {"images": list(gt.dataset["images"]), "categories": gt.dataset["categories"]}
    dt.dataset["annotations"] = []
    dt.createIndex()
    return dt
