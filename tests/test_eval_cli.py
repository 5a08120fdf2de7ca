"""``retclip eval`` / ``retclip sweep`` end to end on the synthetic scenes: files in, tables out,
resume after an interruption, re-scoring and sweeps from the cache with no model pass."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result
from PIL import Image

import retclip.segmenter
from retclip.cli import cli
from retclip.cli.eval import eval_command, sweep_command
from retclip.evaluation.report import METRIC_KEYS
from test_panoptic_quality import CHECK_TARGET, check_case

REQUIRED = (
    *("PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st"),
    *("mIoU", "pAcc", "mAP"),
)


def invoke(command, *args: object) -> Result:
    return CliRunner().invoke(command, [str(a) for a in args], catch_exceptions=False)


def assert_error(result: Result, *words: str) -> None:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture(scope="module")
def eval_db(scenes, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("eval") / "db"
    json_path, images = scenes["db"]
    result = invoke(
        cli, "db", "build", path, "--coco-panoptic", json_path, "--images", images,
        "--backbone", "color",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return path


def dataset_args(scenes) -> list[object]:
    json_path, images = scenes["val"]
    return ["--panoptic-json", json_path, "--images", images, "--no-progress"]


def count_calls(monkeypatch, fail_at: int | None = None) -> list[int]:
    """Count segmenter passes; raise KeyboardInterrupt (a kill) on pass number ``fail_at``."""
    calls: list[int] = []
    original = retclip.segmenter.Segmenter.__call__

    def wrapped(self, *args, **kwargs):
        calls.append(1)
        if fail_at is not None and len(calls) == fail_at:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(retclip.segmenter.Segmenter, "__call__", wrapped)
    return calls


def forbid_model(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(retclip.segmenter, "load_backbone", refuse)


def test_eval_resume_rescore_and_sweep(scenes, eval_db, tmp_path, monkeypatch) -> None:
    out = tmp_path / "out"
    args = [*dataset_args(scenes), "--backbone", "color", "--db", eval_db, "--out", out]
    calls = count_calls(monkeypatch, fail_at=3)
    assert_error(invoke(eval_command, *args, "--gamma", "1.0"), "interrupted")
    assert len(list((out / "cache").glob("*.npz"))) == 2  # two images committed, none partial
    assert not (out / "metrics.json").exists()

    calls = count_calls(monkeypatch)
    result = invoke(eval_command, *args, "--gamma", "1.0")
    assert result.exit_code == 0, result.output
    assert len(calls) == 2 and "segmented 2 images, 2 taken from" in result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(REQUIRED) <= set(metrics) and "seen" not in metrics
    assert metrics["images"] == 4 and metrics["run"]["settings"]["gamma"] == 1.0
    for key in ("PQ", "mIoU", "mAP"):  # retrieval knows the scenes' classes
        assert metrics[key] == pytest.approx(100.0), key
    table = (out / "metrics.md").read_text()
    assert "| Method | Backbone | Database | PQ | mAP | mIoU |" in table
    assert "| RetCLIP | color | db | 1.000 | 1.000 | 1.000 |" in table and table in result.output
    with open(out / "per_class.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["name"] for r in rows] == ["apple", "banana", "sky", "grass"]
    assert all(float(r["PQ"]) == 100.0 for r in rows)

    forbid_model(monkeypatch)
    calls = count_calls(monkeypatch)
    result = invoke(eval_command, *args, "--gamma", "0.0")  # CLIP only: the names are unknown
    assert result.exit_code == 0, result.output
    assert calls == [] and "segmented 0 images" in result.output
    clip_only = json.loads((out / "metrics.json").read_text())
    assert clip_only["PQ"] < 50 and clip_only["run"]["settings"]["gamma"] == 0.0

    result = invoke(
        sweep_command,
        out / "cache",
        "--gamma",
        "0,0.3,1",
        "--no-progress",
        "--out",
        tmp_path / "sw",
    )
    assert result.exit_code == 0, result.output
    assert calls == []
    assert "| α | β | γ | PQ | PQ_th | PQ_st | mAP | mIoU |" in result.output
    assert "| 0.4 | 0.7 | 1.0 | **1.000** |" in result.output
    assert "best PQ: alpha=0.4 beta=0.7 gamma=1.0" in result.output
    sweep = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert [r["gamma"] for r in sweep["rows"]] == [0.0, 0.3, 1.0]
    assert sweep["rows"][0]["PQ"] == pytest.approx(clip_only["PQ"])

    other_db = [*dataset_args(scenes), "--backbone", "color", "--out", out]  # no --db
    assert_error(invoke(eval_command, *other_db), "cache", "another model")


def test_config_file_seen_unseen_and_flag_precedence(scenes, eval_db, tmp_path) -> None:
    train = tmp_path / "train.txt"
    train.write_text("apple\nsky ; stuff\n")
    config = tmp_path / "eval.json"
    config.write_text(json.dumps({"gamma": 1.0, "train-vocab": str(train), "backbone": "color"}))
    out = tmp_path / "out"
    args = [*dataset_args(scenes), "--db", eval_db, "--config", config, "--out", out]
    assert invoke(eval_command, *args).exit_code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["run"]["settings"]["gamma"] == 1.0
    for part in ("seen", "unseen"):
        assert set(METRIC_KEYS) <= set(metrics[part])
    assert metrics["seen"]["n"] == 2 and metrics["unseen"]["n"] == 2
    assert "| seen |" in (out / "metrics.md").read_text()
    assert invoke(eval_command, *args, "--gamma", "0.5").exit_code == 0  # the flag wins
    assert json.loads((out / "metrics.json").read_text())["run"]["settings"]["gamma"] == 0.5
    config.write_text(json.dumps({"gama": 1.0}))
    assert_error(invoke(eval_command, *args), "unknown option 'gama'")


def test_predictions_from_segment_outputs_score_like_eval(scenes, eval_db, tmp_path) -> None:
    json_path, images = scenes["val"]
    segment = invoke(
        cli, "segment", *sorted(images.iterdir()), "--classes", "apple, banana, sky, grass",
        "--backbone", "color", "--proposer", "gt", "--gt", json_path, "--db", eval_db,
        "--gamma", "0.3", "--out", tmp_path / "seg",
    )  # fmt: skip
    assert segment.exit_code == 0, segment.output
    common = dataset_args(scenes)
    scored = invoke(
        eval_command, *common, "--predictions", tmp_path / "seg", "--out", tmp_path / "a"
    )
    assert scored.exit_code == 0, scored.output
    model = invoke(
        eval_command, *common, "--backbone", "color", "--db", eval_db, "--gamma", "0.3",
        "--out", tmp_path / "b",
    )  # fmt: skip
    assert model.exit_code == 0, model.output
    a = json.loads((tmp_path / "a" / "metrics.json").read_text())
    b = json.loads((tmp_path / "b" / "metrics.json").read_text())
    for key in METRIC_KEYS:
        assert a[key] == pytest.approx(b[key], nan_ok=True), key
    assert 0 < a["PQ"] < 100  # a mixed result, so the comparison says something


def write_check_case(root: Path) -> tuple[Path, Path, Path]:
    """mmdetection's PQ check case as files: GT dataset and COCO-format predictions."""
    gt, gt_info, pred, pred_info = check_case()
    (root / "images").mkdir(parents=True)
    (root / "gt").mkdir()
    (root / "pred").mkdir()
    Image.fromarray(np.zeros((60, 80, 3), np.uint8)).save(root / "images" / "fake_name1.png")
    for folder, ids in (("gt", gt), ("pred", pred)):
        rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)
        Image.fromarray(rgb).save(root / folder / "fake_name1.png")
    names = [("person", 1), ("cat", 1), ("dog", 1), ("wall", 0)]
    categories = [{"id": i, "name": n, "isthing": t} for i, (n, t) in enumerate(names)]
    gt_segments = [
        {"id": int(i), "category_id": int(c), "iscrowd": 0, "area": int(a)}
        for i, c, a in zip(gt_info.ids, gt_info.categories, gt_info.areas, strict=True)
    ]
    image = {"id": 0, "file_name": "fake_name1.png", "height": 60, "width": 80}
    gt_json = root / "gt.json"
    annotation = {"image_id": 0, "file_name": "fake_name1.png", "segments_info": gt_segments}
    gt_json.write_text(
        json.dumps({"images": [image], "categories": categories, "annotations": [annotation]})
    )
    pred_segments = [
        {"id": int(i), "category_id": int(c)}
        for i, c in zip(pred_info.ids, pred_info.categories, strict=True)
    ]
    annotation = {"image_id": 0, "file_name": "fake_name1.png", "segments_info": pred_segments}
    (root / "pred.json").write_text(json.dumps({"annotations": [annotation]}))
    return gt_json, root / "images", root / "pred"


def test_predictions_in_coco_format_reproduce_the_check_case(tmp_path) -> None:
    gt_json, images, pred = write_check_case(tmp_path)
    result = invoke(
        eval_command, "--panoptic-json", gt_json, "--images", images, "--panoptic-dir",
        tmp_path / "gt", "--predictions", pred, "--out", tmp_path / "out", "--no-progress",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    for key, value in CHECK_TARGET.items():
        assert metrics[key] == pytest.approx(value, rel=1e-12), key
    assert metrics["mAP"] is None  # no instance results given


def test_errors_are_one_line(scenes, tmp_path) -> None:
    _, images = scenes["val"]
    missing = tmp_path / "missing.json"
    assert_error(
        invoke(eval_command, "--panoptic-json", missing, "--images", images, "--backbone",
               "color", "--out", tmp_path / "o"),
        str(missing),
    )  # fmt: skip
    assert_error(invoke(eval_command, *dataset_args(scenes), "--out", tmp_path / "o"), "--backbone")
    assert_error(
        invoke(eval_command, *dataset_args(scenes), "--predictions", tmp_path / "none",
               "--out", tmp_path / "o"),
        "predictions folder not found",
    )  # fmt: skip
    assert_error(invoke(sweep_command, tmp_path / "nocache"), "no evaluation cache")
    assert_error(
        invoke(eval_command, *dataset_args(scenes), "--backbone", "color", "--limit", "0",
               "--out", tmp_path / "o"),
        "--limit",
    )  # fmt: skip
