"""Vocabularies: the classes to segment, each with the synonyms its text embedding is built from.

A class is a display ``name`` (the label written in outputs) plus ``synonyms``, the strings that
are put into the prompt templates; its text score is the maximum over its synonyms (FC-CLIP; paper
§2.2). Builtin vocabularies carry FC-CLIP's synonym lists verbatim (``*_with_prompt_eng.txt``) and
the datasets' own ids, names and thing flags.

Vocabulary text formats (one each, no others):

* **String** (:meth:`Vocabulary.from_string`, e.g. a command-line option): classes separated by
  commas, synonyms of one class by ``|``: ``"sofa|couch, wall, lamp"``. Every class is a thing.
* **File** (:meth:`Vocabulary.from_file`, UTF-8): one class per line, synonyms separated by
  commas, optionally followed by ``;`` and a flag, ``thing`` (default) or ``stuff``::

      # living room
      sofa, couch ; thing
      wall ; stuff
      lamp

  Blank lines and everything after ``#`` are ignored.

In both formats the first synonym is the class's display name and ids are positions (0, 1, ...).
Two classes may not share a synonym (compared after :func:`normalize_name`): a region could not be
told between them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from retclip.errors import InputError

#: Names accepted by :meth:`Vocabulary.builtin`.
BUILTIN_VOCABULARIES: tuple[str, ...] = ("ade20k-150", "coco-panoptic-133")

_FLAGS = {"thing": True, "stuff": False}


def normalize_name(s: str) -> str:
    """Lowercase, strip and collapse inner whitespace: the form names are compared in."""
    return " ".join(s.lower().split())


@dataclass(frozen=True)
class VocabClass:
    """One class: display ``name``, the ``synonyms`` that are embedded, thing flag, dataset id.

    ``synonyms`` are stripped and de-duplicated (by normalised form, first kept). If empty, the
    name is used. The name is *not* added to non-empty synonyms: builtin classes keep FC-CLIP's
    lists verbatim (ADE20k's display names are often WordNet lists such as ``"road, route"``, which
    FC-CLIP does not embed), so embeddings and the seen rule match FC-CLIP. Classes parsed from
    text take their name from their first synonym.
    """

    name: str
    synonyms: tuple[str, ...] = ()
    isthing: bool = True
    id: int = -1

    def __post_init__(self) -> None:
        name = self.name.strip() if isinstance(self.name, str) else ""
        if not name:
            raise InputError(f"class name {self.name!r} is empty; expected a non-empty string")
        synonyms: list[str] = []
        seen: set[str] = set()
        given = (self.synonyms,) if isinstance(self.synonyms, str) else self.synonyms
        for syn in given or (name,):
            text = syn.strip() if isinstance(syn, str) else ""
            if not text:
                raise InputError(
                    f"class {name!r} has an empty synonym {syn!r}; expected non-empty strings"
                )
            if normalize_name(text) not in seen:
                seen.add(normalize_name(text))
                synonyms.append(text)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "synonyms", tuple(synonyms))
        object.__setattr__(self, "isthing", bool(self.isthing))
        object.__setattr__(self, "id", int(self.id))

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "isthing": self.isthing,
            "synonyms": list(self.synonyms),
        }


class Vocabulary:
    """An immutable, ordered list of :class:`VocabClass`; class index = position.

    Raises :class:`InputError` if empty, if two classes share a normalised synonym, or if two
    share a display name.
    """

    __slots__ = ("_classes", "_lookup", "_name")

    def __init__(self, classes: Iterable[VocabClass], name: str = "custom") -> None:
        classes = tuple(classes)
        if not classes:
            raise InputError(f"vocabulary {name!r} is empty; expected at least one class")
        lookup: dict[str, int] = {}
        for index, cls in enumerate(classes):
            for syn in cls.synonyms:
                key = normalize_name(syn)
                other = lookup.get(key)
                if other is not None and other != index:
                    raise InputError(
                        f"vocabulary {name!r}: classes {classes[other].name!r} and "
                        f"{cls.name!r} share the synonym {syn!r}; expected distinct classes"
                    )
                lookup[key] = index
        names: dict[str, int] = {}
        for index, cls in enumerate(classes):
            other = names.setdefault(normalize_name(cls.name), index)
            if other != index:
                raise InputError(
                    f"vocabulary {name!r}: classes {other} and {index} are both named "
                    f"{cls.name!r}; expected distinct names"
                )
            lookup.setdefault(normalize_name(cls.name), index)  # a name that is no synonym
        self._classes = classes
        self._name = name
        self._lookup = lookup

    @property
    def name(self) -> str:
        """A label for messages and outputs (builtin name, file stem, or ``"custom"``)."""
        return self._name

    @property
    def classes(self) -> tuple[VocabClass, ...]:
        return self._classes

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Vocabulary):
            return NotImplemented
        return self._name == other._name and self._classes == other._classes

    def __hash__(self) -> int:
        return hash((self._name, self._classes))

    def __repr__(self) -> str:
        shown = ", ".join(self.names[:5]) + (", ..." if len(self) > 5 else "")
        return f"Vocabulary(name={self._name!r}, {len(self)} classes: {shown})"

    # --- container protocol -------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.classes)

    def __iter__(self) -> Iterator[VocabClass]:
        return iter(self.classes)

    def __getitem__(self, index: int) -> VocabClass:
        return self.classes[index]

    @property
    def names(self) -> list[str]:
        """Display names, in class order."""
        return [c.name for c in self.classes]

    @property
    def isthing(self) -> np.ndarray:
        """``[C]`` bool: thing (countable, has instances) vs stuff."""
        return np.array([c.isthing for c in self.classes], dtype=bool)

    @property
    def ids(self) -> list[int]:
        """Dataset category ids (positions for user vocabularies), in class order."""
        return [c.id for c in self.classes]

    def index_of(self, name_or_synonym: str) -> int:
        """Class index of a synonym or display name (normalised comparison)."""
        index = self._lookup.get(normalize_name(name_or_synonym))
        if index is None:
            raise InputError(
                f"{name_or_synonym!r} is not a class or synonym of vocabulary {self.name!r}"
            )
        return index

    def seen_mask(self, train: Vocabulary) -> np.ndarray:
        """``[C]`` bool: classes "seen" in training vocabulary ``train``.

        FC-CLIP's rule: a class is seen if any of its normalised synonyms is a synonym of a
        ``train`` class (display names do not count). ADE20k-150 against COCO-133 gives 64.
        """
        train_synonyms = {normalize_name(s) for c in train for s in c.synonyms}
        return np.array(
            [any(normalize_name(s) in train_synonyms for s in c.synonyms) for c in self.classes],
            dtype=bool,
        )

    # --- serialisation ------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """``{"name", "classes": [{"id", "name", "isthing", "synonyms"}, ...]}`` (JSON-ready)."""
        return {"name": self.name, "classes": [c.to_dict() for c in self.classes]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Vocabulary:
        """Inverse of :meth:`to_dict`; also reads the builtin JSON files (extra keys ignored)."""
        try:
            raw_classes = data["classes"]
            classes = [
                VocabClass(
                    name=item["name"],
                    synonyms=tuple(item.get("synonyms", ())),
                    isthing=bool(item.get("isthing", True)),
                    id=int(item.get("id", position)),
                )
                for position, item in enumerate(raw_classes)
            ]
        except InputError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InputError(
                f"vocabulary data is malformed ({type(exc).__name__}: {exc}); expected "
                '{"name": ..., "classes": [{"name": ..., "synonyms": [...], ...}, ...]}'
            ) from None
        return cls(name=str(data.get("name", "custom")), classes=tuple(classes))

    def key(self) -> str:
        """Stable sha256 hex digest of the classes (ids, names, flags, synonyms; not ``name``)."""
        payload = json.dumps(self.to_dict()["classes"], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    # --- constructors -------------------------------------------------------------------------

    @classmethod
    def from_string(cls, text: str, name: str = "custom") -> Vocabulary:
        """Parse ``"sofa|couch, wall, lamp"``: classes by ``,``, synonyms by ``|``; all things."""
        if not text.strip():
            raise InputError(f"vocabulary {text!r} is empty; expected e.g. 'sofa|couch, wall'")
        classes: list[VocabClass] = []
        for position, part in enumerate(text.split(",")):
            synonyms = [s.strip() for s in part.split("|")]
            if not all(synonyms):
                raise InputError(
                    f"vocabulary {text!r}: class {position + 1} ({part.strip()!r}) has an empty "
                    "name; expected names separated by ',' and synonyms by '|'"
                )
            classes.append(VocabClass(synonyms[0], tuple(synonyms), isthing=True, id=position))
        return cls(name=name, classes=tuple(classes))

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Vocabulary:
        """Read a vocabulary file (format in the module docstring); named after the file stem."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8-sig")
        except FileNotFoundError:
            raise InputError(f"vocabulary file '{path}' does not exist") from None
        except UnicodeDecodeError as exc:
            raise InputError(
                f"vocabulary file '{path}' is not UTF-8 text (byte {exc.start}); expected UTF-8"
            ) from None
        except OSError as exc:
            raise InputError(
                f"vocabulary file '{path}' cannot be read ({exc.strerror or exc})"
            ) from None
        classes: list[VocabClass] = []
        for lineno, raw in enumerate(text.splitlines(), start=1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            names_part, sep, flag_part = line.partition(";")
            isthing = True
            if sep:
                flag = flag_part.strip().lower()
                if flag not in _FLAGS:
                    raise InputError(
                        f"vocabulary file '{path}', line {lineno}: unknown flag "
                        f"{flag_part.strip()!r}; expected 'thing' or 'stuff'"
                    )
                isthing = _FLAGS[flag]
            synonyms = [s.strip() for s in names_part.split(",")]
            if not all(synonyms):
                raise InputError(
                    f"vocabulary file '{path}', line {lineno}: empty class name in "
                    f"{raw.strip()!r}; expected synonyms separated by ','"
                )
            position = len(classes)
            classes.append(VocabClass(synonyms[0], tuple(synonyms), isthing=isthing, id=position))
        if not classes:
            raise InputError(f"vocabulary file '{path}' has no classes; expected one per line")
        try:
            return cls(name=path.stem, classes=tuple(classes))
        except InputError as exc:
            raise InputError(f"vocabulary file '{path}': {exc}") from None

    @classmethod
    def builtin(cls, name: str) -> Vocabulary:
        """A builtin vocabulary: ``ade20k-150`` (ids 0..149) or ``coco-panoptic-133`` (1..200)."""
        key = name.strip().lower()
        if key not in BUILTIN_VOCABULARIES:
            raise InputError(
                f"unknown builtin vocabulary {name!r}; expected one of "
                + ", ".join(BUILTIN_VOCABULARIES)
            )
        return _load_builtin(key)

    @classmethod
    def load(cls, spec: str | os.PathLike[str]) -> Vocabulary:
        """A builtin name (see :data:`BUILTIN_VOCABULARIES`), else a vocabulary file path."""
        if isinstance(spec, str) and spec.strip().lower() in BUILTIN_VOCABULARIES:
            return cls.builtin(spec)
        path = Path(spec)
        if not path.exists():
            raise InputError(
                f"vocabulary '{spec}' is neither a builtin ("
                + ", ".join(BUILTIN_VOCABULARIES)
                + ") nor an existing file"
            )
        return cls.from_file(path)

    @classmethod
    def from_choice(
        cls,
        classes: str | None,
        vocab: str | None,
        *,
        names: tuple[str, str] = ("--classes", "--vocab"),
        builtin_only: bool = False,
        max_classes: int | None = None,
    ) -> Vocabulary:
        """The vocabulary given as exactly one of a class string (:meth:`from_string`) and a
        vocabulary spec (:meth:`load`; only a builtin name when ``builtin_only``, as a server
        must not read files a request names).

        ``names`` are how the two inputs are called in messages (options, form fields).
        """
        given_classes = classes is not None and bool(classes.strip())
        given_vocab = vocab is not None and bool(vocab.strip())
        if given_classes == given_vocab:
            raise InputError(
                f"give exactly one of {names[0]} (e.g. 'cat, dog|puppy') and {names[1]} "
                f"(one of {', '.join(BUILTIN_VOCABULARIES)}"
                + ("" if builtin_only else " or a file")
                + ")"
            )
        if given_vocab:
            spec = (vocab or "").strip()
            if builtin_only and spec.lower() not in BUILTIN_VOCABULARIES:
                known = ", ".join(BUILTIN_VOCABULARIES)
                raise InputError(f"unknown vocabulary {vocab!r}; expected one of {known}")
            result = cls.load(spec)
        else:
            result = cls.from_string(classes or "")
        if max_classes is not None and len(result) > max_classes:
            raise InputError(f"{len(result)} classes; the limit is {max_classes}")
        return result


@functools.cache
def _load_builtin(name: str) -> Vocabulary:
    resource = resources.files("retclip") / "data" / "vocab" / f"{name}.json"
    data = json.loads(resource.read_text(encoding="utf-8"))
    return Vocabulary.from_dict(data)
