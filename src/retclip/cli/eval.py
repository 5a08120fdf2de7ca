"""``retclip eval`` and ``retclip sweep`` (registered on the group in :mod:`retclip.cli`).

Errors caused by input end as one line ``Error: <cause>`` and exit status 1, as in the rest of the
command line.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from retclip.cli.options import (
    ENSEMBLE_FIELDS,
    CleanErrorsCommand,
    ensemble_options,
    model_options,
    pipeline_spec,
    ray_cluster,
    ray_options,
    retrieval_options,
    train_vocab_option,
    with_options,
)
from retclip.errors import InputError
from retclip.settings import COMBINE_MODES

if TYPE_CHECKING:  # heavy modules (torch, pycocotools) load when a command runs, not at start-up
    import numpy as np

    from retclip.evaluation.datasets import EvalDataset
    from retclip.vocabulary import Vocabulary

__all__ = ["eval_command", "sweep_command"]

SWEEP_COLUMNS = ("PQ", "PQ_th", "PQ_st", "mAP", "mIoU")
#: The ``--dataset`` choices (``retclip.evaluation.datasets.DATASET_KINDS``).
DATASET_CHOICES = ("coco-panoptic", "ade20k", "coco")


def _load_config(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    """``--config FILE|NAME``: a JSON object of option values (names as on the command line,
    with ``-`` or ``_``), or a shipped config by name (``retclip configs``), that become the
    defaults; options given on the command line win. What the config ``needs`` is checked once
    the command line is parsed (:func:`_check_config_needs`)."""
    if value is None:
        return
    from retclip.configs import load_run_config

    config = load_run_config(value)
    names: dict[str, str] = {}
    for param in ctx.command.params:
        if param.name:
            names[param.name] = param.name
            for opt in (*param.opts, *param.secondary_opts):
                names[opt.lstrip("-").replace("-", "_")] = param.name
    options: dict[str, Any] = {}
    for key, option_value in config.options.items():
        name = names.get(str(key).replace("-", "_").lstrip("_"))
        if name is None or name == "config":
            raise click.ClickException(f"config {config.name}: unknown option {key!r}")
        options[name] = option_value
    ctx.default_map = {**(ctx.default_map or {}), **options}
    ctx.meta["retclip.config"] = config


def _check_config_needs(o: dict[str, Any]) -> None:
    """Each option the config says it needs was given (on the command line or in it)."""
    config = click.get_current_context().meta.get("retclip.config")
    if config is None:
        return
    for name, what in config.needs.items():
        if o.get(name) is None:
            flag = "--" + {"kind": "dataset"}.get(name, name).replace("_", "-")
            raise InputError(f"config {config.name} needs {flag}: {what}")


def _floats(text: str, name: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"{name} must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise InputError(f"{name} is empty; expected e.g. 0.3,0.4")
    return values


def _points(text: str) -> list[tuple[float, float, float]]:
    """``'a,b,g;a,b,g'`` → (alpha, beta, gamma) triples."""
    points = []
    for part in (p for p in text.split(";") if p.strip()):
        values = _floats(part, "--points")
        if len(values) != 3:
            raise InputError(f"--points entry {part.strip()!r} must be alpha,beta,gamma")
        points.append((values[0], values[1], values[2]))
    if not points:
        raise InputError("--points is empty; expected e.g. 0.4,0.7,0.3;0.4,0.7,0.2")
    return points


def _image_ids(text: str | None) -> list[str] | None:
    if text is None:
        return None
    path = Path(text)
    if path.is_file():
        text = path.read_text(encoding="utf-8-sig").replace("\n", ",")
    return [v.strip() for v in text.split(",") if v.strip()]


def _dataset_vocabulary(dataset: EvalDataset, spec: str | None) -> Vocabulary:
    """The classes to segment: the dataset's, with the text of ``spec`` (or of the builtin
    vocabulary of ADE20k / COCO) by position; ids and thing flags stay the dataset's."""
    from retclip.vocabulary import VocabClass, Vocabulary

    own = dataset.vocabulary
    if spec is None:
        builtin = {"ade20k": "ade20k-150", "coco": "coco-panoptic-133"}.get(dataset.spec.kind)
        if builtin is None:
            return own
        spec = builtin
    text = Vocabulary.load(spec)
    if len(text) != len(own):
        raise InputError(
            f"vocabulary {spec} has {len(text)} classes but the dataset has {len(own)}"
        )
    classes = (
        VocabClass(t.name, t.synonyms, isthing=d.isthing, id=d.id)
        for t, d in zip(text.classes, own.classes, strict=True)
    )
    return Vocabulary(classes, name=text.name)


def _seen(vocabulary: Vocabulary, train: Vocabulary | None) -> np.ndarray | None:
    return None if train is None else vocabulary.seen_mask(train)


dataset_options = [
    click.option(
        "--dataset",
        "kind",
        type=click.Choice(DATASET_CHOICES),
        default="coco-panoptic",
        show_default=True,
        help="coco-panoptic: --panoptic-json + --images; ade20k / coco: --root.",
    ),
    click.option("--root", type=click.Path(path_type=Path), help="ADEChallengeData2016 or coco."),
    click.option("--split", default="val", show_default=True, help="val or train (ade20k, coco)."),
    click.option("--panoptic-json", type=click.Path(path_type=Path), help="COCO panoptic JSON."),
    click.option("--images", type=click.Path(path_type=Path), help="Images folder."),
    click.option(
        "--panoptic-dir",
        type=click.Path(path_type=Path),
        help="Panoptic PNG folder [default: the JSON path without .json].",
    ),
    click.option(
        "--semantic-dir",
        type=click.Path(path_type=Path),
        help="Semantic label PNGs <stem>.png (255 = ignore) [default: from the panoptic PNGs].",
    ),
    click.option(
        "--instances-json",
        type=click.Path(path_type=Path),
        help="COCO instance JSON for mask AP [default: the panoptic thing segments].",
    ),
    click.option("--limit", type=int, help="Evaluate only the first N images."),
    click.option("--image-ids", help="Comma-separated image ids or file stems, or a file of them."),
]


def _spec(o: dict[str, Any]) -> Any:
    from retclip.evaluation.datasets import DatasetSpec

    def s(key: str) -> str | None:
        return None if o.get(key) is None else str(o[key])

    return DatasetSpec(
        kind=o["kind"],
        root=s("root"),
        split=o["split"],
        panoptic_json=s("panoptic_json"),
        images=s("images"),
        panoptic_dir=s("panoptic_dir"),
        semantic_dir=s("semantic_dir"),
        instances_json=s("instances_json"),
    ).resolved()


config_option = click.option(
    "--config",
    is_eager=True,
    expose_value=False,
    callback=_load_config,
    help="JSON file of option values, or a shipped config by name (retclip configs); "
    "command-line options win.",
)


@click.command("eval", cls=CleanErrorsCommand)
@config_option
@with_options(dataset_options)
@click.option("--vocab", help="Class text by position (builtin or file) [default: dataset names].")
@with_options(train_vocab_option)
@click.option("--proposer", default="gt", show_default=True, help="Mask proposer name.")
@with_options(model_options(backbone_required=False))
@with_options(retrieval_options)
@with_options(ensemble_options)
@with_options(ray_options)
@click.option(
    "--cache",
    type=click.Path(path_type=Path),
    help="Per-image score cache [default: OUT/cache]; reused to resume and to re-score.",
)
@click.option(
    "--predictions",
    type=click.Path(path_type=Path),
    help="Score existing predictions (COCO panoptic PNG folder) instead of running a model.",
)
@click.option(
    "--predictions-json",
    type=click.Path(path_type=Path),
    help="Their COCO panoptic JSON [default: the folder path + .json].",
)
@click.option(
    "--predictions-instances",
    type=click.Path(path_type=Path),
    help="COCO instance results JSON (RLE) of the predictions, for mask AP.",
)
@click.option(
    "--predictions-semantic",
    type=click.Path(path_type=Path),
    help="Semantic predictions <stem>.png [default: from the panoptic PNGs].",
)
@click.option("--method", help="Method name in the table [default: RetCLIP with --db, else CLIP].")
@click.option("--progress/--no-progress", default=True, help="Show progress bars.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output folder.")
def eval_command(**o: Any) -> None:
    """Evaluate on a panoptic dataset: PQ / SQ / RQ, mIoU, mask AP, seen / unseen.

    Writes OUT/metrics.json (percent), OUT/metrics.md (the paper's table layout) and
    OUT/per_class.csv. Per-image masks and per-mask scores are cached (--cache): an interrupted
    run resumes, and re-running with other --alpha/--beta/--gamma/thresholds needs no model.
    """
    from retclip.evaluation.cache import ScoreCache
    from retclip.evaluation.datasets import EvalDataset
    from retclip.evaluation.loop import run_model, score_cache
    from retclip.evaluation.predictions import PredictionFolder, score_predictions
    from retclip.evaluation.report import markdown_table, write_report
    from retclip.pipeline import build_segmenter
    from retclip.segmenter import Segmenter, Settings
    from retclip.vocabulary import Vocabulary

    _check_config_needs(o)
    cluster = ray_cluster(o)
    if cluster is not None and o["predictions"] is not None:
        raise InputError("--ray runs the model pass; scoring --predictions has none")
    out: Path = o["out"]
    if out.exists() and not out.is_dir():
        raise InputError(f"output path {out} exists and is not a directory")
    dataset = EvalDataset(_spec(o))
    indices = dataset.select(o["limit"], _image_ids(o["image_ids"]))
    vocabulary = _dataset_vocabulary(dataset, o["vocab"])
    if o["predictions"] is None:
        if not o["backbone"]:
            raise InputError("give --backbone (or --predictions DIR to score existing outputs)")
        if o["proposer"] == "gt" and not o["gt_json"]:  # the dataset's own ground truth
            o["gt_json"], o["gt_masks"] = dataset.panoptic.json_path, dataset.panoptic.masks_dir
        spec = pipeline_spec(o, o["proposer"])
        train_vocab = spec.train_vocab
    else:
        train_vocab = o["train_vocab"]
    train = Vocabulary.load(train_vocab) if train_vocab else None
    seen = _seen(vocabulary, train)
    settings = Settings(**{name: o[name] for name in ENSEMBLE_FIELDS})
    run: dict[str, Any] = {"dataset": dataclasses.asdict(dataset.spec), "images": len(indices)}
    if o["predictions"] is not None:
        folder = PredictionFolder(
            dataset,
            o["predictions"],
            o["predictions_json"],
            o["predictions_instances"],
            o["predictions_semantic"],
        )
        evaluator = score_predictions(dataset, indices, folder, seen=seen, progress=o["progress"])
        method, backbone, database = o["method"] or o["predictions"].name, "–", "–"
        run["predictions"] = str(Path(o["predictions"]).resolve())
    else:
        model = spec.description()
        cache = ScoreCache(o["cache"] or out / "cache")
        cache.open(
            {
                "model": model,
                "dataset": dataclasses.asdict(dataset.spec),
                "vocabulary": vocabulary.to_dict(),
                "train_vocabulary": None if train is None else train.to_dict(),
            }
        )

        def make_segmenter() -> Segmenter:
            return build_segmenter(spec)

        if cluster is None:
            ran = run_model(
                dataset, indices, cache, make_segmenter, vocabulary, progress=o["progress"]
            )
        else:  # segmented on Ray workers, the cache written here
            from retclip.distributed import run_model_on_ray

            ran = run_model_on_ray(
                dataset, indices, cache, make_segmenter, vocabulary, cluster=cluster,
                progress=o["progress"],
            )  # fmt: skip
        click.echo(f"segmented {ran} images, {len(indices) - ran} taken from {cache.directory}")
        (evaluator,) = score_cache(
            dataset, indices, cache, vocabulary, [settings], seen=seen, progress=o["progress"]
        )
        method = o["method"] or ("RetCLIP" if o["db"] else "CLIP")
        backbone = o["backbone"]
        database = Path(o["db"]).name if o["db"] else "N/A"
        run.update(model=model, settings=dataclasses.asdict(settings), cache=str(cache.directory))
    metrics, per_class = evaluator.metrics()
    paths = write_report(
        out, metrics, per_class, method=method, backbone=backbone, database=database, extra=run
    )
    click.echo(markdown_table(metrics, method, backbone, database), nl=False)
    click.echo(f"wrote {paths['json']}, {paths['markdown']}, {paths['csv']}")


@click.command("sweep", cls=CleanErrorsCommand)
@config_option
@click.argument("cache_dir", type=click.Path(path_type=Path))
@click.option("--alpha", "alphas", default="0.4", show_default=True, help="Comma-separated.")
@click.option("--beta", "betas", default="0.7", show_default=True, help="Comma-separated.")
@click.option("--gamma", "gammas", default="0.3", show_default=True, help="Comma-separated.")
@click.option(
    "--points",
    help="Exact settings 'a,b,g;a,b,g;...' instead of the --alpha x --beta x --gamma grid "
    "(Table 4's rows: --config table4-sweep).",
)
@click.option("--combine", type=click.Choice(list(COMBINE_MODES)), default="linear")
@click.option("--score-threshold", default=0.0, show_default=True)
@click.option("--overlap-threshold", default=0.8, show_default=True)
@click.option(
    "--metric",
    type=click.Choice(["PQ", "mAP", "mIoU", "PQ_th", "PQ_st"]),
    default="PQ",
    show_default=True,
    help="The metric the best setting maximises.",
)
@click.option("--limit", type=int, help="Only the first N cached images.")
@click.option("--image-ids", help="Comma-separated image ids or file stems, or a file of them.")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
@click.option(
    "--out", type=click.Path(path_type=Path), help="Also write sweep.json and sweep.md here."
)
def sweep_command(cache_dir: Path, **o: Any) -> None:
    """Grid over --alpha/--beta/--gamma on the scores cached by ``retclip eval`` (no model).

    The dataset, classes and training vocabulary are those recorded in CACHE_DIR/meta.json.
    Prints a table (the paper's Table 4) and the best setting by --metric.
    """
    import numpy as np

    from retclip.evaluation.cache import ScoreCache
    from retclip.evaluation.datasets import DatasetSpec, EvalDataset
    from retclip.evaluation.loop import score_cache, sweep_grid
    from retclip.segmenter import Settings
    from retclip.vocabulary import Vocabulary

    cache = ScoreCache(cache_dir)
    meta = cache.read_meta()
    dataset = EvalDataset(DatasetSpec(**meta["dataset"]))
    vocabulary = Vocabulary.from_dict(meta["vocabulary"])
    train = meta.get("train_vocabulary")
    seen = _seen(vocabulary, Vocabulary.from_dict(train) if train else None)
    if o["limit"] is None and o["image_ids"] is None:
        indices = [i for i in range(len(dataset)) if cache.has(dataset.stem(i))]
        if not indices:
            raise InputError(f"the cache {cache_dir} holds no images; run retclip eval first")
    else:
        indices = dataset.select(o["limit"], _image_ids(o["image_ids"]))
    base = Settings(
        combine=o["combine"],
        score_threshold=o["score_threshold"],
        overlap_threshold=o["overlap_threshold"],
    )
    if o["points"]:
        grid = [
            dataclasses.replace(base, alpha=a, beta=b, gamma=g) for a, b, g in _points(o["points"])
        ]
    else:
        grid = sweep_grid(
            base,
            _floats(o["alphas"], "--alpha"),
            _floats(o["betas"], "--beta"),
            _floats(o["gammas"], "--gamma"),
        )
    evaluators = score_cache(
        dataset, indices, cache, vocabulary, grid, seen=seen, progress=o["progress"]
    )
    rows = []
    for setting, evaluator in zip(grid, evaluators, strict=True):
        metrics, _ = evaluator.metrics()
        rows.append({"alpha": setting.alpha, "beta": setting.beta, "gamma": setting.gamma,
                     **{k: metrics[k] for k in SWEEP_COLUMNS}})  # fmt: skip
    key = o["metric"]
    best = max(rows, key=lambda r: -np.inf if r[key] is None else r[key])
    table = _sweep_table(rows, best)
    summary = f"best {key}: alpha={best['alpha']} beta={best['beta']} gamma={best['gamma']}"
    click.echo(table, nl=False)
    click.echo(summary + f" ({key} {_fmt(best[key])}, {len(indices)} images)")
    if o["out"] is not None:
        out: Path = o["out"]
        out.mkdir(parents=True, exist_ok=True)
        from retclip.files import atomic_write

        atomic_write(
            out / "sweep.json",
            json.dumps({"rows": rows, "best": best, "metric": key}, indent=2) + "\n",
        )
        atomic_write(out / "sweep.md", table + "\n" + summary + "\n")


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value / 100:.3f}"


def _sweep_table(rows: Sequence[dict[str, Any]], best: dict[str, Any]) -> str:
    """α, β, γ and the metrics (fractions, as the paper's Table 4); the best row in bold."""
    lines = [
        "| α | β | γ | " + " | ".join(SWEEP_COLUMNS) + " |",
        "|---" * (3 + len(SWEEP_COLUMNS)) + "|",
    ]
    for row in rows:
        cells = [_fmt(row[k]) for k in SWEEP_COLUMNS]
        if row is best:
            cells = [f"**{c}**" for c in cells]
        lines.append(
            f"| {row['alpha']} | {row['beta']} | {row['gamma']} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"
