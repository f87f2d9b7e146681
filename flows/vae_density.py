"""Flow "vae-density": a VAE / IWAE density model, its test NLL by importance sampling, and exact baselines.

    python -m flows.vae_density --preset tiny|base|gpu --out DIR [--data PATH --likelihood L]
                                [--samples M] [--ray-address ADDR] [--num-workers N] [--seed S] [--steps N]
                                [--train-minutes T]

Stages (each caches by content, so a re-run with the same inputs trains nothing):

1. prepare the data (tasks/vae_data.py): ``--data`` an ``.npz`` with arrays train, test (and
   optionally valid; without it a seeded slice of train) or a Parquet file with a ``split``
   column; no ``--data``: scikit-learn's 8x8 digits (17 grey levels, categorical likelihood).
   The data are used as given (no standardisation; ``gaussian`` for continuous vectors).
2. train the VAE with the M-sample IWAE objective (M = ``--samples``; 1 is the plain VAE) on
   Ray Train + DeepSpeed (tasks.steps.train_step, task ``vae``), early stopping on the
   validation split's IWAE_M bound; the exported model is the best validation checkpoint.
   ``--train-minutes T``: the trainer re-plans its step count (at most ``--steps``) as it runs,
   so the loop and its LR schedule end inside T minutes (tasks/train_budget.py).
3. evaluate on the test split: the ELBO and the IWAE_K bounds for K = 1, 5, 50, 500, 5000
   (models/vae.py ``log_px``; sample k of every K is the same draw, so the bounds are nested).
4. baselines on the same split, in the same run: independent pixels (exact) and a mixture of
   Bernoullis / categoricals fitted by EM (models/density_baselines.py); for Gaussian data an
   independent Gaussian and maximum-likelihood PPCA (closed form).
5. OUT/metrics.json, OUT/bounds.png (log-x), OUT/report.md and OUT/manifest.json (last); Prefect
   artifacts ``vae-density-bounds`` (table), ``vae-density-baselines`` (table) and
   ``vae-density-report`` (markdown, the plot inline).

Every NLL in metrics.json is a test negative log-likelihood in nats per example: lower is better.
"""
from __future__ import annotations

import flows  # noqa: F401  (embedded defaults before prefect and ray are imported)

import argparse
import base64
import math
import os
import sys
import time
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from flows._cli import run_cli
from tasks import reporting
from tasks.kgclue_data import DataQualityError
from tasks.steps import train_step
from tasks.storage import atomic_write_text, write_json_atomic, write_manifest
from tasks.vae_eval import ELBO_SAMPLES, baselines, evaluate, plot_bounds  # noqa: F401 (re-exported)

FLOW = "vae-density"
KS = (1, 5, 50, 500, 5000)   # importance samples of the reported IWAE_K bounds

# One table: model size, the training bound's M, the schedule, early stopping, evaluation and baselines.
PRESETS: dict[str, dict[str, Any]] = {
    # sklearn digits (1,294 train rows after the valid slice; 64 pixels x 17 levels): 64-unit MLP,
    # 400 steps of 2 x 32 rows (~20 epochs): ~1-3 min of training on 2 busy CPU cores. K is capped
    # at 500 (metrics' k_note says so): K = 5000 on the 359 test digits took 234 s on a loaded
    # 2-core box (the 17-level softmax over 64 pixels per latent), K = 500 ~17 s; --k-max 5000 lifts it.
    "tiny": dict(hidden=(64,), z_dim=8, samples=5, steps=400, micro_batch=32, lr=3e-3, warmup=20,
                 val_every=50, patience=4, val_rows=None, k_max=500, mixture_components=10, mixture_iters=60,
                 zero_stage=1, gpu=False),
    # The IWAE paper's one-stochastic-layer model (784-200-200-50, tanh) for binarised MNIST
    # (--data ../shared/data/binarized-mnist/binarized_mnist.npz). Sized for <= 30 wall-minutes of
    # training on a 2-core CPU through this trainer (2 workers x 1 thread, DeepSpeed on gloo).
    # The step is overhead-bound (all-reduce, optimizer, engine): on the AVX2 EPYC of 2026-12-07
    # 2 x 100 rows cost 1.27x the time of 2 x 50 (bench/results/trainer-step.json), so the preset takes 2 x 100 rows at lr 2e-3
    # (a one-process probe at 20,000 equal steps, plain VAE with the analytic KL, valid NLL at
    # K = 500: batch 100 / lr 1e-3 97.96, batch 200 / lr 1e-3 96.09, batch 200 / lr 2e-3 93.31,
    # batch 200 / lr 3e-3 93.03, batch 400 / lr 2e-3 92.78). Until then: 2 x 50 rows, lr 1e-3
    # (60,000 steps on an Intel Xeon in 1,220 s, M = 5). With --train-minutes the trainer plans
    # the step count (at most `steps`). Validation (IWAE_M on 5,000 valid images, noise fixed by
    # the seed) every 1,000 steps, patience 10. NOT in the training time: the evaluation (ELBO_100
    # + K = 1..5000 on the 10,000 test images) and the EM mixture baseline.
    "base": dict(hidden=(200, 200), z_dim=50, samples=5, steps=60_000, micro_batch=100, lr=2e-3, warmup=200,
                 val_every=1_000, patience=10, val_rows=5_000, k_max=5000, mixture_components=50,
                 mixture_iters=100, zero_stage=1, gpu=False),
    # The IWAE paper's schedule (Burda et al. 2015, sec. 5): k = 50, batch 20, 3,280 epochs of 50,000
    # (8.2M steps), on GPU workers. The paper decays the learning rate as 1e-3 * 10^(-i/7) over
    # stages of 3^i epochs; this trainer decays it linearly, so the match is approximate.
    "gpu": dict(hidden=(200, 200), z_dim=50, samples=50, steps=8_200_000, micro_batch=20, lr=1e-3, warmup=1_000,
                val_every=25_000, patience=20, val_rows=None, k_max=5000, mixture_components=100,
                mixture_iters=200, zero_stage=1, gpu=True),
}
UNITS = {
    "elbo_nats": "negative ELBO on the test split, nats per example (an upper bound on the NLL); lower is better",
    "iwae_nats": "negative IWAE_K bounds, K -> nats per example: estimates of the test NLL that tighten "
                 "(decrease) towards it as K grows; lower is better",
    "nll_nats": "the test NLL estimate: iwae_nats at the largest K (nll_k, 5000 unless capped); lower is better",
    "bits_per_dim": "nll_nats / (x_dim ln 2)" ,
    "stderr_nats": "standard error of the test-set mean over examples (data noise), at nll_k",
    "mc_stderr_nats": "importance-sampling noise of the test-set mean: sqrt(sum of per-example delta-method "
                      "variances) / n_test, at nll_k",
    "baselines": "exact test NLLs (nats per example) of simple models fitted on train; lower is better",
}


class VAEDataError(DataQualityError):
    """The --data file (or the data it holds) cannot be used; the message names it and the fix.

    A subclass of DataQualityError so the CLI (flows/_cli.KNOWN_ERRORS) prints it as one line."""


class VaeDensityConfig(BaseModel):
    """The flow's parameters; fields left None take the preset's value (:meth:`preset_values`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    preset: Literal["tiny", "base", "gpu"] = "tiny"
    out: Path = Path("runs/vae-density")
    data: Path | None = Field(None, description=".npz (train, test[, valid]) or .parquet with a split column; "
                                                "None: scikit-learn's digits")
    likelihood: Literal["bernoulli", "categorical", "gaussian"] | None = Field(
        None, description="None: categorical for the digits, bernoulli for a file")
    samples: int | None = Field(None, ge=1, le=5000, description="M of the training bound (1: VAE, >1: IWAE)")
    steps: int | None = Field(None, ge=1, le=100_000_000, description="override the preset's training steps")
    kl: Literal["auto", "mc", "analytic"] = Field(
        "auto", description="M = 1: the KL term in closed form ('analytic', Kingma & Welling's estimator B) or "
                            "inside the sampled log-weight ('mc'); auto = analytic for M = 1, mc for M > 1 (IWAE "
                            "needs the log-weights)")
    train_minutes: float | None = Field(
        None, gt=0, le=1_000_000, description="a budget for the training loop, minutes: the trainer re-plans the "
                                               "step count (at most `steps`) so that its LR schedule ends inside it")
    micro_batch: int | None = Field(None, ge=1, le=65536, description="rows per worker per step")
    z_dim: int | None = Field(None, ge=1, le=4096, description="latent dimension (default: the preset's)")
    k_max: int | None = Field(None, ge=1, le=5000, description="largest K evaluated (default 5000)")
    mixture_components: int | None = Field(None, ge=1, le=2000, description="EM mixture baseline's components")
    ray_address: str | None = Field(None, description="Ray cluster address; None: local Ray (or RAY_ADDRESS)")
    num_workers: int = Field(2, ge=1, le=1024)
    use_gpu: bool = False
    seed: int = Field(0, ge=0, le=2**31 - 1)
    max_failures: int = Field(2, ge=0, le=100)

    @field_validator("ray_address")
    @classmethod
    def _ray_answers(cls, v: str | None) -> str | None:
        from flows.kgclue_config import check_ray_address
        return check_ray_address(v)

    @model_validator(mode="after")
    def _placement(self) -> "VaeDensityConfig":
        if PRESETS[self.preset]["gpu"] and not self.use_gpu:
            raise ValueError(f"preset {self.preset!r} trains on GPU workers: add --use-gpu (and --ray-address of a "
                             f"GPU cluster when this machine has no GPU)")
        if self.use_gpu and self.ray_address is None and not os.environ.get("RAY_ADDRESS"):
            import torch
            if not torch.cuda.is_available():
                raise ValueError("use_gpu=True but this machine has no CUDA GPU and no ray_address of a GPU cluster "
                                 "is given; pass --ray-address, or drop --use-gpu (preset tiny or base)")
        if (self.ray_address is None and not os.environ.get("RAY_ADDRESS") and not self.use_gpu
                and self.num_workers > (os.cpu_count() or 1)):
            raise ValueError(f"num_workers={self.num_workers} but a local Ray has {os.cpu_count()} CPU(s): the "
                             f"training would wait for CPUs forever; lower --num-workers or give --ray-address")
        return self

    @model_validator(mode="after")
    def _kl(self) -> "VaeDensityConfig":
        if self.kl == "analytic" and self.preset_values()["samples"] != 1:
            raise ValueError(f"kl='analytic' needs --samples 1 (got {self.preset_values()['samples']}): the analytic "
                             "KL only applies to the M = 1 ELBO; use --kl mc or auto for the IWAE bound")
        return self

    def kl_estimator(self) -> str:
        """The VAE's ``kl`` option: ``auto`` resolves to analytic for M = 1, mc otherwise."""
        if self.kl != "auto":
            return self.kl
        return "analytic" if self.preset_values()["samples"] == 1 else "mc"

    def preset_values(self) -> dict[str, Any]:
        p = dict(PRESETS[self.preset])
        for name in ("samples", "steps", "micro_batch", "z_dim", "k_max", "mixture_components"):
            if getattr(self, name) is not None:
                p[name] = getattr(self, name)
        return p

    def ks(self) -> list[int]:
        """The K evaluated: KS up to k_max (k_max itself included when it is not one of KS)."""
        k_max = self.preset_values()["k_max"]
        return sorted({k for k in KS if k <= k_max} | {k_max})


# ------------------------------------------------------------------------------ data
def prepare(cfg: VaeDensityConfig) -> dict[str, Any]:
    """tasks.vae_data.prepare_vae_data into OUT/data (reused when complete); a bad file raises
    :class:`VAEDataError` naming it and the fix."""
    from tasks.vae_data import prepare_vae_data
    where = f"--data {cfg.data}" if cfg.data is not None else "the digits"
    try:
        return prepare_vae_data(cfg.out / "data", source=cfg.data, likelihood=cfg.likelihood, seed=cfg.seed)
    except VAEDataError:
        raise
    except ValueError as e:   # tasks.vae_data's messages name the file, array/column and fix
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise VAEDataError(msg if cfg.data is None or str(cfg.data) in msg else f"{cfg.data}: {msg}") from None
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        kind = "a .npz (numpy.savez)" if cfg.data is not None and cfg.data.suffix == ".npz" else "a Parquet file"
        raise VAEDataError(f"{where}: cannot be read as {kind} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
                           f"Fix: write it with numpy.savez(path, train=..., test=...) or pyarrow.parquet "
                           f"with a split column") from None
    except Exception as e:  # noqa: BLE001 - pyarrow / numpy decoding errors of a foreign file
        if type(e).__module__.split(".")[0] not in ("pyarrow", "numpy"):
            raise
        raise VAEDataError(f"{where}: unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
                           f"Fix: pass an .npz with arrays train/test or a .parquet with a split column") from None


@task(name="vae-prepare-data", cache_policy=NO_CACHE)
def prepare_task(cfg: VaeDensityConfig) -> dict[str, Any]:
    m = prepare(cfg)
    reporting.table("vae-density-data", [{"split": s, "rows": n} for s, n in m["files"]["prepared.npz"]["rows"].items()],
                    f"{m['source']}: {m['likelihood']} likelihood, {m['x_dim']} dims, valid from {m['valid_from']}")
    return m


# ------------------------------------------------------------------------------ training
def train_spec(cfg: VaeDensityConfig) -> dict[str, Any]:
    """The trainer's spec: identity = the prepared data's content (its manifest hashes) + these fields."""
    from tasks.train import TrainSpec
    p = cfg.preset_values()
    data = {"val_rows": p["val_rows"]} if p["val_rows"] else {}
    spec = TrainSpec(task="vae", data_dir=str((cfg.out / "data").resolve()), data=data,
                     model={"hidden": list(p["hidden"]), "z_dim": p["z_dim"], "samples": p["samples"],
                            "activation": "tanh", "kl": cfg.kl_estimator()},
                     steps=p["steps"], micro_batch=p["micro_batch"], lr=p["lr"], warmup=p["warmup"],
                     weight_decay=0.0, zero_stage=p["zero_stage"], num_workers=cfg.num_workers,
                     use_gpu=cfg.use_gpu, bf16=False, seed=cfg.seed,
                     checkpoint_every=max(50, min(p["steps"], 10 * p["val_every"]) // 2),
                     val_every=min(p["val_every"], p["steps"]), patience=p["patience"],
                     max_train_s=60.0 * cfg.train_minutes if cfg.train_minutes else 0.0)
    return asdict(spec)


# ------------------------------------------------------------------------------ evaluation
@task(name="vae-evaluate", cache_policy=NO_CACHE)
def evaluate_task(cfg: VaeDensityConfig) -> dict[str, Any]:
    logger = get_run_logger()
    pid = reporting.progress("vae-density-evaluate", 0.0, f"IWAE bounds for K = {cfg.ks()}")

    def progress(done: int, total: int, k: int, s: float) -> None:
        logger.info("vae-evaluate: K=%d in %.1fs", k, s)
        reporting.update_progress(pid, 100.0 * done / total, f"K = {k} done ({done}/{total})")

    r = evaluate(cfg.out / "model", cfg.out / "data", cfg.out / "eval", cfg.ks(), cfg.seed, progress)
    reporting.update_progress(pid, 100.0, "done" + (" (reused)" if r["reused"] else ""))
    return r


# ------------------------------------------------------------------------------ baselines
@task(name="vae-baselines", cache_policy=NO_CACHE)
def baselines_task(cfg: VaeDensityConfig) -> dict[str, Any]:
    p = cfg.preset_values()
    r = baselines(cfg.out / "data", cfg.out / "baselines", p["mixture_components"], p["mixture_iters"],
                  p["z_dim"], cfg.seed)
    get_run_logger().info("vae-baselines: %s", {k: round(v["nll_nats"], 3) for k, v in r["baselines"].items()})
    return r


# ------------------------------------------------------------------------------ report
def _r(v, nd=3):
    return round(v, nd) if isinstance(v, float) else v


def report(cfg: VaeDensityConfig, data_m: dict, model_m: dict, ev: dict, base: dict, trained: bool,
           t0: float) -> dict[str, Any]:
    from tasks.hw import cpu_label
    out = cfg.out
    p = cfg.preset_values()
    ks = cfg.ks()
    kn = str(ks[-1])
    x_dim = ev["x_dim"]
    val = model_m.get("validations") or []
    best = min(val, key=lambda v: v["val_loss"]) if val else None
    metrics = {
        "flow": FLOW, "preset": cfg.preset, "config": cfg.model_dump(mode="json"), "units": UNITS,
        "data": {"source": data_m["source"], "likelihood": data_m["likelihood"], "n_levels": data_m["n_levels"],
                 "x_dim": data_m["x_dim"], "rows": data_m["files"]["prepared.npz"]["rows"],
                 "valid_from": data_m["valid_from"], "inputs_sha256": data_m["inputs_sha256"]},
        "elbo_nats": ev["elbo_nats"], "elbo_stderr_nats": ev["elbo_stderr_nats"], "elbo_samples": ELBO_SAMPLES,
        "iwae_nats": ev["iwae_nats"], "iwae_stderr_nats": ev["iwae_stderr_nats"],
        "iwae_mc_stderr_nats": ev["iwae_mc_stderr_nats"],
        "ks": ks, "nll_k": ks[-1],
        "k_note": None if ks[-1] >= 5000 else f"K capped at {ks[-1]} (k_max); nll_nats is the K={ks[-1]} estimate, "
                                               f"a looser upper bound than K=5000",
        "nll_nats": ev["iwae_nats"][kn], "bits_per_dim": ev["iwae_nats"][kn] / (x_dim * math.log(2)),
        "stderr_nats": ev["iwae_stderr_nats"][kn], "mc_stderr_nats": ev["iwae_mc_stderr_nats"][kn],
        "n_test": ev["n_test"], "x_dim": x_dim,
        "baselines": base["baselines"],
        "train": {"run_name": model_m["run_name"], "samples": p["samples"], "steps_planned": p["steps"],
                  "steps": model_m["steps"], "stopped_early": model_m["steps"] < p["steps"],
                  "train_budget_s": 60.0 * cfg.train_minutes if cfg.train_minutes else None,
                  "train_loop_s": model_m.get("train_loop_s"),
                  "best_val_step": best["step"] if best else None,
                  "best_val_loss_nats": best["val_loss"] if best else None,
                  "final_loss": model_m["final_loss"], "items_per_s": model_m["tokens_per_s"],
                  "train_wall_s": model_m["train_wall_s"], "trained_this_run": trained,
                  "num_workers": cfg.num_workers, "micro_batch": p["micro_batch"],
                  "model": (model_m.get("spec") or {}).get("model")},
        "run_name": model_m["run_name"], "train_wall_s": model_m["train_wall_s"],
        "eval_wall_s": ev["eval_wall_s"], "eval_reused": ev["reused"], "eval_device": ev["device"],
        "cpu": cpu_label(), "accelerator": "cuda" if cfg.use_gpu else "cpu",
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    write_json_atomic(out / "metrics.json", metrics)
    plot_bounds(metrics, out / "bounds.png")
    bound_rows = [{"bound": "ELBO", "K": ELBO_SAMPLES, "nll_nats": _r(ev["elbo_nats"]),
                   "stderr_nats": _r(ev["elbo_stderr_nats"]), "mc_stderr_nats": "",
                   "bits_per_dim": _r(ev["elbo_nats"] / (x_dim * math.log(2)), 4)}]
    bound_rows += [{"bound": f"IWAE_{k}", "K": k, "nll_nats": _r(ev["iwae_nats"][str(k)]),
                    "stderr_nats": _r(ev["iwae_stderr_nats"][str(k)]),
                    "mc_stderr_nats": _r(ev["iwae_mc_stderr_nats"][str(k)], 4) if k > 1 else "",
                    "bits_per_dim": _r(ev["iwae_nats"][str(k)] / (x_dim * math.log(2)), 4)} for k in ks]
    base_rows = [{"baseline": k, "model": b["name"], "nll_nats": _r(b["nll_nats"]), "stderr_nats": _r(b["stderr_nats"]),
                  "bits_per_dim": _r(b["bits_per_dim"], 4)} for k, b in base["baselines"].items()]
    reporting.table("vae-density-bounds", bound_rows,
                    f"Test NLL bounds (nats/example, lower is better) on {ev['n_test']} test examples")
    reporting.table("vae-density-baselines", base_rows, "Exact test NLLs of the baselines (same split)")
    t = metrics["train"]
    lines = [
        f"# vae-density — {cfg.preset}", "",
        f"**Test NLL {metrics['nll_nats']:.3f} nats** (K = {ks[-1]}; ± {metrics['stderr_nats']:.3f} s.e. over "
        f"{metrics['n_test']} examples, ± {metrics['mc_stderr_nats'] or 0:.4f} importance-sampling s.e.), "
        f"{metrics['bits_per_dim']:.4f} bits/dim; −ELBO {metrics['elbo_nats']:.3f}. Lower is better.",
        *(["", f"_{metrics['k_note']}_"] if metrics["k_note"] else []), "",
        f"Data: `{data_m['source']}`, {data_m['likelihood']} likelihood, {x_dim} dims, rows "
        f"{data_m['files']['prepared.npz']['rows']}.", "",
        f"Training: run `{t['run_name']}`, M = {t['samples']} ({'VAE' if t['samples'] == 1 else 'IWAE'} bound), "
        f"{t['steps']}/{t['steps_planned']} steps{' (early stop or budget)' if t['stopped_early'] else ''}, best validation "
        f"at step {t['best_val_step']}, {t['items_per_s']:,.0f} items/s, {t['train_wall_s']:.0f} s"
        f"{'' if trained else ' (reused: nothing trained in this run)'}; CPU {metrics['cpu']}.", "",
        "## Bounds", reporting.md_table(bound_rows),
        "## Baselines (exact)", reporting.md_table(base_rows),
    ]
    md_file = "\n".join(lines + ["![bounds against K](bounds.png)", ""])
    atomic_write_text(out / "report.md", md_file)
    write_manifest(out, ["metrics.json", "bounds.png", "report.md"], flow=FLOW, run_name=model_m["run_name"])
    png = base64.b64encode((out / "bounds.png").read_bytes()).decode("ascii")
    reporting.markdown("vae-density-report", "\n".join(lines + [f"![bounds against K](data:image/png;base64,{png})", ""]),
                       "Test NLL bounds against K, baselines, training")
    return metrics


@flow(name=FLOW, log_prints=True)
def vae_density(config: VaeDensityConfig) -> dict[str, Any]:
    """Prepare -> train (Ray Train + DeepSpeed, IWAE_M) -> bounds for K up to 5000 -> baselines -> report."""
    logger = get_run_logger()
    t0 = time.perf_counter()
    config.out.mkdir(parents=True, exist_ok=True)
    data_m = prepare_task(config)
    stamp = lambda: (config.out / "model" / "manifest.json").stat().st_mtime_ns if (  # noqa: E731
        config.out / "model" / "manifest.json").is_file() else None
    before = stamp()
    spec = train_spec(config)
    model_m = train_step.with_options(name="train-vae")(spec, str((config.out / "ray").resolve()),
                                                       str(config.out / "model"), config.ray_address,
                                                       config.max_failures)
    trained = stamp() != before  # train_step rewrote the model's manifest: it trained (or resumed) now
    ev = evaluate_task(config)
    base = baselines_task(config)
    metrics = report(config, data_m, model_m, ev, base, trained, t0)
    logger.info("vae-density: test NLL %.3f nats (K=%d, s.e. %.3f), -ELBO %.3f, baselines %s -> %s",
                metrics["nll_nats"], metrics["nll_k"], metrics["stderr_nats"], metrics["elbo_nats"],
                {k: round(b["nll_nats"], 2) for k, b in metrics["baselines"].items()}, config.out)
    return metrics


# ------------------------------------------------------------------------------ CLI
def parse_args(argv: list[str] | None = None) -> VaeDensityConfig:
    ap = argparse.ArgumentParser(prog="python -m flows.vae_density", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--out", type=Path, help="output directory (default runs/vae-density/PRESET)")
    ap.add_argument("--data", type=Path, help=".npz (train, test[, valid]) or .parquet with a split column "
                                              "(default: scikit-learn's digits)")
    ap.add_argument("--likelihood", choices=("bernoulli", "categorical", "gaussian"),
                    help="default: categorical for the digits, bernoulli for --data")
    ap.add_argument("--samples", type=int, help="M of the training bound: 1 = VAE, >1 = IWAE (preset default)")
    ap.add_argument("--kl", choices=("auto", "mc", "analytic"), default="auto",
                    help="M = 1: KL in closed form (analytic) or sampled in the log-weight (mc); auto: analytic for "
                         "M = 1, mc for IWAE")
    ap.add_argument("--steps", type=int, help="training steps (preset default)")
    ap.add_argument("--train-minutes", type=float,
                    help="a budget for the training loop (start-up and evaluation on top): the step count, at most "
                         "--steps, is re-planned as it runs so the LR schedule ends inside it")
    ap.add_argument("--micro-batch", type=int, help="rows per worker per step (preset default)")
    ap.add_argument("--z-dim", type=int, help="latent dimension (preset default)")
    ap.add_argument("--k-max", type=int, help="largest K evaluated (default: the preset's; tiny 500, others 5000)")
    ap.add_argument("--mixture-components", type=int, help="components of the EM mixture baseline")
    ap.add_argument("--ray-address", help="Ray cluster address (default: local Ray, or RAY_ADDRESS)")
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--use-gpu", action="store_true", help="GPU workers (preset gpu requires it)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    return VaeDensityConfig(preset=a.preset, out=a.out or Path("runs/vae-density") / a.preset, data=a.data,
                            likelihood=a.likelihood, samples=a.samples, kl=a.kl, steps=a.steps, train_minutes=a.train_minutes,
                            micro_batch=a.micro_batch,
                            z_dim=a.z_dim, k_max=a.k_max, mixture_components=a.mixture_components,
                            ray_address=a.ray_address, num_workers=a.num_workers, use_gpu=a.use_gpu, seed=a.seed)


def _run(cfg: VaeDensityConfig) -> dict[str, Any]:
    """The CLI's run: prepare (so validate) the data before Prefect or Ray start, so a bad file
    is refused in a second; the flow's prepare task then reuses the prepared directory."""
    prepare(cfg)
    return vae_density(cfg)


def _stop_ray() -> None:
    import ray
    if ray.is_initialized():
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    return run_cli(FLOW, parse_args, _run, argv, lambda cfg, m: (
        f"{FLOW}: test NLL {m['nll_nats']:.3f} nats (K={m['nll_k']}, s.e. {m['stderr_nats']:.3f}), "
        f"-ELBO {m['elbo_nats']:.3f}, baselines "
        + ", ".join(f"{k} {b['nll_nats']:.2f}" for k, b in m["baselines"].items())
        + f"; wrote {cfg.out / 'metrics.json'}"), cleanup=_stop_ray)


if __name__ == "__main__":
    sys.exit(main())
