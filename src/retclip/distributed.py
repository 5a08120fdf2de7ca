"""Database builds and evaluation model passes on a Ray cluster (``--ray``, ``retclip[ray]``).

Ray Data reads the items, decodes images in parallel tasks, and runs the model stage in an actor
pool: each actor builds its models once, from the same factory the single-process path uses
(``ModelSpec.load`` / ``build_segmenter``), on a GPU when the cluster has them. Results travel
back to the driver, which is the only writer:

- a build's unit of work is a commit batch: a worker passes its images through the models
  together (:func:`~retclip.database.build.batch_rows`, as the single-process build does) and
  the driver commits each batch with the database's atomic protocol (:func:`~retclip.database.
  build.commit_rows`, recording its images as completed by the build), in item order, so the
  database equals the single-process build's row for row, to the bit, and a build killed
  anywhere (driver or worker) resumes with nothing lost or duplicated: a worker that dies has
  its block retried by Ray, and the driver takes each batch's result once;
- an evaluation writes each image's scores into the :class:`~retclip.evaluation.cache.
  ScoreCache` as it arrives (the cache stays resumable) and scores the metrics itself.

The model work is :func:`~retclip.database.build.batch_rows` and ``Segmenter.__call__``, the
functions the single-process paths call. Errors caused by input (a corrupt image, a model that is
not available on a node) travel back as results and are raised by the driver where the
single-process path would raise them. Image paths, ground truth and databases are read by the
workers: on a multi-node cluster they must be on storage every node sees.

This module imports Ray only when a session starts; without it, ``--ray`` is one error line
naming ``pip install 'retclip[ray]'``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
import pickle
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
from tqdm import tqdm

from retclip.acceleration import Precision, autocast, check_precision
from retclip.backbones.base import Backbone
from retclip.database.build import (
    BuildItem,
    BuildReport,
    ImageRows,
    batch_rows,
    commit_images,
    commit_rows,
    pending_items,
)
from retclip.database.store import FeatureDatabase
from retclip.errors import InputError, RetclipError, require_extra
from retclip.evaluation.cache import ScoreCache
from retclip.evaluation.datasets import EvalDataset
from retclip.images import load_image
from retclip.pooling import PoolingMode
from retclip.proposers.base import MaskProposer, Proposals
from retclip.segmenter import MaskScores, Segmenter
from retclip.vocabulary import Vocabulary

__all__ = [
    "RayCluster",
    "RayShardMap",
    "build_database_on_ray",
    "ray_session",
    "run_model_on_ray",
]

#: The Python modules of the ``ray`` extra.
RAY_MODULES = ("ray", "pyarrow")
#: Images per Ray Data block (what Ray retries when a worker dies; a build's blocks hold whole
#: commit batches), once there are four blocks per worker to share out.
BLOCK_IMAGES = 16
#: Model workers one decode task serves.
DECODE_SHARE = 4
#: Shards listed at once per CPU of the cluster (:class:`RayShardMap`).
SHARDS_IN_FLIGHT_PER_CPU = 2

ModelFactory = Callable[[], tuple[Backbone, MaskProposer | None]]


@dataclasses.dataclass(frozen=True)
class RayCluster:
    """Where and how wide the model stage runs.

    Attributes:
        address: ``"local"`` starts a Ray for the run (every CPU and GPU of this machine),
            ``"auto"`` joins the cluster this machine belongs to, anything else is a Ray address
            (``HOST:PORT``, ``ray://HOST:PORT``).
        workers: model actors; ``None``: one per GPU (``1 / gpus_per_worker`` per GPU), or one
            per CPU on a cluster without GPUs.
        gpus_per_worker: GPUs each actor holds; ``None``: 1 when the cluster has GPUs, else 0
            (the actor holds one CPU instead).
    """

    address: str = "local"
    workers: int | None = None
    gpus_per_worker: float | None = None

    def __post_init__(self) -> None:
        if not self.address.strip():
            raise InputError("--ray needs an address: local, auto, HOST:PORT or ray://HOST:PORT")
        if self.workers is not None and self.workers < 1:
            raise InputError(f"--workers must be >= 1, got {self.workers}")
        if self.gpus_per_worker is not None and not 0 <= self.gpus_per_worker <= 64:
            raise InputError(f"--gpus-per-worker must lie in [0, 64], got {self.gpus_per_worker}")


@dataclasses.dataclass(frozen=True)
class _Resources:
    """The model stage's actor count and per-actor Ray resources."""

    workers: int
    num_cpus: float
    num_gpus: float


def _resources(ray: Any, cluster: RayCluster, fixed: bool) -> _Resources:
    """Actors and their resources on the cluster as it is now; on a ``fixed`` one (a Ray started
    for the run), a pool that cannot fit is refused instead of waiting forever."""
    total = ray.cluster_resources()
    cpus, gpus = float(total.get("CPU", 0)), float(total.get("GPU", 0))
    per_gpu = cluster.gpus_per_worker if cluster.gpus_per_worker is not None else float(gpus >= 1)
    if cluster.workers is not None:
        workers = cluster.workers
    elif per_gpu > 0:
        workers = max(1, int(gpus // per_gpu))
    else:
        workers = max(1, int(cpus))
    if fixed:
        need_cpus, need_gpus = workers, workers * per_gpu
        if need_cpus > cpus or need_gpus > gpus + 1e-9:
            raise InputError(
                f"{workers} Ray workers need {need_cpus} CPUs and {need_gpus:g} GPUs; this "
                f"machine has {cpus:g} CPUs and {gpus:g} GPUs: lower --workers or "
                "--gpus-per-worker"
            )
    return _Resources(workers, 1.0, per_gpu)


#: For each open :func:`ray_session`, innermost last: whether its Ray was started for the run.
_FIXED_SESSIONS: list[bool] = []


@contextlib.contextmanager
def ray_session(cluster: RayCluster) -> Iterator[tuple[Any, _Resources]]:
    """Ray, connected as ``cluster`` says (or as it already is in this process), and the model
    stage's resources. A Ray this session started is shut down at its end."""
    require_extra("ray", "--ray", RAY_MODULES)
    import ray
    import ray.data

    started = not ray.is_initialized()
    # a session inside another (the shards listed, then the build) keeps the outer one's rule
    fixed = _FIXED_SESSIONS[-1] if _FIXED_SESSIONS else started and cluster.address == "local"
    if started:
        options: dict[str, Any] = {"logging_level": logging.WARNING}
        if cluster.address == "local":
            options["include_dashboard"] = False
        try:
            ray.init(address=cluster.address, **options)
        except (ConnectionError, ValueError) as error:
            raise InputError(
                f"cannot reach a Ray cluster at {cluster.address!r}: {error}"
            ) from None
    context = ray.data.DataContext.get_current()
    saved = (context.execution_options.preserve_order, context.enable_progress_bars)
    # Ray Data at WARNING; its progress-bar module also warns that the bars are off, which
    # they are on purpose: the driver's bar counts committed images
    loggers = [logging.getLogger(n) for n in ("ray.data", "ray.data._internal.progress")]
    saved_levels = [logger.level for logger in loggers]
    try:
        context.enable_progress_bars = False
        for logger, level in zip(loggers, (logging.WARNING, logging.ERROR), strict=True):
            logger.setLevel(level)
        _FIXED_SESSIONS.append(fixed)
        yield ray, _resources(ray, cluster, fixed)
    finally:
        if _FIXED_SESSIONS:
            _FIXED_SESSIONS.pop()
        context.execution_options.preserve_order, context.enable_progress_bars = saved
        for logger, level in zip(loggers, saved_levels, strict=True):
            logger.setLevel(level)
        if started:
            ray.shutdown()


class ImageTask(Protocol):
    """One unit of a distributed run (picklable: it travels to the decode tasks): an image, or
    the images of one commit batch, and how to read them."""

    def load(self) -> Any:
        """What the model stage takes (``[H, W, 3]`` uint8 RGB, or a list of them); raises
        :class:`InputError` naming the image."""
        ...


@dataclasses.dataclass(frozen=True)
class _ImageFile:
    """An image file to segment (evaluation)."""

    source: str

    def load(self) -> np.ndarray:
        return load_image(self.source)


#: What a worker's models do with one decoded task (an image, or a batch's images).
Run = Callable[[Any, Any], Any]


def _error_payload(error: RetclipError) -> bytes:
    return pickle.dumps(error)


def _decode(batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """Decode stage (Ray tasks): each task's pixels (pickled: a batch's images differ in
    size), or the input error reading them raised."""
    pixels, errors = [], []
    for task in batch["task"].tolist():
        try:
            pixels.append(pickle.dumps(pickle.loads(task).load()))
            errors.append(b"")
        except RetclipError as error:
            pixels.append(b"")
            errors.append(_error_payload(error))
    return {
        **batch,
        "pixels": np.array(pixels, dtype=object),
        "error": np.array(errors, dtype=object),
    }


class _StageWorker:
    """Model stage (a Ray actor): its models are built once, by ``setup``; each image gives a
    pickled result, or the pickled input error it raised (the driver raises it)."""

    def __init__(self, setup: Callable[[], Run]) -> None:
        self._run: Run | None = None
        self._error = b""
        try:
            self._run = setup()
        except RetclipError as error:  # e.g. a model missing on this node: every result says so
            self._error = _error_payload(error)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        payloads = []
        for task, pixels, error in zip(batch["task"], batch["pixels"], batch["error"], strict=True):
            if error or self._run is None:
                payloads.append(error or self._error)
                continue
            try:
                payloads.append(pickle.dumps(self._run(pickle.loads(task), pickle.loads(pixels))))
            except RetclipError as exc:
                payloads.append(_error_payload(exc))
        return {"position": batch["position"], "payload": np.array(payloads, dtype=object)}


def _stream(
    ray: Any,
    resources: _Resources,
    tasks: Sequence[ImageTask],
    setup: Callable[[], Run],
    *,
    ordered: bool,
    per_block: int = BLOCK_IMAGES,
) -> Generator[tuple[int, Any], None, None]:
    """``(position, result)`` of each task through decode → model stage (``per_block`` tasks
    to a Ray Data block, once there are four blocks per worker).

    Input errors are yielded as results (exceptions), at their position; with ``ordered`` the
    results come in task order. A task whose block Ray retried is yielded once.
    """
    import ray.data

    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = ordered
    blocks = min(len(tasks), max(4 * resources.workers, math.ceil(len(tasks) / per_block)))
    dataset = ray.data.from_items(
        [{"position": i, "task": pickle.dumps(task)} for i, task in enumerate(tasks)],
        override_num_blocks=blocks,
    )
    dataset = dataset.map_batches(
        _decode,
        batch_size=None,
        batch_format="numpy",
        # decoding is light beside the models (a few ms an image against tenths of a second):
        # a task per DECODE_SHARE workers keeps up, and it reserves no CPU, so model actors
        # holding every CPU of a machine cannot starve it. Ray's default placement, not Ray
        # Data's SPREAD: spread, these zero-CPU tasks cost seconds each on a two-node cluster
        num_cpus=0,
        compute=ray.data.TaskPoolStrategy(size=math.ceil(resources.workers / DECODE_SHARE)),
        scheduling_strategy="DEFAULT",
    )
    dataset = dataset.map_batches(
        _StageWorker,
        fn_constructor_args=(setup,),
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=resources.workers),
        num_cpus=resources.num_cpus,
        num_gpus=resources.num_gpus,
    )
    seen: set[int] = set()
    for row in dataset.iter_rows():
        position = int(row["position"])
        if position in seen:
            continue
        seen.add(position)
        yield position, pickle.loads(row["payload"])
    if len(seen) != len(tasks):
        raise RuntimeError(f"the Ray pipeline returned {len(seen)} of {len(tasks)} images")


# -- database builds ----------------------------------------------------------------------


def _list_shard(list_items: Callable[[str], list[BuildItem]], shard: str) -> bytes:
    """Shard listing (a Ray task): the shard's items, or the input error reading it raised."""
    try:
        return pickle.dumps(list_items(shard))
    except RetclipError as error:
        return _error_payload(error)


class RayShardMap:
    """A :data:`~retclip.database.sources.ShardMap` on Ray: one task per shard reads its
    headers and captions where the cluster has a free CPU, a few shards per CPU at a time, and
    the results come back in shard order (so the items are the single-process reader's). Use it
    inside :func:`ray_session`; ``tasks`` counts the shards read on the cluster."""

    def __init__(self, ray: Any) -> None:
        self._ray = ray
        self.tasks = 0

    def __call__(
        self, list_items: Callable[[str], list[BuildItem]], shards: Sequence[str]
    ) -> Generator[list[BuildItem], None, None]:
        ray = self._ray
        task = ray.remote(_list_shard)
        function = ray.put(list_items)
        window = max(1, int(ray.cluster_resources().get("CPU", 1)) * SHARDS_IN_FLIGHT_PER_CPU)
        pending: list[Any] = []
        queued = iter(shards)
        try:
            while True:
                for shard in itertools.islice(queued, window - len(pending)):
                    pending.append(task.remote(function, shard))
                    self.tasks += 1
                if not pending:
                    return
                result = pickle.loads(ray.get(pending.pop(0)))
                if isinstance(result, BaseException):
                    raise result
                yield result
        finally:  # stopped early (a limit, an error): the shards still being read are dropped
            for ref in pending:
                ray.cancel(ref)


@dataclasses.dataclass(frozen=True)
class _BuildBatch:
    """The images of one commit batch (a Ray row): what the single-process build passes through
    the models together, so a worker computes exactly its rows."""

    items: tuple[BuildItem, ...]

    def load(self) -> list[np.ndarray]:
        return [item.load() for item in self.items]


@dataclasses.dataclass(frozen=True)
class _BuildSetup:
    """Builds a worker's models and checks they are the driver's (the same recipe)."""

    load_models: ModelFactory
    fingerprint: str
    pooling: PoolingMode
    precision: Precision = "fp32"

    def __call__(self) -> Callable[[_BuildBatch, list[np.ndarray]], list[ImageRows]]:
        backbone, proposer = self.load_models()
        if proposer is None:
            raise InputError("building a database needs a proposer: give --proposer")
        if backbone.fingerprint.key() != self.fingerprint:
            raise InputError(
                f"a Ray worker loaded backbone {backbone.fingerprint}, not the driver's: "
                "install the same models on every node"
            )
        check_precision(self.precision, backbone.device)

        def run(batch: _BuildBatch, images: list[np.ndarray]) -> list[ImageRows]:
            with autocast(self.precision, backbone.device):
                return batch_rows(backbone, proposer, batch.items, images, pooling=self.pooling)

        return run


def build_database_on_ray(
    db: FeatureDatabase,
    backbone: Backbone,
    proposer: MaskProposer,
    items: Sequence[BuildItem],
    *,
    load_models: ModelFactory,
    cluster: RayCluster,
    build_id: str,
    batch_size: int = 8,
    pooling: PoolingMode = "soft",
    synonyms: Mapping[str, Sequence[str]] | None = None,
    precision: Precision = "fp32",
    commit_every: int | None = None,
    progress: bool = True,
    on_commit: Callable[[int], None] | None = None,
) -> BuildReport:
    """:func:`~retclip.database.build.build_database` with the model passes on Ray workers.

    ``backbone`` and ``proposer`` are the driver's copies, used for the same checks as the
    single-process build (the database's recipe, a class-prompted proposer); each worker builds
    its own with ``load_models`` (a picklable factory, e.g. ``ModelSpec.load``) and refuses to run
    if its backbone's fingerprint differs. The unit of work is the single-process build's: a
    commit batch of ``batch_size`` images, through :func:`~retclip.database.build.batch_rows`
    together (under ``precision``'s autocast) on one worker; the driver commits the batches in
    item order, consecutive batches of at least ``commit_every`` images together. So the result
    equals the single-process build's row for row, to the bit, in the same commits, and an
    interrupted build resumes like one.
    """
    todo = pending_items(
        db, backbone, proposer, items, build_id=build_id, batch_size=batch_size, pooling=pooling
    )
    commit_size = commit_images(batch_size, commit_every)
    report = BuildReport(skipped=len(items) - len(todo))  # precision: checked on the workers
    if not todo:
        return report
    batches = [
        _BuildBatch(tuple(todo[start : start + batch_size]))
        for start in range(0, len(todo), batch_size)
    ]
    setup = _BuildSetup(load_models, backbone.fingerprint.key(), pooling, precision)
    waiting: dict[int, list[ImageRows] | BaseException] = {}
    gathered: list[ImageRows] = []  # rows of the batches the next commit holds
    done = committed = 0
    per_block = max(1, BLOCK_IMAGES // batch_size)
    with (
        ray_session(cluster) as (ray, resources),
        tqdm(total=len(todo), unit="img", desc="db build (ray)", disable=not progress) as bar,
        contextlib.closing(
            _stream(ray, resources, batches, setup, ordered=True, per_block=per_block)
        ) as results,
    ):
        for position, result in results:
            waiting[position] = result
            while done in waiting:  # batch order, whatever order results arrive in
                parts = waiting.pop(done)
                done += 1
                if isinstance(parts, BaseException):
                    raise parts
                report.dropped_masks += sum(p.dropped for p in parts)
                gathered.extend(parts)
                if len(gathered) < commit_size and done < len(batches):
                    continue
                report.rows += commit_rows(db, gathered, build_id=build_id, synonyms=synonyms)
                report.images += len(gathered)
                committed += 1
                bar.update(len(gathered))
                bar.set_postfix(rows=report.rows)
                gathered = []
                if on_commit is not None:
                    on_commit(committed)
    return report


# -- evaluation -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _SegmentSetup:
    """Builds a worker's segmenter; each image gives what the score cache stores."""

    make_segmenter: Callable[[], Segmenter]
    vocabulary: Vocabulary

    def __call__(self) -> Callable[[_ImageFile, np.ndarray], tuple[Proposals, dict[str, Any]]]:
        segmenter = self.make_segmenter()

        def run(task: _ImageFile, image: np.ndarray) -> tuple[Proposals, dict[str, Any]]:
            result = segmenter(image, self.vocabulary, source=task.source)
            found = result.proposals
            kept = Proposals(masks=found.masks, scores=found.scores, mask_probs=found.mask_probs)
            return kept, result.scores.to_numpy()

        return run


def run_model_on_ray(
    dataset: EvalDataset,
    indices: Sequence[int],
    cache: ScoreCache,
    make_segmenter: Callable[[], Segmenter],
    vocabulary: Vocabulary,
    *,
    cluster: RayCluster,
    progress: bool = True,
) -> int:
    """:func:`~retclip.evaluation.loop.run_model` with the images segmented on Ray workers
    (``make_segmenter``: a picklable factory, built once per worker); the driver writes each
    image's scores into ``cache`` as they arrive. Returns how many images ran."""
    todo = [i for i in indices if not cache.has(dataset.stem(i))]
    if not todo:
        return 0
    tasks = [_ImageFile(str(dataset.image_path(i))) for i in todo]
    setup = _SegmentSetup(make_segmenter, vocabulary)
    with (
        ray_session(cluster) as (ray, resources),
        tqdm(total=len(todo), desc="segment (ray)", unit="img", disable=not progress) as bar,
        contextlib.closing(_stream(ray, resources, tasks, setup, ordered=False)) as results,
    ):
        for position, result in results:
            if isinstance(result, BaseException):
                raise result
            proposals, scores = result
            stem = dataset.stem(todo[position])
            cache.save(stem, proposals, MaskScores.from_numpy(scores), vocabulary.names)
            bar.update(1)
    return len(todo)
