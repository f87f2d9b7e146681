"""The mini-KB protocols (ARCHITECTURE.md, "KgCLUE specifics"), written as official kb.txt.

Without the official 20.56M-triple KB, a KB is made from the labelled splits:

* ``mini``: every answer triple, plus for every subject ``k`` distractor (predicate, object)
  pairs drawn from other real triples (predicates the subject does not already have);
* ``hard``: the ``k`` distractor predicates are the real predicates most similar to the gold
  one (longest common character subsequence, ties broken by a seeded draw), each with a
  real object of that predicate; and ``h`` homonym entities (same base name, another real
  disambiguation) each carry ``k`` similar predicates, one of them the gold predicate with
  probability ``p_gold``.

Both are deterministic functions of (labelled rows, protocol, k, h, seed): the same inputs
give a byte-identical ``kb.txt``. Scores under them are labelled as such.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal

import numpy as np

from models.lcs import lcs_rows
from tasks.kgclue_data import join_subject, normalize_object
from tasks.storage import atomic_write_bytes


@dataclass(frozen=True)
class MiniKbConfig:
    protocol: Literal["mini", "hard"] = "mini"
    k: int = 6
    homonyms: int = 2
    p_gold: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.protocol not in ("mini", "hard"):
            raise ValueError(f"kb protocol '{self.protocol}': use 'mini' or 'hard'")
        if self.k < 0 or self.homonyms < 0 or not 0 <= self.p_gold <= 1:
            raise ValueError(f"mini-KB config {self}: k and homonyms must be >= 0, p_gold in [0, 1]")


Triple = tuple[str, str, str]  # (subject with disambiguation, predicate, object)


def gold_triples(rows: Iterable[dict]) -> list[Triple]:
    """Distinct answer triples of labelled rows, first occurrence kept, in input order."""
    seen: set[tuple[str, str]] = set()
    out: list[Triple] = []
    for r in rows:
        if r.get("subject") is None:
            continue
        s = join_subject(r["subject"], r["disambiguation"])
        if (s, r["predicate"]) in seen:
            continue  # one object per (subject, predicate): the first, as evaluation does
        seen.add((s, r["predicate"]))
        out.append((s, r["predicate"], normalize_object(r["object"])))
    return out


def lcs_lengths(query: str, candidates: list[str], padded: np.ndarray) -> np.ndarray:
    """LCS length of ``query`` against every candidate (rows of ``padded``, -1 padding)."""
    return lcs_rows(padded, [ord(ch) for ch in query])[:, -1]


def most_similar(query: str, strings: list[str], padded: np.ndarray, ties: np.ndarray) -> np.ndarray:
    """Indices of ``strings`` (rows of ``padded``) by LCS with ``query``, longest first; equal
    LCS ordered by ``ties`` (ascending)."""
    return np.lexsort((ties, -lcs_lengths(query, strings, padded)))


def pad_codepoints(strings: list[str]) -> np.ndarray:
    width = max((len(s) for s in strings), default=1)
    out = np.full((len(strings), width), -1, dtype=np.int64)
    for i, s in enumerate(strings):
        out[i, :len(s)] = [ord(c) for c in s]
    return out


def build_triples(gold: list[Triple], cfg: MiniKbConfig) -> list[Triple]:
    """All KB triples of the protocol, gold first within each subject, subjects sorted."""
    rng = np.random.default_rng(cfg.seed)
    by_subject: dict[str, list[Triple]] = {}
    for t in gold:
        by_subject.setdefault(t[0], []).append(t)
    preds = sorted({t[1] for t in gold})
    objects_of: dict[str, list[str]] = {}
    for _, p, o in gold:
        objects_of.setdefault(p, []).append(o)
    pool = sorted(set((p, o) for _, p, o in gold))
    similar_cache: dict[str, list[str]] = {}
    padded = pad_codepoints(preds) if cfg.protocol == "hard" else None

    def similar(gold_pred: str, exclude: set[str]) -> list[str]:
        if gold_pred not in similar_cache:
            order = most_similar(gold_pred, preds, padded, rng.random(len(preds)))
            similar_cache[gold_pred] = [preds[i] for i in order]
        return [p for p in similar_cache[gold_pred] if p not in exclude][:cfg.k]

    def real_object(p: str) -> str:
        objs = objects_of[p]
        return objs[int(rng.integers(len(objs)))]

    disambiguations = sorted({s[s.index("（") + 1:-1] for s in by_subject if s.endswith("）") and "（" in s})
    out: list[Triple] = []
    twins: set[str] = set()
    for subject in sorted(by_subject):
        own = by_subject[subject]
        have = {p for _, p, _ in own}
        out.extend(own)
        if cfg.protocol == "mini":
            picks: list[tuple[str, str]] = []
            for i in rng.permutation(len(pool)):
                p, o = pool[int(i)]
                if p not in have and p not in {q for q, _ in picks}:
                    picks.append((p, o))
                if len(picks) == cfg.k:
                    break
            out.extend((subject, p, o) for p, o in picks)
            continue
        g = own[0][1]
        out.extend((subject, p, real_object(p)) for p in similar(g, have))
        base = subject[:subject.index("（")] if subject.endswith("）") and "（" in subject else subject
        made = 0
        for i in rng.permutation(len(disambiguations)):
            if made == cfg.homonyms:
                break
            twin = join_subject(base, disambiguations[int(i)])
            if twin in by_subject or twin in twins:
                continue  # never add triples to a real labelled entity, nor twice to a twin
            twins.add(twin)
            plist = similar(g, {g})
            if plist and rng.random() < cfg.p_gold:
                plist[int(rng.integers(len(plist)))] = g
            out.extend((twin, p, real_object(p)) for p in plist)
            made += 1
    return out


def write_kb_txt(triples: list[Triple], path: str | Path) -> int:
    """Write the official format (head\\trelation\\ttail), atomically; returns the line count.
    A file that already holds exactly these bytes is left alone (a re-run rewrites nothing)."""
    data = "".join(f"{s}\t{p}\t{o}\n" for s, p, o in triples).encode("utf-8")
    path = Path(path)
    if not (path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data):
        atomic_write_bytes(path, data)
    return len(triples)
