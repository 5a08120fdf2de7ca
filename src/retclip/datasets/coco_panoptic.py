"""COCO-panoptic-format datasets: an images folder, a folder of panoptic PNGs and a JSON file.

The JSON holds ``images`` (``id``, ``file_name``), ``annotations`` (``image_id``, ``file_name`` of
the PNG, ``segments_info`` with ``id``, ``category_id``, ``iscrowd``, ``area``) and
``categories`` (``id``, ``name``, ``isthing``). A PNG encodes segment ids as ``R + 256·G +
256²·B`` (0 = void). COCO panoptic and the ADE20k panoptic files made by Mask2Former's
preparation script share this format.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from PIL import Image

from retclip.errors import InputError
from retclip.images import rgb2id
from retclip.vocabulary import VocabClass, Vocabulary


@dataclasses.dataclass
class PanopticAnnotation:
    """Ground-truth segments of one image.

    Attributes:
        masks: ``[N, H, W]`` bool, one per segment (crowd regions included).
        categories: ``[N]`` int, index into :attr:`CocoPanopticDataset.vocabulary`.
        iscrowd: ``[N]`` bool.
        segment_ids: ``[N]`` int, the ids in the PNG.
    """

    masks: np.ndarray
    categories: np.ndarray
    iscrowd: np.ndarray
    segment_ids: np.ndarray


class CocoPanopticDataset:
    """Random access to images and panoptic ground truth of a COCO-panoptic dataset.

    Args:
        json_path: the panoptic JSON (e.g. ``annotations/panoptic_val2017.json``).
        images_dir: folder of the images named in ``images[].file_name``; may be ``None`` when
            images are given by path (ground-truth proposals for ``retclip segment``).
        masks_dir: folder of the panoptic PNGs; default: the JSON's path without ``.json``
            (COCO's and Mask2Former's layout).
    """

    def __init__(
        self,
        json_path: str | Path,
        images_dir: str | Path | None = None,
        masks_dir: str | Path | None = None,
    ) -> None:
        self.json_path = Path(json_path)
        self.images_dir = Path(images_dir) if images_dir is not None else None
        self.masks_dir = Path(masks_dir) if masks_dir else self.json_path.with_suffix("")
        try:
            data = json.loads(self.json_path.read_text(encoding="utf-8-sig"))
        except FileNotFoundError:
            raise InputError(f"panoptic JSON not found: {self.json_path}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"cannot read panoptic JSON {self.json_path}: {exc}") from None
        for folder, what in ((self.images_dir, "images"), (self.masks_dir, "panoptic PNG")):
            if folder is not None and not folder.is_dir():
                raise InputError(f"{what} folder not found: {folder}")
        try:
            self.categories: list[dict] = list(data["categories"])
            images = {img["id"]: img for img in data["images"]}
            self._annotations = [(images[a["image_id"]], a) for a in data["annotations"]]
        except (KeyError, TypeError) as exc:
            raise InputError(
                f"{self.json_path} is not a COCO panoptic JSON (missing or bad key {exc})"
            ) from None
        self._category_index = {cat["id"]: i for i, cat in enumerate(self.categories)}
        self._by_stem = {
            Path(img["file_name"]).stem: i for i, (img, _) in enumerate(self._annotations)
        }
        self.vocabulary = Vocabulary(
            tuple(
                VocabClass(
                    name=cat["name"],
                    synonyms=(cat["name"],),
                    isthing=bool(cat.get("isthing", 1)),
                    id=int(cat["id"]),
                )
                for cat in self.categories
            ),
            name=self.json_path.stem,
        )

    def __len__(self) -> int:
        return len(self._annotations)

    def image_path(self, index: int) -> Path:
        if self.images_dir is None:
            raise InputError(f"no images folder was given for {self.json_path}")
        return self.images_dir / self._annotations[index][0]["file_name"]

    def image_id(self, index: int) -> int | str:
        return self._annotations[index][0]["id"]

    def index_of(self, source: str | Path) -> int:
        """The index of the image whose file name has the stem of ``source``."""
        stem = Path(source).stem
        if stem not in self._by_stem:
            raise InputError(f"no ground-truth annotation for image {source} in {self.json_path}")
        return self._by_stem[stem]

    def image_labels(self, index: int, *, include_crowd: bool = False) -> list[str]:
        """Names of the categories present in image ``index`` (from the JSON; no PNG is read),
        in dataset order: the image-level tags of an annotated image."""
        present = {
            self._category_index.get(s["category_id"], -1)
            for s in self._annotations[index][1]["segments_info"]
            if include_crowd or not s.get("iscrowd", 0)
        }
        return [name for i, name in enumerate(self.vocabulary.names) if i in present]

    def annotation(self, index: int) -> PanopticAnnotation:
        """The ground-truth segments of image ``index``, read from its PNG."""
        _, ann = self._annotations[index]
        png = self.masks_dir / ann["file_name"]
        try:
            with Image.open(png) as im:
                ids = rgb2id(np.asarray(im.convert("RGB")))
        except FileNotFoundError:
            raise InputError(f"panoptic PNG not found: {png}") from None
        except OSError as exc:
            raise InputError(f"cannot read panoptic PNG {png}: {exc}") from None
        infos = ann["segments_info"]
        segment_ids = np.array([s["id"] for s in infos], dtype=np.int64)
        try:
            categories = np.array([self._category_index[s["category_id"]] for s in infos])
        except KeyError as exc:
            raise InputError(f"{png}: segment with unknown category id {exc}") from None
        masks = ids[None] == segment_ids[:, None, None]  # [N, H, W]
        return PanopticAnnotation(
            masks=masks,
            categories=categories.astype(np.int64).reshape(-1),
            iscrowd=np.array([bool(s.get("iscrowd", 0)) for s in infos], dtype=bool),
            segment_ids=segment_ids,
        )
