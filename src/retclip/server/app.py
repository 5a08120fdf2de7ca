"""The HTTP API and web page of ``retclip serve`` (FastAPI); reference in ``docs/serve.md``.

Request flow: an upload is size-checked while it streams in (:class:`BodyLimit`), decoded with the
image-size limit checked from the header before any pixel is decoded, and queued as a job. One
dispatcher takes queued jobs in micro-batches (everything already waiting, up to ``max_batch``,
optionally waiting ``batch_wait_ms`` for more) and runs at most ``max_concurrency`` batches at once
in worker threads; within a batch the images of one size share a single backbone pass. A full
queue answers 503, a job that does not finish within ``timeout_s`` answers 504.

Results stay in a byte-bounded LRU cache under a random id, so ``POST /rescore`` re-combines the
cached per-mask scores under new α/β/γ and thresholds with no model pass. Database writes hold a
per-database asyncio lock (one writer per database in this process) and the store's ``flock``
(one writer across processes); each write reopens the database, so segmentations in flight keep
reading their snapshot. User errors (:class:`RetclipError`) become 4xx JSON ``{"error": ...}``;
anything else is logged and answered with a bare 500.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import dataclasses
import hashlib
import io
import logging
import re
import secrets
import shutil
import tempfile
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from retclip.backbones.base import Backbone, features_from_dense
from retclip.backbones.registry import resolve_device
from retclip.caching import LRUCache
from retclip.database import FeatureDatabase
from retclip.errors import DatabaseError, DatabaseMismatchError, InputError, RetclipError
from retclip.images import SourceImage, id2rgb, image_to_tensor, load_image
from retclip.outputs import encode_rle, render_overlay, segment_colours, segment_record
from retclip.panoptic import Segment
from retclip.pipeline import ModelSpec, PipelineSpec, build_segmenter, spec_error
from retclip.proposers.base import MaskProposer
from retclip.segmenter import PreparedImage, SegmentationResult, Segmenter, Settings
from retclip.vocabulary import BUILTIN_VOCABULARIES, VocabClass, Vocabulary

__all__ = ["ServerConfig", "ServerError", "create_app"]

log = logging.getLogger("retclip.server")

STATIC_DIR = Path(__file__).parent / "static"
#: Database names: a letter or digit, then letters, digits, ``_``, ``-`` or ``.`` (no ``..``).
_DB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_BUILD_ID = "serve"
#: (backbone, proposer, database snapshot) segmenters kept (each holds its vocabularies' text
#: embeddings and label matches; the models themselves are shared).
SEGMENTER_CACHE_SIZE = 16
ImagesMode = Literal["base64", "url", "none"]


class ServerError(RetclipError):
    """A request error with its HTTP status (413, 401, 404, 409, 503, 504...)."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = dict(headers or {})


class ServerConfig(BaseModel):
    """Settings of one server process (``retclip serve`` options), validated on construction
    (a bad value raises :class:`InputError` naming it).

    Attributes:
        data_dir: folder holding the databases (``<data_dir>/databases/<name>``).
        backbones: backbones requests may name; the first is the default. Loaded at start-up.
        proposers: proposers requests may name; the first is the default. Loaded at start-up.
        device: ``auto``, ``cpu``, ``cuda``...
        token: bearer token required by every request that writes (``None``: no token).
        max_upload_bytes: largest request body.
        max_image_pixels: largest image (width × height), checked before decoding.
        max_classes: most classes in one request.
        max_example_images: most images in one ``add rows`` request.
        max_concurrency: model batches running at once.
        max_queue: jobs waiting at most; more → 503.
        max_batch: jobs per micro-batch.
        batch_wait_ms: how long a batch waits for more jobs once the first is taken.
        timeout_s: longest wait for a model job (queue + run) → 504.
        result_cache_mb: memory for cached results (image, masks, scores) for ``/rescore``.
        result_cache_entries: most cached results.
        model_options: options of the models (``ModelSpec`` fields other than backbone,
            proposer and device: ``fcclip_checkpoint``, ``detector``, thresholds...), the same
            for every backbone and proposer (each proposer takes the ones it knows).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    data_dir: Path
    backbones: tuple[str, ...] = Field(("toy",), min_length=1)
    proposers: tuple[str, ...] = Field(("regions",), min_length=1)
    device: str = "cpu"
    token: str | None = Field(None, min_length=1)
    max_upload_bytes: int = Field(20 * 2**20, ge=1)
    max_image_pixels: int = Field(4096 * 4096, ge=1)
    max_classes: int = Field(1000, ge=1)
    max_example_images: int = Field(32, ge=1)
    max_concurrency: int = Field(1, ge=1)
    max_queue: int = Field(32, ge=1)
    max_batch: int = Field(4, ge=1)
    batch_wait_ms: float = Field(0.0, ge=0, allow_inf_nan=False)
    timeout_s: float = Field(120.0, gt=0, allow_inf_nan=False)
    result_cache_mb: int = Field(512, ge=1)
    result_cache_entries: int = Field(64, ge=1)
    model_options: dict[str, Any] = Field(default_factory=dict)

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as error:
            raise spec_error(error) from None

    @field_validator("proposers")
    @classmethod
    def _servable(cls, proposers: tuple[str, ...]) -> tuple[str, ...]:
        if "gt" in proposers:
            raise ValueError("proposer 'gt' reads ground truth from files and cannot be served")
        return proposers

    def limits(self) -> dict[str, Any]:
        keys = (
            "max_upload_bytes",
            "max_image_pixels",
            "max_classes",
            "max_example_images",
            "max_concurrency",
            "max_queue",
            "max_batch",
            "timeout_s",
        )
        return {key: getattr(self, key) for key in keys}


# -- the model side (runs in worker threads) ---------------------------------------------------


@dataclasses.dataclass
class SegmentJob:
    """One image to segment with one vocabulary under some settings."""

    image: np.ndarray
    vocab: Vocabulary
    settings: Settings
    source: str


@dataclasses.dataclass
class FeatureJob:
    """Example images (and masks) to pool into database rows."""

    images: list[np.ndarray]
    masks: list[np.ndarray]  # [N, H, W] bool per image
    pooling: Literal["soft", "binary"] = "soft"


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
        """Segment ``jobs`` as :meth:`Segmenter.__call__` does, one backbone pass per image size."""
        results: list[SegmentationResult | RetclipError | None] = [None] * len(jobs)
        prepared: list[PreparedImage] = []
        positions: list[int] = []
        for i, job in enumerate(jobs):
            try:
                prepared.append(segmenter.prepare(job.image, job.vocab, source=job.source))
                positions.append(i)
            except RetclipError as error:
                results[i] = error
        for i, result in zip(positions, segmenter.finish(prepared), strict=True):
            results[i] = result.rescore(**dataclasses.asdict(jobs[i].settings))
        self.count("backbone_passes", len({item.pixels.shape for item in prepared}))
        self.count("segmented_images", len(jobs))
        return [r for r in results if r is not None]

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


# -- the queue ---------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class _Job:
    key: tuple[Any, ...]
    run: Callable[[list[Any]], list[Any]]
    payload: Any
    future: asyncio.Future[Any]


class Dispatcher:
    """A bounded queue of model jobs, run in micro-batches by at most ``max_concurrency`` threads.

    Jobs with the same ``key`` taken together run as one call ``run(payloads)``, which returns one
    result (or a :class:`RetclipError`) per payload.
    """

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.queue: asyncio.Queue[_Job] = asyncio.Queue(maxsize=config.max_queue)
        self.slots = asyncio.Semaphore(config.max_concurrency)
        self.running = 0
        self._task: asyncio.Task[None] | None = None
        self._batches: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._batches) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def submit(
        self, key: tuple[Any, ...], run: Callable[[list[Any]], list[Any]], payload: Any
    ) -> Any:
        """Queue one job and wait for its result (503 when the queue is full, 504 on timeout)."""
        job = _Job(key, run, payload, asyncio.get_running_loop().create_future())
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            raise ServerError(
                503,
                f"server busy: {self.config.max_queue} requests are already queued; retry later",
                {"Retry-After": "1"},
            ) from None
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), self.config.timeout_s)
        except TimeoutError:
            job.future.cancel()
            raise ServerError(
                504, f"the request did not finish within {self.config.timeout_s:g} s"
            ) from None

    async def _loop(self) -> None:
        wait = self.config.batch_wait_ms / 1000.0
        loop = asyncio.get_running_loop()
        while True:
            await self.slots.acquire()
            batch = [await self.queue.get()]
            deadline = loop.time() + wait
            while len(batch) < self.config.max_batch:
                if not self.queue.empty():
                    batch.append(self.queue.get_nowait())
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), remaining))
                except TimeoutError:
                    break
            task = loop.create_task(self._run(batch))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)

    async def _run(self, batch: list[_Job]) -> None:
        self.running += 1
        try:
            groups: dict[tuple[Any, ...], list[_Job]] = {}
            for job in batch:
                if not job.future.done():  # timed out or cancelled while queued
                    groups.setdefault(job.key, []).append(job)
            for jobs in groups.values():
                try:
                    outcomes = await asyncio.to_thread(jobs[0].run, [j.payload for j in jobs])
                except Exception as error:  # handed to the waiting requests
                    outcomes = [error] * len(jobs)
                for job, outcome in zip(jobs, outcomes, strict=True):
                    if job.future.done():
                        continue
                    if isinstance(outcome, BaseException):
                        job.future.set_exception(outcome)
                    else:
                        job.future.set_result(outcome)
        finally:
            self.running -= 1
            self.slots.release()


# -- results -----------------------------------------------------------------------------------


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


def _png_base64(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _path_score(matrix: torch.Tensor | None, segment: Segment) -> float | None:
    return None if matrix is None else float(matrix[segment.mask_index, segment.category])


def overlay_of(result: SegmentationResult) -> np.ndarray:
    return render_overlay(result.image, result.panoptic, result.segments, result.vocabulary.names)


def result_payload(
    result: SegmentationResult, result_id: str, images: ImagesMode
) -> dict[str, Any]:
    """The JSON answer of ``/segment`` and ``/rescore``: each segment is the record of
    ``<stem>_panoptic.json`` (``records.segment_record``) plus its path scores, colour and RLE."""
    names = result.vocabulary.names
    colours = segment_colours(result.segments)  # the overlay's own colours, for the legend
    scores = result.scores
    segments = [
        {
            **segment_record(s, names, result.vocabulary.ids),  # as in <stem>_panoptic.json
            "s_clip": _path_score(scores.s_clip, s),
            "s_ret": _path_score(scores.s_ret, s),
            "s_iv": _path_score(scores.s_iv, s),
            "color": "#{:02x}{:02x}{:02x}".format(*colours[s.id]),
            "rle": encode_rle(result.panoptic == s.id),
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
        payload["overlay_png"] = _png_base64(overlay_of(result))
        payload["panoptic_png"] = _png_base64(id2rgb(result.panoptic))
    elif images == "url":
        payload["overlay_url"] = f"/results/{result_id}/overlay.png"
        payload["panoptic_url"] = f"/results/{result_id}/panoptic.png"
    return payload


# -- inputs ------------------------------------------------------------------------------------


def decode_image(data: bytes, name: str, max_pixels: int) -> np.ndarray:
    """``[H, W, 3]`` uint8 RGB of an uploaded file; the size limit is checked before decoding."""
    if not data:
        raise InputError(f"uploaded file {name!r} is empty; expected an image")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise InputError(f"uploaded file {name!r} is not a recognised image") from None
    if width * height > max_pixels:
        raise ServerError(
            413,
            f"image {name!r} is {width}x{height} = {width * height} pixels; the limit is "
            f"{max_pixels} pixels",
        )
    with tempfile.TemporaryDirectory(prefix="retclip-upload-") as tmp:
        path = Path(tmp) / "upload"
        path.write_bytes(data)
        try:
            return load_image(path)
        except InputError as error:
            raise InputError(str(error).replace(str(path), repr(name))) from None


async def read_upload(upload: UploadFile, what: str, limit: int) -> tuple[bytes, str]:
    """The bytes and a display name of an uploaded file (413 above ``limit``)."""
    name = Path(upload.filename or what).name or what
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise ServerError(413, f"{what} {name!r} is larger than the upload limit of {limit} bytes")
    return data, name


def decode_mask(data: bytes, name: str, shape: tuple[int, int]) -> np.ndarray:
    """``[H, W]`` bool of an uploaded mask image: non-zero (any channel) = the object."""
    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()
            array = np.asarray(opened.convert("L") if opened.mode not in ("L", "1") else opened)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise InputError(f"mask {name!r} is not a recognised image") from None
    if array.shape != shape:
        raise InputError(
            f"mask {name!r} is {array.shape[1]}x{array.shape[0]}, its image is "
            f"{shape[1]}x{shape[0]}; expected the same size"
        )
    mask = array.astype(bool)
    if not mask.any():
        raise InputError(f"mask {name!r} is empty; expected non-zero pixels on the object")
    return mask


def vocabulary_of(classes: str | None, vocab: str | None, max_classes: int) -> Vocabulary:
    """The request's vocabulary from exactly one of ``classes`` and a built-in ``vocab`` name."""
    if (classes is None or not classes.strip()) == (vocab is None or not vocab.strip()):
        raise InputError(
            "give exactly one of the form fields 'classes' (e.g. 'cat, dog|puppy') and 'vocab' "
            f"(one of {', '.join(BUILTIN_VOCABULARIES)})"
        )
    if vocab is not None and vocab.strip():
        if vocab.strip() not in BUILTIN_VOCABULARIES:
            raise InputError(
                f"unknown vocabulary {vocab!r}; expected one of {', '.join(BUILTIN_VOCABULARIES)}"
            )
        result = Vocabulary.builtin(vocab.strip())
    else:
        result = Vocabulary.from_string(classes or "")
    if len(result) > max_classes:
        raise InputError(f"{len(result)} classes; the limit is {max_classes}")
    return result


def settings_of(base: Settings, **changes: Any) -> Settings:
    """``base`` with the given (non-``None``) fields replaced, validated."""
    given = {key: value for key, value in changes.items() if value is not None}
    return dataclasses.replace(base, **given)


def _choose(name: str | None, allowed: Sequence[str], what: str) -> str:
    if name is None or not name.strip():
        return allowed[0]
    if name not in allowed:
        raise InputError(f"unknown {what} {name!r}; this server offers {', '.join(allowed)}")
    return name


# -- databases ---------------------------------------------------------------------------------


class Databases:
    """The databases under ``<data_dir>/databases``, opened once per committed state."""

    def __init__(self, data_dir: Path) -> None:
        self.root = (Path(data_dir) / "databases").resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._open: dict[str, FeatureDatabase] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._guard = threading.Lock()

    def path(self, name: str) -> Path:
        """The folder of database ``name``; names that could leave the data folder → 400."""
        if not _DB_NAME.match(name) or ".." in name:
            raise InputError(
                f"invalid database name {name!r}: expected 1-64 letters, digits, '_', '-' or '.',"
                " starting with a letter or digit"
            )
        path = (self.root / name).resolve()
        if path.parent != self.root:
            raise InputError(f"invalid database name {name!r}: it leaves the data directory")
        return path

    def lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def names(self) -> list[str]:
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and (p / "meta.json").is_file()
        )

    def get(self, name: str) -> FeatureDatabase:
        """The opened database (404 when missing)."""
        path = self.path(name)
        with self._guard:
            found = self._open.get(name)
        if found is not None:
            return found
        if not (path / "meta.json").is_file():
            raise ServerError(404, f"no database named {name!r}")
        opened = FeatureDatabase.open(path)
        with self._guard:
            return self._open.setdefault(name, opened)

    def replace(self, name: str, db: FeatureDatabase | None) -> None:
        with self._guard:
            if db is None:
                self._open.pop(name, None)
            else:
                self._open[name] = db

    def info(self, name: str) -> dict[str, Any]:
        info = self.get(name).info()
        info["path"] = name
        info["name"] = name
        return info


# -- the app -----------------------------------------------------------------------------------


class BodyLimit:
    """ASGI middleware: 413 once a request body exceeds ``limit`` bytes (declared or streamed)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = f"request body larger than the upload limit of {self.limit} bytes"
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await JSONResponse({"error": message}, status_code=413)(scope, receive, send)
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            incoming = await receive()
            if incoming["type"] == "http.request":
                received += len(incoming.get("body", b""))
                if received > self.limit:
                    raise ServerError(413, message)
            return incoming

        async def tracking_send(outgoing: Message) -> None:
            nonlocal started
            started = started or outgoing["type"] == "http.response.start"
            await send(outgoing)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except ServerError as error:
            if started:
                raise
            await JSONResponse({"error": str(error)}, status_code=error.status)(
                scope, receive, send
            )


class RescoreRequest(BaseModel):
    """Body of ``POST /rescore``: a result id and the settings to change."""

    model_config = ConfigDict(extra="forbid")

    result_id: str = Field(min_length=1, max_length=64)
    alpha: float | None = None
    beta: float | None = None
    gamma: float | None = None
    combine: Literal["linear", "fcclip"] | None = None
    score_threshold: float | None = None
    overlap_threshold: float | None = None
    images: ImagesMode = "base64"


class CreateDatabaseRequest(BaseModel):
    """Body of ``POST /databases``."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    backbone: str | None = None


def _status_of(error: RetclipError) -> int:
    if isinstance(error, ServerError):
        return error.status
    if isinstance(error, DatabaseMismatchError):
        return 409
    if isinstance(error, DatabaseError):
        return 409
    return 400


def _validation_message(error: RequestValidationError) -> str:
    parts = []
    for item in error.errors():
        location = [str(p) for p in item.get("loc", ()) if p not in ("body", "query", "path")]
        field = ".".join(location) or "request"
        parts.append(f"field {field!r}: {item.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def create_app(
    config: ServerConfig, *, extra_proposers: Mapping[str, MaskProposer] | None = None
) -> FastAPI:
    """The FastAPI app of ``retclip serve``; models load when the app starts (its lifespan).

    ``extra_proposers`` adds proposer objects under their names (a custom proposer, or a test's).
    """
    if extra_proposers:
        config = ServerConfig(
            **{
                **config.model_dump(),
                "proposers": (*config.proposers, *[p for p in extra_proposers if p != "gt"]),
            }
        )
    state: dict[str, Any] = {}
    databases = Databases(config.data_dir)
    results = ResultCache(config.result_cache_entries, config.result_cache_mb * 2**20)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine = await asyncio.to_thread(Engine, config, extra_proposers)
        dispatcher = Dispatcher(config)
        dispatcher.start()
        state.update(engine=engine, dispatcher=dispatcher)
        try:
            yield
        finally:
            await dispatcher.stop()
            state.clear()

    app = FastAPI(
        title="retclip",
        description="Open-vocabulary panoptic segmentation with retrieval augmentation.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimit, limit=config.max_upload_bytes)
    app.state.config = config
    app.state.results = results
    app.state.databases = databases

    def engine() -> Engine:
        found: Engine = state["engine"]
        return found

    def dispatcher() -> Dispatcher:
        found: Dispatcher = state["dispatcher"]
        return found

    app.state.queue_depth = lambda: dispatcher().queue.qsize()
    app.state.dispatcher_running = lambda: dispatcher().running

    @app.exception_handler(RetclipError)
    async def retclip_error(_: Request, error: RetclipError) -> JSONResponse:
        headers = error.headers if isinstance(error, ServerError) else None
        return JSONResponse({"error": str(error)}, status_code=_status_of(error), headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": _validation_message(error)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            {"error": str(error.detail)}, status_code=error.status_code, headers=error.headers
        )

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        incident = uuid.uuid4().hex[:12]
        log.error(
            "internal error %s on %s %s",
            incident,
            request.method,
            request.url.path,
            exc_info=error,
        )
        return JSONResponse(
            {"error": f"internal server error (incident {incident}; see the server log)"},
            status_code=500,
        )

    async def require_token(request: Request) -> None:
        if config.token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(
            given.strip().encode(), config.token.encode()
        ):
            raise ServerError(
                401,
                "this request writes and needs the server's token: "
                "send 'Authorization: Bearer <token>'",
                {"WWW-Authenticate": "Bearer"},
            )

    writer = [Depends(require_token)]

    async def run_segment(
        backbone: str, proposer: str, db_name: str | None, job: SegmentJob
    ) -> SegmentationResult:
        db = None if db_name is None else await asyncio.to_thread(databases.get, db_name)
        segmenter = await asyncio.to_thread(engine().segmenter, backbone, proposer, db_name, db)

        def run(jobs: list[SegmentJob]) -> list[Any]:
            return engine().segment_batch(segmenter, jobs)

        key = ("segment", backbone, proposer, db_name, -1 if db is None else db.generation)
        result: SegmentationResult = await dispatcher().submit(key, run, job)
        return result

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness and counters of model work (``segmented_images``, ``backbone_passes``)."""
        counters = dict(engine().counters)
        for key in ("segmented_images", "example_images", "backbone_passes", "rescored"):
            counters.setdefault(key, 0)
        return {
            "status": "ok",
            "counters": counters,
            "queued": dispatcher().queue.qsize(),
            "running": dispatcher().running,
            "results_cached": len(results),
        }

    @app.get("/models")
    async def models() -> dict[str, Any]:
        """The backbones and proposers this server offers (first = default), and its limits."""
        eng = engine()
        return {
            "backbones": [
                {
                    "name": name,
                    "default": i == 0,
                    "dim": eng.backbones[name].dim,
                    "fingerprint": eng.backbones[name].fingerprint.to_dict(),
                }
                for i, name in enumerate(config.backbones)
            ],
            "proposers": [
                {"name": name, "default": i == 0} for i, name in enumerate(config.proposers)
            ],
            "vocabularies": list(BUILTIN_VOCABULARIES),
            "defaults": dataclasses.asdict(Settings()),
            "limits": config.limits(),
            "token_required_for_writes": config.token is not None,
        }

    @app.post("/segment")
    async def segment(
        image: Annotated[UploadFile, File(description="The image (any format PIL reads).")],
        classes: Annotated[str | None, Form(description="'cat, dog|puppy, grass'")] = None,
        vocab: Annotated[str | None, Form(description="ade20k-150 or coco-panoptic-133")] = None,
        backbone: Annotated[str | None, Form()] = None,
        proposer: Annotated[str | None, Form()] = None,
        db: Annotated[str | None, Form(description="database name for retrieval")] = None,
        alpha: Annotated[float | None, Form()] = None,
        beta: Annotated[float | None, Form()] = None,
        gamma: Annotated[float | None, Form()] = None,
        combine: Annotated[Literal["linear", "fcclip"] | None, Form()] = None,
        score_threshold: Annotated[float | None, Form()] = None,
        overlap_threshold: Annotated[float | None, Form()] = None,
        images: Annotated[ImagesMode, Form()] = "base64",
    ) -> dict[str, Any]:
        """Segment an image with any vocabulary; the answer's ``result_id`` feeds ``/rescore``."""
        data, name = await read_upload(image, "image", config.max_upload_bytes)
        vocabulary = vocabulary_of(classes, vocab, config.max_classes)
        settings = settings_of(
            Settings(),
            alpha=alpha,
            beta=beta,
            gamma=gamma,
            combine=combine,
            score_threshold=score_threshold,
            overlap_threshold=overlap_threshold,
        )
        backbone_name = _choose(backbone, config.backbones, "backbone")
        proposer_name = _choose(proposer, config.proposers, "proposer")
        db_name = db.strip() if db is not None and db.strip() else None
        if db_name is not None:
            databases.path(db_name)
        pixels = await asyncio.to_thread(decode_image, data, name, config.max_image_pixels)
        job = SegmentJob(pixels, vocabulary, settings, name)
        result = await run_segment(backbone_name, proposer_name, db_name, job)
        result_id = results.put(result)
        payload = await asyncio.to_thread(result_payload, result, result_id, images)
        payload.update(backbone=backbone_name, proposer=proposer_name, db=db_name)
        return payload

    @app.post("/rescore")
    async def rescore(body: RescoreRequest) -> dict[str, Any]:
        """Re-combine a cached result's per-mask scores under new settings (no model pass)."""
        result = results.get(body.result_id)
        changes = body.model_dump(exclude={"result_id", "images"}, exclude_none=True)
        settings = settings_of(result.settings, **changes)
        rescored = await asyncio.to_thread(result.rescore, **dataclasses.asdict(settings))
        results.put(rescored, body.result_id)
        engine().count("rescored")
        return await asyncio.to_thread(result_payload, rescored, body.result_id, body.images)

    @app.get("/results/{result_id}/overlay.png", response_class=Response)
    async def overlay_png(result_id: str) -> Response:
        """The overlay of a cached result (tinted segments with labels)."""
        result = results.get(result_id)
        data = await asyncio.to_thread(lambda: base64.b64decode(_png_base64(overlay_of(result))))
        return Response(data, media_type="image/png")

    @app.get("/results/{result_id}/panoptic.png", response_class=Response)
    async def panoptic_png(result_id: str) -> Response:
        """The panoptic PNG of a cached result (segment id = R + 256 G + 256² B)."""
        result = results.get(result_id)
        data = await asyncio.to_thread(
            lambda: base64.b64decode(_png_base64(id2rgb(result.panoptic)))
        )
        return Response(data, media_type="image/png")

    @app.get("/databases")
    async def list_databases() -> dict[str, Any]:
        """Every database in the data directory with its size and backbone."""
        listed = []
        for name in await asyncio.to_thread(databases.names):
            try:
                info = await asyncio.to_thread(databases.info, name)
            except RetclipError as error:
                listed.append({"name": name, "error": str(error)})
                continue
            listed.append(
                {
                    "name": name,
                    "rows": info["rows"],
                    "labels": info["labels"],
                    "rows_per_class": info["rows_per_class"],
                    "fingerprint": info["fingerprint"],
                }
            )
        return {"databases": listed}

    def backbone_for(db: FeatureDatabase) -> str:
        for name, model in engine().backbones.items():
            if model.fingerprint == db.fingerprint and model.dim == db.dim:
                return name
        raise DatabaseMismatchError(
            f"database {db.path.name!r} was built with backbone {db.fingerprint}, which this "
            f"server does not offer ({', '.join(config.backbones)})"
        )

    @app.post("/databases", status_code=201, dependencies=writer)
    async def create_database(body: CreateDatabaseRequest) -> dict[str, Any]:
        """Create an empty database for one of the server's backbones."""
        path = databases.path(body.name)
        model = engine().backbones[_choose(body.backbone, config.backbones, "backbone")]
        async with databases.lock(body.name):
            if path.exists():
                raise ServerError(409, f"a database named {body.name!r} already exists")
            created = await asyncio.to_thread(
                FeatureDatabase.create, path, fingerprint=model.fingerprint, dim=model.dim
            )
            databases.replace(body.name, created)
        return await asyncio.to_thread(databases.info, body.name)

    @app.get("/databases/{name}")
    async def database_info(name: str) -> dict[str, Any]:
        """Rows, labels, rows per class, backbone fingerprint, index and history of a database."""
        return await asyncio.to_thread(databases.info, name)

    @app.delete("/databases/{name}", dependencies=writer)
    async def delete_database(name: str) -> dict[str, Any]:
        """Delete a whole database."""
        path = databases.path(name)
        async with databases.lock(name):
            if not (path / "meta.json").is_file():
                raise ServerError(404, f"no database named {name!r}")
            await asyncio.to_thread(shutil.rmtree, path)
            databases.replace(name, None)
        return {"deleted": name}

    @app.post("/databases/{name}/rows", dependencies=writer)
    async def add_rows(
        name: str,
        images: Annotated[list[UploadFile], File(description="Example images of the class(es).")],
        labels: Annotated[list[str], Form(description="One label for all, or one per image.")],
        masks: Annotated[list[UploadFile] | None, File(description="One mask per image.")] = None,
        use_proposer: Annotated[bool, Form()] = False,
        proposer: Annotated[str | None, Form()] = None,
        backbone: Annotated[str | None, Form()] = None,
        create: Annotated[bool, Form()] = True,
    ) -> dict[str, Any]:
        """Teach classes from example images: one row per image (its mask, or the whole image),
        or with ``use_proposer`` one row per mask a class-prompted proposer finds for the label."""
        path = databases.path(name)
        if len(images) > config.max_example_images:
            raise InputError(
                f"{len(images)} images; the limit is {config.max_example_images} per request"
            )
        names = [label.strip() for label in labels]
        if not names or not all(names):
            raise InputError("field 'labels' holds an empty label; expected class names")
        if len(names) == 1:
            names *= len(images)
        if len(names) != len(images):
            raise InputError(
                f"{len(labels)} labels for {len(images)} images; give one label for all images "
                "or one per image"
            )
        if masks and use_proposer:
            raise InputError("give either masks or use_proposer, not both")
        if masks and len(masks) != len(images):
            raise InputError(f"{len(masks)} masks for {len(images)} images; give one per image")
        exists = (path / "meta.json").is_file()
        if not exists and not create:
            raise ServerError(404, f"no database named {name!r}")
        if exists:
            db = await asyncio.to_thread(databases.get, name)
            model_name = backbone_for(db)
            if backbone is not None and backbone.strip() and backbone != model_name:
                raise DatabaseMismatchError(
                    f"database {name!r} holds features of backbone {model_name!r}, not {backbone!r}"
                )
        else:
            model_name = _choose(backbone, config.backbones, "backbone")
        model = engine().backbones[model_name]

        pixels: list[np.ndarray] = []
        sources: list[str] = []
        for upload in images:
            data, shown = await read_upload(upload, "image", config.max_upload_bytes)
            pixels.append(
                await asyncio.to_thread(decode_image, data, shown, config.max_image_pixels)
            )
            sources.append(f"upload/{hashlib.sha256(data).hexdigest()[:16]}/{shown}")
        job_masks: list[np.ndarray] = []
        row_labels: list[str] = []
        if use_proposer:
            chosen = _choose(proposer, config.proposers, "proposer")
            found = await asyncio.to_thread(
                _prompted_masks, engine().proposers[chosen], chosen, pixels, names
            )
            job_masks = found
            for masks_of, label in zip(found, names, strict=True):
                row_labels.extend([label] * len(masks_of))
        elif masks:
            for upload, image in zip(masks, pixels, strict=True):
                data, shown = await read_upload(upload, "mask", config.max_upload_bytes)
                job_masks.append(decode_mask(data, shown, image.shape[:2])[None])
            row_labels = list(names)
        else:
            job_masks = [np.ones((1, *p.shape[:2]), dtype=bool) for p in pixels]
            row_labels = list(names)
        row_sources = [s for s, m in zip(sources, job_masks, strict=True) for _ in range(len(m))]

        def run(jobs: list[FeatureJob]) -> list[Any]:
            return [engine().features(model, j) for j in jobs]

        features = await dispatcher().submit(
            ("features", uuid.uuid4().hex), run, FeatureJob(pixels, job_masks)
        )
        areas = np.array([int(m.sum()) for ms in job_masks for m in ms], dtype=np.int64)

        def write() -> tuple[FeatureDatabase, int]:
            if (path / "meta.json").is_file():
                target = FeatureDatabase.open(path)
            else:
                target = FeatureDatabase.create(path, fingerprint=model.fingerprint, dim=model.dim)
            added = target.add(
                features,
                row_labels,
                sources=row_sources,
                mask_areas=areas,
                build_id=_BUILD_ID,
            )
            return target, added

        async with databases.lock(name):
            updated, added = await asyncio.to_thread(write)
            databases.replace(name, updated)
        info = await asyncio.to_thread(databases.info, name)
        return {"added_rows": added, "labels": sorted(set(row_labels)), "database": info}

    @app.delete("/databases/{name}/classes/{label}", dependencies=writer)
    async def remove_class(name: str, label: str) -> dict[str, Any]:
        """Delete every row of one class."""
        path = databases.path(name)
        async with databases.lock(name):
            if not (path / "meta.json").is_file():
                raise ServerError(404, f"no database named {name!r}")

            def remove() -> tuple[FeatureDatabase, int]:
                target = FeatureDatabase.open(path)
                return target, target.remove_classes([label])

            updated, removed = await asyncio.to_thread(remove)
            databases.replace(name, updated)
        info = await asyncio.to_thread(databases.info, name)
        return {"removed_rows": removed, "database": info}

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def _prompted_masks(
    proposer: MaskProposer, name: str, images: Sequence[np.ndarray], labels: Sequence[str]
) -> list[np.ndarray]:
    """Per image, the masks a class-prompted proposer labels with the image's label."""
    found = []
    for image, label in zip(images, labels, strict=True):
        proposals = proposer.propose(SourceImage(image), Vocabulary([VocabClass(label)]))
        if proposals.class_hints is None:
            raise InputError(
                f"proposer {name!r} gives no class per mask, so it cannot find the labelled "
                "object: upload a mask per image, or leave use_proposer off to use whole images"
            )
        keep = (proposals.class_hints == 0) & proposals.masks.any(axis=(1, 2))
        if not keep.any():
            raise InputError(
                f"proposer {name!r} found no {label!r} in an example image; upload a mask or "
                "use the whole image"
            )
        found.append(proposals.masks[keep])
    return found
