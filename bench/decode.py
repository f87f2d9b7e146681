"""Decode throughput by hand: questions/s of trie-constrained beam search with the tiny model.

    .venv/bin/python -m bench.decode --threads 2 --batch 64 --beam 4

The KB is every answer triple of train+dev plus, per subject, ``--distractors`` predicates of
other triples (like the ``mini`` KB protocol; the 20M-triple knowledge.txt is not in the repo),
the questions are dev questions, the model is an untrained ``tiny`` preset (decode cost does not
depend on the weights, only the paths do). Baseline in the same run: unconstrained greedy.
With ``--run`` of a run that trained re-rankers, the second stage is measured too (questions/s of
the whole predict step with and without it, same questions). Questions are cut at the
``max_src_len`` the run's model was trained with (its manifest's spec; ``--max-src-len``
for the untrained model). Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from bench import emit

from models.decoding import constrained_beam_search, greedy_unconstrained, unconstrained_beam_search
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


def pool_stats(model, trie, rr, qs: list[list[int]], args) -> dict:
    """Keys the generator scores per question before the re-ranker sees its best
    ``max_candidates`` (hub subjects have thousands): the cost of pruning by score."""
    import numpy as np

    from tasks.evaluate import candidate_keys
    sizes = []
    for i in range(0, len(qs), args.batch):
        b = make_batch(qs[i:i + args.batch])
        for hs in constrained_beam_search(model, trie, b["src_ids"], b["src_mask"], beam_size=args.beam,
                                          max_len=args.max_len, lookahead=True):
            sizes.append(len(candidate_keys(trie, hs, rr.n_subjects, rr.max_scored)) if hs else 0)
    a = np.asarray(sizes)
    return {"mean": round(float(a.mean()), 1), "median": float(np.median(a)), "p99": float(np.percentile(a, 99)),
            "max": int(a.max()), "questions_over_max_candidates": int((a > rr.max_candidates).sum()),
            "max_candidates": rr.max_candidates, "max_scored": rr.max_scored,
            "questions_at_max_scored": int((a >= rr.max_scored).sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--beam", type=int, default=4)
    ap.add_argument("--n-questions", type=int, default=256)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--distractors", type=int, default=6)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--max-len", type=int, default=40)
    ap.add_argument("--max-src-len", type=int, default=64, help="question cut of the untrained model "
                                                                 "(with --run: the trained model's own)")
    ap.add_argument("--json", type=Path, help="also write the result here")
    ap.add_argument("--run", type=Path, help="a finished kgclue-pipeline run: its trained model, vocab, trie, dev")
    ap.add_argument("--kb-run", type=Path, help="with --run: take the trie and dev questions of this run "
                                                "(e.g. its --from-run evaluation on the hard protocol)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.run:  # a trained model: beams end where the model puts EOS, as in real use
        import pyarrow.parquet as pq

        from tasks.evaluate import encode_questions, trained_max_src_len
        from tasks.train import load_trained_model
        from tasks.trie_build import load_trie_index
        from tasks.vocab import load_vocab
        vocab = load_vocab(args.run / "vocab")
        kb_run = args.kb_run or args.run
        trie, index = load_trie_index(kb_run / "trie", vocab)
        model = load_trained_model(args.run / "model")
        args.max_src_len = trained_max_src_len(args.run / "model")
        dev = pq.read_table(kb_run / "data" / "dev.parquet", columns=["question"])["question"].to_pylist()
        qs = encode_questions(dev[: args.n_questions], vocab, args.max_src_len)
    else:  # an untrained model over a KB like the mini protocol's
        rows = load("train") + load("dev")
        gold = sorted({triple(r["answer"]) for r in rows})
        rng, preds = random.Random(0), sorted({p for _, p, _ in gold})
        extra = [(s, rng.choice(preds), m) for s, _, m in gold for _ in range(args.distractors)]
        triples = sorted(set(gold + extra))
        vocab = CharVocab.build([r["question"] for r in rows] + ["".join(t) for t in triples])
        trie = KgTrie.from_triples(triples, vocab)
        torch.manual_seed(0)
        model = Seq2Seq(Seq2SeqConfig.preset(args.preset, len(vocab))).eval()
        qs = [vocab.encode(r["question"])[:args.max_src_len] for r in load("dev")[: args.n_questions]]
    batches = [make_batch(qs[i:i + args.batch]) for i in range(0, len(qs), args.batch)]
    from tasks.hw import cpu_label
    out = {"bench": "decode-throughput", "cpu": cpu_label(), "kb_run": str(args.kb_run) if args.kb_run else None, "model": str(args.run / "model") if args.run else f"untrained {args.preset}", "params": model.n_params(),
           "vocab": len(vocab), "keys": len(trie), "threads": args.threads, "batch": args.batch,
           "beam": args.beam, "questions": len(qs), "max_src_len": args.max_src_len}
    L = args.max_len
    greedy = lambda b: greedy_unconstrained(model, b["src_ids"], b["src_mask"], max_len=L)  # noqa: E731
    out["greedy-unconstrained-qps"] = qps(greedy, batches, len(qs), args.repeat)
    free = lambda b: unconstrained_beam_search(model, b["src_ids"], b["src_mask"], beam_size=args.beam, max_len=L)  # noqa: E731
    out["beam-unconstrained-qps"] = qps(free, batches, len(qs), args.repeat)
    for la in (False, True):
        fn = lambda b: constrained_beam_search(model, trie, b["src_ids"], b["src_mask"],  # noqa: E731
                                               beam_size=args.beam, max_len=L, lookahead=la)
        out[f"beam{'-lookahead' if la else ''}-qps"] = qps(fn, batches, len(qs), args.repeat)
    out["constrained_qps"] = out["beam-qps"]["median"]
    out["constrained_lookahead_qps"] = out["beam-lookahead-qps"]["median"]
    out["unconstrained_qps"] = out["beam-unconstrained-qps"]["median"]
    out["constraint_overhead"] = round(out["unconstrained_qps"] / out["constrained_qps"] - 1, 3)
    from tasks.evaluate import Reranker, predict, trained_max_src_len
    from tasks.train import trained_ranker_dirs
    rankers = trained_ranker_dirs(args.run) if args.run else []
    if rankers:  # the second stage, end to end (beam + look-ahead + re-ranking + KB lookup) vs without
        rr = Reranker(tuple(load_trained_model(d) for d in rankers), max_src_len=trained_max_src_len(rankers[0]))
        texts = dev[: args.n_questions]
        chunks = [texts[i:i + args.batch] for i in range(0, len(texts), args.batch)]
        L_src = args.max_src_len
        plain = lambda c: predict(model, trie, index, vocab, c, beam=args.beam, max_src_len=L_src)  # noqa: E731
        ranked = lambda c: predict(model, trie, index, vocab, c, beam=args.beam, reranker=rr,  # noqa: E731
                                   max_src_len=L_src)
        out["predict-lookahead-qps"] = qps(plain, chunks, len(texts), 1)
        out["predict-reranked-qps"] = qps(ranked, chunks, len(texts), 1)
        out["rankers"] = len(rankers)
        out["rerank_pool"] = pool_stats(model, trie, rr, qs, args)
        out["reranked_qps"] = out["predict-reranked-qps"]["median"]
    emit(out, args.json)


if __name__ == "__main__":
    main()
