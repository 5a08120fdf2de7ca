"""Labels from captions: names, synonyms and plurals matched as whole words."""

from __future__ import annotations

import json

import pytest

from retclip.database.captions import (
    CaptionMatcher,
    items_from_captions,
    label_synonyms,
    plural_forms,
    read_captions,
)
from retclip.errors import InputError
from retclip.vocabulary import Vocabulary

VOCAB = Vocabulary.from_string(
    "car|automobile, cart, person|people, traffic light, light, bus, box, city, toy, glass"
)


def labels(caption: str) -> tuple[str, ...]:
    return CaptionMatcher(VOCAB).labels(caption)


@pytest.mark.parametrize(
    ("phrase", "plurals"),
    [
        ("car", ["cars"]),
        ("bus", ["buses"]),
        ("box", ["boxes"]),
        ("bench", ["benches"]),
        ("city", ["cities"]),
        ("toy", ["toys"]),
        ("traffic light", ["traffic lights"]),
        ("potato", ["potatos", "potatoes"]),
    ],
)
def test_plural_forms(phrase: str, plurals: list[str]) -> None:
    assert plural_forms(phrase) == plurals


def test_word_boundaries_cart_is_not_car() -> None:
    assert labels("A cart in the carpark.") == ("cart",)
    assert labels("Two carts next to a car") == ("car", "cart")
    assert labels("scarves and cartons") == ()


def test_synonyms_plurals_and_case() -> None:
    assert labels("PEOPLE waiting for Buses") == ("person", "bus")
    assert labels("three automobiles, some boxes and toys") == ("car", "box", "toy")
    assert labels("cities at night") == ("city",)
    assert labels("glasses on a table") == ("glass",)


def test_longest_form_wins() -> None:
    assert labels("traffic lights over the street") == ("traffic light",)
    assert labels("the light and the traffic  light") == ("traffic light", "light")


def test_builtin_vocabulary_plural_synonyms() -> None:
    ade = Vocabulary.builtin("ade20k-150")
    found = CaptionMatcher(ade).labels("Cars parked along streets under a sky")
    assert found == ("sky", "road, route", "car")
    assert label_synonyms(ade)["road, route"][:2] == ("road", "route")


def test_items_from_jsonl_and_csv(tmp_path) -> None:
    lines = [
        {"image": "a.jpg", "caption": "a car"},
        {"image": "b.jpg", "captions": ["nothing here", "still nothing"]},
        {"image": "a.jpg", "caption": "people"},
    ]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    items = items_from_captions(tmp_path / "c.jsonl", tmp_path / "img", VOCAB)
    assert [(i.source, i.labels) for i in items] == [
        (str(tmp_path / "img" / "a.jpg"), ("car", "person"))
    ]

    (tmp_path / "c.csv").write_text('image,caption\nx.png,"a bus, a box"\ny.png,a cart\n')
    items = items_from_captions(tmp_path / "c.csv", tmp_path, VOCAB)
    assert [i.labels for i in items] == [("bus", "box"), ("cart",)]


def test_bad_caption_files(tmp_path) -> None:
    with pytest.raises(InputError, match="not found"):
        read_captions(tmp_path / "missing.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"image": "a.jpg"\n')
    with pytest.raises(InputError, match="line 1"):
        read_captions(tmp_path / "bad.jsonl")
    (tmp_path / "wrong.jsonl").write_text('{"image": 3, "caption": "car"}\n')
    with pytest.raises(InputError, match="line 1"):
        read_captions(tmp_path / "wrong.jsonl")
    (tmp_path / "cols.csv").write_text("file,text\na.jpg,car\n")
    with pytest.raises(InputError, match="'image' and 'caption'"):
        read_captions(tmp_path / "cols.csv")
    (tmp_path / "none.jsonl").write_text('{"image": "a.jpg", "caption": "nothing"}\n')
    with pytest.raises(InputError, match="mentions"):
        items_from_captions(tmp_path / "none.jsonl", tmp_path, VOCAB)
