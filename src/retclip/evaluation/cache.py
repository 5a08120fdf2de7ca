"""The per-image score cache of ``retclip eval``: each image's masks and per-mask path scores,
written atomically, so an interrupted run resumes and any settings re-score without a model."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from retclip.errors import InputError
from retclip.files import atomic_write
from retclip.proposers.base import Proposals
from retclip.segmenter import (
    MaskScores,
    load_scores,
    save_scores,
)

CACHE_FORMAT = 1


class ScoreCache:
    """``<dir>/meta.json`` (what made the scores) and ``<dir>/<stem>.npz`` per image.

    ``meta.json`` records the dataset spec, the vocabulary, the training vocabulary and a
    ``model`` description (backbone, proposer, databases, k, pooling); reusing a cache with another
    model description is refused, since its scores would be stale.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    @property
    def meta_path(self) -> Path:
        return self.directory / "meta.json"

    def read_meta(self) -> dict[str, Any]:
        try:
            meta = json.loads(self.meta_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(
                f"no evaluation cache at {self.directory} (meta.json missing)"
            ) from None
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"cannot read {self.meta_path}: {exc}") from None
        if meta.get("format") != CACHE_FORMAT:
            raise InputError(f"{self.meta_path}: unknown cache format {meta.get('format')!r}")
        return dict(meta)

    def open(self, meta: dict[str, Any]) -> None:
        """Create the cache with ``meta``, or check that an existing one was made the same way."""
        meta = {"format": CACHE_FORMAT, **meta}
        if self.meta_path.exists():
            old = self.read_meta()
            changed = sorted(k for k in meta if old.get(k) != json.loads(json.dumps(meta[k])))
            if changed:
                raise InputError(
                    f"the cache {self.directory} was made with another {', '.join(changed)}; "
                    "give another --cache or delete it"
                )
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_write(self.meta_path, (json.dumps(meta, indent=2) + "\n").encode("utf-8"))

    def path(self, stem: str) -> Path:
        return self.directory / f"{stem}.npz"

    def has(self, stem: str) -> bool:
        return self.path(stem).is_file()

    def save(self, stem: str, proposals: Proposals, scores: MaskScores,
             class_names: Sequence[str]) -> None:  # fmt: skip
        """Store one image's proposals and per-mask path scores (atomically)."""
        save_scores(self.path(stem), proposals, scores, class_names)

    def load(self, stem: str) -> tuple[Proposals, MaskScores]:
        """The proposals (masks, scores) and per-mask path scores of ``stem``."""
        if not self.has(stem):
            raise InputError(f"image {stem} is not in the cache {self.directory}")
        return load_scores(self.path(stem))
