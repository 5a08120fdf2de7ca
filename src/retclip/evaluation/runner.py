"""The evaluation loop: datasets with ground truth, the per-image score cache, scoring, sweeps.

``retclip eval`` runs in two passes. The *model pass* segments each image not yet in the cache and
stores its masks (bit-packed) and per-mask ``s_clip`` / ``s_ret`` / ``s_iv`` in
``<cache>/<stem>.npz`` — the arrays of ``SegmentationResult.save``'s ``<stem>_scores.npz`` — each
written atomically, so a killed run resumes where it stopped. The *scoring pass* merges the cached
scores under any :class:`Settings` and accumulates the metrics; it needs no model, which is how a
sweep over α, β, γ runs (all settings in one pass over the images).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from tqdm import tqdm

from retclip.datasets.ade20k import Ade20kPanoptic, read_semantic
from retclip.datasets.coco_panoptic import CocoPanopticDataset
from retclip.errors import InputError
from retclip.evaluation.mask_ap import rle_of
from retclip.evaluation.panoptic_quality import SegmentsInfo
from retclip.evaluation.report import Evaluator
from retclip.files import atomic_write, read_json
from retclip.images import load_image, read_panoptic_png
from retclip.outputs import output_paths, read_outputs
from retclip.proposers.base import Proposals
from retclip.segmenter import (
    MaskScores,
    Segmenter,
    Settings,
    load_scores,
    merge,
    save_scores,
)
from retclip.vocabulary import Vocabulary, normalize_name

__all__ = [
    "CACHE_FORMAT",
    "DatasetSpec",
    "EvalDataset",
    "GroundTruth",
    "ScoreCache",
    "run_model",
    "score_cache",
    "score_predictions",
    "sweep_grid",
]

CACHE_FORMAT = 1
DATASET_KINDS = ("coco-panoptic", "ade20k", "coco")
Detections = list[tuple[int, dict[str, Any], float]]


# --- datasets ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset lies. ``kind`` ``ade20k`` / ``coco`` take ``root``; ``coco-panoptic``
    takes ``panoptic_json`` + ``images`` (+ ``panoptic_dir``). ``semantic_dir`` and
    ``instances_json`` override or add the semantic labels and the instance JSON."""

    kind: str = "coco-panoptic"
    root: str | None = None
    split: str = "val"
    panoptic_json: str | None = None
    images: str | None = None
    panoptic_dir: str | None = None
    semantic_dir: str | None = None
    instances_json: str | None = None

    def resolved(self) -> DatasetSpec:
        """The same spec with absolute paths (for the cache's ``meta.json``)."""
        fields = {
            f.name: str(Path(v).resolve()) if v and f.name not in ("kind", "split") else v
            for f in dataclasses.fields(self)
            for v in [getattr(self, f.name)]
        }
        return DatasetSpec(**fields)


@dataclasses.dataclass
class GroundTruth:
    """Ground truth of one image.

    Attributes:
        panoptic: ``[H, W]`` int64 segment ids (0 = VOID).
        segments: its segments with ``iscrowd`` and JSON areas.
        semantic: ``[H, W]`` int64 class indices, 255 = ignore.
        instances: ``(class index, RLE, iscrowd, area)`` for mask AP.
    """

    panoptic: np.ndarray
    segments: SegmentsInfo
    semantic: np.ndarray
    instances: list[tuple[int, dict[str, Any], bool, float | None]]


def _coco_layout(spec: DatasetSpec) -> tuple[Path, Path, Path, Path | None, Path | None]:
    """COCO panoptic ``<split>2017`` under ``root``: detectron2's or the zip's PNG folder."""
    root = Path(spec.root or "")
    name = f"{spec.split}2017"
    panoptic_json = root / "annotations" / f"panoptic_{name}.json"
    candidates = [root / f"panoptic_{name}", root / "annotations" / f"panoptic_{name}"]
    png_dir = next((c for c in candidates if c.is_dir()), candidates[0])
    semantic = root / f"panoptic_semseg_{name}"
    instances = root / "annotations" / f"instances_{name}.json"
    return (
        panoptic_json,
        root / name,
        png_dir,
        semantic if semantic.is_dir() else None,
        instances if instances.is_file() else None,
    )


class EvalDataset:
    """A panoptic dataset with everything the metrics need, per image.

    Semantic labels come from ``semantic_dir/<stem>.png`` when there is one (ADE20k's
    ``annotations_detectron2``), else from the panoptic ground truth (every segment, crowd
    included: Mask2Former's ``prepare_coco_semantic_annos_from_panoptic_annos.py``). Instances for
    mask AP come from the instance JSON when there is one (matched by image file name, categories
    by name, else by id), else from the panoptic thing segments (crowd ones as ``iscrowd``).
    """

    def __init__(self, spec: DatasetSpec) -> None:
        if spec.kind not in DATASET_KINDS:
            raise InputError(f"dataset kind must be one of {', '.join(DATASET_KINDS)}")
        self.spec = spec
        semantic_dir: Path | None = None
        instances_json: Path | None = None
        if spec.kind == "ade20k":
            if not spec.root:
                raise InputError("--dataset ade20k needs --root ADEChallengeData2016")
            ade = Ade20kPanoptic(spec.root, spec.split)
            self.panoptic: CocoPanopticDataset = ade
            semantic_dir, instances_json = ade.semantic_dir, ade.instances_json
        elif spec.kind == "coco":
            if not spec.root:
                raise InputError("--dataset coco needs --root (the folder holding annotations/)")
            pan_json, images, png_dir, semantic_dir, instances_json = _coco_layout(spec)
            self.panoptic = CocoPanopticDataset(pan_json, images, png_dir)
        else:
            if not spec.panoptic_json or not spec.images:
                raise InputError("a COCO-panoptic dataset needs --panoptic-json and --images")
            self.panoptic = CocoPanopticDataset(
                spec.panoptic_json, spec.images, spec.panoptic_dir or None
            )
        if spec.semantic_dir:
            semantic_dir = Path(spec.semantic_dir)
        if spec.instances_json:
            instances_json = Path(spec.instances_json)
        if semantic_dir is not None and not semantic_dir.is_dir():
            raise InputError(f"semantic label folder not found: {semantic_dir}")
        self.semantic_dir = semantic_dir
        self.instances_json = instances_json
        data = json.loads(self.panoptic.json_path.read_text(encoding="utf-8"))
        infos = {img["id"]: img for img in data["images"]}
        self._records = [(infos[a["image_id"]], a) for a in data["annotations"]]
        self._category_index = {int(c["id"]): i for i, c in enumerate(self.panoptic.categories)}
        self._instances = self._load_instances(instances_json) if instances_json else None

    def __len__(self) -> int:
        return len(self._records)

    @property
    def vocabulary(self) -> Vocabulary:
        return self.panoptic.vocabulary

    def stem(self, index: int) -> str:
        return Path(self._records[index][0]["file_name"]).stem

    def image_id(self, index: int) -> str:
        """The image's id in the panoptic JSON, as a string."""
        return str(self._records[index][0]["id"])

    def category_index(self, category_id: Any) -> int | None:
        """Class index of a dataset category id, or ``None`` if it is not one."""
        try:
            return self._category_index.get(int(category_id))
        except (TypeError, ValueError):
            return None

    def image_path(self, index: int) -> Path:
        return self.panoptic.image_path(index)

    def select(self, limit: int | None = None, image_ids: Sequence[str] | None = None) -> list[int]:
        """Indices of the images to evaluate: ``image_ids`` (ids or file stems), then ``limit``."""
        indices = list(range(len(self)))
        if image_ids:
            lookup: dict[str, int] = {}
            for i, (img, _) in enumerate(self._records):
                lookup[str(img["id"])] = i
                lookup[Path(img["file_name"]).stem] = i
            unknown = [x for x in image_ids if x not in lookup]
            if unknown:
                raise InputError(
                    f"image ids not in {self.panoptic.json_path}: {', '.join(unknown[:5])}"
                )
            indices = sorted({lookup[x] for x in image_ids})
        if limit is not None:
            if limit < 1:
                raise InputError(f"--limit must be >= 1, got {limit}")
            indices = indices[:limit]
        if not indices:
            raise InputError(f"no images to evaluate in {self.panoptic.json_path}")
        return indices

    def _load_instances(self, path: Path) -> tuple[COCO, dict[str, int], dict[int, int]]:
        if not path.is_file():
            raise InputError(f"instance JSON not found: {path}")
        try:
            import contextlib
            import io

            with contextlib.redirect_stdout(io.StringIO()):
                coco = COCO(str(path))
        except (OSError, ValueError, KeyError, TypeError, AssertionError) as exc:
            raise InputError(f"cannot read instance JSON {path}: {exc}") from None
        by_stem = {Path(img["file_name"]).stem: img_id for img_id, img in coco.imgs.items()}
        by_name: dict[str, int] = {}
        for i, cls in enumerate(self.vocabulary.classes):
            for name in (cls.name, *cls.name.split(","), *cls.synonyms):
                by_name.setdefault(normalize_name(name), i)
        categories: dict[int, int] = {}
        for cat_id, cat in coco.cats.items():
            index = by_name.get(normalize_name(str(cat.get("name", ""))))
            if index is None:
                index = self._category_index.get(int(cat_id))
            if index is None:
                raise InputError(
                    f"{path}: category {cat.get('name')!r} (id {cat_id}) is not a category of "
                    f"{self.panoptic.json_path}"
                )
            categories[int(cat_id)] = index
        return coco, by_stem, categories

    def ground_truth(self, index: int) -> GroundTruth:
        """The ground truth of image ``index`` (see the class docstring for the sources)."""
        _, ann = self._records[index]
        png = self.panoptic.masks_dir / ann["file_name"]
        ids = read_panoptic_png(png)
        infos = ann["segments_info"]
        try:
            categories = np.array(
                [self._category_index[int(s["category_id"])] for s in infos], dtype=np.int64
            )
        except KeyError as exc:
            raise InputError(f"{png}: segment with unknown category id {exc}") from None
        segments = SegmentsInfo(
            ids=np.array([s["id"] for s in infos], dtype=np.int64),
            categories=categories,
            iscrowd=np.array([bool(s.get("iscrowd", 0)) for s in infos]),
            areas=np.array([s.get("area", 0) for s in infos], dtype=np.float64)
            if all("area" in s for s in infos)
            else None,
        )
        if self.semantic_dir is not None:
            semantic = read_semantic(self.semantic_dir / f"{self.stem(index)}.png")
            if semantic.shape != ids.shape:
                raise InputError(
                    f"semantic labels of {self.stem(index)} are {semantic.shape[1]}x"
                    f"{semantic.shape[0]}, the panoptic PNG {ids.shape[1]}x{ids.shape[0]}"
                )
        else:
            semantic = semantic_from_panoptic(ids, segments, fill=255)
        return GroundTruth(ids, segments, semantic, self._gt_instances(index, ids, segments))

    def _gt_instances(
        self, index: int, ids: np.ndarray, segments: SegmentsInfo
    ) -> list[tuple[int, dict[str, Any], bool, float | None]]:
        if self._instances is None:
            crowd = (
                segments.iscrowd if segments.iscrowd is not None else np.zeros(len(segments.ids))
            )
            areas = segments.areas
            return [
                (
                    int(segments.categories[i]),
                    rle_of(ids == segments.ids[i]),
                    bool(crowd[i]),
                    None if areas is None else float(areas[i]),
                )
                for i in range(len(segments.ids))
                if self.vocabulary.isthing[segments.categories[i]]
            ]
        coco, by_stem, categories = self._instances
        img_id = by_stem.get(self.stem(index))
        if img_id is None:
            return []
        anns = coco.imgToAnns.get(img_id, [])
        return [
            (
                categories[int(a["category_id"])],
                coco.annToRLE(a),
                bool(a.get("iscrowd", 0)),
                float(a["area"]) if "area" in a else None,
            )
            for a in anns
        ]


def semantic_from_panoptic(ids: np.ndarray, segments: SegmentsInfo, fill: int) -> np.ndarray:
    """``[H, W]`` int64 class index of each pixel's segment; ``fill`` on VOID / unlisted ids."""
    lut_ids = np.concatenate([[0], segments.ids])
    lut_classes = np.concatenate([[fill], segments.categories])
    order = np.argsort(lut_ids)
    flat = ids.reshape(-1)
    pos = np.minimum(np.searchsorted(lut_ids[order], flat), len(order) - 1)
    found = lut_ids[order][pos] == flat
    return np.where(found, lut_classes[order][pos], fill).reshape(ids.shape)


# --- the score cache --------------------------------------------------------------------------


class ScoreCache:
    """``<dir>/meta.json`` (what made the scores) and ``<dir>/<stem>.npz`` per image.

    ``meta.json`` records the dataset spec, the vocabulary, the training vocabulary and a
    ``model`` description (backbone, proposer, databases, k, pooling); reusing a cache with another
    model description is refused, since its scores would be stale.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    @property
    def meta_path(self) -> Path:
        return self.directory / "meta.json"

    def read_meta(self) -> dict[str, Any]:
        try:
            meta = json.loads(self.meta_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(
                f"no evaluation cache at {self.directory} (meta.json missing)"
            ) from None
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"cannot read {self.meta_path}: {exc}") from None
        if meta.get("format") != CACHE_FORMAT:
            raise InputError(f"{self.meta_path}: unknown cache format {meta.get('format')!r}")
        return dict(meta)

    def open(self, meta: dict[str, Any]) -> None:
        """Create the cache with ``meta``, or check that an existing one was made the same way."""
        meta = {"format": CACHE_FORMAT, **meta}
        if self.meta_path.exists():
            old = self.read_meta()
            changed = sorted(k for k in meta if old.get(k) != json.loads(json.dumps(meta[k])))
            if changed:
                raise InputError(
                    f"the cache {self.directory} was made with another {', '.join(changed)}; "
                    "give another --cache or delete it"
                )
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_write(self.meta_path, (json.dumps(meta, indent=2) + "\n").encode("utf-8"))

    def path(self, stem: str) -> Path:
        return self.directory / f"{stem}.npz"

    def has(self, stem: str) -> bool:
        return self.path(stem).is_file()

    def save(self, stem: str, proposals: Proposals, scores: MaskScores,
             class_names: Sequence[str]) -> None:  # fmt: skip
        """Store one image's proposals and per-mask path scores (atomically)."""
        save_scores(self.path(stem), proposals, scores, class_names)

    def load(self, stem: str) -> tuple[Proposals, MaskScores]:
        """The proposals (masks, scores) and per-mask path scores of ``stem``."""
        if not self.has(stem):
            raise InputError(f"image {stem} is not in the cache {self.directory}")
        return load_scores(self.path(stem))


def run_model(
    dataset: EvalDataset,
    indices: Sequence[int],
    cache: ScoreCache,
    make_segmenter: Callable[[], Segmenter],
    vocabulary: Vocabulary,
    *,
    progress: bool = True,
) -> int:
    """Segment the images of ``indices`` missing from ``cache``; returns how many ran.

    The segmenter is built only when the first image is missing, so a complete cache costs no
    model load. Each image's scores are committed on its own: an interrupted run loses at most
    the image in progress.
    """
    todo = [i for i in indices if not cache.has(dataset.stem(i))]
    segmenter: Segmenter | None = None
    for index in tqdm(todo, desc="segment", unit="img", disable=not progress or not todo):
        segmenter = segmenter or make_segmenter()
        path = dataset.image_path(index)
        result = segmenter(load_image(path), vocabulary, source=path)
        cache.save(dataset.stem(index), result.proposals, result.scores, vocabulary.names)
    return len(todo)


def _prediction_from_cache(
    proposals: Proposals, scores: MaskScores, vocabulary: Vocabulary, settings: Settings
) -> tuple[np.ndarray, SegmentsInfo, np.ndarray, Detections]:
    prediction = merge(scores, proposals, vocabulary, settings)
    segments = SegmentsInfo(
        ids=np.array([s.id for s in prediction.segments], dtype=np.int64),
        categories=np.array([s.category for s in prediction.segments], dtype=np.int64),
    )
    detections = [
        (inst.category, rle_of(proposals.masks[inst.mask_index]), inst.score)
        for inst in prediction.instances
    ]
    return prediction.panoptic, segments, prediction.semantic, detections


def score_cache(
    dataset: EvalDataset,
    indices: Sequence[int],
    cache: ScoreCache,
    vocabulary: Vocabulary,
    settings: Sequence[Settings],
    *,
    seen: np.ndarray | None = None,
    progress: bool = True,
) -> list[Evaluator]:
    """One :class:`Evaluator` per entry of ``settings``, filled in a single pass over the images
    (each cache file and ground truth read once). No model is involved."""
    if len(vocabulary) != len(dataset.vocabulary):
        raise InputError(
            f"vocabulary has {len(vocabulary)} classes, the dataset {len(dataset.vocabulary)}"
        )
    evaluators = [Evaluator(dataset.vocabulary, seen) for _ in settings]
    for index in tqdm(indices, desc="score", unit="img", disable=not progress):
        stem = dataset.stem(index)
        proposals, scores = cache.load(stem)
        gt = dataset.ground_truth(index)
        if proposals.masks.shape[1:] != gt.panoptic.shape:
            raise InputError(f"cached masks of {stem} do not match its ground-truth size")
        for evaluator, setting in zip(evaluators, settings, strict=True):
            pred_map, segments, semantic, detections = _prediction_from_cache(
                proposals, scores, vocabulary, setting
            )
            evaluator.add(
                index, gt.panoptic, gt.segments, gt.semantic, gt.instances,
                pred_map, segments, semantic, detections, name=stem,
            )  # fmt: skip
    return evaluators


def sweep_grid(
    base: Settings, alphas: Iterable[float], betas: Iterable[float], gammas: Iterable[float]
) -> list[Settings]:
    """Every (α, β, γ) combination, other fields from ``base``."""
    return [
        dataclasses.replace(base, alpha=a, beta=b, gamma=g)
        for a, b, g in itertools.product(alphas, betas, gammas)
    ]


# --- existing predictions ---------------------------------------------------------------------


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
