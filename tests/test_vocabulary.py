"""Vocabulary parsing, validation, builtins and FC-CLIP's seen rule."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from retclip.errors import InputError
from retclip.vocabulary import (
    BUILTIN_VOCABULARIES,
    VocabClass,
    Vocabulary,
    normalize_name,
)

# facts.md, FC-CLIP section: 0-based ADE20k-150 ids seen in COCO panoptic by the synonym rule.
_RANGES = [(0, 12), (14, 21), (23, 23), (24, 24), (26, 28), (32, 32), (34, 34), (36, 36)]
_RANGES += [(45, 47), (50, 50), (53, 53), (57, 57), (60, 60), (61, 61), (65, 67), (69, 69)]
_RANGES += [(72, 72), (76, 76), (80, 83), (89, 89), (90, 90), (92, 92), (98, 98), (114, 114)]
_RANGES += [(118, 118), (120, 120), (124, 127), (131, 131), (135, 135), (136, 136)]
_RANGES += [(142, 142), (147, 147), (148, 148)]
SEEN_ADE_IDS = [i for lo, hi in _RANGES for i in range(lo, hi + 1)]


def write(tmp_path: Path, text: str, name: str = "vocab.txt") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_normalize_name() -> None:
    assert normalize_name("  Dining\tTable \n") == "dining table"
    assert normalize_name("a   b  c") == "a b c"


def test_from_string() -> None:
    vocab = Vocabulary.from_string(" Sofa | couch , wall,lamp ")
    assert vocab.name == "custom"
    assert len(vocab) == 3
    assert vocab.names == ["Sofa", "wall", "lamp"]
    assert vocab[0].synonyms == ("Sofa", "couch")
    assert vocab.ids == [0, 1, 2]
    assert vocab.isthing.tolist() == [True, True, True]
    assert vocab.isthing.dtype == np.bool_
    assert vocab.index_of("COUCH") == 0
    assert vocab.index_of(" lamp ") == 2
    assert [c.name for c in vocab] == vocab.names
    with pytest.raises(AttributeError):
        vocab.name = "other"  # type: ignore[misc]
    assert "3 classes: Sofa, wall, lamp" in repr(vocab)


def test_from_file_flags_and_comments(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "# a living room\n\nsofa, couch ; thing\nwall;STUFF  # painted\n  lamp  \n",
        "living.txt",
    )
    vocab = Vocabulary.from_file(path)
    assert vocab.name == "living"
    assert vocab.names == ["sofa", "wall", "lamp"]
    assert vocab[0].synonyms == ("sofa", "couch")
    assert vocab.isthing.tolist() == [True, False, True]
    assert vocab.ids == [0, 1, 2]
    assert Vocabulary.load(str(path)) == vocab


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "''"),
        ("   ", "'   '"),
        ("a,,b", "class 2"),
        ("a| ", "class 1"),
        ("a,b,", "class 3"),
    ],
)
def test_from_string_errors(text: str, fragment: str) -> None:
    with pytest.raises(InputError) as info:
        Vocabulary.from_string(text)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_duplicate_classes_are_named() -> None:
    with pytest.raises(InputError, match=r"'sofa' and 'Couch' share the synonym 'Couch'"):
        Vocabulary.from_string("sofa|couch, wall, Couch|COUCH ")
    with pytest.raises(InputError, match="'sofa'"):
        Vocabulary.from_string("sofa, Sofa")


def test_synonyms_deduplicated_within_class() -> None:
    assert Vocabulary.from_string("sofa|Sofa|couch")[0].synonyms == ("sofa", "couch")


def test_file_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(InputError, match=r"nope\.txt' does not exist"):
        Vocabulary.from_file(missing)
    with pytest.raises(InputError, match=r"'.*' cannot be read"):
        Vocabulary.from_file(tmp_path)  # a directory
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"latin1\.txt' is not UTF-8"):
        Vocabulary.from_file(bad)
    with pytest.raises(InputError, match=r"flags\.txt', line 3: unknown flag 'things'"):
        Vocabulary.from_file(write(tmp_path, "a\n#x\nb ; things\n", "flags.txt"))
    with pytest.raises(InputError, match=r"empty\.txt' has no classes"):
        Vocabulary.from_file(write(tmp_path, "# nothing\n\n", "empty.txt"))
    with pytest.raises(InputError, match=r"holes\.txt', line 2: empty class name in 'a, ,b'"):
        Vocabulary.from_file(write(tmp_path, "x\na, ,b\n", "holes.txt"))
    with pytest.raises(InputError, match=r"dup\.txt'.*'a' and 'b' share the synonym 'c'"):
        Vocabulary.from_file(write(tmp_path, "a, c\nb, c\n", "dup.txt"))


def test_vocab_class_validation() -> None:
    with pytest.raises(InputError, match="class name '  ' is empty"):
        VocabClass("  ")
    with pytest.raises(InputError, match="class 'sofa' has an empty synonym ''"):
        VocabClass("sofa", ("couch", ""))
    assert VocabClass("sofa").synonyms == ("sofa",)
    assert VocabClass(" sofa ", ("couch",)).name == "sofa"
    with pytest.raises(InputError, match="'empty' is empty"):
        Vocabulary((), name="empty")


def test_index_of_unknown_names_value() -> None:
    vocab = Vocabulary.from_string("a, b")
    with pytest.raises(InputError, match="'zebra' is not a class or synonym of vocabulary"):
        vocab.index_of("zebra")


def test_unknown_builtin_lists_known() -> None:
    with pytest.raises(InputError) as info:
        Vocabulary.builtin("ade20k-847")
    message = str(info.value)
    assert "'ade20k-847'" in message
    for name in BUILTIN_VOCABULARIES:
        assert name in message
    with pytest.raises(InputError, match="'no-such' is neither a builtin"):
        Vocabulary.load("no-such")


def test_builtin_ade20k() -> None:
    vocab = Vocabulary.builtin("ade20k-150")
    assert vocab.name == "ade20k-150"
    assert len(vocab) == 150
    assert vocab.ids == list(range(150))
    assert int(vocab.isthing.sum()) == 100
    assert vocab[0].name == "wall" and not vocab[0].isthing
    assert vocab[6].name == "road, route"
    # FC-CLIP's list verbatim; the display name is not added to it.
    assert vocab[6].synonyms == ("road", "route", "street", "roads", "streets", "routes")
    assert vocab.index_of("road, route") == 6
    assert vocab.index_of("street") == 6
    assert sum(len(c.synonyms) for c in vocab) == 402  # 403 names, "kitchen range" twice
    assert Vocabulary.load("ADE20K-150") is vocab


def test_builtin_coco() -> None:
    vocab = Vocabulary.builtin("coco-panoptic-133")
    assert len(vocab) == 133
    assert int(vocab.isthing.sum()) == 80
    assert int((~vocab.isthing).sum()) == 53
    assert vocab.ids[:3] == [1, 2, 3] and vocab.ids[-1] == 200
    assert len(set(vocab.ids)) == 133
    assert vocab[0].name == "person" and "clothes" in vocab[0].synonyms
    assert vocab[vocab.index_of("wall-other-merged")].synonyms == ("wall", "walls")


def test_seen_mask_ade_vs_coco() -> None:
    assert len(SEEN_ADE_IDS) == 64
    ade = Vocabulary.builtin("ade20k-150")
    coco = Vocabulary.builtin("coco-panoptic-133")
    mask = ade.seen_mask(coco)
    assert mask.shape == (150,) and mask.dtype == np.bool_
    assert np.flatnonzero(mask).tolist() == SEEN_ADE_IDS
    assert coco.seen_mask(coco).all()


def test_seen_mask_uses_synonyms_only() -> None:
    train = Vocabulary.from_string("sofa|couch, wall")
    test = Vocabulary(
        [VocabClass("Couch ", ("settee", "COUCH")), VocabClass("wall", ("brick wall",))]
    )
    assert test.name == "custom"
    assert isinstance(test.classes, tuple)
    assert test.seen_mask(train).tolist() == [True, False]


def test_key_stable_and_content_sensitive(tmp_path: Path) -> None:
    a = Vocabulary.from_string("sofa|couch, wall")
    b = Vocabulary.from_string("sofa | couch,wall", name="other")
    assert a.key() == b.key()
    assert len(a.key()) == 64
    assert a.key() != Vocabulary.from_string("sofa|couch, lamp").key()
    assert a.key() != Vocabulary.from_string("couch|sofa, wall").key()
    flagged = Vocabulary.from_file(write(tmp_path, "sofa, couch\nwall ; stuff\n"))
    assert flagged.key() != a.key()
    # Pinned to its definition: sha256 of the sorted-key JSON of the classes.
    expected = b'[{"id": 0, "isthing": true, "name": "a", "synonyms": ["a"]}]'
    assert Vocabulary.from_string("a").key() == hashlib.sha256(expected).hexdigest()


def test_dict_round_trip() -> None:
    ade = Vocabulary.builtin("ade20k-150")
    again = Vocabulary.from_dict(ade.to_dict())
    assert again == ade
    assert again.key() == ade.key()
    with pytest.raises(InputError, match="malformed"):
        Vocabulary.from_dict({"classes": [{"synonyms": ["x"]}]})


def test_from_choice_takes_exactly_one_source(tmp_path) -> None:
    assert Vocabulary.from_choice("cat, dog|puppy", None).names == ["cat", "dog"]
    assert len(Vocabulary.from_choice(None, "ade20k-150")) == 150
    path = tmp_path / "v.txt"
    path.write_text("wall ; stuff\nlamp\n")
    assert Vocabulary.from_choice(" ", str(path)).names == ["wall", "lamp"]
    for classes, vocab in [(None, None), ("a", "ade20k-150"), ("", "  ")]:
        with pytest.raises(InputError, match="exactly one of --classes"):
            Vocabulary.from_choice(classes, vocab)
    with pytest.raises(InputError, match="unknown vocabulary"):
        Vocabulary.from_choice(None, str(path), builtin_only=True)  # a server reads no files
    with pytest.raises(InputError, match="the limit is 1"):
        Vocabulary.from_choice("a, b", None, max_classes=1)


def test_files_with_a_byte_order_mark_read_as_utf8(tmp_path) -> None:
    path = tmp_path / "bom.txt"
    path.write_bytes("\ufeffsofa, couch ; thing\nwall ; stuff\n".encode())
    assert Vocabulary.from_file(path).names == ["sofa", "wall"]  # no BOM in the first name
