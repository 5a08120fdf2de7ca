"""``retclip segment --proposer fcclip --combine fcclip`` against the original FC-CLIP.

The fixtures (``tests/fixtures/fcclip``, produced as its README says) hold a reduced FC-CLIP's
state dict under the original's key names, a 70×90 input image, and the original's outputs for
it: the text classifier it computed from the class names, the tensors before thresholding (mask
logits, in/out-of-vocabulary logits, ensembled probabilities) and its final results (semantic
probabilities, panoptic map and segments at overlap thresholds 0.8 and 0.0, instances).

The main test runs the command users run: a checkpoint file, an OpenCLIP model folder, a
vocabulary file and ``retclip segment``, whose output files are compared with the original's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file, save_file

from retclip.backbones.open_clip_convnext import OpenClipBackbone
from retclip.cli import cli
from retclip.fcclip.checkpoint import load_fcclip_weights
from retclip.fcclip.model import FCCLIP, FCCLIPConfig, masks_to_image, preprocess
from retclip.images import rgb2id
from retclip.segmenter import Settings, load_scores
from retclip.text_embeddings import ClassEmbeddings, embed_vocabulary
from retclip.vocabulary import Vocabulary
from tiny_models import tiny_convnext_cfg

FIXTURES = Path(__file__).parent / "fixtures" / "fcclip"
C = 5  # classes of the fixture vocabulary
VOCAB = """person ; thing
wall, brick wall ; stuff
zebra ; thing
spaceship, rocket ; thing
sky ; stuff
"""
TRAIN_VOCAB = "person\nwall\nzebra\nsky\ncar\n"  # FC-CLIP's fx_train classes: the seen ones
HEAD = {
    "in_channels": [8, 16, 24, 32],
    "embed_dim": 16,
    "num_queries": 10,
    "hidden_dim": 64,
    "n_heads": 4,
    "ffn_dim": 128,
    "dec_layers": 3,
    "enc_layers": 2,
    "mask_dim": 64,
}
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    return dict(np.load(FIXTURES / "fcclip_reduced_io.npz"))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, data) -> dict[str, Path]:
    """What a user has: FC-CLIP's checkpoint, its CLIP as an OpenCLIP folder, vocabularies, an
    image."""
    root = tmp_path_factory.mktemp("fcclip-user")
    state = load_file(str(FIXTURES / "fcclip_reduced_state.safetensors"))
    torch.save({"model": state}, root / "fcclip.pth")
    clip_dir = root / "clip"
    clip_dir.mkdir()
    prefix = "backbone.clip_model."
    clip = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    clip.pop("attn_mask", None)
    save_file(clip, str(clip_dir / "open_clip_model.safetensors"))
    (clip_dir / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": tiny_convnext_cfg(), "preprocess_cfg": {}})
    )
    (root / "vocab.txt").write_text(VOCAB)
    (root / "train.txt").write_text(TRAIN_VOCAB)
    (root / "head.json").write_text(json.dumps(HEAD))
    Image.fromarray(data["image"]).save(root / "scene.png")
    return {
        "root": root,
        "checkpoint": root / "fcclip.pth",
        "clip": clip_dir,
        "vocab": root / "vocab.txt",
        "train": root / "train.txt",
        "head": root / "head.json",
        "image": root / "scene.png",
    }


def invoke(files: dict[str, Path], overlap: float, *extra: str) -> tuple[Path, Any]:
    out = files["root"] / f"out-{overlap}-{'-'.join(extra)}"
    args = [
        "segment",
        str(files["image"]),
        "--vocab",
        str(files["vocab"]),
        "--proposer",
        "fcclip",
        "--fcclip-checkpoint",
        str(files["checkpoint"]),
        "--fcclip-config",
        str(files["head"]),
        "--backbone",
        str(files["clip"]),
        "--train-vocab",
        str(files["train"]),
        "--combine",
        "fcclip",
        "--alpha",
        "0.4",
        "--beta",
        "0.8",
        "--overlap-threshold",
        str(overlap),
        "--max-instances",
        "20",
        "--device",
        "cpu",
        "--out",
        str(out),
        *extra,
    ]
    return out, CliRunner().invoke(cli, args, catch_exceptions=False)


def segment(files: dict[str, Path], overlap: float) -> Path:
    out, result = invoke(files, overlap)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def runs(files, tmp_path_factory: pytest.TempPathFactory) -> dict[float, Path]:
    mp = pytest.MonkeyPatch()
    mp.setenv("RETCLIP_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    try:
        return {overlap: segment(files, overlap) for overlap in (0.8, 0.0)}
    finally:
        mp.undo()


def scores_of(out: Path):
    return load_scores(out / "scene_scores.npz")


@pytest.mark.parametrize("overlap", [0.8, 0.0])
def test_panoptic_map_and_segments_are_the_originals(runs, data, overlap) -> None:
    out = runs[overlap]
    key = "08" if overlap else "00"
    panoptic = rgb2id(np.asarray(Image.open(out / "scene_panoptic.png").convert("RGB")))
    np.testing.assert_array_equal(panoptic, data[f"panoptic_{key}"])
    ours = json.loads((out / "scene_panoptic.json").read_text())["segments_info"]
    theirs = json.loads(str(data[f"segments_{key}"]))
    assert [(s["id"], s["category_id"], bool(s["isthing"])) for s in ours] == [
        (s["id"], s["category_id"], s["isthing"]) for s in theirs
    ]
    assert len(theirs) == (3 if overlap else 4)  # the threshold matters in this case


def test_instances_are_the_originals(runs, data) -> None:
    from pycocotools import mask as mask_utils

    ours = json.loads((runs[0.8] / "scene_instances.json").read_text())
    ours = sorted(ours, key=lambda r: -r["score"])
    order = np.argsort(-data["inst_scores"], kind="stable")
    assert len(ours) == len(order) == 8
    np.testing.assert_allclose([r["score"] for r in ours], data["inst_scores"][order], atol=1e-5)
    assert [r["category_id"] for r in ours] == data["inst_classes"][order].tolist()
    for record, i in zip(ours, order, strict=True):
        mask = mask_utils.decode(record["segmentation"]).astype(bool)
        np.testing.assert_array_equal(mask, data["inst_masks"][i])


def test_semantic_probabilities_are_the_originals(runs, data) -> None:
    proposals, scores = scores_of(runs[0.8])
    settings = Settings(alpha=0.4, beta=0.8, combine="fcclip")
    probs = scores.combine(settings)
    expected = torch.log(torch.from_numpy(data["class_probs"]) + 1e-8).softmax(-1)
    torch.testing.assert_close(probs, expected, atol=1e-5, rtol=1e-4)
    semseg = torch.einsum("qc,qhw->chw", probs[:, :C], torch.from_numpy(proposals.soft_masks))
    np.testing.assert_allclose(semseg.numpy(), data["sem_seg"], atol=1e-5, rtol=1e-4)
    semantic = np.asarray(Image.open(runs[0.8] / "scene_semantic.png"))
    np.testing.assert_array_equal(semantic, data["sem_seg"].argmax(0))


def test_each_path_is_the_originals(runs, data) -> None:
    """Before thresholding: s_clip is FC-CLIP's out-of-vocabulary softmax, s_iv and p_void its
    in-vocabulary ones, the soft masks its upsampled sigmoid masks."""
    proposals, scores = scores_of(runs[0.8])
    out_vocab = torch.from_numpy(data["out_vocab_logits"])
    in_vocab = torch.from_numpy(data["in_vocab_logits"])
    torch.testing.assert_close(scores.s_clip, out_vocab[:, :-1].softmax(-1), atol=1e-5, rtol=1e-4)
    assert scores.s_iv is not None and scores.p_void is not None
    torch.testing.assert_close(scores.s_iv, in_vocab[:, :-1].softmax(-1), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(scores.p_void, in_vocab.softmax(-1)[:, -1], atol=1e-5, rtol=1e-4)
    resized = tuple(int(v) for v in data["resized_hw"])
    logits = masks_to_image(torch.from_numpy(data["mask_logits"])[None], resized, (70, 90))[0]
    assert proposals.mask_probs is not None
    np.testing.assert_allclose(proposals.mask_probs, logits.sigmoid().numpy(), atol=1e-5)


def test_a_database_of_another_recipe_is_refused(files, tmp_path, monkeypatch) -> None:
    from retclip.database import FeatureDatabase

    monkeypatch.setenv("RETCLIP_CACHE_DIR", str(tmp_path / "cache"))
    for name, backbone, pooling, message in [
        ("grid", OpenClipBackbone(str(files["clip"])), "binary", "was built with backbone"),
        ("soft", OpenClipBackbone(str(files["clip"]), preprocessing="fcclip"), "soft", "pooling"),
    ]:
        path = tmp_path / name
        db = FeatureDatabase.create(
            path, fingerprint=backbone.fingerprint, dim=backbone.dim, pooling=pooling
        )
        db.add(np.eye(16, dtype=np.float32)[:2], ["person", "sky"], sources=["a", "b"])
        out, result = invoke(files, 0.8, "--db", str(path))
        assert result.exit_code == 1, result.output
        assert result.output.startswith("Error: ") and message in result.output
        assert "Traceback" not in result.output and not list(out.glob("*"))


@pytest.fixture(scope="module")
def model_run(files, data):
    """The model alone, on the fixture's text classifier (no post-processing)."""
    clip = open_clip.create_model(f"local-dir:{files['clip']}").eval()
    model = FCCLIP(FCCLIPConfig.from_json(files["head"]), clip).eval()
    state = load_file(str(FIXTURES / "fcclip_reduced_state.safetensors"))
    report = load_fcclip_weights(model, state, backbone="verify")
    assert report.ok and report.ignored == ["criterion.empty_weight"]
    text = ClassEmbeddings(
        torch.from_numpy(data["text"]), torch.from_numpy(data["synonym_class"]), C
    )
    pixels, _ = preprocess(data["image"], tuple(int(v) for v in data["resized_hw"]))
    with torch.no_grad():
        return model(pixels, text)


def test_model_logits_match(model_run, data) -> None:
    for name in ("mask_logits", "in_vocab_logits", "out_vocab_logits"):
        np.testing.assert_allclose(
            getattr(model_run, name)[0].numpy(), data[name], atol=5e-5, rtol=1e-4, err_msg=name
        )


def test_text_classifier_is_the_originals(files, data, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RETCLIP_CACHE_DIR", str(tmp_path))
    backbone = OpenClipBackbone(str(files["clip"]), preprocessing="fcclip")
    text = embed_vocabulary(backbone, Vocabulary.from_file(files["vocab"]))
    np.testing.assert_array_equal(text.synonym_class.numpy(), data["synonym_class"])
    np.testing.assert_allclose(text.synonym_embeddings.numpy(), data["text"], atol=1e-6)
    assert F.normalize(text.synonym_embeddings, dim=-1).isfinite().all()


def test_a_database_built_with_fcclips_recipe_serves_its_queries(
    files, scenes, tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv("RETCLIP_CACHE_DIR", str(tmp_path / "cache"))
    json_path, images = scenes["db"]
    db = tmp_path / "db"
    build = [
        "db", "build", str(db), "--coco-panoptic", str(json_path), "--images", str(images),
        "--backbone", str(files["clip"]), "--recipe", "fcclip", "--device", "cpu",
    ]  # fmt: skip
    result = CliRunner().invoke(cli, build, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    info = CliRunner().invoke(cli, ["db", "info", str(db), "--json"], catch_exceptions=False)
    meta = json.loads(info.output)
    assert meta["pooling"] == "binary"  # FC-CLIP's binarised rule, implied by the recipe
    assert meta["fingerprint"]["preprocessing"] == "fcclip:short800/max1333/pad32"
    out, result = invoke(files, 0.8, "--db", str(db))
    assert result.exit_code == 0, result.output
    _, scores = scores_of(out)
    assert scores.s_ret is not None and scores.s_ret.shape == (10, C)


def test_the_server_serves_fcclip_and_equals_the_command_line(files, runs, data, tmp_path) -> None:
    from fastapi.testclient import TestClient

    from retclip.server.app import ServerConfig, create_app

    config = ServerConfig(
        data_dir=tmp_path / "serve",
        backbones=(str(files["clip"]), "color"),
        proposers=("fcclip", "regions"),
        model_options={
            "fcclip_checkpoint": files["checkpoint"],
            "fcclip_config": files["head"],
        },
    )
    form = {  # the server's class lists are all things: compare segments, not their kinds
        "classes": "person, wall|brick wall, zebra, spaceship|rocket, sky",
        "proposer": "fcclip",
        "combine": "fcclip",
        "alpha": "0.4",
        "beta": "0.8",
        "backbone": str(files["clip"]),
    }
    png_bytes = files["image"].read_bytes()
    with TestClient(create_app(config), base_url="http://127.0.0.1") as client:
        response = client.post("/segment", files={"image": ("scene.png", png_bytes)}, data=form)
        assert response.status_code == 200, response.text
        body = response.json()
        wrong = client.post(
            "/segment",
            files={"image": ("scene.png", png_bytes)},
            data={**form, "backbone": "color"},
        )
        assert wrong.status_code == 400 and "runs on its own backbone" in wrong.json()["error"]
    # which pixels get which class does not depend on thing/stuff (only segment ids do)
    from pycocotools import mask as mask_utils

    served = np.full((70, 90), -1)
    for segment in body["segments"]:
        served[mask_utils.decode(segment["rle"]).astype(bool)] = segment["category_id"]
    original = np.full((70, 90), -1)
    for segment in json.loads(str(data["segments_08"])):
        original[data["panoptic_08"] == segment["id"]] = segment["category_id"]
    np.testing.assert_array_equal(served, original)
