"""User-facing errors.

Every error a user can cause (bad input file, bad option value, mismatched database) is raised as a
:class:`RetclipError` subclass whose message names the offending file or value and what was
expected. The CLI prints such messages as one line and exits non-zero; anything else is a bug.
"""


class RetclipError(Exception):
    """Base class of errors caused by input, with a message meant for the user."""


class InputError(RetclipError, ValueError):
    """An input value, file or option is invalid (unreadable image, empty vocabulary, ...)."""


class DatabaseError(RetclipError):
    """A feature database is missing, corrupt, truncated or otherwise unusable."""


class DatabaseMismatchError(DatabaseError):
    """A database was built with a different backbone (fingerprint or dimension) than the query."""


class ModelUnavailableError(RetclipError):
    """A model's weights are not available locally (and cannot be downloaded)."""


class MissingExtraError(RetclipError):
    """A command needs an optional extra that is not installed (``pip install 'retclip[...]'``)."""


def require_extra(extra: str, feature: str, modules: tuple[str, ...]) -> None:
    """Raise :class:`MissingExtraError` naming ``extra`` when one of ``modules`` is missing.

    ``pip install retclip`` gives the library, ``segment``, ``db`` and ``eval``; the server and
    the demo's figures need ``retclip[serve]`` / ``retclip[demo]`` (or ``retclip[all]``).
    """
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtraError(
            f"{feature} needs {', '.join(missing)}, which this installation lacks: "
            f"pip install 'retclip[{extra}]'"
        )
