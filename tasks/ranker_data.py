"""Training groups for the candidate re-ranker (models/ranker.py), from the training split only.

Each group is the gold key of one training question followed by ``group - 1`` negatives:

* similar: a training predicate among the ``n_similar_pool`` most similar to the gold one
  (longest common character subsequence), with a real object of that predicate;
* random: any other training predicate with one of its real objects;
* homonym: another entity's disambiguation with a similar predicate (the same base name
  meaning something else).

Only training relations and objects are used, so a relation-disjoint dev or held-out split
stays unseen. The negatives follow the same recipe as the mini/hard KB protocols'
distractors; the README says what that implies for the scores. Groups are a pure function
of (seed, step, rank) like the generator's batches, so a resumed run sees the same data.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.ranker import encode_candidate
from tasks.minikb import most_similar, pad_codepoints


@dataclass
class RankerData:
    rows: list[dict]
    predicates: list[str]
    objects_of: dict[str, list[str]]
    disambiguations: list[str]
    similar: dict[str, list[str]]
    vocab: object
    max_src_len: int = 64
    max_obj_len: int = 16

    def __len__(self) -> int:
        return len(self.rows)

    def negatives(self, i: int, n_neg: int, rng: np.random.Generator) -> list[tuple[str, str, str]]:
        """``n_neg`` distractor (predicate, disambiguation, object) triples for row ``i``."""
        r = self.rows[i]
        gold_p, gold_m = r["predicate"], r["disambiguation"]
        used = {gold_p}
        sim = [p for p in self.similar.get(gold_p, []) if p != gold_p]
        n_hom = 1 if n_neg >= 4 else 0
        n_rand = max(1, n_neg // 3) if n_neg > 1 else 0
        kinds = ["sim"] * (n_neg - n_hom - n_rand) + ["rand"] * n_rand + ["hom"] * n_hom
        out = []
        for kind in kinds:
            p = None
            if kind in ("sim", "hom") and sim:
                for _ in range(8):
                    c = sim[int(rng.integers(len(sim)))]
                    if c not in used or kind == "hom":
                        p = c
                        break
            if p is None:
                p = self._random_predicate(used, gold_p, rng)
            used.add(p)
            objs = self.objects_of[p]
            m = gold_m
            if kind == "hom":
                m = self.disambiguations[int(rng.integers(len(self.disambiguations)))] if self.disambiguations else ""
                if m == gold_m:  # a homonym must be another entity: another (or no) disambiguation
                    m = "" if gold_m else "其他"
            out.append((p, m, objs[int(rng.integers(len(objs)))]))
        return out

    def _random_predicate(self, used: set[str], gold_p: str, rng: np.random.Generator) -> str:
        """A training predicate not in ``used`` (never the gold one; repeats only once all are used)."""
        for _ in range(16):
            p = self.predicates[int(rng.integers(len(self.predicates)))]
            if p not in used:
                return p
        rest = [p for p in self.predicates if p not in used] or [p for p in self.predicates if p != gold_p]
        return rest[int(rng.integers(len(rest)))]

    def group(self, i: int, size: int, rng: np.random.Generator) -> list[tuple[list[int], list[int], list[float]]]:
        """Gold candidate of row ``i``, then ``size - 1`` negatives, encoded for the ranker."""
        r = self.rows[i]
        return [self._enc(r, r["predicate"], r["disambiguation"], r["object"]),
                *(self._enc(r, p, m, o) for p, m, o in self.negatives(i, size - 1, rng))]

    def _enc(self, r: dict, p: str, m: str, o: str):
        return encode_candidate(self.vocab, r["question"], r["subject"], p, m, o, self.max_src_len,
                                self.max_obj_len)


def load_ranker_data(data_dir: str, vocab_dir: str, splits: tuple[str, ...] = ("train",),
                     n_similar_pool: int = 16, max_src_len: int = 64, max_obj_len: int = 16,
                     holdout: dict | None = None) -> RankerData:
    """Rows of ``splits`` (labelled; ``holdout``: the validation slice left out of train) with
    their relation pools, ready for :meth:`RankerData.group`."""
    from tasks.validation import labelled_rows
    from tasks.vocab import load_vocab
    rows = labelled_rows(data_dir, splits, holdout)
    if not rows:
        raise ValueError(f"{data_dir}: no labelled rows in {splits} to train the re-ranker on")
    objects_of: dict[str, list[str]] = {}
    for r in rows:
        objects_of.setdefault(r["predicate"], []).append(r["object"])
    predicates = sorted(objects_of)
    if len(predicates) < 2:
        raise ValueError(f"{data_dir}: the re-ranker needs at least 2 distinct predicates, found {len(predicates)}")
    padded = pad_codepoints(predicates)
    similar: dict[str, list[str]] = {}
    for p in predicates:
        order = most_similar(p, predicates, padded, np.arange(len(predicates)))
        similar[p] = [predicates[j] for j in order if predicates[j] != p][:n_similar_pool]
    disamb = sorted({r["disambiguation"] for r in rows if r["disambiguation"]})
    return RankerData(rows, predicates, objects_of, disamb, similar, load_vocab(vocab_dir), max_src_len, max_obj_len)
