"""Hand-computed cases for every formula of paper §2.2."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retclip.errors import InputError
from retclip.scores import clip_scores, ensemble, final_probs, retrieval_scores
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


def test_ensemble_fcclip_is_renormalised_geometric() -> None:
    s = ensemble(
        torch.tensor([[0.25, 0.5]]),
        None,
        s_iv=torch.tensor([[0.64, 0.5]]),
        seen=torch.tensor([True, False]),
        alpha=0.5,
        beta=1.0,
        mode="fcclip",
    )
    raw = np.array([0.25**0.5 * 0.64**0.5, 0.5])  # 0.4, 0.5: rows of the plain product sum to 0.9
    np.testing.assert_allclose(s.numpy(), [raw / raw.sum()], rtol=1e-6)
    with pytest.raises(InputError, match="in-vocabulary"):
        ensemble(torch.tensor([[0.5, 0.5]]), None, mode="fcclip")
    with pytest.raises(InputError, match="'fcclip'"):
        ensemble(torch.tensor([[0.5, 0.5]]), None, mode="geometric")  # type: ignore[arg-type]


def test_final_probs_apply_the_void_factor() -> None:
    s = torch.tensor([[0.6, 0.4], [0.1, 0.9]])
    p_void = torch.tensor([0.5, 0.0])
    linear = final_probs(s, p_void, mode="linear")
    np.testing.assert_allclose(linear.numpy(), [[0.3, 0.2, 0.5], [0.1, 0.9, 0.0]], atol=1e-7)
    fcclip = final_probs(s, p_void, mode="fcclip")  # FC-CLIP re-softmaxes log(p + 1e-8)
    expected = np.array([[0.3, 0.2, 0.5], [0.1, 0.9, 0.0]]) + 1e-8
    np.testing.assert_allclose(fcclip.numpy(), expected / expected.sum(1, keepdims=True), rtol=1e-6)
    kept = torch.tensor([True, False])
    np.testing.assert_allclose(final_probs(s, None, kept=kept).numpy(), [[0.6, 0.0], [0.1, 0.0]])


def test_s_clip_softmax_runs_over_the_kept_classes_only() -> None:
    embeddings = ClassEmbeddings(torch.eye(3), torch.tensor([0, 1, 2]), num_classes=3)
    feature = torch.tensor([[0.6, 0.8, 0.0]])
    kept = torch.tensor([True, False, True])
    s_clip = clip_scores(feature, embeddings, logit_scale=10.0, kept=kept)
    expected = np.exp([6.0, 0.0]) / np.exp([6.0, 0.0]).sum()
    np.testing.assert_allclose(s_clip.numpy(), [[expected[0], 0.0, expected[1]]], rtol=1e-5)
    none = clip_scores(feature, embeddings, 10.0, kept=torch.zeros(3, dtype=torch.bool))
    assert torch.equal(none, torch.zeros(1, 3))


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


def test_primary_and_fallback_share_one_min_max_range_and_pruning_leaves_it(tmp_path) -> None:
    from retclip.backbones import ColorBackbone
    from retclip.database import FeatureDatabase
    from retclip.scores import Retriever
    from retclip.text_embeddings import embed_vocabulary
    from retclip.vocabulary import Vocabulary

    backbone = ColorBackbone()
    primary = FeatureDatabase.create(tmp_path / "p", fingerprint=backbone.fingerprint, dim=12)
    primary.add(np.eye(12, dtype=np.float32)[[0, 1]], ["apple", "carrot"], sources=["a", "b"])
    fallback = FeatureDatabase.create(tmp_path / "f", fingerprint=backbone.fingerprint, dim=12)
    rows = np.eye(12, dtype=np.float32)[[5, 0]]  # its apple row is not used: primary has apple
    fallback.add(rows, ["sea", "apple"], sources=["c", "d"])
    vocab = Vocabulary.from_string("apple, carrot, sea, unicorn")
    text = embed_vocabulary(backbone, vocab)
    query = torch.nn.functional.normalize(
        torch.tensor([[1.0, 0.5, 0, 0, 0, 0.8, 0, 0, 0, 0, 0, 0]]), dim=-1
    )
    retriever = Retriever(backbone, primary, fallback, k=10)
    # |q| = sqrt(1.89) = 1.3748: cosines apple .7274, carrot .3637, sea .5819; distances .2726,
    # .6363, .4181 share one range [.2726, .6363]: normalised 0, 1, .4 → scores 1, 0, .6. (Sea
    # normalised alone in its own database would score 1.)
    np.testing.assert_allclose(
        retriever.scores(query, vocab, text).numpy(), [[1.0, 0.0, 0.6, 0.0]], atol=1e-3
    )
    # carrot pruned before retrieval: its row leaves the range [.2726, .4181] → apple 1, sea 0
    kept = np.array([True, False, True, True])
    np.testing.assert_allclose(
        retriever.scores(query, vocab, text, kept=kept).numpy(), [[1.0, 0.0, 0.0, 0.0]], atol=1e-3
    )


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


def test_a_huge_k_is_clamped_to_the_rows(tmp_path) -> None:
    from retclip.backbones import ColorBackbone
    from retclip.database import FeatureDatabase

    db = FeatureDatabase.create(tmp_path / "db", fingerprint=ColorBackbone().fingerprint, dim=12)
    db.add(np.eye(12, dtype=np.float32)[:3], ["a", "b", "c"], sources=["x", "y", "z"])
    found, rows = db.search(np.eye(12, dtype=np.float32)[:2], 10**18)  # allocates 2 × 3
    assert found.shape == rows.shape == (2, 3)


def test_neighbours_are_the_rows_behind_s_ret(tmp_path) -> None:
    """The evidence a user inspects is exactly what s_ret ranked: the k nearest rows over both
    databases, with their labels, sources, databases and cosines (computed here by hand)."""
    from retclip.backbones import ColorBackbone
    from retclip.database import FeatureDatabase
    from retclip.scores import Retriever
    from retclip.text_embeddings import embed_vocabulary
    from retclip.vocabulary import Vocabulary

    backbone = ColorBackbone()
    rows = np.eye(12, dtype=np.float32)[[0, 1, 5]]
    primary = FeatureDatabase.create(tmp_path / "p", fingerprint=backbone.fingerprint, dim=12)
    primary.add(rows[:2], ["apple", "carrot"], sources=["a.png", "c.png"])
    fallback = FeatureDatabase.create(tmp_path / "f", fingerprint=backbone.fingerprint, dim=12)
    fallback.add(rows[2:], ["sea"], sources=["s.png"])
    vocab = Vocabulary.from_string("apple, carrot, sea")
    query = torch.tensor([[1.0, 0.5, 0, 0, 0, 0.8, 0, 0, 0, 0, 0, 0]])
    query = torch.nn.functional.normalize(query, dim=-1)
    retriever = Retriever(backbone, primary, fallback, k=2)
    text = embed_vocabulary(backbone, vocab)
    s_ret, neighbours = retriever.retrieve(query, vocab, text)
    torch.testing.assert_close(s_ret, retriever.scores(query, vocab, text))
    cosines = (query.numpy() @ rows.T)[0]  # apple .7274, carrot .3637, sea .5819
    records = neighbours.of(0)
    assert [r["label"] for r in records] == ["apple", "sea"]  # k = 2: carrot is third
    assert [r["source"] for r in records] == ["a.png", "s.png"]
    assert [r["database"] for r in records] == [0, 1]
    np.testing.assert_allclose([r["similarity"] for r in records], cosines[[0, 2]], atol=1e-5)
    # the top neighbour's label is the class s_ret ranks first
    assert vocab.names[int(s_ret[0].argmax())] == records[0]["label"]
