"""Text embeddings of a vocabulary: the classifier behind ``s_clip`` (paper §2.2).

Each synonym of each class is put into every prompt template; each prompt embedding is
L2-normalised, the embeddings of one synonym are averaged over templates and re-normalised
(CLIP's prompt ensembling, as FC-CLIP does). A region's class score is the **maximum** cosine over
the class's synonyms (FC-CLIP), so "couch" can match a sofa without diluting "sofa".

Encoding hundreds of prompts is slow on CPU (seconds per class), so synonym embeddings are cached
on disk, keyed by the backbone fingerprint, the templates and the ordered synonym list. The cache
folder is bounded (``RETCLIP_TEXT_CACHE_MB``, default 256 MB): past the bound the least recently
used files are deleted, so a server asked for many distinct vocabularies does not fill its disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from retclip.backbones.base import Backbone
from retclip.errors import InputError
from retclip.files import atomic_writer
from retclip.vocabulary import Vocabulary

#: Bumped when the cached content or its computation changes.
_CACHE_VERSION = 1

#: Default bound of the cache folder, in MB (``RETCLIP_TEXT_CACHE_MB`` overrides it).
DEFAULT_CACHE_LIMIT_MB = 256.0


def _load_default_templates() -> tuple[str, ...]:
    resource = resources.files("retclip") / "data" / "vocab" / "vild_templates.json"
    return tuple(json.loads(resource.read_text(encoding="utf-8")))


#: The 14 ViLD prompt templates FC-CLIP fills with each synonym (``str.format`` with one ``{}``).
DEFAULT_TEMPLATES: tuple[str, ...] = _load_default_templates()


@dataclass
class ClassEmbeddings:
    """Synonym embeddings of a vocabulary and the class each belongs to.

    Attributes:
        synonym_embeddings: ``[S, D]`` float, L2-normalised rows, one per synonym.
        synonym_class: ``[S]`` long, the class index (``0..C-1``) of each synonym.
        num_classes: ``C``; every class has at least one synonym.
    """

    synonym_embeddings: torch.Tensor
    synonym_class: torch.Tensor
    num_classes: int

    @property
    def dim(self) -> int:
        return int(self.synonym_embeddings.shape[1])

    def to(self, device: torch.device | str) -> ClassEmbeddings:
        """A copy with both tensors on ``device``."""
        return ClassEmbeddings(
            self.synonym_embeddings.to(device), self.synonym_class.to(device), self.num_classes
        )

    def cosine(self, features: torch.Tensor) -> torch.Tensor:
        """Class cosines ``[N, C]`` of L2-normalised features ``[N, D]``.

        The cosine of a class is the maximum over its synonyms (FC-CLIP; paper §2.2). Computed in
        the embeddings' dtype on the features' device.
        """
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"features must be [N, {self.dim}], got {tuple(features.shape)}")
        embeddings = self.synonym_embeddings.to(features.device)
        sims = features.to(embeddings.dtype) @ embeddings.T  # [N, S]
        index = self.synonym_class.to(features.device).expand(sims.shape[0], -1)  # [N, S]
        out = sims.new_full((sims.shape[0], self.num_classes), float("-inf"))
        return out.scatter_reduce(1, index, sims, reduce="amax", include_self=True)


def default_cache_dir() -> Path:
    """``$RETCLIP_CACHE_DIR/text`` if set, else ``~/.cache/retclip/text``."""
    root = os.environ.get("RETCLIP_CACHE_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "retclip"
    return base / "text"


def cache_limit_bytes() -> int:
    """The cache folder's bound: ``$RETCLIP_TEXT_CACHE_MB`` (MB) if set, else the default."""
    raw = os.environ.get("RETCLIP_TEXT_CACHE_MB")
    try:
        megabytes = DEFAULT_CACHE_LIMIT_MB if raw is None else float(raw)
    except ValueError:
        raise InputError(f"RETCLIP_TEXT_CACHE_MB={raw!r}; expected a number of megabytes") from None
    if not megabytes >= 0 or megabytes == float("inf"):
        raise InputError(f"RETCLIP_TEXT_CACHE_MB={raw!r}; expected a finite number >= 0")
    return int(megabytes * 2**20)


def embed_vocabulary(
    backbone: Backbone,
    vocab: Vocabulary,
    *,
    templates: Sequence[str] | None = None,
    cache_dir: Path | None = None,
    cache: bool = True,
    batch_size: int = 256,
) -> ClassEmbeddings:
    """Embed every synonym of ``vocab`` with ``backbone``'s text tower (paper §2.2, FC-CLIP).

    Args:
        backbone: gives ``encode_texts`` (``[T, D]``), ``fingerprint`` and ``device``.
        vocab: the classes; all their synonyms are embedded, in class order.
        templates: prompt templates with one ``{}``; default ``backbone.prompt_templates``, else
            :data:`DEFAULT_TEMPLATES`.
        cache_dir: folder of cached ``.npz`` files; default :func:`default_cache_dir`.
        cache: ``False`` neither reads nor writes the cache.
        batch_size: prompts per ``encode_texts`` call.

    Returns:
        :class:`ClassEmbeddings` on ``backbone.device``: ``[S, D]`` float32 synonym embeddings.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if templates is None:
        templates = backbone.prompt_templates or DEFAULT_TEMPLATES
    templates = _check_templates(templates)
    synonyms = [syn for cls in vocab for syn in cls.synonyms]
    synonym_class = [index for index, cls in enumerate(vocab) for _ in cls.synonyms]

    path: Path | None = None
    array: np.ndarray | None = None
    if cache:
        directory = cache_dir if cache_dir is not None else default_cache_dir()
        path = directory / f"{_cache_key(backbone, templates, synonyms)}.npz"
        array = _read_cache(path, synonyms)
    if array is None:
        array = _encode(backbone, synonyms, templates, batch_size)
        if path is not None:
            _write_cache(path, array, synonyms)
            _evict(path.parent, cache_limit_bytes(), keep=path)

    device = backbone.device
    return ClassEmbeddings(
        synonym_embeddings=torch.from_numpy(array).to(device),
        synonym_class=torch.tensor(synonym_class, dtype=torch.long, device=device),
        num_classes=len(vocab),
    )


def _check_templates(templates: Sequence[str]) -> tuple[str, ...]:
    result = tuple(templates)
    if not result:
        raise InputError(
            "no prompt templates given; expected at least one, e.g. 'a photo of a {}.'"
        )
    for template in result:
        try:
            filled = (template.format("\x00"), template.format("\x01"))
        except (IndexError, KeyError, ValueError, AttributeError):
            filled = ("", "")
        if filled[0] == filled[1]:
            raise InputError(
                f"prompt template {template!r} is invalid; expected one '{{}}' placeholder"
            )
    return result


def _encode(
    backbone: Backbone, synonyms: Sequence[str], templates: Sequence[str], batch_size: int
) -> np.ndarray:
    """``[S, D]`` float32: template-averaged, normalised embeddings of each synonym."""
    prompts = [template.format(syn) for syn in synonyms for template in templates]
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            out = backbone.encode_texts(batch)
            if out.ndim != 2 or out.shape[0] != len(batch):
                raise ValueError(
                    f"{type(backbone).__name__}.encode_texts returned shape {tuple(out.shape)} "
                    f"for {len(batch)} texts; expected [{len(batch)}, D]"
                )
            chunks.append(F.normalize(out.float(), dim=-1))
        prompt_embeddings = torch.cat(chunks)  # [S * T, D]
        per_synonym = prompt_embeddings.reshape(len(synonyms), len(templates), -1).mean(1)
        result = F.normalize(per_synonym, dim=-1)  # [S, D]
    return np.ascontiguousarray(result.cpu().numpy(), dtype=np.float32)


def _cache_key(backbone: Backbone, templates: Sequence[str], synonyms: Sequence[str]) -> str:
    payload = json.dumps(
        {
            "version": _CACHE_VERSION,
            "fingerprint": backbone.fingerprint.key(),
            "templates": list(templates),
            "synonyms": list(synonyms),
        },
        ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _read_cache(path: Path, synonyms: Sequence[str]) -> np.ndarray | None:
    """The cached ``[S, D]`` array, or ``None`` if absent or unusable (it is then rewritten)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            array = np.asarray(data["embeddings"], dtype=np.float32)
            stored = [str(s) for s in data["synonyms"]]
    except Exception:  # any unreadable or corrupt file is just a cache miss
        return None
    if array.ndim != 2 or stored != list(synonyms) or not np.isfinite(array).all():
        return None
    with contextlib.suppress(OSError):  # recency for the LRU bound; a read-only cache is fine
        os.utime(path)
    return array


def _evict(directory: Path, limit: int, keep: Path) -> None:
    """Delete the least recently used cache files until the folder holds at most ``limit``
    bytes (``keep``, the file just written, goes last). Safe with other processes doing the
    same: a file deleted by another is skipped."""
    entries = []
    for entry in directory.glob("*.npz"):
        with contextlib.suppress(OSError):
            stat = entry.stat()
            entries.append((entry != keep, stat.st_mtime, stat.st_size, entry))
    total = sum(size for _, _, size, _ in entries)
    # oldest first; the file just written sorts after all others
    for _, _, size, entry in sorted(entries, key=lambda e: (not e[0], e[1])):
        if total <= limit:
            break
        with contextlib.suppress(OSError):
            entry.unlink()
        total -= size


def _write_cache(path: Path, array: np.ndarray, synonyms: Sequence[str]) -> None:
    """Write atomically (:func:`retclip.files.atomic_writer`); warn and go on if the folder is
    unwritable."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_writer(path) as handle:
            np.savez(handle, embeddings=array, synonyms=np.array(synonyms, dtype=str))
    except OSError as exc:
        warnings.warn(
            f"cannot write text-embedding cache '{path}' ({exc}); continuing without caching",
            RuntimeWarning,
            stacklevel=3,
        )
