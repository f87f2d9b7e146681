"""Evaluation: trie-constrained beam search -> KB lookup -> the official KgCLUE metrics.

Predictions are written as the leaderboard expects (``kgclue_predict.json``: JSON lines
``{"id", "question", "answer": "S ||| P ||| O"}``, plus a zip of it).
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

from models.decoding import Hypothesis, constrained_beam_search, greedy_unconstrained, sequence_logprobs
from models.kb_index import KbIndex
from models.metrics import normalize, score
from models.ranker import encode_candidate, log_softmax, make_ranker_batch
from models.seq2seq import make_batch
from models.trie import KgTrie
from models.vocab import EOS, SEP, CharVocab
from tasks.kgclue_data import join_subject
from tasks.storage import atomic_path, atomic_write_text, write_json_atomic


@dataclass(frozen=True)
class Prediction:
    subject: str          # full subject, with （disambiguation） when there is one
    predicate: str
    obj: str
    key_id: int = -1      # -1: not a KB key (unconstrained decoding)
    score: float = float("nan")

    def answer(self) -> str:
        return f"{self.subject} ||| {self.predicate} ||| {self.obj}"


def split_key(tokens: Sequence[int], vocab: CharVocab) -> tuple[str, str, str]:
    """Key tokens (S SEP P SEP M EOS, no BOS) -> (subject base, predicate, disambiguation)."""
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
    """Second stage after the beam search: every key of the beam's best subjects is scored by
    the generator (exhaustively, with the beam's trie renormalisation and look-ahead) and by the
    re-ranker (models/ranker.py); the key with the highest sum of the two log-softmaxes over
    the candidate set wins (a product of the two experts, equal weights, nothing tuned). With
    several re-rankers (an ensemble of seeds) their log-softmaxes are averaged first."""

    models: tuple[torch.nn.Module, ...]  # models.ranker.Ranker, one or more
    n_subjects: int = 2           # distinct subjects (base names) of the beam taken as candidates
    max_candidates: int = 256     # cap per question (hub subjects of a full KB have thousands of keys)
    lookahead: bool = True


def candidate_keys(trie: KgTrie, hyps: Sequence[Hypothesis], n_subjects: int, max_candidates: int) -> np.ndarray:
    """The beam's keys, then every other key of its first ``n_subjects`` distinct subjects, capped."""
    subjects: list[int] = []
    for h in hyps:
        s = trie.key_parts(h.key_id)[0]
        if s not in subjects:
            subjects.append(s)
    out = list(dict.fromkeys(h.key_id for h in hyps))
    seen = set(out)
    for s in subjects[:n_subjects]:
        lo, hi = int(trie.spm_offsets[trie.sp_offsets[s]]), int(trie.spm_offsets[trie.sp_offsets[s + 1]])
        for k in range(lo, hi):
            if len(out) >= max_candidates:
                return np.asarray(out, dtype=np.int64)
            if k not in seen:
                out.append(k)
                seen.add(k)
    return np.asarray(out, dtype=np.int64)


@torch.no_grad()
def rerank(generator: torch.nn.Module, reranker: Reranker, trie: KgTrie, index: KbIndex, vocab: CharVocab,
           question: str, src_ids: Sequence[int], hyps: Sequence[Hypothesis]) -> tuple[int, float]:
    """(key id, combined score) of the best candidate of one question (see :class:`Reranker`)."""
    keys = candidate_keys(trie, hyps, reranker.n_subjects, reranker.max_candidates)
    if len(keys) == 1:
        return int(keys[0]), 0.0
    toks = [trie.key_tokens(int(k)) for k in keys]
    enc = []
    for k, t in zip(keys, toks):
        s, p, m = split_key(t, vocab)
        objs = index.objects(int(k))
        enc.append(encode_candidate(vocab, question, s, p, m, objs[0] if objs else ""))
    batch = make_ranker_batch(enc)
    r = np.mean([log_softmax(m.score(batch).double().numpy()) for m in reranker.models], axis=0)
    g = sequence_logprobs(generator, src_ids, toks, trie, lookahead=reranker.lookahead)
    total = r + log_softmax(g)
    best = int(np.argmax(total))
    return int(keys[best]), float(total[best])


def encode_questions(questions: Sequence[str], vocab: CharVocab, max_src_len: int) -> list[list[int]]:
    return [vocab.encode(q)[:max_src_len] or [SEP] for q in questions]


def predict(model: torch.nn.Module, trie: KgTrie, index: KbIndex, vocab: CharVocab, questions: Sequence[str],
            beam: int = 4, lookahead: bool = True, constrained: bool = True, batch_size: int = 64,
            max_src_len: int = 64, max_len: int = 96, reranker: Reranker | None = None,
            progress: Callable[[int, int], None] | None = None) -> list[Prediction]:
    """Answer every question: the best trie key (re-ranked when a reranker is given), then its
    first KB object."""
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
                s, p, m = split_key(trie.key_tokens(key), vocab)
                objs = index.objects(key)
                out.append(Prediction(join_subject(s, m), p, objs[0] if objs else "", key, best_score))
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
             lookahead: bool = True, constrained: bool = True, reranker: Reranker | None = None,
             progress: Callable[[int, int], None] | None = None) -> dict:
    """Predict ``rows``; write predictions (+ metrics if labelled); return the metrics."""
    t0 = time.perf_counter()
    preds = predict(model, trie, index, vocab, [r["question"] for r in rows], beam=beam, lookahead=lookahead,
                    constrained=constrained, reranker=reranker, progress=progress)
    wall = time.perf_counter() - t0
    write_predictions(out_dir / f"{name}_predict.json", rows, preds)
    metrics: dict = {"n": len(rows), "decode_s": round(wall, 2), "reranked": reranker is not None,
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
