"""Checking what a request brings: body size while it streams in, images and masks (size
limits before decoding), vocabularies and settings."""

from __future__ import annotations

import dataclasses
import io
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import UploadFile
from fastapi.responses import JSONResponse
from PIL import Image, UnidentifiedImageError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from retclip.database import FeatureDatabase
from retclip.errors import InputError
from retclip.images import load_image
from retclip.segmenter import Settings
from retclip.server.config import ServerError
from retclip.vocabulary import Vocabulary


def image_size(data: bytes, what: str, max_pixels: int) -> tuple[int, int]:
    """``(width, height)`` from an uploaded image's header, before any pixel is decoded.

    Raises:
        ServerError: 413 when the header claims more than ``max_pixels`` (decompression bombs
            included, which PIL refuses to open at all).
        InputError: the bytes are not an image.
    """
    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
    except Image.DecompressionBombError:
        raise ServerError(
            413, f"{what} claims more pixels than PIL will decode; the limit is {max_pixels}"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise InputError(f"uploaded file {what} is not a recognised image") from None
    if width * height > max_pixels:
        raise ServerError(
            413,
            f"{what} is {width}x{height} = {width * height} pixels; the limit is {max_pixels} "
            "pixels",
        )
    return width, height


def decode_image(data: bytes, name: str, max_pixels: int) -> np.ndarray:
    """``[H, W, 3]`` uint8 RGB of an uploaded file; the size limit is checked before decoding."""
    if not data:
        raise InputError(f"uploaded file {name!r} is empty; expected an image")
    image_size(data, f"image {name!r}", max_pixels)
    with tempfile.TemporaryDirectory(prefix="retclip-upload-") as tmp:
        path = Path(tmp) / "upload"
        path.write_bytes(data)
        try:
            return load_image(path)
        except InputError as error:
            raise InputError(str(error).replace(str(path), repr(name))) from None


async def read_upload(upload: UploadFile, what: str, limit: int) -> tuple[bytes, str]:
    """The bytes and a display name of an uploaded file (413 above ``limit``)."""
    name = Path(upload.filename or what).name or what
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise ServerError(413, f"{what} {name!r} is larger than the upload limit of {limit} bytes")
    return data, name


def decode_mask(data: bytes, name: str, shape: tuple[int, int]) -> np.ndarray:
    """``[H, W]`` bool of an uploaded mask image: non-zero (any channel) = the object.

    The header must give the image's own size before anything is decoded, so a mask costs at
    most as many pixels as its (already size-limited) image.
    """
    width, height = image_size(data, f"mask {name!r}", shape[0] * shape[1])
    if (height, width) != shape:
        raise InputError(
            f"mask {name!r} is {width}x{height}, its image is {shape[1]}x{shape[0]}; expected "
            "the same size"
        )
    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()
            array = np.asarray(opened.convert("L") if opened.mode not in ("L", "1") else opened)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise InputError(f"mask {name!r} is not a recognised image") from None
    if array.shape != shape:
        raise InputError(
            f"mask {name!r} is {array.shape[1]}x{array.shape[0]}, its image is "
            f"{shape[1]}x{shape[0]}; expected the same size"
        )
    mask = array.astype(bool)
    if not mask.any():
        raise InputError(f"mask {name!r} is empty; expected non-zero pixels on the object")
    return mask


def vocabulary_of(
    classes: str | None,
    vocab: str | None,
    max_classes: int,
    database: Callable[[], FeatureDatabase] | None = None,
) -> Vocabulary:
    """The request's vocabulary from exactly one of ``classes`` and a built-in ``vocab`` name,
    or ``vocab=db``: every label of the request's database (``database`` opens it)."""
    if vocab is not None and vocab.strip().lower() == "db" and not (classes or "").strip():
        if database is None:
            raise InputError("'vocab' db segments with the database's labels: give 'db' too")
        found = database().vocabulary()
        if len(found) > max_classes:
            raise InputError(
                f"the database has {len(found)} labels; the limit is {max_classes} classes"
            )
        return found
    return Vocabulary.from_choice(
        classes,
        vocab,
        names=("the form field 'classes'", "'vocab'"),
        builtin_only=True,
        max_classes=max_classes,
    )


def settings_of(base: Settings, **changes: Any) -> Settings:
    """``base`` with the given (non-``None``) fields replaced, validated."""
    given = {key: value for key, value in changes.items() if value is not None}
    return dataclasses.replace(base, **given)


def choose(name: str | None, allowed: Sequence[str], what: str) -> str:
    if name is None or not name.strip():
        return allowed[0]
    if name not in allowed:
        raise InputError(f"unknown {what} {name!r}; this server offers {', '.join(allowed)}")
    return name


class BodyLimit:
    """ASGI middleware: 413 once a request body exceeds ``limit`` bytes (declared or streamed)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = f"request body larger than the upload limit of {self.limit} bytes"
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await JSONResponse({"error": message}, status_code=413)(scope, receive, send)
            return
        received = 0
        started = exceeded = False

        async def limited_receive() -> Message:
            nonlocal received, exceeded
            incoming = await receive()
            if incoming["type"] == "http.request":
                received += len(incoming.get("body", b""))
                if received > self.limit:
                    exceeded = True
                    raise ServerError(413, message)
            return incoming

        async def tracking_send(outgoing: Message) -> None:
            nonlocal started
            if exceeded:
                # the body parser may turn the ServerError into its own 400 ("error parsing the
                # body"): whatever the app answers, the answer is the 413
                if outgoing["type"] == "http.response.start" and not started:
                    started = True
                    await JSONResponse({"error": message}, status_code=413)(scope, receive, send)
                return
            started = started or outgoing["type"] == "http.response.start"
            await send(outgoing)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except ServerError as error:
            if started:
                raise
            await JSONResponse({"error": str(error)}, status_code=error.status)(
                scope, receive, send
            )
