"""Per-mask class scores of the three classification paths and their ensemble (paper §2.2)."""

from retclip.scores.clip import clip_scores
from retclip.scores.ensemble import CombineMode, ensemble, final_probs
from retclip.scores.retrieval import (
    LabelMatch,
    Neighbours,
    Retriever,
    label_votes,
    match_labels,
    retrieval_scores,
    scores_from_votes,
)

__all__ = [
    "CombineMode",
    "LabelMatch",
    "Neighbours",
    "Retriever",
    "clip_scores",
    "ensemble",
    "final_probs",
    "label_votes",
    "match_labels",
    "retrieval_scores",
    "scores_from_votes",
]
