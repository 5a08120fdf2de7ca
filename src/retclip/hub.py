"""The model hub: resolving model names and loading weights offline-first, one clear error when
absent (every model family loads through here: backbones, detectors, SAM).

A name is a short registered name (``clip-b16``, see :mod:`retclip.models`), a Hugging Face hub id
(``openai/clip-vit-base-patch16``) or a local directory. Loading always tries the local cache first
(``local_files_only``); it goes to the network only when ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE``
is unset, and then once (no retry loop of ours). A model that cannot be had raises
:class:`~retclip.errors.ModelUnavailableError` naming the id and the ways to provide it. Set
``HF_HUB_OFFLINE=1`` on machines without network: without it, the hub client spends 20–140 s on
connection attempts before failing.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from huggingface_hub import hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import EntryNotFoundError, HFValidationError

from retclip.errors import InputError, ModelUnavailableError
from retclip.models import ModelInfo, get_model_info

ModelFormat = Literal["transformers", "open_clip"]

#: Errors by which ``huggingface_hub``/``transformers`` report a model that cannot be had.
HUB_ERRORS: tuple[type[BaseException], ...] = (OSError, EntryNotFoundError, HFValidationError)
#: Weight files of an OpenCLIP hub repository, in order of preference.
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_TRUE = {"1", "true", "yes", "on"}


@dataclasses.dataclass(frozen=True)
class ResolvedModel:
    """Where a model name points.

    Attributes:
        source: a hub id or an absolute local directory.
        format: which library loads it.
        local: ``source`` is a local directory.
        info: the registry entry, if the name (or hub id) is registered.
    """

    source: str
    format: ModelFormat
    local: bool
    info: ModelInfo | None = None

    @property
    def model_id(self) -> str:
        """A stable id for fingerprints: the hub id, or the directory's resolved path."""
        return self.source


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` forbids network access."""
    return any(
        os.environ.get(var, "").strip().lower() in _TRUE
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def unavailable(model_id: str, cause: BaseException | None = None) -> ModelUnavailableError:
    """The one-line error for a model whose weights are not available locally."""
    reason = f" ({type(cause).__name__})" if cause is not None else ""
    mode = "offline mode is on" if hub_offline() else "it could not be downloaded"
    return ModelUnavailableError(
        f"model {model_id!r} is not in the local Hugging Face cache and {mode}{reason}: "
        f"fetch it once with `hf download {model_id}` (older clients: `huggingface-cli download "
        f"{model_id}`), point HF_HOME at a cache that holds it, or pass a local directory"
    )


def detect_format(directory: Path) -> ModelFormat:
    """The library a local model directory belongs to, from the config file it holds."""
    if (directory / "open_clip_config.json").is_file():
        return "open_clip"
    config = directory / "config.json"
    if config.is_file():
        try:
            model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type", "")
        except (OSError, ValueError) as exc:
            raise InputError(f"{config}: unreadable model config ({exc})") from exc
        if model_type:
            return "transformers"
    raise InputError(
        f"{directory}: not a model directory (expected open_clip_config.json, or config.json "
        "with a model_type)"
    )


def _cached(repo_id: str, filename: str) -> bool:
    try:
        return isinstance(try_to_load_from_cache(repo_id, filename), str)
    except HFValidationError:
        return False


def resolve_model(name: str) -> ResolvedModel:
    """Resolve a short name, hub id or local directory (see the module docstring).

    For an unregistered hub id the format is read from the cached files (``open_clip_config.json``
    → OpenCLIP, else transformers); online, from the hub.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        return ResolvedModel(str(path.resolve()), detect_format(path), local=True)
    info = get_model_info(name)
    if info is not None:
        return ResolvedModel(info.hub_id, info.library, local=False, info=info)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise InputError(
            f"unknown model {name!r}: not a registered name (`retclip models`), "
            "a hub id of the form owner/name, or an existing directory"
        )
    if _cached(name, "open_clip_config.json"):
        return ResolvedModel(name, "open_clip", local=False)
    if _cached(name, "config.json") or hub_offline():
        return ResolvedModel(name, "transformers", local=False)
    try:
        hf_hub_download(name, "open_clip_config.json")
    except HUB_ERRORS:
        return ResolvedModel(name, "transformers", local=False)
    return ResolvedModel(name, "open_clip", local=False)


def hf_load(loader: Callable[..., Any], source: str, **kwargs: object) -> Any:
    """``loader(source, **kwargs)`` (a ``from_pretrained``), local files first.

    Raises:
        ModelUnavailableError: neither cached nor downloadable (or offline).
    """
    try:
        return loader(source, local_files_only=True, **kwargs)
    except HUB_ERRORS as exc:
        if Path(source).is_dir() or hub_offline():
            raise unavailable(source, exc) from exc
    try:
        return loader(source, **kwargs)
    except HUB_ERRORS as exc:
        raise unavailable(source, exc) from exc


def _hub_file(repo_id: str, filename: str) -> str:
    try:
        return hf_hub_download(repo_id, filename, local_files_only=True)
    except HUB_ERRORS:
        if hub_offline():
            raise
    return hf_hub_download(repo_id, filename)


def open_clip_dir(resolved: ResolvedModel) -> Path:
    """A local directory with ``open_clip_config.json`` and weights, for OpenCLIP's ``local-dir:``.

    For a hub id this is the cached snapshot folder (both files fetched if online).
    """
    if resolved.local:
        return Path(resolved.source)
    try:
        config = Path(_hub_file(resolved.source, "open_clip_config.json"))
    except HUB_ERRORS as exc:
        raise unavailable(resolved.source, exc) from exc
    last: BaseException | None = None
    for weights in OPEN_CLIP_WEIGHTS:
        try:
            if Path(_hub_file(resolved.source, weights)).parent == config.parent:
                return config.parent
        except HUB_ERRORS as exc:
            last = exc
    raise unavailable(resolved.source, last)


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def parse_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The weights' dtype: ``None`` → float32; fp16/bf16 only on CUDA (slow or absent on CPU)."""
    if dtype is None:
        return torch.float32
    resolved = dtype if isinstance(dtype, torch.dtype) else _DTYPES.get(str(dtype).lower())
    if resolved not in (torch.float32, torch.float16, torch.bfloat16):
        raise InputError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
    if resolved != torch.float32 and device.type != "cuda":
        raise InputError(f"dtype {dtype!r} needs a CUDA device (got {device}); use float32")
    return resolved
