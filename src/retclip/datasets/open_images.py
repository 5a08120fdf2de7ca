"""Open Images (V6 / V7) as downloaded: the image-level labels, or the box labels, of a split.

Annotation files lie in ``ROOT/annotations/`` or in ``ROOT`` itself, under their official names;
the images where the official ``downloader.py`` put them (``--download_folder=ROOT/train``), or
in any folder of ``<ImageID>.jpg`` files::

    ROOT/
      train/<ImageID>.jpg                  validation/<ImageID>.jpg
      annotations/
        oidv7-class-descriptions.csv       MID → name, header LabelName,DisplayName (V7, V6's
                                           oidv6-class-descriptions.csv too)
        class-descriptions-boxable.csv     the same without a header: /m/011k07,Tortoise (V6)
        oidv7-train-annotations-human-imagelabels.csv   ImageID,Source,LabelName,Confidence
        oidv7-val-annotations-human-imagelabels.csv     (V6: validation-annotations-human-...)
        oidv6-train-annotations-bbox.csv   ImageID,Source,LabelName,Confidence,XMin,XMax,...
        validation-annotations-bbox.csv

``labels`` reads the human-verified image-level labels with ``Confidence`` 1 (0 marks a label
verified absent); ``boxes`` reads the set of box labels of each image, the boxes themselves being
left to the proposer's detector (paper §2.1). Every class-descriptions file found is read. The
CSVs are streamed row by row (train's are gigabytes) and grouped by ImageID, so the rows of an
image must be adjacent, as in the official files (sorted by ImageID).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Generator, Sequence
from pathlib import Path

from retclip.errors import InputError
from retclip.vocabulary import normalize_name

__all__ = ["ANNOTATIONS", "BOX_COLUMNS", "LABEL_COLUMNS", "SPLITS", "OpenImages"]

SPLITS = ("train", "validation")
#: What an image's labels are read from: image-level labels or box annotations.
ANNOTATIONS = ("labels", "boxes")
LABEL_COLUMNS = ("ImageID", "Source", "LabelName", "Confidence")
BOX_COLUMNS = (
    *LABEL_COLUMNS,
    *("XMin", "XMax", "YMin", "YMax", "IsOccluded", "IsTruncated", "IsGroupOf", "IsDepiction"),
    "IsInside",
)
#: The columns each kind of file needs.
_NEEDED = {"labels": ("ImageID", "LabelName", "Confidence"), "boxes": ("ImageID", "LabelName")}
#: How the official file names spell each split (V7 writes ``val``).
_SPLIT_NAMES = {"train": "train", "validation": "validation|val"}
_DOCS = "see docs/sources.md"


def _file_pattern(kind: str, split: str) -> re.Pattern[str]:
    body = {
        "labels": "annotations-human-imagelabels(?:-boxable)?",
        "boxes": "annotations-bbox",
    }[kind]
    return re.compile(rf"(?:oidv\d+-)?(?:{_SPLIT_NAMES[split]})-{body}\.csv", re.IGNORECASE)


_DESCRIPTIONS = re.compile(r"(?:oidv\d+-)?class-descriptions(?:-boxable)?\.csv", re.IGNORECASE)


class OpenImages:
    """One split of an Open Images download (layout in the module docstring).

    Args:
        root: the download's root folder.
        split: ``train`` or ``validation``.
        annotations: ``labels``, ``boxes``, or the path of one such CSV (its kind told by its
            columns), when the folder holds several of a kind.
        images_dir: the ``<ImageID>.jpg`` files [default: ``root/<split>``].

    Raises:
        InputError: a missing folder or file, several candidate files, a file without the
            columns it needs, a bad class-descriptions row (named with its line).
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        annotations: str = "labels",
        images_dir: str | Path | None = None,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise InputError(f"Open Images folder not found: {self.root}")
        if split not in SPLITS:
            raise InputError(f"Open Images split must be one of {', '.join(SPLITS)}, got {split!r}")
        self.split = split
        self.images_dir = Path(images_dir) if images_dir is not None else self.root / split
        if not self.images_dir.is_dir():
            raise InputError(
                f"Open Images images folder not found: {self.images_dir} (where downloader.py "
                "wrote <ImageID>.jpg; give another with --images)"
            )
        folders = [self.root / "annotations", self.root]
        if annotations in ANNOTATIONS:
            found = _one_file(folders, _file_pattern(annotations, split))
            if found is None:
                example = {"labels": "oidv7-train-annotations-human-imagelabels.csv"}.get(
                    annotations, "oidv6-train-annotations-bbox.csv"
                )
                raise InputError(
                    f"no Open Images {annotations} file of split {split} in {folders[0]} or "
                    f"{self.root} (e.g. {example.replace('train', split)}; {_DOCS})"
                )
            self.annotations_csv = found
        else:
            self.annotations_csv = Path(annotations)
            if not self.annotations_csv.is_file():
                raise InputError(
                    f"Open Images annotations must be labels, boxes or a CSV file, got "
                    f"{annotations!r} (no such file)"
                )
        header = _header(self.annotations_csv)
        self.kind = annotations if annotations in ANNOTATIONS else _kind_of(header)
        missing = [c for c in _NEEDED[self.kind] if c not in header]
        if missing:
            expected = LABEL_COLUMNS if self.kind == "labels" else BOX_COLUMNS
            raise InputError(
                f"{self.annotations_csv}, line 1: no column {', '.join(missing)}; expected the "
                f"columns {','.join(expected)}"
            )
        self._columns = [header.index(c) for c in _NEEDED[self.kind]]
        self.descriptions = sorted(
            {p for folder in folders if folder.is_dir() for p in folder.iterdir()
             if _DESCRIPTIONS.fullmatch(p.name) and p.is_file()}
        )  # fmt: skip
        if not self.descriptions:
            raise InputError(
                f"no Open Images class-descriptions file in {folders[0]} or {self.root} (e.g. "
                f"oidv7-class-descriptions.csv or class-descriptions-boxable.csv; {_DOCS})"
            )
        self.class_names = read_class_descriptions(self.descriptions)

    def image_path(self, image_id: str) -> Path:
        """Where the image of ``image_id`` is (``downloader.py`` writes ``<ImageID>.jpg``)."""
        return self.images_dir / f"{image_id}.jpg"

    def image_labels(self) -> Generator[tuple[str, tuple[str, ...]], None, None]:
        """``(ImageID, class names)`` of each image with a label, in file order; names in the
        order of their first row, each once (compared case-insensitively).

        Raises:
            InputError: naming the file and line: an unknown MID, a short row, a confidence that
                is not a number, an image whose rows are not adjacent, an unreadable file.
        """
        path = self.annotations_csv
        i_image, i_label, *i_confidence = self._columns
        sources = ", ".join(d.name for d in self.descriptions)
        current: str | None = None
        names: dict[str, str] = {}
        finished: set[str] = set()
        line = 1
        try:
            with path.open(newline="", encoding="utf-8-sig") as file:
                reader = csv.reader(file)
                next(reader, None)  # the header, checked when opened
                for row in reader:
                    line = reader.line_num
                    if not row:
                        continue
                    try:
                        image_id, mid = row[i_image], row[i_label]
                        confidence = row[i_confidence[0]] if i_confidence else "1"
                    except IndexError:
                        raise InputError(
                            f"{path}, line {line}: {len(row)} fields, fewer than the header's"
                        ) from None
                    if image_id != current:
                        if current is not None:
                            finished.add(current)
                            if names:
                                yield current, tuple(names.values())
                        if image_id in finished:
                            raise InputError(
                                f"{path}, line {line}: rows of image {image_id} are not adjacent "
                                "(the official files are sorted by ImageID; sort this one so)"
                            )
                        current, names = image_id, {}
                    name = self.class_names.get(mid)
                    if name is None:
                        raise InputError(
                            f"{path}, line {line}: unknown class {mid!r}, not in {sources}"
                        )
                    if confidence != "1" and _confidence(confidence, path, line) != 1.0:
                        continue  # 0: verified absent
                    names.setdefault(normalize_name(name), name)
            if current is not None and names:
                yield current, tuple(names.values())
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise InputError(f"{path}, line {line}: cannot read it ({exc})") from None


def read_class_descriptions(paths: Sequence[Path]) -> dict[str, str]:
    """MID → display name from class-descriptions CSVs, with (V7) or without (V6 boxable) a
    ``LabelName,DisplayName`` header; the first file naming a MID wins.

    Raises:
        InputError: naming the file and line of a row that is not ``MID,DisplayName``.
    """
    names: dict[str, str] = {}
    for path in paths:
        line = 0
        try:
            with path.open(newline="", encoding="utf-8-sig") as file:
                reader = csv.reader(file)
                for row in reader:
                    line = reader.line_num
                    cells = [cell.strip() for cell in row]
                    if line == 1 and [c.lower() for c in cells[:2]] == ["labelname", "displayname"]:
                        continue
                    if not cells:
                        continue
                    if len(cells) < 2 or not cells[0].startswith("/") or not cells[1]:
                        raise InputError(
                            f"{path}, line {line}: expected MID,DisplayName (as /m/011k07,Tortoise)"
                            f", got {','.join(row)[:80]!r}"
                        )
                    names.setdefault(cells[0], cells[1])
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise InputError(f"{path}, line {line}: cannot read it ({exc})") from None
    return names


def _one_file(folders: Sequence[Path], pattern: re.Pattern[str]) -> Path | None:
    found = sorted(
        {p for folder in folders if folder.is_dir() for p in folder.iterdir()
         if pattern.fullmatch(p.name) and p.is_file()}
    )  # fmt: skip
    if len(found) > 1:
        raise InputError(
            f"several Open Images annotation files fit: {', '.join(map(str, found))}; choose "
            "one with --open-images-annotations FILE"
        )
    return found[0] if found else None


def _header(path: Path) -> list[str]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as file:
            header = next(csv.reader(file), None)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{path}, line 1: cannot read it ({exc})") from None
    if not header:
        raise InputError(f"{path} is empty; expected a header of {','.join(LABEL_COLUMNS)}")
    return [cell.strip() for cell in header]


def _kind_of(header: list[str]) -> str:
    return "boxes" if "XMin" in header else "labels"


def _confidence(text: str, path: Path, line: int) -> float:
    try:
        return float(text)
    except ValueError:
        raise InputError(f"{path}, line {line}: Confidence {text!r} is not a number") from None
