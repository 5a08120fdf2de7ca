"""The SAM stage shared by the detector → SAM proposers and the SAM point grid.

:class:`SamSegmenter` wraps a transformers ``SamModel``, ``Sam2Model`` (SAM 2.1) or
``EdgeTamModel`` (the fast tier): :meth:`SamSegmenter.embed` runs the image encoder **once** per
image; :meth:`SamSegmenter.segment_boxes` and
:meth:`SamSegmenter.segment_points` then decode many prompts in one batched call of the prompt
encoder and mask decoder with that single embedding (the decoder broadcasts it over the prompts;
nothing re-encodes the image and no Python loop runs per prompt). Coordinates in and out are
pixels of the original image; boxes are XYXY.

:class:`Detector` is the interface of the open-vocabulary box detectors (Grounding DINO, OWLv2)
and :class:`DetectorSamProposer` the proposer they share: detect → per-class NMS → prune classes
with no box → SAM on all boxes → drop tiny masks → mask NMS.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import batched_nms

from retclip.errors import InputError
from retclip.hub import hf_load, resolve_model
from retclip.proposers.base import MaskProposer, Proposals, TextEmbeddings
from retclip.proposers.mask_ops import mask_nms

#: The paper's SAM (ViT-B).
DEFAULT_SAM = "sam-vit-base"


if TYPE_CHECKING:
    from retclip.images import SourceImage
    from retclip.vocabulary import Vocabulary


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` if given, else CUDA when available, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``float32`` by default; ``float16``/``bfloat16`` only on CUDA (CPU kernels are fp32)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
        if dtype not in table:
            raise InputError(f"dtype {dtype!r}: expected one of {', '.join(table)}")
        dtype = table[dtype]
    if dtype != torch.float32 and device.type != "cuda":
        raise InputError(f"dtype {dtype} needs a CUDA device, got {device}")
    return dtype


def load_hf(loader_cls: Any, name: str, **kwargs: object) -> Any:
    """``loader_cls.from_pretrained`` of a short name, hub id or directory, offline-first.

    Raises:
        ModelUnavailableError: the weights are not available locally (naming the id and how to
            fetch it), at once under ``HF_HUB_OFFLINE=1``.
    """
    return hf_load(loader_cls.from_pretrained, resolve_model(name).source, **kwargs)


#: Promptable mask models by config ``model_type``: the transformers model and processor classes.
#: SAM 2.1 and EdgeTAM share SAM 2's prompt encoder, mask decoder and processor.
SAM_FAMILIES: dict[str, tuple[str, str]] = {
    "sam": ("SamModel", "SamProcessor"),
    "sam2": ("Sam2Model", "Sam2Processor"),
    "edgetam": ("EdgeTamModel", "Sam2Processor"),
}


def sam_model_type(name: str) -> str:
    """The ``model_type`` of a SAM-family model (``sam``, ``sam2``, ``edgetam``) from its config.

    Raises:
        InputError: the model is not one of :data:`SAM_FAMILIES`.
        ModelUnavailableError: its config is not available locally.
    """
    from transformers import AutoConfig

    model_type = str(load_hf(AutoConfig, name).model_type)
    if model_type not in SAM_FAMILIES:
        raise InputError(
            f"model {name!r} is a {model_type!r} model, not a promptable mask model "
            f"({', '.join(SAM_FAMILIES)})"
        )
    return model_type


@dataclasses.dataclass
class SamImage:
    """One image encoded by SAM.

    Attributes:
        embedding: ``[1, C, h, w]`` image embedding (``h = w = image_size / patch_size``).
        original_size: ``(H, W)`` of the image in pixels.
        input_size: ``(h', w')`` of the image in SAM's input square: SAM resizes its longest side
            to the square's side (then pads); SAM 2 and EdgeTAM stretch it to the whole square.
        high_res: SAM 2 / EdgeTAM only: the two finer feature maps ``[1, C_s0, 4h, 4w]`` and
            ``[1, C_s1, 2h, 2w]`` the mask decoder upsamples with.
    """

    embedding: torch.Tensor
    original_size: tuple[int, int]
    input_size: tuple[int, int]
    high_res: tuple[torch.Tensor, ...] = ()


class SamSegmenter:
    """SAM, SAM 2.1 or EdgeTAM with the image embedding computed once and prompts decoded in
    batches. The family is read from the model's config (``model_type`` ``sam``, ``sam2``,
    ``edgetam``); all three take boxes and points and give 3 candidate masks per point.

    Args:
        model: short name (``sam-vit-base``, ``sam2.1-hiera-tiny``, ``edgetam``), hub id or local
            directory.
        device: torch device; CUDA when available by default.
        dtype: ``float32`` (default), or ``float16``/``bfloat16`` on CUDA.
        prompt_batch: prompts decoded per mask-decoder call (bounds memory: the decoder's
            two-way attention keeps a copy of the image tokens per prompt).
    """

    def __init__(
        self,
        model: str = DEFAULT_SAM,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        prompt_batch: int = 64,
    ) -> None:
        import transformers

        if prompt_batch < 1:
            raise InputError(f"prompt batch must be >= 1, got {prompt_batch}")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model_id = model
        self.model_type = sam_model_type(model)
        model_cls, processor_cls = SAM_FAMILIES[self.model_type]
        self.processor: Any = load_hf(getattr(transformers, processor_cls), model)
        loaded = load_hf(getattr(transformers, model_cls), model)
        self.model: Any = loaded.to(self.device, self.dtype).eval()
        self.image_size = int(self.model.config.prompt_encoder_config.image_size)
        self.prompt_batch = prompt_batch

    def compile_encoder(self) -> None:
        """``--compile``: the image encoder (``get_image_embeddings``) through ``torch.compile``
        (:class:`~retclip.acceleration.Compiled`: a warning and eager mode where it fails)."""
        from retclip.acceleration import Compiled

        if not isinstance(self.model.get_image_embeddings, Compiled):
            self.model.get_image_embeddings = Compiled(
                self.model.get_image_embeddings, f"{self.model_type} image encoder"
            )

    @property
    def stretches(self) -> bool:
        """SAM 2 / EdgeTAM: the image is resized to the whole input square (no padding)."""
        return self.model_type != "sam"

    @torch.inference_mode()
    def embed_batch(self, images: Sequence[np.ndarray]) -> list[SamImage]:
        """:meth:`embed` of several images in one image-encoder pass (every image is resized
        and padded, or stretched, to the same input square, so any sizes batch together)."""
        if len(images) <= 1:
            return [self.embed(image) for image in images]
        inputs = [self._inputs(image) for image in images]
        pixels = torch.cat([pixel for pixel, _ in inputs])  # [B, 3, S, S]
        if self.stretches:
            *high_res, embedding = self.model.get_image_embeddings(pixels)
        else:
            embedding, high_res = self.model.get_image_embeddings(pixels), []
        return [
            SamImage(
                embedding[row : row + 1],
                (int(image.shape[0]), int(image.shape[1])),
                size,
                tuple(level[row : row + 1] for level in high_res),
            )
            for row, (image, (_, size)) in enumerate(zip(images, inputs, strict=True))
        ]

    def _inputs(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """The encoder input ``[1, 3, S, S]`` of ``image`` and the image's size in it."""
        if self.stretches:
            size = {"height": self.image_size, "width": self.image_size}
            inputs = self.processor(images=image, size=size, return_tensors="pt")
            square = (self.image_size, self.image_size)
            return inputs["pixel_values"].to(self.device, self.dtype), square
        size = {"longest_edge": self.image_size}
        pad = {"height": self.image_size, "width": self.image_size}
        inputs = self.processor(images=image, size=size, pad_size=pad, return_tensors="pt")
        h, w = (int(v) for v in inputs["reshaped_input_sizes"][0])
        return inputs["pixel_values"].to(self.device, self.dtype), (h, w)

    @torch.inference_mode()
    def embed(self, image: np.ndarray) -> SamImage:
        """Encode ``image`` ``[H, W, 3]`` uint8 RGB once (SAM: resize the longest side, normalise,
        pad; SAM 2 / EdgeTAM: resize to the input square, normalise)."""
        original = (int(image.shape[0]), int(image.shape[1]))
        pixels, size = self._inputs(image)
        if self.stretches:
            *high_res, embedding = self.model.get_image_embeddings(pixels)
            return SamImage(embedding, original, size, tuple(high_res))
        return SamImage(self.model.get_image_embeddings(pixels), original, size)

    def _to_input(self, coords: torch.Tensor, sam_image: SamImage) -> torch.Tensor:
        """Pixel coordinates ``[..., 2k]`` (x, y pairs) → SAM input coordinates."""
        (height, width), (h, w) = sam_image.original_size, sam_image.input_size
        scale = torch.tensor([w / width, h / height], device=coords.device, dtype=coords.dtype)
        return coords * scale.repeat(coords.shape[-1] // 2)

    def _decode(
        self,
        sam_image: SamImage,
        *,
        boxes: torch.Tensor | None = None,
        points: torch.Tensor | None = None,
        multimask: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One prompt-encoder + mask-decoder call for ``P`` prompts on the one embedding.

        Args:
            boxes: ``[P, 4]`` XYXY in SAM input coordinates, or
            points: ``[P, 2]`` xy in SAM input coordinates (one foreground point per prompt).

        Returns:
            low-resolution mask logits ``[P, M, 4h, 4w]`` and predicted IoU ``[P, M]``
            (``M`` = 3 with ``multimask``, else 1).
        """
        labels = None
        if points is not None:
            points = points[None, :, None, :]  # [1, P, 1, 2]
            labels = torch.ones(points.shape[:3], dtype=torch.long, device=self.device)
        if self.stretches:  # SAM 2's forward on precomputed embeddings: prompts → decoder only
            out = self.model(
                image_embeddings=[*sam_image.high_res, sam_image.embedding],
                input_points=points,
                input_labels=None if labels is None else labels.int(),
                input_boxes=None if boxes is None else boxes[None],
                multimask_output=multimask,
            )
            return out.pred_masks[0], out.iou_scores[0]
        sparse, dense = self.model.prompt_encoder(
            input_points=points,
            input_labels=labels,
            input_boxes=None if boxes is None else boxes[None],
            input_masks=None,
        )
        masks, iou = self.model.mask_decoder(
            image_embeddings=sam_image.embedding,
            image_positional_embeddings=self.model.get_image_wide_positional_embeddings(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
        )
        return masks[0], iou[0]

    def valid_low_res(self, logits: torch.Tensor, sam_image: SamImage) -> torch.Tensor:
        """The part of low-resolution logits ``[..., 4h, 4w]`` that covers the image (SAM's
        padding cropped; all of it for SAM 2 / EdgeTAM)."""
        if self.stretches:
            return logits
        h, w = sam_image.input_size
        rows = -(-h * logits.shape[-2] // self.image_size)
        cols = -(-w * logits.shape[-1] // self.image_size)
        return logits[..., :rows, :cols]

    def upscale(self, logits: torch.Tensor, sam_image: SamImage) -> torch.Tensor:
        """Low-resolution logits ``[P, M, h, w]`` → float logits ``[P, M, H, W]`` at image size:
        the model's own post-processing (SAM: upsample to the padded input, crop the padding,
        resize; SAM 2 / EdgeTAM: resize)."""
        if self.stretches:
            return F.interpolate(
                logits.float(), sam_image.original_size, mode="bilinear", align_corners=False
            )
        size = (self.image_size, self.image_size)
        logits = F.interpolate(logits.float(), size, mode="bilinear", align_corners=False)
        h, w = sam_image.input_size
        logits = logits[..., :h, :w]
        return F.interpolate(logits, sam_image.original_size, mode="bilinear", align_corners=False)

    @torch.inference_mode()
    def segment_boxes(
        self, sam_image: SamImage, boxes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks of box prompts.

        Args:
            sam_image: from :meth:`embed`.
            boxes: ``[N, 4]`` XYXY pixels of the original image.

        Returns:
            ``[N, H, W]`` bool masks at image size and ``[N]`` predicted IoU, on the device.
        """
        boxes = self._to_input(boxes.to(self.device, self.dtype), sam_image)
        masks, ious = [], []
        for start in range(0, len(boxes), self.prompt_batch):
            logits, iou = self._decode(
                sam_image, boxes=boxes[start : start + self.prompt_batch], multimask=False
            )
            masks.append(self.upscale(logits, sam_image)[:, 0] > 0)
            ious.append(iou[:, 0].float())
        height, width = sam_image.original_size
        if not masks:
            return torch.zeros((0, height, width), dtype=torch.bool, device=self.device), (
                torch.zeros(0, device=self.device)
            )
        return torch.cat(masks), torch.cat(ious)

    @torch.inference_mode()
    def point_logits(
        self, sam_image: SamImage, points: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Three candidate masks per point prompt (multimask output), for one batch, at the
        decoder's low resolution (:meth:`upscale` takes them to image size).

        Args:
            points: ``[P, 2]`` xy pixels of the original image, ``P <= prompt_batch``.

        Returns:
            float mask logits ``[P, 3, 4h, 4w]`` and predicted IoU ``[P, 3]``.
        """
        points = self._to_input(points.to(self.device, self.dtype), sam_image)
        logits, iou = self._decode(sam_image, points=points, multimask=True)
        return logits.float(), iou.float()

    def segment_points(
        self, sam_image: SamImage, points: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`point_logits` upscaled: mask logits ``[P, 3, H, W]`` and IoU ``[P, 3]``."""
        logits, iou = self.point_logits(sam_image, points)
        return self.upscale(logits, sam_image), iou


@dataclasses.dataclass
class Detections:
    """Boxes found for class names in one image.

    Attributes:
        boxes: ``[K, 4]`` float XYXY pixels of the original image.
        scores: ``[K]`` float confidence in ``[0, 1]``.
        labels: ``[K]`` long index into the class names given to :meth:`Detector.detect`.
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor

    def select(self, keep: torch.Tensor) -> Detections:
        return Detections(self.boxes[keep], self.scores[keep], self.labels[keep])


class Detector(abc.ABC):
    """An open-vocabulary box detector: image + class names → :class:`Detections`."""

    @abc.abstractmethod
    def detect(self, image: np.ndarray, classes: Sequence[str]) -> Detections:
        """Boxes above the detector's thresholds for ``classes`` in ``image`` ``[H, W, 3]``
        uint8 RGB, with one class per box."""

    def detect_batch(
        self, images: Sequence[np.ndarray], classes: Sequence[Sequence[str]]
    ) -> list[Detections]:
        """:meth:`detect` of several images, each with its class names; detectors whose model
        takes a batch override this (same results as image by image)."""
        return [self.detect(image, names) for image, names in zip(images, classes, strict=True)]


def empty_proposals(height: int, width: int, kept: np.ndarray | None = None) -> Proposals:
    """No proposals for an ``H×W`` image (class hints present, so labelled builds accept it)."""
    return Proposals(
        np.zeros((0, height, width), bool),
        np.zeros(0, np.float32),
        class_hints=np.zeros(0, np.int64),
        kept_classes=np.zeros(0, np.int64) if kept is None else kept,
    )


class DetectorSamProposer(MaskProposer):
    """Detector boxes → SAM masks, with a class hint per mask and classes pruned per image.

    Classes with no box above the detector's thresholds are pruned (``kept_classes``; paper
    §2.2). Per-class box NMS (IoU ``nms_iou``) runs before SAM; afterwards masks smaller than
    ``min_area`` pixels are dropped and near-duplicates removed by class-agnostic mask NMS (IoU
    ``mask_nms_iou``, higher detection score kept). A mask's score is its box's detection score.
    """

    gives_class_hints = True

    def __init__(
        self,
        detector: Detector,
        sam: SamSegmenter,
        *,
        nms_iou: float = 0.5,
        min_area: int = 100,
        mask_nms_iou: float = 0.8,
    ) -> None:
        self.detector = detector
        self.sam = sam
        self.nms_iou = nms_iou
        self.min_area = min_area
        self.mask_nms_iou = mask_nms_iou

    def propose(
        self, image: SourceImage, vocabulary: Vocabulary, text_embeddings: TextEmbeddings = None
    ) -> Proposals:
        found = self._boxes(self.detector.detect(image.pixels, self._prompts(vocabulary)))
        if len(found.boxes) == 0:
            return self._masks(image, found, None)
        return self._masks(image, found, self.sam.embed(image.pixels))

    def propose_batch(
        self,
        images: Sequence[SourceImage],
        vocabularies: Sequence[Vocabulary],
        text_embeddings: Sequence[TextEmbeddings] | None = None,
    ) -> list[Proposals]:
        """The detector over all images at once (:meth:`Detector.detect_batch`), then SAM's
        image encoder over the images that have boxes in one pass (:meth:`SamSegmenter.
        embed_batch`); boxes are decoded per image. Equal to :meth:`propose` image by image."""
        if len(images) <= 1:
            return super().propose_batch(images, vocabularies, text_embeddings)
        prompts = [self._prompts(vocabulary) for vocabulary in vocabularies]
        found = [
            self._boxes(d)
            for d in self.detector.detect_batch([image.pixels for image in images], prompts)
        ]
        boxed = [i for i, f in enumerate(found) if len(f.boxes)]
        embedded = dict(
            zip(boxed, self.sam.embed_batch([images[i].pixels for i in boxed]), strict=True)
        )
        return [
            self._masks(image, f, embedded.get(i))
            for i, (image, f) in enumerate(zip(images, found, strict=True))
        ]

    @staticmethod
    def _prompts(vocabulary: Vocabulary) -> list[str]:
        # prompts are first synonyms: display names of built-in vocabularies can be WordNet
        # lists ("road, route") that read badly as prompts
        return [entry.synonyms[0] for entry in vocabulary.classes]

    def _boxes(self, found: Detections) -> Detections:
        """Per-class box NMS."""
        return found.select(batched_nms(found.boxes, found.scores, found.labels, self.nms_iou))

    def _masks(
        self, image: SourceImage, found: Detections, sam_image: SamImage | None
    ) -> Proposals:
        """SAM masks of ``found``'s boxes on the image's embedding, small ones and duplicates
        dropped; classes without a box pruned."""
        height, width = image.size
        kept = np.unique(found.labels.cpu().numpy()).astype(np.int64)
        if len(found.boxes) == 0 or sam_image is None:
            return empty_proposals(height, width, kept)
        masks, _ = self.sam.segment_boxes(sam_image, found.boxes)
        scores = found.scores.to(masks.device)
        labels = found.labels.to(masks.device)
        large = masks.sum(dim=(1, 2)) >= self.min_area
        masks, scores, labels = masks[large], scores[large], labels[large]
        keep = mask_nms(masks, scores, self.mask_nms_iou)
        return Proposals(
            masks[keep].cpu().numpy(),
            scores[keep].cpu().numpy(),
            class_hints=labels[keep].cpu().numpy(),
            kept_classes=kept,
        )
