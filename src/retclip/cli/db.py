"""``retclip db``: build, grow, inspect, index and edit feature databases."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import click

from retclip.cli.options import (
    CleanErrorsGroup,
    batch_size_option,
    model_options,
    pipeline_spec,
    ray_cluster,
    ray_options,
    spec_options,
    with_options,
)
from retclip.errors import InputError, RetclipError
from retclip.pipeline import PipelineSpec


@click.group(cls=CleanErrorsGroup)
def db() -> None:
    """Build and manage feature databases of mask-pooled features with labels."""


def _build_items(options: dict[str, Any], map_shards: Any = map) -> tuple[list[Any], str, Any]:
    """Build items, a description of their origin, and synonyms for their labels (or None);
    ``--shards`` are read through ``map_shards`` (on Ray: in parallel on the cluster)."""
    from retclip.database.build import items_from_labels_file

    images_dir = options.pop("images_dir")
    names = ("coco_panoptic", "labels", "captions", "open_images", "shards", "dataset")
    sources: dict[str, Any] = {k: options.pop(k) or None for k in names}  # --shards: () if none
    vocab, classes_from = options.pop("vocab"), options.pop("classes_from")
    oi_split = options.pop("open_images_split")
    oi_annotations = options.pop("open_images_annotations")
    root, split = options.pop("root"), options.pop("split")
    limit = options.get("limit")  # applied by _run_build; streamed sources stop reading there
    given = [k for k, v in sources.items() if v is not None]
    if len(given) != 1:
        raise InputError(
            "give exactly one source: --coco-panoptic, --labels, --captions, --open-images, "
            "--shards or --dataset"
        )
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be >= 1, got {limit}")
    if classes_from is not None and sources["open_images"] is None:
        raise InputError("--classes-from restricts the labels of --open-images only")
    if root is not None and sources["dataset"] is None:
        raise InputError("--root is the folder of a --dataset")
    if images_dir is not None and (sources["shards"] or sources["dataset"]):
        raise InputError(f"--images is not used with --{given[0]}: its images are in its files")
    if sources["dataset"] is not None:  # ADE20k / COCO in eval's layouts, by name
        from retclip.database.build import items_from_dataset
        from retclip.evaluation.datasets import DatasetSpec, panoptic_dataset

        dataset = panoptic_dataset(DatasetSpec(sources["dataset"], str(root or ""), split))
        origin = f"{sources['dataset']}:{Path(root).resolve()}:{split}"
        if options["proposer"] in (None, "gt"):
            options["proposer"] = "gt"
            options["gt_json"], options["gt_masks"] = dataset.json_path, dataset.masks_dir
            return items_from_dataset(dataset), origin, None
        return items_from_dataset(dataset, image_labels=True), f"{origin}:tags", None
    if images_dir is None and sources["shards"] is None and sources["open_images"] is None:
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

    if sources["open_images"] is not None:
        from retclip.database.sources import items_from_open_images
        from retclip.datasets.open_images import OpenImages

        oi = OpenImages(sources["open_images"], oi_split, oi_annotations, images_dir)
        restrict = Vocabulary.load(classes_from) if classes_from is not None else None
        items, absent = items_from_open_images(oi, vocabulary=restrict, limit=limit)
        if absent:
            click.echo(f"{absent} labelled images are not in {oi.images_dir}: left out", err=True)
        origin = f"open-images:{oi.annotations_csv.resolve()}:{oi.images_dir.resolve()}"
        if restrict is None:
            return items, origin, None
        return items, f"{origin}:{restrict.key()}", label_synonyms(restrict)
    what = "--captions" if sources["captions"] is not None else "--shards"
    if vocab is None:
        raise InputError(f"{what} needs --vocab: the classes to look for in the captions")
    vocabulary = Vocabulary.load(vocab)
    if sources["shards"] is not None:
        from retclip.database.sources import items_from_shards

        items = items_from_shards(sources["shards"], vocabulary, limit=limit, map_shards=map_shards)
        patterns = ",".join(str(Path(p).resolve()) for p in sources["shards"])
        return items, f"shards:{patterns}:{vocabulary.key()}", label_synonyms(vocabulary)
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
    click.option(
        "--open-images",
        type=click.Path(path_type=Path),
        help="An Open Images download (docs/sources.md): each image's labels; its images in "
        "ROOT/<split>/ or --images.",
    ),
    click.option(
        "--open-images-split",
        type=click.Choice(["train", "validation"]),
        default="train",
        show_default=True,
        help="Split of --open-images.",
    ),
    click.option(
        "--open-images-annotations",
        default="labels",
        show_default=True,
        help="labels (human-verified image-level labels), boxes (the labels of the boxes), or "
        "the CSV file to read.",
    ),
    click.option(
        "--classes-from",
        help="Keep only --open-images labels naming a class of this vocabulary (file or "
        "built-in name; case-insensitive).",
    ),
    click.option(
        "--shards",
        multiple=True,
        help="Image-text tar shards (webdataset, img2dataset), e.g. 'data/{00000..00127}.tar'; "
        "labels = --vocab classes their captions mention. Repeatable.",
    ),
    click.option(
        "--dataset",
        type=click.Choice(["ade20k", "coco"]),
        help="ADE20k / COCO panoptic in eval's layout under --root: ground-truth masks, or "
        "with --proposer its image-level tags.",
    ),
    click.option(
        "--root",
        type=click.Path(path_type=Path),
        help="Folder of --dataset: ADEChallengeData2016, or COCO's (holding annotations/).",
    ),
    click.option("--split", default="train", show_default=True, help="Split of --dataset."),
    click.option("--vocab", help="Classes searched in --captions / --shards (built-in or file)."),
    click.option("--images", "images_dir", type=click.Path(path_type=Path), help="Images folder."),
    click.option("--proposer", help="Class-prompted proposer (with --dataset: for its tags)."),
    *model_options(),
    batch_size_option(
        8, "Images per model batch and per commit; decoding and commits overlap the models."
    ),
    click.option(
        "--commit-every",
        type=int,
        help="Commit at least this many images at once (whole batches) [default: one batch]; "
        "every commit adds a shard, so builds of millions of images commit thousands at once.",
    ),
    click.option("--limit", type=int, help="Use only the first N images."),
    *spec_options(PipelineSpec, ["pooling"]),
    *ray_options,
]


def _run_build(path: Path, create: bool, options: dict[str, Any]) -> None:
    cluster = ray_cluster(options)  # before any work: a missing extra is one error line
    with contextlib.ExitStack() as session:
        map_shards: Any = map
        if cluster is not None and options["shards"]:  # one Ray session reads them and builds
            from retclip.distributed import RayShardMap, ray_session

            ray, _ = session.enter_context(ray_session(cluster))
            map_shards = RayShardMap(ray)
        _build(path, create, options, cluster, _build_items(options, map_shards))


def _build(
    path: Path,
    create: bool,
    options: dict[str, Any],
    cluster: Any,
    sources: tuple[list[Any], str, Any],
) -> None:
    from retclip.database import FeatureDatabase, IndexSpec
    from retclip.database.build import build_database, build_id_for, commit_images

    items, origin, synonyms = sources
    limit, batch_size = options.pop("limit"), options.pop("batch_size")
    commit_every = options.pop("commit_every")
    if limit is not None:
        if limit < 1:
            raise InputError(f"--limit must be >= 1, got {limit}")
        items = items[:limit]
    if batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {batch_size}")
    commit_images(batch_size, commit_every)  # a bad value is an error before any work
    missing = [item.source for item in items if item.missing()]
    if missing:  # before any model loads or anything is created
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise InputError(f"image not found: {missing[0]}{more}")
    feature_dtype, index = options.pop("feature_dtype", None), options.pop("index", None)
    # the rows' recipe: the models, and the pooling the recipe implies unless given
    spec = pipeline_spec(options, options.pop("proposer"))
    pooling = spec.pooling or "soft"
    backbone, proposer = spec.model.load()
    if proposer is None:
        raise InputError("building a database needs a proposer: give --proposer")
    created = False
    if create:
        database, created = FeatureDatabase.create_or_open(
            path,
            fingerprint=backbone.fingerprint,
            dim=backbone.dim,
            dtype=feature_dtype,
            index=IndexSpec.parse(index),
            pooling=pooling,
        )
    else:
        database = FeatureDatabase.open(path)
    settings = json.dumps({**spec.model.description(), "proposer": None}, sort_keys=True)
    build_id = build_id_for(backbone, proposer, f"{origin}:{settings}", pooling)
    try:
        if cluster is None:
            report = build_database(
                database,
                backbone,
                proposer,
                items,
                build_id=build_id,
                batch_size=batch_size,
                commit_every=commit_every,
                pooling=pooling,
                synonyms=synonyms,
                precision=spec.model.precision,
            )
        else:  # the same build, its model passes on Ray workers with models of the same spec
            from retclip.distributed import build_database_on_ray

            report = build_database_on_ray(
                database,
                backbone,
                proposer,
                items,
                load_models=spec.model.load,
                cluster=cluster,
                build_id=build_id,
                batch_size=batch_size,
                commit_every=commit_every,
                pooling=pooling,
                synonyms=synonyms,
                precision=spec.model.precision,
            )
    except BaseException:
        # a database this run created is removed if the run failed before any commit (by it
        # or by another writer), not left behind empty
        if created:
            with contextlib.suppress(RetclipError):
                database.discard_if_empty()
        raise
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
    removed = database.remove(classes=classes, sources=sources)  # one commit
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
@click.argument("spec", required=False)
@click.option(
    "--evaluate",
    is_flag=True,
    help="Report recall@k against exact search on sampled rows of the database (after "
    "building SPEC, or of the current index without SPEC).",
)
@click.option(
    "--reuse-lists",
    is_flag=True,
    help="Build SPEC (a plain IVF index with as many lists) into the IVF lists of the saved "
    "current index: only its codes, without k-means or assigning every row again (the costly "
    "parts at millions of rows), e.g. to try SQ8 or PQ codes behind the same lists.",
)
@click.option("--sample", default=1000, show_default=True, help="Rows sampled by --evaluate.")
@click.option("--seed", default=0, show_default=True, help="Seed of the --evaluate sample.")
@click.option(
    "-k",
    "ks",
    multiple=True,
    type=int,
    default=(1, 10, 100),
    show_default=True,
    help="Neighbours counts reported by --evaluate (repeatable).",
)
def db_index(
    path: Path,
    spec: str | None,
    evaluate: bool,
    reuse_lists: bool,
    sample: int,
    seed: int,
    ks: tuple[int, ...],
) -> None:
    """Set and rebuild the search index (SPEC), and/or measure its recall (--evaluate).

    \b
    SPEC is one of
      auto[:memory_gb=G]   the default: exact up to 200k rows, then IVF by FAISS's guidelines
                           (4-16 sqrt(rows) lists; IVF65536_HNSW32 from 1M rows), SQ8 or PQ
                           codes where float vectors would not fit G GiB
      flat                 exact
      ivf-flat[:nlist=N,nprobe=P]   ivf-pq[:nlist=N,pq_m=M,pq_bits=B,nprobe=P]
      hnsw[:hnsw_m=M,ef_construction=C,ef_search=E]
      factory:STRING[,setting=V,...]   any FAISS index-factory string with its search
                           settings, e.g. factory:IVF4096,SQ8,nprobe=32 or
                           IVF65536_HNSW32,PQ48,nprobe=64,quantizer_efSearch=128
    IVF indexes also take ondisk=1: inverted lists in a file beside the index, built shard by
    shard and memory-mapped (for indexes larger than memory).

    Examples: retclip db index DB auto:memory_gb=8 --evaluate; retclip db index DB --evaluate;
    retclip db index DB factory:IVF32768_HNSW32,PQ64np,nprobe=128 --reuse-lists --evaluate.
    """
    from retclip.database import FeatureDatabase, IndexSpec

    if spec is None and reuse_lists:
        raise InputError("--reuse-lists needs the index SPEC to build into the lists")
    if spec is None and not evaluate:
        raise InputError("give an index SPEC, --evaluate, or both")
    database = FeatureDatabase.open(path)
    if spec is not None:
        database.set_index(IndexSpec.parse(spec), reuse_lists=reuse_lists)
        resolved = database.info()["index"]["resolved"]
        shown = spec if resolved == str(IndexSpec.parse(spec)) else f"{spec} ({resolved})"
        click.echo(f"{path}: index {shown} built over {len(database)} rows")
    if evaluate:
        click.echo(database.evaluate_index(sample=sample, ks=ks, seed=seed).table())
