"""The Python entry point: ``Segmenter(backbone, proposer, db)(image, classes)``.

Data flow for one image (README, "Architecture"): vocabulary → text embeddings (cached per
vocabulary) → mask proposals → one backbone pass → mask pooling → ``s_clip`` and ``s_ret`` →
α/β/γ ensemble → panoptic merge. The per-mask scores of each path are kept in the result, so
:meth:`SegmentationResult.rescore` tries other α/β/γ or thresholds without any model pass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from retclip.backbones.base import Backbone
from retclip.backbones.registry import load_backbone, resolve_device
from retclip.database import FeatureDatabase
from retclip.errors import InputError
from retclip.images import image_to_tensor, load_image
from retclip.outputs import write_outputs
from retclip.panoptic import PanopticPrediction, Segment, postprocess
from retclip.pooling import PoolingMode, features_from_dense
from retclip.proposers.base import MaskProposer, Proposals
from retclip.scores.clip import clip_scores
from retclip.scores.ensemble import (
    DEFAULT_ALPHA,
    DEFAULT_BETA,
    DEFAULT_GAMMA,
    CombineMode,
    check_weight,
    ensemble,
)
from retclip.scores.retrieval import DEFAULT_K, Retriever
from retclip.text_embeddings import ClassEmbeddings, embed_vocabulary
from retclip.vocabulary import Vocabulary

ImageInput = str | Path | np.ndarray | Image.Image
ClassesInput = str | Sequence[str] | Vocabulary


@dataclasses.dataclass(frozen=True)
class Settings:
    """How per-mask scores become a panoptic result (no model pass depends on these)."""

    alpha: float = DEFAULT_ALPHA
    beta: float = DEFAULT_BETA
    gamma: float = DEFAULT_GAMMA
    combine: CombineMode = "linear"
    score_threshold: float = 0.0
    overlap_threshold: float = 0.8
    max_instances: int = 100

    def __post_init__(self) -> None:
        for name in ("alpha", "beta", "gamma", "overlap_threshold"):
            check_weight(name, getattr(self, name))
        if self.combine not in ("linear", "geometric"):
            raise InputError(f"combine must be 'linear' or 'geometric', got {self.combine!r}")
        if self.max_instances < 1:
            raise InputError(f"max_instances must be >= 1, got {self.max_instances}")


@dataclasses.dataclass
class MaskScores:
    """Per-mask class scores of each path (paper §2.2), ``N`` masks × ``C`` classes.

    Attributes:
        s_clip: ``[N, C]`` CLIP-path probabilities.
        s_ret: ``[N, C]`` retrieval scores, ``None`` without a database.
        s_iv: ``[N, C]`` in-vocabulary probabilities, ``None`` in the training-free setting.
        seen: ``[C]`` bool, classes of the training vocabulary, ``None`` if none was given.
        kept: ``[C]`` bool, classes the proposer kept for this image (pruned ones score 0).
    """

    s_clip: torch.Tensor
    s_ret: torch.Tensor | None
    s_iv: torch.Tensor | None
    seen: torch.Tensor | None
    kept: torch.Tensor

    def combine(self, settings: Settings) -> torch.Tensor:
        """Final scores ``s [N, C]`` under ``settings``; pruned classes get 0."""
        s = ensemble(
            self.s_clip,
            self.s_ret,
            gamma=settings.gamma,
            s_iv=self.s_iv,
            seen=self.seen,
            alpha=settings.alpha,
            beta=settings.beta,
            mode=settings.combine,
        )
        return s * self.kept.to(s.dtype)

    def to_numpy(self) -> dict[str, np.ndarray]:
        """The scores as NumPy arrays (absent paths left out), for ``np.savez``."""
        arrays = {
            "s_clip": self.s_clip,
            "s_ret": self.s_ret,
            "s_iv": self.s_iv,
            "seen": self.seen,
            "kept": self.kept,
        }
        return {k: v.detach().cpu().numpy() for k, v in arrays.items() if v is not None}

    @classmethod
    def from_numpy(cls, arrays: dict[str, np.ndarray]) -> MaskScores:
        def get(key: str) -> torch.Tensor | None:
            return torch.from_numpy(np.asarray(arrays[key])) if key in arrays else None

        s_clip = get("s_clip")
        kept = get("kept")
        if s_clip is None or kept is None:
            raise InputError("a scores file needs at least s_clip and kept")
        return cls(s_clip=s_clip, s_ret=get("s_ret"), s_iv=get("s_iv"), seen=get("seen"), kept=kept)


@dataclasses.dataclass
class PreparedImage:
    """One image up to the backbone pass (see :meth:`Segmenter.prepare`)."""

    pixels: np.ndarray  # [H, W, 3] uint8
    vocabulary: Vocabulary
    text: ClassEmbeddings
    proposals: Proposals
    source: str | None


@dataclasses.dataclass
class SegmentationResult:
    """The segmentation of one image, with everything needed to re-score or save it."""

    image: np.ndarray  # [H, W, 3] uint8
    vocabulary: Vocabulary
    proposals: Proposals
    scores: MaskScores
    settings: Settings
    prediction: PanopticPrediction
    source: str | None = None

    @property
    def panoptic(self) -> np.ndarray:
        """``[H, W]`` int32 segment ids, 0 = void."""
        return self.prediction.panoptic

    @property
    def semantic(self) -> np.ndarray:
        """``[H, W]`` class index per pixel, 255 = void (65535 with ≥ 255 classes)."""
        return self.prediction.semantic

    @property
    def segments(self) -> list[Segment]:
        return self.prediction.segments

    def label_of(self, segment: Segment) -> str:
        return self.vocabulary.names[segment.category]

    def rescore(self, **changes: Any) -> SegmentationResult:
        """The same masks and path scores merged under other :class:`Settings` (no model pass)."""
        settings = dataclasses.replace(self.settings, **changes)
        prediction = merge(self.scores, self.proposals, self.vocabulary, settings)
        return dataclasses.replace(self, settings=settings, prediction=prediction)

    def save(self, out_dir: str | Path, stem: str | None = None) -> dict[str, Path]:
        """Write the five output files and ``<stem>_scores.npz`` into ``out_dir``."""
        stem = stem or (Path(self.source).stem if self.source else "image")
        out_dir = Path(out_dir)
        extra = {
            "settings": dataclasses.asdict(self.settings),
            "vocabulary": self.vocabulary.name,
            "source": self.source,
        }
        paths = write_outputs(
            out_dir,
            stem,
            self.image,
            self.prediction,
            self.proposals.masks,
            self.vocabulary.names,
            self.vocabulary.ids,
            image_id=stem,
            extra=extra,
        )
        paths["scores"] = out_dir / f"{stem}_scores.npz"
        save_scores(paths["scores"], self.proposals, self.scores, self.vocabulary.names)
        return paths


def save_scores(
    path: Path, proposals: Proposals, scores: MaskScores, class_names: Sequence[str]
) -> None:
    """Write the masks (bit-packed), proposal scores and per-mask path scores to ``path``.

    The file (``.npz``: ``masks``, ``mask_shape``, ``proposal_scores``, ``class_names``,
    ``s_clip``, ``s_ret``, ``s_iv``, ``seen``, ``kept``) is what re-scoring with other α/β/γ needs;
    it is written to a temporary name and renamed, so it is never half-written.
    """
    arrays: dict[str, np.ndarray] = {
        "masks": np.packbits(proposals.masks, axis=-1),
        "mask_shape": np.array(proposals.masks.shape),
        "proposal_scores": np.asarray(proposals.scores, dtype=np.float32),
        "class_names": np.array(class_names),
        **scores.to_numpy(),
    }
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        np.savez_compressed(handle, allow_pickle=False, **arrays)
    tmp.replace(path)


def load_scores(path: Path) -> tuple[Proposals, MaskScores]:
    """The proposals and per-mask scores written by :func:`save_scores`.

    Raises:
        InputError: the file is missing or unreadable (it names the file).
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        shape = tuple(int(v) for v in arrays["mask_shape"])
        masks = np.unpackbits(arrays["masks"], axis=-1, count=shape[-1]).astype(bool)
        proposals = Proposals(masks=masks.reshape(shape), scores=arrays["proposal_scores"])
    except FileNotFoundError:
        raise InputError(f"scores file not found: {path}") from None
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"scores file {path} is unreadable ({exc}); delete it") from None
    return proposals, MaskScores.from_numpy(arrays)


def merge(
    scores: MaskScores, proposals: Proposals, vocab: Vocabulary, settings: Settings
) -> PanopticPrediction:
    """Ensemble the path scores and merge the masks into panoptic, semantic and instance maps."""
    class_probs = scores.combine(settings).float().cpu()
    mask_probs = torch.from_numpy(proposals.masks).float()
    return postprocess(
        class_probs,
        mask_probs,
        vocab.isthing,
        score_threshold=settings.score_threshold,
        overlap_threshold=settings.overlap_threshold,
        max_instances=settings.max_instances,
    )


def as_vocabulary(classes: ClassesInput) -> Vocabulary:
    """A :class:`Vocabulary` from one, a ``"a, b|c"`` string, or a list of class strings."""
    if isinstance(classes, Vocabulary):
        return classes
    if isinstance(classes, str):
        return Vocabulary.from_string(classes)
    return Vocabulary.from_string(", ".join(classes))


def as_image(image: ImageInput) -> tuple[np.ndarray, str | None]:
    """``([H, W, 3] uint8 RGB, source path or None)`` from a path, array or PIL image."""
    if isinstance(image, str | Path):
        return load_image(image), str(image)
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB")), None
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise InputError(
            f"image array must be [H, W, 3] uint8 RGB, got shape {array.shape} {array.dtype}"
        )
    return array, None


class Segmenter:
    """Open-vocabulary panoptic segmentation with retrieval augmentation.

    Args:
        backbone: a :class:`Backbone` or a registered name (``retclip.backbones.BACKBONES``).
        proposer: a :class:`MaskProposer`.
        db: the primary feature database (path or opened), or ``None`` for CLIP only.
        fallback_db: database consulted for classes the primary one lacks (paper §2.2).
        train_vocab: the proposer's training vocabulary; its classes are "seen" (weight α).
        k: neighbours retrieved per segment.
        pooling: mask pooling mode (``"soft"`` or ``"binary"``, see :func:`mask_pool`).
        device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"``...
        **settings: :class:`Settings` fields (alpha, beta, gamma, combine, thresholds).
    """

    def __init__(
        self,
        backbone: Backbone | str,
        proposer: MaskProposer,
        db: FeatureDatabase | str | Path | None = None,
        fallback_db: FeatureDatabase | str | Path | None = None,
        *,
        train_vocab: Vocabulary | str | None = None,
        k: int = DEFAULT_K,
        pooling: PoolingMode = "soft",
        device: str | torch.device = "auto",
        **settings: Any,
    ) -> None:
        self.device = resolve_device(device)
        self.backbone = load_backbone(backbone, self.device)
        self.proposer = proposer
        self.settings = Settings(**settings)
        if pooling not in ("soft", "binary"):
            raise InputError(f"pooling must be 'soft' or 'binary', got {pooling!r}")
        self.pooling: PoolingMode = pooling
        if isinstance(train_vocab, str):
            train_vocab = Vocabulary.load(train_vocab)
        self.train_vocab = train_vocab
        opened = [
            d if isinstance(d, FeatureDatabase) or d is None else FeatureDatabase.open(d)
            for d in (db, fallback_db)
        ]
        if opened[0] is None and opened[1] is not None:
            raise InputError("a fallback database needs a primary database")
        self.retriever = (
            Retriever(self.backbone, opened[0], opened[1], k=k) if opened[0] is not None else None
        )
        self._class_embeddings: dict[str, ClassEmbeddings] = {}

    def class_embeddings(self, vocab: Vocabulary) -> ClassEmbeddings:
        """Text embeddings of ``vocab`` (computed once per vocabulary, cached on disk too)."""
        key = vocab.key()
        if key not in self._class_embeddings:
            self._class_embeddings[key] = embed_vocabulary(self.backbone, vocab)
        return self._class_embeddings[key]

    def prepare(
        self, image: ImageInput, classes: ClassesInput, *, source: str | Path | None = None
    ) -> PreparedImage:
        """Everything of one image up to the backbone pass: pixels, vocabulary, text embeddings
        and mask proposals. Raises :class:`RetclipError` on bad input."""
        pixels, path = as_image(image)
        vocab = as_vocabulary(classes)
        source_name = str(source) if source is not None else path
        # class-prompted proposers get each class's first synonym: display names of built-in
        # vocabularies can be WordNet lists ("road, route") that read badly as prompts
        prompts = [entry.synonyms[0] for entry in vocab.classes]
        return PreparedImage(
            pixels=pixels,
            vocabulary=vocab,
            text=self.class_embeddings(vocab),
            proposals=self.proposer.propose(pixels, prompts, source=source_name, vocabulary=vocab),
            source=source_name,
        )

    @torch.inference_mode()
    def finish(self, prepared: Sequence[PreparedImage]) -> list[SegmentationResult]:
        """Results of prepared images; images of one size share one backbone pass."""
        by_size: dict[tuple[int, ...], list[int]] = {}
        for i, item in enumerate(prepared):
            by_size.setdefault(item.pixels.shape, []).append(i)
        results: list[SegmentationResult | None] = [None] * len(prepared)
        for members in by_size.values():
            pixels = torch.stack([image_to_tensor(prepared[i].pixels) for i in members])
            dense = self.backbone.encode_images(pixels.to(self.device))  # [B, D', h, w]
            for row, i in enumerate(members):
                masks = prepared[i].proposals.masks
                features = features_from_dense(
                    self.backbone, dense[row : row + 1], masks, mode=self.pooling
                )
                results[i] = self._result(prepared[i], features)
        return [r for r in results if r is not None]

    def _result(self, item: PreparedImage, features: torch.Tensor) -> SegmentationResult:
        """Path scores of ``[N, D]`` segment features, and the merged result."""
        vocab, proposals = item.vocabulary, item.proposals
        s_clip = clip_scores(features, item.text, self.backbone.logit_scale)
        s_ret = self.retriever.scores(features, vocab, item.text) if self.retriever else None
        kept = torch.ones(len(vocab), dtype=torch.bool)
        if proposals.kept_classes is not None:
            kept = torch.zeros(len(vocab), dtype=torch.bool)
            kept[torch.as_tensor(proposals.kept_classes, dtype=torch.long)] = True
        seen = None
        if self.train_vocab is not None:
            seen = torch.from_numpy(vocab.seen_mask(self.train_vocab))
        scores = MaskScores(
            s_clip=s_clip.cpu(),
            s_ret=None if s_ret is None else s_ret.cpu(),
            s_iv=None if proposals.s_iv is None else torch.from_numpy(proposals.s_iv).float(),
            seen=seen,
            kept=kept,
        )
        return SegmentationResult(
            image=item.pixels,
            vocabulary=vocab,
            proposals=proposals,
            scores=scores,
            settings=self.settings,
            prediction=merge(scores, proposals, vocab, self.settings),
            source=item.source,
        )

    def __call__(
        self, image: ImageInput, classes: ClassesInput, *, source: str | Path | None = None
    ) -> SegmentationResult:
        """Segment one image with the given classes (``"a, b|c"``, a list, or a Vocabulary)."""
        return self.finish([self.prepare(image, classes, source=source)])[0]
