"""The paper's training-free pipeline end to end through the command line, on tiny random
models of the real architectures (CLIP ViT, Grounding DINO, SAM) loaded from local folders."""

from __future__ import annotations

import json

import numpy as np
from click.testing import CliRunner
from PIL import Image

from retclip.cli import cli
from tiny_detectors import save_grounding_dino, save_sam
from tiny_models import save_tiny_clip


def test_db_build_and_segment_with_clip_and_grounded_sam(scenes, tmp_path) -> None:
    clip = save_tiny_clip(tmp_path / "clip")
    models = [
        "--backbone", str(clip), "--proposer", "grounded-sam",
        "--detector", str(save_grounding_dino(tmp_path / "gd")),
        "--sam", str(save_sam(tmp_path / "sam")),
        "--box-threshold", "0", "--text-threshold", "0", "--min-mask-area", "0",
    ]  # fmt: skip
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(images / f"{i}.png")
    (tmp_path / "labels.json").write_text(json.dumps({"0.png": ["cat", "dog"], "1.png": ["tree"]}))

    runner = CliRunner()
    build = runner.invoke(
        cli,
        ["db", "build", str(tmp_path / "db"), "--labels", str(tmp_path / "labels.json"),
         "--images", str(images), *models],
    )  # fmt: skip
    assert build.exit_code == 0, build.output
    info = json.loads(runner.invoke(cli, ["db", "info", str(tmp_path / "db"), "--json"]).output)
    assert info["rows"] > 0 and set(info["rows_per_class"]) <= {"cat", "dog", "tree"}
    assert info["fingerprint"]["model_id"] == str(clip)

    # a COCO-panoptic dataset used only for its image-level tags: rows carry each image's tags
    json_path, scene_images = scenes["db"]
    tags = runner.invoke(
        cli,
        ["db", "build", str(tmp_path / "tags_db"), "--coco-panoptic", str(json_path),
         "--images", str(scene_images), "--limit", "2", *models],
    )  # fmt: skip
    assert tags.exit_code == 0, tags.output
    from retclip.database import FeatureDatabase
    from retclip.datasets import CocoPanopticDataset

    dataset = CocoPanopticDataset(json_path, scene_images)
    expected = {str(dataset.image_path(i)): set(dataset.image_labels(i)) for i in range(2)}
    db = FeatureDatabase.open(tmp_path / "tags_db")
    sources = db.provenance()["sources"]
    labels = [db.labels[i].name for i in db.label_ids()]
    assert len(labels) > 0
    assert all(label in expected[source] for source, label in zip(sources, labels, strict=True))

    segment = runner.invoke(
        cli,
        ["segment", str(images / "0.png"), "--classes", "cat, dog, tree", "--db",
         str(tmp_path / "db"), "--out", str(tmp_path / "out"), *models],
    )  # fmt: skip
    assert segment.exit_code == 0, segment.output
    written = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"0_panoptic.png", "0_panoptic.json", "0_semantic.png", "0_instances.json"} <= written
    scores = np.load(tmp_path / "out" / "0_scores.npz")
    assert scores["s_ret"].shape == scores["s_clip"].shape and scores["s_clip"].shape[1] == 3
