"""The vae-density flow's computations, free of Prefect: the test-split bounds (ELBO and IWAE_K
for every K, per example, cached by content), the exact baselines, and the bounds plot.

Every NLL here is a test negative log-likelihood in nats per example: lower is better."""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from tasks.storage import atomic_path, reusable, write_json_atomic, write_manifest

ELBO_SAMPLES = 100           # samples averaged into the (precise) Monte Carlo ELBO
EVAL_SCHEMA = 1


def _tensor(a, likelihood: str):
    import torch
    return torch.as_tensor(a).long() if likelihood == "categorical" else torch.as_tensor(a).float()


def _se_mean(v) -> float:
    import numpy as np
    v = np.asarray(v, dtype=np.float64)
    return float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else math.nan


def evaluate(model_dir: Path, data_dir: Path, out_dir: Path, ks: list[int], seed: int,
             progress=None) -> dict[str, Any]:
    """IWAE_K bounds and the ELBO per test example; cached in ``out_dir`` by (model, data, K, seed)."""
    import numpy as np
    import torch

    from models.vae import elbo, log_px
    from tasks.storage import read_manifest
    from tasks.train import load_trained_model
    from tasks.vae_data import load_vae_data
    model_m, data_m = read_manifest(model_dir), read_manifest(data_dir)
    key = hashlib.sha256(json.dumps({"model": model_m["files"]["model.pt"]["sha256"],
                                     "data": data_m["files"]["prepared.npz"]["sha256"], "ks": ks,
                                     "elbo_samples": ELBO_SAMPLES, "seed": seed}, sort_keys=True).encode()).hexdigest()
    if (m := reusable(out_dir, schema_version=EVAL_SCHEMA, inputs_sha256=key)) is not None:
        return {**m["result"], "reused": True}
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    data = load_vae_data(data_dir)
    model = load_trained_model(model_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    x = _tensor(data.test, data.likelihood).to(device)
    batch = 1000 if device.type == "cuda" else 100
    chunk = 50 if device.type == "cuda" else None
    arrays: dict[str, np.ndarray] = {}
    t0 = time.perf_counter()
    timings = {}
    e, e_se = elbo(model, x, K=ELBO_SAMPLES, seed=seed, batch=batch, chunk=chunk)
    arrays["elbo"], arrays["elbo_se"] = e.numpy(), e_se.numpy()
    for i, k in enumerate(ks):
        t1 = time.perf_counter()
        est, se = log_px(model, x, K=k, seed=seed, batch=batch, chunk=chunk)
        arrays[f"log_px_{k}"], arrays[f"se_{k}"] = est.numpy(), se.numpy()
        timings[str(k)] = round(time.perf_counter() - t1, 2)
        if progress:
            progress(i + 1, len(ks), k, timings[str(k)])
    n = len(data.test)
    result = {
        "n_test": n, "x_dim": data.x_dim, "device": device.type,
        "elbo_nats": float(-arrays["elbo"].mean()), "elbo_stderr_nats": _se_mean(arrays["elbo"]),
        "iwae_nats": {str(k): float(-arrays[f"log_px_{k}"].mean()) for k in ks},
        "iwae_stderr_nats": {str(k): _se_mean(arrays[f"log_px_{k}"]) for k in ks},
        "iwae_mc_stderr_nats": {str(k): (float(np.sqrt(np.nansum(arrays[f"se_{k}"] ** 2)) / n) if k > 1 else None)
                                for k in ks},
        "eval_wall_s": round(time.perf_counter() - t0, 2), "eval_wall_s_by_k": timings,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "manifest.json").unlink(missing_ok=True)
    with atomic_path(out_dir / "per_example.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    write_manifest(out_dir, ["per_example.npz"], schema_version=EVAL_SCHEMA, inputs_sha256=key, result=result)
    return {**result, "reused": False}



def _row(name: str, lp, x_dim: int, **extra) -> dict[str, Any]:
    import numpy as np
    lp = np.asarray(lp, dtype=np.float64)
    nll = float(-lp.mean())
    return {"name": name, "nll_nats": nll, "stderr_nats": _se_mean(lp), "bits_per_dim": nll / (x_dim * math.log(2)),
            "exact": True, **extra}


def baselines(data_dir: Path, out_dir: Path, components: int, iters: int, z_dim: int, seed: int) -> dict[str, Any]:
    """Exact test NLLs of baselines fitted on train; cached in ``out_dir``."""
    import torch

    from tasks.storage import read_manifest
    from tasks.vae_data import load_vae_data
    data_m = read_manifest(data_dir)
    key = hashlib.sha256(json.dumps({"data": data_m["files"]["prepared.npz"]["sha256"], "components": components,
                                     "iters": iters, "z_dim": z_dim, "seed": seed}, sort_keys=True).encode()).hexdigest()
    if (m := reusable(out_dir, schema_version=EVAL_SCHEMA, inputs_sha256=key)) is not None:
        return m["result"]
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    data = load_vae_data(data_dir)
    D = data.x_dim
    rows: dict[str, dict] = {}
    if data.likelihood == "gaussian":
        from models.ppca import fit_ppca
        tr = torch.as_tensor(data.train, dtype=torch.float64)
        te = torch.as_tensor(data.test, dtype=torch.float64)
        t0 = time.perf_counter()
        mu, var = tr.mean(0), tr.var(0, unbiased=False).clamp_min(1e-12)
        lp = -0.5 * (math.log(2 * math.pi) + torch.log(var) + (te - mu) ** 2 / var).sum(1)
        rows["independent_gaussian"] = _row("independent Gaussian (per-dim ML mean/variance)", lp.numpy(), D,
                                            fit_s=round(time.perf_counter() - t0, 3))
        if D > 1:
            dz = min(z_dim, D - 1)
            t0 = time.perf_counter()
            lp = fit_ppca(tr, dz).log_px(te)
            rows["ppca"] = _row(f"PPCA (ML, closed form, {dz} latent dims)", lp.numpy(), D, z_dim=dz,
                                fit_s=round(time.perf_counter() - t0, 3))
    else:
        from models.density_baselines import IndependentPixels, fit_mixture
        L = data.n_levels
        t0 = time.perf_counter()
        ip = IndependentPixels.fit(data.train, n_levels=L, alpha=1.0)
        rows["independent_pixels"] = _row(f"independent pixels ({'Bernoulli' if L == 2 else f'{L}-level categorical'}, "
                                          f"add-one smoothing)", ip.log_prob(data.test).numpy(), D,
                                          fit_s=round(time.perf_counter() - t0, 3))
        t0 = time.perf_counter()
        mix = fit_mixture(data.train, components, n_levels=L, n_iter=iters, seed=seed)
        rows["mixture"] = _row(f"mixture of {components} {'Bernoullis' if L == 2 else 'categoricals'} (EM, MAP)",
                               mix.log_prob(data.test).numpy(), D, components=components,
                               iterations=len(mix.history) - 1, max_iterations=iters,
                               converged=len(mix.history) - 1 < iters,
                               train_nll_nats=-mix.history[-1]["log_lik"], fit_s=round(time.perf_counter() - t0, 2))
    result = {"baselines": rows, "split": "test", "n_test": int(len(data.test))}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "manifest.json").unlink(missing_ok=True)
    write_json_atomic(out_dir / "baselines.json", result)
    write_manifest(out_dir, ["baselines.json"], schema_version=EVAL_SCHEMA, inputs_sha256=key, result=result)
    return result



def plot_bounds(metrics: dict[str, Any], path: Path) -> None:
    """-IWAE_K against K (log x, error bars 2 x importance-sampling stderr), the -ELBO and the baselines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ks = [int(k) for k in metrics["iwae_nats"]]
    ys = [metrics["iwae_nats"][str(k)] for k in ks]
    err = [2 * (metrics["iwae_mc_stderr_nats"][str(k)] or 0.0) for k in ks]
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=90)
    ax.errorbar(ks, ys, yerr=err, fmt="o-", color="C0", capsize=3, label="VAE: −IWAE_K bound (±2 MC s.e.)")
    ax.axhline(metrics["elbo_nats"], color="C0", ls=":", lw=1.2, label=f"VAE: −ELBO ({metrics['elbo_nats']:.2f})")
    for i, (name, b) in enumerate(metrics["baselines"].items()):
        ax.axhline(b["nll_nats"], color=f"C{i + 1}", ls="--", lw=1.2, label=f"{name} ({b['nll_nats']:.2f}, exact)")
    ax.set_xscale("log")
    ax.set(xlabel="importance samples K", ylabel="test NLL (nats / example), lower is better",
           title=f"vae-density {metrics['preset']}: {metrics['n_test']} test examples, "
                 f"data s.e. of the mean {metrics['stderr_nats']:.2f}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
