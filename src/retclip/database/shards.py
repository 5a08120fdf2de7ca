"""The files of a feature database below its class: ``meta.json``, shards, the writer lock.

Constants of the format, the row container, and the functions that write and read a
committed state (the commit protocol is :class:`~retclip.database.store.FeatureDatabase`'s).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import re
import struct
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from retclip.backbones.base import BackboneFingerprint
from retclip.database.index import IndexSpec
from retclip.database.meta import DatabaseMeta
from retclip.errors import DatabaseError, InputError
from retclip.files import (
    LockUnavailable,
    atomic_write,
    atomic_writer,
    file_lock,
    file_sha256,
)

#: The format this code writes; it reads :data:`READ_VERSIONS` (1: completed sources listed in
#: ``meta.json``; 2: in a file per shard, so ``meta.json`` stays O(shards)).
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)
METRIC = "inner_product"
DTYPES = ("float16", "float32")
META_NAME = "meta.json"
SHARD_DIR = "shards"
INDEX_NAME = "index.faiss"
LOCK_NAME = ".lock"
SHARD_NAME = re.compile(r"^\d{6,}\.npz$")
COMPLETED_SUFFIX = ".completed.json"
PROVENANCE_KEYS = ("sources", "boxes", "mask_areas", "scores", "build_ids")
SHARD_KEYS = ("features", "label_ids", *PROVENANCE_KEYS)
# Expected (dtype kind, trailing shape) of each shard array; features are checked separately.
COLUMN_KINDS: dict[str, tuple[str, tuple[int, ...]]] = {
    "label_ids": ("i", ()),
    "sources": ("U", ()),
    "boxes": ("f", (4,)),
    "mask_areas": ("i", ()),
    "scores": ("f", ()),
    "build_ids": ("U", ()),
}


@dataclasses.dataclass(frozen=True)
class DatabaseLabel:
    """A class label of the database: its name and the synonyms used to embed it as text."""

    name: str
    synonyms: tuple[str, ...]


@dataclasses.dataclass
class ShardRows:
    """Columns of a set of rows, as stored (features in the database dtype)."""

    features: np.ndarray  # [n, D]
    label_ids: np.ndarray  # [n] int32
    sources: np.ndarray  # [n] unicode
    boxes: np.ndarray  # [n, 4] float32
    mask_areas: np.ndarray  # [n] int64
    scores: np.ndarray  # [n] float32
    build_ids: np.ndarray  # [n] unicode

    def __len__(self) -> int:
        return int(self.label_ids.shape[0])

    def select(self, keep: np.ndarray) -> ShardRows:
        return ShardRows(**{f.name: getattr(self, f.name)[keep] for f in dataclasses.fields(self)})

    @classmethod
    def concat(cls, parts: Sequence[ShardRows], dim: int, dtype: str) -> ShardRows:
        if not parts:
            return cls.empty(dim, dtype)
        return cls(
            **{
                f.name: np.concatenate([getattr(p, f.name) for p in parts])
                for f in dataclasses.fields(cls)
            }
        )

    @classmethod
    def empty(cls, dim: int, dtype: str) -> ShardRows:
        return cls(
            features=np.zeros((0, dim), dtype=dtype),
            label_ids=np.zeros(0, np.int32),
            sources=np.zeros(0, dtype="<U1"),
            boxes=np.zeros((0, 4), np.float32),
            mask_areas=np.zeros(0, np.int64),
            scores=np.zeros(0, np.float32),
            build_ids=np.zeros(0, dtype="<U1"),
        )


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def meta_checksum(meta: Mapping[str, Any]) -> str:
    """SHA-256 of ``meta``'s content (key order and the checksum itself left out)."""
    content = {k: v for k, v in meta.items() if k != "checksum"}
    canonical = json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def write_meta(db_path: Path, meta: dict[str, Any]) -> None:
    """Write ``meta.json`` (the commit point) with the checksum of its content, so a hand edit
    (a label renamed, a count or the dtype changed) reads back as corruption, not as data."""
    meta["checksum"] = meta_checksum(meta)
    atomic_write(db_path / META_NAME, meta_text(meta), durable=True)


def meta_text(meta: Mapping[str, Any]) -> str:
    """``meta.json``'s text: a line per top-level key and per item of a top-level list or
    object (a shard, a label), each item compact JSON. As readable as ``indent=2`` and written by
    json's C encoder (``indent`` selects its pure-Python one, which was 40 % of a commit's time at
    600 shards)."""

    def dump(value: Any) -> str:
        return json.dumps(value, ensure_ascii=False)

    lines = []
    for key, value in meta.items():
        if isinstance(value, list) and value:
            text = "[\n    " + ",\n    ".join(map(dump, value)) + "\n  ]"
        elif isinstance(value, dict) and value:
            items = (f"{dump(k)}: {dump(v)}" for k, v in value.items())
            text = "{\n    " + ",\n    ".join(items) + "\n  }"
        else:
            text = dump(value)
        lines.append(f"  {dump(key)}: {text}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def write_shard(shard_dir: Path, number: int, rows: ShardRows) -> dict[str, Any]:
    """Write ``rows`` as shard ``number`` atomically; returns its meta.json entry (sans builds)."""
    name = f"{number:06d}.npz"
    arrays = {f.name: getattr(rows, f.name) for f in dataclasses.fields(rows)}
    with atomic_writer(shard_dir / name, durable=True) as handle:
        np.savez(handle, **arrays)
    path = shard_dir / name
    return {
        "file": name,
        "rows": len(rows),
        "bytes": path.stat().st_size,
        "sha256": file_sha256(path),
    }


def completed_name(shard_file: str) -> str:
    """The completed-sources file of shard ``NNNNNN.npz``: ``NNNNNN.completed.json``."""
    return shard_file.removesuffix(".npz") + COMPLETED_SUFFIX


def write_completed(
    shard_dir: Path, shard_file: str, completed: Mapping[str, Iterable[str]]
) -> dict[str, Any] | None:
    """Write the sources a shard's commit finished, ``{build id: [source, ...]}``, atomically
    beside the shard (format 2); returns its meta.json record, ``None`` when there are none."""
    content = {b: sorted(set(s)) for b, s in sorted(completed.items())}
    content = {b: s for b, s in content.items() if s}
    if not content:
        return None
    name = completed_name(shard_file)
    data = json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    atomic_write(shard_dir / name, data, durable=True)
    return {
        "file": name,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "sources": sum(len(s) for s in content.values()),
    }


def read_completed(db_path: Path, shard: Mapping[str, Any]) -> dict[str, list[str]]:
    """``{build id: [source, ...]}`` a committed shard's commit finished: from its meta.json entry
    (format 1) or its completed-sources file (format 2), checked against its size and sha256."""
    if "completed_sources" in shard:
        return dict(shard["completed_sources"])
    record = shard.get("completed")
    if record is None:
        return {}
    path = db_path / SHARD_DIR / record["file"]
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DatabaseError(
            f"completed-sources file {path} is missing (the database changed on disk; reopen it)"
        ) from None
    except OSError as error:
        raise DatabaseError(f"cannot read {path}: {error.strerror or error}") from None
    if len(data) != record["bytes"] or hashlib.sha256(data).hexdigest() != record["sha256"]:
        raise DatabaseError(
            f"corrupt completed-sources file {path}: its size or sha256 differs from {META_NAME}"
        )
    try:
        content = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatabaseError(f"corrupt completed-sources file {path}: {error}") from None
    if not isinstance(content, dict) or not all(
        isinstance(v, list) and all(isinstance(x, str) for x in v) for v in content.values()
    ):
        raise DatabaseError(
            f"corrupt completed-sources file {path}: expected {{build id: [source, ...]}}"
        )
    return content


def upgrade_meta(db_path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Commit a format-1 ``meta`` as format 2 (under the writer lock): each shard's completed
    sources move to its own file (written durably first; the shards themselves are untouched),
    then ``meta.json`` is replaced, the commit point. A crash before that leaves format 1 (the
    new files are unlisted leftovers, deleted by the next write); after it, format 2."""
    if meta["format_version"] == FORMAT_VERSION:
        return meta
    upgraded = json.loads(json.dumps(meta))  # the caller's meta stays the committed one on error
    for shard in upgraded["shards"]:
        completed = shard.pop("completed_sources")
        shard["build_ids"] = sorted(set(shard["build_ids"]) | set(completed))
        shard["completed"] = write_completed(db_path / SHARD_DIR, shard["file"], completed)
    upgraded["format_version"] = FORMAT_VERSION
    write_meta(db_path, upgraded)
    return upgraded


@contextmanager
def locked(db_path: Path) -> Iterator[None]:
    """Hold the database's exclusive writer lock (``.lock``, across processes)."""
    if not db_path.is_dir():
        raise DatabaseError(f"feature database {db_path} no longer exists (removed meanwhile)")
    with ExitStack() as stack:
        try:
            stack.enter_context(file_lock(db_path / LOCK_NAME))
        except LockUnavailable as error:
            raise DatabaseError(
                f"cannot write to feature database {db_path}: {error.reason}"
            ) from None
        yield


def corrupt(meta_path: Path, what: str) -> DatabaseError:
    return DatabaseError(f"corrupt feature database meta file {meta_path}: {what}")


def read_meta(db_path: Path) -> dict[str, Any]:
    """Read and validate ``meta.json``; anything malformed → :class:`DatabaseError`."""
    meta_path = db_path / META_NAME
    if not meta_path.is_file():
        raise DatabaseError(f"no feature database at {db_path} (no {META_NAME})")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise corrupt(meta_path, f"not valid JSON ({error})") from None
    if not isinstance(meta, dict):
        raise corrupt(meta_path, "expected a JSON object")
    version = meta.get("format_version")
    if type(version) is int and version > FORMAT_VERSION:
        raise DatabaseError(
            f"feature database {db_path} has format_version {version}; this retclip reads "
            f"format versions {READ_VERSIONS[0]} to {FORMAT_VERSION}: upgrade retclip to open it"
        )
    if type(version) is not int or version not in READ_VERSIONS:
        expected = " or ".join(map(str, READ_VERSIONS))
        raise corrupt(meta_path, f"format_version {version!r}; expected {expected}")
    try:
        DatabaseMeta.model_validate(meta)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        if where:
            raise corrupt(meta_path, f"missing or malformed {where!r} ({first['msg']})") from None
        raise corrupt(meta_path, str(first["msg"]).removeprefix("Value error, ")) from None
    recorded = meta.get("checksum")  # absent in databases written before checksums
    if recorded is not None and recorded != meta_checksum(meta):
        raise corrupt(
            meta_path,
            "its content does not match its checksum (edited by hand or damaged); restore it "
            "from a backup or rebuild the database",
        )
    try:
        IndexSpec.from_dict(meta["index"])
        BackboneFingerprint.from_dict(meta["fingerprint"])
    except (InputError, TypeError) as error:
        raise corrupt(meta_path, str(error)) from None
    meta.setdefault("index_file", None)
    return meta


def check_shard_files(db_path: Path, meta: dict[str, Any], verify: bool) -> None:
    """Every listed shard must exist with its recorded size (and checksum when ``verify``)."""
    for shard in meta["shards"]:
        path = db_path / SHARD_DIR / shard["file"]
        if not path.is_file():
            raise DatabaseError(
                f"corrupt feature database {db_path}: shard {path} listed in {META_NAME} is missing"
            )
        size = path.stat().st_size
        if size != shard["bytes"]:
            raise DatabaseError(
                f"corrupt shard {path}: {size} bytes, {META_NAME} records {shard['bytes']} "
                "(truncated or overwritten)"
            )
        if verify and file_sha256(path) != shard["sha256"]:
            raise DatabaseError(f"corrupt shard {path}: sha256 differs from {META_NAME}")
        record = shard.get("completed")
        if record is None:
            continue
        path = db_path / SHARD_DIR / record["file"]
        if not path.is_file():
            raise DatabaseError(
                f"corrupt feature database {db_path}: completed-sources file {path} listed in "
                f"{META_NAME} is missing"
            )
        size = path.stat().st_size
        if size != record["bytes"]:
            raise DatabaseError(
                f"corrupt completed-sources file {path}: {size} bytes, {META_NAME} records "
                f"{record['bytes']} (truncated or overwritten)"
            )
        if verify and file_sha256(path) != record["sha256"]:
            raise DatabaseError(
                f"corrupt completed-sources file {path}: sha256 differs from {META_NAME}"
            )


def read_shard(
    db_path: Path, meta: dict[str, Any], shard: dict[str, Any], keys: Sequence[str]
) -> dict[str, np.ndarray]:
    """Load ``keys`` of one shard, checking their dtypes and shapes against ``meta``."""
    path = db_path / SHARD_DIR / shard["file"]
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in keys}
    except FileNotFoundError:
        raise DatabaseError(
            f"shard {path} is missing (the database changed on disk; reopen it)"
        ) from None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        raise DatabaseError(f"corrupt shard {path}: {error}") from None
    n = shard["rows"]
    for key, array in arrays.items():
        if key == "features":
            ok = array.shape == (n, meta["dim"]) and array.dtype == np.dtype(meta["dtype"])
        else:
            kind, tail = COLUMN_KINDS[key]
            ok = array.dtype.kind == kind and array.shape == (n, *tail)
        if not ok:
            raise DatabaseError(
                f"corrupt shard {path}: {key} has shape {array.shape} {array.dtype}, "
                f"expected {n} rows"
            )
    labels = arrays.get("label_ids")
    if (
        labels is not None
        and labels.size
        and (labels.min() < 0 or labels.max() >= len(meta["labels"]))
    ):
        raise DatabaseError(f"corrupt shard {path}: label ids outside the label table")
    return arrays


def map_features(db_path: Path, meta: dict[str, Any], shard: dict[str, Any]) -> np.ndarray:
    """The ``[n, D]`` features of one shard in the stored dtype, memory-mapped from the shard's
    (uncompressed) npz rather than read, so a shard larger than memory can be streamed; checked
    against ``meta`` like :func:`read_shard` (which reads a compressed member instead)."""
    path = db_path / SHARD_DIR / shard["file"]
    n, dim = shard["rows"], meta["dim"]
    try:
        with zipfile.ZipFile(path) as archive:
            member = archive.getinfo("features.npy")
        if member.compress_type != zipfile.ZIP_STORED or n == 0:
            return read_shard(db_path, meta, shard, ("features",))["features"]
        with open(path, "rb") as handle:
            handle.seek(member.header_offset)
            local = handle.read(30)  # the member's local header: name and extra field lengths
            if len(local) < 30 or local[:4] != b"PK\x03\x04":
                raise ValueError("bad local header of features.npy")
            name_length, extra_length = struct.unpack("<HH", local[26:30])
            handle.seek(member.header_offset + 30 + name_length + extra_length)
            version = np.lib.format.read_magic(handle)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(handle)
            offset = handle.tell()
        if shape != (n, dim) or dtype != np.dtype(meta["dtype"]) or fortran:
            raise DatabaseError(
                f"corrupt shard {path}: features has shape {shape} {dtype}, expected {n} rows"
            )
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
    except FileNotFoundError:
        raise DatabaseError(
            f"shard {path} is missing (the database changed on disk; reopen it)"
        ) from None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        raise DatabaseError(f"corrupt shard {path}: {error}") from None


def iter_features(db_path: Path, meta: dict[str, Any], block_rows: int) -> Iterator[np.ndarray]:
    """The features of the snapshot ``meta`` in row order, as blocks ``[<= block_rows, D]`` of
    the stored dtype, one shard mapped at a time (:func:`map_features`)."""
    for shard in meta["shards"]:
        features = map_features(db_path, meta, shard)
        for start in range(0, len(features), block_rows):
            yield features[start : start + block_rows]
        del features


def read_rows(db_path: Path, meta: dict[str, Any]) -> ShardRows:
    """All rows of the snapshot ``meta``, features in the stored dtype."""
    parts = [ShardRows(**read_shard(db_path, meta, shard, SHARD_KEYS)) for shard in meta["shards"]]
    rows = ShardRows.concat(parts, meta["dim"], meta["dtype"])
    rows.label_ids = rows.label_ids.astype(np.int32, copy=False)
    return rows


def merge_completed(records: Iterable[Mapping[str, Sequence[str]]]) -> dict[str, set[str]]:
    """The union of ``{build id: sources}`` records (of shards, of databases)."""
    merged: dict[str, set[str]] = {}
    for record in records:
        for build_id, sources in record.items():
            merged.setdefault(build_id, set()).update(sources)
    return merged


def string_array(values: Sequence[str], what: str, n: int | None) -> np.ndarray:
    array = np.asarray(list(values))
    if array.size == 0:
        array = array.astype("<U1")
    if array.ndim != 1 or array.dtype.kind != "U":
        raise InputError(f"{what} must be a sequence of strings; got {array.dtype} {array.shape}")
    if n is not None and array.shape[0] != n:
        raise InputError(f"{what} has {array.shape[0]} entries; expected {n} (one per row)")
    return array


def column(
    values: Any, what: str, shape: tuple[int, ...], dtype: type, fill: float | int
) -> np.ndarray:
    if values is None:
        return np.full(shape, fill, dtype=dtype)
    array = np.asarray(values)
    if array.shape != shape or not np.issubdtype(array.dtype, np.number):
        raise InputError(f"{what} has shape {array.shape} {array.dtype}; expected numbers {shape}")
    return array.astype(dtype)
