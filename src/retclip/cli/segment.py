"""``retclip segment``: images (files, folders or globs) and a vocabulary in, the five output
files per image out, and a ``manifest.jsonl`` line per image."""

from __future__ import annotations

import glob
import itertools
import json
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from retclip.cli.options import (
    CleanErrorsCommand,
    batch_size_option,
    ensemble_options,
    model_options,
    output_dir,
    pipeline_spec,
    retrieval_options,
    train_vocab_option,
    with_options,
)
from retclip.errors import InputError, RetclipError
from retclip.pipeline import ModelSpec

#: File name endings ``segment`` picks up when it walks a folder or expands a glob.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MANIFEST_NAME = "manifest.jsonl"


@dataclass(frozen=True)
class ImageTask:
    """One image to segment: its path, where its outputs go (``out/<rel>/<stem>_*``) and whether
    it was named explicitly (then it must be readable before anything runs)."""

    path: Path
    out_dir: Path
    stem: str
    explicit: bool


def collect_images(arguments: tuple[Path, ...], out: Path, recursive: bool) -> list[ImageTask]:
    """The images named by files, folders (their images; ``recursive``: and below) and glob
    patterns, in argument order and sorted within a folder or pattern. Outputs of an image found
    in a folder keep its sub-folder under ``out``, so equal names in two folders cannot collide.
    """
    tasks: list[ImageTask] = []
    for argument in arguments:
        if argument.is_dir():
            found = argument.rglob("*") if recursive else argument.glob("*")
            for path in sorted(p for p in found if _is_image_name(p)):
                rel = path.relative_to(argument).parent
                tasks.append(ImageTask(path, out / rel, path.stem, explicit=False))
        elif argument.exists():
            tasks.append(ImageTask(argument, out, argument.stem, explicit=True))
        elif glob.has_magic(str(argument)):
            matches = sorted(
                Path(p) for p in glob.glob(str(argument), recursive=recursive) if Path(p).is_file()
            )
            matches = [p for p in matches if _is_image_name(p)]
            if not matches:
                raise InputError(f"no image matches {argument}")
            tasks.extend(ImageTask(p, out, p.stem, explicit=False) for p in matches)
        else:
            raise InputError(f"image not found: {argument}")
    if not tasks:
        raise InputError(
            f"no images in {', '.join(map(str, arguments))} "
            f"(looked for {', '.join(IMAGE_SUFFIXES)}"
            + ("" if recursive else "; --recursive also looks in sub-folders")
            + ")"
        )
    seen: dict[tuple[Path, str], Path] = {}
    for task in tasks:
        key = (task.out_dir, task.stem)
        if key in seen and seen[key] != task.path:
            raise InputError(
                f"{seen[key]} and {task.path} share the name stem {task.stem!r} in one output "
                "folder; their outputs would collide"
            )
        seen[key] = task.path
    return list({(t.out_dir, t.stem): t for t in tasks}.values())


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def outputs_complete(task: ImageTask) -> bool:
    """All of an image's output files exist (the scores file is written last)."""
    from retclip.outputs.files import output_paths

    paths = [*output_paths(task.out_dir, task.stem).values()]
    paths.append(task.out_dir / f"{task.stem}_scores.npz")
    return all(p.is_file() for p in paths)


class Manifest:
    """``manifest.jsonl`` in the output folder: one JSON line per image, each appended by one
    ``O_APPEND`` write, so two runs writing into one folder never interleave within a line."""

    def __init__(self, out: Path) -> None:
        self.path = out / MANIFEST_NAME

    def write(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)


def _vocabulary(classes: str | None, vocab: str | None, db: str | None) -> Any:
    """``--classes`` / ``--vocab``, where ``--vocab db`` is every label of the ``--db``
    database that has rows (a class-prompted proposer then prunes the labels absent from
    each image)."""
    from retclip.vocabulary import Vocabulary

    if vocab is not None and vocab.strip().lower() == "db" and not (classes or "").strip():
        if not db:
            raise InputError("--vocab db segments with the database's labels: give --db too")
        from retclip.database import FeatureDatabase

        return FeatureDatabase.open(db).vocabulary()
    return Vocabulary.from_choice(classes, vocab)


@dataclass
class _Decoded:
    """An image read by the prefetch thread: its pixels, or the error reading it raised."""

    task: ImageTask
    pixels: Any
    error: RetclipError | None
    seconds: float


def _decode(task: ImageTask) -> _Decoded:
    from retclip.images import load_image

    start = time.perf_counter()
    try:
        return _Decoded(task, load_image(task.path), None, time.perf_counter() - start)
    except RetclipError as error:
        return _Decoded(task, None, error, time.perf_counter() - start)


def _prefetched(tasks: list[ImageTask], ahead: int) -> Iterator[_Decoded]:
    """The tasks' images in order, decoded in a background thread at most ``ahead`` images in
    front of the consumer (a bounded prefetch queue)."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode") as decoder:
        pending: deque[Future[_Decoded]] = deque()
        upcoming = iter(tasks)
        try:
            for task in itertools.islice(upcoming, ahead):
                pending.append(decoder.submit(_decode, task))
            while pending:
                decoded = pending.popleft().result()
                for task in itertools.islice(upcoming, 1):
                    pending.append(decoder.submit(_decode, task))
                yield decoded
        finally:
            for future in pending:
                future.cancel()


def _batches_of(decoded: Iterator[_Decoded], size: int) -> Iterator[list[_Decoded]]:
    batch: list[_Decoded] = []
    for item in decoded:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _results(
    segmenter: Any,
    vocabulary: Any,
    tasks: list[ImageTask],
    batch_size: int = 1,
    on_written: Callable[[ImageTask, Any, float], None] | None = None,
) -> Iterator[tuple[ImageTask, Any, float]]:
    """Each task's result (or the :class:`RetclipError` of an image found in a folder) and its
    seconds (its decoding, its share of its batch's model time, and writing its files), in
    task order.

    Three stages overlap: a thread decodes up to two batches ahead, the caller's thread runs the
    models on ``batch_size`` images at a time (:meth:`Segmenter.segment_batch`), and one writer
    thread saves the results, in order, then calls ``on_written`` (the manifest line). An error
    of an image named explicitly, or any other error of a thread, is raised here."""

    def save(task: ImageTask, outcome: Any, seconds: float) -> tuple[ImageTask, Any, float]:
        done = _save(task, outcome, seconds)
        if on_written is not None:
            on_written(*done)
        return done

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="write") as writer:
        written: deque[Future[tuple[ImageTask, Any, float]]] = deque()
        for batch in _batches_of(_prefetched(tasks, 2 * batch_size), batch_size):
            readable = [item for item in batch if item.error is None]
            start = time.perf_counter()
            outcomes = (
                segmenter.segment_batch(
                    [item.pixels for item in readable],
                    vocabulary,
                    sources=[item.task.path for item in readable],
                )
                if readable
                else []
            )
            share = (time.perf_counter() - start) / max(1, len(readable))
            by_task = dict(zip((item.task for item in readable), outcomes, strict=True))
            for item in batch:
                outcome = by_task.get(item.task, item.error)
                seconds = item.seconds + (share if item.error is None else 0.0)
                written.append(writer.submit(save, item.task, outcome, seconds))
            while len(written) > 2 * batch_size or (written and written[0].done()):
                yield written.popleft().result()
        while written:
            yield written.popleft().result()


def _save(task: ImageTask, outcome: Any, seconds: float) -> tuple[ImageTask, Any, float]:
    """Write a result's files (in the writer thread); a folder image's error is its outcome."""
    if isinstance(outcome, RetclipError):
        if task.explicit:
            raise outcome
        return task, outcome, seconds
    start = time.perf_counter()
    try:
        outcome.save(task.out_dir, task.stem)
    except RetclipError as error:
        if task.explicit:
            raise
        return task, error, seconds + time.perf_counter() - start
    return task, outcome, seconds + time.perf_counter() - start


@click.command(cls=CleanErrorsCommand)
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--classes", help='Class names, comma-separated; synonyms with "|": "sofa|couch, wall".'
)
@click.option(
    "--vocab",
    help="A built-in vocabulary (ade20k-150, coco-panoptic-133), a file, or 'db': every label "
    "of the --db database.",
)
@click.option("--proposer", required=True, help=ModelSpec.model_fields["proposer"].description)
@with_options(model_options())
@with_options(retrieval_options)
@with_options(train_vocab_option)
@with_options(ensemble_options)
@with_options(
    [
        batch_size_option(
            1,
            "Images per model batch (detector, mask model, backbone); decoding and writing "
            "overlap the models either way.",
        )
    ]
)
@click.option(
    "--recursive", is_flag=True, help="Also segment the images in sub-folders of a folder."
)
@click.option(
    "--resume/--no-resume",
    default=True,
    show_default=True,
    help="Skip images whose output files are all there (a killed run continues).",
)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output folder.")
def segment(
    images: tuple[Path, ...],
    classes: str | None,
    vocab: str | None,
    proposer: str,
    recursive: bool,
    resume: bool,
    out: Path,
    **options: Any,
) -> None:
    """Segment IMAGES (files, folders, or quoted glob patterns such as 'photos/*.jpg') with the
    given classes; writes five files per image into --out, and a line per image into
    --out/manifest.jsonl.

    For each image <stem>: <stem>_panoptic.png/.json (COCO panoptic), <stem>_semantic.png,
    <stem>_instances.json (COCO results, RLE), <stem>_overlay.png, and <stem>_scores.npz (the
    per-mask s_clip / s_ret / s_iv, for re-scoring without a model pass). Images named one by one
    must all be readable before anything is written; an unreadable image found in a folder or by
    a pattern is recorded in the manifest and the run goes on.
    """
    from retclip.images import load_image
    from retclip.pipeline import build_segmenter

    vocabulary = _vocabulary(classes, vocab, options.get("db"))
    tasks = collect_images(images, out, recursive)
    for task in tasks:  # images named one by one are readable before anything is written
        if task.explicit:
            load_image(task.path)
    todo = [t for t in tasks if not (resume and outputs_complete(t))]
    skipped = len(tasks) - len(todo)
    with output_dir(out):
        manifest = Manifest(out)
        if skipped:
            click.echo(f"{skipped} of {len(tasks)} images already have all their outputs; skipped")
        if not todo:
            return
        spec = pipeline_spec(options, proposer)
        segmenter = build_segmenter(spec)
        bar = tqdm(total=len(todo), unit="img", desc="segment", disable=len(todo) < 2)
        failed = 0

        def record(task: ImageTask, outcome: Any, seconds: float) -> None:
            """The image's manifest line, in the writer thread once its files are written."""
            line: dict[str, Any] = {"image": str(task.path), "seconds": round(seconds, 3)}
            if isinstance(outcome, RetclipError):
                line.update(status="error", error=str(outcome))
            else:
                line.update(
                    status="ok", segments=len(outcome.segments), outputs=_output_files(task)
                )
            manifest.write(line)

        batch_size = spec.model.batch_size
        for task, outcome, _ in _results(segmenter, vocabulary, todo, batch_size, record):
            if isinstance(outcome, RetclipError):
                failed += 1
                bar.write(f"{task.path}: error: {outcome}")
            else:
                found = sorted({outcome.label_of(s) for s in outcome.segments})
                bar.write(
                    f"{task.path}: {len(outcome.segments)} segments ({', '.join(found) or 'none'})"
                )
            bar.update(1)
        bar.close()
        if failed:
            click.echo(f"{failed} of {len(todo)} images failed; see {manifest.path}")


def _output_files(task: ImageTask) -> list[str]:
    from retclip.outputs.files import output_paths

    paths = [*output_paths(task.out_dir, task.stem).values()]
    return [str(p) for p in (*paths, task.out_dir / f"{task.stem}_scores.npz")]
