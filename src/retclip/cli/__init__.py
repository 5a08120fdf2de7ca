"""The ``retclip`` command line; one module per command group:

- :mod:`~retclip.cli.segment` — ``segment``;
- :mod:`~retclip.cli.db` — ``db build | add | remove | merge | info | index``;
- :mod:`~retclip.cli.eval` — ``eval``, ``sweep``;
- :mod:`~retclip.cli.serve` — ``serve``;
- :mod:`~retclip.cli.toyworld` — ``toyworld generate``, ``demo``;
- :mod:`~retclip.cli.models` — ``models``, ``vocab``, ``configs``, ``convert-fcclip``;
- :mod:`~retclip.cli.options` — the option groups they share and the clean error reporting.

Every error caused by input ends as one line ``Error: <cause>`` on stderr and exit status 1
(click's own usage errors: status 2); a traceback means a bug.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from typing import TextIO

import click

from retclip.cli.db import db
from retclip.cli.eval import eval_command, sweep_command
from retclip.cli.models import (
    configs_command,
    convert_fcclip_command,
    models_command,
    vocab_command,
)
from retclip.cli.options import CleanErrorsGroup
from retclip.cli.segment import segment
from retclip.cli.serve import serve
from retclip.cli.toyworld import demo_command, toyworld

__all__ = ["cli", "main"]


@click.group(cls=CleanErrorsGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="retclip")
def cli() -> None:
    """Open-vocabulary panoptic segmentation with retrieval augmentation (RetCLIP)."""


for command in (
    segment,
    db,
    eval_command,
    sweep_command,
    serve,
    toyworld,
    demo_command,
    models_command,
    vocab_command,
    configs_command,
    convert_fcclip_command,
):
    cli.add_command(command)


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """Warnings as one ``Warning: ...`` line on stderr (a user needs no source location)."""
    click.echo(f"Warning: {message}", err=True)


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point."""
    warnings.showwarning = _show_warning
    cli.main(args=list(argv) if argv is not None else sys.argv[1:], prog_name="retclip")
