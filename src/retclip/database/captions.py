"""Database construction from image–caption pairs (paper §2.1): a caption's labels are the
vocabulary classes it mentions.

A class is mentioned when one of its surface forms occurs in the caption as whole words
(case-insensitive; "cart" does not mention "car"): its display name (and the comma-separated
parts of a WordNet-style name such as ``"road, route"``), its synonyms (which in the builtin
vocabularies include plurals such as ``"streets"``), and simple English plurals of these (the last
word +s; +es after s, x, z, ch, sh; consonant + y → ies). Longer forms win over the shorter forms
they contain ("traffic light" is not also "light"); an explicit synonym wins over a generated
plural of another class.

Caption files: JSONL, one ``{"image": "a.jpg", "caption": "..."}`` (or ``"captions": [...]``)
per line; or CSV with ``image`` and ``caption`` columns. An image may appear on several lines;
its labels are the union, in vocabulary order.
"""

from __future__ import annotations

import csv
import json
import re
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from retclip.database.build import BuildItem
from retclip.errors import InputError
from retclip.vocabulary import Vocabulary, normalize_name


def plural_forms(phrase: str) -> list[str]:
    """Simple English plurals of a (normalised) phrase, inflecting its last word."""
    head, _, last = phrase.rpartition(" ")
    prefix = f"{head} " if head else ""
    if not last or not last[-1].isalpha():
        return []
    if re.search(r"[^aeiou]y$", last):
        forms = [last[:-1] + "ies"]
    elif re.search(r"(s|x|z|ch|sh)$", last):
        forms = [last + "es"]
    else:
        forms = [last + "s", last + "es"] if last.endswith("o") else [last + "s"]
    return [prefix + form for form in forms]


class CaptionMatcher:
    """Finds the classes of a vocabulary mentioned in a caption (see the module docstring)."""

    def __init__(self, vocabulary: Vocabulary) -> None:
        self.vocabulary = vocabulary
        explicit: dict[str, int] = {}
        for index, cls in enumerate(vocabulary):
            names = [*cls.synonyms, *cls.name.split(",")]
            for form in (normalize_name(n) for n in names):
                if form:
                    explicit.setdefault(form, index)
        forms = dict(explicit)
        for form, index in explicit.items():
            for plural in plural_forms(form):
                forms.setdefault(plural, index)
        self.forms = forms
        ordered = sorted(forms, key=lambda f: (-len(f), f))
        alternatives = "|".join(r"\s+".join(map(re.escape, f.split())) for f in ordered)
        self._pattern = re.compile(rf"(?<![\w-])(?:{alternatives})(?![\w-])", re.IGNORECASE)

    def classes(self, caption: str) -> list[int]:
        """Indices of the classes mentioned in ``caption``, in vocabulary order."""
        found = {self.forms[normalize_name(m.group(0))] for m in self._pattern.finditer(caption)}
        return sorted(found)

    def labels(self, caption: str) -> tuple[str, ...]:
        """Display names of the classes mentioned in ``caption``, in vocabulary order."""
        return tuple(self.vocabulary[i].name for i in self.classes(caption))


def read_captions(path: str | Path) -> list[tuple[str, str]]:
    """``(image, caption)`` pairs of a JSONL or CSV caption file (format in the module doc)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputError(f"captions file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read captions file {path}: {exc}") from None
    pairs: list[tuple[str, str]] = []
    if path.suffix.lower() == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        if rows and not {"image", "caption"} <= set(rows[0]):
            raise InputError(
                f"{path}: CSV needs 'image' and 'caption' columns, got {list(rows[0])}"
            )
        return [(row["image"], row["caption"] or "") for row in rows]
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}, line {lineno}: not valid JSON ({exc})") from None
        captions = entry.get("captions", [entry.get("caption")]) if isinstance(entry, dict) else []
        image = entry.get("image") if isinstance(entry, dict) else None
        if not isinstance(image, str) or not all(isinstance(c, str) for c in captions):
            raise InputError(
                f'{path}, line {lineno}: expected {{"image": str, "caption": str}} '
                f'or {{"image": str, "captions": [str, ...]}}'
            )
        pairs += [(image, caption) for caption in captions]
    return pairs


def items_from_captions(
    path: str | Path, images_dir: str | Path, vocabulary: Vocabulary
) -> list[BuildItem]:
    """Build items of the images of a caption file, labelled with the classes their captions
    mention (display names, vocabulary order); images mentioning none are left out.

    Raises:
        InputError: unreadable or malformed file, or no caption mentions any class.
    """
    matcher = CaptionMatcher(vocabulary)
    found: dict[str, set[int]] = defaultdict(set)
    for image, caption in read_captions(path):
        found[image].update(matcher.classes(caption))
    items = [
        BuildItem(str(Path(images_dir) / image), _names(vocabulary, sorted(classes)))
        for image, classes in found.items()
        if classes
    ]
    if not items:
        raise InputError(f"no caption in {path} mentions a class of vocabulary {vocabulary.name!r}")
    return items


def _names(vocabulary: Vocabulary, indices: Iterable[int]) -> tuple[str, ...]:
    return tuple(vocabulary[i].name for i in indices)


def label_synonyms(vocabulary: Vocabulary) -> dict[str, tuple[str, ...]]:
    """Display name → synonyms, for ``build_database(synonyms=...)``: rows labelled with a
    WordNet-style display name (``"road, route"``) then match the class by its synonyms."""
    return {cls.name: cls.synonyms for cls in vocabulary}
