"""The re-ranker's generator pass with and without ``Seq2Seq.decode_at``, on one hub question.

    .venv/bin/python -m bench.decode_at --run runs/demo --kb-run runs/kbfull --json FILE

Takes the first ``--n-questions`` dev questions of ``--kb-run``, beam-searches them, and picks the
one whose re-ranking pool (``candidate_keys``: the beam's two subjects, up to 4,096 keys) is
largest. Then times ``sequence_logprobs`` over that pool, 256 keys per call as the re-ranker does,
alternately with the model (distributions at each distinct trie prefix only) and with the same
model seen without ``decode_at`` (the full (keys, T, V) pass) — the baseline, in the same process.
The scores must be equal; the JSON records the largest difference.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from bench import emit


class FullPass:
    """The model without ``decode_at``: sequence_logprobs falls back to the full pass."""

    def __init__(self, model):
        self.model = model

    def encode(self, *a):
        return self.model.encode(*a)

    def decode(self, *a):
        return self.model.decode(*a)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="a finished run: its model and vocabulary")
    ap.add_argument("--kb-run", type=Path, required=True, help="a run whose trie and dev questions to use")
    ap.add_argument("--n-questions", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    import pyarrow.parquet as pq

    from models.decoding import constrained_beam_search, sequence_logprobs
    from models.seq2seq import make_batch
    from tasks.evaluate import candidate_keys, encode_questions, trained_max_src_len
    from tasks.hw import cpu_label
    from tasks.train import load_trained_model
    from tasks.trie_build import load_trie_index
    from tasks.vocab import load_vocab
    torch.set_num_threads(a.threads)
    vocab = load_vocab(a.run / "vocab")
    trie, _ = load_trie_index(a.kb_run / "trie", vocab)
    model = load_trained_model(a.run / "model")
    dev = pq.read_table(a.kb_run / "data" / "dev.parquet", columns=["question"])["question"].to_pylist()
    qs = encode_questions(dev[:a.n_questions], vocab, trained_max_src_len(a.run / "model"))
    b = make_batch(qs)
    hyps = constrained_beam_search(model, trie, b["src_ids"], b["src_mask"], beam_size=4, max_len=96, lookahead=True)
    pools = [candidate_keys(trie, hs, 2, 4096) if hs else np.zeros(0, np.int64) for hs in hyps]
    j = int(np.argmax([len(p) for p in pools]))
    toks = [trie.key_tokens(int(k)) for k in pools[j]]

    def run(m) -> tuple[float, np.ndarray]:
        t0 = time.perf_counter()
        out = np.concatenate([sequence_logprobs(m, qs[j], toks[i:i + 256], trie, lookahead=True)
                              for i in range(0, len(toks), 256)])
        return time.perf_counter() - t0, out

    times: dict[str, list[float]] = {"decode_at": [], "full_pass": []}
    for _ in range(a.repeat):
        t_at, v_at = run(model)
        t_full, v_full = run(FullPass(model))
        times["decode_at"].append(round(t_at, 3))
        times["full_pass"].append(round(t_full, 3))
    emit({"bench": "decode-at", "cpu": cpu_label(), "run": str(a.run), "kb_run": str(a.kb_run),
          "keys": len(toks), "seconds": times,
          "speedup_median": round(float(np.median(times["full_pass"]) / np.median(times["decode_at"])), 2),
          "max_abs_score_diff": float(np.abs(v_at - v_full).max())}, a.json)


if __name__ == "__main__":
    main()
