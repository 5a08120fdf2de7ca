"""The one assembly point: specs, their defaults and rules, and the generated options."""

from __future__ import annotations

import dataclasses

import click
import pytest
from click.testing import CliRunner

from retclip.cli import cli
from retclip.cli.options import ENSEMBLE_FIELDS, MODEL_FIELDS, ensemble_options, model_options
from retclip.errors import InputError
from retclip.pipeline import FCCLIP_TRAIN_VOCAB, ModelSpec, PipelineSpec, build_segmenter
from retclip.settings import DEFAULT_ALPHA, DEFAULT_BETA, DEFAULT_GAMMA, Settings


def params(options) -> dict[str, click.Option]:
    @click.command()
    def command(**_: object) -> None: ...

    for option in reversed(options):
        command = option(command)
    return {p.name: p for p in command.params if isinstance(p, click.Option)}


def test_option_defaults_come_from_the_fields() -> None:
    ensemble = params(ensemble_options)
    assert set(ensemble) == set(ENSEMBLE_FIELDS)
    for field in dataclasses.fields(Settings):
        assert ensemble[field.name].default == field.default, field.name
    assert (DEFAULT_ALPHA, DEFAULT_BETA, DEFAULT_GAMMA) == (0.4, 0.7, 0.3)  # paper, Table 4
    assert list(ensemble["combine"].type.choices) == ["linear", "fcclip"]
    model = params(model_options())
    assert set(model) == set(MODEL_FIELDS)
    assert model["backbone"].required and "--gt" in model["gt_json"].opts
    assert list(model["recipe"].type.choices) == ["retclip", "fcclip"]


def test_fcclip_implies_its_recipe_pooling_and_training_vocabulary() -> None:
    spec = PipelineSpec(model=ModelSpec(backbone="convnext-l", proposer="fcclip")).resolved()
    assert (spec.model.recipe, spec.pooling, spec.train_vocab) == (
        "fcclip",
        "binary",
        FCCLIP_TRAIN_VOCAB,
    )
    plain = PipelineSpec(model=ModelSpec(backbone="toy", proposer="regions")).resolved()
    assert (plain.model.recipe, plain.pooling, plain.train_vocab) == ("retclip", "soft", None)
    with pytest.raises(InputError, match="recipe"):
        ModelSpec(backbone="convnext-l", proposer="fcclip", recipe="retclip").resolved()
    with pytest.raises(InputError, match="binarised"):
        PipelineSpec(model=ModelSpec(backbone="x", proposer="fcclip"), pooling="soft").resolved()


def test_the_builder_gives_the_segmenter_the_spec_describes(tmp_path) -> None:
    spec = PipelineSpec(
        model=ModelSpec(backbone="color", proposer="regions", device="cpu"),
        k=3,
        settings=Settings(gamma=0.9, overlap_threshold=0.5),
    )
    segmenter = build_segmenter(spec)
    assert segmenter.settings == Settings(gamma=0.9, overlap_threshold=0.5)
    assert segmenter.proposer.name == "regions" and segmenter.pooling == "soft"
    assert spec.description()["k"] == 3 and spec.description()["recipe"] is None
    with pytest.raises(InputError, match="proposer"):
        build_segmenter(PipelineSpec(model=ModelSpec(backbone="color")))


def test_bad_option_values_are_one_line(tmp_path) -> None:
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(image)
    base = [
        "segment",
        str(image),
        "--classes",
        "a",
        "--proposer",
        "regions",
        "--out",
        str(tmp_path),
    ]
    for extra, message in [
        (["--backbone", "color", "--resolution", "0"], "resolution"),
        (["--backbone", "color", "--k", "0"], "k"),
        (["--backbone", "color", "--alpha", "2"], "alpha"),
        (["--backbone", "color", "--score-threshold", "nan"], "score_threshold"),
    ]:
        result = CliRunner().invoke(cli, [*base, *extra])
        assert result.exit_code == 1, (extra, result.output)
        assert result.output.startswith("Error: ") and message in result.output
        assert "Traceback" not in result.output


def test_lru_cache_bounds_and_order() -> None:
    from retclip.caching import LRUCache

    cache: LRUCache[str, int] = LRUCache(2)
    assert cache.get_or_create("a", lambda: 1) == 1
    cache.put("b", 2)
    assert cache.get("a") == 1  # a is now the most recent
    cache.put("c", 3)  # evicts b
    assert "b" not in cache and len(cache) == 2
    assert cache.put("a", 9) == 1  # an existing key keeps its value
    cache.discard(lambda key: key == "a")
    assert "a" not in cache and cache.get("c") == 3
    with pytest.raises(ValueError):
        LRUCache(0)


def test_a_segmenter_keeps_a_bounded_number_of_vocabularies(monkeypatch) -> None:
    import retclip.segmenter as segmenter_module

    monkeypatch.setattr(segmenter_module, "TEXT_CACHE_SIZE", 2)
    segmenter = build_segmenter(
        PipelineSpec(model=ModelSpec(backbone="color", proposer="regions", device="cpu"))
    )
    from retclip.vocabulary import Vocabulary

    for names in ("red", "blue", "green", "red, blue"):
        segmenter.class_embeddings(Vocabulary.from_string(names))
    assert len(segmenter._class_embeddings) == 2


def test_the_core_install_is_lean_and_a_missing_extra_is_named(monkeypatch) -> None:
    import importlib.util
    import subprocess
    import sys
    from pathlib import Path

    import tomllib

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"])
    for extra_only in ("fastapi", "uvicorn", "multipart", "matplotlib"):
        assert extra_only not in core
    assert set(project["optional-dependencies"]) >= {"serve", "demo", "all"}
    # the command line and the library load none of the extras' modules
    code = (
        "import sys, retclip.cli, retclip.pipeline, retclip.segmenter; "
        "print(sorted(m for m in ('fastapi', 'uvicorn', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a)
    )
    result = CliRunner().invoke(cli, ["serve"])
    assert result.exit_code == 1
    assert "pip install 'retclip[serve]'" in result.output and "Traceback" not in result.output
