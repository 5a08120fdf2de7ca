"""The evaluation loop: the model pass over a dataset and the scoring pass over the cache.

``retclip eval`` runs in two passes. The *model pass* segments each image not yet in the cache and
stores its masks (bit-packed) and per-mask ``s_clip`` / ``s_ret`` / ``s_iv`` in
``<cache>/<stem>.npz`` — the arrays of ``SegmentationResult.save``'s ``<stem>_scores.npz`` — each
written atomically, so a killed run resumes where it stopped. The *scoring pass* merges the cached
scores under any :class:`Settings` and accumulates the metrics; it needs no model, which is how a
sweep over α, β, γ runs (all settings in one pass over the images).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable, Sequence

import numpy as np
from tqdm import tqdm

from retclip.errors import InputError
from retclip.evaluation.cache import ScoreCache
from retclip.evaluation.datasets import (
    Detections,
    EvalDataset,
)
from retclip.evaluation.evaluator import Evaluator
from retclip.evaluation.panoptic_quality import SegmentsInfo
from retclip.images import load_image
from retclip.outputs.records import encode_rle
from retclip.proposers.base import Proposals
from retclip.segmenter import (
    MaskScores,
    Segmenter,
    Settings,
    merge,
)
from retclip.vocabulary import Vocabulary


def run_model(
    dataset: EvalDataset,
    indices: Sequence[int],
    cache: ScoreCache,
    make_segmenter: Callable[[], Segmenter],
    vocabulary: Vocabulary,
    *,
    progress: bool = True,
) -> int:
    """Segment the images of ``indices`` missing from ``cache``; returns how many ran.

    The segmenter is built only when the first image is missing, so a complete cache costs no
    model load. Each image's scores are committed on its own: an interrupted run loses at most
    the image in progress.
    """
    todo = [i for i in indices if not cache.has(dataset.stem(i))]
    segmenter: Segmenter | None = None
    for index in tqdm(todo, desc="segment", unit="img", disable=not progress or not todo):
        segmenter = segmenter or make_segmenter()
        path = dataset.image_path(index)
        result = segmenter(load_image(path), vocabulary, source=path)
        cache.save(dataset.stem(index), result.proposals, result.scores, vocabulary.names)
    return len(todo)


def _prediction_from_cache(
    proposals: Proposals, scores: MaskScores, vocabulary: Vocabulary, settings: Settings
) -> tuple[np.ndarray, SegmentsInfo, np.ndarray, Detections]:
    prediction = merge(scores, proposals, vocabulary, settings)
    segments = SegmentsInfo(
        ids=np.array([s.id for s in prediction.segments], dtype=np.int64),
        categories=np.array([s.category for s in prediction.segments], dtype=np.int64),
    )
    detections = [
        (inst.category, encode_rle(proposals.masks[inst.mask_index]), inst.score)
        for inst in prediction.instances
    ]
    return prediction.panoptic, segments, prediction.semantic, detections


def score_cache(
    dataset: EvalDataset,
    indices: Sequence[int],
    cache: ScoreCache,
    vocabulary: Vocabulary,
    settings: Sequence[Settings],
    *,
    seen: np.ndarray | None = None,
    progress: bool = True,
) -> list[Evaluator]:
    """One :class:`Evaluator` per entry of ``settings``, filled in a single pass over the images
    (each cache file and ground truth read once). No model is involved."""
    if len(vocabulary) != len(dataset.vocabulary):
        raise InputError(
            f"vocabulary has {len(vocabulary)} classes, the dataset {len(dataset.vocabulary)}"
        )
    evaluators = [Evaluator(dataset.vocabulary, seen) for _ in settings]
    for index in tqdm(indices, desc="score", unit="img", disable=not progress):
        stem = dataset.stem(index)
        proposals, scores = cache.load(stem)
        gt = dataset.ground_truth(index)
        if proposals.masks.shape[1:] != gt.panoptic.shape:
            raise InputError(f"cached masks of {stem} do not match its ground-truth size")
        for evaluator, setting in zip(evaluators, settings, strict=True):
            pred_map, segments, semantic, detections = _prediction_from_cache(
                proposals, scores, vocabulary, setting
            )
            evaluator.add(
                index, gt.panoptic, gt.segments, gt.semantic, gt.instances,
                pred_map, segments, semantic, detections, name=stem,
            )  # fmt: skip
    return evaluators


def sweep_grid(
    base: Settings, alphas: Iterable[float], betas: Iterable[float], gammas: Iterable[float]
) -> list[Settings]:
    """Every (α, β, γ) combination, other fields from ``base``."""
    return [
        dataclasses.replace(base, alpha=a, beta=b, gamma=g)
        for a, b, g in itertools.product(alphas, betas, gammas)
    ]
