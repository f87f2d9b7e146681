"""Flow "long-context-lm": a byte-level decoder-only LM trained at length N, evaluated at N..16N.

    python -m flows.long_context_lm --attention softmax|alibi|hwfa|vq|performer --preset tiny|base --out DIR
                                    [--corpus PATH] [--column text] [--compare softmax,hwfa,...] [--steps N]
                                    [--eval-tokens T] [--ray-address ADDR] [--num-workers N] [--seed S]

Stages (each caches by content, so a re-run with the same inputs trains and evaluates nothing):

1. the corpus (tasks/lm_corpus.py) into OUT/corpus, prepared once: no ``--corpus``: this
   interpreter's standard-library ``.py`` files, one document per file; a text file: blocks of
   200 lines; a Parquet file: one row of ``--column`` per document. Documents are split by a
   seeded hash (fixed seed 0, independent of ``--seed``) into train and validation, so the
   validation text is files the model never saw.
2. for each attention kind (``--attention``, or every kind of ``--compare``): train the LM
   (models/lm.py, pattern = the kind) at length N on Ray Train + DeepSpeed
   (tasks.steps.train_step, task ``lm``) into OUT/<kind>/model, Ray storage OUT/ray.
3. evaluate on the VALIDATION split at N, 2N, 4N, 8N and 16N: one region of natural text (the
   first B+1 validation tokens, B a multiple of 16N, at most ``eval_tokens``) is cut into windows
   of L+1 tokens starting at 0, L, 2L, ...: every length predicts exactly the same B tokens
   (tokens 1..B of the region), the same for every kind; only the context each prediction sees
   changes. No text is repeated. Batch size 16N/L rows (1 at 16N, 2 at 8N), so memory is bounded.
4. OUT/<kind>/metrics.json per kind, OUT/metrics.json, OUT/long_context.png (accuracy and bits
   per byte against length, log2 x axis, one line per kind), OUT/report.md, OUT/manifest.json
   (last); Prefect artifacts ``long-context-eval`` (table: kind x length) and
   ``long-context-report`` (markdown, the plot inline).

bpc is bits per predicted byte (the vocabulary is UTF-8 bytes); accuracy is next-byte top-1.
"""
from __future__ import annotations

import flows  # noqa: F401  (embedded defaults before prefect and ray are imported)

import argparse
import base64
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows._cli import json_object, run_cli
from flows.long_context_config import CORPUS_SEED, MULTIPLES, PRESETS, LMCorpusError, LongContextConfig
from models.attention_pattern import PATTERNS, hwfa_default_window
from tasks import reporting
from tasks.steps import train_step
from tasks.storage import (atomic_path, atomic_write_text, read_manifest, reusable, write_json_atomic,
                           write_manifest)

FLOW = "long-context-lm"
EVAL_SCHEMA = 1


# ------------------------------------------------------------------------------ corpus
def prepare(cfg: LongContextConfig) -> dict[str, Any]:
    """The byte corpus in OUT/corpus (reused when complete), with enough validation text for 16N."""
    from tasks.lm_corpus import prepare_corpus
    source = str(Path(cfg.corpus).resolve()) if cfg.corpus is not None else None
    try:
        m = prepare_corpus(cfg.out / "corpus", source, seed=CORPUS_SEED, column=cfg.column)
    except ValueError as e:
        raise LMCorpusError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    except (OSError, UnicodeDecodeError) as e:
        raise LMCorpusError(f"--corpus {cfg.corpus}: unreadable ({type(e).__name__}: {e}); give a UTF-8 text "
                            f"file or a Parquet file with a text column") from None
    need = 16 * PRESETS[cfg.preset]["train_len"] + 1
    have = m["files"]["validation.npy"]["rows"]
    if have < need:
        raise LMCorpusError(f"corpus {m['source']}: the validation split holds {have} bytes "
                            f"({m['files']['validation.npy']['documents']} documents), fewer than the {need} "
                            f"needed for one window at 16N; give a larger corpus (more documents)")
    return m


@task(name="lm-corpus", cache_policy=NO_CACHE)
def corpus_task(cfg: LongContextConfig) -> dict[str, Any]:
    m = prepare(cfg)
    reporting.table("long-context-corpus", [{"split": f.removesuffix(".npy"), **e} for f, e in m["files"].items()],
                    f"Byte corpus {m['source']}: documents split by a seeded hash (seed {m['seed']})")
    return m


# ------------------------------------------------------------------------------ training
def train_spec(cfg: LongContextConfig, kind: str) -> dict[str, Any]:
    """Task ``lm``: the corpus enters the run name by content, so the same text anywhere is the same run."""
    from tasks.train import TrainSpec
    p = cfg.preset_values()
    model = {k: p[k] for k in ("d_model", "n_head", "n_layer", "d_ff", "train_len")}
    model["pattern"] = kind
    opts = cfg.kind_options(kind)
    if opts:  # only this kind's options: another kind's options never change its run name
        model["attention_options"] = {kind: opts}
    spec = TrainSpec(task="lm", data={"corpus": str((cfg.out / "corpus").resolve()), "seq_len": p["train_len"]},
                     model=model, steps=p["steps"], micro_batch=p["micro_batch"], lr=p["lr"], warmup=p["warmup"],
                     zero_stage=1, num_workers=cfg.num_workers, seed=cfg.seed,
                     checkpoint_every=max(50, p["steps"] // 4))
    return asdict(spec)


# ------------------------------------------------------------------------------ evaluation
def eval_plan(n_val: int, train_len: int, eval_tokens: int) -> dict[str, Any]:
    """The predicted tokens B: a multiple of 16N, at most eval_tokens (at least one 16N window) and
    at most what the validation split holds; windows of L+1 tokens start at 0, L, 2L, ... < B."""
    top = max(MULTIPLES) * train_len
    n_top = max(1, min(eval_tokens // top, (n_val - 1) // top))
    if n_top * top + 1 > n_val:
        raise LMCorpusError(f"validation split of {n_val} tokens is shorter than one window of {top + 1}")
    return {"split": "validation", "offset": 0, "predicted_tokens": n_top * top, "validation_tokens": n_val,
            "windows_at_16n": n_top}


def evaluate_lengths(model_dir: Path, corpus_dir: Path, lengths: list[tuple[int, int]], eval_tokens: int,
                     progress=None) -> dict[str, Any]:
    """bpc / accuracy / tokens of the trained model at each (multiple, length) on the plan's text."""
    import numpy as np
    import torch

    from tasks.lm_corpus import load_corpus
    from tasks.train import load_trained_model
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model = load_trained_model(model_dir)
    n = model.cfg.train_len
    val, _ = load_corpus(corpus_dir, "validation")
    plan = eval_plan(len(val), n, eval_tokens)
    B = plan["predicted_tokens"]
    region = np.asarray(val[:B + 1], dtype=np.int64)  # (B+1,)
    rows, t_all = [], time.perf_counter()
    top = max(m for m, _ in lengths) * n
    for i, (mult, L) in enumerate(lengths):
        t0 = time.perf_counter()
        k = B // L
        idx = np.arange(k)[:, None] * L + np.arange(L + 1)[None, :]  # (k, L+1): targets 1..B exactly once
        bs = max(1, top // L)  # 16N/L rows: 1 at 16N, 2 at 8N, ... (the forward's tokens stay <= 16N)
        r = model.evaluate(torch.from_numpy(region[idx]), batch_size=bs)
        rows.append({"length_multiple": mult, "length": L, "bpc": r["bpc"], "accuracy": r["accuracy"],
                     "tokens": int(r["tokens"]), "windows": int(k), "batch_size": bs,
                     "wall_s": round(time.perf_counter() - t0, 2)})
        if progress:
            progress(i + 1, len(lengths), rows[-1])
    return {"eval": rows, "eval_text": plan, "n_params": model.n_params(),
            "layers": [kind for kind, _ in model.cfg.layers()], "eval_wall_s": round(time.perf_counter() - t_all, 2)}


@task(name="lm-evaluate-lengths", cache_policy=NO_CACHE)
def evaluate_task(cfg: LongContextConfig, kind: str) -> dict[str, Any]:
    """Evaluate OUT/<kind>/model at N..16N; cached in OUT/<kind>/eval by the model's and corpus's content."""
    from tasks.train import manifest_content_sha256
    logger = get_run_logger()
    model_dir, corpus_dir, eval_dir = cfg.out / kind / "model", cfg.out / "corpus", cfg.out / kind / "eval"
    model_m = read_manifest(model_dir)
    p = cfg.preset_values()
    key = {"kind": "lm-long-context-eval", "schema_version": EVAL_SCHEMA, "run_name": model_m["run_name"],
           "model_sha256": model_m["files"]["model.pt"]["sha256"], "corpus": manifest_content_sha256(corpus_dir),
           "lengths": [list(x) for x in cfg.lengths()], "eval_tokens": p["eval_tokens"]}
    if (done := reusable(eval_dir, **key)) is not None:
        logger.info("%s: %s evaluation of %s reused (%s)", FLOW, kind, model_m["run_name"], eval_dir)
        return {**json.loads((eval_dir / "eval.json").read_text("utf-8")), "eval_reused": True}
    pid = reporting.progress(f"evaluate-{kind}-progress", 0.0, f"{kind}: evaluating at {len(key['lengths'])} lengths")

    def progress(done: int, total: int, row: dict) -> None:
        desc = (f"{kind} @ {row['length']} ({row['length_multiple']}N): bpc {row['bpc']:.4f}, "
                f"accuracy {row['accuracy']:.4f}, {row['tokens']} tokens in {row['wall_s']} s")
        logger.info("%s: %s", FLOW, desc)
        reporting.update_progress(pid, 100.0 * done / total, desc)

    ev = evaluate_lengths(model_dir, corpus_dir, cfg.lengths(), p["eval_tokens"], progress)
    write_json_atomic(eval_dir / "eval.json", ev)
    write_manifest(eval_dir, ["eval.json"], **key)
    return {**ev, "eval_reused": False}


# ------------------------------------------------------------------------------ report
def plot_lengths(runs: dict[str, dict], train_len: int, path: Path) -> None:
    """Accuracy and bpc against evaluation length (log2 x), one line per kind; PNG written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_bpc) = plt.subplots(1, 2, figsize=(11, 4.4), dpi=90)
    lengths = [m * train_len for m in MULTIPLES]
    for i, (kind, r) in enumerate(runs.items()):
        xs = [e["length"] for e in r["eval"]]
        ax_acc.plot(xs, [e["accuracy"] for e in r["eval"]], "o-", color=f"C{i % 10}", label=kind)
        ax_bpc.plot(xs, [e["bpc"] for e in r["eval"]], "o-", color=f"C{i % 10}", label=kind)
    for ax, name in ((ax_acc, "next-byte accuracy (higher is better)"), (ax_bpc, "bits per byte (lower is better)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [f"{m}N\n{m * train_len}" for m in MULTIPLES])
        ax.axvline(train_len, color="grey", ls=":", lw=1)
        ax.set(xlabel="evaluation length (tokens)", ylabel=name)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(f"long-context-lm: trained at N = {train_len}, evaluated on unseen validation text")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _r(v: Any, nd: int = 4) -> Any:
    return round(v, nd) if isinstance(v, float) else v


def run_metrics(cfg: LongContextConfig, kind: str, model_m: dict, ev: dict, trained: bool) -> dict[str, Any]:
    from tasks.hw import cpu_label
    p = cfg.preset_values()
    model = (model_m.get("spec") or {}).get("model", {})
    return {
        "attention": kind, "train_len": p["train_len"], "eval": ev["eval"], "eval_text": ev["eval_text"],
        "train_steps": model_m["steps"], "train_wall_s": model_m["train_wall_s"],
        "tokens_per_s": model_m["tokens_per_s"], "final_loss": model_m["final_loss"],
        "run_name": model_m["run_name"], "trained_this_run": trained, "model": model, "n_params": ev["n_params"],
        "layers": ev["layers"],
        "window": hwfa_default_window(p["n_layer"], p["train_len"]) if kind == "hwfa" else None,
        "eval_wall_s": ev["eval_wall_s"], "eval_reused": ev["eval_reused"],
        "num_workers": cfg.num_workers, "micro_batch": p["micro_batch"], "cpu": cpu_label(), "accelerator": "cpu",
    }


@task(name="lm-long-context-report", cache_policy=NO_CACHE)
def report_task(cfg: LongContextConfig, corpus_m: dict, runs: dict[str, dict], t0: float) -> dict[str, Any]:
    from tasks.hw import cpu_label
    out = cfg.out
    p = cfg.preset_values()
    N = p["train_len"]
    table = [{"attention": k, **{c: _r(e[c]) for c in ("length_multiple", "length", "bpc", "accuracy", "tokens")}}
             for k, r in runs.items() for e in r["eval"]]
    common = {"flow": FLOW, "preset": cfg.preset, "config": cfg.model_dump(mode="json"), "attentions": list(runs),
              "train_len": N, "lengths": [L for _, L in cfg.lengths()], "eval_tokens": p["eval_tokens"],
              "corpus": {"source": corpus_m["source"], "seed": corpus_m["seed"],
                         **{f.removesuffix(".npy"): {"bytes": e["rows"], "documents": e["documents"]}
                            for f, e in corpus_m["files"].items()}},
              "table": table, "cpu": cpu_label(), "wall_s": round(time.perf_counter() - t0, 1)}
    for kind, r in runs.items():
        write_json_atomic(out / kind / "metrics.json", r)
    metrics = {**runs[cfg.kinds()[0]], **common} if len(runs) == 1 else {"runs": runs, **common}
    write_json_atomic(out / "metrics.json", metrics)
    plot_lengths(runs, N, out / "long_context.png")
    reporting.table("long-context-eval", table,
                    f"bits per byte and next-byte accuracy on unseen validation text, trained at N={N}")
    plan = next(iter(runs.values()))["eval_text"]
    wide = [{"attention": k, **{f"{e['length_multiple']}N acc": f"{e['accuracy']:.4f}" for e in r["eval"]},
             **{f"{e['length_multiple']}N bpc": f"{e['bpc']:.3f}" for e in r["eval"]}} for k, r in runs.items()]
    train_rows = [{"attention": k, "run": r["run_name"], "params": f"{r['n_params']:,}", "steps": r["train_steps"],
                   "final_loss": _r(r["final_loss"]), "tokens/s": f"{r['tokens_per_s']:,.0f}",
                   "train_wall_s": _r(r["train_wall_s"], 1), "trained now": r["trained_this_run"],
                   "window": r["window"] or ""} for k, r in runs.items()]
    lines = [
        f"# long-context-lm — {cfg.preset}", "",
        f"Byte-level LM ({p['n_layer']} layers, d_model {p['d_model']}) trained at **N = {N}**, evaluated at "
        f"{', '.join(f'{m}N' for m in MULTIPLES)} on the validation split of `{corpus_m['source']}` (documents "
        f"never trained on): {plan['predicted_tokens']:,} predicted bytes per length, the same bytes at every "
        f"length and for every kind (non-overlapping windows, no repeats). bpc = bits per byte.", "",
        "## Accuracy and bpc by length", reporting.md_table(wide),
        "## Training", reporting.md_table(train_rows),
        f"CPU {common['cpu']}; {cfg.num_workers} Ray Train workers x {p['micro_batch']} rows of {N}.", "",
    ]
    atomic_write_text(out / "report.md", "\n".join(lines + ["![accuracy and bpc against length](long_context.png)", ""]))
    write_manifest(out, ["metrics.json", "long_context.png", "report.md"] + [f"{k}/metrics.json" for k in runs],
                   flow=FLOW, run_names={k: r["run_name"] for k, r in runs.items()})
    png = base64.b64encode((out / "long_context.png").read_bytes()).decode("ascii")
    reporting.markdown("long-context-report", "\n".join(
        lines + [f"![accuracy and bpc against length](data:image/png;base64,{png})", ""]),
        "Accuracy and bits per byte against evaluation length, per attention kind")
    return metrics


# ------------------------------------------------------------------------------ flow
@flow(name=FLOW, log_prints=True)
def long_context_lm(config: LongContextConfig) -> dict[str, Any]:
    """Corpus -> per kind: train at N (Ray Train + DeepSpeed) -> evaluate at N..16N -> report."""
    logger = get_run_logger()
    t0 = time.perf_counter()
    config.out.mkdir(parents=True, exist_ok=True)
    corpus_m = corpus_task(config)
    runs: dict[str, dict] = {}
    for kind in config.kinds():
        manifest = config.out / kind / "model" / "manifest.json"
        before = manifest.stat().st_mtime_ns if manifest.is_file() else None
        model_m = train_step.with_options(name=f"train-lm-{kind}")(
            train_spec(config, kind), str((config.out / "ray").resolve()), str(config.out / kind / "model"),
            config.ray_address, config.max_failures)
        trained = (manifest.stat().st_mtime_ns if manifest.is_file() else None) != before
        ev = evaluate_task.with_options(name=f"evaluate-lm-{kind}")(config, kind)
        runs[kind] = run_metrics(config, kind, model_m, ev, trained)
        logger.info("%s: %s %s", FLOW, kind, ", ".join(
            f"{e['length_multiple']}N acc {e['accuracy']:.3f} bpc {e['bpc']:.3f}" for e in ev["eval"]))
    metrics = report_task(config, corpus_m, runs, t0)
    logger.info("%s: %d kind(s) x %d lengths -> %s", FLOW, len(runs), len(MULTIPLES), config.out)
    return metrics


# ------------------------------------------------------------------------------ CLI
def parse_args(argv: list[str] | None = None) -> LongContextConfig:
    ap = argparse.ArgumentParser(prog="python -m flows.long_context_lm", description=__doc__.split("\n")[0])
    ap.add_argument("--attention", help=f"attention kind to train: one of {', '.join(PATTERNS)} (default hwfa)")
    ap.add_argument("--compare", help="comma-separated kinds to train and compare, e.g. softmax,alibi,hwfa")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--out", type=Path, help="output directory (default runs/long-context-lm/PRESET)")
    ap.add_argument("--corpus", type=Path, help="a UTF-8 text file or a .parquet file (default: the stdlib .py files)")
    ap.add_argument("--column", default="text", help="text column of a Parquet corpus (default text)")
    ap.add_argument("--steps", type=int, help="training steps (preset default)")
    ap.add_argument("--eval-tokens", type=int, help="predicted tokens per length (preset default 65536)")
    ap.add_argument("--ray-address", help="Ray cluster address (default: local Ray, or RAY_ADDRESS)")
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--attention-options", type=json_object, default={},
                    help='per kind, options over the preset\'s, as JSON: \'{"vq": {"exact_window": true}}\'')
    a = ap.parse_args(argv)
    given = {k: v for k, v in dict(attention=a.attention, compare=a.compare, corpus=a.corpus, steps=a.steps,
                                   eval_tokens=a.eval_tokens, ray_address=a.ray_address).items() if v is not None}
    return LongContextConfig(preset=a.preset, out=a.out or Path("runs/long-context-lm") / a.preset, column=a.column,
                             num_workers=a.num_workers, seed=a.seed, attention_options=a.attention_options, **given)


def _stop_ray() -> None:
    import ray
    if ray.is_initialized():
        ray.shutdown()


def _summary(cfg: LongContextConfig, m: dict) -> str:
    runs = m.get("runs") or {m["attention"]: m}
    parts = [f"{k}: acc " + "/".join(f"{e['accuracy']:.3f}" for e in r["eval"]) for k, r in runs.items()]
    return (f"{FLOW}: accuracy at {'/'.join(f'{x}N' for x in MULTIPLES)} (N={m['train_len']}): "
            + "; ".join(parts) + f"; wrote {cfg.out / 'metrics.json'}")


def main(argv: list[str] | None = None) -> int:
    return run_cli(FLOW, parse_args, long_context_lm, argv, _summary, cleanup=_stop_ray)


if __name__ == "__main__":
    sys.exit(main())
