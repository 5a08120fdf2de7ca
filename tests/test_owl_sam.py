"""OWLv2 → SAM on tiny random models: boxes in image pixels, class hints and pruning."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from retclip.images import SourceImage
from retclip.proposers import load_proposer
from retclip.proposers.owl_sam import OwlSamProposer
from retclip.vocabulary import Vocabulary
from tiny_detectors import save_owlv2, save_sam

CLASSES = ["cat", "dog", "car"]
VOCAB = Vocabulary.from_string(", ".join(CLASSES))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-owl")
    return {"owl": save_owlv2(root / "owl"), "sam": save_sam(root / "sam")}


def image() -> np.ndarray:
    return np.random.default_rng(5).integers(0, 256, (36, 60, 3), dtype=np.uint8)


def test_owl_detections_are_clipped_xyxy_pixels_with_a_class_each(tiny) -> None:
    proposer = OwlSamProposer(str(tiny["owl"]), str(tiny["sam"]), box_threshold=0.0, device="cpu")
    found = proposer.detector.detect(image(), CLASSES)
    assert len(found.boxes) == 16  # one box per patch of the 64-px, patch-16 model
    boxes = found.boxes.numpy()
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 60).all() and (boxes[:, 3] <= 36).all()
    assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
    assert set(found.labels.tolist()) <= {0, 1, 2}


def test_owl_sam_gives_hinted_masks_and_prunes(tiny) -> None:
    keep_all = load_proposer(
        "owl-sam",
        detector=str(tiny["owl"]),
        sam=str(tiny["sam"]),
        box_threshold=0.0,
        min_area=0,
        device="cpu",
    )
    result = keep_all.propose(SourceImage(image()), VOCAB)
    assert result.class_hints is not None and result.kept_classes is not None
    assert len(result) >= 1 and result.masks.shape[1:] == (36, 60)
    assert set(result.class_hints.tolist()) <= set(result.kept_classes.tolist()) <= {0, 1, 2}

    none = OwlSamProposer(str(tiny["owl"]), str(tiny["sam"]), box_threshold=1.0, device="cpu")
    empty = none.propose(SourceImage(image()), VOCAB)
    assert len(empty) == 0 and empty.kept_classes is not None and len(empty.kept_classes) == 0
