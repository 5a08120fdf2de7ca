"""Text embeddings: template averaging, max over synonyms, on-disk cache."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from retclip.backbones.base import Backbone, BackboneFingerprint
from retclip.errors import InputError
from retclip.text_embeddings import (
    DEFAULT_TEMPLATES,
    ClassEmbeddings,
    embed_vocabulary,
)
from retclip.vocabulary import Vocabulary


class LookupBackbone(Backbone):
    """Texts → fixed vectors from a table (unknown texts → a constant), counting calls."""

    def __init__(
        self,
        table: dict[str, list[float]],
        templates: Sequence[str] | None = ("{}", "a {}"),
        revision: str = "1",
    ) -> None:
        self.table = table
        self.dim = len(next(iter(table.values())))
        self.fingerprint = BackboneFingerprint(model_id="test/lookup", revision=revision)
        self.prompt_templates = templates
        self.calls: list[list[str]] = []

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        self.calls.append(list(texts))
        rows = [self.table.get(t, [1.0] + [0.0] * (self.dim - 1)) for t in texts]
        return torch.tensor(rows, dtype=torch.float32)


TABLE = {
    "sofa": [3.0, 0.0, 0.0],  # normalised: (1, 0, 0)
    "a sofa": [0.0, 5.0, 0.0],  # normalised: (0, 1, 0)
    "couch": [0.0, 0.0, 2.0],
    "a couch": [0.0, 0.0, 7.0],
    "wall": [0.0, 1.0, 0.0],
    "a wall": [0.0, 1.0, 1.0],
}


def test_default_templates() -> None:
    assert len(DEFAULT_TEMPLATES) == 14
    assert DEFAULT_TEMPLATES[0] == "a photo of a {}."
    assert all("{}" in t for t in DEFAULT_TEMPLATES)


def test_template_average_by_hand(tmp_path: Path) -> None:
    backbone = LookupBackbone(TABLE)
    emb = embed_vocabulary(backbone, Vocabulary.from_string("sofa|couch, wall"), cache=False)
    assert emb.num_classes == 2
    assert emb.synonym_class.tolist() == [0, 0, 1]
    assert emb.synonym_class.dtype == torch.long
    s = 1 / math.sqrt(2)
    expected = torch.tensor(
        [
            [s, s, 0.0],  # mean((1,0,0), (0,1,0)), re-normalised
            [0.0, 0.0, 1.0],  # both templates give (0,0,1)
            # mean((0,1,0), (0,s,s)) = (0, (1+s)/2, s/2), re-normalised
            [0.0, (1 + s) / math.hypot(1 + s, s), s / math.hypot(1 + s, s)],
        ]
    )
    torch.testing.assert_close(emb.synonym_embeddings, expected)
    # One batch of synonym-major prompts, templates filled with str.format.
    assert backbone.calls == [["sofa", "a sofa", "couch", "a couch", "wall", "a wall"]]


def test_templates_argument_and_default() -> None:
    backbone = LookupBackbone(TABLE, templates=None)
    embed_vocabulary(backbone, Vocabulary.from_string("wall"), cache=False)
    assert backbone.calls == [[t.format("wall") for t in DEFAULT_TEMPLATES]]
    backbone = LookupBackbone(TABLE)
    emb = embed_vocabulary(
        backbone, Vocabulary.from_string("sofa"), templates=["a {}"], cache=False
    )
    assert backbone.calls == [["a sofa"]]
    torch.testing.assert_close(emb.synonym_embeddings, torch.tensor([[0.0, 1.0, 0.0]]))


def test_batching() -> None:
    backbone = LookupBackbone(TABLE)
    vocab = Vocabulary.from_string("sofa|couch, wall")
    whole = embed_vocabulary(backbone, vocab, cache=False)
    backbone.calls.clear()
    batched = embed_vocabulary(backbone, vocab, cache=False, batch_size=4)
    assert [len(c) for c in backbone.calls] == [4, 2]
    torch.testing.assert_close(batched.synonym_embeddings, whole.synonym_embeddings)
    with pytest.raises(ValueError, match="batch_size"):
        embed_vocabulary(backbone, vocab, cache=False, batch_size=0)


@pytest.mark.parametrize("template", ["no placeholder", "a {name}", "a {1}"])
def test_bad_template(template: str) -> None:
    with pytest.raises(InputError, match="template"):
        embed_vocabulary(
            LookupBackbone(TABLE), Vocabulary.from_string("a"), templates=[template], cache=False
        )
    with pytest.raises(InputError, match="no prompt templates"):
        embed_vocabulary(
            LookupBackbone(TABLE), Vocabulary.from_string("a"), templates=[], cache=False
        )


def test_cosine_max_over_synonyms() -> None:
    s = 1 / math.sqrt(2)
    emb = ClassEmbeddings(
        synonym_embeddings=torch.tensor(
            [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [s, s, 0.0]]
        ),
        synonym_class=torch.tensor([0, 1, 0, 2]),
        num_classes=3,
    )
    features = torch.tensor([[0.6, 0.8, 0.0], [0.0, -0.6, 0.8], [-1.0, 0.0, 0.0]])
    expected = torch.tensor(
        [
            [0.6, 0.8, 1.4 * s],  # class 0 = max(0.6, 0.0)
            [0.8, -0.6, -0.6 * s],  # class 0 = max(0.0, 0.8)
            [0.0, 0.0, -s],  # class 0 = max(-1, 0)
        ]
    )
    torch.testing.assert_close(emb.cosine(features), expected)
    assert emb.cosine(torch.zeros(0, 3)).shape == (0, 3)
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        emb.cosine(torch.zeros(2, 4))


def test_cosine_on_embedded_vocabulary() -> None:
    emb = embed_vocabulary(
        LookupBackbone(TABLE), Vocabulary.from_string("sofa|couch, wall"), cache=False
    )
    cos = emb.cosine(torch.tensor([[0.0, 0.0, 1.0]]))
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(cos, torch.tensor([[1.0, s / math.hypot(1 + s, s)]]))


def test_cache_hit_skips_encoding(tmp_path: Path) -> None:
    vocab = Vocabulary.from_string("sofa|couch, wall")
    backbone = LookupBackbone(TABLE)
    first = embed_vocabulary(backbone, vocab, cache_dir=tmp_path)
    assert len(backbone.calls) == 1
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz"
    second = embed_vocabulary(backbone, vocab, cache_dir=tmp_path)
    assert len(backbone.calls) == 1  # served from disk
    torch.testing.assert_close(second.synonym_embeddings, first.synonym_embeddings)
    assert second.synonym_class.tolist() == first.synonym_class.tolist()
    embed_vocabulary(backbone, vocab, cache_dir=tmp_path, cache=False)
    assert len(backbone.calls) == 2  # cache=False does not read


def test_default_cache_dir_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RETCLIP_CACHE_DIR", str(tmp_path))
    embed_vocabulary(LookupBackbone(TABLE), Vocabulary.from_string("wall"))
    assert len(list((tmp_path / "text").glob("*.npz"))) == 1


def test_cache_key_depends_on_fingerprint_templates_synonyms(tmp_path: Path) -> None:
    vocab = Vocabulary.from_string("sofa|couch, wall")
    embed_vocabulary(LookupBackbone(TABLE), vocab, cache_dir=tmp_path)
    other_model = LookupBackbone(TABLE, revision="2")
    embed_vocabulary(other_model, vocab, cache_dir=tmp_path)
    assert len(other_model.calls) == 1
    other_templates = LookupBackbone(TABLE, templates=("{}",))
    embed_vocabulary(other_templates, vocab, cache_dir=tmp_path)
    assert len(other_templates.calls) == 1
    reordered = LookupBackbone(TABLE)
    embed_vocabulary(reordered, Vocabulary.from_string("couch|sofa, wall"), cache_dir=tmp_path)
    assert len(reordered.calls) == 1
    assert len(list(tmp_path.glob("*.npz"))) == 4
    # A differently *named* class with the same synonyms reuses the cached synonyms.
    same = LookupBackbone(TABLE)
    embed_vocabulary(same, Vocabulary.from_string("sofa|couch, wall", name="x"), cache_dir=tmp_path)
    assert same.calls == []


def test_corrupt_cache_is_rewritten(tmp_path: Path) -> None:
    vocab = Vocabulary.from_string("sofa|couch, wall")
    backbone = LookupBackbone(TABLE)
    good = embed_vocabulary(backbone, vocab, cache_dir=tmp_path)
    (path,) = tmp_path.glob("*.npz")
    path.write_bytes(b"not a zip file")
    again = embed_vocabulary(backbone, vocab, cache_dir=tmp_path)
    assert len(backbone.calls) == 2
    torch.testing.assert_close(again.synonym_embeddings, good.synonym_embeddings)
    embed_vocabulary(backbone, vocab, cache_dir=tmp_path)
    assert len(backbone.calls) == 2  # the rewritten file is valid
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temp files left


def test_cache_dir_is_a_file_warns(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.warns(RuntimeWarning, match="cannot write text-embedding cache"):
        emb = embed_vocabulary(
            LookupBackbone(TABLE), Vocabulary.from_string("wall"), cache_dir=blocker / "text"
        )
    assert emb.synonym_embeddings.shape == (1, 3)


def test_results_are_plain_tensors() -> None:
    emb = embed_vocabulary(LookupBackbone(TABLE), Vocabulary.from_string("wall"), cache=False)
    assert not emb.synonym_embeddings.is_inference()
    assert emb.synonym_embeddings.dtype == torch.float32
    assert emb.synonym_embeddings.device == torch.device("cpu")


def test_cache_folder_is_bounded_least_recently_used_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backbone = LookupBackbone(TABLE)
    embed_vocabulary(backbone, Vocabulary.from_string("sofa"), cache_dir=tmp_path)
    size = next(tmp_path.glob("*.npz")).stat().st_size
    # room for three files of about this size
    monkeypatch.setenv("RETCLIP_TEXT_CACHE_MB", str(3.5 * size / 2**20))
    names = ["wall", "couch", "sofa, wall", "sofa, couch", "wall, couch", "a, b", "c, d"]
    for step, name in enumerate(names):
        embed_vocabulary(backbone, Vocabulary.from_string(name), cache_dir=tmp_path)
        # "sofa" alone is read again before each write: recently used, never evicted
        calls = len(backbone.calls)
        embed_vocabulary(backbone, Vocabulary.from_string("sofa"), cache_dir=tmp_path)
        assert len(backbone.calls) == calls, f"'sofa' was evicted at step {step}"
        total = sum(f.stat().st_size for f in tmp_path.glob("*.npz"))
        assert total <= 3.5 * size * 1.2
    assert len(list(tmp_path.glob("*.npz"))) <= 4
    # the newest vocabulary is cached, the oldest ones are gone
    calls = len(backbone.calls)
    embed_vocabulary(backbone, Vocabulary.from_string("c, d"), cache_dir=tmp_path)
    assert len(backbone.calls) == calls
    embed_vocabulary(backbone, Vocabulary.from_string("wall"), cache_dir=tmp_path)
    assert len(backbone.calls) == calls + 1


@pytest.mark.parametrize("value", ["lots", "-1", "nan", "inf"])
def test_bad_cache_bound_is_an_input_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("RETCLIP_TEXT_CACHE_MB", value)
    with pytest.raises(InputError, match="RETCLIP_TEXT_CACHE_MB"):
        embed_vocabulary(LookupBackbone(TABLE), Vocabulary.from_string("x"), cache_dir=tmp_path)
