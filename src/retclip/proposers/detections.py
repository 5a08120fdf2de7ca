"""Masks from any model that produces ``supervision.Detections``: a user's own detector + SAM
wrapper, a supervision connector (Ultralytics, Detectron2, transformers...), plugs in as a
proposer.

``model(image, class_names)`` returns the detections of one image; each row with a mask becomes
a proposal, with its confidence as the score and its class (``data["class_name"]`` matched to the
vocabulary by name, else ``class_id`` as an index into the class names given) as the class hint,
so the proposer can also label database rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from retclip.errors import InputError
from retclip.outputs.supervision import CLASS_NAME, import_supervision
from retclip.proposers.base import MaskProposer, Proposals, TextEmbeddings

if TYPE_CHECKING:
    from retclip.images import SourceImage
    from retclip.vocabulary import Vocabulary

__all__ = ["DetectionsProposer"]


class DetectionsProposer(MaskProposer):
    """Proposals from a callable ``(image [H, W, 3] uint8, class names) → sv.Detections``.

    Args:
        model: the detections source; its masks must be ``[N, H, W]`` at the image's size.
        name: the proposer's name in results and database provenance.
        prune: keep only the classes some detection names (as Grounded SAM's boxes do).
    """

    gives_class_hints = True

    def __init__(
        self,
        model: Callable[[np.ndarray, Sequence[str]], Any],
        *,
        name: str = "detections",
        prune: bool = False,
    ) -> None:
        import_supervision()
        if not callable(model):
            raise InputError(f"model must be callable (image, class names) → Detections: {model!r}")
        self.model = model
        self.name = name
        self.prune = prune

    def propose(
        self,
        image: SourceImage,
        vocabulary: Vocabulary,
        text_embeddings: TextEmbeddings | None = None,
    ) -> Proposals:
        sv = import_supervision()
        names = list(vocabulary.names)
        found = self.model(image.pixels, names)
        where = f"the detections of {image.source or 'the image'}"
        if not isinstance(found, sv.Detections):
            raise InputError(f"{where} are a {type(found).__name__}, not supervision.Detections")
        height, width = image.size
        if len(found) and found.mask is None:
            raise InputError(
                f"{where} have no masks; give a model that segments (e.g. boxes through SAM)"
            )
        masks = np.zeros((0, height, width), bool) if not len(found) else np.asarray(found.mask)
        if masks.shape[1:] != (height, width):
            raise InputError(
                f"{where} have masks of size {masks.shape[1:]}, expected the image's "
                f"{(height, width)}"
            )
        confidence = found.confidence
        scores = np.ones(len(found), np.float32) if confidence is None else confidence
        hints = self._class_hints(found, names, where)
        kept = None
        if self.prune:
            kept = np.unique(hints[hints >= 0])
        return Proposals(
            masks=masks.astype(bool),
            scores=np.clip(np.asarray(scores, np.float32), 0.0, 1.0),
            class_hints=hints,
            kept_classes=kept,
            boxes=np.asarray(found.xyxy, np.float32) if len(found) else None,
        )

    @staticmethod
    def _class_hints(found: Any, names: Sequence[str], where: str) -> np.ndarray:
        """``[N]`` class index per detection (-1: not in the vocabulary)."""
        index = {name.strip().lower(): i for i, name in enumerate(names)}
        labels = found.data.get(CLASS_NAME) if found.data else None
        if labels is not None:
            return np.array([index.get(str(v).strip().lower(), -1) for v in labels], np.int64)
        if found.class_id is None:
            return np.full(len(found), -1, np.int64)
        ids = np.asarray(found.class_id, np.int64)
        if len(ids) and (ids.min() < -1 or ids.max() >= len(names)):
            raise InputError(
                f"{where} have class_id outside 0..{len(names) - 1} and no "
                f"data['{CLASS_NAME}']; give class names or ids into the class list"
            )
        return ids
