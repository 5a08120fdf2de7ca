"""Pieces shared by every ``retclip`` command: clean error reporting, and the option groups for
models, retrieval and the ensemble — generated from the fields of :class:`~retclip.pipeline.
ModelSpec`, :class:`~retclip.pipeline.PipelineSpec` and :class:`~retclip.settings.Settings`, so
an option's type, choices, default and help are written once, on the field. Commands turn the
options they received back into a spec with :func:`model_spec` / :func:`pipeline_spec`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import click
from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticUndefined

from retclip.errors import InputError, RetclipError, require_extra
from retclip.pipeline import ModelSpec, PipelineSpec, spec_error
from retclip.settings import Settings


def _close_progress_bars() -> None:
    """End any open progress bar, so an error starts on a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _clean_errors(invoke: Callable[[click.Context], Any], ctx: click.Context) -> Any:
    try:
        return invoke(ctx)
    except RetclipError as exc:
        _close_progress_bars()
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        _close_progress_bars()
        raise click.ClickException("interrupted") from None
    except OSError as exc:  # a file-system fault no stage turned into a RetclipError (full disk)
        _close_progress_bars()
        where = f"{exc.filename}: " if exc.filename else ""
        raise click.ClickException(f"{where}{exc.strerror or exc}") from None


class CleanErrorsGroup(click.Group):
    """A group whose :class:`RetclipError` ends as one ``Error: ...`` line and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        return _clean_errors(super().invoke, ctx)


class CleanErrorsCommand(click.Command):
    """A command whose :class:`RetclipError` ends as one ``Error: ...`` line and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        return _clean_errors(super().invoke, ctx)


def with_options(options: Sequence[Callable[[Any], Any]]) -> Callable[[Any], Any]:
    """Apply a list of click options to a command, in list order."""

    def decorate(func: Any) -> Any:
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


def check_output_dir(out: Path) -> None:
    """Fail before any model work if ``out`` cannot be created or written."""
    if out.exists() and not out.is_dir():
        raise InputError(f"output path {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".retclip-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise InputError(f"output directory {out} is not writable: {exc.strerror}") from None


@contextlib.contextmanager
def output_dir(out: Path) -> Iterator[Path]:
    """:func:`check_output_dir`, and on failure remove ``out`` again if this call created it and
    nothing was written into it (a failing command leaves no empty folder behind)."""
    created = not out.exists()
    check_output_dir(out)
    try:
        yield out
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise


def _click_type(annotation: Any) -> tuple[Any, bool]:
    """The click type of a field annotation and whether it is a flag-less choice of strings."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    if typing.get_origin(annotation) is typing.Literal:
        return click.Choice([str(v) for v in typing.get_args(annotation)]), True
    if annotation is Path:
        return click.Path(path_type=Path), False
    if annotation in (int, float, str, bool):
        return annotation, False
    raise TypeError(f"no command-line type for {annotation!r}")


def _option(
    name: str,
    annotation: Any,
    default: Any,
    help_text: str | None,
    cli: dict[str, Any] | None = None,
    *,
    required: bool = False,
) -> Callable[[Any], Any]:
    cli = cli or {}
    flag = cli.get("flag") or "--" + name.replace("_", "-")
    flags = [cli["short"], flag] if cli.get("short") else [flag]
    click_type, _ = _click_type(annotation)
    kwargs: dict[str, Any] = {"type": click_type, "help": help_text, "required": required}
    if click_type is bool:  # a flag: --compile
        kwargs = {"is_flag": True, "default": bool(default), "help": help_text}
    elif default is not None and not required:
        kwargs.update(default=default, show_default=True)
    return click.option(*flags, name, **kwargs)


def spec_options(
    model: type[BaseModel],
    names: Sequence[str],
    *,
    required: Sequence[str] = (),
    defaults: dict[str, Any] | None = None,
) -> list[Callable[[Any], Any]]:
    """Options for ``names`` fields of a pydantic ``model``: flag ``--field-name`` (or the
    field's own), type and choices from the annotation, default and help from the field."""
    options = []
    for name in names:
        info = model.model_fields[name]
        default = info.default if info.default is not PydanticUndefined else None
        if defaults and name in defaults:
            default = defaults[name]
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        options.append(
            _option(
                name,
                info.annotation,
                default,
                info.description,
                extra.get("cli"),  # type: ignore[arg-type]
                required=name in required,
            )
        )
    return options


#: The ensemble option names, as :class:`retclip.settings.Settings` fields.
ENSEMBLE_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Settings))
#: Model options, as :class:`ModelSpec` fields (``--proposer`` is declared by each command;
#: ``--batch-size`` by the commands that batch images, :func:`batch_size_option`).
MODEL_FIELDS: tuple[str, ...] = tuple(
    n for n in ModelSpec.model_fields if n not in ("proposer", "batch_size")
)
#: Retrieval options, as :class:`PipelineSpec` fields.
RETRIEVAL_FIELDS = ("db", "fallback_db", "k", "pooling")


def model_options(*, backbone_required: bool = True) -> list[Callable[[Any], Any]]:
    """``--backbone`` and its settings, the proposer settings, ``--dtype`` and ``--device``."""
    return spec_options(
        ModelSpec, MODEL_FIELDS, required=("backbone",) if backbone_required else ()
    )


def batch_size_option(default: int, help_text: str) -> Callable[[Any], Any]:
    """``--batch-size`` (:attr:`ModelSpec.batch_size`) with a command's own default and help."""
    info = ModelSpec.model_fields["batch_size"]
    return _option("batch_size", info.annotation, default, help_text)


retrieval_options = spec_options(PipelineSpec, RETRIEVAL_FIELDS)
train_vocab_option = spec_options(PipelineSpec, ["train_vocab"])


def _ensemble_options() -> list[Callable[[Any], Any]]:
    hints = typing.get_type_hints(Settings)
    return [
        _option(f.name, hints[f.name], f.default, f.metadata.get("help"))
        for f in dataclasses.fields(Settings)
    ]


ensemble_options = _ensemble_options()


#: ``--ray [ADDRESS]``, ``--workers``, ``--gpus-per-worker``: the model stage on a Ray cluster.
ray_options = [
    click.option(
        "--ray",
        "ray_address",
        is_flag=False,
        flag_value="local",
        default=None,
        metavar="[ADDRESS]",
        help="Run the model stage on Ray (needs retclip[ray]): alone (or 'local'), a Ray started "
        "for the run; 'auto', the running cluster; or HOST:PORT / ray://HOST:PORT.",
    ),
    click.option(
        "--workers",
        type=int,
        help="With --ray: model workers [default: one per GPU, else one per CPU].",
    ),
    click.option(
        "--gpus-per-worker",
        type=float,
        help="With --ray: GPUs each worker holds, fractions share one [default: 1 on a cluster "
        "with GPUs, else 0].",
    ),
]


def ray_cluster(options: dict[str, Any]) -> Any:
    """The :class:`retclip.distributed.RayCluster` of the Ray options (taken out of
    ``options``), or ``None`` without ``--ray``; a missing extra is an error before any work."""
    address = options.pop("ray_address")
    workers, gpus = options.pop("workers"), options.pop("gpus_per_worker")
    if address is None:
        if workers is not None or gpus is not None:
            raise InputError("--workers and --gpus-per-worker need --ray")
        return None
    from retclip.distributed import RAY_MODULES, RayCluster

    require_extra("ray", "--ray", RAY_MODULES)
    return RayCluster(address, workers, gpus)


def model_spec(options: dict[str, Any], proposer: str | None) -> ModelSpec:
    """The :class:`ModelSpec` of a command's options (its model fields and ``--batch-size``;
    ``proposer`` given)."""
    names = (*MODEL_FIELDS, "batch_size")
    try:
        return ModelSpec(
            proposer=proposer, **{n: options[n] for n in names if options.get(n) is not None}
        ).resolved()
    except ValidationError as error:
        raise spec_error(error) from None


def pipeline_spec(options: dict[str, Any], proposer: str | None) -> PipelineSpec:
    """The :class:`PipelineSpec` of a command's options (model, retrieval, train vocabulary and
    ensemble fields)."""
    model = model_spec(options, proposer)
    fields = {
        n: options[n] for n in (*RETRIEVAL_FIELDS, "train_vocab") if options.get(n) is not None
    }
    try:
        settings = Settings(**{n: options[n] for n in ENSEMBLE_FIELDS if n in options})
        return PipelineSpec(model=model, settings=settings, **fields).resolved()
    except ValidationError as error:
        raise spec_error(error) from None
