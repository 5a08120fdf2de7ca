"""The declared schema of a feature database's ``meta.json`` (validated with pydantic).

Field meanings: :mod:`retclip.database.store`. Validation is structural (types, ranges, the shard
name pattern, row counts adding up); the backbone fingerprint and index spec are then checked by
their own parsers. Unknown keys are kept, so a newer retclip's additions survive a rewrite.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, model_validator

#: Shard files: six or more digits, ``.npz``; their completed-sources files (format 2).
SHARD_PATTERN = r"^\d{6,}\.npz$"
COMPLETED_PATTERN = r"^\d{6,}\.completed\.json$"


class LabelEntry(BaseModel):
    """One label: its name and the synonyms a vocabulary class may match it by."""

    model_config = ConfigDict(extra="allow")
    name: StrictStr
    synonyms: list[StrictStr]


class CompletedEntry(BaseModel):
    """A shard's completed-sources file (format 2): ``{build id: [source, ...]}`` as JSON."""

    model_config = ConfigDict(extra="allow")
    file: StrictStr = Field(pattern=COMPLETED_PATTERN)
    bytes: StrictInt = Field(ge=0)
    sha256: StrictStr
    sources: StrictInt = Field(ge=0)


class ShardEntry(BaseModel):
    """One committed shard file and what it holds. Its commit's completed sources are listed
    here in format 1 (``completed_sources``) and in a file beside it in format 2 (``completed``,
    ``None`` when it finished none)."""

    model_config = ConfigDict(extra="allow")
    file: StrictStr = Field(pattern=SHARD_PATTERN)
    rows: StrictInt = Field(ge=0)
    bytes: StrictInt = Field(ge=0)
    sha256: StrictStr
    build_ids: list[StrictStr]
    completed_sources: dict[str, list[StrictStr]] | None = None
    completed: CompletedEntry | None = None

    @model_validator(mode="after")
    def _completed_beside(self) -> ShardEntry:
        if self.completed is not None and self.completed.file != (
            self.file.removesuffix(".npz") + ".completed.json"
        ):
            raise ValueError(f"shard {self.file} names another shard's completed sources")
        return self


class DatabaseMeta(BaseModel):
    """``meta.json``: everything but the rows themselves."""

    model_config = ConfigDict(extra="allow")
    format_version: Literal[1, 2]
    fingerprint: dict[str, Any]
    dim: StrictInt = Field(ge=1)
    dtype: Literal["float16", "float32"]
    rows: StrictInt = Field(ge=0)
    rows_per_class: dict[str, StrictInt]
    labels: list[LabelEntry]
    index: dict[str, Any]
    shards: list[ShardEntry]
    generation: StrictInt = Field(ge=0)
    pooling: StrictStr | None = None
    index_file: dict[str, Any] | None = None
    #: SHA-256 of the rest of the content (``shards.meta_checksum``); absent in older databases.
    checksum: StrictStr | None = None

    @model_validator(mode="after")
    def _rows_add_up(self) -> DatabaseMeta:
        if sum(shard.rows for shard in self.shards) != self.rows:
            raise ValueError("shard row counts do not add up to 'rows'")
        for shard in self.shards:
            listed = shard.completed_sources is not None
            if self.format_version == 1 and (not listed or shard.completed is not None):
                raise ValueError(f"format 1 shard {shard.file} lacks 'completed_sources'")
            if self.format_version != 1 and listed:
                raise ValueError(
                    f"format {self.format_version} shard {shard.file} lists 'completed_sources' "
                    "(a format 1 field; its completed sources belong in its own file)"
                )
        return self
