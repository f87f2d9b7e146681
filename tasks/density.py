"""The ``density`` stage of kgclue-pipeline: how typical is a question, and does it matter?

A Gaussian-likelihood VAE (models/vae.py, trained on the trainer's ``vae`` task) models the
trained generator's pooled question encodings (mean and max over the encoder's outputs of the
question's characters). Every dev/test question gets log q(x), an importance-sampled estimate
with its standard error, kept beside its prediction (``eval/density.parquet``). The stage then
reports:

* the density distribution per split;
* AUROC of "real dev question" vs corrupted text: character-shuffled questions, random
  characters from the vocabulary, and another domain available offline (the KB's own object
  strings) — 1.0 when every real question is more typical than every corrupted one;
* answer accuracy per density decile of dev, so a user can see whether low density flags the
  questions the model gets wrong.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

CORRUPTIONS = ("char_shuffled", "random_chars", "kb_objects")


def pooled_encodings(model, vocab, questions: Sequence[str], max_src_len: int, batch: int = 128) -> np.ndarray:
    """(N, 2·d_model) float32: [mean, max] over the encoder outputs of each question's tokens."""
    import torch

    from models.seq2seq import make_batch
    from models.vocab import SEP
    out = []
    model.eval()
    with torch.no_grad():
        for a in range(0, len(questions), batch):
            src = [vocab.encode(q)[:max_src_len] or [SEP] for q in questions[a:a + batch]]
            b = make_batch(src)
            mem = model.encode(b["src_ids"], b["src_mask"])  # (B, S, C)
            m = b["src_mask"][..., None]
            mean = (mem * m).sum(1) / m.sum(1).clamp_min(1)
            mx = mem.masked_fill(~m, float("-inf")).amax(1)
            out.append(torch.cat([mean, mx], -1).float().numpy())
    return np.concatenate(out) if out else np.zeros((0, 2 * model.cfg.d_model), np.float32)


def corrupt(questions: Sequence[str], kind: str, seed: int, alphabet: Sequence[str] = (),
            other: Sequence[str] = ()) -> list[str]:
    """Corrupted versions of ``questions`` (same count, same lengths where it applies)."""
    if kind not in CORRUPTIONS:
        raise ValueError(f"corruption {kind!r}: choose one of {CORRUPTIONS}")
    rng = np.random.default_rng([seed, CORRUPTIONS.index(kind)])
    if kind == "char_shuffled":
        return ["".join(np.asarray(list(q))[rng.permutation(len(q))]) if len(q) > 1 else q for q in questions]
    if kind == "random_chars":
        if not alphabet:
            raise ValueError("random_chars needs an alphabet")
        alpha = np.asarray(list(alphabet))
        return ["".join(alpha[rng.integers(0, len(alpha), max(1, len(q)))]) for q in questions]
    pool = [o for o in other if o.strip()]  # kb_objects
    if not pool:
        raise ValueError("kb_objects needs the KB's object strings")
    return [pool[i] for i in rng.integers(0, len(pool), len(questions))]


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counting half (Mann-Whitney U)."""
    pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    if not len(pos) or not len(neg):
        return float("nan")
    allv = np.concatenate([pos, neg])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(len(allv), np.float64)
    sorted_v = allv[order]
    i = 0
    while i < len(allv):  # average ranks over ties
        j = i
        while j + 1 < len(allv) and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    u = ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def accuracy_by_decile(log_q: np.ndarray, correct: np.ndarray) -> list[dict]:
    """Answer accuracy in each density decile (1 = the least typical tenth)."""
    log_q, correct = np.asarray(log_q, np.float64), np.asarray(correct, bool)
    if len(log_q) < 10:
        return []
    order = np.argsort(log_q, kind="mergesort")
    rows = []
    for d, idx in enumerate(np.array_split(order, 10), start=1):
        rows.append({"decile": d, "n": int(len(idx)), "log_q_min": float(log_q[idx].min()),
                     "log_q_max": float(log_q[idx].max()), "accuracy": float(correct[idx].mean())})
    return rows


def write_encodings(path: str | Path, splits: dict[str, np.ndarray]) -> None:
    """The VAE's data: a .npz with train / valid / test arrays (tasks/vae_data.py reads it)."""
    import io

    from tasks.storage import atomic_path
    buf = io.BytesIO()
    np.savez(buf, **splits)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())
