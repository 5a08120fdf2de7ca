"""The toy world: deterministic, disjoint splits, valid COCO panoptic files, sensible captions."""

from __future__ import annotations

import json

import numpy as np
from click.testing import CliRunner
from PIL import Image

from retclip.cli import cli
from retclip.datasets import CocoPanopticDataset
from retclip.images import SourceImage
from retclip.proposers.regions import RegionsProposer
from retclip.toyworld.dataset import toy_vocabulary
from retclip.toyworld.world import CATEGORIES, STUFF, THINGS, generate_scenes
from retclip.vocabulary import Vocabulary


def test_scenes_are_deterministic_and_splits_disjoint() -> None:
    a = generate_scenes("db", 5, seed=3)
    b = generate_scenes("db", 5, seed=3)
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b, strict=True))
    others = generate_scenes("val", 5, seed=3) + generate_scenes("train", 5, seed=3)
    hashes = {x.image.tobytes() for x in a}
    assert not hashes & {x.image.tobytes() for x in others}


def test_captions_name_the_scene() -> None:
    scenes = generate_scenes("train", 40, seed=0)
    for scene in scenes:
        names = {CATEGORIES[c] for _, c in scene.segments}
        stuff_named = {w for w in STUFF if w in scene.caption}
        if " on " in scene.caption:  # textures are named in about half of the captions
            assert {n for n in names if n in STUFF} <= stuff_named
        else:
            assert not stuff_named
        assert any(t in scene.caption for t in THINGS)
        assert scene.caption.startswith("a photo of ")
    assert 0.25 < np.mean([" on " in s.caption for s in scenes]) < 0.75


def test_generate_command_writes_a_coco_panoptic_dataset(tmp_path) -> None:
    result = CliRunner().invoke(
        cli, ["toyworld", "generate", "--out", str(tmp_path), "--split", "val", "--n", "4"]
    )
    assert result.exit_code == 0, result.output
    dataset = CocoPanopticDataset(tmp_path / "panoptic_val.json", tmp_path / "images")
    assert len(dataset) == 4
    assert dataset.vocabulary.names == toy_vocabulary().names
    data = json.loads((tmp_path / "panoptic_val.json").read_text())
    for i, info in enumerate(data["annotations"]):
        truth = dataset.annotation(i)
        assert [s["area"] for s in info["segments_info"]] == list(truth.masks.sum(axis=(1, 2)))
        assert not (truth.masks.sum(0) > 1).any()  # segments do not overlap
    captions = (tmp_path / "captions_val.jsonl").read_text().splitlines()
    assert len(captions) == 4 and json.loads(captions[0])["image"] == data["images"][0]["file_name"]
    image = Image.open(dataset.image_path(0))
    assert image.mode == "RGB" and image.size == (96, 96)


def test_regions_proposer_recovers_flat_regions() -> None:
    image = np.zeros((64, 64, 3), np.uint8)
    image[:, :32] = (200, 30, 30)
    image[:, 32:] = (30, 30, 200)
    image[20:40, 10:25] = (240, 240, 40)
    truth = np.zeros((3, 64, 64), bool)
    truth[0, :, :32] = True
    truth[1, :, 32:] = True
    truth[:2, 20:40, 10:25] = False
    truth[2, 20:40, 10:25] = True
    proposals = RegionsProposer().propose(SourceImage(image), Vocabulary.from_string("thing"))
    assert (proposals.masks.sum(0) <= 1).all()  # regions do not overlap
    inter = (truth[:, None] & proposals.masks[None]).sum((2, 3))
    union = (truth[:, None] | proposals.masks[None]).sum((2, 3))
    assert ((inter / union).max(1) > 0.8).all()  # each region found (blur leaves thin edges)
    assert proposals.class_hints is None


def test_the_serve_database_is_built_once_then_reused(tmp_path) -> None:
    from retclip.backbones import load_backbone
    from retclip.database import FeatureDatabase
    from retclip.toyworld.demo import SERVE_DATABASE, ensure_serve_database

    backbone = load_backbone("toy")
    path = ensure_serve_database(tmp_path, backbone, n=12, progress=False)
    assert path == tmp_path / "databases" / SERVE_DATABASE
    first = FeatureDatabase.open(path)
    assert len(first) > 12 and first.generation >= 1
    stamp = (path / "meta.json").stat().st_mtime_ns
    assert ensure_serve_database(tmp_path, backbone, n=12, progress=False) == path
    assert (path / "meta.json").stat().st_mtime_ns == stamp  # reused, not rebuilt
    labels = set(first.vocabulary().names)
    assert {"circle", "stripes"} <= labels
