"""KgCLUE quality by attention kind: the tiny pipeline (generator + trie beam search, no
re-ranker, so the attention kind is the only difference) per kind x seed, at equal steps.

    .venv/bin/python -m bench.kgclue_attention --data-dir ../shared/data/kgclue \\
        --json bench/results/kgclue-attention.json

Each (kind, seed) is one ``python -m flows.kgclue --preset tiny --attention KIND --seed S
--no-rerank`` run in its own output directory (``--work``, default runs/bench-kgclue-attention),
so a re-run reuses finished runs. The baseline is ``softmax``, measured in the same bench with
the same seeds: its own seed spread (max - min) is the yardstick the goal reads against
("within 1 point of softmax"). The JSON holds every run's dev Score, EM-O, F1-O and the
generator's training wall time, then per kind the mean and the gap to softmax's mean.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench import emit

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("softmax", "vq", "performer")
# named variants: (kind, its options); ``vq-relkey`` is the long-context LM's base vq
# (query-dependent relative keys and fractional dead-code restarts, models/attention_vq.py)
VARIANTS = {"vq-relkey": ("vq", {"rel_key": True, "dead_fraction": 0.01})}


def run_one(name: str, seed: int, args: argparse.Namespace) -> dict:
    """One tiny pipeline run of attention ``name`` (a kind, or a variant of :data:`VARIANTS`)."""
    kind, options = VARIANTS.get(name, (name, {}))
    out = args.work / f"{name}-s{seed}"
    cmd = [sys.executable, "-m", "flows.kgclue", "--preset", "tiny", "--attention", kind, "--seed", str(seed),
           "--no-rerank", "--out", str(out)]
    if options:
        cmd += ["--attention-options", json.dumps(options)]
    if args.data_dir:
        cmd += ["--data-dir", str(args.data_dir)]
    if args.steps:
        cmd += ["--steps", str(args.steps)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["failed"])[-1][:400]
        return {"attention": name, "seed": seed, "error": tail, "wall_s": round(wall, 1)}
    m = json.loads((out / "metrics.json").read_text("utf-8"))
    if m.get("attention") != kind or (m.get("attention_options") or {}).get(kind, {}) != options:
        raise SystemExit(f"{out}: metrics say attention {m.get('attention')!r} with {m.get('attention_options')}, "
                         f"expected {kind!r} with {options}")
    return {"attention": name, "kind": kind, "options": options, "seed": seed, "score": m["score"], "em_o": m["em_o"], "f1_o": m["f1_o"],
            "eval_set": m.get("eval_set"), "train_steps": m.get("train_steps"),
            "train_tokens_per_s": m.get("train_tokens_per_s"), "final_loss": m.get("final_loss"),
            "run_name": m.get("run_name"), "wall_s": round(wall, 1), "out": str(out)}


def summarise(rows: list[dict], kinds: list[str]) -> dict:
    by = {k: [r["score"] for r in rows if r["attention"] == k and "score" in r] for k in kinds}
    out: dict = {}
    base = statistics.fmean(by["softmax"]) if by.get("softmax") else None
    spread = (max(by["softmax"]) - min(by["softmax"])) if len(by.get("softmax", [])) > 1 else None
    for k, s in by.items():
        if not s:
            continue
        out[k] = {"scores": s, "mean": round(statistics.fmean(s), 3), "spread": round(max(s) - min(s), 3)}
        if base is not None and k != "softmax":
            gap = statistics.fmean(s) - base
            out[k].update(gap_to_softmax=round(gap, 3), within_1_point=abs(gap) <= 1.0)
    out["softmax_seed_spread"] = None if spread is None else round(spread, 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, help="KgCLUE datasets/ folder (default: the flow's generated sample)")
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, of {list(KINDS) + list(VARIANTS)}")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--steps", type=int, help="generator steps (default: the tiny preset's)")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-kgclue-attention")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = [k for k in kinds if k not in KINDS and k not in VARIANTS]
    if unknown:
        raise SystemExit(f"--kinds {unknown}: unknown; choose from {list(KINDS) + list(VARIANTS)}")
    if "softmax" not in kinds:
        raise SystemExit("--kinds must include softmax: it is the baseline measured in the same run")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    rows = []
    for seed in seeds:
        for kind in kinds:
            r = run_one(kind, seed, args)
            print(json.dumps(r), file=sys.stderr, flush=True)
            rows.append(r)
    from tasks.hw import cpu_label
    emit({"bench": "kgclue-attention", "preset": "tiny", "rerank": False, "seeds": seeds, "cpu": cpu_label(),
          "data_dir": str(args.data_dir) if args.data_dir else None, "runs": rows,
          "summary": summarise(rows, kinds)}, args.json)


if __name__ == "__main__":
    main()
