"""The model side of the server: models loaded once, segmenters per database snapshot, and
the jobs worker threads run (one backbone pass per image size in a batch)."""

from __future__ import annotations

import collections
import dataclasses
import threading
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import torch
from pydantic import ValidationError

from retclip.backbones.base import Backbone, features_from_dense
from retclip.backbones.registry import resolve_device
from retclip.caching import LRUCache
from retclip.database import FeatureDatabase
from retclip.errors import InputError, RetclipError
from retclip.images import image_to_tensor
from retclip.pipeline import ModelSpec, PipelineSpec, build_segmenter, spec_error
from retclip.proposers.base import MaskProposer
from retclip.segmenter import PreparedImage, SegmentationResult, Segmenter, Settings
from retclip.server.config import ServerConfig, ServerError
from retclip.vocabulary import Vocabulary

#: (backbone, proposer, database snapshot) segmenters kept (each holds its vocabularies' text
#: embeddings and label matches; the models themselves are shared).
SEGMENTER_CACHE_SIZE = 16


@dataclasses.dataclass
class SegmentJob:
    """One image to segment with one vocabulary under some settings. ``cancelled`` is set when
    its request gave up waiting (504): the worker then stops at the next stage boundary."""

    image: np.ndarray
    vocab: Vocabulary
    settings: Settings
    source: str
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)


@dataclasses.dataclass
class FeatureJob:
    """Example images (and masks) to pool into database rows."""

    images: list[np.ndarray]
    masks: list[np.ndarray]  # [N, H, W] bool per image
    pooling: Literal["soft", "binary"] = "soft"


def _gave_up() -> ServerError:
    return ServerError(504, "the request gave up waiting; its work was stopped")


class Engine:
    """Models loaded once and shared by every request, and the counters of model work."""

    def __init__(
        self, config: ServerConfig, extra_proposers: Mapping[str, MaskProposer] | None = None
    ) -> None:
        self.device = resolve_device(config.device)
        self.config = config
        self.backbones: dict[str, Backbone] = {
            name: self.spec(name).load_backbone() for name in config.backbones
        }
        extra = dict(extra_proposers or {})
        self.proposers: dict[str, MaskProposer] = {}
        #: proposer → the backbone it shares (FC-CLIP's runs on the first backbone, built with
        #: FC-CLIP's input recipe; requests pairing it with another backbone are refused)
        self.shared_backbone: dict[str, str] = {}
        default = config.backbones[0]
        for name in config.proposers:
            if name in extra:
                self.proposers[name] = extra[name]
                continue
            spec = self.spec(default, name)
            shares = spec.recipe == "fcclip" and name == "fcclip"
            backbone = spec.load_backbone() if shares else self.backbones[default]
            built = spec.load_proposer(backbone, strict=False)
            if built is None:  # unreachable: a proposer name was given
                raise InputError(f"proposer {name!r} could not be built")
            self.proposers[name] = built
            if built.feature_pooling is not None:
                self.shared_backbone[name] = default
        self._segmenters: LRUCache[tuple[str, str, str | None, int], Segmenter] = LRUCache(
            SEGMENTER_CACHE_SIZE
        )
        self._lock = threading.Lock()
        self.counters: collections.Counter[str] = collections.Counter()

    def count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.counters[key] += n

    def spec(self, backbone: str, proposer: str | None = None) -> ModelSpec:
        """The models' spec: a backbone and proposer with the server's model options."""
        try:
            return ModelSpec(
                backbone=backbone,
                proposer=proposer,
                device=self.config.device,
                **self.config.model_options,
            ).resolved()
        except ValidationError as error:
            raise spec_error(error) from None

    def segmenter(
        self, backbone: str, proposer: str, db_name: str | None, db: FeatureDatabase | None
    ) -> Segmenter:
        """The segmenter of these models and database snapshot (built once per snapshot)."""
        key = (backbone, proposer, db_name, -1 if db is None else db.generation)
        found = self._segmenters.get(key)
        if found is not None:
            return found
        model = self.proposers[proposer]
        shared = self.shared_backbone.get(proposer)
        if shared is not None and shared != backbone:
            raise InputError(
                f"proposer {proposer!r} runs on its own backbone {shared!r}; request that one"
            )
        chosen = model.backbone if model.backbone is not None else self.backbones[backbone]
        spec = PipelineSpec(model=ModelSpec(backbone=backbone, proposer=proposer))
        built = build_segmenter(spec, models=(chosen, model), database=db)
        # a database that changed leaves its older snapshots' segmenters behind: drop them
        self._segmenters.discard(lambda k: k[:3] == key[:3] and k[3] != key[3])
        return self._segmenters.put(key, built)

    @torch.inference_mode()
    def segment_batch(
        self, segmenter: Segmenter, jobs: Sequence[SegmentJob]
    ) -> list[SegmentationResult | RetclipError]:
        """Segment ``jobs`` as :meth:`Segmenter.__call__` does, one backbone pass per image size.

        Work is bounded per job: a job whose request timed out is dropped before its proposer
        and again before its backbone pass and scoring, and one whose masks × classes exceed
        ``max_mask_class_pairs`` is refused (413) before scoring.
        """
        results: list[SegmentationResult | RetclipError | None] = [None] * len(jobs)
        prepared: list[PreparedImage] = []
        positions: list[int] = []
        limit = self.config.max_mask_class_pairs
        for i, job in enumerate(jobs):
            if self._dropped(job):
                results[i] = _gave_up()
                continue
            try:
                item = segmenter.prepare(job.image, job.vocab, source=job.source)
            except RetclipError as error:
                results[i] = error
                continue
            pairs = len(item.proposals) * len(item.vocabulary)
            if pairs > limit:
                results[i] = ServerError(
                    413,
                    f"{len(item.proposals)} masks x {len(item.vocabulary)} classes = {pairs} "
                    f"mask-class scores; the limit is {limit} per image: send fewer classes",
                )
            elif self._dropped(job):
                results[i] = _gave_up()
            else:
                prepared.append(item)
                positions.append(i)
        for i, result in zip(positions, segmenter.finish(prepared), strict=True):
            results[i] = result.rescore(**dataclasses.asdict(jobs[i].settings))
        self.count("backbone_passes", len({item.pixels.shape for item in prepared}))
        self.count("segmented_images", len(prepared))
        return [r for r in results if r is not None]

    def _dropped(self, job: SegmentJob) -> bool:
        if job.cancelled.is_set():
            self.count("cancelled_jobs")
            return True
        return False

    @torch.inference_mode()
    def features(self, backbone: Backbone, job: FeatureJob) -> np.ndarray:
        """``[rows, D]`` unit features of every mask of every example image."""
        rows = []
        for image, masks in zip(job.images, job.masks, strict=True):
            dense = backbone.encode_images(image_to_tensor(image)[None].to(backbone.device))
            self.count("backbone_passes")
            rows.append(features_from_dense(backbone, dense, masks, mode=job.pooling).cpu().numpy())
        self.count("example_images", len(job.images))
        return np.concatenate(rows) if rows else np.zeros((0, backbone.dim), np.float32)
