"""Grounded SAM (the paper's training-free proposals, §2.2): Grounding DINO boxes → SAM masks.

Grounding DINO is prompted with the class names, lowercased and joined as ``"cat . dog ."``. Its
text encoder reads at most ``max_text_len`` (256) tokens and its phrase masks are cut at the
``.`` separators, so the vocabulary is split into as few prompts as fit (150 ADE classes need
several); all prompts of an image run as one batch. A box is kept when its best token
probability exceeds the box threshold; it is assigned the class whose tokens score highest, if
that score exceeds the text threshold.

The image-only part of the model (the Swin backbone with its position embeddings and the input
projections to ``d_model``) runs **once per image** whatever the number of prompts: see
:func:`image_pass_once`. Only the text backbone, the fusion encoder and the decoder run per prompt.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from retclip.errors import InputError
from retclip.proposers.sam import (
    DEFAULT_SAM,
    Detections,
    Detector,
    DetectorSamProposer,
    SamSegmenter,
    load_hf,
    resolve_device,
    resolve_dtype,
)

#: The paper's detector; ``grounding-dino-tiny`` is the smaller option.
DEFAULT_DETECTOR = "grounding-dino-base"


@dataclasses.dataclass(frozen=True)
class PromptChunk:
    """One Grounding DINO prompt covering some classes.

    Attributes:
        text: ``"cat . dog ."``.
        classes: indices of the covered classes in the full class list.
        input_ids: ``[CLS] tokens(cat) . tokens(dog) . [SEP]``.
        spans: per covered class, the ``(start, end)`` token positions of its name.
    """

    text: str
    classes: tuple[int, ...]
    input_ids: tuple[int, ...]
    spans: tuple[tuple[int, int], ...]


def chunk_prompts(
    classes: Sequence[str], tokenizer: Any, max_tokens: int = 256
) -> list[PromptChunk]:
    """Split class names into prompts of at most ``max_tokens`` tokens, in class order.

    Every class is in exactly one chunk. Names are lowercased and stripped.

    Raises:
        InputError: a single class name does not fit in one prompt.
    """
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    dot_id = tokenizer.convert_tokens_to_ids(".")
    chunks: list[PromptChunk] = []
    ids: list[int] = [cls_id]
    members: list[int] = []
    spans: list[tuple[int, int]] = []

    def close() -> None:
        texts = " . ".join(classes[i].strip().lower() for i in members) + " ."
        chunks.append(PromptChunk(texts, tuple(members), (*ids, sep_id), tuple(spans)))

    for index, name in enumerate(classes):
        text = name.strip().lower()
        if not text:
            raise InputError(f"class {index} has an empty name")
        pieces = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(pieces) + 3 > max_tokens:
            raise InputError(
                f"class {name!r} is {len(pieces)} tokens long: it does not fit in a Grounding "
                f"DINO prompt of {max_tokens} tokens"
            )
        if len(ids) + len(pieces) + 2 > max_tokens:  # + "." + [SEP]
            close()
            ids, members, spans = [cls_id], [], []
        spans.append((len(ids), len(ids) + len(pieces)))
        ids += [*pieces, dot_id]
        members.append(index)
    close()
    return chunks


def assign_classes(
    probs: torch.Tensor,
    chunk: PromptChunk,
    *,
    box_threshold: float,
    text_threshold: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Boxes of one prompt that pass the thresholds, and their classes.

    Args:
        probs: ``[Q, T]`` sigmoid token probabilities of ``Q`` boxes (``T >= len(input_ids)``;
            positions past the prompt are ignored).

    Returns:
        ``keep`` ``[K]`` box indices, ``scores`` ``[K]`` (best token probability of the box),
        ``labels`` ``[K]`` class indices into the full class list.
    """
    n_tokens = len(chunk.input_ids)
    probs = probs[:, :n_tokens]
    scores = probs.max(dim=1).values  # GDINO's box score: best token of the prompt
    owner = torch.full((n_tokens,), -1, dtype=torch.long, device=probs.device)
    for position, (start, end) in enumerate(chunk.spans):
        owner[start:end] = position
    in_class = owner >= 0
    per_class = torch.zeros(
        (probs.shape[0], len(chunk.spans)), dtype=probs.dtype, device=probs.device
    )
    index = owner[in_class].expand(probs.shape[0], -1)
    per_class.scatter_reduce_(1, index, probs[:, in_class], reduce="amax", include_self=True)
    best, local = per_class.max(dim=1)
    keep = torch.nonzero((scores > box_threshold) & (best > text_threshold)).flatten()
    members = torch.tensor(chunk.classes, dtype=torch.long, device=probs.device)
    return keep, scores[keep], members[local[keep]]


def _expand_rows(value: Any, batch: int) -> Any:
    """``value`` (a tensor, or lists/tuples of them) with each ``[1, ...]`` tensor expanded to
    ``[batch, ...]`` (a view: no copy)."""
    if isinstance(value, torch.Tensor):
        return value.expand(batch, *value.shape[1:])
    if isinstance(value, (list, tuple)):
        return type(value)(_expand_rows(item, batch) for item in value)
    return value


def _take_rows(value: Any, rows: torch.Tensor) -> Any:
    """``value`` (a tensor, or lists/tuples of them) with each tensor's rows taken at ``rows``."""
    if isinstance(value, torch.Tensor):
        return value.index_select(0, rows.to(value.device))
    if isinstance(value, (list, tuple)):
        return type(value)(_take_rows(item, rows) for item in value)
    return value


@contextlib.contextmanager
def image_pass_once(model: Any, batch: int, images: Sequence[int] | None = None) -> Iterator[None]:
    """Within the block, ``model`` (a ``GroundingDinoModel``, called on ``batch`` rows that are
    all the **same image** with different prompts) runs its image-only modules on one row.

    In ``GroundingDinoModel.forward`` nothing before the fusion encoder mixes image and text: the
    backbone (``model.backbone``: Swin + position embeddings, ``(pixel_values [B, 3, H, W],
    pixel_mask [B, H, W])`` → per-level ``(features [B, C_l, h_l, w_l], masks [B, h_l, w_l])`` and
    position embeddings) and the input projections (``model.input_proj_vision[l]``: conv +
    GroupNorm to ``[B, d_model, h_l, w_l]``) are per-row functions of the pixels. Forward hooks
    slice each one's tensor inputs to the first row and expand its outputs back to ``batch`` rows
    as stride-0 views, so the forward itself runs unchanged (transformers' own code, same call
    order) with one backbone pass instead of ``batch``.

    ``images``: the image of each row when the rows hold several images (``[0, 0, 1, 1, 1]``,
    each image's rows adjacent); the image-only modules then run once per image, on the image's
    first row, and their outputs are copied to the image's rows.
    """
    if images is not None and len(set(images)) > 1:
        index = torch.as_tensor(list(images), dtype=torch.long)
        firsts = torch.as_tensor(
            [row for row in range(len(index)) if row == 0 or index[row] != index[row - 1]]
        )
        if len(firsts) != len(set(images)):
            raise ValueError(f"rows of one image must be adjacent, got images {list(images)}")
        spread = torch.repeat_interleave(torch.arange(len(firsts)), torch.bincount(index))

        def first_row(_module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            return tuple(_take_rows(a, firsts) if isinstance(a, torch.Tensor) else a for a in args)

        def expand(_module: torch.nn.Module, _args: tuple[Any, ...], output: Any) -> Any:
            return _take_rows(output, spread)

    else:

        def first_row(_module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            return tuple(a[:1] if isinstance(a, torch.Tensor) else a for a in args)

        def expand(_module: torch.nn.Module, _args: tuple[Any, ...], output: Any) -> Any:
            return _expand_rows(output, batch)

    handles = []
    if batch > 1:
        for module in (model.backbone, *model.input_proj_vision):
            handles.append(module.register_forward_pre_hook(first_row))
            handles.append(module.register_forward_hook(expand))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class GroundingDinoDetector(Detector):
    """Grounding DINO prompted with class names (see the module docstring).

    Args:
        model: ``grounding-dino-base`` (default, the paper's), ``grounding-dino-tiny``, a hub id
            or a local directory.
        box_threshold: minimum best-token probability of a box (0.3).
        text_threshold: minimum probability of the assigned class's tokens (0.25).
        shortest_edge, longest_edge: input resize (800 / 1333, Grounded-SAM's).
        device, dtype: see :class:`~retclip.proposers.sam.SamSegmenter`.
        share_image_pass: run the image backbone once for all prompts (:func:`image_pass_once`);
            ``False`` runs transformers' forward on the image repeated per prompt (the reference
            the shared pass is tested and benchmarked against).
    """

    def __init__(
        self,
        model: str = DEFAULT_DETECTOR,
        *,
        box_threshold: float = 0.3,
        text_threshold: float = 0.25,
        shortest_edge: int = 800,
        longest_edge: int = 1333,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        share_image_pass: bool = True,
    ) -> None:
        from transformers import AutoProcessor, GroundingDinoForObjectDetection

        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.processor: Any = load_hf(AutoProcessor, model)
        detector = load_hf(GroundingDinoForObjectDetection, model)
        self.model: Any = detector.to(self.device, self.dtype).eval()
        self.max_tokens = int(self.model.config.max_text_len)
        self.box_threshold = box_threshold
        self.text_threshold = text_threshold
        self.size = {"shortest_edge": shortest_edge, "longest_edge": longest_edge}
        self.share_image_pass = share_image_pass
        self._chunks: tuple[tuple[str, ...], list[PromptChunk]] | None = None

    def prompts(self, classes: Sequence[str]) -> list[PromptChunk]:
        """The prompt chunks of ``classes`` (cached for the last class list)."""
        key = tuple(classes)
        if self._chunks is None or self._chunks[0] != key:
            tokenizer = self.processor.tokenizer
            self._chunks = (key, chunk_prompts(key, tokenizer, self.max_tokens))
        return self._chunks[1]

    @torch.inference_mode()
    def detect(self, image: np.ndarray, classes: Sequence[str]) -> Detections:
        return self._detect_rows([image], [classes])[0]

    def detect_batch(
        self, images: Sequence[np.ndarray], classes: Sequence[Sequence[str]]
    ) -> list[Detections]:
        """:meth:`detect` of several images: images whose resized inputs have one size run as
        one model call (rows = every prompt of every image; the image backbone once per image,
        :func:`image_pass_once`); others in calls of their own size."""
        if len(images) <= 1:
            return [self.detect(image, names) for image, names in zip(images, classes, strict=True)]
        image_processor = self.processor.image_processor
        inputs = [
            image_processor(images=image, size=self.size, return_tensors="pt") for image in images
        ]
        by_size: dict[tuple[int, ...], list[int]] = {}
        for i, pixels in enumerate(inputs):
            by_size.setdefault(tuple(pixels["pixel_values"].shape), []).append(i)
        found: list[Detections | None] = [None] * len(images)
        for members in by_size.values():
            group = self._detect_rows(
                [images[i] for i in members],
                [classes[i] for i in members],
                [inputs[i] for i in members],
            )
            for i, detections in zip(members, group, strict=True):
                found[i] = detections
        return [f for f in found if f is not None]

    @torch.inference_mode()
    def _detect_rows(
        self,
        images: Sequence[np.ndarray],
        classes: Sequence[Sequence[str]],
        inputs: Sequence[Any] | None = None,
    ) -> list[Detections]:
        """One model call over every prompt chunk of ``images`` (their inputs of one size)."""
        chunks = [self.prompts(names) for names in classes]
        if inputs is None:
            image_processor = self.processor.image_processor
            inputs = [
                image_processor(images=image, size=self.size, return_tensors="pt")
                for image in images
            ]
        owners = [i for i, image_chunks in enumerate(chunks) for _ in image_chunks]
        rows = [chunk for image_chunks in chunks for chunk in image_chunks]
        length = max(len(c.input_ids) for c in rows)
        ids = torch.zeros((len(rows), length), dtype=torch.long)
        for row, chunk in enumerate(rows):
            ids[row, : len(chunk.input_ids)] = torch.tensor(chunk.input_ids)
        batch = len(rows)
        if len(images) == 1:  # one image: its pixels viewed once per prompt (no copies)
            pixel_values = inputs[0]["pixel_values"].expand(batch, -1, -1, -1)
            pixel_mask = inputs[0]["pixel_mask"].expand(batch, -1, -1)
        else:
            pixel_values = torch.cat([inputs[i]["pixel_values"] for i in owners])
            pixel_mask = torch.cat([inputs[i]["pixel_mask"] for i in owners])
        shared = image_pass_once(self.model.model, batch, owners) if self.share_image_pass else None
        with shared or contextlib.nullcontext():
            outputs = self.model(
                pixel_values=pixel_values.to(self.device, self.dtype),
                pixel_mask=pixel_mask.to(self.device),
                input_ids=ids.to(self.device),
                attention_mask=(ids > 0).long().to(self.device),
                token_type_ids=torch.zeros_like(ids).to(self.device),
            )
        probs = outputs.logits.float().sigmoid()  # [B, Q, max_text_len]
        found = []
        start = 0
        for image, image_chunks in zip(images, chunks, strict=True):
            height, width = image.shape[:2]
            scale = torch.tensor([width, height, width, height], device=self.device)
            boxes, scores, labels = [], [], []
            for row, chunk in enumerate(image_chunks, start=start):
                keep, score, label = assign_classes(
                    probs[row],
                    chunk,
                    box_threshold=self.box_threshold,
                    text_threshold=self.text_threshold,
                )
                cx, cy, w, h = outputs.pred_boxes[row, keep].float().unbind(-1)
                xyxy = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)
                boxes.append((xyxy * scale).clamp_min(0).minimum(scale))
                scores.append(score)
                labels.append(label)
            start += len(image_chunks)
            found.append(Detections(torch.cat(boxes), torch.cat(scores), torch.cat(labels)))
        return found


class GroundedSamProposer(DetectorSamProposer):
    """``grounded-sam``: Grounding DINO → SAM (paper's proposals). Options as in
    :class:`GroundingDinoDetector` and :class:`~retclip.proposers.sam.DetectorSamProposer`."""

    name = "grounded-sam"

    def __init__(
        self,
        detector: str = DEFAULT_DETECTOR,
        sam: str = DEFAULT_SAM,
        *,
        box_threshold: float = 0.3,
        text_threshold: float = 0.25,
        shortest_edge: int = 800,
        longest_edge: int = 1333,
        nms_iou: float = 0.5,
        min_area: int = 100,
        mask_nms_iou: float = 0.8,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> None:
        super().__init__(
            GroundingDinoDetector(
                detector,
                box_threshold=box_threshold,
                text_threshold=text_threshold,
                shortest_edge=shortest_edge,
                longest_edge=longest_edge,
                device=device,
                dtype=dtype,
            ),
            SamSegmenter(sam, device=device, dtype=dtype),
            nms_iou=nms_iou,
            min_area=min_area,
            mask_nms_iou=mask_nms_iou,
        )
