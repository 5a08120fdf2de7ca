"""Datasets with ground truth for evaluation: a COCO-panoptic, ADE20k or COCO layout as one
:class:`EvalDataset` (images, panoptic and semantic ground truth, instances, vocabulary)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO

from retclip.datasets.ade20k import Ade20kPanoptic, read_semantic
from retclip.datasets.coco_panoptic import CocoPanopticDataset
from retclip.errors import InputError
from retclip.evaluation.panoptic_quality import SegmentsInfo
from retclip.images import read_panoptic_png
from retclip.outputs.records import encode_rle
from retclip.vocabulary import Vocabulary, normalize_name

DATASET_KINDS = ("coco-panoptic", "ade20k", "coco")
#: Instance predictions of one image: ``(class index, RLE, score)``.
Detections = list[tuple[int, dict[str, Any], float]]


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


def panoptic_dataset(spec: DatasetSpec) -> CocoPanopticDataset:
    """The images, panoptic PNGs and categories of the dataset ``spec`` names, in the layouts
    ``eval`` reads (a database built from a training split: ``db build --dataset``)."""
    return _layout(spec)[0]


def _layout(spec: DatasetSpec) -> tuple[CocoPanopticDataset, Path | None, Path | None]:
    """The panoptic dataset of ``spec``, and its layout's semantic folder and instance JSON."""
    if spec.kind not in DATASET_KINDS:
        raise InputError(f"dataset kind must be one of {', '.join(DATASET_KINDS)}")
    if spec.kind == "ade20k":
        if not spec.root:
            raise InputError("--dataset ade20k needs --root ADEChallengeData2016")
        ade = Ade20kPanoptic(spec.root, spec.split)
        return ade, ade.semantic_dir, ade.instances_json
    if spec.kind == "coco":
        if not spec.root:
            raise InputError("--dataset coco needs --root (the folder holding annotations/)")
        pan_json, images, png_dir, semantic_dir, instances_json = _coco_layout(spec)
        return CocoPanopticDataset(pan_json, images, png_dir), semantic_dir, instances_json
    if not spec.panoptic_json or not spec.images:
        raise InputError("a COCO-panoptic dataset needs --panoptic-json and --images")
    dataset = CocoPanopticDataset(spec.panoptic_json, spec.images, spec.panoptic_dir or None)
    return dataset, None, None


class EvalDataset:
    """A panoptic dataset with everything the metrics need, per image.

    Semantic labels come from ``semantic_dir/<stem>.png`` when there is one (ADE20k's
    ``annotations_detectron2``), else from the panoptic ground truth (every segment, crowd
    included: Mask2Former's ``prepare_coco_semantic_annos_from_panoptic_annos.py``). Instances for
    mask AP come from the instance JSON when there is one (matched by image file name, categories
    by name, else by id), else from the panoptic thing segments (crowd ones as ``iscrowd``).
    """

    def __init__(self, spec: DatasetSpec) -> None:
        self.spec = spec
        self.panoptic, semantic_dir, instances_json = _layout(spec)
        if spec.semantic_dir:
            semantic_dir = Path(spec.semantic_dir)
        if spec.instances_json:
            instances_json = Path(spec.instances_json)
        if semantic_dir is not None and not semantic_dir.is_dir():
            raise InputError(f"semantic label folder not found: {semantic_dir}")
        self.semantic_dir = semantic_dir
        self.instances_json = instances_json
        data = json.loads(self.panoptic.json_path.read_text(encoding="utf-8-sig"))
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
                    encode_rle(ids == segments.ids[i]),
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
