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

from models.decoding import constrained_beam_search, greedy_unconstrained
from models.kb_index import KbIndex
from models.metrics import score
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


def encode_questions(questions: Sequence[str], vocab: CharVocab, max_src_len: int) -> list[list[int]]:
    return [vocab.encode(q)[:max_src_len] or [SEP] for q in questions]


def predict(model: torch.nn.Module, trie: KgTrie, index: KbIndex, vocab: CharVocab, questions: Sequence[str],
            beam: int = 4, lookahead: bool = True, constrained: bool = True, batch_size: int = 64,
            max_src_len: int = 64, max_len: int = 96,
            progress: Callable[[int, int], None] | None = None) -> list[Prediction]:
    """Answer every question: the best trie key, then its first KB object."""
    out: list[Prediction] = []
    src_all = encode_questions(questions, vocab, max_src_len)
    for a in range(0, len(src_all), batch_size):
        batch = make_batch(src_all[a:a + batch_size])
        if constrained:
            hyps = constrained_beam_search(model, trie, batch["src_ids"], batch["src_mask"], beam_size=beam,
                                           max_len=max_len, lookahead=lookahead)
            for hs in hyps:
                if not hs:
                    out.append(Prediction("", "", ""))
                    continue
                best = hs[0]
                s, p, m = split_key(best.tokens, vocab)
                objs = index.objects(best.key_id)
                out.append(Prediction(join_subject(s, m), p, objs[0] if objs else "", best.key_id, best.score))
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
             lookahead: bool = True, constrained: bool = True,
             progress: Callable[[int, int], None] | None = None) -> dict:
    """Predict ``rows``; write predictions (+ metrics if labelled); return the metrics."""
    t0 = time.perf_counter()
    preds = predict(model, trie, index, vocab, [r["question"] for r in rows], beam=beam, lookahead=lookahead,
                    constrained=constrained, progress=progress)
    wall = time.perf_counter() - t0
    write_predictions(out_dir / f"{name}_predict.json", rows, preds)
    metrics: dict = {"n": len(rows), "decode_s": round(wall, 2),
                     "questions_per_s": round(len(rows) / max(wall, 1e-9), 2)}
    if rows and rows[0].get("subject") is not None:
        metrics.update(evaluate_rows(rows, preds))
        errors = [{"id": r["id"], "question": r["question"], "gold": f"{join_subject(r['subject'], r['disambiguation'])}"
                   f" ||| {r['predicate']} ||| {r['object']}", "pred": p.answer()}
                  for r, p in zip(rows, preds) if p.obj != r["object"]]
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
