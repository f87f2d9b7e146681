"""Decode throughput by hand: questions/s of trie-constrained beam search with the tiny model.

    .venv/bin/python -m bench.decode --threads 2 --batch 64 --beam 4

The KB is every answer triple of train+dev plus, per subject, ``--distractors`` predicates of
other triples (like the ``mini`` KB protocol; the 20M-triple knowledge.txt is not in the repo),
the questions are dev questions, the model is an untrained ``tiny`` preset (decode cost does not
depend on the weights, only the paths do). Baseline in the same run: unconstrained greedy.
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from models.decoding import constrained_beam_search, greedy_unconstrained
from models.seq2seq import Seq2Seq, Seq2SeqConfig, make_batch
from models.trie import KgTrie
from models.vocab import CharVocab

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "kgclue"


def load(split: str) -> list[dict]:
    with (DATA / f"{split}.json").open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def triple(answer: str) -> tuple[str, str, str]:
    """'S（M） ||| P ||| O' -> (S, P, M)."""
    s, p, _ = answer.split(" ||| ")
    m = ""
    if s.endswith("）") and "（" in s:
        i = s.index("（")
        s, m = s[:i], s[i + 1:-1]
    return s, p, m


def qps(fn, batches, n: int, repeat: int) -> dict[str, float]:
    """Questions/s of fn over every batch: median and best of ``repeat`` runs, after a warm-up."""
    fn(batches[0])  # warm-up: the first batch pays allocator and kernel set-up
    rates = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for b in batches:
            fn(b)
        rates.append(n / (time.perf_counter() - t0))
    return {"median": round(statistics.median(rates), 1), "best": round(max(rates), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--beam", type=int, default=4)
    ap.add_argument("--n-questions", type=int, default=256)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--distractors", type=int, default=6)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = load("train") + load("dev")
    gold = sorted({triple(r["answer"]) for r in rows})
    rng, preds = random.Random(0), sorted({p for _, p, _ in gold})
    extra = [(s, rng.choice(preds), m) for s, _, m in gold for _ in range(args.distractors)]
    triples = sorted(set(gold + extra))
    vocab = CharVocab.build([r["question"] for r in rows] + ["".join(t) for t in triples])
    trie = KgTrie.from_triples(triples, vocab)
    torch.manual_seed(0)
    model = Seq2Seq(Seq2SeqConfig.preset(args.preset, len(vocab))).eval()
    qs = [vocab.encode(r["question"])[:64] for r in load("dev")[: args.n_questions]]
    batches = [make_batch(qs[i:i + args.batch]) for i in range(0, len(qs), args.batch)]
    out = {"bench": "decode-throughput", "preset": args.preset, "params": model.n_params(),
           "vocab": len(vocab), "keys": len(trie), "threads": args.threads, "batch": args.batch,
           "beam": args.beam, "questions": len(qs)}
    greedy = lambda b: greedy_unconstrained(model, b["src_ids"], b["src_mask"], max_len=40)
    out["greedy-unconstrained-qps"] = qps(greedy, batches, len(qs), args.repeat)
    for la in (False, True):
        fn = lambda b: constrained_beam_search(model, trie, b["src_ids"], b["src_mask"],
                                               beam_size=args.beam, lookahead=la)
        out[f"beam{'-lookahead' if la else ''}-qps"] = qps(fn, batches, len(qs), args.repeat)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
