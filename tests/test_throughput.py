"""Throughput mode: batched model passes equal the unbatched ones (image for image, never mixed
up), decoding and writing in background threads keep the errors and guarantees of a plain run,
``--precision`` autocasts with float32 outputs, and ``--compile`` plumbing with its fallback."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result

import retclip.segmenter
from retclip.acceleration import Compiled, check_precision
from retclip.backbones.registry import load_backbone
from retclip.cli import cli
from retclip.database import FeatureDatabase
from retclip.database.build import BuildItem, batch_rows, image_rows
from retclip.errors import InputError
from retclip.proposers.grounded_sam import GroundedSamProposer, GroundingDinoDetector
from retclip.proposers.sam import SamSegmenter
from retclip.segmenter import Segmenter
from tiny_detectors import save_grounding_dino, save_sam
from tiny_models import save_tiny_clip

CLASSES = "circle, square, stripes, dots"
DETECT_ALL = ["--box-threshold", "0", "--text-threshold", "0", "--min-mask-area", "0"]


def run(*args: object) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Seven toy-world scenes (96×96) as a COCO-panoptic dataset."""
    root = tmp_path_factory.mktemp("world")
    result = run("toyworld", "generate", "--out", root, "--split", "db", "--n", 7)
    assert result.exit_code == 0, result.output
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-throughput")
    return {
        "gd": save_grounding_dino(root / "gd"),
        "sam": save_sam(root / "sam"),
        "clip": save_tiny_clip(root / "clip"),
    }


def db_arrays(path: Path) -> dict[str, np.ndarray]:
    db = FeatureDatabase.open(path)
    return {
        "features": db.features().astype(np.float32),
        "labels": np.array([db.labels[i].name for i in db.label_ids()]),
        **{k: np.asarray(v) for k, v in db.provenance().items() if k != "build_ids"},
    }


def test_db_build_batch_3_equals_batch_1_row_for_row(world, tmp_path) -> None:
    built = {}
    for batch in (1, 3):
        out = tmp_path / f"db{batch}"
        result = run("db", "build", out, "--backbone", "toy", "--coco-panoptic",
                     world / "panoptic_db.json", "--images", world / "images",
                     "--batch-size", batch, "--feature-dtype", "float32")  # fmt: skip
        assert result.exit_code == 0, result.output
        built[batch] = db_arrays(out)
    one, three = built[1], built[3]
    assert len(one["features"]) > 7 and set(one) == set(three)
    assert len(set(one["sources"])) == 7  # every image gave rows
    for key in one:
        if key == "features":
            np.testing.assert_allclose(three[key], one[key], atol=1e-5, err_msg=key)
        else:
            np.testing.assert_array_equal(three[key], one[key], err_msg=key)


def scores_of(out: Path) -> dict[str, dict[str, np.ndarray]]:
    arrays = {}
    for path in sorted(out.glob("*_scores.npz")):
        with np.load(path) as data:
            arrays[path.name] = {k: data[k] for k in data.files}
    return arrays


def test_segment_batch_3_equals_batch_1_image_for_image(world, tiny, tmp_path, monkeypatch):
    """Grounding DINO, SAM and CLIP batched over three images give each image its own result."""
    calls: dict[str, list[int]] = {"detector": [], "sam": []}
    detect, embed = GroundingDinoDetector._detect_rows, SamSegmenter.embed_batch

    def counted_detect(self, images, *args, **kwargs):
        calls["detector"].append(len(images))
        return detect(self, images, *args, **kwargs)

    def counted_embed(self, images):
        calls["sam"].append(len(images))
        return embed(self, images)

    monkeypatch.setattr(GroundingDinoDetector, "_detect_rows", counted_detect)
    monkeypatch.setattr(SamSegmenter, "embed_batch", counted_embed)
    models = ["--backbone", tiny["clip"], "--proposer", "grounded-sam", "--detector", tiny["gd"],
              "--sam", tiny["sam"], *DETECT_ALL, "--classes", CLASSES]  # fmt: skip
    outputs = {}
    for batch in (1, 3):
        out = tmp_path / f"out{batch}"
        result = run("segment", world / "images", *models, "--batch-size", batch, "--out", out)
        assert result.exit_code == 0, result.output
        outputs[batch] = scores_of(out)
        records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
        assert [r["status"] for r in records] == ["ok"] * 7
        assert [Path(r["image"]).name for r in records] == sorted(
            p.name for p in (world / "images").iterdir()
        )
    assert calls["detector"][-3:] == [3, 3, 1] and max(calls["sam"]) == 3  # batched passes ran
    one, three = outputs[1], outputs[3]
    assert list(one) == list(three) and len(one) == 7
    for name in one:
        assert set(one[name]) == set(three[name])
        assert len(one[name]["s_clip"]) > 0, name
        for key, value in one[name].items():
            if value.dtype.kind == "f":
                np.testing.assert_allclose(three[name][key], value, atol=1e-4, err_msg=key)
            else:
                np.testing.assert_array_equal(three[name][key], value, err_msg=f"{name} {key}")


def test_build_rows_of_a_batch_with_own_labels_per_image_equal_one_by_one(world, tiny) -> None:
    """db build's batches prompt each image with its own labels (prompts of other lengths)."""
    backbone = load_backbone(str(tiny["clip"]))
    proposer = GroundedSamProposer(str(tiny["gd"]), str(tiny["sam"]), box_threshold=0.0,
                                   text_threshold=0.0, min_area=0)  # fmt: skip
    from retclip.images import load_image

    paths = sorted((world / "images").iterdir())[:3]
    labels = [("circle",), ("square", "stripes", "dots"), ("ring", "waves")]
    items = [BuildItem(str(p), names) for p, names in zip(paths, labels, strict=True)]
    images = [load_image(p) for p in paths]
    images[1] = images[1][:, :80]  # another size: a detector call and a backbone pass of its own
    batched = batch_rows(backbone, proposer, items, images)
    for item, image, rows in zip(items, images, batched, strict=True):
        alone = image_rows(backbone, proposer, item, image)
        assert rows.source == alone.source and rows.labels == alone.labels
        assert len(rows.labels) > 0 and set(rows.labels) <= set(item.labels)
        np.testing.assert_allclose(rows.features, alone.features, atol=1e-4)
        np.testing.assert_allclose(rows.boxes, alone.boxes, atol=1e-3)
        np.testing.assert_allclose(rows.scores, alone.scores, atol=1e-5)


def test_batched_segment_records_a_bad_file_and_goes_on(world, tmp_path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    paths = sorted((world / "images").iterdir())[:4]
    for path in paths:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / paths[1].name).write_bytes(b"not a png")  # second image of the first batch
    out = tmp_path / "out"
    result = run("segment", folder, "--backbone", "color", "--proposer", "regions", "--classes",
                 "red, blue", "--batch-size", 3, "--out", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["ok", "error", "ok", "ok"]
    assert paths[1].name in records[1]["error"]
    assert "1 of 4 images failed" in result.output
    again = run("segment", folder, "--backbone", "color", "--proposer", "regions", "--classes",
                "red, blue", "--batch-size", 3, "--out", out)  # fmt: skip
    assert "3 of 4 images already have all their outputs; skipped" in again.output


def test_a_writer_thread_failure_is_one_error_line(world, tmp_path, monkeypatch) -> None:
    def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "out" / "x.png"))

    monkeypatch.setattr(retclip.segmenter.SegmentationResult, "save", full_disk)
    result = CliRunner().invoke(
        cli,
        ["segment", str(world / "images"), "--backbone", "color", "--proposer", "regions",
         "--classes", "red", "--batch-size", "2", "--out", str(tmp_path / "out")],
    )  # fmt: skip
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        f"Error: {tmp_path / 'out' / 'x.png'}: No space left on device"
    )


def test_a_decode_failure_in_db_build_is_one_error_line_after_the_batches_before(
    world, tmp_path
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for path in sorted((world / "images").iterdir()):
        (images / path.name).write_bytes(path.read_bytes())
    (images / "db_0_00004.png").write_bytes(b"broken")  # in the third batch of two
    db = tmp_path / "db"
    result = CliRunner().invoke(
        cli,
        ["db", "build", str(db), "--backbone", "toy", "--coco-panoptic",
         str(world / "panoptic_db.json"), "--images", str(images), "--batch-size", "2"],
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: ") and "db_0_00004.png" in last
    sources = set(FeatureDatabase.open(db).provenance()["sources"])
    assert {Path(s).name for s in sources} == {f"db_0_0000{i}.png" for i in range(4)}


def test_bf16_autocast_on_cpu_keeps_float32_results(world) -> None:
    from retclip.proposers import load_proposer

    seen: list[bool] = []
    backbone = load_backbone("toy")
    original = type(backbone).encode_images

    def spy(self, images):
        seen.append(torch.is_autocast_enabled("cpu"))
        return original(self, images)

    proposer = load_proposer("gt", gt_json=world / "panoptic_db.json")
    image = sorted((world / "images").iterdir())[0]
    classes = "circle, square, triangle, star, stripes, dots, checks, noise"
    results = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(backbone), "encode_images", spy)
        for precision in ("fp32", "bf16"):
            segmenter = Segmenter(backbone, proposer, device="cpu", precision=precision)
            results[precision] = segmenter(image, classes)
    assert seen == [False, True]
    full, half = results["fp32"].scores.s_clip, results["bf16"].scores.s_clip
    assert full.dtype == half.dtype == torch.float32
    assert not torch.equal(full, half)  # bf16 ran ...
    torch.testing.assert_close(half, full, atol=0.05, rtol=0)  # ... close to fp32


def test_fp16_on_cpu_is_refused_with_one_line(world, tmp_path) -> None:
    with pytest.raises(InputError, match="fp16 needs a CUDA device"):
        check_precision("fp16", "cpu")
    check_precision("bf16", "cpu")
    result = CliRunner().invoke(
        cli,
        ["segment", str(world / "images"), "--backbone", "color", "--proposer", "regions",
         "--classes", "red", "--precision", "fp16", "--device", "cpu", "--out",
         str(tmp_path / "out")],
    )  # fmt: skip
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1].startswith("Error: --precision fp16 needs")
    assert not (tmp_path / "out").exists()


def test_db_build_in_bf16_stores_the_database_dtype(world, tmp_path) -> None:
    out = tmp_path / "db"
    result = run("db", "build", out, "--backbone", "toy", "--coco-panoptic",
                 world / "panoptic_db.json", "--images", world / "images", "--precision",
                 "bf16", "--feature-dtype", "float32", "--limit", 2)  # fmt: skip
    assert result.exit_code == 0, result.output
    reference = tmp_path / "ref"
    run("db", "build", reference, "--backbone", "toy", "--coco-panoptic",
        world / "panoptic_db.json", "--images", world / "images", "--feature-dtype", "float32",
        "--limit", 2)  # fmt: skip
    half, full = FeatureDatabase.open(out).features(), FeatureDatabase.open(reference).features()
    assert half.dtype == full.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(half, axis=1), 1.0, atol=1e-5)  # fp32 normalised
    assert not np.array_equal(half, full)
    np.testing.assert_allclose(half, full, atol=0.05)


def test_compile_wraps_the_image_tower_and_falls_back_with_a_warning(monkeypatch) -> None:
    compiled_calls: list[int] = []

    def fake_compile(fn):
        def run(*args, **kwargs):
            compiled_calls.append(1)
            return fn(*args, **kwargs)

        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    backbone = load_backbone("toy")
    monkeypatch.setattr(backbone.model, "dense", backbone.model.dense)  # undone after the test
    images = torch.rand(2, 3, 32, 32) * 255
    reference = backbone.encode_images(images)
    backbone.compile_image_tower()
    backbone.compile_image_tower()  # once only
    assert isinstance(backbone.model.dense, Compiled)
    torch.testing.assert_close(backbone.encode_images(images), reference)
    assert compiled_calls == [1]

    class InductorFault(RuntimeError):
        __module__ = "torch._inductor.exc"

    def broken(*args, **kwargs):
        raise InductorFault("no C++ compiler")

    wrapper = Compiled(lambda x: x + 1, "test tower")
    wrapper.compiled = broken
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert wrapper(1) == 2 and wrapper(2) == 3
    assert len(caught) == 1 and "running it uncompiled" in str(caught[0].message)
    assert "no C++ compiler" in str(caught[0].message)

    def model_bug(*args, **kwargs):
        raise ValueError("shape mismatch")

    failing = Compiled(lambda x: x, "test tower")
    failing.compiled = model_bug
    with pytest.raises(ValueError, match="shape mismatch"):  # a model's own error is not hidden
        failing(1)


def test_compile_option_reaches_the_backbone(monkeypatch) -> None:
    from retclip.pipeline import ModelSpec

    monkeypatch.setattr(torch, "compile", lambda fn: fn)
    spec = ModelSpec(backbone="color", compile=True)
    assert "compile" not in spec.description() and "batch_size" not in spec.description()
    assert "precision" not in spec.description()  # fp32: the earlier cache keys
    assert ModelSpec(backbone="color", precision="bf16").description()["precision"] == "bf16"
    backbone = spec.load_backbone()
    assert isinstance(backbone.encode_images, Compiled)


@pytest.mark.parametrize("family", ["sam", "sam2"])
def test_sam_encoder_batch_gives_each_image_its_own_embedding(family, world, tmp_path) -> None:
    from retclip.images import load_image
    from tiny_detectors import save_sam2

    saved = save_sam(tmp_path / "m") if family == "sam" else save_sam2(tmp_path / "m")
    sam = SamSegmenter(str(saved))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the tiny random encoder is near-constant: make images matter
        for parameter in sam.model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    images = [load_image(p) for p in sorted((world / "images").iterdir())[:3]]
    images[2] = images[2][:80]  # another size: SAM pads / stretches to one input square
    batched, alone = sam.embed_batch(images), [sam.embed(image) for image in images]
    assert (batched[0].embedding - batched[1].embedding).abs().max() > 1e-3
    box = torch.tensor([[5.0, 5.0, 70.0, 60.0]])
    for one, many in zip(alone, batched, strict=True):
        assert many.original_size == one.original_size and many.input_size == one.input_size
        torch.testing.assert_close(many.embedding, one.embedding, atol=1e-4, rtol=1e-4)
        assert len(many.high_res) == len(one.high_res) == (2 if family == "sam2" else 0)
        for a, b in zip(many.high_res, one.high_res, strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(sam.segment_boxes(many, box)[0], sam.segment_boxes(one, box)[0])


def test_compile_option_reaches_sams_image_encoder(tiny, monkeypatch) -> None:
    from retclip.pipeline import ModelSpec

    monkeypatch.setattr(torch, "compile", lambda fn: fn)
    spec = ModelSpec(backbone="color", proposer="sam-grid", sam=str(tiny["sam"]), compile=True,
                     points_per_side=2)  # fmt: skip
    _, proposer = spec.load()
    encoder = proposer.sam.model.get_image_embeddings  # type: ignore[union-attr]
    assert isinstance(encoder, Compiled)
    plain = ModelSpec(backbone="color", proposer="sam-grid", sam=str(tiny["sam"]),
                      points_per_side=2).load()[1]  # fmt: skip
    assert not isinstance(plain.sam.model.get_image_embeddings, Compiled)  # type: ignore[union-attr]


def test_decoding_and_writing_run_beside_the_models(world, tmp_path, monkeypatch) -> None:
    """segment: decode thread → models on the caller's thread → writer thread (files, then the
    manifest line); db build: decode threads → models → commit thread."""
    import threading

    import retclip.database.build
    import retclip.images
    from retclip.cli.segment import Manifest

    where: dict[str, set[str]] = {}

    def spy(name, fn):
        def run(*args, **kwargs):
            where.setdefault(name, set()).add(threading.current_thread().name.split("_")[0])
            return fn(*args, **kwargs)

        return run

    decode = spy("decode", retclip.images.load_image)
    monkeypatch.setattr(retclip.images, "load_image", decode)
    monkeypatch.setattr(retclip.database.build, "load_image", decode)
    result_cls = retclip.segmenter.SegmentationResult
    monkeypatch.setattr(result_cls, "save", spy("save", result_cls.save))
    monkeypatch.setattr(Manifest, "write", spy("manifest", Manifest.write))
    monkeypatch.setattr(Segmenter, "finish", spy("segment models", Segmenter.finish))
    monkeypatch.setattr(FeatureDatabase, "add", spy("commit", FeatureDatabase.add))
    toy = type(load_backbone("toy"))
    monkeypatch.setattr(toy, "encode_images", spy("build models", toy.encode_images))
    result = run("segment", world / "images", "--backbone", "color", "--proposer", "regions",
                 "--classes", "red", "--batch-size", 2, "--out", tmp_path / "out")  # fmt: skip
    assert result.exit_code == 0, result.output
    gt = ["--coco-panoptic", world / "panoptic_db.json", "--images", world / "images"]
    result = run("db", "build", tmp_path / "db", "--backbone", "toy", "--batch-size", 3, *gt)
    assert result.exit_code == 0, result.output
    assert where == {
        "decode": {"decode"},
        "segment models": {"MainThread"},
        "save": {"write"},
        "manifest": {"write"},
        "build models": {"MainThread"},
        "commit": {"commit"},
    }


def test_the_throughput_options_reach_every_command_that_runs_models() -> None:
    runner = CliRunner()
    helps = {
        name: runner.invoke(cli, [*name.split(), "--help"]).output
        for name in ("segment", "db build", "db add", "eval", "serve")
    }
    for name, text in helps.items():
        assert "--precision" in text and "--compile" in text, name
    for name in ("segment", "db build", "db add"):
        assert "--batch-size" in helps[name], name
    assert "--batch-size" not in helps["serve"]  # its micro-batches are --batch
    assert "[default: 8]" in helps["db build"].split("--batch-size")[1].split("--")[0]


def test_compile_traces_the_toy_trunk_with_dynamo(monkeypatch) -> None:
    """Real ``torch.compile`` graph capture (dynamo; the eager backend skips inductor's C++
    build, which takes over a minute on a small CPU): same features, no fallback."""
    import functools

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    backbone = load_backbone("toy")
    monkeypatch.setattr(backbone.model, "dense", backbone.model.dense)  # undone after the test
    images = torch.rand(2, 3, 48, 64) * 255
    reference = backbone.encode_images(images)
    backbone.compile_image_tower()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback would warn
        with torch.inference_mode():
            compiled = backbone.encode_images(images)
    assert isinstance(backbone.model.dense, Compiled) and not backbone.model.dense.failed
    torch.testing.assert_close(compiled, reference)
