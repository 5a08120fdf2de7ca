"""End-to-end meaning tests with the colour backbone on synthetic scenes (tests/scenes.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from retclip import Segmenter
from retclip.backbones import ColorBackbone
from retclip.database import FeatureDatabase
from retclip.database.build import build_database, items_from_dataset
from retclip.datasets import CocoPanopticDataset
from retclip.errors import DatabaseMismatchError, InputError
from retclip.proposers import GroundTruthProposer

CLASSES = "apple, banana, sky, grass"  # the datasets' categories, in order


def build_gt_database(path: Path, json_path: Path, images: Path) -> FeatureDatabase:
    backbone = ColorBackbone()
    dataset = CocoPanopticDataset(json_path, images)
    db = FeatureDatabase.create(path, fingerprint=backbone.fingerprint, dim=backbone.dim)
    build_database(
        db,
        backbone,
        GroundTruthProposer(dataset),
        items_from_dataset(dataset),
        build_id="test",
        progress=False,
    )
    return db


@pytest.fixture(scope="module")
def scene_db(scenes, tmp_path_factory) -> FeatureDatabase:
    return build_gt_database(tmp_path_factory.mktemp("db") / "db", *scenes["db"])


def segment_accuracy(segmenter: Segmenter, dataset: CocoPanopticDataset, classes: str) -> float:
    """Fraction of ground-truth segments whose predicted segment has the right category."""
    right = total = 0
    for i in range(len(dataset)):
        truth = dataset.annotation(i)
        result = segmenter(dataset.image_path(i), classes)
        for mask, category in zip(truth.masks, truth.categories, strict=True):
            ids = result.panoptic[mask]
            total += 1
            if (ids > 0).all() and len(np.unique(ids)) == 1:
                segment = next(s for s in result.segments if s.id == ids[0])
                right += int(segment.category == category)
    return right / total


def test_retrieval_knows_words_clip_does_not(scenes, scene_db) -> None:
    val = CocoPanopticDataset(*scenes["val"])
    proposer = GroundTruthProposer(val)
    retrieval_only = Segmenter("color", proposer, db=scene_db, gamma=1.0)
    clip_only = Segmenter("color", proposer, db=scene_db, gamma=0.0)
    assert segment_accuracy(retrieval_only, val, CLASSES) == 1.0
    assert segment_accuracy(clip_only, val, CLASSES) < 0.7
    # CLIP knows colour words: named by colour, the same segments are recognised without a database
    colour_names = Segmenter("color", proposer)
    assert segment_accuracy(colour_names, val, "red, yellow, blue, green") == 1.0


def test_panoptic_result_reproduces_ground_truth_partition(scenes, scene_db) -> None:
    val = CocoPanopticDataset(*scenes["val"])
    segmenter = Segmenter("color", GroundTruthProposer(val), db=scene_db, gamma=1.0)
    result = segmenter(val.image_path(0), val.vocabulary)  # sky and grass are stuff there
    truth = val.annotation(0)
    assert len(result.segments) == len(truth.masks)
    for mask, category in zip(truth.masks, truth.categories, strict=True):
        (segment_id,) = np.unique(result.panoptic[mask])
        segment = next(s for s in result.segments if s.id == segment_id)
        assert segment.category == category and segment.area == mask.sum()
        assert segment.isthing == (category < 2)
    for mask, category in zip(truth.masks, truth.categories, strict=True):
        assert (result.semantic[mask] == category).all()


def test_rescore_needs_no_model_pass(scenes, scene_db, monkeypatch) -> None:
    val = CocoPanopticDataset(*scenes["val"])
    segmenter = Segmenter("color", GroundTruthProposer(val), db=scene_db, gamma=1.0)
    result = segmenter(val.image_path(1), CLASSES)

    def no_model(*args, **kwargs):
        raise AssertionError("rescore ran the backbone")

    monkeypatch.setattr(segmenter.backbone, "encode_images", no_model)
    monkeypatch.setattr(segmenter.backbone, "encode_texts", no_model)
    clip_only = result.rescore(gamma=0.0)
    assert clip_only.settings.gamma == 0.0 and result.settings.gamma == 1.0
    before = [s.category for s in result.segments]
    after = [s.category for s in clip_only.segments]
    assert before != after  # CLIP alone mislabels the unknown words
    assert torch.equal(result.scores.s_clip, clip_only.scores.s_clip)


def test_fallback_database_covers_missing_classes(scenes, scene_db, tmp_path) -> None:
    primary = FeatureDatabase.merge(tmp_path / "primary", [scene_db])
    primary.remove_classes(["sky", "grass"])
    val = CocoPanopticDataset(*scenes["val"])
    proposer = GroundTruthProposer(val)
    without = Segmenter("color", proposer, db=primary, gamma=1.0)
    with_fallback = Segmenter("color", proposer, db=primary, fallback_db=scene_db, gamma=1.0)
    assert segment_accuracy(with_fallback, val, CLASSES) == 1.0
    # Without it, sky and grass have no rows: their s_ret is 0 for every segment, so with γ = 1
    # no segment can be labelled sky or grass. Min-max normalisation gives each segment's nearest
    # retrieved row a score of 1 however far it is (paper §2.2), so the sky and grass regions are
    # not dropped but take the nearest class the database has.
    sky, grass = 2, 3
    for i in range(len(val)):
        result = without(val.image_path(i), CLASSES)
        assert result.scores.s_ret is not None
        assert (result.scores.s_ret[:, [sky, grass]] == 0).all()
        truth = val.annotation(i)
        for mask, category in zip(truth.masks, truth.categories, strict=True):
            (segment_id,) = np.unique(result.panoptic[mask])
            label = next(result.label_of(s) for s in result.segments if s.id == segment_id)
            assert label in {"apple", "banana"}
            if category < 2:
                assert label == CLASSES.split(", ")[category]
        assert (with_fallback(val.image_path(i), CLASSES).scores.s_ret[:, [sky, grass]] > 0).any()


def test_database_of_another_backbone_is_refused(scenes, scene_db) -> None:
    val = CocoPanopticDataset(*scenes["val"])
    with pytest.raises(DatabaseMismatchError, match="rebuild"):
        Segmenter(ColorBackbone(stride=4), GroundTruthProposer(val), db=scene_db)


def test_save_writes_all_outputs(scenes, scene_db, tmp_path) -> None:
    val = CocoPanopticDataset(*scenes["val"])
    result = Segmenter("color", GroundTruthProposer(val), db=scene_db)(val.image_path(0), CLASSES)
    paths = result.save(tmp_path / "out")
    stem = Path(val.image_path(0)).stem
    for suffix in (
        "panoptic.png",
        "panoptic.json",
        "semantic.png",
        "instances.json",
        "overlay.png",
    ):
        assert (tmp_path / "out" / f"{stem}_{suffix}").is_file()
    scores = np.load(paths["scores"])
    assert scores["s_clip"].shape == (len(result.proposals), 4)
    assert scores["s_ret"].shape == (len(result.proposals), 4)
    masks = np.unpackbits(scores["masks"], axis=-1, count=result.image.shape[1]).astype(bool)
    assert np.array_equal(masks, result.proposals.masks)


def test_bad_inputs(scenes) -> None:
    val = CocoPanopticDataset(*scenes["val"])
    segmenter = Segmenter("color", GroundTruthProposer(val))
    with pytest.raises(InputError, match="empty"):
        segmenter(val.image_path(0), " , ")
    with pytest.raises(InputError):
        segmenter(np.zeros((4, 4, 2), np.uint8), "red")
    with pytest.raises(InputError, match="alpha"):
        Segmenter("color", GroundTruthProposer(val), alpha=2.0)


def test_images_of_one_size_share_one_backbone_pass(scenes, scene_db, monkeypatch) -> None:
    val = CocoPanopticDataset(*scenes["val"])
    segmenter = Segmenter("color", GroundTruthProposer(val), db=scene_db, gamma=1.0)
    one_by_one = [segmenter(val.image_path(i), CLASSES) for i in range(3)]
    calls = []
    encode = segmenter.backbone.encode_images
    monkeypatch.setattr(
        segmenter.backbone, "encode_images", lambda x: calls.append(x.shape[0]) or encode(x)
    )
    prepared = [segmenter.prepare(val.image_path(i), CLASSES) for i in range(3)]
    batched = segmenter.finish(prepared)
    assert calls == [3]  # one pass for the three same-size scenes
    for a, b in zip(one_by_one, batched, strict=True):
        torch.testing.assert_close(a.scores.s_clip, b.scores.s_clip)
        torch.testing.assert_close(a.scores.s_ret, b.scores.s_ret)
        np.testing.assert_array_equal(a.panoptic, b.panoptic)


def test_proposers_get_the_vocabulary_its_text_embeddings_and_the_source(scenes) -> None:
    val = CocoPanopticDataset(*scenes["val"])
    seen = {}

    class Recording(GroundTruthProposer):
        def propose(self, image, vocabulary, text_embeddings=None):
            seen.update(image=image, vocabulary=vocabulary, text=text_embeddings)
            return super().propose(image, vocabulary, text_embeddings)

    segmenter = Segmenter("color", Recording(val))
    segmenter(val.image_path(0), "apple|red apple, banana, sky, grass")
    assert seen["vocabulary"].classes[0].synonyms == ("apple", "red apple")
    assert seen["text"] is segmenter.class_embeddings(seen["vocabulary"])  # embedded once
    assert seen["image"].source == str(val.image_path(0))


def test_the_result_files_read_back_as_written(scenes, scene_db, tmp_path) -> None:
    from retclip.outputs import read_outputs, segment_record

    val = CocoPanopticDataset(*scenes["val"])
    result = Segmenter("color", GroundTruthProposer(val), db=scene_db)(val.image_path(0), CLASSES)
    result.save(tmp_path / "out", "scene")
    files = read_outputs(tmp_path / "out", "scene")
    np.testing.assert_array_equal(files.panoptic, result.panoptic)
    np.testing.assert_array_equal(files.semantic, result.semantic)
    names, ids = result.vocabulary.names, result.vocabulary.ids
    assert files.annotation["segments_info"] == [
        segment_record(s, names, ids) for s in result.segments
    ]
    assert files.instances is not None and len(files.instances) == len(result.prediction.instances)
    with pytest.raises(InputError, match="prediction JSON not found"):
        read_outputs(tmp_path / "out", "other")


def test_semantic_scores_are_the_map_whose_argmax_is_the_semantic_output(scenes, scene_db) -> None:
    val = CocoPanopticDataset(*scenes["val"])
    result = Segmenter("color", GroundTruthProposer(val), db=scene_db)(val.image_path(0), CLASSES)
    scores = result.semantic_scores()
    assert scores.shape == (4, *result.semantic.shape)
    covered = result.proposals.masks.any(0)
    np.testing.assert_array_equal(scores.argmax(0).numpy()[covered], result.semantic[covered])
