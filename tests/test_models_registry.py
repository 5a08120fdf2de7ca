"""The model registry, name resolution and the offline error message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from retclip.backbones import BACKBONES, load_backbone
from retclip.errors import InputError, ModelUnavailableError
from retclip.hub import (
    ResolvedModel,
    detect_format,
    open_clip_dir,
    resolve_model,
    unavailable,
)
from retclip.models import get_model_info, list_models

MISSING = "retclip-tests/no-such-model"


def test_registered_names_ids_and_kinds() -> None:
    ids = {info.name: info.hub_id for info in list_models()}
    assert ids == {
        "clip-b16": "openai/clip-vit-base-patch16",
        "clip-l14": "openai/clip-vit-large-patch14",
        "convnext-l": "laion/CLIP-convnext_large_d_320.laion2B-s29B-b131K-ft-soup",
        "rn50x64": "timm/resnet50x64_clip.openai",
        "grounding-dino-base": "IDEA-Research/grounding-dino-base",
        "grounding-dino-tiny": "IDEA-Research/grounding-dino-tiny",
        "sam-vit-base": "facebook/sam-vit-base",
        "sam2.1-hiera-tiny": "facebook/sam2.1-hiera-tiny",
        "sam2.1-hiera-small": "facebook/sam2.1-hiera-small",
        "sam2.1-hiera-base-plus": "facebook/sam2.1-hiera-base-plus",
        "sam2.1-hiera-large": "facebook/sam2.1-hiera-large",
        "edgetam": "yonigozlan/EdgeTAM-hf",
        "owlv2": "google/owlv2-base-patch16-ensemble",
    }
    backbones = {info.name for info in list_models("backbone")}
    assert backbones == {"clip-b16", "clip-l14", "convnext-l", "rn50x64"}
    assert backbones < set(BACKBONES)
    assert {i.name for i in list_models("segmenter")} == {
        "sam-vit-base",
        "sam2.1-hiera-tiny",
        "sam2.1-hiera-small",
        "sam2.1-hiera-base-plus",
        "sam2.1-hiera-large",
        "edgetam",
    }
    for info in list_models():
        assert info.licence and info.params_m > 0 and info.description
        assert (info.dim > 0) == (info.kind == "backbone")
        assert json.dumps(info.to_dict())
    assert get_model_info("openai/clip-vit-large-patch14") == get_model_info("clip-l14")
    assert get_model_info("nothing") is None


def test_resolve_names_and_directories(tmp_path: Path) -> None:
    assert resolve_model("convnext-l") == ResolvedModel(
        "laion/CLIP-convnext_large_d_320.laion2B-s29B-b131K-ft-soup",
        "open_clip",
        local=False,
        info=get_model_info("convnext-l"),
    )
    assert resolve_model("clip-b16").format == "transformers"
    hf_dir, oc_dir, empty = tmp_path / "hf", tmp_path / "oc", tmp_path / "empty"
    for d in (hf_dir, oc_dir, empty):
        d.mkdir()
    (hf_dir / "config.json").write_text(json.dumps({"model_type": "clip"}))
    (oc_dir / "open_clip_config.json").write_text("{}")
    assert detect_format(hf_dir) == "transformers" and detect_format(oc_dir) == "open_clip"
    resolved = resolve_model(str(oc_dir))
    assert resolved.local and resolved.source == str(oc_dir.resolve())
    with pytest.raises(InputError, match="not a model directory"):
        resolve_model(str(empty))
    for bad in ("no-slash-name", "./missing/dir", "a/b/c"):
        with pytest.raises(InputError):
            resolve_model(bad)
    with pytest.raises(InputError, match="detector"):
        load_backbone("grounding-dino-tiny")
    with pytest.raises(InputError, match="unknown backbone"):
        load_backbone("no-such-backbone")


def test_missing_models_give_one_clear_line_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailableError) as info:
        load_backbone(MISSING)
    message = str(info.value)
    assert "\n" not in message
    for part in (repr(MISSING), f"hf download {MISSING}", "HF_HOME", "local directory"):
        assert part in message
    with pytest.raises(ModelUnavailableError, match="hf download"):
        open_clip_dir(ResolvedModel(MISSING, "open_clip", local=False))


def test_unavailable_message_names_the_cause() -> None:
    error = unavailable("openai/clip-vit-base-patch16", OSError("no"))
    assert isinstance(error, ModelUnavailableError)
    assert "(OSError)" in str(error) and "openai/clip-vit-base-patch16" in str(error)
