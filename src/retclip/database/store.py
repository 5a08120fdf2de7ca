"""The on-disk feature database: mask-pooled segment features with class labels (paper §2.1).

This module is :class:`FeatureDatabase` alone (creation, reads, the commit protocol, edits and
the index lifecycle of one database: one job, which is why it runs past 500 lines); the files
below it (``meta.json``, shards, the lock) are read and written by :mod:`retclip.database.shards`
and ``meta.json``'s schema is :mod:`retclip.database.meta`.

Each row is one segment: its L2-normalised backbone feature (dim ``D``), the id of its class label
and where it came from. At inference a segment feature retrieves its ``k`` most similar rows
(inner product of unit vectors = cosine) through a FAISS index (paper §2.2, retrieval path).

Directory format (``format_version`` 2)::

    DB/
      meta.json          human-readable (a line per key, shard and label), the commit point
      shards/NNNNNN.npz  one per commit (uncompressed npz):
                           features    [n, D] float16 | float32 (unit rows)
                           label_ids   [n] int32, index into meta.json "labels"
                           sources     [n] unicode, the image each row was pooled from
                           boxes       [n, 4] float32, XYXY pixels (NaN when unknown)
                           mask_areas  [n] int64, mask pixels (-1 when unknown)
                           scores      [n] float32, detector confidence (NaN when unknown)
                           build_ids   [n] unicode, the build that added the row
      shards/NNNNNN.completed.json
                         the sources that shard's commit finished, ``{build id: [source, ...]}``
                         (compact JSON; absent when it finished none)
      index.faiss        the persisted FAISS index (not written for "flat": rebuilding an exact
                         index is a copy of the features, and persisting it would double the disk)
      .lock              lock file serialising writers (filelock: flock(2) on Unix)

``meta.json`` holds ``format_version``, ``fingerprint`` (the backbone's, see
:class:`~retclip.backbones.base.BackboneFingerprint`: model, preprocessing and resolution),
``pooling`` (the mask-pooling rule of the rows, ``"soft"``, ``"binary"``, or ``null`` when not
recorded; with the fingerprint it is the database's *recipe*, which queries must share), ``dim``,
``dtype`` (``"float16"`` default or ``"float32"``), ``metric`` (``"inner_product"``), ``rows``,
``rows_per_class`` ``{label: n}``,
``labels`` ``[{"name", "synonyms"}]`` (a label's id is its position), ``index`` (the
:class:`~retclip.database.index.IndexSpec` as ``{type, params}``), ``index_file`` (``null`` or
``{file, spec, generation, rows, bytes, sha256}``: the build parameters and data generation the
persisted index was built for, and its checksum), ``shards`` (``[{file, rows, bytes, sha256,
build_ids, completed}]``: ``build_ids`` includes every build the shard completed sources for, and
``completed`` is ``null`` or ``{file, bytes, sha256, sources}`` of its completed-sources file),
``generation`` (bumped by every data commit), ``created``/``updated`` (UTC ISO timestamps) and
``checksum`` (SHA-256 of the rest, so a hand edit reads as corruption). Row ``i`` of the database
is row ``i`` of the concatenated shards, in listed order. Nothing in ``meta.json`` grows with the
rows or the images, only with the shards and labels: a commit rewrites O(shards) bytes there and
writes O(its rows) bytes of shard, so its cost does not grow with the database (bench/RESULTS.md,
"Database commit cost vs completed images").

Format 1 listed each shard's completed sources in ``meta.json`` (``completed_sources`` in the
shard entry; no ``.completed.json`` files), so every commit rewrote all of them. It is read as is
(also on a read-only file system); the first write under the writer lock upgrades it, as a commit
of its own (:func:`~retclip.database.shards.upgrade_meta`: the completed-sources files first,
then ``meta.json``; the shards are untouched), so a crash leaves format 1 or format 2. A newer
format than :data:`FORMAT_VERSION` is refused.

Commit protocol: a shard and then its completed-sources file are each written to a temporary
name in ``shards/``, fsynced and renamed (``os.replace``) to their final names; then ``meta.json``
is written the same way. Replacing ``meta.json`` is the commit point: a file in ``shards/`` not
listed there (left by a crash) is ignored, and deleted by the next write. A crash at any instant
therefore leaves the database at its previous or its next committed state, never half-written and
never with rows counted twice. Writers hold an exclusive ``flock`` on ``.lock`` and re-read
``meta.json`` under it, so concurrent writers serialise instead of losing commits; a writer's
check that its sources are not completed yet reads only the shards committed since its last check
(committed files never change). A :class:`FeatureDatabase` object reads a snapshot: commits by
other processes become visible when it is reopened or writes itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
import warnings
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from retclip.backbones.base import BackboneFingerprint
from retclip.database.index import (
    IndexSpec,
    load_index,
    move_ondisk_file,
    ondisk_file,
    save_index,
    search_index,
)
from retclip.database.index_build import CoarseLists, build_index_streaming, check_lists
from retclip.database.index_recall import DEFAULT_KS, RecallReport, evaluate_recall
from retclip.database.shards import (
    DTYPES,
    FORMAT_VERSION,
    INDEX_NAME,
    META_NAME,
    METRIC,
    PROVENANCE_KEYS,
    SHARD_DIR,
    DatabaseLabel,
    ShardRows,
    check_shard_files,
    column,
    completed_name,
    iter_features,
    locked,
    merge_completed,
    read_completed,
    read_meta,
    read_rows,
    read_shard,
    string_array,
    upgrade_meta,
    utc_now,
    write_completed,
    write_meta,
    write_shard,
)
from retclip.errors import DatabaseError, DatabaseMismatchError, InputError
from retclip.files import (
    file_sha256,
    fsync_dir,
)
from retclip.vocabulary import VocabClass, Vocabulary

__all__ = ["DTYPES", "FORMAT_VERSION", "META_NAME", "DatabaseLabel", "FeatureDatabase"]


class FeatureDatabase:
    """A directory of labelled, L2-normalised segment features with a FAISS index.

    Create with :meth:`create`, open with :meth:`open`. Every write (:meth:`add`,
    :meth:`remove_classes`, :meth:`remove_sources`) is one atomic commit; see the module docstring
    for the format and the crash-safety argument.
    """

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self._path = path
        self._meta = meta
        self._features: np.ndarray | None = None
        self._columns: dict[str, np.ndarray] | None = None
        self._index: faiss.Index | None = None
        self._index_key: tuple[int, str] | None = None
        # build id -> ((file, sha256) of the shards read, their completed sources): listed shards
        # never change, so a commit reads only the shards committed since (see _completed_by)
        self._done: dict[str, tuple[list[tuple[str, str]], set[str]]] = {}

    # -- creation -------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        *,
        fingerprint: BackboneFingerprint,
        dim: int,
        dtype: str = "float16",
        index: IndexSpec | None = None,
        exist_ok: bool = False,
        pooling: str | None = None,
    ) -> FeatureDatabase:
        """Create an empty database at ``path`` (a new or empty directory).

        ``pooling`` is the mask-pooling rule its rows will be pooled with (recorded, and checked
        against every query). With ``exist_ok`` an existing database is opened instead; it must
        have been built with the same ``fingerprint``, ``dim`` and ``pooling`` (else
        :class:`DatabaseMismatchError`), keeps its dtype, and takes ``index`` as its index spec
        when given.
        """
        db, _ = cls.create_or_open(
            path,
            fingerprint=fingerprint,
            dim=dim,
            dtype=dtype,
            index=index,
            exist_ok=exist_ok,
            pooling=pooling,
        )
        return db

    @classmethod
    def create_or_open(
        cls,
        path: str | os.PathLike[str],
        *,
        fingerprint: BackboneFingerprint,
        dim: int,
        dtype: str = "float16",
        index: IndexSpec | None = None,
        exist_ok: bool = True,
        pooling: str | None = None,
    ) -> tuple[FeatureDatabase, bool]:
        """:meth:`create`, also saying whether this call created the database (``False``: an
        existing one was opened, which needs ``exist_ok``).

        Creation is atomic: the database is assembled in a temporary folder beside ``path`` and
        renamed into place, so ``path`` never exists without its ``meta.json``, and of two
        processes creating the same path at once one creates it and the other opens it.
        """
        db_path = Path(path)
        if dtype not in DTYPES:
            raise InputError(f"database dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise InputError(f"database dim {dim!r}; expected a positive integer")
        if index is not None:
            index.check_dim(dim)  # before anything is written
        if not (db_path / META_NAME).exists():
            if db_path.exists() and (not db_path.is_dir() or any(db_path.iterdir())):
                raise DatabaseError(
                    f"{db_path} exists and is not a feature database (no {META_NAME}); "
                    "expected a new or empty directory"
                )
            stamp = utc_now()
            meta: dict[str, Any] = {
                "format_version": FORMAT_VERSION,
                "fingerprint": fingerprint.to_dict(),
                "pooling": pooling,
                "dim": dim,
                "dtype": dtype,
                "metric": METRIC,
                "rows": 0,
                "rows_per_class": {},
                "labels": [],
                "index": (index or IndexSpec("auto")).to_dict(),
                "index_file": None,
                "shards": [],
                "generation": 0,
                "created": stamp,
                "updated": stamp,
            }
            if _create_in_place(db_path, meta):
                return cls(db_path, meta), True
            # another process created it in the meantime: open that one (below)
        if not exist_ok:
            raise DatabaseError(
                f"a feature database already exists at {db_path} (open it, or pass exist_ok)"
            )
        db = cls.open(db_path)
        db.check_compatible(fingerprint, dim, pooling=pooling)
        if index is not None and index != db.index_spec:
            db._record_spec(index)
        return db, False

    def check_writable(self) -> None:
        """Fail now with one :class:`DatabaseError` if this database cannot be written (a
        read-only mount, no permission): a build checks it before its first model pass, which
        may take hours, rather than failing at its first commit. Creates and removes a probe
        file, without the writer lock (another writer may hold it for a long index build); it
        is named as a temp file, so one a crash leaves is removed by the next writer."""
        probe = self._path / f".write-probe.tmp-{uuid.uuid4().hex[:12]}"
        try:
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            probe.unlink(missing_ok=True)  # (or another writer's clean-up took it first)
        except OSError as error:
            raise DatabaseError(
                f"cannot write to feature database {self._path}: {error.strerror or error}"
            ) from None

    def discard_if_empty(self) -> bool:
        """Delete this database if no commit ever added to it (generation 0): what a build that
        created it and then failed leaves. Decided under the writer lock; ``True`` if deleted."""
        with self._writing() as meta:
            if meta["generation"] != 0 or meta["shards"]:
                return False
            doomed = self._path.parent / f".{self._path.name}.discarded-{uuid.uuid4().hex[:12]}"
            os.rename(self._path, doomed)  # gone at once for every later writer and reader
        shutil.rmtree(doomed, ignore_errors=True)
        return True

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, verify: bool = True) -> FeatureDatabase:
        """Open the database at ``path``.

        Checks that every shard listed in ``meta.json`` exists with its recorded size and, when
        ``verify``, its SHA-256 (reads every shard once). Problems → :class:`DatabaseError`.
        """
        db_path = Path(path)
        meta = read_meta(db_path)
        check_shard_files(db_path, meta, verify)
        return cls(db_path, meta)

    # -- properties -----------------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self._path

    @property
    def fingerprint(self) -> BackboneFingerprint:
        return BackboneFingerprint.from_dict(self._meta["fingerprint"])

    @property
    def dim(self) -> int:
        return int(self._meta["dim"])

    @property
    def dtype(self) -> str:
        return str(self._meta["dtype"])

    @property
    def num_rows(self) -> int:
        return int(self._meta["rows"])

    def __len__(self) -> int:
        return self.num_rows

    def vocabulary(self) -> Vocabulary:
        """Every label that has rows, with its synonyms, as a vocabulary (``--vocab db``):
        segmenting with everything the database knows needs no class list."""
        counts = self.rows_per_class()
        classes = [
            VocabClass(label.name, label.synonyms)
            for label in self.labels
            if counts.get(label.name, 0) > 0
        ]
        if not classes:
            raise InputError(f"feature database {self._path} has no rows, so no labels")
        return Vocabulary(classes, name=f"db:{self._path.name}")

    @property
    def labels(self) -> list[DatabaseLabel]:
        """The label table; a row's label id indexes this list."""
        return [DatabaseLabel(d["name"], tuple(d["synonyms"])) for d in self._meta["labels"]]

    @property
    def generation(self) -> int:
        """Counter bumped by every data commit (identifies a snapshot of the rows)."""
        return int(self._meta["generation"])

    @property
    def index_spec(self) -> IndexSpec:
        return IndexSpec.from_dict(self._meta["index"])

    def __repr__(self) -> str:
        return (
            f"FeatureDatabase({str(self._path)!r}, rows={self.num_rows}, "
            f"labels={len(self._meta['labels'])}, dim={self.dim}, {self.fingerprint})"
        )

    # -- reading --------------------------------------------------------------------------

    def features(self) -> np.ndarray:
        """All features ``[R, D]`` float32 (unit rows), loaded on first use and cached."""
        if self._features is None:
            out = np.empty((self.num_rows, self.dim), dtype=np.float32)
            start = 0
            for shard in self._meta["shards"]:
                part = read_shard(self._path, self._meta, shard, ("features",))["features"]
                out[start : start + shard["rows"]] = part
                start += shard["rows"]
            self._features = out
        return self._features

    def _load_columns(self) -> dict[str, np.ndarray]:
        if self._columns is None:
            keys = ("label_ids", *PROVENANCE_KEYS)
            parts = [read_shard(self._path, self._meta, s, keys) for s in self._meta["shards"]]
            empty = ShardRows.empty(self.dim, self.dtype)
            self._columns = {
                key: np.concatenate([p[key] for p in parts]) if parts else getattr(empty, key)
                for key in keys
            }
            self._columns["label_ids"] = self._columns["label_ids"].astype(np.int32, copy=False)
        return self._columns

    def label_ids(self) -> np.ndarray:
        """Label id of every row, ``[R]`` int32 (index into :attr:`labels`)."""
        return self._load_columns()["label_ids"]

    def provenance(self) -> dict[str, np.ndarray]:
        """Per-row ``sources`` [R] str, ``boxes`` [R, 4] float32 XYXY px, ``mask_areas`` [R] int64,
        ``scores`` [R] float32 and ``build_ids`` [R] str (NaN / -1 where unknown)."""
        columns = self._load_columns()
        return {key: columns[key] for key in PROVENANCE_KEYS}

    def rows_per_class(self) -> dict[str, int]:
        """``{label name: row count}`` in label-id order."""
        return {str(k): int(v) for k, v in self._meta["rows_per_class"].items()}

    def completed_sources(self, build_id: str) -> set[str]:
        """Sources that commits of ``build_id`` finished (rows added or recorded as done): an
        interrupted build resumes by skipping them. Reads the completed-sources file of every
        shard of that build (O(images)) on first use; later calls read only newer shards."""
        return set(self._completed_by(self._meta, build_id))

    def _completed_by(self, meta: dict[str, Any], build_id: str) -> set[str]:
        """The sources ``build_id`` completed in the snapshot ``meta`` (the cache itself: not to
        be changed). Incremental: when the shards read before are still the first ones listed,
        only the shards after them are read (a commit costs O(its rows), not O(database))."""
        keys = [(shard["file"], shard["sha256"]) for shard in meta["shards"]]
        seen, done = self._done.get(build_id, ([], set()))
        if keys[: len(seen)] != seen:  # shards replaced (compaction) or another database
            seen, done = [], set()
        for shard in meta["shards"][len(seen) :]:
            if build_id in shard["build_ids"]:  # a commit's builds include its completed ones
                done.update(read_completed(self._path, shard).get(build_id, ()))
        self._done[build_id] = (keys, done)
        return done

    @property
    def pooling(self) -> str | None:
        """The mask-pooling rule the rows were pooled with (``None``: not recorded)."""
        value = self._meta.get("pooling")
        return value if isinstance(value, str) else None

    def check_compatible(
        self, fingerprint: BackboneFingerprint, dim: int, *, pooling: str | None = None
    ) -> None:
        """Refuse queries of another recipe: another backbone (model, preprocessing,
        resolution) or, where both are known, another mask-pooling rule."""
        if fingerprint != self.fingerprint or dim != self.dim:
            raise DatabaseMismatchError(
                f"database {self._path} was built with backbone {self.fingerprint} "
                f"(dim {self.dim}); the query backbone is {fingerprint} (dim {dim}): rebuild the "
                "database with this backbone or pick the matching one"
            )
        if pooling is not None and self.pooling is not None and pooling != self.pooling:
            raise DatabaseMismatchError(
                f"database {self._path} was built with {self.pooling!r} mask pooling; the "
                f"queries are pooled with {pooling!r}: rebuild the database with --pooling "
                f"{pooling} (or query it with --pooling {self.pooling})"
            )

    def info(self) -> dict[str, Any]:
        """A JSON-able summary (for ``retclip db info``)."""
        meta = self._meta
        record = meta.get("index_file")
        spec = self.index_spec
        return {
            "path": str(self._path),
            "format_version": meta["format_version"],
            "rows": self.num_rows,
            "labels": len(meta["labels"]),
            "rows_per_class": self.rows_per_class(),
            "dim": self.dim,
            "dtype": self.dtype,
            "metric": meta.get("metric", METRIC),
            "fingerprint": dict(meta["fingerprint"]),
            "pooling": self.pooling,
            "index": {
                **spec.to_dict(),
                "text": str(spec),
                "resolved": str(spec.resolve(self.num_rows, self.dim)),
                "persisted": self._record_is_current(record, spec)
                and (self._path / INDEX_NAME).is_file()
                and all((self._path / name).is_file() for name in _ondisk_names(record)),
            },
            "shards": len(meta["shards"]),
            "completed_sources": sum(
                (s["completed"] or {}).get("sources", 0)
                if "completed" in s
                else sum(map(len, s["completed_sources"].values()))
                for s in meta["shards"]
            ),
            "bytes": sum(s["bytes"] for s in meta["shards"]),
            "build_ids": sorted({b for s in meta["shards"] for b in s["build_ids"]}),
            "generation": self.generation,
            "created": meta.get("created"),
            "updated": meta.get("updated"),
        }

    # -- writing --------------------------------------------------------------------------

    @contextmanager
    def _writing(self) -> Iterator[dict[str, Any]]:
        """Lock, re-read the committed meta.json, drop crash leftovers; yields that meta, upgraded
        to the current format first when older (one commit of its own, :func:`upgrade_meta`).

        A write that fails on the file system (a full disk, a read-only mount) ends as one
        :class:`DatabaseError`: the commit point (``meta.json``) is written last, so the database
        is left at its last commit.
        """
        with locked(self._path):
            meta = read_meta(self._path)
            try:
                self._clean_orphans(meta)
                meta = upgrade_meta(self._path, meta)
                yield meta
            except OSError as error:
                raise DatabaseError(
                    f"cannot write to feature database {self._path}: "
                    f"{error.strerror or error}; it is unchanged (still at its last commit)"
                ) from None

    def _clean_orphans(self, meta: dict[str, Any]) -> None:
        """Delete shard files not listed in ``meta`` and temp files left by a crashed writer."""
        listed = {shard["file"] for shard in meta["shards"]}
        listed.update(s["completed"]["file"] for s in meta["shards"] if s.get("completed"))
        shard_dir = self._path / SHARD_DIR
        shard_dir.mkdir(exist_ok=True)
        for entry in shard_dir.iterdir():
            if entry.name not in listed and entry.is_file():
                entry.unlink(missing_ok=True)
        for entry in self._path.glob(".*.tmp-*"):
            entry.unlink(missing_ok=True)

    def _refresh(self, meta: dict[str, Any]) -> None:
        if meta["generation"] != self._meta["generation"]:
            self._features = None
            self._columns = None
        self._meta = meta

    def _commit(
        self,
        meta: dict[str, Any],
        rows: ShardRows,
        labels: list[DatabaseLabel],
        build_ids: Iterable[str],
        completed: Mapping[str, Iterable[str]],
        *,
        replace: bool,
    ) -> None:
        """Write ``rows`` as a new shard and commit ``meta`` (appended, or replacing all shards)."""
        number = 1 + max((int(s["file"].split(".")[0]) for s in meta["shards"]), default=0)
        entry = write_shard(self._path / SHARD_DIR, number, rows)
        entry["build_ids"] = sorted(set(build_ids) | set(completed))
        entry["completed"] = write_completed(self._path / SHARD_DIR, entry["file"], completed)
        counts = np.bincount(rows.label_ids, minlength=len(labels))
        old_files = [s["file"] for s in meta["shards"]]
        if replace:
            meta["shards"] = [entry]
            meta["rows"] = len(rows)
        else:
            prior = np.array([meta["rows_per_class"].get(label.name, 0) for label in labels])
            counts = counts + prior.astype(np.int64)
            meta["shards"].append(entry)
            meta["rows"] += len(rows)
        meta["labels"] = [{"name": lb.name, "synonyms": list(lb.synonyms)} for lb in labels]
        meta["rows_per_class"] = {lb.name: int(c) for lb, c in zip(labels, counts, strict=True)}
        meta["generation"] += 1
        meta["updated"] = utc_now()
        write_meta(self._path, meta)
        if replace:
            for name in old_files:
                (self._path / SHARD_DIR / name).unlink(missing_ok=True)
                (self._path / SHARD_DIR / completed_name(name)).unlink(missing_ok=True)
            fsync_dir(self._path / SHARD_DIR)
        self._refresh(meta)

    def add(
        self,
        features: np.ndarray,
        labels: Sequence[str],
        *,
        sources: Sequence[str],
        boxes: np.ndarray | None = None,
        mask_areas: np.ndarray | None = None,
        scores: np.ndarray | None = None,
        build_id: str = "",
        synonyms: Mapping[str, Sequence[str]] | None = None,
        completed_sources: Sequence[str] = (),
    ) -> int:
        """Append rows in one atomic commit (one shard); returns the number of rows added.

        Args:
            features: ``[n, D]`` real features; L2-normalised here (so similarities are cosines)
                and stored in the database dtype.
            labels: ``n`` class names; a new name gets the next label id, with synonyms from
                ``synonyms`` (else ``(name,)``); an existing label's synonyms are extended.
            sources: ``n`` image identifiers the rows were pooled from.
            boxes, mask_areas, scores: optional ``[n, 4]`` XYXY px, ``[n]`` pixels, ``[n]``
                detector confidences (unknown → NaN, -1, NaN).
            build_id: names the build run, for :meth:`completed_sources`.
            completed_sources: sources this commit finishes, also those that gave no rows (``n``
                may be 0 then). Sources of the added rows count as finished too.
        """
        feats = np.asarray(features)
        if feats.ndim != 2 or feats.shape[1] != self.dim:
            raise InputError(
                f"features have shape {feats.shape}; expected [n, {self.dim}] for database "
                f"{self._path}"
            )
        if not (np.issubdtype(feats.dtype, np.floating) or np.issubdtype(feats.dtype, np.integer)):
            raise InputError(f"features have dtype {feats.dtype}; expected real numbers")
        feats = feats.astype(np.float32)
        n = feats.shape[0]
        if not np.isfinite(feats).all():
            raise InputError("features contain NaN or infinite values; expected finite numbers")
        norms = np.linalg.norm(feats, axis=1, keepdims=True)
        if (norms == 0).any():
            bad = int(np.flatnonzero(norms[:, 0] == 0)[0])
            raise InputError(f"feature row {bad} is all zeros; cannot L2-normalise it")
        feats /= norms
        label_arr = string_array(labels, "labels", n)
        if (label_arr == "").any():
            raise InputError("labels contain an empty name; expected non-empty class names")
        source_arr = string_array(sources, "sources", n)
        done = string_array(completed_sources, "completed_sources", None)
        if n == 0 and done.size == 0:
            raise InputError("nothing to add: no feature rows and no completed_sources")
        if not isinstance(build_id, str):
            raise InputError(f"build_id {build_id!r}; expected a string")
        box_arr = column(boxes, "boxes", (n, 4), np.float32, np.nan)
        area_arr = column(mask_areas, "mask_areas", (n,), np.int64, -1)
        score_arr = column(scores, "scores", (n,), np.float32, np.nan)
        extra = dict(synonyms or {})

        with self._writing() as meta:
            if build_id:
                # another writer of the same build may have committed these sources since this
                # one started (two identical `db add` runs): re-checked under the lock, so a
                # source's rows are committed once (set look-ups: O(rows), not O(database))
                already = self._completed_by(meta, build_id)
                if already:
                    fresh = np.array([s not in already for s in source_arr.tolist()], dtype=bool)
                    feats, label_arr, source_arr = feats[fresh], label_arr[fresh], source_arr[fresh]
                    box_arr, area_arr, score_arr = box_arr[fresh], area_arr[fresh], score_arr[fresh]
                    done = done[np.array([d not in already for d in done.tolist()], dtype=bool)]
                    n = int(fresh.sum())
                    if n == 0 and done.size == 0:
                        return 0
            table = [DatabaseLabel(d["name"], tuple(d["synonyms"])) for d in meta["labels"]]
            ids = {label.name: i for i, label in enumerate(table)}
            names, inverse = np.unique(label_arr, return_inverse=True)
            for name in names.tolist():
                wanted = tuple(dict.fromkeys(str(s) for s in extra.get(name, ())))
                if name in ids:
                    old = table[ids[name]]
                    table[ids[name]] = DatabaseLabel(
                        name, tuple(dict.fromkeys(old.synonyms + wanted))
                    )
                else:
                    ids[name] = len(table)
                    table.append(DatabaseLabel(name, wanted or (name,)))
            lookup = np.array([ids[name] for name in names.tolist()], dtype=np.int32)
            rows = ShardRows(
                features=feats.astype(meta["dtype"]),
                label_ids=lookup[inverse.reshape(-1)].astype(np.int32),
                sources=source_arr,
                boxes=box_arr,
                mask_areas=area_arr,
                scores=score_arr,
                build_ids=np.full(n, build_id, dtype=f"<U{max(len(build_id), 1)}"),
            )
            finished = set(np.unique(source_arr).tolist()) | set(done.tolist())
            self._commit(meta, rows, table, [build_id], {build_id: finished}, replace=False)
        return n

    def remove(self, *, classes: Sequence[str] = (), sources: Sequence[str] = ()) -> int:
        """Delete every row of the named ``classes`` and every row pooled from ``sources`` (which
        are also forgotten as completed), in one commit; returns rows removed.

        Unknown class names → :class:`InputError` (nothing changes). Labels left without rows
        leave the label table, so label ids are renumbered.
        """
        wanted = set(string_array(classes, "class names", None).tolist())
        gone = string_array(sources, "sources", None)
        gone_set = set(gone.tolist())
        with self._writing() as meta:
            known = [d["name"] for d in meta["labels"]]
            unknown = sorted(wanted - set(known))
            if unknown:
                shown = ", ".join(known[:50])
                if len(known) > 50:
                    shown += f", … ({len(known) - 50} more)"
                raise InputError(
                    f"unknown class(es) {', '.join(map(repr, unknown))} in database "
                    f"{self._path.name}; known labels: {shown or '(none)'}"
                )
            drop = np.array([i for i, name in enumerate(known) if name in wanted], dtype=np.int32)
            rows = read_rows(self._path, meta)
            keep = ~np.isin(rows.label_ids, drop) & ~np.isin(rows.sources, gone)
            completed = merge_completed(read_completed(self._path, s) for s in meta["shards"])
            forgotten = any(done & gone_set for done in completed.values())
            if keep.all() and not forgotten:
                return 0
            completed = {b: done - gone_set for b, done in completed.items()}
            return self._compact(meta, rows, keep, completed)

    def remove_classes(self, names: Sequence[str]) -> int:
        """Delete every row of the named classes (:meth:`remove`); returns rows removed."""
        return self.remove(classes=names)

    def remove_sources(self, sources: Sequence[str]) -> int:
        """Delete every row pooled from ``sources`` (:meth:`remove`); returns rows removed."""
        return self.remove(sources=sources)

    def _compact(
        self,
        meta: dict[str, Any],
        rows: ShardRows,
        keep: np.ndarray,
        completed: Mapping[str, Iterable[str]],
    ) -> int:
        """Commit the rows where ``keep`` as the only shard, dropping labels left without rows."""
        kept = rows.select(keep)
        used = np.unique(kept.label_ids)
        remap = np.full(len(meta["labels"]), -1, dtype=np.int32)
        remap[used] = np.arange(used.size, dtype=np.int32)
        kept.label_ids = remap[kept.label_ids]
        labels = [
            DatabaseLabel(meta["labels"][i]["name"], tuple(meta["labels"][i]["synonyms"]))
            for i in used.tolist()
        ]
        build_ids = {b for s in meta["shards"] for b in s["build_ids"]}
        self._commit(meta, kept, labels, build_ids, completed, replace=True)
        return len(rows) - len(kept)

    @classmethod
    def merge(
        cls,
        out_path: str | os.PathLike[str],
        databases: Sequence[FeatureDatabase],
        *,
        dtype: str | None = None,
    ) -> FeatureDatabase:
        """Write the union of ``databases`` as a new database at ``out_path`` (new or empty dir).

        All inputs must share fingerprint and dim (else :class:`DatabaseMismatchError`). Labels
        are unified by name (synonyms unioned), provenance and completed sources are kept, the
        index spec is the first input's. ``dtype`` defaults to the inputs' common dtype (float32
        when they differ). The output appears atomically (built in a sibling temp dir, renamed).
        """
        if not databases:
            raise InputError("merge needs at least one database")
        first = databases[0]
        for db in databases[1:]:
            if db.fingerprint != first.fingerprint or db.dim != first.dim:
                raise DatabaseMismatchError(
                    f"cannot merge database {db.path} (backbone {db.fingerprint}, dim {db.dim}) "
                    f"with {first.path} (backbone {first.fingerprint}, dim {first.dim}): merged "
                    "databases must share one backbone"
                )
            if db.pooling != first.pooling:
                raise DatabaseMismatchError(
                    f"cannot merge database {db.path} ({db.pooling!r} pooling) with {first.path} "
                    f"({first.pooling!r} pooling): merged databases must share one recipe"
                )
        dtypes = {db.dtype for db in databases}
        out_dtype = dtype or (dtypes.pop() if len(dtypes) == 1 else "float32")
        out = Path(out_path)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise DatabaseError(f"cannot merge into {out}: it exists and is not an empty directory")
        table: dict[str, tuple[str, ...]] = {}
        parts: list[ShardRows] = []
        for db in databases:
            rows = read_rows(db.path, db._meta)
            for label in db.labels:
                table[label.name] = tuple(dict.fromkeys(table.get(label.name, ()) + label.synonyms))
            position = {name: i for i, name in enumerate(table)}
            lookup = np.array([position[label.name] for label in db.labels], dtype=np.int32)
            if len(rows):
                rows.label_ids = lookup[rows.label_ids]
            rows.features = rows.features.astype(out_dtype)
            parts.append(rows)
        merged = ShardRows.concat(parts, first.dim, out_dtype)
        labels = [DatabaseLabel(name, synonyms) for name, synonyms in table.items()]
        completed = merge_completed(
            read_completed(db.path, s) for db in databases for s in db._meta["shards"]
        )
        build_ids = {b for db in databases for s in db._meta["shards"] for b in s["build_ids"]}
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.merge-", dir=out.parent))
        try:
            staged = cls.create(
                tmp / "db",
                fingerprint=first.fingerprint,
                dim=first.dim,
                dtype=out_dtype,
                index=first.index_spec,
                pooling=first.pooling,
            )
            staged._commit(staged._meta, merged, labels, build_ids, completed, replace=True)
            if out.exists():
                out.rmdir()
            os.rename(tmp / "db", out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return cls.open(out, verify=False)

    # -- index and search -----------------------------------------------------------------

    def _record_spec(self, spec: IndexSpec) -> dict[str, Any]:
        spec.check_dim(self.dim)
        with self._writing() as meta:
            meta["index"] = spec.to_dict()
            exact = spec.resolve(int(meta["rows"]), self.dim).type == "flat"
            drop_file = exact and meta.get("index_file") is not None
            if drop_file:
                meta["index_file"] = None
            write_meta(self._path, meta)
            if drop_file:
                (self._path / INDEX_NAME).unlink(missing_ok=True)
                self._remove_ondisk_files(keep=())
        self._refresh(meta)
        return meta

    def record_pooling(self, pooling: str) -> None:
        """Record the pooling rule of a database that has none recorded yet (and no rows, so
        the rule is known to hold for all of them); else it must equal the recorded one."""
        if self.pooling is not None or self.num_rows:
            if self.pooling not in (None, pooling):
                raise DatabaseMismatchError(
                    f"database {self._path} holds {self.pooling!r}-pooled rows, not {pooling!r}"
                )
            return
        with self._writing() as meta:
            if meta.get("pooling") is None and not meta["rows"]:
                meta["pooling"] = pooling
                write_meta(self._path, meta)
        self._refresh(meta)

    def set_index(self, spec: IndexSpec, *, reuse_lists: bool = False) -> None:
        """Make ``spec`` the database's index; (re)builds and persists it now if needed.

        Unlike a search, which uses an index it could not save, this fails
        (:class:`DatabaseError`) when the index cannot be saved: saving it is what was asked.
        With ``reuse_lists``, ``spec`` (a plain IVF index with as many lists) is built into the
        IVF lists of the saved current index: its codes only, no k-means and no assignment of
        the rows, the costly parts of a large build.
        """
        lists = None
        if reuse_lists:
            lists = self._saved_lists()
            check_lists(spec.resolve(self.num_rows, self.dim), lists, self.num_rows, self.dim)
        self._record_spec(spec)
        self._ensure_index(persist_required=True, lists=lists)

    def _saved_lists(self) -> CoarseLists:
        """The IVF lists of the saved index of the current rows (:class:`CoarseLists`)."""
        current = self.index_spec.resolve(self.num_rows, self.dim)
        index = self._load_persisted_index(current)
        if index is None:
            raise InputError(
                f"database {self._path} has no saved index of its current rows to reuse the "
                f"lists of; build one first (retclip db index {self._path} SPEC)"
            )
        try:
            return CoarseLists.of(index)
        except InputError as error:
            raise InputError(f"database {self._path}: its index {current}: {error}") from None

    def _record_is_current(self, record: Any, spec: IndexSpec) -> bool:
        return (
            isinstance(record, dict)
            and record.get("generation") == self.generation
            and record.get("spec") == spec.build_params()
        )

    def _load_persisted_index(self, spec: IndexSpec) -> faiss.Index | None:
        """The persisted index if it was built for this data and spec and is intact."""
        record = self._meta.get("index_file")
        if spec.type == "flat" or record is None or not self._record_is_current(record, spec):
            return None
        path = self._path / INDEX_NAME
        problem = None
        ondisk = record.get("ondisk")
        if not path.is_file():
            problem = "is missing"
        elif file_sha256(path) != record.get("sha256"):
            problem = f"does not match its sha256 in {META_NAME} (corrupt)"
        elif ondisk is not None and not (self._path / ondisk["file"]).is_file():
            problem = f"lacks its inverted lists {ondisk['file']}"
        elif ondisk is not None and file_sha256(self._path / ondisk["file"]) != ondisk["sha256"]:
            problem = f"has inverted lists {ondisk['file']} that do not match their sha256"
        else:
            try:  # memory-mapped: served from the page cache, shared between processes
                index = load_index(path, mmap=True)
            except DatabaseError:
                problem = "is unreadable (corrupt)"
            else:
                if index.ntotal == self.num_rows and index.d == self.dim:
                    return index
                problem = f"holds {index.ntotal} rows of dim {index.d} (stale)"
        warnings.warn(f"index file {path} {problem}; rebuilding it", stacklevel=3)
        return None

    def _persist_index(
        self, index: faiss.Index, spec: IndexSpec, generation: int, *, required: bool = False
    ) -> None:
        """Save ``index`` as the one built for ``generation``. Optional for a read (a search on a
        read-only or full disk warns and goes on with the index in memory) unless ``required``."""
        if not required and not os.access(self._path, os.W_OK):
            return
        try:
            with self._writing() as meta:
                if meta["generation"] != generation:
                    return
                ondisk = self._place_ondisk_lists(index, generation)
                digest = save_index(index, self._path / INDEX_NAME)
                meta["index_file"] = {
                    "file": INDEX_NAME,
                    "spec": spec.build_params(),
                    "generation": generation,
                    "rows": int(index.ntotal),
                    "bytes": (self._path / INDEX_NAME).stat().st_size,
                    "sha256": digest,
                    **({"ondisk": ondisk} if ondisk else {}),
                }
                write_meta(self._path, meta)
                self._remove_ondisk_files(keep=_ondisk_names(meta["index_file"]))
            self._refresh(meta)
        except DatabaseError as error:  # _writing turns file-system errors into DatabaseError
            if required:
                raise
            warnings.warn(f"could not save the index ({error}); using it unsaved", stacklevel=3)

    def _ensure_index(
        self, *, persist_required: bool = False, lists: CoarseLists | None = None
    ) -> faiss.Index:
        """The index for the current rows and spec: cached, loaded, or built (and persisted;
        into ``lists`` when given).

        An ``auto`` spec is resolved for the current row count first, so a database that grows
        past the exact-search limit switches to an approximate index at its next search.
        """
        spec = self.index_spec.resolve(self.num_rows, self.dim)
        key = (self.generation, json.dumps(spec.build_params(), sort_keys=True))
        if self._index is not None and self._index_key == key:
            return self._index
        index = self._load_persisted_index(spec)
        if index is None:
            index = self._build_index(spec, lists)
            if spec.type != "flat":
                self._persist_index(index, spec, key[0], required=persist_required)
        self._index, self._index_key = index, key
        return index

    def _feature_blocks(self) -> Iterator[np.ndarray]:
        """The features in row order, ``[<= 65536, D]`` blocks of the stored dtype, one shard
        memory-mapped at a time: what an index is built from, never all rows in memory."""
        return iter_features(self._path, self._meta, 65_536)

    def _build_index(self, spec: IndexSpec, lists: CoarseLists | None = None) -> faiss.Index:
        """Build the index of the concrete ``spec`` from the shards (streaming). An ``ondisk``
        index keeps its lists in a build folder in the database (moved beside ``index.faiss``
        when persisted; removed with the index object otherwise); on a read-only database it is
        built in memory, with a warning."""
        build_dir = None
        if spec.ondisk and os.access(self._path, os.W_OK):
            for stale in self._path.glob(f"{_BUILD_PREFIX}*"):  # left by a crashed build
                if not _pid_alive(stale.name.removeprefix(_BUILD_PREFIX).split("-")[0]):
                    shutil.rmtree(stale, ignore_errors=True)
            prefix = f"{_BUILD_PREFIX}{os.getpid()}-"
            build_dir = Path(tempfile.mkdtemp(prefix=prefix, dir=self._path))
        elif spec.ondisk:
            warnings.warn(
                f"database {self._path} is read-only: building its on-disk index in memory",
                stacklevel=4,
            )
        try:
            index = build_index_streaming(
                self._feature_blocks,
                self.num_rows,
                self.dim,
                spec,
                ondisk_path=None if build_dir is None else build_dir / "lists.ivfdata",
                lists=lists,
            )
        except BaseException:
            if build_dir is not None:
                shutil.rmtree(build_dir, ignore_errors=True)
            raise
        if build_dir is not None:  # gone with the index, or now if it was persisted
            weakref.finalize(index, shutil.rmtree, build_dir, True)
        return index

    def _place_ondisk_lists(self, index: faiss.Index, generation: int) -> dict[str, Any] | None:
        """Move an on-disk index's list file beside ``index.faiss`` under a fresh name (a reader
        may still map the previous one); its meta.json record, or ``None`` for other indexes."""
        source = ondisk_file(index)
        if source is None:
            return None
        target = self._path / f"index-{generation}-{uuid.uuid4().hex[:12]}{_ONDISK_SUFFIX}"
        if source != target:
            move_ondisk_file(index, target)
            with contextlib.suppress(OSError):
                source.parent.rmdir()  # the build folder, now empty
        return {"file": target.name, "bytes": target.stat().st_size, "sha256": file_sha256(target)}

    def _remove_ondisk_files(self, keep: Iterable[str]) -> None:
        """Delete on-disk list files of earlier indexes (under the writer lock; a process that
        still maps one keeps reading it until it lets go)."""
        kept = set(keep)
        for path in self._path.glob(f"index-*{_ONDISK_SUFFIX}"):
            if path.name not in kept:
                path.unlink(missing_ok=True)

    def evaluate_index(
        self, *, sample: int = 1000, ks: Sequence[int] = DEFAULT_KS, seed: int = 0
    ) -> RecallReport:
        """Recall@k of the current index against exact search, on ``sample`` rows of the
        database drawn with ``seed`` (each row's own match left out; exact search streams the
        shards). See :func:`~retclip.database.index_recall.evaluate_recall`."""
        index = self._ensure_index()
        return evaluate_recall(
            index, self.index_spec, self._feature_blocks, self.num_rows,
            sample=sample, ks=ks, seed=seed,
        )  # fmt: skip

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        allowed_labels: np.ndarray | Sequence[int] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` most similar rows of each query.

        Args:
            queries: ``[Q, D]`` features (normalised here, so similarities are cosines).
            k: neighbours per query; more than the rows is fine (clamped to the rows).
            allowed_labels: label ids whose rows may be returned (restricts retrieval to a
                vocabulary); applied inside the FAISS search, so still ``k`` results when
                ``k`` allowed rows exist (approximate indexes may find fewer).

        Returns:
            ``(similarities [Q, k'] float32 descending, row ids [Q, k'] int64)`` with
            ``k' = min(k, rows)``; ``-inf`` / ``-1`` pad where fewer rows qualify. Index family
            and parameters: :attr:`index_spec`.
        """
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise InputError(f"queries have shape {q.shape}; expected [Q, {self.dim}]")
        if not np.isfinite(q).all():
            raise InputError("queries contain NaN or infinite values; expected finite numbers")
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise InputError(f"k={k!r}; expected a positive integer")
        # more neighbours than rows cannot be found: clamped, so a huge k allocates nothing
        k = min(int(k), self.num_rows)
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        empty = (
            np.full((q.shape[0], k), -np.inf, dtype=np.float32),
            np.full((q.shape[0], k), -1, dtype=np.int64),
        )
        if self.num_rows == 0 or q.shape[0] == 0:
            return empty
        mask = None
        if allowed_labels is not None:
            allowed = np.asarray(allowed_labels).ravel()
            if allowed.size and allowed.dtype.kind not in "iu":
                raise InputError(f"allowed_labels have dtype {allowed.dtype}; expected label ids")
            n_labels = len(self._meta["labels"])
            if allowed.size and (allowed.min() < 0 or allowed.max() >= n_labels):
                raise InputError(
                    f"allowed_labels must lie in [0, {n_labels}) for database {self._path}"
                )
            table = np.zeros(n_labels, dtype=np.bool_)
            table[allowed.astype(np.int64)] = True
            mask = table[self.label_ids()]
            if not mask.any():
                return empty
            if mask.all():
                mask = None
        index = self._ensure_index()
        return search_index(index, self.index_spec, q, k, mask)


#: Build folders of on-disk indexes (``.index-build-<pid>-*``) and their list files' suffix.
_BUILD_PREFIX = ".index-build-"
_ONDISK_SUFFIX = ".ivfdata"


def _ondisk_names(record: Any) -> tuple[str, ...]:
    """The on-disk list file a persisted index record names (none for an in-memory index)."""
    ondisk = record.get("ondisk") if isinstance(record, dict) else None
    return (ondisk["file"],) if isinstance(ondisk, dict) else ()


def _pid_alive(text: str) -> bool:
    """Whether ``text`` is the id of a running process (a build folder's owner)."""
    try:
        os.kill(int(text), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def _create_in_place(db_path: Path, meta: dict[str, Any]) -> bool:
    """Write an empty database (``meta``, ``shards/``) into a temporary folder beside ``db_path``
    and rename it to ``db_path``; ``False`` if another process's database got there first."""
    parent = db_path.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = parent / f".{db_path.name}.new-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        staging.mkdir()  # mode 0o777 less the umask, as the database folder itself would be
    except OSError as error:
        raise DatabaseError(
            f"cannot create feature database {db_path}: {error.strerror or error}"
        ) from None
    try:
        (staging / SHARD_DIR).mkdir()
        write_meta(staging, meta)
        try:
            os.rename(staging, db_path)  # atomic; replaces an empty directory
        except OSError as error:
            if (db_path / META_NAME).exists():
                return False
            raise DatabaseError(
                f"cannot create feature database {db_path}: {error.strerror or error}"
            ) from None
        fsync_dir(parent)
        return True
    except OSError as error:
        raise DatabaseError(
            f"cannot create feature database {db_path}: {error.strerror or error}"
        ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
