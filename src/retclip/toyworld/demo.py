"""``retclip demo``: the paper's comparison, offline, on the toy world in about a minute.

Steps: generate the world's ``db`` and ``val`` splits; build a feature database from the ``db``
split's ground-truth segments with the shipped toy model; segment the ``val`` scenes once per
proposer (``gt`` masks and the weight-free ``regions``) — one model pass per image, the per-mask
scores cached — and score three settings from the cache: ``clip-only`` (γ = 0),
``retrieval-only`` (γ = 1), ``retclip`` (the paper's γ = 0.3) and ``retclip-tuned`` (γ chosen
on scenes of the ``train`` split, which neither the database nor ``val`` contains), plus a γ
curve.

Writes into ``--out``: ``metrics.json`` (``{proposer: {setting: {PQ, SQ, RQ, mIoU, mAP}}}``),
``figure.png`` (image, ground truth and the three settings side by side), ``gamma_curve.png``,
``overlays/<proposer>/<setting>/<stem>.png``, and the world, database and caches it used.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from retclip.backbones.base import Backbone
from retclip.database import FeatureDatabase
from retclip.database.build import build_database, items_from_dataset
from retclip.datasets import CocoPanopticDataset
from retclip.evaluation.cache import ScoreCache
from retclip.evaluation.datasets import DatasetSpec, EvalDataset
from retclip.evaluation.loop import run_model, score_cache
from retclip.files import atomic_write, atomic_writer
from retclip.images import load_image, save_png
from retclip.outputs import render_overlay
from retclip.panoptic import Segment
from retclip.pipeline import ModelSpec, PipelineSpec, build_segmenter
from retclip.proposers.base import MaskProposer
from retclip.proposers.ground_truth import GroundTruthProposer
from retclip.proposers.regions import RegionsProposer
from retclip.segmenter import Settings, merge
from retclip.toyworld.dataset import write_split

#: The three settings of the paper's Table 2, as α/β/γ settings (training-free: no s_iv).
SETTINGS = {
    "clip-only": Settings(gamma=0.0),
    "retrieval-only": Settings(gamma=1.0),
    "retclip": Settings(),
}
REPORTED = ("PQ", "SQ", "RQ", "mIoU", "mAP")
#: Name of the toy-world database ``retclip serve`` builds and offers by default.
SERVE_DATABASE = "toyworld"
GAMMAS = tuple(round(float(g), 2) for g in np.linspace(0.0, 1.0, 11))


def build_toy_database(
    path: Path,
    backbone: Backbone,
    db_json: Path,
    db_images: Path,
    *,
    seed: int = 0,
    progress: bool = True,
) -> FeatureDatabase:
    """The toy world's database at ``path``: one row per ground-truth segment of a ``db`` split
    (written by :func:`~retclip.toyworld.dataset.write_split`), pooled with ``backbone``.
    Resumable like any build; an existing complete database is opened, not rebuilt."""
    database = FeatureDatabase.create(
        path, fingerprint=backbone.fingerprint, dim=backbone.dim, exist_ok=True
    )
    db_split = CocoPanopticDataset(db_json, db_images)
    build_database(
        database,
        backbone,
        GroundTruthProposer(db_split),
        items_from_dataset(db_split),
        build_id=f"demo-{seed}",
        progress=progress,
    )
    return database


def ensure_serve_database(
    data_dir: Path, backbone: Backbone, *, n: int = 300, seed: int = 0, progress: bool = True
) -> Path:
    """The toy-world database ``retclip serve`` offers by default (:data:`SERVE_DATABASE`
    under ``<data_dir>/databases``), built on first start from ``n`` generated scenes (kept in
    ``<data_dir>/toyworld``) and reused afterwards."""
    path = Path(data_dir) / "databases" / SERVE_DATABASE
    if (path / "meta.json").is_file() and len(FeatureDatabase.open(path, verify=False)):
        return path
    db_json, db_images = write_split(Path(data_dir) / "toyworld", "db", n, seed, progress=progress)
    build_toy_database(path, backbone, db_json, db_images, seed=seed, progress=progress)
    return path


def run_demo(
    out: Path,
    *,
    backbone: Backbone,
    n_db: int = 300,
    n_val: int = 50,
    n_tune: int = 30,
    seed: int = 0,
    figure_rows: int = 4,
    figures: bool = True,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the demo into ``out``; returns the content of ``metrics.json``.

    ``n_tune`` scenes of the ``train`` split (which neither the database nor ``val`` sees) choose
    the γ of ``retclip-tuned``, as the paper tunes its ensemble (Table 4) — never on ``val``.
    ``figures=False`` skips the overlays and plots (the metrics are the same).
    """
    world = out / "world"
    log(f"generating the toy world ({n_db} database, {n_tune} tuning, {n_val} validation scenes)")
    db_json, db_images = write_split(world, "db", n_db, seed, progress=progress)
    tune_json, tune_images = write_split(world, "train", n_tune, seed, progress=progress)
    val_json, val_images = write_split(world, "val", n_val, seed, progress=progress)

    log("building the feature database from the db split's segments")
    database = build_toy_database(
        out / "database", backbone, db_json, db_images, seed=seed, progress=progress
    )

    def segment(split_json: Path, images: Path, name: str) -> tuple[EvalDataset, ScoreCache]:
        """Segment a split once with proposer ``name``, caching the per-mask scores."""
        dataset = EvalDataset(
            DatasetSpec(kind="coco-panoptic", panoptic_json=str(split_json), images=str(images))
        )
        proposer: MaskProposer = (
            GroundTruthProposer(CocoPanopticDataset(split_json, images))
            if name == "gt"
            else RegionsProposer()
        )
        spec = PipelineSpec(model=ModelSpec(backbone="toy", proposer=name))
        cache = ScoreCache(out / "cache" / f"{split_json.stem}-{name}")
        cache.open(
            {
                "model": {
                    "backbone": backbone.fingerprint.to_dict(),
                    "proposer": name,
                    "database": database.generation,
                    "rows": len(database),
                },
                "vocabulary": dataset.vocabulary.names,
            }
        )
        run_model(
            dataset,
            list(range(len(dataset))),
            cache,
            lambda: build_segmenter(spec, models=(backbone, proposer), database=database),
            dataset.vocabulary,
            progress=progress,
        )
        return dataset, cache

    def pq_curve(dataset: EvalDataset, cache: ScoreCache) -> list[dict[str, Any]]:
        settings = [Settings(gamma=g) for g in GAMMAS]
        evaluators = score_cache(
            dataset, list(range(len(dataset))), cache, dataset.vocabulary, settings,
            progress=progress,
        )  # fmt: skip
        return [evaluator.metrics()[0] for evaluator in evaluators]

    log("choosing γ on the tuning scenes (ground-truth masks)")
    tune_curve = [float(m["PQ"]) for m in pq_curve(*segment(tune_json, tune_images, "gt"))]
    tuned_gamma = GAMMAS[int(np.argmax(tune_curve))]
    settings = {**SETTINGS, "retclip-tuned": Settings(gamma=tuned_gamma)}

    metrics: dict[str, Any] = {}
    curves: dict[str, list[float]] = {}
    caches: dict[str, ScoreCache] = {}
    for name in ("gt", "regions"):
        log(f"segmenting the val split with the {name!r} proposer")
        val, caches[name] = segment(val_json, val_images, name)
        evaluators = score_cache(
            val, list(range(len(val))), caches[name], val.vocabulary, list(settings.values()),
            progress=progress,
        )  # fmt: skip
        metrics[name] = {
            setting: {key: _round(evaluator.metrics()[0][key]) for key in REPORTED}
            for setting, evaluator in zip(settings, evaluators, strict=True)
        }
        curves[name] = [float(m["PQ"]) for m in pq_curve(val, caches[name])]

    if figures:
        shown = list(range(min(figure_rows, len(val))))
        _write_overlays(out, val, shown, caches, settings)
        _write_figure(out / "figure.png", val, shown, caches["gt"], settings)
        _write_gamma_curve(out / "gamma_curve.png", curves, tuned_gamma)
    summary = {
        **metrics,
        "gamma_curve": {"gamma": list(GAMMAS), "tuning (gt)": [_round(pq) for pq in tune_curve]}
        | {name: [_round(pq) for pq in curve] for name, curve in curves.items()},
        "settings": {
            name: {"alpha": s.alpha, "beta": s.beta, "gamma": s.gamma}
            for name, s in settings.items()
        },
        "world": {"db": n_db, "tune": n_tune, "val": n_val, "seed": seed},
        "backbone": backbone.fingerprint.to_dict(),
    }
    atomic_write(out / "metrics.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _round(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else round(float(value), 3)


def _ground_truth_segments(val: EvalDataset, index: int) -> tuple[np.ndarray, list[Segment]]:
    truth = val.ground_truth(index)
    segments = [
        Segment(
            id=int(segment_id),
            category=int(category),
            isthing=bool(val.vocabulary.isthing[category]),
            area=int((truth.panoptic == segment_id).sum()),
            bbox=(0.0, 0.0, 0.0, 0.0),
            score=float("nan"),
            mask_index=-1,
        )
        for segment_id, category in zip(truth.segments.ids, truth.segments.categories, strict=True)
    ]
    return truth.panoptic, segments


def _panels(
    val: EvalDataset, index: int, cache: ScoreCache, settings: dict[str, Settings]
) -> dict[str, np.ndarray]:
    """Image, ground truth and one overlay per setting for one val image."""
    names = val.vocabulary.names
    image = load_image(val.image_path(index))
    proposals, scores = cache.load(val.stem(index))
    gt_map, gt_segments = _ground_truth_segments(val, index)
    panels = {"image": image, "ground truth": render_overlay(image, gt_map, gt_segments, names)}
    for setting, chosen in settings.items():
        prediction = merge(scores, proposals, val.vocabulary, chosen)
        title = f"{setting} (γ={chosen.gamma:g})"
        panels[title] = render_overlay(image, prediction.panoptic, prediction.segments, names)
    return panels


def _write_overlays(
    out: Path,
    val: EvalDataset,
    indices: list[int],
    caches: dict[str, ScoreCache],
    settings: dict[str, Settings],
) -> None:

    for proposer, cache in caches.items():
        for index in indices:
            panels = list(_panels(val, index, cache, settings).values())[2:]
            for setting, panel in zip(settings, panels, strict=True):
                folder = out / "overlays" / proposer / setting
                folder.mkdir(parents=True, exist_ok=True)
                save_png(folder / f"{val.stem(index)}.png", panel)


def _write_figure(
    path: Path,
    val: EvalDataset,
    indices: list[int],
    cache: ScoreCache,
    settings: dict[str, Settings],
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [_panels(val, index, cache, settings) for index in indices]
    columns = list(rows[0])
    scale = 4  # toy scenes are 96 px: upscale so that labels stay readable
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(2.6 * len(columns), 2.6 * len(rows)))
    axes = np.atleast_2d(axes)
    for r, panels in enumerate(rows):
        for c, column in enumerate(columns):
            ax = axes[r, c]
            ax.imshow(np.kron(panels[column], np.ones((scale, scale, 1), np.uint8)))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(column)
    fig.suptitle("Ground-truth masks, toy backbone: CLIP only, retrieval only, RetCLIP")
    fig.tight_layout()
    with atomic_writer(path) as handle:
        fig.savefig(handle, format="png", dpi=80)
    plt.close(fig)


def _write_gamma_curve(path: Path, curves: dict[str, list[float]], tuned_gamma: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for proposer, pq in curves.items():
        ax.plot(GAMMAS, pq, marker="o", label=f"{proposer} masks")
    ax.axvline(SETTINGS["retclip"].gamma, color="gray", linestyle="--", linewidth=1)
    ax.axvline(tuned_gamma, color="gray", linestyle=":", linewidth=1)
    ax.set_xlabel("γ (weight of s_ret in s_oov)")
    ax.set_ylabel("PQ")
    ax.set_title("PQ against γ on the toy world")
    ax.legend()
    fig.tight_layout()
    with atomic_writer(path) as handle:
        fig.savefig(handle, format="png", dpi=100)
    plt.close(fig)
