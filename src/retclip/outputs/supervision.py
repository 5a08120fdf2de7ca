"""Interop with `supervision <https://supervision.roboflow.com>`_: a result as
``supervision.Detections``, for its annotators, trackers, dataset exporters and metrics.

Optional: ``pip install 'retclip[supervision]'``; imported when first used.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from retclip.errors import require_extra

if TYPE_CHECKING:
    from retclip.panoptic import PanopticPrediction

__all__ = ["detections_of", "import_supervision"]

#: ``Detections.data`` key of the class names (supervision's own convention).
CLASS_NAME = "class_name"


def import_supervision() -> Any:
    """The ``supervision`` module, or a :class:`MissingExtraError` saying how to install it."""
    require_extra("supervision", "supervision interop", ("supervision",))
    with warnings.catch_warnings():  # its note that OpenCV is absent concerns its annotators
        warnings.filterwarnings("ignore", message=".*OpenCV.*", category=UserWarning)
        import supervision
    return supervision


def detections_of(
    prediction: PanopticPrediction, class_names: Sequence[str], category_ids: Sequence[int]
) -> Any:
    """One ``supervision.Detections`` row per panoptic segment (things and stuff), in the
    order of ``prediction.segments``.

    ``mask`` ``[N, H, W]`` bool (the segment's pixels in the panoptic map), ``xyxy`` ``[N, 4]``
    pixel boxes of those pixels (inclusive-exclusive, as supervision's ``mask_to_xyxy`` gives),
    ``class_id`` ``[N]`` the class index in the vocabulary, ``confidence`` ``[N]`` the segment
    score; ``data`` holds ``class_name``, ``category_id`` (the dataset id), ``isthing`` and
    ``segment_id`` (the id in the panoptic PNG).
    """
    sv = import_supervision()
    panoptic = np.asarray(prediction.panoptic)
    segments = list(prediction.segments)
    height, width = panoptic.shape
    masks = np.zeros((len(segments), height, width), dtype=bool)
    for row, segment in enumerate(segments):
        masks[row] = panoptic == segment.id
    xyxy = sv.mask_to_xyxy(masks).astype(np.float32) if segments else np.zeros((0, 4), np.float32)
    categories = np.array([s.category for s in segments], dtype=int)
    return sv.Detections(
        xyxy=xyxy,
        mask=masks,
        class_id=categories,
        confidence=np.array([s.score for s in segments], dtype=np.float32),
        data={
            CLASS_NAME: np.array([class_names[c] for c in categories], dtype=object),
            "category_id": np.array([category_ids[c] for c in categories], dtype=int),
            "isthing": np.array([s.isthing for s in segments], dtype=bool),
            "segment_id": np.array([s.id for s in segments], dtype=int),
        },
    )
