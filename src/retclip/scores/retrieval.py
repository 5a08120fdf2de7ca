"""``s_ret``: out-of-vocabulary classification via retrieval from feature databases (paper §2.2).

A segment's mask-pooled feature is the query; its ``k`` nearest database rows vote for their
labels. The distances of the retrieved rows are min-max normalised over those ``k`` and subtracted
from 1, so the nearest row scores 1 and the farthest 0; a class's score is the maximum over its
retrieved rows, and a class with no retrieved row scores 0.

Edge cases, by design:
- all ``k`` distances equal (including ``k = 1``, or one row retrieved) → every retrieved row
  scores 1 (the span is 0, nothing to rank);
- ``k`` larger than the rows the search may return → only the rows there are take part;
- any affine distance (``1 − cos``, or squared L2 on unit vectors, ``2 − 2 cos``) gives the same
  normalised scores, so the inner-product index serves directly.

The search is restricted to rows whose labels match a class of the query vocabulary, so that rows
of classes the user did not ask for neither take neighbour slots nor set the min-max range.
Database labels match vocabulary classes by a shared synonym or by text-embedding cosine > 0.95
(paper). Classes no label of the primary database matches are looked up in a fallback database,
whose retrieved rows are ranked together with the primary's (one min-max range over both): were
each database normalised on its own, its nearest row would always score 1, and a segment of a
fallback class would tie with the primary class nearest to it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch

from retclip.backbones.base import Backbone
from retclip.caching import LRUCache
from retclip.database import DatabaseLabel, FeatureDatabase
from retclip.settings import DEFAULT_K
from retclip.text_embeddings import ClassEmbeddings, embed_vocabulary
from retclip.vocabulary import VocabClass, Vocabulary, normalize_name

#: (database, state, vocabulary) label matches a retriever keeps (least recently used dropped).
MATCH_CACHE_SIZE = 64
#: Cosine between text embeddings of a database label and a class above which they match (paper).
LABEL_MATCH_THRESHOLD = 0.95


@dataclasses.dataclass(frozen=True)
class LabelMatch:
    """Which database labels stand for which vocabulary classes.

    Attributes:
        matrix: ``[L, C]`` bool, ``matrix[l, c]`` when database label ``l`` matches class ``c``.
    """

    matrix: np.ndarray

    @property
    def covered_classes(self) -> np.ndarray:
        """``[C]`` bool: classes at least one database label matches."""
        return np.any(self.matrix, axis=0)

    @property
    def allowed_labels(self) -> np.ndarray:
        """Label ids that match some class: the rows a search may return."""
        return np.flatnonzero(np.any(self.matrix, axis=1))


def match_labels(
    vocab: Vocabulary,
    labels: Sequence[DatabaseLabel],
    *,
    class_embeddings: ClassEmbeddings | None = None,
    label_embeddings: ClassEmbeddings | None = None,
    threshold: float = LABEL_MATCH_THRESHOLD,
) -> LabelMatch:
    """Match database labels to vocabulary classes by synonym, and by embedding if given.

    Args:
        vocab: the query vocabulary (``C`` classes).
        labels: the database's label table (``L`` labels).
        class_embeddings, label_embeddings: text embeddings of the classes' synonyms and of the
            labels (one "class" per label). With both, a label that no class names (no shared
            synonym) stands for the one class whose text embedding is closest to it, if their
            cosine exceeds ``threshold`` (paper: 0.95, for labels of another dataset).

    A label named by a class is never matched to other classes by embedding: the names of
    different classes can embed close together (templates dominate short prompts), and a label
    voting for several classes would blur ``s_ret``.
    """
    matrix = np.zeros((len(labels), len(vocab)), dtype=bool)
    class_of_synonym = {
        normalize_name(s): c for c, entry in enumerate(vocab.classes) for s in entry.synonyms
    }
    for label_id, label in enumerate(labels):
        for synonym in (label.name, *label.synonyms):
            c = class_of_synonym.get(normalize_name(synonym))
            if c is not None:
                matrix[label_id, c] = True
    if class_embeddings is not None and label_embeddings is not None and len(labels):
        label_cosine = class_embeddings.cosine(label_embeddings.synonym_embeddings)  # [S_l, C]
        floor = torch.full(
            (len(labels), len(vocab)), -2.0, device=label_cosine.device, dtype=label_cosine.dtype
        )
        index = label_embeddings.synonym_class[:, None].expand_as(label_cosine)
        best = floor.scatter_reduce(0, index, label_cosine, reduce="amax").cpu().numpy()  # [L, C]
        unnamed = np.flatnonzero(~matrix.any(axis=1))
        closest = best[unnamed].argmax(axis=1)
        close = best[unnamed, closest] > threshold
        matrix[unnamed[close], closest[close]] = True
    return LabelMatch(matrix)


def retrieval_scores(
    similarities: torch.Tensor, neighbour_labels: torch.Tensor, match: torch.Tensor
) -> torch.Tensor:
    """``s_ret [Q, C]`` from the ``k`` retrieved rows of each query.

    Args:
        similarities: ``[Q, k]`` cosine similarities of the retrieved rows.
        neighbour_labels: ``[Q, k]`` label ids of the retrieved rows, ``-1`` for empty slots.
        match: ``[L, C]`` bool label → class matches.
    """
    return scores_from_votes(similarities, label_votes(neighbour_labels, match))


def label_votes(neighbour_labels: torch.Tensor, match: torch.Tensor) -> torch.Tensor:
    """``[Q, k, C]`` bool: the classes each retrieved row stands for (none for empty slots)."""
    valid = neighbour_labels >= 0
    return match[neighbour_labels.clamp_min(0)] & valid.unsqueeze(-1)


def scores_from_votes(similarities: torch.Tensor, votes: torch.Tensor) -> torch.Tensor:
    """``s_ret [Q, C]``: min-max normalised ``1 − distance`` of each row, max per class.

    Args:
        similarities: ``[Q, k]`` cosine similarities; ``-inf`` marks an empty slot.
        votes: ``[Q, k, C]`` bool, the classes each retrieved row stands for.
    """
    valid = torch.isfinite(similarities)
    distance = 1.0 - similarities.float()
    inf = torch.tensor(float("inf"), device=distance.device)
    d_min = torch.where(valid, distance, inf).amin(dim=1, keepdim=True)
    d_max = torch.where(valid, distance, -inf).amax(dim=1, keepdim=True)
    span = d_max - d_min
    normalised = torch.where(
        span > 0, (distance - d_min) / span.clamp_min(1e-12), torch.zeros_like(distance)
    )
    row_score = torch.where(valid, 1.0 - normalised, torch.zeros_like(distance))  # [Q, k]
    votes = votes & valid.unsqueeze(-1)
    per_class = torch.where(votes, row_score.unsqueeze(-1), torch.zeros((), device=votes.device))
    return per_class.amax(dim=1) if per_class.shape[1] else per_class.sum(dim=1)


@dataclasses.dataclass(frozen=True)
class Neighbours:
    """The database rows behind ``s_ret``: each mask's ``k`` nearest rows, ranked together over
    the databases searched (the evidence a user can inspect).

    Attributes:
        similarities: ``[N, k]`` float32 cosines, descending; ``-inf`` pads.
        labels: ``[N, k]`` the rows' label names (``""`` pads).
        sources: ``[N, k]`` the images the rows were pooled from (``""`` pads).
        database: ``[N, k]`` int, 0 for the primary database, 1 for the fallback, -1 pads.
    """

    similarities: np.ndarray
    labels: np.ndarray
    sources: np.ndarray
    database: np.ndarray

    def of(self, mask: int) -> list[dict[str, object]]:
        """Mask ``mask``'s neighbours as records (``label``, ``similarity``, ``source``,
        ``database``), pads left out."""
        return [
            {
                "label": str(self.labels[mask, j]),
                "similarity": float(self.similarities[mask, j]),
                "source": str(self.sources[mask, j]),
                "database": int(self.database[mask, j]),
            }
            for j in range(self.similarities.shape[1])
            if self.database[mask, j] >= 0
        ]


class Retriever:
    """``s_ret`` from a primary database and an optional fallback for the classes it lacks.

    Label matches (and the text embeddings of database labels they need) are computed once per
    vocabulary and database state, so segmenting many images costs one search per image.
    ``pooling`` is the query features' pooling rule; a database built with another rule (or
    another backbone recipe) is refused.
    """

    def __init__(
        self,
        backbone: Backbone,
        database: FeatureDatabase,
        fallback: FeatureDatabase | None = None,
        *,
        k: int = DEFAULT_K,
        embedding_match: bool = True,
        pooling: str | None = None,
    ) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        for db in (database, fallback):
            if db is not None:
                db.check_compatible(backbone.fingerprint, backbone.dim, pooling=pooling)
        self.backbone = backbone
        self.databases = [db for db in (database, fallback) if db is not None]
        self.k = k
        self.embedding_match = embedding_match
        self._matches: LRUCache[tuple[int, int, str], LabelMatch] = LRUCache(MATCH_CACHE_SIZE)

    def _label_embeddings(self, db: FeatureDatabase) -> ClassEmbeddings:
        seen: set[str] = set()
        classes: list[VocabClass] = []
        for label in db.labels:
            key = normalize_name(label.name)
            # Keep one entry per normalised name so the label table forms a valid vocabulary;
            # a repeated name gets a unique stand-in name, matched by synonym only.
            name = label.name if key not in seen else f"{label.name} #{len(classes)}"
            seen.add(key)
            classes.append(VocabClass(name=name, synonyms=(name,)))
        return embed_vocabulary(self.backbone, Vocabulary(classes, name=f"db:{db.path}"))

    def match(
        self, db_index: int, vocab: Vocabulary, class_embeddings: ClassEmbeddings
    ) -> LabelMatch:
        """The (cached) label match of database ``db_index`` against ``vocab``."""
        db = self.databases[db_index]
        key = (db_index, db.generation, vocab.key())

        def compute() -> LabelMatch:
            use_embeddings = self.embedding_match and len(db.labels) > 0
            return match_labels(
                vocab,
                db.labels,
                class_embeddings=class_embeddings if use_embeddings else None,
                label_embeddings=self._label_embeddings(db) if use_embeddings else None,
            )

        return self._matches.get_or_create(key, compute)

    def scores(
        self,
        features: torch.Tensor,
        vocab: Vocabulary,
        class_embeddings: ClassEmbeddings,
        *,
        kept: np.ndarray | None = None,
    ) -> torch.Tensor:
        """``s_ret [N, C]`` for ``[N, D]`` L2-normalised segment features (:meth:`retrieve`)."""
        return self.retrieve(features, vocab, class_embeddings, kept=kept)[0]

    def retrieve(
        self,
        features: torch.Tensor,
        vocab: Vocabulary,
        class_embeddings: ClassEmbeddings,
        *,
        kept: np.ndarray | None = None,
    ) -> tuple[torch.Tensor, Neighbours]:
        """``s_ret [N, C]`` for ``[N, D]`` L2-normalised segment features, and the
        :class:`Neighbours` it was computed from.

        Each database is searched (restricted to the rows of the classes it serves: the primary
        serves every class it has a label for, the fallback the classes left), and the ``k``
        nearest rows over all of them are ranked together, so a fallback row competes with primary
        rows on distance, as if the fallback's samples had been added to the primary database.

        ``kept`` (``[C]`` bool) are the classes the proposer kept for this image (paper §2.2:
        absent classes are pruned *before* scoring): rows of pruned classes are not searched, so
        they neither take neighbour slots nor set the min-max range, and pruned classes score 0.
        """
        n, c = features.shape[0], len(vocab)
        remaining = np.ones(c, dtype=bool) if kept is None else np.asarray(kept, dtype=bool).copy()
        if remaining.shape != (c,):
            raise ValueError(f"kept must be [{c}] bool, got shape {remaining.shape}")
        queries = features.detach().float().cpu().numpy()
        all_similarities: list[torch.Tensor] = []
        all_votes: list[torch.Tensor] = []
        evidence: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # labels, sources, db
        for db_index, db in enumerate(self.databases):
            matrix = self.match(db_index, vocab, class_embeddings).matrix & remaining
            match = LabelMatch(matrix)
            remaining &= ~match.covered_classes
            if n == 0 or not matrix.any():
                continue
            found, rows = db.search(queries, self.k, allowed_labels=match.allowed_labels)
            safe = np.clip(rows, 0, None)
            labels = np.where(rows >= 0, db.label_ids()[safe], -1)
            all_similarities.append(torch.from_numpy(found))
            all_votes.append(
                label_votes(torch.from_numpy(labels.astype(np.int64)), torch.from_numpy(matrix))
            )
            names = np.array([label.name for label in db.labels] + [""], dtype=object)
            sources = np.asarray(db.provenance()["sources"], dtype=object)[safe]
            evidence.append(
                (
                    names[labels],  # -1 → the "" pad
                    np.where(rows >= 0, sources, ""),
                    np.where(rows >= 0, db_index, -1),
                )
            )
        if not all_similarities:
            empty = np.zeros((n, 0))
            none = Neighbours(empty.astype(np.float32), empty.astype(object),
                              empty.astype(object), empty.astype(int))  # fmt: skip
            return torch.zeros((n, c), device=features.device), none
        similarities = torch.cat(all_similarities, dim=1)  # [N, k * databases]
        votes = torch.cat(all_votes, dim=1)  # [N, k * databases, C]
        top = similarities.topk(min(self.k, similarities.shape[1]), dim=1).indices
        s_ret = scores_from_votes(
            similarities.gather(1, top), votes.gather(1, top.unsqueeze(-1).expand(-1, -1, c))
        )
        order = top.numpy()

        def ranked(parts: list[np.ndarray]) -> np.ndarray:
            return np.take_along_axis(np.concatenate(parts, axis=1), order, axis=1)

        neighbours = Neighbours(
            similarities=similarities.gather(1, top).numpy().astype(np.float32),
            labels=ranked([e[0] for e in evidence]),
            sources=ranked([e[1] for e in evidence]),
            database=ranked([e[2] for e in evidence]).astype(int),
        )
        return s_ret.to(features.device), neighbours
