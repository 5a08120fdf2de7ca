"""The command line: end to end, and one clear line for every bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result
from PIL import Image

from retclip.cli import cli

CLASSES = "apple, banana, sky, grass"


def rgb_ids(png: Path) -> np.ndarray:
    """Segment ids of a COCO panoptic PNG, decoded here independently of retclip.outputs."""
    rgb = np.asarray(Image.open(png).convert("RGB")).astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def run(*args: object) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def assert_error(result: Result, *words: str) -> None:
    """Exit 1 with a single ``Error: ...`` line naming each of ``words``, no traceback."""
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for word in words:
        assert word in lines[0], lines[0]
    assert "Traceback" not in result.output


@pytest.fixture(scope="module")
def cli_db(scenes, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "db"
    json_path, images = scenes["db"]
    result = run(
        "db", "build", path, "--coco-panoptic", json_path, "--images", images, "--backbone", "color"
    )
    assert result.exit_code == 0, result.output
    assert "added" in result.output
    return path


def segment_args(scenes, db: Path, out: Path, *images: object) -> list[object]:
    json_path, image_dir = scenes["val"]
    first = sorted(image_dir.iterdir())[0]
    return [
        "segment",
        *(images or (first,)),
        "--classes",
        CLASSES,
        "--backbone",
        "color",
        "--proposer",
        "gt",
        "--gt",
        json_path,
        "--db",
        db,
        "--out",
        out,
    ]


def test_segment_end_to_end(scenes, cli_db, tmp_path) -> None:
    json_path, image_dir = scenes["val"]
    # retrieval only: the colour backbone's text tower does not know these class names
    result = run(*segment_args(scenes, cli_db, tmp_path / "out"), "--gamma", "1.0")
    assert result.exit_code == 0, result.output
    stem = sorted(image_dir.iterdir())[0].stem
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    suffixes = ("panoptic.png", "panoptic.json", "semantic.png", "instances.json", "overlay.png")
    assert written == sorted(
        [*(f"{stem}_{s}" for s in (*suffixes, "scores.npz")), "manifest.jsonl"]
    )
    (line,) = (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()
    record = json.loads(line)
    assert record["status"] == "ok" and record["image"].endswith(f"{stem}.png")
    assert len(record["outputs"]) == 6 and all(Path(p).is_file() for p in record["outputs"])
    # the expected panoptic result: the ground-truth partition with the ground-truth categories
    truth = json.loads(Path(json_path).read_text())
    gt_segments = truth["annotations"][0]["segments_info"]
    gt_ids = rgb_ids(json_path.with_suffix("") / f"{stem}.png")
    pred_ids = rgb_ids(tmp_path / "out" / f"{stem}_panoptic.png")
    info = json.loads((tmp_path / "out" / f"{stem}_panoptic.json").read_text())
    name_of = {s["id"]: s["category_name"] for s in info["segments_info"]}
    gt_name = {c["id"]: c["name"] for c in truth["categories"]}
    for segment in gt_segments:
        (pred_id,) = np.unique(pred_ids[gt_ids == segment["id"]])
        assert name_of[int(pred_id)] == gt_name[segment["category_id"]]
    instances = json.loads((tmp_path / "out" / f"{stem}_instances.json").read_text())
    things = [s for s in gt_segments if s["category_id"] in (1, 2)]
    assert len(instances) >= len(things)


def test_db_info_remove_merge(cli_db, tmp_path) -> None:
    result = run("db", "info", cli_db, "--json")
    assert result.exit_code == 0
    info = json.loads(result.output)
    assert {"rows", "rows_per_class", "dim", "fingerprint"} <= set(info)
    assert set(info["rows_per_class"]) == {"apple", "banana", "sky", "grass"}
    assert info["dim"] == 12 and info["fingerprint"]["model_id"] == "retclip/color"
    assert "apple" in run("db", "info", cli_db).output
    copy = tmp_path / "copy"
    assert run("db", "merge", copy, cli_db, cli_db).exit_code == 0
    assert json.loads(run("db", "info", copy, "--json").output)["rows"] == 2 * info["rows"]
    result = run("db", "remove", copy, "--class", "sky")
    assert result.exit_code == 0 and "removed" in result.output
    after = json.loads(run("db", "info", copy, "--json").output)
    assert "sky" not in after["rows_per_class"]
    assert_error(run("db", "remove", copy, "--class", "unicorn"), "unicorn")
    assert run("db", "index", copy, "hnsw").exit_code == 0
    assert "hnsw" in json.dumps(json.loads(run("db", "info", copy, "--json").output)["index"])


def test_image_modes_are_converted(scenes, cli_db, tmp_path) -> None:
    _, image_dir = scenes["val"]
    source = sorted(image_dir.iterdir())[0]
    rgb = Image.open(source).convert("RGB")
    variants = tmp_path / "variants"
    variants.mkdir()
    # same stem as the annotated image, so the ground-truth proposer finds its masks
    for mode, suffix in (("L", "png"), ("RGBA", "png"), ("P", "png"), ("I;16", "png")):
        folder = variants / mode.replace(";", "")
        folder.mkdir()
        if mode == "I;16":
            gray = np.asarray(rgb.convert("L")).astype(np.uint16) * 257
            image = Image.fromarray(gray)
        else:
            image = rgb.convert(mode)
        image.save(folder / f"{source.stem}.{suffix}")
        result = run(*segment_args(scenes, cli_db, tmp_path / mode, folder / f"{source.stem}.png"))
        assert result.exit_code == 0, (mode, result.output)


def test_bad_inputs_give_one_line(scenes, cli_db, tmp_path) -> None:
    out = tmp_path / "out"
    missing = tmp_path / "nope.png"
    assert_error(run(*segment_args(scenes, cli_db, out, missing)), str(missing))
    _, image_dir = scenes["val"]
    corrupt_dir = tmp_path / "corrupt"
    corrupt_dir.mkdir()
    corrupt = corrupt_dir / f"{sorted(image_dir.iterdir())[0].stem}.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    assert_error(run(*segment_args(scenes, cli_db, out, corrupt)), str(corrupt))
    assert not out.exists() or not any(out.iterdir())  # no partial output files

    args = segment_args(scenes, cli_db, out)
    classes_at = args.index("--classes") + 1
    for bad, word in ((" , ", "empty"), ("apple, apple", "apple"), ("a,,b", "empty")):
        args[classes_at] = bad
        assert_error(run(*args), word)
    args[classes_at] = CLASSES

    db_at = args.index("--db") + 1
    args[db_at] = tmp_path / "no-db"
    assert_error(run(*args), str(tmp_path / "no-db"))
    broken = tmp_path / "broken-db"
    shutil.copytree(cli_db, broken)
    (broken / "meta.json").write_text("{ truncated")
    args[db_at] = broken
    assert_error(run(*args), "meta.json")
    args[db_at] = cli_db

    a_file = tmp_path / "file"
    a_file.write_text("")
    out_at = args.index("--out") + 1
    args[out_at] = a_file / "sub"
    assert_error(run(*args), str(a_file))
    args[out_at] = out

    backbone_at = args.index("--backbone") + 1
    args[backbone_at] = "nope"
    assert_error(run(*args), "nope", "color")


def test_fingerprint_mismatch_is_refused(scenes, tmp_path) -> None:
    db = tmp_path / "db"
    json_path, images = scenes["db"]
    run("db", "build", db, "--coco-panoptic", json_path, "--images", images, "--backbone", "color")
    meta = json.loads((db / "meta.json").read_text())
    meta["fingerprint"]["input_resolution"] = 4
    (db / "meta.json").write_text(json.dumps(meta))
    result = run(*segment_args(scenes, db, tmp_path / "out"))
    assert result.exit_code == 1 and "Error:" in result.output and "Traceback" not in result.output


def test_vocab_command_counts_seen_classes() -> None:
    result = run("vocab", "ade20k-150", "--train-vocab", "coco-panoptic-133")
    assert result.exit_code == 0
    assert result.output.strip().splitlines()[-1].startswith("64 of 150")


def test_console_script_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "retclip", "db", "build", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "--coco-panoptic" in result.stdout


def test_models_command_lists_backbones_and_proposer_models() -> None:
    result = run("models")
    assert result.exit_code == 0
    for name in (
        "clip-b16",
        "clip-l14",
        "convnext-l",
        "rn50x64",
        "grounding-dino-base",
        "sam-vit-base",
    ):
        assert name in result.output
    listed = json.loads(run("models", "--kind", "backbone", "--json").output)
    assert {m["kind"] for m in listed} == {"backbone"}


def test_segment_with_the_weight_free_regions_proposer(scenes, tmp_path) -> None:
    _, image_dir = scenes["val"]
    image = sorted(image_dir.iterdir())[0]
    result = run(
        "segment", image, "--classes", "red, yellow, blue, green", "--backbone", "color",
        "--proposer", "regions", "--out", tmp_path,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / f"{image.stem}_panoptic.json").read_text())
    assert {"blue", "green"} <= {s["category_name"] for s in info["segments_info"]}


def test_db_build_source_errors(scenes, tmp_path) -> None:
    json_path, images = scenes["db"]
    base = ["db", "build", tmp_path / "db", "--backbone", "color", "--images", images]
    assert_error(run(*base), "--coco-panoptic", "--labels", "--captions")
    captions = tmp_path / "captions.jsonl"
    captions.write_text('{"image": "x.png", "caption": "an apple"}\n')
    assert_error(run(*base, "--captions", captions, "--proposer", "gt"), "--vocab")
    assert_error(run(*base, "--labels", captions), "--proposer")
    assert_error(run(*base, "--coco-panoptic", json_path, "--proposer", "regions"), "regions")


def test_a_dataset_used_only_for_its_image_tags(scenes) -> None:
    from retclip.database.build import items_from_dataset
    from retclip.datasets import CocoPanopticDataset

    dataset = CocoPanopticDataset(*scenes["db"])
    items = items_from_dataset(dataset, image_labels=True)
    names = dataset.vocabulary.names
    for i, item in enumerate(items):
        present = {names[c] for c in dataset.annotation(i).categories}
        assert set(item.labels) == present and list(item.labels) == sorted(present, key=names.index)


def test_a_failed_db_build_leaves_no_database_behind(scenes, tmp_path, monkeypatch) -> None:
    json_path, images = scenes["db"]
    base = ["db", "build", tmp_path / "new", "--coco-panoptic", json_path, "--images", images]
    for extra, message in [
        (["--backbone", "color", "--batch-size", "0"], "--batch-size must be >= 1"),
        (["--backbone", "color", "--index", "ivf-pq:pq_m=7"], "must divide the feature dimension"),
    ]:
        result = run(*base, *extra)
        assert result.exit_code == 1 and message in result.output, result.output
        assert not (tmp_path / "new").exists()
    # a failure after creation (here: in the first batch) removes the new, empty database
    from retclip.errors import InputError

    def broken(*args, **kwargs):
        raise InputError("unknown category in the first batch")

    monkeypatch.setattr("retclip.database.build.build_database", broken)
    result = run(*base, "--backbone", "color")
    assert result.exit_code == 1 and "unknown category" in result.output
    assert not (tmp_path / "new").exists()


def test_a_bad_image_among_good_ones_writes_nothing_and_leaves_no_folder(
    scenes, cli_db, tmp_path
) -> None:
    _, image_dir = scenes["val"]
    good = sorted(image_dir.iterdir())[0]
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    out = tmp_path / "out"
    result = run(*segment_args(scenes, cli_db, out, good, bad))
    assert_error(result, str(bad))
    assert not out.exists()  # not even an empty folder
    # a failure after the folder was made (an unknown backbone) removes it again
    args = segment_args(scenes, cli_db, out)
    args[args.index("--backbone") + 1] = "nope"
    assert_error(run(*args), "nope")
    assert not out.exists()


@pytest.mark.parametrize(
    ("extra", "word"),
    [
        (["-k", "0"], "k"),
        (["-k", "-5"], "k"),
        (["-k", "99999999999999999999"], "k"),
        (["--score-threshold", "nan"], "score_threshold"),
        (["--alpha", "inf"], "alpha"),
        (["--gamma", "nan"], "gamma"),
        (["--overlap-threshold", "-1"], "overlap_threshold"),
        (["--resolution", "-5"], "resolution"),
        (["--resolution", "0"], "resolution"),
    ],
)
def test_bad_option_values_are_one_error_line(scenes, cli_db, tmp_path, extra, word) -> None:
    out = tmp_path / "out"
    result = run(*segment_args(scenes, cli_db, out), *extra)
    assert_error(result, word)
    assert not out.exists()


def test_a_huge_k_is_clamped_not_allocated(scenes, cli_db, tmp_path) -> None:
    result = run(*segment_args(scenes, cli_db, tmp_path / "out"), "-k", "1000000000")
    assert result.exit_code == 0, result.output


def test_serve_with_an_unknown_backbone_is_one_error_line(tmp_path) -> None:
    result = run("serve", "--backbone", "nosuch", "--data-dir", tmp_path / "d", "--port", "0")
    assert_error(result, "nosuch")


def test_an_error_starts_on_its_own_line_after_a_progress_bar() -> None:
    import click
    from tqdm import tqdm

    from retclip.cli.options import CleanErrorsCommand
    from retclip.errors import InputError

    @click.command(cls=CleanErrorsCommand)
    def failing() -> None:
        bar = tqdm(total=3, desc="work", file=sys.stderr)
        bar.update(1)
        raise InputError("broken input")

    result = CliRunner().invoke(failing, [])
    assert result.exit_code == 1
    assert any(line.startswith("Error: broken input") for line in result.output.splitlines())


def test_db_add_to_a_read_only_database_fails_before_any_model_pass(
    scenes, cli_db, tmp_path, monkeypatch
) -> None:
    """On a read-only mount `db add` with images to add stops with one Error line before the
    models run (it used to fail at its first commit, after a batch of model passes). Skipped
    where bind mounts are not permitted."""
    from retclip.database import build

    source = tmp_path / "db"
    shutil.copytree(cli_db, source)
    target = tmp_path / "ro"
    target.mkdir()
    mount = subprocess.run(["mount", "--bind", str(source), str(target)], capture_output=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {mount.stderr.decode().strip()}")
    passes: list[int] = []
    real_batch_rows = build.batch_rows
    monkeypatch.setattr(
        build, "batch_rows", lambda *a, **k: passes.append(1) or real_batch_rows(*a, **k)
    )
    json_path, images = scenes["val"]  # images the database does not hold yet
    add = ["db", "add", target, "--coco-panoptic", json_path, "--images", images]
    try:
        remount = ["mount", "-o", "remount,ro,bind", str(target)]
        assert subprocess.run(remount, capture_output=True).returncode == 0
        assert_error(run(*add, "--backbone", "color"), "cannot write to feature database", "ro")
        assert passes == []
    finally:
        subprocess.run(["umount", str(target)], check=True)
    result = run("db", "add", source, *add[3:], "--backbone", "color")  # writable: it adds
    assert result.exit_code == 0, result.output
    assert passes and not list(source.glob(".write-probe*"))
