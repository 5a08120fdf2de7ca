"""Image–text shards in the webdataset layout, as img2dataset writes them (LAION, CC12M, ...).

A shard is a tar file; its members ``KEY.EXT`` that share a ``KEY`` (the member name up to the
first dot of its file name, webdataset's rule) are one sample, and a sample's members are
adjacent::

    00003.tar
      000030000.jpg    the image (.jpg, .jpeg, .png or .webp)
      000030000.txt    its caption (UTF-8)
      000030000.json   metadata; its "caption" field is the caption too
      000030001.jpg
      ...

Other members (``.npy``, ``.cls``, ...) are ignored. A sample needs an image and a caption (the
``.txt``, or the ``.json``'s ``caption``); its id is ``SHARD#KEY``. Shard sets are named with
webdataset's brace patterns: ``data/{00000..00127}.tar``.

:func:`read_shard_samples` streams one shard, so a distributed reader can hand each worker a
shard. Without image bytes (``images=False``) it reads only the tar headers and the captions, and
each sample's :class:`ShardImage` reads its image later by offset: the single-process build holds
no image bytes in memory, which needs uncompressed shards (img2dataset's default).
"""

from __future__ import annotations

import dataclasses
import json
import lzma
import re
import tarfile
import zlib
from collections.abc import Generator, Iterable, Iterator
from pathlib import Path

import numpy as np

from retclip.errors import InputError
from retclip.images import decode_image

__all__ = [
    "IMAGE_EXTENSIONS",
    "ShardImage",
    "ShardSample",
    "expand_braces",
    "read_shard_samples",
    "shard_paths",
]

#: Member extensions read as a sample's image (lower case).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
#: More paths than this from one pattern is a typo, not a shard set.
MAX_EXPANSION = 1_000_000
#: webdataset's split of a member name into sample key and extension.
_KEY_EXT = re.compile(r"^((?:.*/|)[^./][^.]*)\.([^/]*)$")
_COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ": "xz", b"\x28\xb5\x2f\xfd": "zstd"}
_READ_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError)


def expand_braces(pattern: str) -> list[str]:
    """The paths a brace pattern names, as bash and webdataset expand it.

    ``{a,b}`` are alternatives and ``{000..127}`` an integer range (zero-padded to the width of
    its bounds when one is written with a leading zero; descending when the first bound is the
    larger); groups nest and several expand left to right: ``s{0..1}-{a,b}`` is ``s0-a, s0-b,
    s1-a, s1-b``.

    Raises:
        InputError: unbalanced braces, a group that is neither, or over a million paths.
    """
    paths = _expand(pattern, pattern)
    if len(paths) > MAX_EXPANSION:
        raise InputError(f"shard pattern {pattern!r} names over {MAX_EXPANSION} paths")
    return paths


def _expand(text: str, pattern: str) -> list[str]:
    start = text.find("{")
    if start < 0:
        if "}" in text:
            raise InputError(f"shard pattern {pattern!r} has a '}}' without its '{{'")
        return [text]
    depth, last, parts, end = 0, start + 1, [], -1
    for i in range(start, len(text)):
        char = text[i]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                parts.append(text[last:i])
                end = i
                break
        elif char == "," and depth == 1:
            parts.append(text[last:i])
            last = i + 1
    if end < 0:
        raise InputError(f"shard pattern {pattern!r} has a '{{' without its '}}'")
    head, tails = text[:start], _expand(text[end + 1 :], pattern)
    if len(parts) == 1:
        bounds = re.fullmatch(r"(\d+)\.\.(\d+)", parts[0])
        if bounds is None:
            raise InputError(
                f"shard pattern {pattern!r}: {{{parts[0]}}} is neither a list {{a,b}} nor a "
                "range {0..9}"
            )
        first, stop = bounds.groups()
        padded = any(len(b) > 1 and b.startswith("0") for b in (first, stop))
        width = max(len(first), len(stop)) if padded else 0
        step = 1 if int(stop) >= int(first) else -1
        if abs(int(stop) - int(first)) >= MAX_EXPANSION:
            raise InputError(f"shard pattern {pattern!r} names over {MAX_EXPANSION} paths")
        alternatives = [str(n).zfill(width) for n in range(int(first), int(stop) + step, step)]
    else:
        alternatives = [x for part in parts for x in _expand(part, pattern)]
    return [head + alt + tail for alt in alternatives for tail in tails]


def shard_paths(patterns: Iterable[str]) -> list[str]:
    """The shard files of brace ``patterns`` (:func:`expand_braces`), each once, in order.

    Raises:
        InputError: a bad pattern, or a path it names that is not a file.
    """
    paths = list(dict.fromkeys(p for pattern in patterns for p in expand_braces(pattern)))
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise InputError(f"shard not found: {missing[0]}{more}")
    if not paths:
        raise InputError("no shards given")
    return paths


@dataclasses.dataclass(frozen=True)
class ShardImage:
    """A sample's image inside its uncompressed shard: ``size`` bytes at byte ``offset``. Small
    and picklable: it reads the image when asked, not before."""

    shard: str
    member: str
    offset: int
    size: int

    def read(self) -> bytes:
        """The image file's bytes."""
        try:
            with open(self.shard, "rb") as file:
                file.seek(self.offset)
                data = file.read(self.size)
        except OSError as exc:
            raise InputError(f"cannot read shard {self.shard}: {exc.strerror or exc}") from None
        if len(data) != self.size:
            raise InputError(f"shard {self.shard} ends inside {self.member} (truncated)")
        return data

    def load(self) -> np.ndarray:
        """``[H, W, 3]`` uint8 RGB (:func:`retclip.images.decode_image`)."""
        return decode_image(self.read(), f"{self.shard}#{self.member}")


@dataclasses.dataclass(frozen=True)
class ShardSample:
    """One sample of a shard: its key, its image (and the image's bytes when read with them),
    and its captions (the ``.txt``'s and the ``.json``'s, each once)."""

    shard: str
    key: str
    image: ShardImage
    captions: tuple[str, ...]
    data: bytes | None = None

    @property
    def source(self) -> str:
        """The sample's stable id, ``SHARD#KEY``: its provenance, and what a resumed build
        skips."""
        return f"{self.shard}#{self.key}"


def read_shard_samples(
    path: str | Path, *, images: bool = True
) -> Generator[ShardSample, None, None]:
    """The samples of one shard, streamed in file order (layout in the module docstring).

    With ``images`` (default) each sample carries its image's bytes and the shard may be
    compressed (``.tar.gz`` and the like, read as one stream). Without, only the headers and the
    captions are read, seeking past the images: the shard must be an uncompressed tar.

    Raises:
        InputError: naming the shard, and the sample's key where one is to blame: a file that is
            not a complete tar, a sample without an image or caption, a second image, a caption
            that is not UTF-8 or JSON, a sample whose members are not adjacent.
    """
    path = str(path)
    if not Path(path).is_file():
        raise InputError(f"shard not found: {path}")
    if not images:
        try:
            with open(path, "rb") as file:
                magic = file.read(6)
        except OSError as exc:
            raise InputError(f"cannot read shard {path}: {exc.strerror or exc}") from None
        kind = next((name for m, name in _COMPRESSED.items() if magic.startswith(m)), None)
        if kind is not None:
            raise InputError(
                f"shard {path} is {kind}-compressed; its images are read by offset, which needs "
                "an uncompressed tar (img2dataset's default): decompress it first"
            )
    try:
        tar = _TarFile.open(path, mode="r|*" if images else "r:", tarinfo=_TarInfo)
    except _READ_ERRORS as exc:
        raise InputError(f"cannot read shard {path}: {exc}") from None
    assert isinstance(tar, _TarFile)
    with tar:
        yield from _samples(tar, path, images)


class _TarFile(tarfile.TarFile):
    """A tar file that remembers why its last header read stopped (:class:`_TarInfo`)."""

    stopped_by: Exception | None = None


class _TarInfo(tarfile.TarInfo):
    @classmethod
    def fromtarfile(cls, archive: tarfile.TarFile) -> _TarInfo:
        try:
            return super().fromtarfile(archive)
        except tarfile.HeaderError as exc:
            if isinstance(archive, _TarFile):
                archive.stopped_by = exc
            raise


class _Sample:
    """The members of one sample read so far."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.image: ShardImage | None = None
        self.data: bytes | None = None
        self.texts: dict[str, bytes] = {}


def _samples(tar: _TarFile, path: str, images: bool) -> Iterator[ShardSample]:
    seen: set[str] = set()
    current: _Sample | None = None
    try:
        for member in tar:
            match = _KEY_EXT.match(member.name)
            if not member.isfile() or match is None:
                continue
            key, ext = match.group(1), match.group(2).lower()
            if current is None or key != current.key:
                if current is not None:
                    yield _finish(current, path)
                if key in seen:
                    raise InputError(
                        f"{path}#{key}: the sample's files are not adjacent in the shard "
                        "(its key is used twice)"
                    )
                seen.add(key)
                current = _Sample(key)
            if ext in IMAGE_EXTENSIONS:
                if current.image is not None:
                    raise InputError(
                        f"{path}#{key}: two images ({current.image.member}, {member.name})"
                    )
                current.image = ShardImage(path, member.name, member.offset_data, member.size)
                if images:
                    current.data = _read_member(tar, member)
            elif ext in ("txt", "json"):
                current.texts[ext] = _read_member(tar, member)
        # tarfile ends quietly at a header cut short or damaged: only a zero block is an end
        if type(tar.stopped_by).__name__ != "EOFHeaderError":
            at = f"in or after sample {current.key}" if current is not None else "at its start"
            raise InputError(
                f"shard {path} is truncated or damaged {at}: no end-of-archive marker at byte "
                f"{tar.offset} ({tar.stopped_by}); a partial download?"
            )
        if current is not None:
            yield _finish(current, path)
    except _READ_ERRORS as exc:
        at = f" in or after sample {current.key}" if current is not None else ""
        raise InputError(f"cannot read shard {path}{at}: {exc}") from None


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    file = tar.extractfile(member)
    assert file is not None  # a regular file
    return file.read()


def _finish(sample: _Sample, path: str) -> ShardSample:
    where = f"{path}#{sample.key}"
    if sample.image is None:
        raise InputError(f"{where}: no image ({sample.key}.jpg, .jpeg, .png or .webp)")
    captions: list[str] = []
    if "txt" in sample.texts:
        try:
            captions.append(sample.texts["txt"].decode("utf-8-sig").strip())
        except UnicodeDecodeError:
            raise InputError(f"{where}: {sample.key}.txt is not UTF-8 text") from None
    described = "txt" in sample.texts
    if "json" in sample.texts:
        try:
            meta = json.loads(sample.texts["json"].decode("utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"{where}: {sample.key}.json is not valid JSON ({exc})") from None
        if isinstance(meta, dict) and "caption" in meta:
            caption = meta["caption"]  # null: the sample has no caption, like an empty .txt
            if caption is not None and not isinstance(caption, str):
                raise InputError(f"{where}: 'caption' in {sample.key}.json is not a string")
            captions.append((caption or "").strip())
            described = True
    if not described:
        raise InputError(
            f"{where}: no caption ({sample.key}.txt, or a 'caption' in {sample.key}.json)"
        )
    return ShardSample(path, sample.key, sample.image, tuple(dict.fromkeys(captions)), sample.data)
