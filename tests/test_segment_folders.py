"""``retclip segment`` over folders and globs: a manifest line per image, one bad file never
stops the run, a killed run resumes, and ``--vocab db`` takes the database's labels."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

import retclip.segmenter
from retclip.cli import cli
from retclip.database import FeatureDatabase

MODEL = ["--backbone", "color", "--proposer", "regions", "--classes", "apple, sky, grass"]


def run(*args: object) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


@pytest.fixture()
def folder(scenes, tmp_path) -> Path:
    """Three scene images, a file that only looks like an image, a text file, a sub-folder."""
    _, images = scenes["val"]
    root = tmp_path / "photos"
    root.mkdir()
    for path in sorted(images.iterdir())[:3]:
        shutil.copy(path, root / path.name)
    (root / "broken.png").write_bytes(b"not a png")
    (root / "notes.txt").write_text("ignored")
    (root / "sub").mkdir()
    shutil.copy(sorted(images.iterdir())[3], root / "sub" / "deep.png")
    return root


def count_calls(monkeypatch) -> list[str]:
    calls: list[str] = []
    original = retclip.segmenter.Segmenter.segment_batch

    def wrapped(self, images, classes, *args, **kwargs):
        calls.extend(str(source) for source in kwargs.get("sources"))
        return original(self, images, classes, *args, **kwargs)

    monkeypatch.setattr(retclip.segmenter.Segmenter, "segment_batch", wrapped)
    return calls


def test_a_folder_with_a_bad_file_is_segmented_and_the_manifest_says_so(folder, tmp_path):
    out = tmp_path / "out"
    result = run("segment", folder, *MODEL, "--out", out)
    assert result.exit_code == 0, result.output
    records = {Path(r["image"]).name: r for r in manifest(out)}
    assert set(records) == {p.name for p in folder.glob("*.png")}  # not notes.txt, not sub/
    assert records["broken.png"]["status"] == "error"
    assert "broken.png" in records["broken.png"]["error"]
    for name, record in records.items():
        if name != "broken.png":
            assert record["status"] == "ok" and record["segments"] >= 1 and record["seconds"] >= 0
            assert all(Path(p).is_file() for p in record["outputs"])
    assert "1 of 4 images failed" in result.output
    assert not (out / "sub").exists()


def test_recursive_keeps_sub_folders_and_globs_expand(folder, tmp_path):
    out = tmp_path / "out"
    assert run("segment", folder, *MODEL, "--recursive", "--out", out).exit_code == 0
    assert (out / "sub" / "deep_panoptic.png").is_file()
    globbed = tmp_path / "globbed"
    result = run("segment", str(folder / "val_*.png"), *MODEL, "--out", globbed)
    assert result.exit_code == 0, result.output
    assert len(manifest(globbed)) == 3 and all(r["status"] == "ok" for r in manifest(globbed))
    nothing = run("segment", str(folder / "*.jpg"), *MODEL, "--out", tmp_path / "none")
    assert nothing.exit_code == 1 and "no image matches" in nothing.output


def test_a_killed_run_resumes_with_the_images_it_did_not_finish(folder, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert run("segment", folder, *MODEL, "--out", out).exit_code == 0
    done = sorted(out.glob("*_scores.npz"))
    assert len(done) == 3
    done[1].unlink()  # killed while writing this image's files (the scores file comes last)
    calls = count_calls(monkeypatch)
    again = run("segment", folder, *MODEL, "--out", out)
    assert again.exit_code == 0, again.output
    assert "2 of 4 images already have all their outputs; skipped" in again.output
    assert [Path(c).name for c in calls] == [done[1].name.replace("_scores.npz", ".png")]
    assert [r["status"] for r in manifest(out)][-2:] == ["error", "ok"]  # broken.png again
    calls.clear()
    assert run("segment", folder, *MODEL, "--no-resume", "--out", out).exit_code == 0
    assert len(calls) == 3


def test_images_named_one_by_one_must_all_be_readable(folder, tmp_path):
    out = tmp_path / "out"
    good = sorted(folder.glob("val_*.png"))[0]
    result = run("segment", good, folder / "broken.png", *MODEL, "--out", out)
    assert result.exit_code == 1 and "broken.png" in result.output
    assert not out.exists()
    twin = tmp_path / "twin"
    twin.mkdir()
    shutil.copy(good, twin / good.name)
    clash = run("segment", good, twin / good.name, *MODEL, "--out", out)
    assert clash.exit_code == 1 and "share the name stem" in clash.output


def test_vocab_db_segments_with_every_label_of_the_database(scenes, folder, tmp_path):
    json_path, images = scenes["db"]
    db = tmp_path / "db"
    built = run("db", "build", db, "--coco-panoptic", json_path, "--images", images,
                "--backbone", "color")  # fmt: skip
    assert built.exit_code == 0, built.output
    image = sorted(folder.glob("val_*.png"))[0]
    out = tmp_path / "out"
    args = ["segment", image, "--backbone", "color", "--proposer", "regions", "--out", out]
    result = run(*args, "--vocab", "db", "--db", db, "--gamma", "1.0")
    assert result.exit_code == 0, result.output
    info = json.loads((out / f"{image.stem}_panoptic.json").read_text())
    labels = [label.name for label in FeatureDatabase.open(db).labels]
    assert info["vocabulary"] == "db:db"
    assert {s["category_name"] for s in info["segments_info"]} <= set(labels)
    missing = run(*args, "--vocab", "db")
    assert missing.exit_code == 1 and "give --db too" in missing.output
