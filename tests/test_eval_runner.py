"""Evaluation datasets, the per-image score cache and the scoring pass (no model involved)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from retclip.datasets import Ade20kPanoptic
from retclip.errors import InputError
from retclip.evaluation.cache import ScoreCache
from retclip.evaluation.datasets import DatasetSpec, EvalDataset
from retclip.evaluation.loop import run_model, score_cache, sweep_grid
from retclip.proposers.base import Proposals
from retclip.segmenter import MaskScores, Settings


def coco_spec(scenes) -> DatasetSpec:
    json_path, images = scenes["val"]
    return DatasetSpec(panoptic_json=str(json_path), images=str(images))


def perfect_scores(dataset: EvalDataset, index: int) -> tuple[np.ndarray, MaskScores]:
    """GT masks (non-crowd) with one-hot class scores: a perfect prediction."""
    gt = dataset.ground_truth(index)
    keep = ~gt.segments.iscrowd
    masks = gt.panoptic[None] == gt.segments.ids[keep][:, None, None]
    one_hot = torch.nn.functional.one_hot(
        torch.from_numpy(gt.segments.categories[keep]), len(dataset.vocabulary)
    ).float()
    kept = torch.ones(len(dataset.vocabulary), dtype=torch.bool)
    return masks, MaskScores(s_clip=one_hot, s_ret=1 - one_hot, s_iv=None, seen=None, kept=kept)


def fill_cache(dataset: EvalDataset, cache: ScoreCache) -> None:
    cache.open({"model": "perfect"})
    for index in range(len(dataset)):
        masks, scores = perfect_scores(dataset, index)
        proposals = Proposals(masks=masks, scores=np.ones(len(masks)))
        cache.save(dataset.stem(index), proposals, scores, dataset.vocabulary.names)


def test_ground_truth_from_panoptic(scenes) -> None:
    dataset = EvalDataset(coco_spec(scenes))
    gt = dataset.ground_truth(0)
    names = dataset.vocabulary.names
    assert gt.panoptic.shape == (48, 64) and gt.semantic.shape == (48, 64)
    for seg_id, cat in zip(gt.segments.ids, gt.segments.categories, strict=True):
        assert (gt.semantic[gt.panoptic == seg_id] == cat).all()
    things = [names[c] for c, _, _, _ in gt.instances]
    assert things and set(things) <= {"apple", "banana"}
    assert gt.segments.areas is not None and gt.segments.areas.sum() <= 48 * 64


def test_scoring_a_perfect_prediction(scenes, tmp_path) -> None:
    dataset = EvalDataset(coco_spec(scenes))
    cache = ScoreCache(tmp_path / "cache")
    fill_cache(dataset, cache)
    grid = sweep_grid(Settings(), [0.4], [0.7], [0.0, 1.0])
    perfect, inverted = score_cache(
        dataset, range(len(dataset)), cache, dataset.vocabulary, grid, progress=False
    )
    good, _ = perfect.metrics()
    bad, _ = inverted.metrics()  # γ = 1: only s_ret = 1 − one-hot, every class wrong
    for key in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st", "mIoU", "pAcc", "mAP", "AP50"):
        assert good[key] == pytest.approx(100.0), key
    assert bad["PQ"] == 0.0 and bad["mIoU"] < 50


def test_cache_round_trip_and_stale_cache(scenes, tmp_path) -> None:
    dataset = EvalDataset(coco_spec(scenes))
    cache = ScoreCache(tmp_path / "cache")
    fill_cache(dataset, cache)
    masks, scores = perfect_scores(dataset, 1)
    proposals, loaded = cache.load(dataset.stem(1))
    assert (proposals.masks == masks).all()
    assert torch.equal(loaded.s_clip, scores.s_clip) and loaded.s_iv is None
    cache.open({"model": "perfect"})  # same description: fine
    with pytest.raises(InputError, match="another model"):
        cache.open({"model": "other"})
    (cache.directory / f"{dataset.stem(2)}.npz").write_bytes(b"garbage")
    with pytest.raises(InputError, match="unreadable"):
        cache.load(dataset.stem(2))


def test_run_model_skips_cached_images(scenes, tmp_path) -> None:
    dataset = EvalDataset(coco_spec(scenes))
    cache = ScoreCache(tmp_path / "cache")
    fill_cache(dataset, cache)
    built = []

    def make_segmenter():
        built.append(1)
        raise AssertionError("no model should be needed")

    assert run_model(dataset, range(4), cache, make_segmenter, dataset.vocabulary) == 0
    assert built == []


def make_ade20k(scenes, root: Path) -> Path:
    """An ADEChallengeData2016 folder in Mask2Former's layout from the synthetic scenes."""
    json_path, images = scenes["val"]
    ade = root / "ADEChallengeData2016"
    shutil.copytree(images, ade / "images" / "validation")
    shutil.copytree(json_path.with_suffix(""), ade / "ade20k_panoptic_val")
    shutil.copy(json_path, ade / "ade20k_panoptic_val.json")
    semantic = ade / "annotations_detectron2" / "validation"
    semantic.mkdir(parents=True)
    data = json.loads(json_path.read_text())
    for image in data["images"]:
        labels = np.full((48, 64), 255, dtype=np.uint8)
        labels[:8] = 2  # index of "sky"
        Image.fromarray(labels).save(semantic / image["file_name"])
    instances = {
        "images": [
            {"id": 100 + i["id"], "file_name": i["file_name"], "height": 48, "width": 64}
            for i in data["images"]
        ],
        "annotations": [
            {"id": 1, "image_id": 100, "category_id": 7, "iscrowd": 0, "area": 64,
             "bbox": [0, 0, 8, 8], "segmentation": [[0, 0, 8, 0, 8, 8, 0, 8]]}
        ],
        "categories": [{"id": 7, "name": "Banana"}],
    }  # fmt: skip
    (ade / "ade20k_instance_val.json").write_text(json.dumps(instances))
    return ade


def test_ade20k_layout(scenes, tmp_path) -> None:
    ade = make_ade20k(scenes, tmp_path)
    assert Ade20kPanoptic(ade).semantic_dir == ade / "annotations_detectron2" / "validation"
    dataset = EvalDataset(DatasetSpec(kind="ade20k", root=str(ade)))
    first = dataset.select(image_ids=[dataset.stem(0)])[0]
    gt = dataset.ground_truth(first)
    assert (gt.semantic[:8] == 2).all() and (gt.semantic[8:] == 255).all()  # read, not derived
    (instance,) = gt.instances  # from the instance JSON, category matched by name
    assert dataset.vocabulary.names[instance[0]] == "banana" and instance[3] == 64
    assert dataset.ground_truth(1).instances == []
    (ade / "ade20k_panoptic_val.json").unlink()
    with pytest.raises(InputError, match=r"ade20k_panoptic_val\.json"):
        EvalDataset(DatasetSpec(kind="ade20k", root=str(ade)))


def test_dataset_choices_match_the_command_line() -> None:
    from retclip.cli.eval import DATASET_CHOICES
    from retclip.evaluation.datasets import DATASET_KINDS

    assert DATASET_CHOICES == DATASET_KINDS


def test_selection_errors(scenes) -> None:
    dataset = EvalDataset(coco_spec(scenes))
    assert dataset.select(limit=2) == [0, 1]
    assert dataset.select(image_ids=["3", dataset.stem(1)]) == [1, 3]
    with pytest.raises(InputError, match="nope"):
        dataset.select(image_ids=["nope"])
    with pytest.raises(InputError, match="--limit"):
        dataset.select(limit=0)
    with pytest.raises(InputError, match="not found"):
        EvalDataset(DatasetSpec(panoptic_json="/nonexistent/x.json", images="/nonexistent"))
