"""Auxiliary KgCLUE tasks that need no extra labels, built from the prepared rows.

Rows are the prepared dicts ("question", "subject" — the base name, already split from its
disambiguation —, "predicate", "object", "disambiguation"). Two tasks, for the
primary/auxiliary gradient rule (models/multitask.py, ALGORITHMS.md §4):

(a) subject tagging: one 0/1 tag per question character, 1 where the character lies inside an
    exact occurrence of the subject base name in the question (every occurrence). A row whose
    question does not contain the base name gets no tags (None) and is counted, never guessed.
(b) question ↔ predicate matching: the gold predicate (label 1) and look-alike predicates
    (label 0), the most similar by longest common character subsequence among the *training*
    relations only, as tasks/ranker_data.py does, so held-out relations stay unseen.
    A look-alike can be a synonym that also answers the question (e.g. 出品公司 / 出品方);
    with no KB at hand this is label noise the task accepts.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tasks.minikb import most_similar, pad_codepoints


# ----------------------------------------------------------------------------- (a) subject tags

def subject_tags(question: str, subject: str) -> list[int] | None:
    """0/1 per character of ``question``: 1 inside any exact occurrence of ``subject``; None if absent."""
    if not subject or not question:
        return None
    tags = [0] * len(question)
    start = question.find(subject)
    if start < 0:
        return None
    while start >= 0:  # every occurrence, overlapping ones included
        tags[start:start + len(subject)] = [1] * len(subject)
        start = question.find(subject, start + 1)
    return tags


@dataclass(frozen=True)
class SubjectTagging:
    tags: list[list[int] | None]  # per row: len(question) tags, or None (base name not in the question)
    n_tagged: int
    n_untagged: int

    @property
    def coverage(self) -> float:
        n = self.n_tagged + self.n_untagged
        return self.n_tagged / n if n else 0.0


def build_subject_tagging(rows: list[dict]) -> SubjectTagging:
    """Subject tags for every row, with counts of rows tagged and left untagged."""
    tags = []
    for i, r in enumerate(rows):
        q, s = r.get("question"), r.get("subject")
        if not isinstance(q, str) or not isinstance(s, str):
            raise ValueError(f"row {i}: 'question' and 'subject' must be strings, got "
                             f"question={q!r}, subject={s!r}; pass labelled prepared rows")
        tags.append(subject_tags(q, s))
    n_tagged = sum(t is not None for t in tags)
    return SubjectTagging(tags, n_tagged, len(tags) - n_tagged)


# ----------------------------------------------------------------------------- (b) predicate matching

@dataclass
class PredicateMatching:
    rows: list[dict]
    predicates: list[str]  # the training relations, sorted: the only source of negatives
    similar: dict[str, list[str]] = field(default_factory=dict)  # gold → look-alikes, most similar first

    def __len__(self) -> int:
        return len(self.rows)

    def pairs(self, i: int, n_neg: int, rng: np.random.Generator) -> list[tuple[str, str, int]]:
        """(question, predicate, label) for row ``i``: the gold one (1), then up to ``n_neg``
        distinct look-alikes (0) drawn from its pool."""
        r = self.rows[i]
        pool = self.similar[r["predicate"]]
        k = min(n_neg, len(pool))
        picks = rng.choice(len(pool), size=k, replace=False) if k else []
        return [(r["question"], r["predicate"], 1), *((r["question"], pool[int(j)], 0) for j in picks)]


def look_alikes(gold: str, predicates: list[str], padded: np.ndarray, n_pool: int) -> list[str]:
    """The ``n_pool`` predicates most similar to ``gold`` (LCS, ties by sorted order), gold excluded."""
    order = most_similar(gold, predicates, padded, np.arange(len(predicates)))
    return [predicates[j] for j in order if predicates[j] != gold][:n_pool]


def build_predicate_matching(rows: list[dict], train_rows: list[dict] | None = None,
                             n_similar_pool: int = 8) -> PredicateMatching:
    """Question ↔ predicate pairs for ``rows``, negatives from the relations of ``train_rows``
    (default: ``rows`` themselves, i.e. pass training rows)."""
    train_rows = rows if train_rows is None else train_rows
    predicates = sorted({r["predicate"] for r in train_rows})
    if len(predicates) < 2:
        raise ValueError(f"predicate matching needs at least 2 distinct training predicates for negatives, "
                         f"found {len(predicates)}: {predicates}")
    padded = pad_codepoints(predicates)
    similar = {p: look_alikes(p, predicates, padded, n_similar_pool) for p in sorted({r["predicate"] for r in rows})}
    return PredicateMatching(rows, predicates, similar)
