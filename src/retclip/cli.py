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

from retclip.cli_options import (
    ENSEMBLE_FIELDS,
    CleanErrorsGroup,
    check_output_dir,
    ensemble_options,
    load_models,
    model_description,
    model_options,
    resolve_recipe,
    retrieval_options,
    with_options,
)
from retclip.errors import InputError


def _vocabulary(classes: str | None, vocab: str | None) -> Any:
    from retclip.vocabulary import Vocabulary

    if (classes is None) == (vocab is None):
        raise InputError("give the classes with exactly one of --classes or --vocab")
    return Vocabulary.from_string(classes) if classes is not None else Vocabulary.load(vocab or "")


@click.group(cls=CleanErrorsGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="retclip")
def cli() -> None:
    """Open-vocabulary panoptic segmentation with retrieval augmentation (RetCLIP)."""


@cli.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--classes", help='Class names, comma-separated; synonyms with "|": "sofa|couch, wall".'
)
@click.option("--vocab", help="A built-in vocabulary (ade20k-150, coco-panoptic-133) or a file.")
@click.option("--proposer", required=True, help="gt, regions, grounded-sam, owl-sam or sam-grid.")
@with_options(model_options())
@with_options(retrieval_options)
@click.option("--train-vocab", help="Training vocabulary of the proposer (seen classes get alpha).")
@with_options(ensemble_options)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output folder.")
def segment(
    images: tuple[Path, ...],
    classes: str | None,
    vocab: str | None,
    proposer: str,
    db: Path | None,
    fallback_db: Path | None,
    train_vocab: str | None,
    k: int,
    pooling: str | None,
    out: Path,
    **options: Any,
) -> None:
    """Segment IMAGES with the given classes; writes five files per image into --out.

    For each image <stem>: <stem>_panoptic.png/.json (COCO panoptic), <stem>_semantic.png,
    <stem>_instances.json (COCO results, RLE), <stem>_overlay.png, and <stem>_scores.npz (the
    per-mask s_clip / s_ret / s_iv, for re-scoring without a model pass).
    """
    from retclip.images import load_image
    from retclip.segmenter import Segmenter

    vocabulary = _vocabulary(classes, vocab)
    stems = [image.stem for image in images]
    if len(set(stems)) != len(stems):
        raise InputError("two images share a file name stem; their outputs would collide")
    for image in images:
        if not image.is_file():
            raise InputError(f"image not found: {image}")
    check_output_dir(out)
    settings = {name: options.pop(name) for name in ENSEMBLE_FIELDS}
    options["pooling"] = pooling
    resolve_recipe(proposer, options)
    pooling = options.pop("pooling")
    backbone, mask_proposer = load_models(proposer, options)
    if proposer == "fcclip" and train_vocab is None:
        train_vocab = "coco-panoptic-133"  # FC-CLIP's training vocabulary: its classes are seen
    segmenter = Segmenter(
        backbone,
        mask_proposer,
        db=db,
        fallback_db=fallback_db,
        train_vocab=train_vocab,
        k=k,
        pooling=pooling,  # type: ignore[arg-type]
        device=backbone.device,
        **settings,
    )
    for image in tqdm(images, unit="img", desc="segment", disable=len(images) < 2):
        result = segmenter(load_image(image), vocabulary, source=image)
        result.save(out, image.stem)
        found = sorted({result.label_of(s) for s in result.segments})
        click.echo(f"{image}: {len(result.segments)} segments ({', '.join(found) or 'none'})")


@cli.group(cls=CleanErrorsGroup)
def db() -> None:
    """Build and manage feature databases of mask-pooled features with labels."""


def _build_items(options: dict[str, Any]) -> tuple[list[Any], str, Any]:
    """Build items, a description of their origin, and synonyms for their labels (or None)."""
    from retclip.database.build import items_from_labels_file

    images_dir = options.pop("images_dir")
    sources = {k: options.pop(k) for k in ("coco_panoptic", "labels", "captions")}
    vocab = options.pop("vocab")
    given = [k for k, v in sources.items() if v is not None]
    if len(given) != 1:
        raise InputError("give exactly one source: --coco-panoptic, --labels or --captions")
    if images_dir is None:
        raise InputError("give the images folder with --images")
    if sources["coco_panoptic"] is not None:
        from retclip.database.build import items_from_dataset
        from retclip.datasets import CocoPanopticDataset

        dataset = CocoPanopticDataset(sources["coco_panoptic"], images_dir, options["gt_masks"])
        origin = f"coco-panoptic:{sources['coco_panoptic'].resolve()}"
        if options["proposer"] in (None, "gt"):  # ground-truth masks: the upper-bound database
            options["proposer"] = "gt"
            options["gt_json"] = sources["coco_panoptic"]
            return items_from_dataset(dataset), origin, None
        # any other proposer: the dataset is only images with image-level tags (paper §2.1)
        return items_from_dataset(dataset, image_labels=True), f"{origin}:tags", None
    if options["proposer"] is None:
        raise InputError("building from image-level labels needs a class-prompted --proposer")
    if sources["labels"] is not None:
        items = items_from_labels_file(sources["labels"], images_dir)
        return items, f"labels:{sources['labels'].resolve()}", None
    from retclip.database.captions import items_from_captions, label_synonyms
    from retclip.vocabulary import Vocabulary

    if vocab is None:
        raise InputError("--captions needs --vocab: the classes to look for in the captions")
    vocabulary = Vocabulary.load(vocab)
    items = items_from_captions(sources["captions"], images_dir, vocabulary)
    origin = f"captions:{sources['captions'].resolve()}:{vocabulary.key()}"
    return items, origin, label_synonyms(vocabulary)


build_options = [
    click.option(
        "--coco-panoptic",
        type=click.Path(path_type=Path),
        help="A COCO-panoptic dataset: its ground-truth masks (no --proposer, the upper bound), "
        "or with --proposer only its image-level tags.",
    ),
    click.option(
        "--labels",
        type=click.Path(path_type=Path),
        help="JSON/CSV of image-level labels per image (README, 'db build').",
    ),
    click.option(
        "--captions",
        type=click.Path(path_type=Path),
        help="JSONL/CSV of image captions; labels = --vocab classes they mention.",
    ),
    click.option("--vocab", help="Vocabulary searched in --captions (built-in name or file)."),
    click.option("--images", "images_dir", type=click.Path(path_type=Path), help="Images folder."),
    click.option("--proposer", help="Class-prompted proposer for --labels / --captions."),
    *model_options(),
    click.option("--batch-size", default=8, show_default=True, help="Images per commit."),
    click.option("--limit", type=int, help="Use only the first N images."),
    click.option(
        "--pooling",
        type=click.Choice(["soft", "binary"]),
        help="Mask pooling of the rows [default: binary with --recipe fcclip, else soft].",
    ),
]


def _run_build(path: Path, create: bool, options: dict[str, Any]) -> None:
    from retclip.database import FeatureDatabase, IndexSpec
    from retclip.database.build import build_database, build_id_for

    items, origin, synonyms = _build_items(options)
    resolve_recipe(options.get("proposer"), options)
    limit, batch_size, pooling = (options.pop(k) for k in ("limit", "batch_size", "pooling"))
    if limit is not None:
        if limit < 1:
            raise InputError(f"--limit must be >= 1, got {limit}")
        items = items[:limit]
    feature_dtype, index = options.pop("feature_dtype", None), options.pop("index", None)
    backbone, proposer = load_models(options.pop("proposer"), options)
    if create:
        database = FeatureDatabase.create(
            path,
            fingerprint=backbone.fingerprint,
            dim=backbone.dim,
            dtype=feature_dtype,
            index=IndexSpec.parse(index),
            exist_ok=True,
            pooling=pooling,
        )
    else:
        database = FeatureDatabase.open(path)
    settings = json.dumps(model_description(None, options), sort_keys=True)
    build_id = build_id_for(backbone, proposer, f"{origin}:{settings}", pooling)
    report = build_database(
        database,
        backbone,
        proposer,
        items,
        build_id=build_id,
        batch_size=batch_size,
        pooling=pooling,
        synonyms=synonyms,
    )
    click.echo(
        f"{path}: added {report.rows} rows from {report.images} images"
        + (f" ({report.skipped} already in the database, skipped)" if report.skipped else "")
        + (f"; dropped {report.dropped_masks} masks with no label" if report.dropped_masks else "")
        + f"; {len(database)} rows in all (build {build_id})"
    )


@db.command("build")
@click.argument("path", type=click.Path(path_type=Path))
@with_options(build_options)
@click.option(
    "--feature-dtype",
    type=click.Choice(["float16", "float32"]),
    default="float16",
    show_default=True,
    help="How features are stored.",
)
@click.option(
    "--index",
    default="auto",
    show_default=True,
    help="auto (exact up to 200k rows, then IVF-Flat), flat, ivf-flat, ivf-pq or hnsw[:k=v,...].",
)
def db_build(path: Path, **options: Any) -> None:
    """Build (or resume building) the database at PATH.

    From --coco-panoptic JSON --images DIR: one row per ground-truth segment. From --labels FILE
    (or --captions FILE --vocab V) --images DIR --proposer NAME: the proposer is prompted with each
    image's labels and every mask it assigns to one of them becomes a row. Re-running the same
    command after an interruption resumes where the last committed batch ended.
    """
    _run_build(path, True, options)


@db.command("add")
@click.argument("path", type=click.Path(path_type=Path))
@with_options(build_options)
def db_add(path: Path, **options: Any) -> None:
    """Add rows to the existing database at PATH (same sources as ``db build``).

    This is how a new class is taught without training: add images labelled with it.
    """
    _run_build(path, False, options)


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
    click.echo(f"pooling      {info['pooling'] or 'not recorded'}")
    click.echo(f"rows         {info['rows']} ({info['dtype']}, dim {info['dim']})")
    click.echo(f"index        {info['index']}")
    click.echo(f"classes      {len(info['rows_per_class'])}")
    for name, count in sorted(info["rows_per_class"].items(), key=lambda kv: (-kv[1], kv[0])):
        click.echo(f"  {count:>8}  {name}")


@db.command("index")
@click.argument("path", type=click.Path(path_type=Path))
@click.argument("spec")
def db_index(path: Path, spec: str) -> None:
    """Set and rebuild the search index: SPEC is auto, flat, ivf-flat, ivf-pq or hnsw[:k=v,...].

    Examples: ``auto`` (default: exact up to 200k rows, IVF-Flat above), ``flat`` (exact),
    ``ivf-flat:nlist=1024,nprobe=32``,
    ``ivf-pq:nlist=1024,pq_m=48``, ``hnsw:hnsw_m=32,ef_search=128``.
    """
    from retclip.database import FeatureDatabase, IndexSpec

    database = FeatureDatabase.open(path)
    database.set_index(IndexSpec.parse(spec))
    click.echo(f"{path}: index {spec} built over {len(database)} rows")


@cli.group(cls=CleanErrorsGroup)
def toyworld() -> None:
    """The offline toy world: procedural scenes with panoptic labels and captions."""


@toyworld.command("generate")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output folder.")
@click.option("--split", type=click.Choice(["train", "db", "val"]), required=True)
@click.option("--n", "count", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--seed", default=0, show_default=True, help="Splits never share a scene.")
def toyworld_generate(out: Path, split: str, count: int, seed: int) -> None:
    """Write N scenes of a split as a COCO-panoptic dataset plus a captions file.

    Files: OUT/images/*.png, OUT/panoptic_SPLIT/*.png, OUT/panoptic_SPLIT.json and
    OUT/captions_SPLIT.jsonl; the same seed always gives the same scenes.
    """
    from retclip.toyworld.dataset import write_split

    check_output_dir(out)
    json_path, _ = write_split(out, split, count, seed, progress=True)
    click.echo(f"{out}: {count} {split} scenes; annotations in {json_path}")


@cli.command("demo")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("retclip-demo"),
    show_default=True,
    help="Output folder.",
)
@click.option("--n-db", type=click.IntRange(min=1), default=300, show_default=True)
@click.option("--n-val", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--seed", default=0, show_default=True)
def demo_command(out: Path, n_db: int, n_val: int, seed: int) -> None:
    """Offline demo on the toy world: CLIP only vs retrieval only vs RetCLIP.

    Generates the world, builds a database from its db split with the shipped toy model, segments
    the val split with ground-truth and weight-free (regions) proposals, and writes metrics.json,
    figure.png, gamma_curve.png and overlays into --out. No download; about a minute on a CPU.
    """
    from retclip.backbones import load_backbone
    from retclip.toyworld.demo import run_demo

    check_output_dir(out)
    summary = run_demo(
        out, backbone=load_backbone("toy"), n_db=n_db, n_val=n_val, seed=seed, log=click.echo
    )
    click.echo(
        f"\n{'proposer':<10}{'setting':<16}"
        + "".join(f"{k:>7}" for k in ("PQ", "SQ", "RQ", "mIoU", "mAP"))
    )
    for proposer in ("gt", "regions"):
        for setting, values in summary[proposer].items():
            cells = "".join(f"{v:>7.1f}" if v is not None else f"{'-':>7}" for v in values.values())
            click.echo(f"{proposer:<10}{setting:<16}{cells}")
    click.echo(f"\nwrote {out / 'metrics.json'}, {out / 'figure.png'}, {out / 'gamma_curve.png'}")


@cli.command("models")
@click.option(
    "--kind", type=click.Choice(["backbone", "detector", "segmenter"]), help="Only this kind."
)
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def models_command(kind: str | None, as_json: bool) -> None:
    """List the registered models: short name, hub id, kind, size and licence.

    Weights are never downloaded by the tests; to use a model offline, fetch it once with
    `hf download <hub id>` (or pass a local directory as the model name). See docs/models.md.
    """
    from retclip.models import list_models

    entries = list_models(kind)  # type: ignore[arg-type]
    if as_json:
        click.echo(json.dumps([m.to_dict() for m in entries], indent=2))
        return
    click.echo(f"{'name':<22}{'kind':<11}{'params':>8}  {'licence':<12}hub id")
    for m in entries:
        click.echo(f"{m.name:<22}{m.kind:<11}{m.params_m:>7.0f}M  {m.licence:<12}{m.hub_id}")


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


@cli.command("convert-fcclip")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.argument("output", type=click.Path(path_type=Path))
@click.option(
    "--variant",
    type=click.Choice(["convnext-l", "rn50x64"]),
    default="convnext-l",
    show_default=True,
    help="Architecture of the checkpoint (fcclip_cocopan.pth is convnext-l).",
)
@click.option("--include-backbone", is_flag=True, help="Also write the CLIP backbone's weights.")
def convert_fcclip_command(
    checkpoint: Path, output: Path, variant: str, include_backbone: bool
) -> None:
    """Convert FC-CLIP's released CHECKPOINT (.pth) to retclip's names in OUTPUT (.safetensors).

    Every key is checked against the architecture; missing, unexpected or mis-shaped keys are
    listed and nothing is written. Use the output with --proposer fcclip --fcclip-checkpoint.
    """
    from retclip.fcclip.checkpoint import convert_fcclip

    report = convert_fcclip(checkpoint, output, variant=variant, include_backbone=include_backbone)
    click.echo(report.format())
    click.echo(f"wrote {output}")


from retclip.evaluation.cli import eval_command, sweep_command  # noqa: E402
from retclip.server.cli import serve  # noqa: E402

cli.add_command(eval_command)
cli.add_command(sweep_command)
cli.add_command(serve)


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point."""
    cli.main(args=list(argv) if argv is not None else sys.argv[1:], prog_name="retclip")
