"""The server's databases: named folders under ``<data_dir>/databases``, one writer each."""

from __future__ import annotations

import asyncio
import re
import threading
from pathlib import Path
from typing import Any

from retclip.database import FeatureDatabase
from retclip.errors import InputError
from retclip.server.config import ServerError

#: Database names: a letter or digit, then letters, digits, ``_``, ``-`` or ``.`` (no ``..``).
_DB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class Databases:
    """The databases under ``<data_dir>/databases``, opened once per committed state."""

    def __init__(self, data_dir: Path) -> None:
        self.root = (Path(data_dir) / "databases").resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._open: dict[str, tuple[FeatureDatabase, tuple[int, int]]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._guard = threading.Lock()

    def path(self, name: str) -> Path:
        """The folder of database ``name``; names that could leave the data folder → 400."""
        if not _DB_NAME.match(name) or ".." in name:
            raise InputError(
                f"invalid database name {name!r}: expected 1-64 letters, digits, '_', '-' or '.',"
                " starting with a letter or digit"
            )
        path = (self.root / name).resolve()
        if path.parent != self.root:
            raise InputError(f"invalid database name {name!r}: it leaves the data directory")
        return path

    def lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def names(self) -> list[str]:
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and (p / "meta.json").is_file()
        )

    @staticmethod
    def _stamp(path: Path) -> tuple[int, int]:
        """What changes when a commit replaces ``meta.json`` (the commit point)."""
        stat = (path / "meta.json").stat()
        return stat.st_mtime_ns, stat.st_ino

    def get(self, name: str) -> FeatureDatabase:
        """The opened database (404 when missing), reopened when its committed state changed,
        also by another process (``retclip db add`` while the server runs)."""
        path = self.path(name)
        try:
            stamp = self._stamp(path)
        except FileNotFoundError:
            raise ServerError(404, f"no database named {name!r}") from None
        with self._guard:
            found = self._open.get(name)
        if found is not None and found[1] == stamp:
            return found[0]
        opened = FeatureDatabase.open(path)
        with self._guard:
            self._open[name] = (opened, stamp)
        return opened

    def replace(self, name: str, db: FeatureDatabase | None) -> None:
        with self._guard:
            if db is None:
                self._open.pop(name, None)
            else:
                self._open[name] = (db, self._stamp(db.path))

    def info(self, name: str) -> dict[str, Any]:
        info = self.get(name).info()
        info["path"] = name
        info["name"] = name
        return info
