"""Shipped run configs, one per row of the paper's tables: each loads, names only real options
with valid values, says what it needs, and runs through ``retclip eval`` / ``retclip sweep``."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner, Result

from retclip.cli import cli
from retclip.cli.eval import eval_command, sweep_command
from retclip.configs import load_run_config, shipped_configs
from retclip.errors import InputError

ROWS = {"table1": 6, "table2": 6, "table3": 6, "table4": 1}


def invoke(*args: object) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_one_config_per_row_of_tables_1_to_3_and_the_table_4_grid() -> None:
    names = shipped_configs()
    for table, rows in ROWS.items():
        assert len([n for n in names if n.startswith(table + "-")]) == rows, table
    for name in names:
        config = load_run_config(name)
        assert config.about["table"].startswith("Table ") and config.about["row"]
        assert config.about["paper"]["PQ"]


@pytest.mark.parametrize("name", shipped_configs())
def test_shipped_config_options_parse_and_its_needs_are_options(name: str, tmp_path) -> None:
    """Every value converts through the command's own option types (a typo in a choice or a
    number fails here), and what it needs is an option of that command."""
    config = load_run_config(name)
    command = sweep_command if name.startswith("table4") else eval_command
    needs = {"root": tmp_path, "db": tmp_path, "fcclip_checkpoint": tmp_path / "m.pth"}
    args = ["--config", name, "--out", tmp_path / "out"]
    if command is sweep_command:
        args = ["--config", name, str(tmp_path / "cache")]
    for key in config.needs:
        if key in needs:
            args += [f"--{key.replace('_', '-')}", str(needs[key])]
    context = command.make_context(command.name, [str(a) for a in args])
    params = {p.name for p in command.params}
    assert set(config.needs) <= params | {"cache_dir"}
    for key, value in config.options.items():
        name_of = {"dataset": "kind"}.get(key, key)
        assert name_of in params, key
        assert context.params[name_of] == value or str(context.params[name_of]) == str(value)


def test_table_rows_carry_the_papers_settings() -> None:
    fcclip = load_run_config("table1-convnext-fcclip").options
    assert (fcclip["combine"], fcclip["alpha"], fcclip["beta"]) == ("fcclip", 0.4, 0.8)
    retclip = load_run_config("table1-convnext-ade20k-db").options
    assert (retclip["alpha"], retclip["beta"], retclip["gamma"]) == (0.4, 0.7, 0.3)
    gammas = {k: load_run_config(f"table2-vitl-{k}").options["gamma"] for k in
              ("clip", "retrieval", "retclip")}  # fmt: skip
    assert gammas == {"clip": 0.0, "retrieval": 1.0, "retclip": 0.3}
    sweep = load_run_config("table4-sweep")
    assert len(sweep.options["points"].split(";")) == len(sweep.about["paper"]["PQ"]) == 14


def test_a_config_that_needs_an_option_says_which(tmp_path) -> None:
    result = invoke("eval", "--config", "table1-convnext-ade20k-db", "--out", tmp_path / "o")
    assert result.exit_code == 1
    assert result.output.startswith("Error: config table1-convnext-ade20k-db needs --root")
    with pytest.raises(InputError, match="neither a file nor a shipped config"):
        load_run_config("table9-nothing")
    assert "table2-vitb-clip" in invoke("configs").output
    shown = json.loads(invoke("configs", "table2-vitb-clip").output)
    assert shown["proposer"] == "grounded-sam" and shown["about"]["paper"]["PQ"] == 9.0


def test_sweep_points_from_the_table4_config(scenes, tmp_path) -> None:
    """The Table 4 config sweeps its 14 exact settings on a cached run (here the scenes)."""
    json_path, images = scenes["db"]
    db = tmp_path / "db"
    built = invoke("db", "build", db, "--coco-panoptic", json_path, "--images", images,
                   "--backbone", "color")  # fmt: skip
    assert built.exit_code == 0, built.output
    val_json, val_images = scenes["val"]
    out = tmp_path / "eval"
    ran = invoke("eval", "--panoptic-json", val_json, "--images", val_images, "--no-progress",
                 "--backbone", "color", "--db", db, "--out", out)  # fmt: skip
    assert ran.exit_code == 0, ran.output
    swept = invoke("sweep", "--config", "table4-sweep", out / "cache", "--no-progress",
                   "--out", tmp_path / "sw")  # fmt: skip
    assert swept.exit_code == 0, swept.output
    rows = json.loads((tmp_path / "sw" / "sweep.json").read_text())["rows"]
    settings = [(r["alpha"], r["beta"], r["gamma"]) for r in rows]
    points = load_run_config("table4-sweep").options["points"].split(";")
    assert settings == [tuple(float(v) for v in p.split(",")) for p in points]
    bad = invoke("sweep", out / "cache", "--points", "0.4,0.7", "--no-progress")
    assert bad.exit_code == 1 and "must be alpha,beta,gamma" in bad.output


def test_unknown_option_in_a_config_file_is_named(tmp_path) -> None:
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"about": {"table": "x"}, "gama": 1}))
    result = invoke("eval", "--config", config, "--out", tmp_path / "o")
    assert result.exit_code != 0 and "unknown option 'gama'" in result.output
