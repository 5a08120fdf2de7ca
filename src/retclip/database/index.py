"""FAISS nearest-neighbour indexes over database features (inner product on unit vectors = cosine).

An :class:`IndexSpec` names the index: one of retclip's families (``flat``, ``ivf-flat``,
``ivf-pq``, ``hnsw``), any FAISS index-factory string (``factory:IVF4096,SQ8``), or ``auto``,
which follows FAISS's "Guidelines to choose an index" by database size and memory budget
(:meth:`IndexSpec.resolve`). Every family becomes a factory string
(:meth:`IndexSpec.factory_string`), built by :mod:`retclip.database.index_build`.
:func:`search_index` queries an index, optionally restricted to a subset of row ids through a
FAISS ``IDSelectorBitmap`` that every accepted structure honours during the search itself, so a
restricted search still returns the best *allowed* rows rather than filtering a truncated list;
structures that cannot restrict a search are refused when the spec is checked
(:meth:`IndexSpec.check_dim`). :func:`save_index` / :func:`load_index` persist an index
atomically and load it memory-mapped for serving.
"""

from __future__ import annotations

import dataclasses
import errno
import math
import os
import re
import warnings
import weakref
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from retclip.errors import DatabaseError, InputError
from retclip.files import file_sha256, fsync_dir, temp_path

INDEX_TYPES = ("flat", "ivf-flat", "ivf-pq", "hnsw", "factory", "auto")
#: FAISS k-means wants at least this many training points per centroid.
MIN_POINTS_PER_CENTROID = 39
#: Seed of every k-means training (IVF coarse quantiser and PQ codebooks), for reproducible builds.
TRAIN_SEED = 1234
#: ``auto`` is exact (flat) up to this many rows (:meth:`IndexSpec.resolve`): exact search over
#: 200k rows of dim 768 takes ~5 ms a query on one thread, and IVF lost recall at 10k rows.
AUTO_EXACT_MAX_ROWS = 200_000
#: From this many rows ``auto``'s coarse quantiser is an HNSW graph over the centroids (FAISS's
#: ``IVF65536_HNSW32`` for 1M-10M rows): assigning each row to one of tens of thousands of
#: centroids exhaustively would dominate the build.
AUTO_HNSW_MIN_ROWS = 1_000_000
#: FAISS's guideline list counts for large databases: ``(rows below, nlist)``, the last unbounded.
AUTO_LARGE_NLIST = ((10_000_000, 65_536), (100_000_000, 262_144), (None, 1_048_576))
#: ``auto`` probes ``nlist // AUTO_NPROBE_DIVISOR`` lists, within these bounds.
AUTO_NPROBE_DIVISOR = 256
AUTO_NPROBE_RANGE = (16, 256)
#: ``auto``'s HNSW coarse quantiser searches at least this wide (and 2 nprobe): clustered
#: 768-d queries miss their nearest centroids at FAISS's default 16.
AUTO_QUANTIZER_EF_SEARCH = 128
#: A restricted search probes at most this many times the lists / candidates of a full one.
MAX_RESTRICTED_WIDENING = 16.0

_FACTORY_START = re.compile(r"^[A-Z]")
_FAISS_LOCATION = re.compile(r"^Error in .*? at \S+:\d+: ")
_SETTING = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# Parameters that matter to each index type; the first group changes the built index, the rest are
# search-time settings that can change without a rebuild. ``ondisk``, ``memory_gb`` and ``search``
# are left out of the spec's text and dicts while at their defaults (older meta.json files lack
# them).
_BUILD_PARAMS: dict[str, tuple[str, ...]] = {
    "flat": (),
    "ivf-flat": ("nlist", "ondisk"),
    "ivf-pq": ("nlist", "pq_m", "pq_bits", "ondisk"),
    "hnsw": ("hnsw_m", "ef_construction"),
    "factory": ("factory", "ondisk"),
    "auto": ("memory_gb", "ondisk"),
}
_SEARCH_PARAMS: dict[str, tuple[str, ...]] = {
    "flat": (),
    "ivf-flat": ("nprobe",),
    "ivf-pq": ("nprobe",),
    "hnsw": ("ef_search",),
    "factory": ("search",),
    "auto": (),
}
_OPTIONAL_DEFAULTS: dict[str, Any] = {"ondisk": False, "memory_gb": None, "search": ""}


@dataclasses.dataclass(frozen=True)
class IndexSpec:
    """Which FAISS index to build over the database and how to search it.

    ``nlist=None`` picks ``min(round(4 * sqrt(R)), R // 39)`` inverted lists for ``R`` rows, so each
    list's centroid is trained on at least 39 points. ``pq_m`` sub-quantisers must divide the
    feature dimension. ``nprobe`` and ``ef_search`` are search-time settings (no rebuild needed).
    ``factory`` is a FAISS index-factory string (``type="factory"``) and ``search`` its search-time
    settings as FAISS ``ParameterSpace`` text (``"nprobe=32,quantizer_efSearch=64"``).
    ``type="auto"`` chooses by database size when the index is built (:meth:`resolve`), with codes
    that fit ``memory_gb`` GiB when given. ``ondisk`` keeps an IVF index's inverted lists in a file
    beside the index (FAISS ``OnDiskInvertedLists``), built shard by shard and memory-mapped.
    """

    type: str = "flat"
    nlist: int | None = None
    nprobe: int = 16
    pq_m: int = 16
    pq_bits: int = 8
    hnsw_m: int = 32
    ef_construction: int = 200
    ef_search: int = 128
    factory: str | None = None
    search: str = ""
    memory_gb: float | None = None
    ondisk: bool = False

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
        if not isinstance(self.ondisk, bool):
            raise InputError(f"index parameter ondisk={self.ondisk!r}; expected 0 or 1")
        budget = self.memory_gb
        if budget is not None and (
            isinstance(budget, bool) or not isinstance(budget, int | float) or not budget > 0
        ):
            raise InputError(f"index parameter memory_gb={budget!r}; expected a number > 0")
        if (self.type == "factory") != (self.factory is not None):
            raise InputError(f"index type {self.type!r} with factory={self.factory!r}")
        if self.factory is not None and (
            not isinstance(self.factory, str) or not _FACTORY_START.match(self.factory)
        ):
            raise InputError(
                f"index factory string {self.factory!r}; expected a FAISS index-factory string "
                "such as 'IVF4096,SQ8'"
            )
        if not isinstance(self.search, str) or (self.search and self.type != "factory"):
            raise InputError(f"index search settings {self.search!r} need a factory index")
        for item in filter(None, self.search.split(",")):
            key, sep, value = item.partition("=")
            if not sep or not _SETTING.match(key) or not _is_number(value):
                raise InputError(f"index search setting {item!r}; expected name=number")

    def check_dim(self, dim: int) -> IndexSpec:
        """``self`` if it can index ``dim``-d features, else an :class:`InputError` naming the spec
        (checked before a spec is recorded, so a bad spec never reaches a database's meta.json).

        A factory string is checked by building the (empty) FAISS index for ``dim``: the string
        must parse, fit the dimension, take its search settings, and be a structure that can
        restrict a search to allowed rows (retrieval keeps to the vocabulary's labels).
        """
        if self.type == "ivf-pq" and dim % self.pq_m:
            divisors = [m for m in (4, 8, 12, 16, 24, 32, 48, 64, 96) if dim % m == 0]
            raise InputError(
                f"index parameter pq_m={self.pq_m} must divide the feature dimension {dim}; "
                f"e.g. pq_m={', '.join(map(str, divisors)) or '1'}"
            )
        if self.type == "factory":
            assert self.factory is not None
            index = _factory_index(dim, self.factory, str(self))
            problem = unrestrictable(index)
            if problem is not None:
                raise InputError(
                    f"bad index spec {str(self)!r}: {problem} cannot restrict a search to "
                    "allowed rows (retrieval keeps to the vocabulary's labels); use a Flat, SQ, "
                    "HNSW or IVF structure (optionally with PCA/OPQ or a refinement)"
                )
            inner = faiss.downcast_index(index)
            if isinstance(inner, faiss.IndexPreTransform):
                inner = faiss.downcast_index(inner.index)
            if self.ondisk and not isinstance(inner, faiss.IndexIVF):
                raise InputError(
                    f"bad index spec {str(self)!r}: ondisk=1 needs an IVF index (optionally "
                    "after a transform), without a refinement"
                )
            space: Any = faiss.ParameterSpace()
            try:
                space.set_index_parameters(index, self.search)
            except RuntimeError as error:
                raise InputError(f"bad index spec {str(self)!r}: {faiss_message(error)}") from None
        return self

    def resolve(self, rows: int, dim: int | None = None) -> IndexSpec:
        """The concrete spec for ``rows`` rows of dimension ``dim``: ``self`` unless ``auto``.

        ``auto`` follows FAISS's guidelines ("Guidelines to choose an index"): exact ``flat``
        search up to :data:`AUTO_EXACT_MAX_ROWS` rows; above, an IVF index with ``nlist`` inverted
        lists: the power of two at or above ``4 sqrt(R)`` (FAISS: 4-16 sqrt(R)) below 1M rows, and
        FAISS's 65536 / 262144 / 1048576 lists with an ``HNSW32`` coarse quantiser for 1M-10M /
        10M-100M / more rows, capped so each list trains on 39 points (:func:`auto_nlist`);
        ``nprobe`` is ``nlist / 256`` within 16..256 (recall@10 0.996 at 1M clustered rows, 0.99
        at half that). Vectors stay uncompressed (``Flat``) unless that would not fit
        ``memory_gb`` (codes, ids and centroids; ``dim`` needed then): ``SQ8`` (``D`` bytes a
        row), ``SQ4``, else the largest ``PQ`` code that fits (:func:`auto_codes`). Measured
        recall and speed: ``docs/scale.md``; a database's own: ``retclip db index --evaluate``.
        """
        if self.type != "auto":
            return self
        budget = self.memory_gb
        if budget is not None and dim is None:
            raise ValueError("resolving an auto spec with a memory budget needs the dimension")
        if rows <= AUTO_EXACT_MAX_ROWS:
            codes = "Flat" if budget is None or dim is None else auto_codes(rows, dim, budget, 0)
            if codes == "Flat":
                return IndexSpec("flat")
            if codes.startswith("SQ"):  # exhaustive over scalar codes; PQ needs an IVF (below)
                return IndexSpec("factory", factory=codes)
        nlist = auto_nlist(rows, dim, budget)
        codes = "Flat" if budget is None or dim is None else auto_codes(rows, dim, budget, nlist)
        low, high = AUTO_NPROBE_RANGE
        nprobe = min(nlist, max(low, min(high, nlist // AUTO_NPROBE_DIVISOR)))
        search = f"nprobe={nprobe}"
        quantizer = f"IVF{nlist}"
        if rows >= AUTO_HNSW_MIN_ROWS:
            quantizer += "_HNSW32"
            search += f",quantizer_efSearch={max(AUTO_QUANTIZER_EF_SEARCH, 2 * nprobe)}"
        return IndexSpec(
            "factory", factory=f"{quantizer},{codes}", search=search, ondisk=self.ondisk
        )

    def factory_string(self, rows: int) -> str:
        """The FAISS index-factory string this concrete spec builds over ``rows`` rows (the IVF
        list count capped so that each list trains on 39 points)."""
        if self.type == "flat":
            return "Flat"
        if self.type == "hnsw":
            return f"HNSW{self.hnsw_m},Flat"
        if self.type in ("ivf-flat", "ivf-pq"):
            nlist = min(self.nlist or default_nlist(rows), rows // MIN_POINTS_PER_CENTROID)
            codes = "Flat" if self.type == "ivf-flat" else f"PQ{self.pq_m}x{self.pq_bits}np"
            return f"IVF{max(nlist, 1)},{codes}"
        if self.type == "factory":
            assert self.factory is not None
            return self.factory
        raise ValueError("resolve an auto spec before asking for its factory string")

    def search_settings(self) -> str:
        """The search-time settings as FAISS ``ParameterSpace`` text (``""``: none)."""
        if self.type in ("ivf-flat", "ivf-pq"):
            return f"nprobe={self.nprobe}"
        if self.type == "hnsw":
            return f"efSearch={self.ef_search}"
        return self.search

    def build_params(self) -> dict[str, Any]:
        """The parameters that determine the built index (an index is stale when these change)."""
        return {"type": self.type, **self._params(_BUILD_PARAMS[self.type])}

    def to_dict(self) -> dict[str, Any]:
        """``{"type": ..., "params": {...}}`` with the parameters relevant to the type."""
        names = _BUILD_PARAMS[self.type] + _SEARCH_PARAMS[self.type]
        return {"type": self.type, "params": self._params(names)}

    def _params(self, names: tuple[str, ...]) -> dict[str, Any]:
        return {
            name: getattr(self, name)
            for name in names
            if name not in _OPTIONAL_DEFAULTS or getattr(self, name) != _OPTIONAL_DEFAULTS[name]
        }

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
        """Parse the CLI form ``TYPE[:key=value,...]``, e.g. ``"ivf-pq:nlist=256,nprobe=32"``.

        A FAISS index-factory string is ``factory:STRING[,setting=value,...]`` or the string
        itself when it starts with a capital (``"IVF4096,SQ8,nprobe=32"``): comma-separated parts
        with ``=`` are its search settings (FAISS ``ParameterSpace`` names, e.g. ``nprobe``,
        ``efSearch``, ``quantizer_efSearch``, ``k_factor``), except ``ondisk=1``.
        """
        source = text.strip()
        kind, _, rest = source.partition(":")
        kind = kind.strip()
        if kind not in INDEX_TYPES and _FACTORY_START.match(source):
            kind, rest = "factory", source
        items = [part.strip() for part in rest.split(",") if part.strip()]
        params: dict[str, Any] = {}
        if kind == "factory":
            components = [item for item in items if "=" not in item]
            if not components:
                raise InputError(f"bad index spec {text!r}: no FAISS index-factory string")
            params["factory"] = ",".join(components)
            items = [item for item in items if "=" in item]
        settings = []
        for item in items:
            key, sep, value = (part.strip() for part in item.partition("="))
            if not sep:
                raise InputError(f"bad index spec {text!r}: {item!r} is not key=value")
            if kind == "factory" and key != "ondisk":
                if not _is_number(value):
                    raise InputError(f"bad index spec {text!r}: {key}={value!r} is not a number")
                settings.append(f"{key}={value}")
                continue
            params[key] = _parse_value(text, key, value)
        if settings:
            params["search"] = ",".join(settings)
        return cls._from_params(kind, params, text)

    @classmethod
    def _from_params(cls, kind: str, params: dict[str, Any], source: str) -> IndexSpec:
        if kind not in INDEX_TYPES:
            raise InputError(
                f"bad index spec {source!r}: unknown type {kind!r}; "
                f"expected one of {', '.join(INDEX_TYPES)} or a FAISS index-factory string"
            )
        allowed = _BUILD_PARAMS[kind] + _SEARCH_PARAMS[kind]
        unknown = sorted(set(params) - set(allowed))
        if unknown:
            raise InputError(
                f"bad index spec {source!r}: unknown parameter(s) {', '.join(unknown)} for "
                f"{kind}; expected {', '.join(allowed) or 'none'}"
            )
        if params.get("ondisk") in (0, 1):  # 0/1 in the text form, a boolean in meta.json
            params = {**params, "ondisk": bool(params["ondisk"])}
        try:
            return cls(type=kind, **params)
        except InputError as error:
            raise InputError(f"bad index spec {source!r}: {error}") from None

    def __str__(self) -> str:
        if self.type == "factory":
            extra = [self.search] if self.search else []
            extra += ["ondisk=1"] if self.ondisk else []
            return ",".join([f"factory:{self.factory}", *extra])
        params = self.to_dict()["params"]
        shown = {k: int(v) if isinstance(v, bool) else v for k, v in params.items()}
        body = ",".join(f"{k}={v}" for k, v in shown.items() if v is not None)
        return f"{self.type}:{body}" if body else self.type


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def _parse_value(text: str, key: str, value: str) -> int | float:
    try:
        return float(value) if key == "memory_gb" else int(value)
    except ValueError:
        what = "a number" if key == "memory_gb" else "an integer"
        raise InputError(f"bad index spec {text!r}: {key}={value!r} is not {what}") from None


def faiss_message(error: BaseException) -> str:
    """The last line of a FAISS C++ error, without its source location."""
    text = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    text = _FAISS_LOCATION.sub("", text)
    return text.rsplit("Error: ", 1)[-1].strip()


def _factory_index(dim: int, factory: str, shown: str) -> faiss.Index:
    """``faiss.index_factory`` over inner products; a string FAISS refuses → :class:`InputError`."""
    if factory.split(",", 1)[0].startswith("IDMap"):
        raise InputError(f"bad index spec {shown!r}: IDMap is not needed (row ids are positions)")
    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:
        raise InputError(
            f"bad index spec {shown!r}: FAISS cannot build {factory!r} for dimension {dim} "
            f"({faiss_message(error)})"
        ) from None


def unrestrictable(index: faiss.Index) -> str | None:
    """The name of the part of ``index`` that cannot honour an ``IDSelector``, or ``None``.

    Accepted: flat, scalar-quantised and RaBitQ codes, HNSW over any storage, IVF over any codes
    but additive quantisers, and PCA/OPQ/other transforms or refinements over those.
    """
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        return unrestrictable(index.index)
    if isinstance(index, faiss.IndexRefine):
        return unrestrictable(index.base_index)
    additive = tuple(
        getattr(faiss, name)
        for name in ("IndexIVFAdditiveQuantizer", "IndexIVFAdditiveQuantizerFastScan")
        if hasattr(faiss, name)
    )
    if isinstance(index, faiss.IndexIVF) and not isinstance(index, additive):
        return None
    leaves = (faiss.IndexFlat, faiss.IndexScalarQuantizer, faiss.IndexHNSW)
    if isinstance(index, leaves + ((faiss.IndexRaBitQ,) if hasattr(faiss, "IndexRaBitQ") else ())):
        return None
    return f"FAISS's {type(index).__name__}"


def default_nlist(rows: int) -> int:
    """Default IVF list count for ``rows`` rows: ``~4 sqrt(R)``, at most ``R // 39`` (may be 0)."""
    return min(round(4 * math.sqrt(rows)), rows // MIN_POINTS_PER_CENTROID)


def auto_nlist(rows: int, dim: int | None = None, memory_gb: float | None = None) -> int:
    """``auto``'s IVF list count for ``rows`` rows (:meth:`IndexSpec.resolve`), a power of two,
    at most ``rows / 39``; with a memory budget also small enough that the training sample (39
    float32 rows of dim ``dim`` a list) takes at most half of ``memory_gb`` GiB."""
    if rows < AUTO_HNSW_MIN_ROWS:
        wanted = 1 << max(0, math.ceil(math.log2(max(1.0, 4 * math.sqrt(rows)))))
    else:
        wanted = next(n for bound, n in AUTO_LARGE_NLIST if bound is None or rows < bound)
    trainable = rows // MIN_POINTS_PER_CENTROID
    if memory_gb is not None and dim is not None:
        trainable = min(trainable, int(memory_gb * 2**29 / (MIN_POINTS_PER_CENTROID * dim * 4)))
    return max(1, min(wanted, 1 << max(0, trainable.bit_length() - 1)))


def auto_codes(rows: int, dim: int, memory_gb: float, nlist: int) -> str:
    """The best vector codes for ``rows`` rows of dim ``dim`` within ``memory_gb`` GiB.

    Counts the codes, 8-byte ids (IVF) and float32 centroids (``nlist``, 0 for no IVF): ``Flat``
    (``4 D`` bytes a row), ``SQ8`` (``D``), ``SQ4`` (``D / 2``), else ``PQm`` (``m`` bytes, FAISS's
    ``m <= 64``) for the largest divisor ``4 <= m <= D / 2`` of ``D`` that fits; if none fits, the
    smallest, with a warning.
    """
    budget = memory_gb * 2**30
    fixed, per_id = nlist * dim * 4, 8 if nlist else 0
    candidates = [("Flat", 4 * dim), ("SQ8", dim), ("SQ4", dim // 2)]
    divisors = [m for m in range(min(64, dim // 2), 3, -1) if dim % m == 0] or [1]
    candidates += [(f"PQ{m}np", m) for m in divisors]
    for codes, size in candidates:
        if fixed + rows * (size + per_id) <= budget:
            return codes
    warnings.warn(
        f"{rows} rows of dim {dim} do not fit memory_gb={memory_gb} even as "
        f"{candidates[-1][1]}-byte codes; using {candidates[-1][0]}",
        stacklevel=3,
    )
    return candidates[-1][0]


def _as_matrix(features: np.ndarray, what: str) -> np.ndarray:
    array = np.ascontiguousarray(features, dtype=np.float32)
    if array.ndim != 2:
        raise InputError(f"{what} have shape {array.shape}; expected [N, D]")
    return array


#: The search settings last set on each live index object (FAISS indexes take no new attributes).
_APPLIED: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def configure_search(index: faiss.Index, spec: IndexSpec) -> None:
    """Set ``spec``'s search-time settings on ``index`` through FAISS's ``ParameterSpace``
    (``nprobe``, ``efSearch``, ...; FAISS keeps them on the index). An exact index built in place
    of an approximate one (too few rows to train) takes none."""
    text = spec.search_settings()
    if _APPLIED.get(index) == text:
        return  # already set: concurrent searches of one index do not rewrite it
    if text and not isinstance(faiss.downcast_index(index), faiss.IndexFlat):
        space: Any = faiss.ParameterSpace()
        space.set_index_parameters(index, text)
    _APPLIED[index] = text


def _search_parameters(
    index: faiss.Index, selector: Any, k: int, widen: float, keep: list[Any]
) -> Any:
    """Per-call ``SearchParameters`` for ``index`` carrying its own settings (``nprobe``,
    ``efSearch``, ``k_factor``; the first two times ``widen``) and ``selector`` down to the
    structure that filters; every object is appended to ``keep``, since FAISS holds raw pointers
    to them."""
    index = faiss.downcast_index(index)
    params: Any
    if isinstance(index, faiss.IndexPreTransform):
        params = faiss.SearchParametersPreTransform()
        params.index_params = _search_parameters(index.index, selector, k, widen, keep)
    elif isinstance(index, faiss.IndexRefine):
        params = faiss.IndexRefineSearchParameters()
        params.k_factor = index.k_factor
        inner_k = max(1, round(k * index.k_factor))
        params.base_index_params = _search_parameters(
            index.base_index, selector, inner_k, widen, keep
        )
    elif isinstance(index, faiss.IndexIVF):
        params = faiss.SearchParametersIVF()
        params.nprobe = min(math.ceil(int(index.nprobe) * widen), int(index.nlist))
        params.max_codes = index.max_codes
        params.sel = selector
    elif isinstance(index, faiss.IndexHNSW):
        params = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]
        params.efSearch = max(math.ceil(int(index.hnsw.efSearch) * widen), k)
        params.sel = selector
    else:
        params = faiss.SearchParameters()
        params.sel = selector
    keep.append(params)
    return params


def search_index(
    index: faiss.Index,
    spec: IndexSpec,
    queries: np.ndarray,
    k: int,
    allowed_ids: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` inner-product search of ``queries`` ``[Q, D]`` with ``spec``'s search settings.

    Args:
        allowed_ids: row ids that may be returned (int array), or a boolean mask over all rows;
            ``None`` allows every row. Applied inside FAISS through an ``IDSelectorBitmap``; an
            approximate search keeping a fraction ``f`` of the rows probes ``1 / f`` times more
            IVF lists or HNSW candidates (at most :data:`MAX_RESTRICTED_WIDENING` times), as the
            lists and graph neighbourhoods it visits hold that much fewer allowed rows.

    Returns:
        ``(similarities [Q, k] float32, ids [Q, k] int64)``, best first; where fewer than ``k``
        rows qualify (or an approximate index finds fewer), ids are ``-1`` and similarities
        ``-inf``.
    """
    queries = _as_matrix(queries, "queries")
    if k < 1:
        raise InputError(f"k={k}; expected k >= 1")
    ntotal = int(index.ntotal)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an over-budget auto spec warned when it was built
        configure_search(index, spec.resolve(ntotal, int(index.d)))
    selector = bitmap = None
    widen = 1.0
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
        kept = max(int(mask.sum()), 1)
        widen = min(MAX_RESTRICTED_WIDENING, ntotal / kept) if ntotal else 1.0
    keep: list[Any] = []
    params = _search_parameters(index, selector, k, widen, keep)
    sims, ids = index.search(queries, k, params=params)
    del selector, bitmap, keep
    sims = sims.astype(np.float32, copy=False)
    ids = ids.astype(np.int64, copy=False)
    sims[ids < 0] = -np.inf
    return sims, ids


def ondisk_file(index: faiss.Index) -> Path | None:
    """The data file of ``index``'s on-disk inverted lists (``OnDiskInvertedLists``), if any."""
    ivf: Any = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return None
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    return Path(lists.filename) if isinstance(lists, faiss.OnDiskInvertedLists) else None


def move_ondisk_file(index: faiss.Index, target: Path) -> None:
    """Move ``index``'s on-disk list data to ``target`` (same file system) and point the index at
    it, so that the next :func:`save_index` records that name (the open mapping stays valid)."""
    source = ondisk_file(index)
    if source is None:
        raise ValueError("index has no on-disk inverted lists")
    os.replace(source, target)
    with open(target, "rb+") as handle:
        os.fsync(handle.fileno())
    ivf: Any = faiss.extract_index_ivf(index)
    lists: Any = faiss.downcast_InvertedLists(ivf.invlists)
    lists.filename = str(target)


def save_index(index: faiss.Index, path: Path | str) -> str:
    """Write ``index`` to ``path`` atomically (temp file in the same directory, fsync, replace).

    Returns the file's SHA-256, which the database records to detect a corrupt index file later.
    An on-disk index writes only its list offsets and data file name here (:func:`ondisk_file`).
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


def load_index(path: Path | str, *, mmap: bool = False) -> faiss.Index:
    """Read an index written by :func:`save_index`; unreadable → :class:`DatabaseError`.

    With ``mmap`` the vectors, codes and inverted lists are memory-mapped from the file
    (FAISS's ``IO_FLAG_MMAP_IFC``), not read into memory: processes serving one database share
    the page cache, and an index larger than free memory can still be searched (read-only).
    On-disk inverted lists (mapped in any case) are looked for beside ``path``
    (``IO_FLAG_ONDISK_SAME_DIR``, which FAISS reads without ``IO_FLAG_MMAP_IFC``).
    """
    attempts = [faiss.IO_FLAG_ONDISK_SAME_DIR]
    if mmap:
        attempts.insert(0, faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_MMAP_IFC)
    for flags in attempts:
        try:
            return faiss.read_index(str(path), flags)
        except RuntimeError as error:
            problem = faiss_message(error)
    raise DatabaseError(f"index file {path} is corrupt or unreadable ({problem})")
