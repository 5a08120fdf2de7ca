"""FAISS nearest-neighbour indexes over database features (inner product on unit vectors = cosine).

An :class:`IndexSpec` names the index family and its parameters; :func:`build_index` builds one from
``[R, D]`` features, :func:`search_index` queries it (optionally restricted to a subset of row ids
through a FAISS ``IDSelectorBitmap``, which every family honours during the search itself, so a
restricted search still returns the best *allowed* rows rather than filtering a truncated list),
and :func:`save_index` / :func:`load_index` persist it atomically.
"""

from __future__ import annotations

import dataclasses
import errno
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from retclip.errors import DatabaseError, InputError
from retclip.files import file_sha256, fsync_dir, temp_path

INDEX_TYPES = ("flat", "ivf-flat", "ivf-pq", "hnsw", "auto")
#: FAISS k-means wants at least this many training points per centroid.
MIN_POINTS_PER_CENTROID = 39
#: Seed of every k-means training (IVF coarse quantiser and PQ codebooks), for reproducible builds.
TRAIN_SEED = 1234
#: ``auto`` is exact (flat) up to this many rows, IVF-Flat above (:meth:`IndexSpec.resolve`).
AUTO_EXACT_MAX_ROWS = 200_000
#: Lists probed by ``auto``'s IVF-Flat (of ``sqrt(R)``); measured at 1M clustered 768-d rows:
#: recall@10 1.0 at 20x exact NumPy search (8: 9x, 2: 52x at recall 0.995; bench/RESULTS.md).
AUTO_NPROBE = 4

# Parameters that matter to each index type; the first group changes the built index, the rest are
# search-time settings that can change without a rebuild.
_BUILD_PARAMS: dict[str, tuple[str, ...]] = {
    "flat": (),
    "ivf-flat": ("nlist",),
    "ivf-pq": ("nlist", "pq_m", "pq_bits"),
    "hnsw": ("hnsw_m", "ef_construction"),
    "auto": (),
}
_SEARCH_PARAMS: dict[str, tuple[str, ...]] = {
    "flat": (),
    "ivf-flat": ("nprobe",),
    "ivf-pq": ("nprobe",),
    "hnsw": ("ef_search",),
    "auto": (),
}


@dataclasses.dataclass(frozen=True)
class IndexSpec:
    """Which FAISS index to build over the database and how to search it.

    ``nlist=None`` picks ``min(round(4 * sqrt(R)), R // 39)`` inverted lists for ``R`` rows, so each
    list's centroid is trained on at least 39 points. ``pq_m`` sub-quantisers must divide the
    feature dimension. ``nprobe`` and ``ef_search`` are search-time settings (no rebuild needed).
    ``type="auto"`` chooses by database size when the index is built (:meth:`resolve`).
    """

    type: str = "flat"
    nlist: int | None = None
    nprobe: int = 16
    pq_m: int = 16
    pq_bits: int = 8
    hnsw_m: int = 32
    ef_construction: int = 200
    ef_search: int = 128

    def __post_init__(self) -> None:
        if self.type not in INDEX_TYPES:
            raise InputError(
                f"unknown index type {self.type!r}; expected one of {', '.join(INDEX_TYPES)}"
            )
        minimum = {"nprobe": 1, "pq_m": 1, "pq_bits": 1, "hnsw_m": 2, "ef_construction": 1}
        minimum["ef_search"] = 1
        for name, low in minimum.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InputError(f"index parameter {name}={value!r}; expected an integer >= {low}")
        if self.nlist is not None and (
            isinstance(self.nlist, bool) or not isinstance(self.nlist, int) or self.nlist < 1
        ):
            raise InputError(f"index parameter nlist={self.nlist!r}; expected an integer >= 1")
        if self.pq_bits > 16:
            raise InputError(f"index parameter pq_bits={self.pq_bits}; expected at most 16")

    def check_dim(self, dim: int) -> IndexSpec:
        """``self`` if it can index ``dim``-d features, else an :class:`InputError` (checked
        before a spec is recorded, so a bad spec never reaches a database's meta.json)."""
        if self.type == "ivf-pq" and dim % self.pq_m:
            divisors = [m for m in (4, 8, 12, 16, 24, 32, 48, 64, 96) if dim % m == 0]
            raise InputError(
                f"index parameter pq_m={self.pq_m} must divide the feature dimension {dim}; "
                f"e.g. pq_m={', '.join(map(str, divisors)) or '1'}"
            )
        return self

    def resolve(self, rows: int) -> IndexSpec:
        """The concrete spec for ``rows`` rows: ``self`` unless the type is ``auto``.

        ``auto`` is exact (``flat``) up to :data:`AUTO_EXACT_MAX_ROWS` rows, where exact search is
        fast enough (about 2.5 ms per query at 100k rows of dim 768 on one CPU thread), and
        ``ivf-flat`` with ``round(sqrt(R))`` lists and ``nprobe=``:data:`AUTO_NPROBE` above:
        uncompressed vectors keep recall high (IVF-PQ lost it to quantisation), a query scans a
        few lists (20x faster than exact NumPy search at 1M rows, recall@10 1.0 on clustered
        features), and k-means over ``sqrt(R)`` centroids trains in about a minute at 1M rows,
        where HNSW takes tens of minutes (``bench/RESULTS.md``, ``bench/README.md``). For more
        recall on harder data, set ``ivf-flat:nprobe=N`` explicitly.
        """
        if self.type != "auto":
            return self
        if rows <= AUTO_EXACT_MAX_ROWS:
            return IndexSpec("flat")
        return IndexSpec("ivf-flat", nlist=max(1, round(math.sqrt(rows))), nprobe=AUTO_NPROBE)

    def build_params(self) -> dict[str, Any]:
        """The parameters that determine the built index (an index is stale when these change)."""
        return {"type": self.type, **{k: getattr(self, k) for k in _BUILD_PARAMS[self.type]}}

    def to_dict(self) -> dict[str, Any]:
        """``{"type": ..., "params": {...}}`` with the parameters relevant to the type."""
        names = _BUILD_PARAMS[self.type] + _SEARCH_PARAMS[self.type]
        return {"type": self.type, "params": {k: getattr(self, k) for k in names}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IndexSpec:
        """Inverse of :meth:`to_dict`."""
        if not isinstance(data, dict) or not isinstance(data.get("type"), str):
            raise InputError(f"index spec {data!r}; expected {{'type': str, 'params': {{...}}}}")
        params = data.get("params") or {}
        if not isinstance(params, dict):
            raise InputError(f"index spec params {params!r}; expected a mapping")
        return cls._from_params(data["type"], params, str(data))

    @classmethod
    def parse(cls, text: str) -> IndexSpec:
        """Parse the CLI form ``TYPE[:key=value,...]``, e.g. ``"ivf-pq:nlist=256,nprobe=32"``."""
        kind, _, rest = text.strip().partition(":")
        params: dict[str, Any] = {}
        for item in filter(None, (part.strip() for part in rest.split(","))):
            key, sep, value = item.partition("=")
            if not sep:
                raise InputError(f"bad index spec {text!r}: {item!r} is not key=value")
            try:
                params[key.strip()] = int(value)
            except ValueError:
                raise InputError(
                    f"bad index spec {text!r}: {key.strip()}={value!r} is not an integer"
                ) from None
        return cls._from_params(kind.strip(), params, text)

    @classmethod
    def _from_params(cls, kind: str, params: dict[str, Any], source: str) -> IndexSpec:
        if kind not in INDEX_TYPES:
            raise InputError(
                f"bad index spec {source!r}: unknown type {kind!r}; "
                f"expected one of {', '.join(INDEX_TYPES)}"
            )
        allowed = _BUILD_PARAMS[kind] + _SEARCH_PARAMS[kind]
        unknown = sorted(set(params) - set(allowed))
        if unknown:
            raise InputError(
                f"bad index spec {source!r}: unknown parameter(s) {', '.join(unknown)} for "
                f"{kind}; expected {', '.join(allowed) or 'none'}"
            )
        return cls(type=kind, **params)

    def __str__(self) -> str:
        params = self.to_dict()["params"]
        body = ",".join(f"{k}={v}" for k, v in params.items() if v is not None)
        return f"{self.type}:{body}" if body else self.type


def default_nlist(rows: int) -> int:
    """Default IVF list count for ``rows`` rows: ``~4 sqrt(R)``, at most ``R // 39`` (may be 0)."""
    return min(round(4 * math.sqrt(rows)), rows // MIN_POINTS_PER_CENTROID)


def _as_matrix(features: np.ndarray, what: str) -> np.ndarray:
    array = np.ascontiguousarray(features, dtype=np.float32)
    if array.ndim != 2:
        raise InputError(f"{what} have shape {array.shape}; expected [N, D]")
    return array


def _flat(features: np.ndarray) -> faiss.Index:
    index = faiss.IndexFlatIP(features.shape[1])
    index.add(features)
    return index


def build_index(features: np.ndarray, spec: IndexSpec) -> faiss.Index:
    """Build an inner-product index over unit ``features`` ``[R, D]``; row ``i`` gets id ``i``.

    IVF quantisers (and PQ codebooks) are trained on ``features`` with a fixed seed. With too few
    rows to train an IVF index, a flat (exact) index is built instead, with a warning.
    """
    features = _as_matrix(features, "index features")
    rows, dim = features.shape
    spec = spec.resolve(rows)
    if spec.type == "flat":
        return _flat(features)
    if spec.type == "hnsw":
        hnsw = faiss.IndexHNSWFlat(dim, spec.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = spec.ef_construction
        hnsw.hnsw.efSearch = spec.ef_search
        hnsw.add(features)
        return hnsw
    if spec.type == "ivf-pq" and dim % spec.pq_m:
        raise InputError(
            f"index ivf-pq with pq_m={spec.pq_m} needs a feature dimension divisible by pq_m; "
            f"the database has dim {dim}"
        )
    nlist = min(spec.nlist or default_nlist(rows), rows // MIN_POINTS_PER_CENTROID)
    pq_codes = 2**spec.pq_bits if spec.type == "ivf-pq" else 0
    if nlist < 1 or rows < pq_codes:
        if rows:
            warnings.warn(
                f"{rows} rows are too few to train index {spec} (needs >= "
                f"{max(MIN_POINTS_PER_CENTROID, pq_codes)}); using an exact flat index instead",
                stacklevel=2,
            )
        return _flat(features)
    if spec.nlist is not None and nlist < spec.nlist:
        warnings.warn(
            f"{rows} rows train at most {nlist} IVF lists (39 points each); using nlist={nlist} "
            f"instead of {spec.nlist}",
            stacklevel=2,
        )
    quantizer = faiss.IndexFlatIP(dim)
    ivf: faiss.IndexIVF
    if spec.type == "ivf-flat":
        ivf = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    else:
        ivf = faiss.IndexIVFPQ(
            quantizer, dim, nlist, spec.pq_m, spec.pq_bits, faiss.METRIC_INNER_PRODUCT
        )
        ivf.pq.cp.seed = TRAIN_SEED
    ivf.cp.seed = TRAIN_SEED
    ivf.train(features)
    ivf.add(features)
    ivf.nprobe = min(spec.nprobe, nlist)
    return ivf


def search_index(
    index: faiss.Index,
    spec: IndexSpec,
    queries: np.ndarray,
    k: int,
    allowed_ids: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` inner-product search of ``queries`` ``[Q, D]``.

    Args:
        allowed_ids: row ids that may be returned (int array), or a boolean mask over all rows;
            ``None`` allows every row. Applied inside FAISS through an ``IDSelectorBitmap``.

    Returns:
        ``(similarities [Q, k] float32, ids [Q, k] int64)``, best first; where fewer than ``k``
        rows qualify (or an approximate index finds fewer), ids are ``-1`` and similarities
        ``-inf``.
    """
    queries = _as_matrix(queries, "queries")
    if k < 1:
        raise InputError(f"k={k}; expected k >= 1")
    ntotal = int(index.ntotal)
    spec = spec.resolve(ntotal)
    ivf = faiss.try_extract_index_ivf(index)
    params: Any
    if ivf is not None:
        params = faiss.SearchParametersIVF()
        params.nprobe = min(spec.nprobe, int(ivf.nlist))
    elif isinstance(index, faiss.IndexHNSW):
        params = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]
        params.efSearch = max(spec.ef_search, k)
    else:
        params = faiss.SearchParameters()
    selector = bitmap = None
    if allowed_ids is not None:
        allowed = np.asarray(allowed_ids)
        if allowed.dtype == np.bool_:
            if allowed.shape != (ntotal,):
                raise InputError(f"allowed mask has shape {allowed.shape}; expected ({ntotal},)")
            mask = allowed
        else:
            ids = allowed.astype(np.int64).ravel()
            if ids.size and (ids.min() < 0 or ids.max() >= ntotal):
                raise InputError(f"allowed ids must lie in [0, {ntotal}); got {ids.min()}..")
            mask = np.zeros(ntotal, dtype=np.bool_)
            mask[ids] = True
        # The selector keeps a raw pointer into ``bitmap``: both must outlive the search call.
        bitmap = np.packbits(mask, bitorder="little")
        selector = faiss.IDSelectorBitmap(ntotal, faiss.swig_ptr(bitmap))
        params.sel = selector
    sims, ids = index.search(queries, k, params=params)
    del selector, bitmap
    sims = sims.astype(np.float32, copy=False)
    ids = ids.astype(np.int64, copy=False)
    sims[ids < 0] = -np.inf
    return sims, ids


def save_index(index: faiss.Index, path: Path | str) -> str:
    """Write ``index`` to ``path`` atomically (temp file in the same directory, fsync, replace).

    Returns the file's SHA-256, which the database records to detect a corrupt index file later.
    """
    path = Path(path)
    tmp_name = str(temp_path(path))  # FAISS writes by file name
    try:
        try:
            faiss.write_index(index, tmp_name)
        except RuntimeError as error:  # FAISS reports a failed write (a full disk) this way
            reason = re.search(r"\(([^()]*)\)\s*$", str(error).strip())
            why = reason.group(1) if reason else "FAISS could not write it"
            raise OSError(errno.EIO, why) from None
        with open(tmp_name, "rb+") as handle:
            os.fsync(handle.fileno())
        digest = file_sha256(tmp_name)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return digest


def load_index(path: Path | str) -> faiss.Index:
    """Read an index written by :func:`save_index`; unreadable → :class:`DatabaseError`."""
    try:
        return faiss.read_index(str(path))
    except RuntimeError as error:
        first = str(error).strip().splitlines()[-1] if str(error).strip() else ""
        raise DatabaseError(f"index file {path} is corrupt or unreadable ({first})") from None
