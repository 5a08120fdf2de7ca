"""The retrieval feature database (paper §2.1) and its FAISS indexes (paper §2.2)."""

from __future__ import annotations

from retclip.database.index import (
    INDEX_TYPES,
    IndexSpec,
    default_nlist,
    load_index,
    save_index,
    search_index,
)
from retclip.database.index_build import build_index, build_index_streaming
from retclip.database.store import FORMAT_VERSION, DatabaseLabel, FeatureDatabase

__all__ = [
    "FORMAT_VERSION",
    "INDEX_TYPES",
    "DatabaseLabel",
    "FeatureDatabase",
    "IndexSpec",
    "build_index",
    "build_index_streaming",
    "default_nlist",
    "load_index",
    "save_index",
    "search_index",
]
