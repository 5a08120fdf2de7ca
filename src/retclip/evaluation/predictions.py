"""Scoring predictions made elsewhere: a COCO-panoptic folder, or a ``retclip segment`` folder
read with its own reader (:func:`retclip.outputs.read_outputs`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from retclip.datasets.ade20k import read_semantic
from retclip.errors import InputError
from retclip.evaluation.datasets import (
    Detections,
    EvalDataset,
    semantic_from_panoptic,
)
from retclip.evaluation.evaluator import Evaluator
from retclip.evaluation.panoptic_quality import SegmentsInfo
from retclip.files import read_json
from retclip.images import read_panoptic_png
from retclip.outputs import output_paths, read_outputs
from retclip.vocabulary import normalize_name


class PredictionFolder:
    """Predictions in COCO panoptic format, or a folder written by ``retclip segment``.

    COCO format: ``json_path`` (``annotations`` with ``image_id``, ``file_name``,
    ``segments_info`` ``{id, category_id}``) and the PNGs in ``directory``; optional
    ``instances_json`` (COCO results: ``image_id``, ``category_id``, RLE ``segmentation``,
    ``score``) and ``semantic_dir`` (``<stem>.png`` of class indices). ``retclip segment``'s
    layout (``<stem>_panoptic.png/.json``, ``<stem>_semantic.png``, ``<stem>_instances.json``) is
    recognised when ``directory`` holds ``*_panoptic.json`` files. Without semantic maps, the
    semantic prediction is the panoptic one's categories.
    """

    def __init__(
        self,
        dataset: EvalDataset,
        directory: Path,
        json_path: Path | None = None,
        instances_json: Path | None = None,
        semantic_dir: Path | None = None,
    ) -> None:
        self.dataset = dataset
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise InputError(f"predictions folder not found: {self.directory}")
        self.semantic_dir = semantic_dir
        self.retclip_layout = json_path is None and any(self.directory.glob("*_panoptic.json"))
        self._by_key: dict[str, dict[str, Any]] = {}
        if not self.retclip_layout:
            json_path = json_path or self.directory.with_suffix(".json")
            records = read_json(json_path, "predictions JSON")
            annotations = records.get("annotations") if isinstance(records, dict) else None
            if not isinstance(annotations, list):
                raise InputError(f"{json_path} has no 'annotations' list (COCO panoptic format)")
            for ann in annotations:
                self._by_key[str(ann.get("image_id"))] = ann
                self._by_key.setdefault(Path(str(ann.get("file_name", ""))).stem, ann)
        self._instances: dict[str, Detections] | None = None
        if instances_json is not None:
            self._instances = {}
            results = read_json(instances_json, "instance results JSON")
            if not isinstance(results, list):
                raise InputError(f"{instances_json} is not a COCO results list")
            for det in results:
                cls = self._category(det.get("category_id"), instances_json)
                seg = dict(det["segmentation"])
                self._instances.setdefault(str(det["image_id"]), []).append(
                    (cls, seg, float(det["score"]))
                )

    def _category(self, category_id: Any, where: Path) -> int:
        index = self.dataset.category_index(category_id)
        if index is None:
            raise InputError(f"{where}: unknown category_id {category_id}")
        return index

    def _run_categories(self, ann: dict[str, Any], where: Path) -> dict[int, int]:
        """``retclip segment``'s category ids → dataset class indices, by name, else by id."""
        by_name = {normalize_name(n): i for i, n in enumerate(self.dataset.vocabulary.names)}
        mapping: dict[int, int] = {}
        for cat in ann.get("categories", []):
            index = by_name.get(normalize_name(str(cat.get("name", ""))))
            mapping[int(cat["id"])] = self._category(cat["id"], where) if index is None else index
        return mapping

    def get(self, index: int) -> tuple[np.ndarray, SegmentsInfo, np.ndarray, Detections | None]:
        """``(panoptic [H, W], segments, semantic [H, W], detections or None)`` of one image."""
        stem = self.dataset.stem(index)
        image_id = self.dataset.image_id(index)
        detections: Detections | None = None
        semantic_read: np.ndarray | None
        if self.retclip_layout:  # the files `retclip segment` wrote, read by their reader
            files = read_outputs(self.directory, stem)
            paths = output_paths(self.directory, stem)
            png, ann = paths["panoptic_png"], files.annotation
            run_ids = self._run_categories(ann, paths["panoptic_json"])

            def category(category_id: Any, where: Path) -> int:
                if int(category_id) not in run_ids:
                    raise InputError(f"{where}: unknown category_id {category_id}")
                return run_ids[int(category_id)]

            if files.instances is not None:
                detections = [
                    (category(d["category_id"], paths["instances_json"]),
                     dict(d["segmentation"]), float(d["score"]))
                    for d in files.instances
                ]  # fmt: skip
            pred_map = files.panoptic
            semantic_read = files.semantic
        else:
            category = self._category
            found = self._by_key.get(image_id) or self._by_key.get(stem)
            if found is None:
                raise InputError(f"no prediction for image {image_id} ({stem})")
            ann = found
            png = self.directory / str(ann["file_name"])
            semantic_png = (self.semantic_dir / f"{stem}.png") if self.semantic_dir else None
            if self._instances is not None:
                detections = self._instances.get(image_id, [])
            pred_map = read_panoptic_png(png)
            semantic_read = None
            if semantic_png is not None and semantic_png.is_file():
                semantic_read = read_semantic(semantic_png)
        infos = ann.get("segments_info", [])
        segments = SegmentsInfo(
            ids=np.array([s["id"] for s in infos], dtype=np.int64),
            categories=np.array([category(s["category_id"], png) for s in infos], np.int64),
        )
        if semantic_read is not None:
            semantic = semantic_read
            if self.retclip_layout:  # positions in the run's category list → dataset indices
                lut = np.array([category(c["id"], png) for c in ann.get("categories", [])] + [-1])
                semantic = lut[np.minimum(semantic, len(lut) - 1)]
        else:
            semantic = semantic_from_panoptic(pred_map, segments, fill=-1)
        return pred_map, segments, semantic, detections


def score_predictions(
    dataset: EvalDataset,
    indices: Sequence[int],
    predictions: PredictionFolder,
    *,
    seen: np.ndarray | None = None,
    progress: bool = True,
) -> Evaluator:
    """Score existing predictions against ``dataset``; AP only if every image has detections."""
    evaluator = Evaluator(dataset.vocabulary, seen)
    for index in tqdm(indices, desc="score", unit="img", disable=not progress):
        gt = dataset.ground_truth(index)
        pred_map, segments, semantic, detections = predictions.get(index)
        evaluator.add(
            index, gt.panoptic, gt.segments, gt.semantic, gt.instances,
            pred_map, segments, semantic, detections, name=dataset.stem(index),
        )  # fmt: skip
    return evaluator
