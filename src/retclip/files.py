"""Crash-safe writes and cross-process locks: the one copy every module uses.

Every file retclip writes is written to a unique temporary name beside its target and renamed
over it (``os.replace``, atomic on one filesystem), so a reader never sees a half-written file and
two writers never share a temporary file. ``durable=True`` also fsyncs the file and its folder
(the feature database's commit protocol). Locks are :mod:`filelock` locks (``flock`` on Unix,
``msvcrt`` on Windows), held across processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import filelock

__all__ = [
    "LockUnavailable",
    "atomic_write",
    "atomic_writer",
    "file_lock",
    "file_sha256",
    "fsync_dir",
    "read_json",
    "temp_path",
]


def temp_path(path: Path) -> Path:
    """A unique hidden temp name next to ``path`` (same filesystem, so ``os.replace`` is atomic)."""
    return path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def fsync_dir(directory: Path) -> None:
    """Make a directory's entries (a rename) durable; a no-op where unsupported."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def file_sha256(path: Path | str) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def atomic_writer(path: str | os.PathLike[str], *, durable: bool = False) -> Iterator[IO[bytes]]:
    """A binary file handle whose content replaces ``path`` when the block ends without error.

    The temporary file is created with mode ``0o666`` less the umask (as ``open`` would make
    the target); on any error it is removed and ``path`` is left as it was.
    """
    target = Path(path)
    tmp = temp_path(target)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(target.parent)


def atomic_write(path: str | os.PathLike[str], data: bytes | str, *, durable: bool = False) -> None:
    """Write ``data`` (``str`` as UTF-8) to ``path`` atomically (:func:`atomic_writer`)."""
    with atomic_writer(path, durable=durable) as handle:
        handle.write(data.encode("utf-8") if isinstance(data, str) else data)


class LockUnavailable(RuntimeError):
    """The lock file could not be created or opened (a read-only or missing folder)."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"cannot lock {path}: {reason}")
        self.path, self.reason = path, reason


@contextmanager
def file_lock(path: str | os.PathLike[str], *, timeout: float = -1) -> Iterator[None]:
    """Hold an exclusive cross-process lock on the lock file ``path`` (created if missing).

    ``timeout`` < 0 waits for as long as it takes. Raises :class:`LockUnavailable` when the lock
    file cannot be created or opened, and :class:`filelock.Timeout` when the timeout passes.
    """
    lock = filelock.FileLock(os.fspath(path), timeout=timeout, thread_local=False)
    try:
        lock.acquire()
    except OSError as error:
        raise LockUnavailable(Path(path), error.strerror or str(error)) from None
    try:
        yield
    finally:
        lock.release()


def read_json(path: str | os.PathLike[str], what: str) -> Any:
    """The JSON content of ``path``; a missing or unreadable file is an :class:`InputError`
    naming ``what`` and the file."""
    from retclip.errors import InputError

    try:
        return json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise InputError(f"{what} not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read {what} {path}: {exc}") from None
