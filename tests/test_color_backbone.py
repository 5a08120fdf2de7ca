from __future__ import annotations

import torch

from retclip.backbones import ColorBackbone, load_backbone
from retclip.backbones.color import COLOUR_PROTOTYPES
from retclip.errors import InputError


def test_red_region_matches_the_word_red() -> None:
    backbone = ColorBackbone()
    image = torch.zeros(1, 3, 32, 32)
    image[0, :, :, :16] = torch.tensor([220.0, 40, 40])[:, None, None]
    image[0, :, :, 16:] = torch.tensor([40.0, 70, 210])[:, None, None]
    features = backbone.encode_images(image)
    assert features.shape == (1, backbone.dim, 4, 4)
    names = list(COLOUR_PROTOTYPES)
    assert features[0, :, 0, 0].argmax() == names.index("red")
    assert features[0, :, 0, 3].argmax() == names.index("blue")
    texts = torch.nn.functional.normalize(backbone.encode_texts(["a red thing", "blue"]), dim=-1)
    cell = torch.nn.functional.normalize(features[0, :, 0, 0], dim=0)
    assert (texts @ cell).argmax() == 0


def test_unknown_words_get_fixed_vectors() -> None:
    backbone = ColorBackbone()
    a, b = backbone.encode_texts(["apple", "apple"])
    assert torch.equal(a, b) and a.abs().sum() > 0


def test_registry() -> None:
    assert isinstance(load_backbone("color"), ColorBackbone)
    try:
        load_backbone("nope")
    except InputError as exc:
        assert "nope" in str(exc) and "color" in str(exc)
    else:  # pragma: no cover
        raise AssertionError("unknown backbone accepted")
