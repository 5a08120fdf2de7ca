"""The training-free path follows paper §2.2 through the objects the CLI builds.

- absent classes are pruned *before* scoring: the ``s_clip`` softmax and retrieval see the kept
  classes only (equal to segmenting with the smaller vocabulary);
- the binary-mask merge gives the same panoptic map whatever order the proposals come in, and
  pixels no proposal covers are won by none;
- a database records its recipe (backbone preprocessing, pooling) and refuses other queries.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from retclip.backbones import ColorBackbone
from retclip.database import FeatureDatabase
from retclip.datasets import CocoPanopticDataset
from retclip.errors import DatabaseMismatchError
from retclip.panoptic import panoptic_inference
from retclip.proposers import GroundTruthProposer
from retclip.proposers.base import Proposals
from retclip.segmenter import MaskScores, Segmenter, Settings, merge
from retclip.vocabulary import VocabClass, Vocabulary
from test_segmenter import CLASSES, build_gt_database


@pytest.fixture(scope="module")
def scene_db(scenes, tmp_path_factory) -> FeatureDatabase:
    return build_gt_database(tmp_path_factory.mktemp("db") / "db", *scenes["db"])


class PruningProposer(GroundTruthProposer):
    """Ground-truth masks that keep only the classes present in the image (as a detector would)."""

    def propose(self, image, vocabulary, text_embeddings=None) -> Proposals:
        proposals = super().propose(image, vocabulary, text_embeddings)
        assert proposals.class_hints is not None
        proposals.kept_classes = np.unique(proposals.class_hints)
        return proposals


def test_pruned_classes_leave_the_vocabulary_before_scoring(scenes, scene_db) -> None:
    val = CocoPanopticDataset(*scenes["val"])
    vocab = Vocabulary.from_string(CLASSES)
    # k larger than the database: every row of an allowed label is retrieved, so a pruned
    # class's rows would move the min-max range if they were searched
    pruning = Segmenter("color", PruningProposer(val), db=scene_db, k=100, gamma=0.5)
    checked = 0
    for i in range(len(val)):
        result = pruning(val.image_path(i), vocab)
        kept = result.scores.kept.numpy()
        if kept.all():
            continue
        checked += 1
        names = [vocab.names[c] for c in np.flatnonzero(kept)]
        smaller = Segmenter("color", GroundTruthProposer(val), db=scene_db, k=100, gamma=0.5)
        reference = smaller(val.image_path(i), ", ".join(names))
        assert result.scores.s_ret is not None and reference.scores.s_ret is not None
        torch.testing.assert_close(result.scores.s_clip[:, kept], reference.scores.s_clip)
        torch.testing.assert_close(result.scores.s_ret[:, kept], reference.scores.s_ret)
        assert (result.scores.s_clip[:, ~kept] == 0).all()
        assert (result.scores.s_ret[:, ~kept] == 0).all()
        mine = [(s.area, names.index(result.label_of(s))) for s in result.segments]
        theirs = [(s.area, s.category) for s in reference.segments]
        assert sorted(mine) == sorted(theirs)
    assert checked >= 2  # the scenes lack apple or banana in several images


def binary_case() -> tuple[Proposals, MaskScores, Vocabulary]:
    """Four binary masks with overlaps, a tie in class score, and pixels none covers."""
    masks = np.zeros((4, 20, 20), bool)
    masks[0, 0:10, 0:12] = True  # thing A
    masks[1, 5:15, 8:20] = True  # thing B, same class scores as A, lower confidence
    masks[2, 12:20, 0:6] = True  # stuff
    masks[3, 16:20, 14:20] = True  # stuff, same class, lower score
    s_clip = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.2, 0.8], [0.3, 0.7]])
    proposals = Proposals(masks=masks, scores=np.array([0.9, 0.5, 1.0, 1.0], np.float32))
    scores = MaskScores(
        s_clip=s_clip, s_ret=None, s_iv=None, seen=None, kept=torch.ones(2, dtype=torch.bool)
    )
    vocab = Vocabulary([VocabClass("apple", isthing=True), VocabClass("sky", isthing=False)])
    return proposals, scores, vocab


def test_binary_merge_does_not_depend_on_proposal_order() -> None:
    proposals, scores, vocab = binary_case()
    settings = Settings()
    expected = merge(scores, proposals, vocab, settings)
    assert not (expected.panoptic == 0).all() and (expected.panoptic == 0).any()  # gaps
    # the A/B tie goes to the more confident proposal: A keeps its whole mask
    assert (expected.panoptic[proposals.masks[0]] == expected.panoptic[0, 0]).all()
    for order in itertools.permutations(range(4)):
        index = np.array(order)
        permuted = merge(
            MaskScores(scores.s_clip[index], None, None, None, scores.kept),
            proposals.select(index),
            vocab,
            settings,
        )
        np.testing.assert_array_equal(permuted.panoptic, expected.panoptic)
        assert [(s.id, s.category, s.area) for s in permuted.segments] == [
            (s.id, s.category, s.area) for s in expected.segments
        ]
        assert [int(index[s.mask_index]) for s in permuted.segments] == [
            s.mask_index for s in expected.segments
        ]


def test_pixels_no_proposal_covers_are_won_by_none() -> None:
    masks = torch.zeros(2, 20, 20)
    masks[0, 0:4, 0:5] = 1  # P: 20 pixels, first in order, lower score
    masks[1, 0:3, 0:10] = 1  # Q covers 15 of P's pixels
    probs = torch.tensor([[0.6, 0.4], [0.9, 0.1]])
    panoptic, segments = panoptic_inference(probs, masks, [True, True], overlap_threshold=0.8)
    # P keeps 5 of its 20 pixels (0.25 < 0.8): dropped. Counting the 355 uncovered pixels as won
    # by the first proposal would have let it pass with a 5-pixel segment.
    assert [s.mask_index for s in segments] == [1]
    assert (panoptic[masks[1].bool().numpy()] == segments[0].id).all()
    assert (panoptic[~masks.bool().any(0).numpy()] == 0).all()


def test_a_database_refuses_queries_of_another_pooling(scenes, scene_db, tmp_path) -> None:
    assert scene_db.pooling == "soft"  # recorded by the build
    val = CocoPanopticDataset(*scenes["val"])
    with pytest.raises(DatabaseMismatchError, match="'soft' mask pooling"):
        Segmenter("color", GroundTruthProposer(val), db=scene_db, pooling="binary")
    backbone = ColorBackbone()
    legacy = FeatureDatabase.create(tmp_path / "legacy", fingerprint=backbone.fingerprint, dim=12)
    assert legacy.pooling is None  # not recorded: any pooling may query it
    Segmenter("color", GroundTruthProposer(val), db=legacy, pooling="binary")
