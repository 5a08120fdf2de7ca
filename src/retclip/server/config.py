"""The settings of one ``retclip serve`` process and the HTTP error type."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from retclip.errors import RetclipError
from retclip.pipeline import spec_error


class ServerError(RetclipError):
    """A request error with its HTTP status (413, 401, 404, 409, 503, 504...)."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = dict(headers or {})


class ServerConfig(BaseModel):
    """Settings of one server process (``retclip serve`` options), validated on construction
    (a bad value raises :class:`InputError` naming it).

    Attributes:
        data_dir: folder holding the databases (``<data_dir>/databases/<name>``).
        backbones: backbones requests may name; the first is the default. Loaded at start-up.
        proposers: proposers requests may name; the first is the default. Loaded at start-up.
        device: ``auto``, ``cpu``, ``cuda``...
        token: bearer token required by every request that writes (``None``: no token).
        max_upload_bytes: largest request body.
        max_image_pixels: largest image (width × height), checked before decoding.
        max_classes: most classes in one request.
        max_mask_class_pairs: most (mask, class) scores of one image (masks × classes): bounds
            the scoring, retrieval and merge work of a request after its proposer ran.
        max_example_images: most images in one ``add rows`` request.
        max_concurrency: model batches running at once.
        max_queue: jobs waiting at most; more → 503.
        max_batch: jobs per micro-batch.
        batch_wait_ms: how long a batch waits for more jobs once the first is taken.
        timeout_s: longest wait for a model job (queue + run) → 504.
        result_cache_mb: memory for cached results (image, masks, scores) for ``/rescore``.
        result_cache_entries: most cached results.
        allowed_hosts: ``Host`` names requests may be addressed to (``*``: any), against DNS
            rebinding; the local names by default (:mod:`retclip.server.guards`).
        allowed_origins: web origins besides the server's own that may write (POST, DELETE).
        default_database: the database the page selects first (``retclip serve`` sets the
            toy-world one it builds), or ``None``.
        model_options: options of the models (``ModelSpec`` fields other than backbone,
            proposer and device: ``fcclip_checkpoint``, ``detector``, thresholds...), the same
            for every backbone and proposer (each proposer takes the ones it knows).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    data_dir: Path
    backbones: tuple[str, ...] = Field(("toy",), min_length=1)
    proposers: tuple[str, ...] = Field(("regions",), min_length=1)
    device: str = "cpu"
    token: str | None = Field(None, min_length=1)
    max_upload_bytes: int = Field(20 * 2**20, ge=1)
    max_image_pixels: int = Field(4096 * 4096, ge=1)
    max_classes: int = Field(1000, ge=1)
    max_mask_class_pairs: int = Field(250 * 1000, ge=1)
    max_example_images: int = Field(32, ge=1)
    max_concurrency: int = Field(1, ge=1)
    max_queue: int = Field(32, ge=1)
    max_batch: int = Field(4, ge=1)
    batch_wait_ms: float = Field(0.0, ge=0, allow_inf_nan=False)
    timeout_s: float = Field(120.0, gt=0, allow_inf_nan=False)
    result_cache_mb: int = Field(512, ge=1)
    result_cache_entries: int = Field(64, ge=1)
    model_options: dict[str, Any] = Field(default_factory=dict)
    allowed_hosts: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
    allowed_origins: tuple[str, ...] = ()
    default_database: str | None = None

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as error:
            raise spec_error(error) from None

    @field_validator("proposers")
    @classmethod
    def _servable(cls, proposers: tuple[str, ...]) -> tuple[str, ...]:
        if "gt" in proposers:
            raise ValueError("proposer 'gt' reads ground truth from files and cannot be served")
        return proposers

    def limits(self) -> dict[str, Any]:
        keys = (
            "max_upload_bytes",
            "max_image_pixels",
            "max_classes",
            "max_mask_class_pairs",
            "max_example_images",
            "max_concurrency",
            "max_queue",
            "max_batch",
            "timeout_s",
        )
        return {key: getattr(self, key) for key in keys}
