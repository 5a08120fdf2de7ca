"""The ``retclip`` command line: ``segment`` images and manage feature databases (``db``).

Every error caused by input ends as one line ``Error: <cause>`` on stderr and exit status 1
(click's own usage errors: status 2); a traceback means a bug.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from retclip.errors import InputError, RetclipError


class _Group(click.Group):
    """A click group that turns :class:`RetclipError` into a one-line message and exit 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except RetclipError as exc:
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt:
            raise click.ClickException("interrupted") from None


def _vocabulary(classes: str | None, vocab: str | None) -> Any:
    from retclip.vocabulary import Vocabulary

    if (classes is None) == (vocab is None):
        raise InputError("give the classes with exactly one of --classes or --vocab")
    return Vocabulary.from_string(classes) if classes is not None else Vocabulary.load(vocab or "")


def _check_output_dir(out: Path) -> None:
    """Fail before any model work if ``out`` cannot be created or written."""
    if out.exists() and not out.is_dir():
        raise InputError(f"output path {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".retclip-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise InputError(f"output directory {out} is not writable: {exc.strerror}") from None


backbone_option = click.option(
    "--backbone", required=True, help="Backbone name (see README, 'Backbones'), e.g. color."
)
device_option = click.option(
    "--device", default="auto", show_default=True, help="auto (CUDA if available), cpu, cuda:N."
)
gt_options = [
    click.option(
        "--gt",
        "gt_json",
        type=click.Path(path_type=Path),
        help="COCO-panoptic JSON with ground-truth masks (for --proposer gt).",
    ),
    click.option(
        "--gt-masks",
        type=click.Path(path_type=Path),
        help="Folder of its panoptic PNGs [default: the JSON path without .json].",
    ),
]


def _with(options: Sequence[Any]) -> Any:
    def decorate(func: Any) -> Any:
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="retclip")
def cli() -> None:
    """Open-vocabulary panoptic segmentation with retrieval augmentation (RetCLIP)."""


@cli.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--classes", help='Class names, comma-separated; synonyms with "|": "sofa|couch, wall".'
)
@click.option("--vocab", help="A built-in vocabulary (ade20k-150, coco-panoptic-133) or a file.")
@backbone_option
@click.option("--proposer", required=True, help="Mask proposer name, e.g. gt.")
@_with(gt_options)
@click.option("--db", type=click.Path(path_type=Path), help="Feature database for s_ret.")
@click.option(
    "--fallback-db",
    type=click.Path(path_type=Path),
    help="Database for the classes the primary one lacks.",
)
@click.option("--train-vocab", help="Training vocabulary of the proposer (seen classes get alpha).")
@click.option("--alpha", default=0.4, show_default=True, help="Weight of s_oov, seen classes.")
@click.option("--beta", default=0.7, show_default=True, help="Weight of s_oov, unseen classes.")
@click.option("--gamma", default=0.3, show_default=True, help="Weight of s_ret within s_oov.")
@click.option("-k", "--k", "k", default=10, show_default=True, help="Neighbours retrieved.")
@click.option(
    "--combine", type=click.Choice(["linear", "geometric"]), default="linear", show_default=True
)
@click.option("--pooling", type=click.Choice(["soft", "binary"]), default="soft", show_default=True)
@click.option("--score-threshold", default=0.0, show_default=True)
@click.option("--overlap-threshold", default=0.8, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output folder.")
@device_option
def segment(
    images: tuple[Path, ...],
    classes: str | None,
    vocab: str | None,
    backbone: str,
    proposer: str,
    gt_json: Path | None,
    gt_masks: Path | None,
    db: Path | None,
    fallback_db: Path | None,
    train_vocab: str | None,
    alpha: float,
    beta: float,
    gamma: float,
    k: int,
    combine: str,
    pooling: str,
    score_threshold: float,
    overlap_threshold: float,
    out: Path,
    device: str,
) -> None:
    """Segment IMAGES with the given classes; writes five files per image into --out.

    For each image <stem>: <stem>_panoptic.png/.json (COCO panoptic), <stem>_semantic.png,
    <stem>_instances.json (COCO results, RLE), <stem>_overlay.png, and <stem>_scores.npz (the
    per-mask s_clip / s_ret / s_iv, for re-scoring without a model pass).
    """
    from retclip.images import load_image
    from retclip.proposers import load_proposer
    from retclip.segmenter import Segmenter

    vocabulary = _vocabulary(classes, vocab)
    stems = [image.stem for image in images]
    if len(set(stems)) != len(stems):
        raise InputError("two images share a file name stem; their outputs would collide")
    for image in images:
        if not image.is_file():
            raise InputError(f"image not found: {image}")
    _check_output_dir(out)
    segmenter = Segmenter(
        backbone,
        load_proposer(proposer, gt_json=gt_json, gt_masks=gt_masks),
        db=db,
        fallback_db=fallback_db,
        train_vocab=train_vocab,
        k=k,
        pooling=pooling,  # type: ignore[arg-type]
        device=device,
        alpha=alpha,
        beta=beta,
        gamma=gamma,
        combine=combine,
        score_threshold=score_threshold,
        overlap_threshold=overlap_threshold,
    )
    for image in tqdm(images, unit="img", desc="segment", disable=len(images) < 2):
        result = segmenter(load_image(image), vocabulary, source=image)
        result.save(out, image.stem)
        found = sorted({result.label_of(s) for s in result.segments})
        click.echo(f"{image}: {len(result.segments)} segments ({', '.join(found) or 'none'})")


@cli.group(cls=_Group)
def db() -> None:
    """Build and manage feature databases of mask-pooled features with labels."""


def _build_sources(
    coco_panoptic: Path | None,
    labels: Path | None,
    images_dir: Path | None,
    proposer: str | None,
    gt_json: Path | None,
    gt_masks: Path | None,
) -> tuple[Any, list[Any], str]:
    """The proposer, the build items and a description of where they come from."""
    from retclip.database.build import items_from_dataset, items_from_labels_file
    from retclip.datasets import CocoPanopticDataset
    from retclip.proposers import GroundTruthProposer, load_proposer

    if images_dir is None:
        raise InputError("give the images folder with --images")
    if (coco_panoptic is None) == (labels is None):
        raise InputError("give exactly one source: --coco-panoptic JSON or --labels FILE")
    if coco_panoptic is not None:
        if proposer not in (None, "gt"):
            raise InputError("--coco-panoptic builds from ground-truth masks: omit --proposer")
        dataset = CocoPanopticDataset(coco_panoptic, images_dir, gt_masks)
        origin = f"coco-panoptic:{coco_panoptic.resolve()}"
        return GroundTruthProposer(dataset), items_from_dataset(dataset), origin
    assert labels is not None
    if proposer is None:
        raise InputError("building from image-level labels needs a class-prompted --proposer")
    items = items_from_labels_file(labels, images_dir)
    origin = f"labels:{labels.resolve()}"
    return load_proposer(proposer, gt_json=gt_json, gt_masks=gt_masks), items, origin


build_options = [
    click.option(
        "--coco-panoptic",
        type=click.Path(path_type=Path),
        help="Build from a COCO-panoptic dataset's ground-truth masks (the upper bound).",
    ),
    click.option(
        "--labels",
        type=click.Path(path_type=Path),
        help="JSON/CSV of image-level labels per image (README, 'db build').",
    ),
    click.option("--images", "images_dir", type=click.Path(path_type=Path), help="Images folder."),
    click.option("--proposer", help="Class-prompted proposer for --labels."),
    *gt_options,
    backbone_option,
    click.option("--batch-size", default=8, show_default=True, help="Images per commit."),
    click.option("--limit", type=int, help="Use only the first N images."),
    click.option("--pooling", type=click.Choice(["soft", "binary"]), default="soft"),
    device_option,
]


def _run_build(
    path: Path,
    create: bool,
    dtype: str,
    index: str,
    options: dict[str, Any],
) -> None:
    from retclip.backbones import load_backbone, resolve_device
    from retclip.database import FeatureDatabase, IndexSpec
    from retclip.database.build import build_database, build_id_for

    proposer, items, origin = _build_sources(
        options["coco_panoptic"],
        options["labels"],
        options["images_dir"],
        options["proposer"],
        options["gt_json"],
        options["gt_masks"],
    )
    if options["limit"] is not None:
        if options["limit"] < 1:
            raise InputError(f"--limit must be >= 1, got {options['limit']}")
        items = items[: options["limit"]]
    backbone = load_backbone(options["backbone"], resolve_device(options["device"]))
    if create:
        database = FeatureDatabase.create(
            path,
            fingerprint=backbone.fingerprint,
            dim=backbone.dim,
            dtype=dtype,
            index=IndexSpec.parse(index),
            exist_ok=True,
        )
    else:
        database = FeatureDatabase.open(path)
    build_id = build_id_for(backbone, proposer, origin, options["pooling"])
    report = build_database(
        database,
        backbone,
        proposer,
        items,
        build_id=build_id,
        batch_size=options["batch_size"],
        pooling=options["pooling"],
    )
    click.echo(
        f"{path}: added {report.rows} rows from {report.images} images"
        + (f" ({report.skipped} already in the database, skipped)" if report.skipped else "")
        + (f"; dropped {report.dropped_masks} masks with no label" if report.dropped_masks else "")
        + f"; {len(database)} rows in all (build {build_id})"
    )


@db.command("build")
@click.argument("path", type=click.Path(path_type=Path))
@_with(build_options)
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16")
@click.option(
    "--index", default="flat", show_default=True, help="flat, ivf-flat, ivf-pq or hnsw[:k=v,...]."
)
def db_build(path: Path, dtype: str, index: str, **options: Any) -> None:
    """Build (or resume building) the database at PATH.

    From --coco-panoptic JSON --images DIR: one row per ground-truth segment. From --labels FILE
    --images DIR --proposer NAME: the proposer is prompted with each image's labels and every mask
    it assigns to one of them becomes a row. Re-running the same command after an interruption
    resumes where the last committed batch ended.
    """
    _run_build(path, True, dtype, index, options)


@db.command("add")
@click.argument("path", type=click.Path(path_type=Path))
@_with(build_options)
def db_add(path: Path, **options: Any) -> None:
    """Add rows to the existing database at PATH (same sources as ``db build``).

    This is how a new class is taught without training: add images labelled with it.
    """
    _run_build(path, False, "", "", options)


@db.command("remove")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--class", "classes", multiple=True, help="Remove every row of this label.")
@click.option("--source", "sources", multiple=True, help="Remove every row from this image.")
def db_remove(path: Path, classes: tuple[str, ...], sources: tuple[str, ...]) -> None:
    """Remove rows by class label or by source image."""
    from retclip.database import FeatureDatabase

    if not classes and not sources:
        raise InputError("nothing to remove: give --class or --source")
    database = FeatureDatabase.open(path)
    removed = database.remove_classes(classes) if classes else 0
    removed += database.remove_sources(sources) if sources else 0
    click.echo(f"{path}: removed {removed} rows; {len(database)} rows left")


@db.command("merge")
@click.argument("out", type=click.Path(path_type=Path))
@click.argument("sources", nargs=-1, required=True, type=click.Path(path_type=Path))
def db_merge(out: Path, sources: tuple[Path, ...]) -> None:
    """Merge the databases SOURCES (same backbone) into a new database OUT."""
    from retclip.database import FeatureDatabase

    merged = FeatureDatabase.merge(out, [FeatureDatabase.open(s) for s in sources])
    click.echo(f"{out}: {len(merged)} rows from {len(sources)} databases")


@db.command("info")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def db_info(path: Path, as_json: bool) -> None:
    """Rows, rows per class, dimension, backbone fingerprint and index of a database."""
    from retclip.database import FeatureDatabase

    info = FeatureDatabase.open(path).info()
    if as_json:
        click.echo(json.dumps(info, indent=2, sort_keys=True))
        return
    fingerprint = info["fingerprint"]
    click.echo(f"database     {path}")
    click.echo(f"backbone     {', '.join(f'{k}={v}' for k, v in fingerprint.items() if v)}")
    click.echo(f"rows         {info['rows']} ({info['dtype']}, dim {info['dim']})")
    click.echo(f"index        {info['index']}")
    click.echo(f"classes      {len(info['rows_per_class'])}")
    for name, count in sorted(info["rows_per_class"].items(), key=lambda kv: (-kv[1], kv[0])):
        click.echo(f"  {count:>8}  {name}")


@db.command("index")
@click.argument("path", type=click.Path(path_type=Path))
@click.argument("spec")
def db_index(path: Path, spec: str) -> None:
    """Set and rebuild the search index: SPEC is flat, ivf-flat, ivf-pq or hnsw[:key=value,...].

    Examples: ``flat`` (exact, default), ``ivf-flat:nlist=1024,nprobe=32``,
    ``ivf-pq:nlist=1024,pq_m=48``, ``hnsw:hnsw_m=32,ef_search=128``.
    """
    from retclip.database import FeatureDatabase, IndexSpec

    database = FeatureDatabase.open(path)
    database.set_index(IndexSpec.parse(spec))
    click.echo(f"{path}: index {spec} built over {len(database)} rows")


@cli.command("vocab")
@click.argument("spec")
@click.option("--train-vocab", help="Mark the classes seen in this training vocabulary.")
def vocab_command(spec: str, train_vocab: str | None) -> None:
    """Show a vocabulary (built-in name or file): classes, thing/stuff, synonyms, seen flags."""
    from retclip.vocabulary import Vocabulary

    vocabulary = Vocabulary.load(spec)
    seen = vocabulary.seen_mask(Vocabulary.load(train_vocab)) if train_vocab else None
    for i, entry in enumerate(vocabulary.classes):
        kind = "thing" if entry.isthing else "stuff"
        flag = "" if seen is None else (" seen  " if seen[i] else " unseen")
        click.echo(f"{entry.id:>4} {kind}{flag}  {', '.join(entry.synonyms)}")
    if seen is not None:
        click.echo(f"{int(seen.sum())} of {len(vocabulary)} classes seen in {train_vocab}")


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point."""
    cli.main(args=list(argv) if argv is not None else sys.argv[1:], prog_name="retclip")
