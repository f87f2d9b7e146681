"""Evaluation: trie-constrained beam search -> KB lookup -> the official KgCLUE metrics.

Predictions are written as the leaderboard expects (``kgclue_predict.json``: JSON lines
``{"id", "question", "answer": "S ||| P ||| O"}``, plus a zip of it).

Answers are read from the trie build's key strings table (models/kb_index.py), never
decoded from tokens: a vocabulary without some KB characters (``--from-run`` on a new KB)
would otherwise write "[UNK]" into answers. A key that several KB string triples tokenise
to answers with the first of them in the KB file, and that variant's first object.

Questions are cut at ``max_src_len`` tokens, the value the model was trained with
(:func:`trained_max_src_len`), for the beam search, the look-ahead and the re-ranker alike.
"""
from __future__ import annotations

import json
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from models.decoding import (Hypothesis, Lookahead, constrained_beam_search, greedy_unconstrained,
                             sequence_logprobs)
from models.kb_index import KbIndex
from models.metrics import normalize, score
from models.ranker import encode_candidate, log_softmax, make_ranker_batch
from models.seq2seq import make_batch
from models.trie import KgTrie
from models.vocab import EOS, SEP, CharVocab
from tasks.kgclue_data import join_subject
from tasks.storage import atomic_path, atomic_write_text, read_manifest, write_json_atomic

DEFAULT_MAX_SRC_LEN = 64  # tasks.train.TrainSpec's default, for manifests that predate "spec"


@dataclass(frozen=True)
class Prediction:
    subject: str          # full subject, with （disambiguation） when there is one
    predicate: str
    obj: str
    key_id: int = -1      # -1: not a KB key (unconstrained decoding)
    score: float = float("nan")

    def answer(self) -> str:
        return f"{self.subject} ||| {self.predicate} ||| {self.obj}"


def trained_max_src_len(model_dir: str | Path) -> int:
    """The ``max_src_len`` an exported model (or re-ranker) was trained with: its manifest's
    ``spec``; 64 (the training default) for a manifest written before the spec was recorded."""
    spec = read_manifest(model_dir).get("spec") or {}
    return int(spec.get("max_src_len", DEFAULT_MAX_SRC_LEN))


def split_key(tokens: Sequence[int], vocab: CharVocab) -> tuple[str, str, str]:
    """Key tokens (S SEP P SEP M EOS, no BOS) -> (subject base, predicate, disambiguation),
    decoded through the vocabulary (unknown characters read "[UNK]"): only for unconstrained
    outputs, which have no key; a key's real strings are ``KbIndex.key_strings``."""
    toks = [int(t) for t in tokens]
    if EOS in toks:
        toks = toks[:toks.index(EOS)]
    parts = [[]]
    for t in toks:
        if t == SEP and len(parts) < 3:
            parts.append([])
        else:
            parts[-1].append(t)
    parts += [[]] * (3 - len(parts))
    return tuple(vocab.decode(p) for p in parts)  # type: ignore[return-value]


@dataclass(frozen=True)
class Reranker:
    """Second stage after the beam search.

    Candidates: the beam's keys, then every other key of the beam's first ``n_subjects``
    distinct subjects in token order, at most ``max_scored`` of them (a bound on the work:
    keys beyond it, on a hub subject with more, are never looked at). The generator scores
    them all exhaustively (with the beam's trie renormalisation and look-ahead; in batches
    of ``score_batch`` keys) and only its best ``max_candidates`` go on to the re-ranker
    (models/ranker.py), so a cap never cuts a key the generator prefers. The key with the
    highest sum of the two log-softmaxes over those candidates wins (a product of the two
    experts, equal weights, nothing tuned). With several re-rankers (an ensemble of seeds)
    their log-softmaxes are averaged first. ``max_src_len`` / ``max_obj_len``: the
    re-ranker's training values (``trained_max_src_len`` of its directory)."""

    models: tuple[torch.nn.Module, ...]  # models.ranker.Ranker, one or more
    n_subjects: int = 2           # distinct subjects (base names) of the beam taken as candidates
    max_candidates: int = 256     # candidates the re-ranker scores, the generator's best
    lookahead: Lookahead = True   # as in the beam search: False, True (= "ours") or "reference"
    max_src_len: int = DEFAULT_MAX_SRC_LEN
    max_obj_len: int = 16
    max_scored: int = 4096        # keys the generator scores per question (hub subjects have more)
    score_batch: int = 256        # keys per generator call (memory: keys x length x vocab floats)


def candidate_keys(trie: KgTrie, hyps: Sequence[Hypothesis], n_subjects: int, max_candidates: int) -> np.ndarray:
    """The beam's keys, then every other key of its first ``n_subjects`` distinct subjects in
    token order, capped at ``max_candidates`` (the pool the generator scores)."""
    subjects: list[int] = []
    for h in hyps:
        s = trie.key_parts(h.key_id)[0]
        if s not in subjects:
            subjects.append(s)
    out = list(dict.fromkeys(h.key_id for h in hyps))[:max_candidates]
    seen = set(out)
    for s in subjects[:n_subjects]:
        for k in trie.subject_keys(s):
            if len(out) >= max_candidates:
                return np.asarray(out, dtype=np.int64)
            if k not in seen:
                out.append(k)
                seen.add(k)
    return np.asarray(out, dtype=np.int64)


def generator_scores(generator: torch.nn.Module, src_ids: Sequence[int], toks: Sequence[np.ndarray],
                     trie: KgTrie, lookahead: Lookahead, batch: int) -> np.ndarray:
    """:func:`sequence_logprobs` of every key, ``batch`` keys per call (a key's score does not
    depend on the other keys of its call)."""
    parts = [sequence_logprobs(generator, src_ids, toks[a:a + batch], trie, lookahead=lookahead)
             for a in range(0, len(toks), batch)]
    return np.concatenate(parts) if parts else np.zeros(0)


def top_by_score(scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` best scores (ties: the earlier first), in their original order."""
    if len(scores) <= k:
        return np.arange(len(scores))
    return np.sort(np.argsort(-scores, kind="stable")[:k])


def encode_candidates(reranker: Reranker, index: KbIndex, vocab: CharVocab, question: str,
                      keys: np.ndarray) -> list:
    """The re-ranker's input of each key, from its real strings and first object."""
    enc = []
    for k in keys:
        s, p, m = index.key_strings(int(k))
        objs = index.objects(int(k), 0)
        enc.append(encode_candidate(vocab, question, s, p, m, objs[0] if objs else "",
                                    reranker.max_src_len, reranker.max_obj_len))
    return enc


@torch.no_grad()
def rerank(generator: torch.nn.Module, reranker: Reranker, trie: KgTrie, index: KbIndex, vocab: CharVocab,
           question: str, src_ids: Sequence[int], hyps: Sequence[Hypothesis]) -> tuple[int, float]:
    """(key id, combined score) of the best candidate of one question (see :class:`Reranker`)."""
    pool = candidate_keys(trie, hyps, reranker.n_subjects, reranker.max_scored)
    if len(pool) == 1:
        return int(pool[0]), 0.0
    toks = [trie.key_tokens(int(k)) for k in pool]
    g_all = generator_scores(generator, src_ids, toks, trie, reranker.lookahead, reranker.score_batch)
    keep = top_by_score(g_all, reranker.max_candidates)
    keys, g = pool[keep], g_all[keep]
    batch = make_ranker_batch(encode_candidates(reranker, index, vocab, question, keys))
    r = np.mean([log_softmax(m.score(batch).double().numpy()) for m in reranker.models], axis=0)
    total = r + log_softmax(g)
    best = int(np.argmax(total))
    return int(keys[best]), float(total[best])


def key_answer(index: KbIndex, key: int, score: float) -> Prediction:
    """The prediction of a key: its first string variant and that variant's first object."""
    s, p, m = index.key_strings(key)
    objs = index.objects(key, 0)
    return Prediction(join_subject(s, m), p, objs[0] if objs else "", key, score)


def encode_questions(questions: Sequence[str], vocab: CharVocab, max_src_len: int) -> list[list[int]]:
    return [vocab.encode(q)[:max_src_len] or [SEP] for q in questions]


def predict(model: torch.nn.Module, trie: KgTrie, index: KbIndex, vocab: CharVocab, questions: Sequence[str],
            beam: int = 4, lookahead: Lookahead = True, constrained: bool = True, batch_size: int = 64,
            max_src_len: int = DEFAULT_MAX_SRC_LEN, max_len: int = 96, reranker: Reranker | None = None,
            progress: Callable[[int, int], None] | None = None) -> list[Prediction]:
    """Answer every question: the best trie key (re-ranked when a reranker is given), then its
    real strings and first KB object (:func:`key_answer`). ``max_src_len``: the model's
    training value (:func:`trained_max_src_len`); ``lookahead``: False, True (= "ours") or
    "reference" (models/decoding.py)."""
    out: list[Prediction] = []
    src_all = encode_questions(questions, vocab, max_src_len)
    for a in range(0, len(src_all), batch_size):
        batch = make_batch(src_all[a:a + batch_size])
        if constrained:
            hyps = constrained_beam_search(model, trie, batch["src_ids"], batch["src_mask"], beam_size=beam,
                                           max_len=max_len, lookahead=lookahead)
            for j, hs in enumerate(hyps):
                if not hs:
                    out.append(Prediction("", "", ""))
                    continue
                key, best_score = hs[0].key_id, hs[0].score
                if reranker is not None:
                    key, best_score = rerank(model, reranker, trie, index, vocab, questions[a + j],
                                             src_all[a + j], hs)
                out.append(key_answer(index, key, best_score))
        else:
            for toks in greedy_unconstrained(model, batch["src_ids"], batch["src_mask"], max_len=max_len):
                s, p, m = split_key(toks, vocab)
                objs = index.lookup(s, p, m)
                out.append(Prediction(join_subject(s, m), p, objs[0] if objs else ""))
        if progress:
            progress(len(out), len(src_all))
    return out


def evaluate_rows(rows: list[dict], predictions: list[Prediction]) -> dict:
    """Official metrics of predictions against labelled rows (tasks.kgclue_data schema)."""
    golds = [(join_subject(r["subject"], r["disambiguation"]), r["predicate"], r["object"]) for r in rows]
    return score([(p.subject, p.predicate, p.obj) for p in predictions], golds)


def write_predictions(path: Path, rows: list[dict], predictions: list[Prediction]) -> None:
    """Leaderboard format (JSON lines, the question kept, ``answer`` added) + a zip beside it."""
    text = "".join(json.dumps({"id": r["id"], "question": r["question"], "answer": p.answer()},
                              ensure_ascii=False) + "\n" for r, p in zip(rows, predictions))
    atomic_write_text(path, text)
    with atomic_path(path.with_suffix(".zip")) as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr(path.name, text)


def run_eval(model, trie, index, vocab, rows: list[dict], out_dir: Path, name: str, beam: int = 4,
             lookahead: Lookahead = True, constrained: bool = True, reranker: Reranker | None = None,
             progress: Callable[[int, int], None] | None = None, max_src_len: int = DEFAULT_MAX_SRC_LEN) -> dict:
    """Predict ``rows``; write predictions (+ metrics if labelled); return the metrics.
    ``max_src_len``: pass the model's training value (:func:`trained_max_src_len`)."""
    t0 = time.perf_counter()
    preds = predict(model, trie, index, vocab, [r["question"] for r in rows], beam=beam, lookahead=lookahead,
                    constrained=constrained, reranker=reranker, progress=progress, max_src_len=max_src_len)
    wall = time.perf_counter() - t0
    write_predictions(out_dir / f"{name}_predict.json", rows, preds)
    metrics: dict = {"n": len(rows), "decode_s": round(wall, 2), "reranked": reranker is not None,
                     "max_src_len": max_src_len,
                     "questions_per_s": round(len(rows) / max(wall, 1e-9), 2)}
    if rows and rows[0].get("subject") is not None:
        metrics.update(evaluate_rows(rows, preds))
        errors = [{"id": r["id"], "question": r["question"], "gold": f"{join_subject(r['subject'], r['disambiguation'])}"
                   f" ||| {r['predicate']} ||| {r['object']}", "pred": p.answer()}
                  for r, p in zip(rows, preds) if normalize(p.obj) != normalize(r["object"])]
        atomic_write_text(out_dir / f"{name}_errors.json", json.dumps(errors[:500], ensure_ascii=False, indent=1))
    write_json_atomic(out_dir / f"{name}_metrics.json", metrics)
    return metrics


def key_rank_of_gold(rows: list[dict], trie: KgTrie, vocab: CharVocab) -> np.ndarray:
    """Key id of each gold answer, -1 when the KB lacks it (bounds what decoding can reach)."""
    from models.trie import ImpossibleState
    out = []
    for r in rows:
        state = trie.start()
        try:
            for t in [*vocab.encode(r["subject"]), SEP, *vocab.encode(r["predicate"]), SEP,
                      *vocab.encode(r["disambiguation"]), EOS]:
                state = trie.advance(state, t)
            out.append(trie.key_id(state))
        except ImpossibleState:
            out.append(-1)
    return np.asarray(out)
