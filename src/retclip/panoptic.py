"""Mask2Former / FC-CLIP post-processing: panoptic, semantic and instance results from proposals.

Inputs are per-proposal class probabilities ``[N, C]`` and mask probabilities ``[N, H, W]``
(sigmoided mask logits, in ``[0, 1]``). :func:`panoptic_inference` reproduces Mask2Former's
``panoptic_inference`` (which FC-CLIP uses unchanged) exactly, but computes all areas at once with
``bincount``/``gather`` instead of one full-image pass per kept proposal.

Semantic void value: class maps are ``int32`` with void ``255`` when the vocabulary has fewer than
255 classes (so the map fits an 8-bit PNG) and ``65535`` otherwise (a 16-bit PNG); see
:func:`semantic_void_value`.

Memory: masks may be given as bool (binary proposals, 1 byte a pixel) or float probabilities, and
no function makes an ``[N, H, W]`` float copy of them: proposals (panoptic, instance) or pixels
(semantic) are processed in chunks of about :data:`CHUNK_BYTES` of float work (250 masks at
1333×800 would need 1 GB per float copy), with the panoptic winner kept incrementally. Chunking
changes no result: each chunk computes the same per-pixel or per-proposal values, and ties keep
going to the earlier proposal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = [
    "Instance",
    "PanopticPrediction",
    "Segment",
    "instance_inference",
    "panoptic_inference",
    "postprocess",
    "semantic_inference",
    "semantic_void_value",
]


@dataclass
class Segment:
    """One segment of a panoptic map.

    Attributes:
        id: segment id in the panoptic map (1, 2, ...; 0 is void).
        category: class index into the vocabulary.
        isthing: whether the class is a thing (countable) class.
        area: final pixel count of the segment.
        bbox: COCO ``(x, y, width, height)`` of the final pixels (pixel extents, as
            ``pycocotools.mask.toBbox``).
        score: class probability of the proposal that created the segment (for merged stuff, the
            first one).
        mask_index: index of that proposal among the ``N`` inputs.
    """

    id: int
    category: int
    isthing: bool
    area: int
    bbox: tuple[float, float, float, float]
    score: float
    mask_index: int


@dataclass
class Instance:
    """One instance detection; its mask is proposal ``mask_index``'s mask (``mask_probs > 0.5``)."""

    mask_index: int
    category: int
    score: float


@dataclass
class PanopticPrediction:
    """All results for one image.

    Attributes:
        panoptic: ``[H, W]`` int32 segment ids, 0 = void.
        segments: the segments of ``panoptic``, by increasing id.
        semantic: ``[H, W]`` int32 class indices; void is :func:`semantic_void_value` of ``C``
            (255 for fewer than 255 classes, else 65535).
        instances: thing detections, by decreasing score.
        isthing: ``[C]`` bool thing flags of the vocabulary (set by :func:`postprocess`).
    """

    panoptic: np.ndarray
    segments: list[Segment]
    semantic: np.ndarray
    instances: list[Instance]
    isthing: np.ndarray | None = field(default=None)


#: Float working memory per chunk of the merges, in bytes (see the module docstring).
CHUNK_BYTES = 32 * 2**20


def _chunk_rows(chunk_size: int | None, row_elements: int) -> int:
    """Rows per chunk: ``chunk_size`` if given, else as many float32 rows of ``row_elements``
    as fit in :data:`CHUNK_BYTES` (at least 1)."""
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return chunk_size
    return max(1, CHUNK_BYTES // (4 * max(row_elements, 1)))


def _floats(masks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A chunk of masks as floats: probabilities as they are, bool/uint8 masks as 0/1 ``dtype``."""
    return masks if masks.is_floating_point() else masks.to(dtype)


def semantic_void_value(num_classes: int) -> int:
    """Void label of semantic maps: 255 for fewer than 255 classes, else 65535."""
    if num_classes < 255:
        return 255
    if num_classes < 65535:
        return 65535
    raise ValueError(f"at most 65534 classes are supported, got {num_classes}")


def _check_inputs(
    class_probs: torch.Tensor, mask_probs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    if class_probs.ndim != 2 or mask_probs.ndim != 3 or class_probs.shape[0] != mask_probs.shape[0]:
        raise ValueError(
            "expected class_probs [N, C] and mask_probs [N, H, W] with the same N, got "
            f"{tuple(class_probs.shape)} and {tuple(mask_probs.shape)}"
        )
    return class_probs.detach(), mask_probs.detach().to(class_probs.device)


def _thing_flags(
    isthing: Sequence[bool] | np.ndarray, num_classes: int, void_class: int | None
) -> np.ndarray:
    flags = np.asarray(isthing, dtype=bool).reshape(-1)
    if flags.shape[0] == num_classes:
        return flags
    if void_class == num_classes - 1 and flags.shape[0] == num_classes - 1:
        return np.append(flags, False)
    raise ValueError(
        f"isthing has {flags.shape[0]} entries, expected one per class ({num_classes})"
    )


def _bboxes(panoptic: torch.Tensor, num_ids: int) -> np.ndarray:
    """COCO XYWH boxes ``[num_ids, 4]`` of ids ``0..num_ids-1`` in ``panoptic [H, W]``."""
    h, w = panoptic.shape
    flat = panoptic.reshape(-1).long()
    ys = torch.arange(h, device=panoptic.device).repeat_interleave(w)
    xs = torch.arange(w, device=panoptic.device).repeat(h)
    big = torch.full((num_ids,), h + w, dtype=torch.long, device=panoptic.device)
    small = torch.full((num_ids,), -1, dtype=torch.long, device=panoptic.device)
    x0 = big.scatter_reduce(0, flat, xs, "amin")
    y0 = big.scatter_reduce(0, flat, ys, "amin")
    x1 = small.scatter_reduce(0, flat, xs, "amax")
    y1 = small.scatter_reduce(0, flat, ys, "amax")
    boxes = torch.stack([x0, y0, x1 - x0 + 1, y1 - y0 + 1], dim=1).cpu().numpy()
    return boxes.astype(np.float64)


def panoptic_inference(
    class_probs: torch.Tensor,
    mask_probs: torch.Tensor,
    isthing: Sequence[bool] | np.ndarray,
    *,
    score_threshold: float = 0.0,
    overlap_threshold: float = 0.8,
    void_class: int | None = None,
    chunk_size: int | None = None,
) -> tuple[np.ndarray, list[Segment]]:
    """Mask2Former's panoptic merge of proposals into non-overlapping segments.

    Each proposal takes its most probable class; proposals of the void class or with score
    ``<= score_threshold`` are dropped. Every pixel goes to the kept proposal with the largest
    ``score × mask_prob`` (none where all are 0); a proposal yields a segment from the pixels it
    wins where its own mask is ``>= 0.5``, unless the pixels it wins are fewer than
    ``overlap_threshold`` of its mask's area. Segments of one stuff class are merged (keeping the
    first one's score and proposal). Ties go to the earlier proposal.

    Args:
        class_probs: ``[N, C]`` class probabilities.
        mask_probs: ``[N, H, W]`` mask probabilities in ``[0, 1]``, or bool masks.
        isthing: ``[C]`` thing flags (``[C - 1]`` allowed when ``void_class == C - 1``).
        score_threshold: proposals need a class score strictly above this.
        overlap_threshold: minimum (won pixels) / (mask pixels) ratio.
        void_class: a column of ``class_probs`` meaning "no object", or ``None``.
        chunk_size: kept proposals per chunk (default: :data:`CHUNK_BYTES` of float work).

    Returns:
        ``[H, W]`` int32 panoptic map (0 = void) and its segments by increasing id.
    """
    class_probs, mask_probs = _check_inputs(class_probs, mask_probs)
    n, c = class_probs.shape
    h, w = mask_probs.shape[1:]
    flags = _thing_flags(isthing, c, void_class)
    panoptic = np.zeros((h, w), dtype=np.int32)
    if n == 0 or c == 0:
        return panoptic, []

    scores, labels = class_probs.max(-1)
    keep = scores > score_threshold
    if void_class is not None:
        keep &= labels != void_class
    kept = torch.nonzero(keep).flatten()
    if kept.numel() == 0:
        return panoptic, []
    cur_scores, cur_classes = scores[kept], labels[kept]
    k = kept.numel()

    # [H, W] winning kept proposal (largest score × mask, the earlier one on ties), its value, and
    # whether the winner's own mask covers the pixel; kept incrementally over chunks of proposals
    step = _chunk_rows(chunk_size, h * w)
    original_area = np.zeros(k, dtype=np.int64)
    best = ids = own = torch.empty(0)
    for start in range(0, k, step):
        chunk = _floats(mask_probs[kept[start : start + step]], cur_scores.dtype)  # [c, H, W]
        chunk_best, chunk_ids = (cur_scores[start : start + step, None, None] * chunk).max(0)
        binary = chunk >= 0.5
        # Summing bools as int32 is ~10x faster than the default int64 on CPU.
        chunk_area = binary.reshape(len(chunk), -1).sum(1, dtype=torch.int32)
        original_area[start : start + len(chunk)] = chunk_area.cpu().numpy()
        chunk_own = binary.gather(0, chunk_ids[None]).squeeze(0)
        chunk_ids += start
        if start == 0:
            best, ids, own = chunk_best, chunk_ids, chunk_own
        else:
            better = chunk_best > best  # strictly: ties stay with the earlier proposal
            best = torch.where(better, chunk_best, best)
            ids = torch.where(better, chunk_ids, ids)
            own = torch.where(better, chunk_own, own)
    flat_ids = ids.reshape(-1)
    # a pixel no kept proposal covers (every score × mask is 0, as off binary masks) is won by
    # none: argmax would hand it to the first proposal and inflate its area. Soft (sigmoid) masks
    # are never exactly 0, so for them this is Mask2Former's count unchanged.
    won = best.reshape(-1) > 0
    mask_area = torch.bincount(flat_ids[won], minlength=k).cpu().numpy()
    final_area = torch.bincount(flat_ids[own.reshape(-1)], minlength=k).cpu().numpy()

    # Id bookkeeping, a short loop over kept proposals (Mask2Former's loop without the pixels).
    classes = cur_classes.cpu().numpy()
    kept_np = kept.cpu().numpy()
    score_np = cur_scores.float().cpu().numpy()
    lookup = np.zeros(k, dtype=np.int64)  # kept proposal -> segment id (0 = dropped)
    stuff_ids: dict[int, int] = {}
    origins: list[tuple[int, int, bool, float, int]] = []  # id, class, isthing, score, proposal
    for i in range(k):
        if mask_area[i] == 0 or original_area[i] == 0 or final_area[i] == 0:
            continue
        if mask_area[i] / original_area[i] < overlap_threshold:
            continue
        cls = int(classes[i])
        thing = bool(flags[cls])
        if not thing and cls in stuff_ids:
            lookup[i] = stuff_ids[cls]
            continue
        seg_id = len(origins) + 1
        if not thing:
            stuff_ids[cls] = seg_id
        lookup[i] = seg_id
        origins.append((seg_id, cls, thing, float(score_np[i]), int(kept_np[i])))
    if not origins:
        return panoptic, []

    table = torch.from_numpy(lookup).to(ids.device)
    pan = torch.where(own, table[ids], torch.zeros_like(ids))
    areas = torch.bincount(pan.reshape(-1), minlength=len(origins) + 1).cpu().numpy()
    boxes = _bboxes(pan, len(origins) + 1)
    segments = [
        Segment(
            id=seg_id,
            category=cls,
            isthing=thing,
            area=int(areas[seg_id]),
            bbox=(
                float(boxes[seg_id, 0]),
                float(boxes[seg_id, 1]),
                float(boxes[seg_id, 2]),
                float(boxes[seg_id, 3]),
            ),
            score=score,
            mask_index=proposal,
        )
        for seg_id, cls, thing, score, proposal in origins
    ]
    return pan.to(torch.int32).cpu().numpy(), segments


def semantic_inference(
    class_probs: torch.Tensor,
    mask_probs: torch.Tensor,
    *,
    void_class: int | None = None,
    chunk_size: int | None = None,
) -> np.ndarray:
    """Per-pixel class: ``argmax_c sum_n class_probs[n, c] · mask_probs[n]``.

    Args:
        class_probs: ``[N, C]`` class probabilities.
        mask_probs: ``[N, H, W]`` mask probabilities in ``[0, 1]``, or bool masks.
        void_class: a column of ``class_probs`` never predicted, or ``None``.
        chunk_size: pixels per chunk (default: :data:`CHUNK_BYTES` of ``[N]`` and ``[C]`` float
            work per pixel); the ``[C, H, W]`` score map is never built whole.

    Returns:
        ``[H, W]`` int32 class indices; pixels no mask covers (all ``mask_probs`` zero) and all
        pixels when ``N == 0`` are :func:`semantic_void_value` of ``C``.
    """
    class_probs, mask_probs = _check_inputs(class_probs, mask_probs)
    n, c = class_probs.shape
    h, w = mask_probs.shape[1:]
    void = semantic_void_value(c)
    if n == 0 or c == 0:
        return np.full((h, w), void, dtype=np.int32)
    flat = mask_probs.reshape(n, h * w)
    labels = torch.full((h * w,), void, dtype=torch.int32, device=class_probs.device)
    step = _chunk_rows(chunk_size, n + c)
    for start in range(0, h * w, step):
        block = flat[:, start : start + step].to(class_probs.dtype)  # [N, P]
        semseg = torch.einsum("nc,np->cp", class_probs, block)  # [C, P]
        if void_class is not None:
            semseg[void_class] = -torch.inf
        covered = block.sum(0) > 0  # pixels no mask covers stay void
        chunk_labels = semseg.argmax(0).to(torch.int32)
        labels[start : start + step] = torch.where(covered, chunk_labels, void)
    return labels.reshape(h, w).cpu().numpy()


def instance_inference(
    class_probs: torch.Tensor,
    mask_probs: torch.Tensor,
    isthing: Sequence[bool] | np.ndarray,
    *,
    max_instances: int = 100,
    void_class: int | None = None,
    chunk_size: int | None = None,
) -> list[Instance]:
    """Mask2Former's instance results: top-k (proposal, class) pairs of thing classes.

    The ``k = min(max_instances, N·C)`` best entries of the flattened ``[N·C]`` class scores are
    taken, stuff classes dropped, and each score multiplied by the proposal's mean mask
    probability inside its mask (``mask_probs > 0.5``): ``sum(p·b) / (sum(b) + 1e-6)``.

    Args:
        class_probs: ``[N, C]`` class probabilities.
        mask_probs: ``[N, H, W]`` mask probabilities in ``[0, 1]``.
        isthing: ``[C]`` thing flags (``[C - 1]`` allowed when ``void_class == C - 1``).
        max_instances: the ``k`` of the top-k (before stuff classes are dropped).
        void_class: a column of ``class_probs`` never selected, or ``None``.
        chunk_size: proposals per chunk of the mask scores (default: :data:`CHUNK_BYTES`).

    Returns:
        Instances by decreasing score (ties by proposal, then class).
    """
    class_probs, mask_probs = _check_inputs(class_probs, mask_probs)
    n, c = class_probs.shape
    flags = _thing_flags(isthing, c, void_class)
    if void_class is not None:
        class_probs = class_probs.clone()
        class_probs[:, void_class] = -torch.inf
        total = n * (c - 1)
    else:
        total = n * c
    top = min(max_instances, total)
    if top <= 0:
        return []
    flat_scores, flat_index = class_probs.reshape(-1).topk(top, sorted=False)
    proposals = flat_index // c
    labels = flat_index % c
    thing = torch.from_numpy(flags).to(labels.device)[labels]
    flat_scores, proposals, labels = flat_scores[thing], proposals[thing], labels[thing]
    # the mask score depends on the proposal only: computed once per proposal, a chunk of
    # proposals at a time, not once per selected (proposal, class) pair (k full-mask copies)
    dtype = mask_probs.dtype if mask_probs.is_floating_point() else torch.float32
    per_proposal = torch.zeros(n, dtype=dtype, device=mask_probs.device)
    step = _chunk_rows(chunk_size, mask_probs[0].numel() if n else 1)
    for start in range(0, n, step):
        probs = _floats(mask_probs[start : start + step], dtype).reshape(-1, mask_probs[0].numel())
        binary = (probs > 0.5).to(dtype)
        per_proposal[start : start + len(probs)] = (probs * binary).sum(1) / (binary.sum(1) + 1e-6)
    mask_scores = per_proposal[proposals]
    final = (flat_scores * mask_scores).double().cpu().numpy()
    proposals_np = proposals.cpu().numpy()
    labels_np = labels.cpu().numpy()
    order = np.lexsort((labels_np, proposals_np, -final))
    return [
        Instance(mask_index=int(proposals_np[i]), category=int(labels_np[i]), score=float(final[i]))
        for i in order
    ]


def postprocess(
    class_probs: torch.Tensor,
    mask_probs: torch.Tensor,
    isthing: Sequence[bool] | np.ndarray,
    *,
    score_threshold: float = 0.0,
    overlap_threshold: float = 0.8,
    max_instances: int = 100,
    void_class: int | None = None,
) -> PanopticPrediction:
    """Panoptic, semantic and instance results of one image (see the three functions).

    Args:
        class_probs: ``[N, C]`` class probabilities.
        mask_probs: ``[N, H, W]`` mask probabilities in ``[0, 1]``, or bool masks (binary
            proposals: 1 byte a pixel; no float copy is made).
        isthing: ``[C]`` thing flags.
        score_threshold: panoptic: proposals need a class score strictly above this.
        overlap_threshold: panoptic: minimum (won pixels) / (mask pixels) ratio.
        max_instances: instances: top-k size.
        void_class: a "no object" column of ``class_probs``, or ``None``.
    """
    with torch.no_grad():
        panoptic, segments = panoptic_inference(
            class_probs,
            mask_probs,
            isthing,
            score_threshold=score_threshold,
            overlap_threshold=overlap_threshold,
            void_class=void_class,
        )
        semantic = semantic_inference(class_probs, mask_probs, void_class=void_class)
        instances = instance_inference(
            class_probs, mask_probs, isthing, max_instances=max_instances, void_class=void_class
        )
    flags = _thing_flags(isthing, class_probs.shape[1], void_class)
    return PanopticPrediction(
        panoptic=panoptic,
        segments=segments,
        semantic=semantic,
        instances=instances,
        isthing=flags,
    )
