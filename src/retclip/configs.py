"""Run configs: JSON files of command options, and the shipped ones, one per row of the paper's
tables (``retclip/data/configs/``, e.g. ``table1-convnext-ade20k-db``).

A config is a JSON object of option values (names as on the command line, with ``-`` or ``_``)
plus an optional ``about`` object that is not an option: ``table`` and ``row`` (which result it
reproduces), ``paper`` (the paper's numbers, percent) and ``needs`` (options the user must still
give, such as the dataset folder or the database, each with what it is). ``docs/reproduce.md``
says how to obtain each thing a config needs.
"""

from __future__ import annotations

import dataclasses
import json
from importlib import resources
from pathlib import Path
from typing import Any

from retclip.errors import InputError

__all__ = ["RunConfig", "load_run_config", "shipped_configs"]


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A loaded config: where it came from, its ``about`` record and its option values."""

    name: str
    options: dict[str, Any]
    about: dict[str, Any]

    @property
    def needs(self) -> dict[str, str]:
        """Option name → what the user must give for it (``about.needs``)."""
        return {str(k): str(v) for k, v in dict(self.about.get("needs") or {}).items()}


def _config_dir() -> Any:
    return resources.files("retclip") / "data" / "configs"


def shipped_configs() -> list[str]:
    """Names of the shipped configs, sorted (``table1-...``, ``table4-sweep``)."""
    return sorted(
        entry.name.removesuffix(".json")
        for entry in _config_dir().iterdir()
        if entry.name.endswith(".json")
    )


def load_run_config(value: str | Path) -> RunConfig:
    """The config at ``value``: a JSON file, or the name of a shipped config.

    Raises :class:`InputError` naming the file when it is missing, not JSON, or not an object.
    """
    path = Path(value)
    name = str(value)
    if path.is_file():
        what = str(path)
        try:
            text = path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read config file {path}: {exc}") from None
    elif name.removesuffix(".json") in shipped_configs():
        name = name.removesuffix(".json")
        what = f"shipped config {name}"
        text = (_config_dir() / f"{name}.json").read_text(encoding="utf-8")
    else:
        raise InputError(
            f"config {value!r} is neither a file nor a shipped config; shipped: "
            f"{', '.join(shipped_configs())} (retclip configs lists them)"
        )
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InputError(f"{what} must hold a JSON object of option values")
    about = data.pop("about", {})
    if not isinstance(about, dict):
        raise InputError(f"{what}: 'about' must be an object")
    return RunConfig(name=name, options=data, about=about)
