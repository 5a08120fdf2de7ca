"""supervision interop through the real package: a result as ``sv.Detections``, and detections
from a user's own model as proposals (segmenting and labelling database rows)."""

from __future__ import annotations

import numpy as np
import pytest

from retclip import Segmenter
from retclip.backbones import load_backbone
from retclip.database import FeatureDatabase
from retclip.database.build import BuildItem, build_database
from retclip.datasets import CocoPanopticDataset
from retclip.errors import InputError
from retclip.images import SourceImage, load_image
from retclip.proposers import DetectionsProposer, load_proposer
from retclip.vocabulary import Vocabulary

sv = pytest.importorskip("supervision")  # the [all] extra installs it; CI has it

CLASSES = "apple, banana, sky, grass"


class TruthModel:
    """A user's 'model': the scene's ground-truth segments as Detections, named by class."""

    def __init__(self, dataset: CocoPanopticDataset, by_name: bool = True) -> None:
        self.dataset, self.by_name, self.calls = dataset, by_name, 0
        self.index = {dataset.image_path(i).name: i for i in range(len(dataset))}

    def __call__(self, image: np.ndarray, class_names: list[str]) -> object:
        self.calls += 1
        matches = [i for i in range(len(self.dataset)) if
                   np.array_equal(load_image(self.dataset.image_path(i)), image)]  # fmt: skip
        truth = self.dataset.annotation(matches[0])
        names = [self.dataset.vocabulary.names[c] for c in truth.categories]
        data = {"class_name": np.array(names)} if self.by_name else {}
        ids = None if self.by_name else np.array([class_names.index(n) for n in names])
        return sv.Detections(
            xyxy=sv.mask_to_xyxy(truth.masks).astype(np.float32),
            mask=truth.masks,
            confidence=np.full(len(names), 0.9, np.float32),
            class_id=ids,
            data=data,
        )


@pytest.fixture(scope="module")
def db(scenes, tmp_path_factory) -> FeatureDatabase:
    dataset = CocoPanopticDataset(*scenes["db"])
    backbone = load_backbone("color")
    database = FeatureDatabase.create(
        tmp_path_factory.mktemp("sv") / "db", fingerprint=backbone.fingerprint, dim=backbone.dim
    )
    names = tuple(dataset.vocabulary.names)
    items = [BuildItem(str(dataset.image_path(i)), names) for i in range(len(dataset))]
    proposer = DetectionsProposer(TruthModel(dataset))  # its class names label the rows
    build_database(database, backbone, proposer, items, build_id="sv", progress=False)
    return database


def test_database_rows_labelled_by_the_detections_class_names(db, scenes) -> None:
    dataset = CocoPanopticDataset(*scenes["db"])
    truth = sum(len(dataset.annotation(i).categories) for i in range(len(dataset)))
    assert len(db) == truth
    assert set(db.rows_per_class()) <= set(dataset.vocabulary.names)


@pytest.mark.parametrize("by_name", [True, False])
def test_detections_proposer_segments_with_a_users_model(db, scenes, by_name) -> None:
    val = CocoPanopticDataset(*scenes["val"])
    model = TruthModel(val, by_name=by_name)
    segmenter = Segmenter("color", DetectionsProposer(model), db=db, gamma=1.0)
    path = val.image_path(0)
    result = segmenter(path, CLASSES)
    assert model.calls == 1
    truth = val.annotation(0)
    got = sorted(result.label_of(s) for s in result.segments)
    assert got == sorted(val.vocabulary.names[c] for c in truth.categories)
    hints = result.proposals.class_hints
    assert hints is not None and (hints >= 0).all()


def test_to_detections_is_the_panoptic_result(db, scenes) -> None:
    val = CocoPanopticDataset(*scenes["val"])
    segmenter = Segmenter("color", load_proposer("gt", gt_json=scenes["val"][0]), db=db, gamma=1.0)
    result = segmenter(val.image_path(1), CLASSES)
    detections = result.to_detections()
    assert isinstance(detections, sv.Detections) and len(detections) == len(result.segments)
    for row, segment in enumerate(result.segments):
        pixels = result.panoptic == segment.id
        np.testing.assert_array_equal(detections.mask[row], pixels)
        ys, xs = np.nonzero(pixels)  # independent box: first and last covered pixel
        np.testing.assert_allclose(detections.xyxy[row], [xs.min(), ys.min(), xs.max(), ys.max()])
        assert detections.data["class_name"][row] == result.label_of(segment)
        assert detections.class_id[row] == segment.category
        assert detections.data["segment_id"][row] == segment.id
        assert detections.confidence[row] == pytest.approx(segment.score)
    # supervision's own tools take it as it is
    annotated = sv.MaskAnnotator().annotate(result.image.copy(), detections)
    assert annotated.shape == result.image.shape and (annotated != result.image).any()


def test_bad_detections_are_named_errors(scenes) -> None:
    image = SourceImage(load_image(CocoPanopticDataset(*scenes["val"]).image_path(0)), "a.png")
    vocab = Vocabulary.from_string(CLASSES)
    h, w = image.size
    boxes_only = DetectionsProposer(lambda *_: sv.Detections(xyxy=np.zeros((1, 4), np.float32)))
    with pytest.raises(InputError, match="have no masks"):
        boxes_only.propose(image, vocab)
    small = sv.Detections(xyxy=np.zeros((1, 4), np.float32), mask=np.ones((1, 4, 4), bool))
    with pytest.raises(InputError, match="masks of size"):
        DetectionsProposer(lambda *_: small).propose(image, vocab)
    with pytest.raises(InputError, match=r"not supervision\.Detections"):
        DetectionsProposer(lambda *_: [1, 2]).propose(image, vocab)
    ids = sv.Detections(
        xyxy=np.zeros((1, 4), np.float32), mask=np.ones((1, h, w), bool), class_id=np.array([9])
    )
    with pytest.raises(InputError, match="class_id outside"):
        DetectionsProposer(lambda *_: ids).propose(image, vocab)
    empty = DetectionsProposer(lambda *_: sv.Detections.empty()).propose(image, vocab)
    assert empty.masks.shape == (0, h, w)
