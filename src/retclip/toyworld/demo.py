"""``retclip demo``: the paper's comparison, offline, on the toy world in about a minute.

Steps: generate the world's ``db`` and ``val`` splits; build a feature database from the ``db``
split's ground-truth segments with the shipped toy model; segment the ``val`` scenes once per
proposer (``gt`` masks and the weight-free ``regions``) — one model pass per image, the per-mask
scores cached — and score three settings from the cache: ``clip-only`` (γ = 0),
``retrieval-only`` (γ = 1) and ``retclip`` (the paper's γ = 0.3), plus a γ curve.

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
from retclip.evaluation.runner import DatasetSpec, EvalDataset, ScoreCache, run_model, score_cache
from retclip.images import load_image
from retclip.outputs import render_overlay
from retclip.panoptic import Segment
from retclip.proposers.base import MaskProposer
from retclip.proposers.ground_truth import GroundTruthProposer
from retclip.proposers.regions import RegionsProposer
from retclip.segmenter import Segmenter, Settings, merge
from retclip.toyworld.dataset import write_split

#: The three settings of the paper's Table 2, as α/β/γ settings (training-free: no s_iv).
SETTINGS = {
    "clip-only": Settings(gamma=0.0),
    "retrieval-only": Settings(gamma=1.0),
    "retclip": Settings(),
}
REPORTED = ("PQ", "SQ", "RQ", "mIoU", "mAP")
GAMMAS = tuple(round(g, 2) for g in np.linspace(0.0, 1.0, 11))


def run_demo(
    out: Path,
    *,
    backbone: Backbone,
    n_db: int = 300,
    n_val: int = 50,
    seed: int = 0,
    figure_rows: int = 4,
    figures: bool = True,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the demo into ``out``; returns the content of ``metrics.json``.

    ``figures=False`` skips the overlays and plots (the metrics are the same).
    """
    world = out / "world"
    log(f"generating the toy world ({n_db} database scenes, {n_val} validation scenes)")
    db_json, db_images = write_split(world, "db", n_db, seed, progress=progress)
    val_json, val_images = write_split(world, "val", n_val, seed, progress=progress)

    log("building the feature database from the db split's segments")
    database = FeatureDatabase.create(
        out / "database", fingerprint=backbone.fingerprint, dim=backbone.dim, exist_ok=True
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

    val = EvalDataset(
        DatasetSpec(kind="coco-panoptic", panoptic_json=str(val_json), images=str(val_images))
    )
    vocabulary = val.vocabulary
    indices = list(range(len(val)))
    proposers: dict[str, MaskProposer] = {
        "gt": GroundTruthProposer(CocoPanopticDataset(val_json, val_images)),
        "regions": RegionsProposer(),
    }
    metrics: dict[str, Any] = {}
    curves: dict[str, list[float]] = {}
    caches: dict[str, ScoreCache] = {}
    for name, proposer in proposers.items():
        log(f"segmenting the val split with the {name!r} proposer")
        cache = ScoreCache(out / "cache" / name)
        cache.open(
            {
                "model": {
                    "backbone": backbone.fingerprint.to_dict(),
                    "proposer": name,
                    "database": database.generation,
                    "rows": len(database),
                },
                "vocabulary": vocabulary.names,
            }
        )
        caches[name] = cache

        def make_segmenter(proposer: MaskProposer = proposer) -> Segmenter:
            return Segmenter(backbone, proposer, db=database, device=backbone.device)

        run_model(val, indices, cache, make_segmenter, vocabulary, progress=progress)
        curve_settings = [Settings(gamma=g) for g in GAMMAS]
        evaluators = score_cache(
            val, indices, cache, vocabulary, [*SETTINGS.values(), *curve_settings],
            progress=progress,
        )  # fmt: skip
        results = [evaluator.metrics()[0] for evaluator in evaluators]
        metrics[name] = {
            setting: {key: _round(result[key]) for key in REPORTED}
            for setting, result in zip(SETTINGS, results, strict=False)
        }
        curves[name] = [float(result["PQ"]) for result in results[len(SETTINGS) :]]

    if figures:
        shown = indices[:figure_rows]
        _write_overlays(out, val, shown, caches, vocabulary.names)
        _write_figure(out / "figure.png", val, shown, caches["gt"], vocabulary.names)
        _write_gamma_curve(out / "gamma_curve.png", curves)
    summary = {
        **metrics,
        "gamma_curve": {"gamma": list(GAMMAS)}
        | {name: [_round(pq) for pq in curve] for name, curve in curves.items()},
        "settings": {
            name: {"alpha": s.alpha, "beta": s.beta, "gamma": s.gamma}
            for name, s in SETTINGS.items()
        },
        "world": {"db": n_db, "val": n_val, "seed": seed},
        "backbone": backbone.fingerprint.to_dict(),
    }
    (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
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
    val: EvalDataset, index: int, cache: ScoreCache, names: list[str]
) -> dict[str, np.ndarray]:
    """Image, ground truth and one overlay per setting for one val image."""
    image = load_image(val.image_path(index))
    proposals, scores = cache.load(val.stem(index))
    gt_map, gt_segments = _ground_truth_segments(val, index)
    panels = {"image": image, "ground truth": render_overlay(image, gt_map, gt_segments, names)}
    for setting, settings in SETTINGS.items():
        prediction = merge(scores, proposals, val.vocabulary, settings)
        panels[setting] = render_overlay(image, prediction.panoptic, prediction.segments, names)
    return panels


def _write_overlays(
    out: Path,
    val: EvalDataset,
    indices: list[int],
    caches: dict[str, ScoreCache],
    names: list[str],
) -> None:
    from PIL import Image

    for proposer, cache in caches.items():
        for index in indices:
            panels = _panels(val, index, cache, names)
            for setting in SETTINGS:
                folder = out / "overlays" / proposer / setting
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(panels[setting]).save(folder / f"{val.stem(index)}.png")


def _write_figure(
    path: Path, val: EvalDataset, indices: list[int], cache: ScoreCache, names: list[str]
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [_panels(val, index, cache, names) for index in indices]
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
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _write_gamma_curve(path: Path, curves: dict[str, list[float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for proposer, pq in curves.items():
        ax.plot(GAMMAS, pq, marker="o", label=f"{proposer} masks")
    ax.axvline(SETTINGS["retclip"].gamma, color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel("γ (weight of s_ret in s_oov)")
    ax.set_ylabel("PQ")
    ax.set_title("PQ against γ on the toy world")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
