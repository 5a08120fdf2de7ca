"""The Python entry point: ``Segmenter(backbone, proposer, db)(image, classes)``.

Data flow for one image (README, "Architecture"): vocabulary → text embeddings (cached per
vocabulary) → mask proposals → one backbone pass → mask pooling → ``s_clip`` and ``s_ret`` →
α/β/γ ensemble → panoptic merge. The per-mask scores of each path are kept in the result, so
:meth:`SegmentationResult.rescore` tries other α/β/γ or thresholds without any model pass.

Two rules from the paper (§2.2) and FC-CLIP shape the flow:

- **One backbone pass.** A proposer that already ran the shared backbone (FC-CLIP) returns its
  segment embeddings (``Proposals.features``) and the segmenter scores those instead of encoding
  the image again; the database is queried with the same features, so it must share their
  recipe (backbone, input preprocessing, pooling rule), which :class:`Retriever` checks.
- **Pruning before scoring.** Classes a class-prompted proposer found no evidence for
  (``Proposals.kept_classes``) leave the image's vocabulary before ``s_clip``'s softmax and
  before retrieval; they score 0 in every path.

Merging (:func:`merge`): soft proposals (FC-CLIP's ``mask_probs``, with ``p_void``) are merged as
FC-CLIP does; binary proposals are first put in a canonical order (by class score, then
proposal confidence, then smaller area), so the panoptic map does not depend on the order a
proposer returned its masks in. Proposal confidence (detector score, SAM's predicted IoU) does
not weigh the class scores — the paper classifies by the three paths only — it only breaks
exact ties.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from retclip.acceleration import Precision, autocast, check_precision
from retclip.backbones.base import Backbone, features_from_dense
from retclip.backbones.registry import load_backbone, resolve_device
from retclip.caching import LRUCache
from retclip.database import FeatureDatabase
from retclip.errors import InputError, RetclipError
from retclip.files import atomic_writer
from retclip.images import SourceImage, image_to_tensor, load_image
from retclip.outputs import write_outputs
from retclip.panoptic import PanopticPrediction, Segment, postprocess
from retclip.pooling import PoolingMode
from retclip.proposers.base import MaskProposer, Proposals
from retclip.scores.clip import clip_scores
from retclip.scores.ensemble import ensemble, final_probs
from retclip.scores.retrieval import Neighbours, Retriever
from retclip.settings import DEFAULT_K, Settings
from retclip.text_embeddings import ClassEmbeddings, embed_vocabulary
from retclip.vocabulary import Vocabulary

ImageInput = str | Path | np.ndarray | Image.Image
#: Vocabularies whose text embeddings a segmenter keeps in memory (least recently used dropped;
#: the on-disk cache keeps them all).
TEXT_CACHE_SIZE = 32
ClassesInput = str | Sequence[str] | Vocabulary


@dataclasses.dataclass
class MaskScores:
    """Per-mask class scores of each path (paper §2.2), ``N`` masks × ``C`` classes.

    Attributes:
        s_clip: ``[N, C]`` CLIP-path probabilities (softmax over the kept classes).
        s_ret: ``[N, C]`` retrieval scores, ``None`` without a database.
        s_iv: ``[N, C]`` in-vocabulary probabilities, ``None`` in the training-free setting.
        seen: ``[C]`` bool, classes of the training vocabulary, ``None`` if none was given.
        kept: ``[C]`` bool, classes the proposer kept for this image (pruned ones score 0).
        p_void: ``[N]`` the proposer's void probabilities (FC-CLIP), or ``None``.
        oov_valid: ``[N]`` bool, masks the out-of-vocabulary paths may score, or ``None`` (all).
    """

    s_clip: torch.Tensor
    s_ret: torch.Tensor | None
    s_iv: torch.Tensor | None
    seen: torch.Tensor | None
    kept: torch.Tensor
    p_void: torch.Tensor | None = None
    oov_valid: torch.Tensor | None = None

    def combine(self, settings: Settings) -> torch.Tensor:
        """Final class probabilities under ``settings``: ``[N, C]``, or ``[N, C + 1]`` with the
        void column last when the proposer has one (:func:`~retclip.scores.ensemble.final_probs`);
        pruned classes get 0."""
        s = ensemble(
            self.s_clip,
            self.s_ret,
            gamma=settings.gamma,
            s_iv=self.s_iv,
            seen=self.seen,
            alpha=settings.alpha,
            beta=settings.beta,
            mode=settings.combine,
            oov_valid=self.oov_valid,
        )
        return final_probs(s, self.p_void, mode=settings.combine, kept=self.kept)

    def to_numpy(self) -> dict[str, np.ndarray]:
        """The scores as NumPy arrays (absent paths left out), for ``np.savez``."""
        arrays = {
            "s_clip": self.s_clip,
            "s_ret": self.s_ret,
            "s_iv": self.s_iv,
            "seen": self.seen,
            "kept": self.kept,
            "p_void": self.p_void,
            "oov_valid": self.oov_valid,
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
        return cls(
            s_clip=s_clip,
            s_ret=get("s_ret"),
            s_iv=get("s_iv"),
            seen=get("seen"),
            kept=kept,
            p_void=get("p_void"),
            oov_valid=get("oov_valid"),
        )


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
    #: the database rows behind ``scores.s_ret`` per mask (``None`` without a database)
    neighbours: Neighbours | None = None

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

    def to_detections(self) -> Any:
        """The panoptic segments as a ``supervision.Detections`` (masks, xyxy boxes, class ids,
        confidences, class names in ``data["class_name"]``), for supervision's annotators,
        trackers and exporters; needs ``retclip[supervision]``."""
        from retclip.outputs.supervision import detections_of

        return detections_of(self.prediction, self.vocabulary.names, self.vocabulary.ids)

    def class_probs(self) -> torch.Tensor:
        """``[N, C]`` (or ``[N, C + 1]``, void last) probabilities the merge ranked."""
        return self.scores.combine(self.settings).float().cpu()

    def semantic_scores(self) -> torch.Tensor:
        """``[C, H, W]`` per-pixel class scores ``Σ_n p[n, c] · mask_prob[n]`` (void dropped):
        the map whose argmax is :attr:`semantic` (FC-CLIP's ``sem_seg`` output)."""
        probs = self.class_probs()[:, : len(self.vocabulary)]
        masks = torch.from_numpy(self.proposals.soft_masks)
        return torch.einsum("nc,nhw->chw", probs, masks)

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
    ``s_clip``, ``s_ret``, ``s_iv``, ``seen``, ``kept``, and for soft proposals ``mask_probs``
    ``[N, H, W]`` float32, ``p_void`` and ``oov_valid``) is what re-scoring with other α/β/γ needs;
    it is written to a temporary name and renamed, so it is never half-written.
    """
    arrays: dict[str, np.ndarray] = {
        "masks": np.packbits(proposals.masks, axis=-1),
        "mask_shape": np.array(proposals.masks.shape),
        "proposal_scores": np.asarray(proposals.scores, dtype=np.float32),
        "class_names": np.array(class_names),
        **scores.to_numpy(),
    }
    if proposals.mask_probs is not None:  # soft masks (FC-CLIP), kept exact for re-scoring
        arrays["mask_probs"] = proposals.mask_probs
    with atomic_writer(path) as handle:
        np.savez_compressed(handle, allow_pickle=False, **arrays)


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
        proposals = Proposals(
            masks=masks.reshape(shape),
            scores=arrays["proposal_scores"],
            mask_probs=arrays.get("mask_probs"),
        )
    except FileNotFoundError:
        raise InputError(f"scores file not found: {path}") from None
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"scores file {path} is unreadable ({exc}); delete it") from None
    return proposals, MaskScores.from_numpy(arrays)


def canonical_order(class_probs: torch.Tensor, proposals: Proposals) -> np.ndarray:
    """An order of binary proposals that does not depend on the order they came in.

    By decreasing best class score, then decreasing proposal confidence, then increasing mask
    area, then the mask's first and last pixel: ties in the merge's ``score × mask`` argmax go to
    the earlier proposal, so this order makes the panoptic map a function of the set of proposals.
    """
    n = len(proposals)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    flat = proposals.masks.reshape(n, -1)
    area = flat.sum(1)
    first = np.where(area > 0, flat.argmax(1), -1)
    last = np.where(area > 0, flat.shape[1] - 1 - flat[:, ::-1].argmax(1), -1)
    best = class_probs.max(dim=1).values.double().numpy() if class_probs.shape[1] else np.zeros(n)
    keys = (last, first, area, -proposals.scores.astype(np.float64), -best)
    return np.lexsort(keys)


def merge(
    scores: MaskScores, proposals: Proposals, vocab: Vocabulary, settings: Settings
) -> PanopticPrediction:
    """Ensemble the path scores and merge the masks into panoptic, semantic and instance maps.

    Soft proposals (``mask_probs``) keep their order (FC-CLIP's query order, so segment ids
    match FC-CLIP's); binary ones are merged in :func:`canonical_order` and their
    ``mask_index`` mapped back.
    """
    class_probs = scores.combine(settings).float().cpu()
    void_class = len(vocab) if scores.p_void is not None else None
    soft = proposals.mask_probs is not None
    order = None if soft else canonical_order(class_probs[:, : len(vocab)], proposals)
    if order is not None:
        class_probs = class_probs[torch.from_numpy(order)]
    # binary proposals stay bool (1 byte a pixel): the merge makes no [N, H, W] float copy
    masks = proposals.soft_masks if order is None else proposals.masks[order]
    prediction = postprocess(
        class_probs,
        torch.from_numpy(masks),
        vocab.isthing,
        score_threshold=settings.score_threshold,
        overlap_threshold=settings.overlap_threshold,
        max_instances=settings.max_instances,
        void_class=void_class,
    )
    if order is not None:
        for segment in prediction.segments:
            segment.mask_index = int(order[segment.mask_index])
        for instance in prediction.instances:
            instance.mask_index = int(order[instance.mask_index])
    return prediction


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
        pooling: mask pooling mode (``"soft"`` or ``"binary"``, see :func:`mask_pool`); default
            the proposer's own rule when it returns features (FC-CLIP: ``"binary"``), else
            ``"soft"``. Queries and the database must share it.
        device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"``...
        settings: the merge :class:`Settings` (default: the paper's).
        precision: ``"fp32"``, or ``"bf16"``/``"fp16"`` autocast around the model passes
            (proposer, backbone, pooling; :mod:`retclip.acceleration`); results stay float32.
        **overrides: :class:`Settings` fields to change (alpha, beta, gamma, combine, ...).
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
        pooling: PoolingMode | None = None,
        device: str | torch.device = "auto",
        settings: Settings | None = None,
        precision: Precision = "fp32",
        **overrides: Any,
    ) -> None:
        self.device = resolve_device(device)
        check_precision(precision, self.device)
        self.precision: Precision = precision
        self.backbone = load_backbone(backbone, self.device)
        self.proposer = proposer
        self.settings = dataclasses.replace(settings or Settings(), **overrides)
        own = proposer.feature_pooling
        if pooling is not None and pooling not in ("soft", "binary"):
            raise InputError(f"pooling must be 'soft' or 'binary', got {pooling!r}")
        if own is not None:
            if pooling is not None and pooling != own:
                raise InputError(
                    f"proposer {proposer.name!r} pools its features with {own!r} pooling "
                    f"(FC-CLIP's rule); --pooling {pooling} cannot apply to them"
                )
            if proposer.backbone is not self.backbone:
                raise InputError(
                    f"proposer {proposer.name!r} embeds segments with its own backbone, which "
                    "must be the segmenter's (one shared backbone, paper §2.2)"
                )
        self.pooling: PoolingMode = own or pooling or "soft"  # type: ignore[assignment]
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
            Retriever(self.backbone, opened[0], opened[1], k=k, pooling=self.pooling)
            if opened[0] is not None
            else None
        )
        self._class_embeddings: LRUCache[str, ClassEmbeddings] = LRUCache(TEXT_CACHE_SIZE)

    def class_embeddings(self, vocab: Vocabulary) -> ClassEmbeddings:
        """Text embeddings of ``vocab`` (computed once per vocabulary, cached on disk too; the
        last :data:`TEXT_CACHE_SIZE` vocabularies stay in memory)."""
        return self._class_embeddings.get_or_create(
            vocab.key(), lambda: embed_vocabulary(self.backbone, vocab)
        )

    def prepare(
        self, image: ImageInput, classes: ClassesInput, *, source: str | Path | None = None
    ) -> PreparedImage:
        """Everything of one image up to the backbone pass: pixels, vocabulary, text embeddings
        and mask proposals. Raises :class:`RetclipError` on bad input."""
        return self.prepare_batch([image], classes, sources=[source])[0]

    def prepare_batch(
        self,
        images: Sequence[ImageInput],
        classes: ClassesInput,
        *,
        sources: Sequence[str | Path | None] | None = None,
    ) -> list[PreparedImage]:
        """:meth:`prepare` of several images with one vocabulary, their proposals from one
        batched proposer call (:meth:`MaskProposer.propose_batch`: the detector and the mask
        model's image encoder run over the images together where the model allows it)."""
        vocab = as_vocabulary(classes)
        text = self.class_embeddings(vocab)  # outside autocast: cached embeddings stay fp32
        inputs = []
        for i, image in enumerate(images):
            pixels, path = as_image(image)
            source = sources[i] if sources is not None else None
            inputs.append(SourceImage(pixels, str(source) if source is not None else path))
        with autocast(self.precision, self.device):
            if len(inputs) == 1:
                found = [self.proposer.propose(inputs[0], vocab, text)]
            else:
                found = self.proposer.propose_batch(
                    inputs, [vocab] * len(inputs), [text] * len(inputs)
                )
        return [
            PreparedImage(
                pixels=item.pixels, vocabulary=vocab, text=text, proposals=p, source=item.source
            )
            for item, p in zip(inputs, found, strict=True)
        ]

    def segment_batch(
        self,
        images: Sequence[ImageInput],
        classes: ClassesInput,
        *,
        sources: Sequence[str | Path | None] | None = None,
    ) -> list[SegmentationResult | RetclipError]:
        """Segment several images with one vocabulary in batched model passes.

        Returns one entry per image, in order: its result, or the :class:`RetclipError` it
        raised. When the batch fails on bad input, its images are redone one by one, so one bad
        image costs only its own result."""
        try:
            return list(self.finish(self.prepare_batch(images, classes, sources=sources)))
        except RetclipError as error:
            if len(images) == 1:
                return [error]
        outcomes: list[SegmentationResult | RetclipError] = []
        for i, image in enumerate(images):
            source = sources[i] if sources is not None else None
            try:
                outcomes.append(self(image, classes, source=source))
            except RetclipError as error:
                outcomes.append(error)
        return outcomes

    @torch.inference_mode()
    def finish(self, prepared: Sequence[PreparedImage]) -> list[SegmentationResult]:
        """Results of prepared images; images of one size share one backbone pass, and images
        whose proposer already embedded the segments (``Proposals.features``) need none."""
        by_size: dict[tuple[int, ...], list[int]] = {}
        results: list[SegmentationResult | None] = [None] * len(prepared)
        for i, item in enumerate(prepared):
            features = item.proposals.features
            if features is not None:
                results[i] = self._result(item, torch.from_numpy(features).to(self.device))
            else:
                by_size.setdefault(item.pixels.shape, []).append(i)
        for members in by_size.values():
            pixels = torch.stack([image_to_tensor(prepared[i].pixels) for i in members])
            pooled_rows = []
            with autocast(self.precision, self.device):
                dense = self.backbone.encode_images(pixels.to(self.device))  # [B, D', h, w]
                for row, i in enumerate(members):
                    masks = prepared[i].proposals.masks
                    pooled_rows.append(  # [N_i, D] float32, normalised in float32
                        features_from_dense(
                            self.backbone, dense[row : row + 1], masks, mode=self.pooling
                        )
                    )
            for i, pooled in zip(members, pooled_rows, strict=True):
                results[i] = self._result(prepared[i], pooled)
        return [r for r in results if r is not None]

    def _result(self, item: PreparedImage, features: torch.Tensor) -> SegmentationResult:
        """Path scores of ``[N, D]`` unit-norm segment features, and the merged result."""
        vocab, proposals = item.vocabulary, item.proposals
        kept = torch.ones(len(vocab), dtype=torch.bool)
        if proposals.kept_classes is not None:
            kept = torch.zeros(len(vocab), dtype=torch.bool)
            kept[torch.as_tensor(proposals.kept_classes, dtype=torch.long)] = True
        # pruned classes leave the vocabulary before scoring (paper §2.2): the softmax of s_clip
        # runs over the kept classes and retrieval searches only their rows
        s_clip = clip_scores(features, item.text, self.backbone.logit_scale, kept=kept)
        s_ret = neighbours = None
        if self.retriever is not None:
            s_ret, neighbours = self.retriever.retrieve(
                features, vocab, item.text, kept=kept.numpy()
            )
        seen = None
        if self.train_vocab is not None:
            seen = torch.from_numpy(vocab.seen_mask(self.train_vocab))

        def tensor(array: np.ndarray | None) -> torch.Tensor | None:
            return None if array is None else torch.from_numpy(np.asarray(array))

        scores = MaskScores(
            s_clip=s_clip.cpu(),
            s_ret=None if s_ret is None else s_ret.cpu(),
            s_iv=None if proposals.s_iv is None else torch.from_numpy(proposals.s_iv).float(),
            seen=seen,
            kept=kept,
            p_void=tensor(proposals.p_void),
            oov_valid=tensor(proposals.oov_valid),
        )
        return SegmentationResult(
            image=item.pixels,
            vocabulary=vocab,
            proposals=proposals,
            scores=scores,
            settings=self.settings,
            prediction=merge(scores, proposals, vocab, self.settings),
            source=item.source,
            neighbours=neighbours,
        )

    def __call__(
        self, image: ImageInput, classes: ClassesInput, *, source: str | Path | None = None
    ) -> SegmentationResult:
        """Segment one image with the given classes (``"a, b|c"``, a list, or a Vocabulary)."""
        return self.finish([self.prepare(image, classes, source=source)])[0]
