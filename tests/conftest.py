from __future__ import annotations

import os
from pathlib import Path

import pytest

from scenes import write_scene_dataset


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Keep text-embedding caches of tests out of the user's home."""
    monkeypatch.setenv("RETCLIP_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
    yield


@pytest.fixture(scope="session")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Two disjoint synthetic COCO-panoptic splits: ``db`` (database) and ``val`` (queries)."""
    root = tmp_path_factory.mktemp("scenes")
    return {
        "db": write_scene_dataset(root / "db", 12, seed=1, name="db"),
        "val": write_scene_dataset(root / "val", 4, seed=2, name="val"),
    }


os.environ.setdefault("OMP_NUM_THREADS", "1")
