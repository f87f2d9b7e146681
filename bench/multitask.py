"""Multi-task fine-tuning of a trained generator: the six gradient-combination methods compared.

    python -m bench.multitask --json FILE --run RUN_DIR [--hard-run HARD_DIR] [--steps 150]
        [--seeds 0,1] [--protocols mini,hard] [--methods primary_only,...] [--aux subject_tags,predicate_match]
        [--eval-limit 300] [--out WORK_DIR]

RUN_DIR is a finished kgclue-pipeline run (RUN_DIR/model, data, vocab, trie); the hard protocol
is evaluated on HARD_DIR (a run made with ``--from-run RUN_DIR --kb-protocol hard``: its own
data/dev and trie, RUN_DIR's vocabulary and model). Every method fine-tunes the SAME start model
(RUN_DIR/model) with the same steps, batches (a function of seed and step) and seeds, through
the real trainer (Ray Train + DeepSpeed ZeRO-0, task ``multitask``); each fine-tuned model is
then evaluated on both protocols' dev rows (tasks.evaluate.run_eval: trie-constrained beam
search + the official Score) and on the validation slice (mini KB). The start model's own
scores are measured in the same run (``start``).

Output JSON ``results``: one {method, protocol, seed, score, val_score, primary_loss,
primary_loss_curve, aux_loss_curves, aux_delta, mean_lambda} per (method, protocol, seed);
``aux_delta`` = mean auxiliary loss over the last 5 steps minus the first 5 (the batches are the
same for every method, so methods compare step for step: does an auxiliary loss rise under
AdamW even though each direction has ⟨u, g_i⟩ ≥ 0?). A plot of the primary-loss curves goes to
bench/results/multitask.png and a table is printed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from bench import emit

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("primary_only", "weighted_sum", "pcgrad", "gradcosine", "primary_aux", "primary_aux_published")


def start_model_spec(run: Path) -> dict:
    """The start generator's model fields, holdout and max_src_len (from its manifest)."""
    from tasks.storage import read_manifest
    m = read_manifest(run / "model")
    spec = m.get("spec") or {}
    cfg = json.loads((run / "model" / "model_config.json").read_text())
    model = {k: v for k, v in cfg.items() if k not in ("vocab_size", "kind")}
    return {"model": model, "holdout": (spec.get("data") or {}).get("holdout"),
            "max_src_len": int(spec.get("max_src_len", 64)), "run_name": m.get("run_name")}


def finetune(run: Path, work: Path, method: str, seed: int, a) -> dict:
    """One fine-tune through tasks.train.train; returns its checkpoint and per-step trace."""
    from tasks.train import TrainSpec, train
    start = start_model_spec(run)
    trace = (work / "trace" / f"{method}-s{seed}").resolve()  # workers run elsewhere: absolute
    if trace.exists():  # a re-run resumes the Ray run; its trace restarts
        for f in trace.glob("*.jsonl"):
            f.unlink()
    data = {"method": method, "aux": a.aux, "holdout": start["holdout"], "trace_dir": str(trace),
            "input_grad_scale": a.input_grad_scale}
    spec = TrainSpec(task="multitask", data_dir=str((run / "data").resolve()), vocab_dir=str((run / "vocab").resolve()),
                     model=start["model"], warm_start=str((run / "model").resolve()), steps=a.steps,
                     micro_batch=a.micro_batch, lr=a.lr, warmup=a.warmup, zero_stage=0, num_workers=a.num_workers,
                     seed=seed, checkpoint_every=a.steps, max_src_len=start["max_src_len"], data=data)
    t0 = time.perf_counter()
    res = train(spec, str((work / "ray").resolve()))
    recs = [json.loads(x) for x in (trace / "rank0.jsonl").read_text().splitlines()] if (trace / "rank0.jsonl").exists() else []
    by_step = {r["step"]: r for r in recs}  # the last record of a step wins (a resumed run repeats some)
    steps = sorted(by_step)
    curve = [by_step[s]["primary"] for s in steps]
    aux_curves = {x: [by_step[s][f"aux_{x}"] for s in steps] for x in a.aux}
    lam = {x: float(np.mean([by_step[s][f"lam_{x}"] for s in steps])) if steps else float("nan") for x in a.aux}
    return {"checkpoint": res.checkpoint_dir, "curve": curve, "aux_curves": aux_curves, "mean_lambda": lam,
            "wall_s": round(time.perf_counter() - t0, 1)}


def evaluate(model_dir: str, run: Path, proto_dir: Path, rows: list[dict], out: Path, name: str, a,
             max_src_len: int) -> float:
    """The official Score of a model on ``rows`` with ``proto_dir``'s trie (tasks.evaluate.run_eval)."""
    from tasks.evaluate import run_eval
    from tasks.train import load_trained_model
    from tasks.trie_build import load_trie_index
    from tasks.vocab import load_vocab
    vocab = load_vocab(run / "vocab")
    trie, index = load_trie_index(proto_dir / "trie", vocab)
    model = load_trained_model(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    m = run_eval(model, trie, index, vocab, rows, out, name, beam=a.beam, lookahead=True, max_src_len=max_src_len)
    return float(m["score"])


def dev_rows(proto_dir: Path, limit: int) -> list[dict]:
    import pyarrow.parquet as pq
    rows = pq.read_table(proto_dir / "data" / "dev.parquet").to_pylist()
    rows = [r for r in rows if r.get("subject") is not None]
    return rows[:limit] if limit else rows


def val_rows(run: Path, holdout: dict | None, limit: int) -> list[dict]:
    from tasks.validation import VAL, labelled_rows
    if not holdout:
        return []
    rows = labelled_rows(run / "data", [VAL], holdout)
    return rows[:limit] if limit else rows


def _mean5(v: list[float], first: bool) -> float:
    """Mean of the first (or last) min(5, len/2) values, so the two windows never overlap."""
    k = max(1, min(5, len(v) // 2))
    return float(np.mean(v[:k] if first else v[-k:])) if v else float("nan")


def plot(results: list[dict], path: Path) -> None:
    """Primary-loss curves (mean over seeds) per method, as a 10-step running mean, and below
    them each method's difference from primary_only step for step (the batches are the same)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    proto = results[0]["protocol"]
    mean: dict[str, np.ndarray] = {}
    for method in METHODS:
        curves = [r["primary_loss_curve"] for r in results if r["method"] == method and r["protocol"] == proto]
        curves = [c for c in curves if c]
        if curves:
            n = min(len(c) for c in curves)
            mean[method] = np.mean([c[:n] for c in curves], 0)
    fig, (ax, dx) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=(3, 2))
    w = 10
    for method, c in mean.items():
        color = f"C{METHODS.index(method)}"  # the same colour in both panels
        if len(c) >= w:
            ax.plot(np.arange(w - 1, len(c)), np.convolve(c, np.ones(w) / w, "valid"), label=method, color=color)
        if "primary_only" in mean and method != "primary_only":
            n = min(len(c), len(mean["primary_only"]))
            dx.plot(np.arange(n), c[:n] - mean["primary_only"][:n], label=method, lw=1, color=color)
    ax.set_ylabel(f"primary loss ({w}-step mean)")
    ax.set_title("Multi-task fine-tuning from one trained generator (mean over ranks and seeds)")
    ax.legend(fontsize=8)
    dx.axhline(0.0, color="k", lw=0.5)
    dx.set_ylabel("minus primary_only")
    dx.set_xlabel("fine-tuning step")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(results: list[dict], start: dict) -> str:
    lines = [f"{'method':24s} {'protocol':8s} {'score':>14s} {'val':>8s} {'loss':>8s}  aux_delta"]
    for proto in sorted({r["protocol"] for r in results}):
        lines.append(f"{'start':24s} {proto:8s} {start.get(proto, float('nan')):14.2f}")
        for method in METHODS:
            rs = [r for r in results if r["method"] == method and r["protocol"] == proto]
            if not rs:
                continue
            s = [r["score"] for r in rs]
            val = [r["val_score"] for r in rs if r["val_score"] is not None]
            deltas = {k: round(float(np.mean([r["aux_delta"][k] for r in rs])), 4) for k in rs[0]["aux_delta"]}
            lines.append(f"{method:24s} {proto:8s} {np.mean(s):8.2f}±{np.std(s):5.2f} "
                         f"{(np.mean(val) if val else float('nan')):8.2f} "
                         f"{np.mean([r['primary_loss'] for r in rs]):8.4f}  {deltas}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--run", type=Path, required=True, help="a finished kgclue-pipeline run directory")
    ap.add_argument("--hard-run", type=Path, help="the hard-KB run (--from-run RUN --kb-protocol hard)")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--protocols", default="mini,hard")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--aux", default="subject_tags,predicate_match")
    ap.add_argument("--input-grad-scale", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--micro-batch", type=int, default=32)
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--beam", type=int, default=4)
    ap.add_argument("--eval-limit", type=int, default=300, help="dev questions per protocol (0: all)")
    ap.add_argument("--val-limit", type=int, default=200, help="validation-slice questions (0: all)")
    ap.add_argument("--out", type=Path, help="work directory (default: next to --json)")
    ap.add_argument("--plot", type=Path, default=ROOT / "bench" / "results" / "multitask.png")
    a = ap.parse_args(argv)
    a.aux = [x for x in a.aux.split(",") if x]
    methods = [m for m in a.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    protocols = [p for p in a.protocols.split(",") if p]
    if bad or any(p not in ("mini", "hard") for p in protocols):
        ap.error(f"methods among {METHODS}, protocols among mini,hard (got {methods}, {protocols})")
    if "hard" in protocols and a.hard_run is None:
        ap.error("the hard protocol needs --hard-run (a run made with --from-run RUN --kb-protocol hard)")
    seeds = [int(s) for s in a.seeds.split(",") if s]
    work = a.out or a.json.parent / (a.json.stem + "-work")
    import torch
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    start = start_model_spec(a.run)
    proto_dirs = {"mini": a.run, "hard": a.hard_run}
    rows = {p: dev_rows(proto_dirs[p], a.eval_limit) for p in protocols}
    vrows = val_rows(a.run, start["holdout"], a.val_limit)
    t0 = time.perf_counter()
    start_scores = {p: evaluate(str(a.run / "model"), a.run, proto_dirs[p], rows[p], work / "eval" / "start", f"{p}_dev",
                                a, start["max_src_len"]) for p in protocols}
    start_val = (evaluate(str(a.run / "model"), a.run, a.run, vrows, work / "eval" / "start", "val", a,
                          start["max_src_len"]) if vrows else None)
    results = []
    for seed in seeds:
        for method in methods:
            ft = finetune(a.run, work, method, seed, a)
            ev = work / "eval" / f"{method}-s{seed}"
            val = (evaluate(ft["checkpoint"], a.run, a.run, vrows, ev, "val", a, start["max_src_len"])
                   if vrows else None)
            for p in protocols:
                score = evaluate(ft["checkpoint"], a.run, proto_dirs[p], rows[p], ev, f"{p}_dev", a, start["max_src_len"])
                c = ft["curve"]
                results.append({"method": method, "protocol": p, "seed": seed, "score": score,
                                "val_score": val if p == "mini" else None,
                                "primary_loss": _mean5(c, first=False), "primary_loss_curve": c,
                                "aux_loss_curves": ft["aux_curves"],
                                "aux_delta": {k: _mean5(v, False) - _mean5(v, True) for k, v in ft["aux_curves"].items()},
                                "mean_lambda": ft["mean_lambda"], "finetune_wall_s": ft["wall_s"]})
            print(f"[bench.multitask] {method} seed {seed}: "
                  f"{[(r['protocol'], round(r['score'], 2)) for r in results[-len(protocols):]]}", file=sys.stderr)
    if results:
        plot(results, a.plot)
    print(table(results, start_scores), file=sys.stderr)
    emit({"bench": "multitask", "run": str(a.run), "hard_run": str(a.hard_run) if a.hard_run else None,
          "start_model": start["run_name"], "steps": a.steps, "seeds": seeds, "protocols": protocols,
          "methods": methods, "aux": a.aux, "lr": a.lr, "micro_batch": a.micro_batch, "num_workers": a.num_workers,
          "zero_stage": 0, "eval_limit": a.eval_limit, "start_scores": start_scores, "start_val_score": start_val,
          "plot": str(a.plot), "wall_s": round(time.perf_counter() - t0, 1), "results": results}, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
