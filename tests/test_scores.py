"""Hand-computed cases for every formula of paper §2.2."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retclip.errors import InputError
from retclip.scores import clip_scores, ensemble, retrieval_scores
from retclip.text_embeddings import ClassEmbeddings


def test_s_ret_min_max_normalisation_and_per_class_max() -> None:
    # cosines 0.9, 0.8, 0.5 → distances 0.1, 0.2, 0.5 → normalised 0, 0.25, 1 → scores 1, .75, 0
    sims = torch.tensor([[0.9, 0.8, 0.5]])
    labels = torch.tensor([[0, 1, 0]])
    match = torch.eye(3, dtype=torch.bool)  # label l is class l
    s_ret = retrieval_scores(sims, labels, match)
    np.testing.assert_allclose(s_ret.numpy(), [[1.0, 0.75, 0.0]], atol=1e-6)


def test_s_ret_per_class_max_over_several_rows() -> None:
    sims = torch.tensor([[0.9, 0.7, 0.6, 0.5]])  # distances .1 .3 .4 .5 → scores 1 .5 .25 0
    labels = torch.tensor([[1, 0, 0, 1]])
    s_ret = retrieval_scores(sims, labels, torch.eye(2, dtype=torch.bool))
    np.testing.assert_allclose(s_ret.numpy(), [[0.5, 1.0]], atol=1e-6)


def test_s_ret_equal_distances_and_empty_slots() -> None:
    sims = torch.tensor([[0.5, 0.5, -float("inf")], [0.3, -float("inf"), -float("inf")]])
    labels = torch.tensor([[0, 1, -1], [1, -1, -1]])
    s_ret = retrieval_scores(sims, labels, torch.eye(2, dtype=torch.bool))
    # equal distances: every retrieved row scores 1; a single row scores 1; empty slots vote nothing
    np.testing.assert_allclose(s_ret.numpy(), [[1.0, 1.0], [0.0, 1.0]])
    nothing = retrieval_scores(
        torch.full((1, 2), -float("inf")), torch.full((1, 2), -1), torch.eye(2, dtype=torch.bool)
    )
    assert torch.equal(nothing, torch.zeros(1, 2))


def test_s_ret_label_matching_two_classes() -> None:
    match = torch.tensor([[True, True], [False, False]])  # label 0 stands for both classes
    s_ret = retrieval_scores(torch.tensor([[0.9, 0.1]]), torch.tensor([[0, 1]]), match)
    np.testing.assert_allclose(s_ret.numpy(), [[1.0, 1.0]])


def test_s_clip_is_softmax_of_scaled_max_synonym_cosine() -> None:
    # class 0 has synonyms e0 and e1, class 1 has e2
    embeddings = ClassEmbeddings(
        synonym_embeddings=torch.eye(3), synonym_class=torch.tensor([0, 0, 1]), num_classes=2
    )
    feature = torch.nn.functional.normalize(torch.tensor([[0.0, 0.6, 0.8]]), dim=-1)
    s_clip = clip_scores(feature, embeddings, logit_scale=10.0)
    expected = np.exp([6.0, 8.0]) / np.exp([6.0, 8.0]).sum()  # max(0, .6) = .6 vs .8
    np.testing.assert_allclose(s_clip.numpy(), [expected], rtol=1e-5)


def test_ensemble_linear_seen_unseen() -> None:
    s_clip = torch.tensor([[0.2, 0.8]])
    s_ret = torch.tensor([[1.0, 0.0]])
    s_iv = torch.tensor([[0.6, 0.4]])
    seen = torch.tensor([True, False])
    s = ensemble(s_clip, s_ret, gamma=0.3, s_iv=s_iv, seen=seen, alpha=0.4, beta=0.7)
    s_oov = [0.3 * 1.0 + 0.7 * 0.2, 0.3 * 0.0 + 0.7 * 0.8]  # 0.44, 0.56
    expected = [0.4 * s_oov[0] + 0.6 * 0.6, 0.7 * s_oov[1] + 0.3 * 0.4]
    np.testing.assert_allclose(s.numpy(), [expected], rtol=1e-6)


def test_ensemble_geometric() -> None:
    s = ensemble(
        torch.tensor([[0.25, 0.5]]),
        None,
        s_iv=torch.tensor([[0.64, 0.5]]),
        seen=torch.tensor([True, False]),
        alpha=0.5,
        beta=1.0,
        mode="geometric",
    )
    np.testing.assert_allclose(s.numpy(), [[0.25**0.5 * 0.64**0.5, 0.5]], rtol=1e-6)


def test_ensemble_training_free_and_edges() -> None:
    s_clip, s_ret = torch.tensor([[0.2, 0.8]]), torch.tensor([[1.0, 0.5]])
    np.testing.assert_allclose(ensemble(s_clip, s_ret, gamma=0.0).numpy(), s_clip.numpy())
    np.testing.assert_allclose(ensemble(s_clip, s_ret, gamma=1.0).numpy(), s_ret.numpy())
    np.testing.assert_allclose(ensemble(s_clip, s_ret, gamma=0.5).numpy(), [[0.6, 0.65]], rtol=1e-6)
    with pytest.raises(InputError, match="gamma"):
        ensemble(s_clip, s_ret, gamma=1.5)
    with pytest.raises(InputError, match="seen"):
        ensemble(s_clip, s_ret, s_iv=s_clip)


def test_label_matching_by_synonym_and_by_text_embedding(tmp_path) -> None:
    from retclip.backbones import ColorBackbone
    from retclip.database import DatabaseLabel
    from retclip.scores import match_labels
    from retclip.text_embeddings import embed_vocabulary
    from retclip.vocabulary import VocabClass, Vocabulary

    backbone = ColorBackbone()
    vocab = Vocabulary.from_string("sofa|couch, red, apple")
    labels = [
        DatabaseLabel("couch", ("couch",)),  # synonym of class 0
        DatabaseLabel("red paint", ("red paint",)),  # same colour word: text cosine 1 > 0.95
        DatabaseLabel("pear", ("pear",)),  # an unrelated word: no match
    ]
    by_synonym = match_labels(vocab, labels)
    np.testing.assert_array_equal(
        by_synonym.matrix, [[True, False, False], [False, False, False], [False, False, False]]
    )
    label_vocab = Vocabulary([VocabClass(label.name, label.synonyms) for label in labels])
    by_embedding = match_labels(
        vocab,
        labels,
        class_embeddings=embed_vocabulary(backbone, vocab),
        label_embeddings=embed_vocabulary(backbone, label_vocab),
    )
    assert by_embedding.matrix[1, 1] and not by_embedding.matrix[2].any()
    np.testing.assert_array_equal(by_embedding.covered_classes, [True, True, False])
    np.testing.assert_array_equal(by_embedding.allowed_labels, [0, 1])


def test_retriever_with_k_larger_than_the_database(tmp_path) -> None:
    from retclip.backbones import ColorBackbone
    from retclip.database import FeatureDatabase
    from retclip.scores import Retriever
    from retclip.text_embeddings import embed_vocabulary
    from retclip.vocabulary import Vocabulary

    backbone = ColorBackbone()
    db = FeatureDatabase.create(tmp_path / "db", fingerprint=backbone.fingerprint, dim=12)
    rows = np.eye(12, dtype=np.float32)[[0, 1, 5]]  # red, orange, blue directions
    db.add(rows, ["apple", "carrot", "sea"], sources=["a", "b", "c"])
    vocab = Vocabulary.from_string("apple, carrot, sea, unicorn")
    query = torch.nn.functional.normalize(torch.tensor([[1.0, 0.5] + [0.0] * 10]), dim=-1)
    s_ret = Retriever(backbone, db, k=50).scores(query, vocab, embed_vocabulary(backbone, vocab))
    # k = 50 > 3 rows: all three take part. Cosines .894 (apple), .447 (carrot), 0 (sea) give
    # distances .106, .553, 1: min-max normalised 0, .5, 1, so scores 1, .5, 0; unicorn has no row.
    np.testing.assert_allclose(s_ret.numpy(), [[1.0, 0.5, 0.0, 0.0]], atol=1e-3)


def test_named_labels_do_not_also_match_by_embedding() -> None:
    from retclip.backbones import ColorBackbone
    from retclip.database import DatabaseLabel
    from retclip.scores import match_labels
    from retclip.text_embeddings import embed_vocabulary
    from retclip.vocabulary import VocabClass, Vocabulary

    backbone = ColorBackbone()
    vocab = Vocabulary.from_string("red, rose red")  # two classes whose texts embed identically
    labels = [DatabaseLabel("red", ("red",)), DatabaseLabel("red paint", ("red paint",))]
    label_vocab = Vocabulary([VocabClass(label.name, label.synonyms) for label in labels])
    match = match_labels(
        vocab,
        labels,
        class_embeddings=embed_vocabulary(backbone, vocab),
        label_embeddings=embed_vocabulary(backbone, label_vocab),
    )
    # "red" is named by class 0 only; "red paint" goes to one class (the closest), not to both
    np.testing.assert_array_equal(match.matrix[0], [True, False])
    assert match.matrix[1].sum() == 1
