"""The HTTP API and web page of ``retclip serve`` (FastAPI): the app and its routes.

Reference: ``docs/serve.md``. The parts, one job each: :mod:`~retclip.server.config` (settings),
:mod:`~retclip.server.engine` (models and segmenters), :mod:`~retclip.server.batching` (the
job queue), :mod:`~retclip.server.payloads` (result cache and JSON), :mod:`~retclip.server.
uploads` (checking what requests bring), :mod:`~retclip.server.databases` (the named databases).

Request flow: an upload is size-checked while it streams in (:class:`BodyLimit`), decoded with the
image-size limit checked from the header before any pixel is decoded, and queued as a job. One
dispatcher takes queued jobs in micro-batches (everything already waiting, up to ``max_batch``,
optionally waiting ``batch_wait_ms`` for more) and runs at most ``max_concurrency`` batches at once
in worker threads; within a batch the images of one size share a single backbone pass. A full
queue answers 503, a job that does not finish within ``timeout_s`` answers 504.

Results stay in a byte-bounded LRU cache under a random id, so ``POST /rescore`` re-combines the
cached per-mask scores under new α/β/γ and thresholds with no model pass. Database writes hold a
per-database asyncio lock (one writer per database in this process) and the store's file lock
(one writer across processes); each write reopens the database, so segmentations in flight keep
reading their snapshot. User errors (:class:`RetclipError`) become 4xx JSON ``{"error": ...}``;
anything else is logged and answered with a bare 500. The routes are closures of
:func:`create_app` over one app's state, which is this module's single job.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import logging
import secrets
import shutil
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from retclip.database import FeatureDatabase
from retclip.errors import DatabaseError, DatabaseMismatchError, InputError, RetclipError
from retclip.images import SourceImage, id2rgb
from retclip.proposers.base import MaskProposer
from retclip.segmenter import SegmentationResult, Settings
from retclip.server.batching import Dispatcher
from retclip.server.config import ServerConfig, ServerError
from retclip.server.databases import Databases
from retclip.server.engine import Engine, FeatureJob, SegmentJob
from retclip.server.guards import HostAndOriginGuard
from retclip.server.payloads import (
    ImagesMode,
    ResultCache,
    compare_payload,
    overlay_of,
    png_base64,
    result_payload,
)
from retclip.server.uploads import (
    BodyLimit,
    choose,
    decode_image,
    decode_mask,
    read_upload,
    settings_of,
    vocabulary_of,
)
from retclip.vocabulary import BUILTIN_VOCABULARIES, VocabClass, Vocabulary

__all__ = ["ServerConfig", "ServerError", "create_app"]

log = logging.getLogger("retclip.server")

STATIC_DIR = Path(__file__).parent / "static"
_BUILD_ID = "serve"


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
    compare: bool = False


class CreateDatabaseRequest(BaseModel):
    """Body of ``POST /databases``."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    backbone: str | None = None


def hide_paths(message: str, root: Path) -> str:
    """``message`` with the server's database folder left out: a database is named, never
    located (a path would tell a client how the server's disk is laid out)."""
    for prefix in {str(root), str(root.resolve())}:
        message = message.replace(prefix + "/", "").replace(prefix, "<databases>")
    return message


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
    config: ServerConfig,
    *,
    extra_proposers: Mapping[str, MaskProposer] | None = None,
    preloaded: Engine | None = None,
) -> FastAPI:
    """The FastAPI app of ``retclip serve``; models load when the app starts (its lifespan).

    ``extra_proposers`` adds proposer objects under their names (a custom proposer, or a test's).
    ``preloaded`` is an engine already loaded for ``config`` (``retclip serve`` loads the models
    before it listens, so a bad model name is a one-line error, not a failed start-up).
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
        loaded = preloaded or await asyncio.to_thread(Engine, config, extra_proposers)
        dispatcher = Dispatcher(config)
        dispatcher.start()
        state.update(engine=loaded, dispatcher=dispatcher)
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
    app.add_middleware(
        HostAndOriginGuard,
        allowed_hosts=config.allowed_hosts,
        allowed_origins=config.allowed_origins,
    )
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
        message = hide_paths(str(error), databases.root)
        return JSONResponse({"error": message}, status_code=_status_of(error), headers=headers)

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
        result: SegmentationResult = await dispatcher().submit(
            key, run, job, on_timeout=job.cancelled.set
        )
        return result

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness and counters of model work (``segmented_images``, ``backbone_passes``)."""
        counters = dict(engine().counters)
        for key in (
            "segmented_images",
            "example_images",
            "backbone_passes",
            "rescored",
            "cancelled_jobs",
        ):
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
            "default_database": config.default_database,
            "defaults": dataclasses.asdict(Settings()),
            "limits": config.limits(),
            "token_required_for_writes": config.token is not None,
        }

    @app.post("/segment")
    async def segment(
        image: Annotated[UploadFile, File(description="The image (any format PIL reads).")],
        classes: Annotated[str | None, Form(description="'cat, dog|puppy, grass'")] = None,
        vocab: Annotated[
            str | None,
            Form(description="ade20k-150, coco-panoptic-133, or db: the labels of 'db'"),
        ] = None,
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
        compare: Annotated[
            bool, Form(description="also CLIP only / retrieval only / RetCLIP side by side")
        ] = False,
    ) -> dict[str, Any]:
        """Segment an image with any vocabulary; the answer's ``result_id`` feeds ``/rescore``."""
        data, name = await read_upload(image, "image", config.max_upload_bytes)
        db_name = db.strip() if db is not None and db.strip() else None
        opener = None if db_name is None else (lambda: databases.get(db_name))
        vocabulary = await asyncio.to_thread(
            vocabulary_of, classes, vocab, config.max_classes, opener
        )
        settings = settings_of(
            Settings(),
            alpha=alpha,
            beta=beta,
            gamma=gamma,
            combine=combine,
            score_threshold=score_threshold,
            overlap_threshold=overlap_threshold,
        )
        backbone_name = choose(backbone, config.backbones, "backbone")
        proposer_name = choose(proposer, config.proposers, "proposer")
        if db_name is not None:
            databases.path(db_name)
        pixels = await asyncio.to_thread(decode_image, data, name, config.max_image_pixels)
        job = SegmentJob(pixels, vocabulary, settings, name)
        result = await run_segment(backbone_name, proposer_name, db_name, job)
        result_id = results.put(result)
        payload = await asyncio.to_thread(result_payload, result, result_id, images)
        payload.update(backbone=backbone_name, proposer=proposer_name, db=db_name)
        if compare:
            payload["compare"] = await asyncio.to_thread(compare_payload, result)
        return payload

    @app.post("/rescore")
    async def rescore(body: RescoreRequest) -> dict[str, Any]:
        """Re-combine a cached result's per-mask scores under new settings (no model pass)."""
        result = results.get(body.result_id)
        changes = body.model_dump(exclude={"result_id", "images", "compare"}, exclude_none=True)
        settings = settings_of(result.settings, **changes)
        rescored = await asyncio.to_thread(result.rescore, **dataclasses.asdict(settings))
        results.put(rescored, body.result_id)
        engine().count("rescored")
        payload = await asyncio.to_thread(result_payload, rescored, body.result_id, body.images)
        if body.compare:
            payload["compare"] = await asyncio.to_thread(compare_payload, rescored)
        return payload

    @app.get("/results/{result_id}/overlay.png", response_class=Response)
    async def overlay_png(result_id: str) -> Response:
        """The overlay of a cached result (tinted segments with labels)."""
        result = results.get(result_id)
        data = await asyncio.to_thread(lambda: base64.b64decode(png_base64(overlay_of(result))))
        return Response(data, media_type="image/png")

    @app.get("/results/{result_id}/panoptic.png", response_class=Response)
    async def panoptic_png(result_id: str) -> Response:
        """The panoptic PNG of a cached result (segment id = R + 256 G + 256² B)."""
        result = results.get(result_id)
        data = await asyncio.to_thread(
            lambda: base64.b64decode(png_base64(id2rgb(result.panoptic)))
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
        model = engine().backbones[choose(body.backbone, config.backbones, "backbone")]
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
            model_name = choose(backbone, config.backbones, "backbone")
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
            chosen = choose(proposer, config.proposers, "proposer")
            found = await asyncio.to_thread(
                _prompted_masks, engine().proposers[chosen], chosen, pixels, names
            )
            job_masks = found
            for masks_of, label in zip(found, names, strict=True):
                row_labels.extend([label] * len(masks_of))
        elif masks:
            for upload, image in zip(masks, pixels, strict=True):
                data, shown = await read_upload(upload, "mask", config.max_upload_bytes)
                mask = await asyncio.to_thread(decode_mask, data, shown, image.shape[:2])
                job_masks.append(mask[None])
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
