"""vae-density end to end: tiny preset on the digits (short Ray Train fit), re-run reuse, a bad
--data file refused by the CLI, and a known density (PPCA data) the estimate must not beat."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from flows.vae_density import VaeDensityConfig, parse_args, train_spec, vae_density
from tests.conftest import ROOT

STEPS = 120  # a few epochs of the digits: enough for ordered bounds, short enough for 2 busy cores


@pytest.fixture(scope="module")
def digits_run(prefect_harness, ray_local, tmp_path_factory):
    cfg = VaeDensityConfig(preset="tiny", out=tmp_path_factory.mktemp("vae-digits"), steps=STEPS)
    return cfg, vae_density(cfg)


def test_metrics_keys_types_and_files(digits_run):
    cfg, m = digits_run
    assert json.loads((cfg.out / "metrics.json").read_text()) == json.loads(json.dumps(m))
    for k in ("elbo_nats", "nll_nats", "bits_per_dim", "stderr_nats", "mc_stderr_nats", "train_wall_s"):
        assert isinstance(m[k], float) and math.isfinite(m[k]), k
    assert isinstance(m["n_test"], int) and m["n_test"] == m["data"]["rows"]["test"] == 359
    assert m["data"]["likelihood"] == "categorical" and m["x_dim"] == 64
    assert set(m["iwae_nats"]) == {"1", "5", "50", "500"} and m["nll_k"] == 500
    assert m["k_note"] and "500" in m["k_note"]  # tiny caps K and says so
    assert m["nll_nats"] == m["iwae_nats"]["500"]
    assert "lower is better" in m["units"]["iwae_nats"]
    assert m["bits_per_dim"] == pytest.approx(m["nll_nats"] / (64 * math.log(2)))
    assert 0 < m["mc_stderr_nats"] < m["stderr_nats"]
    assert set(m["baselines"]) == {"independent_pixels", "mixture"}
    for b in m["baselines"].values():
        assert b["exact"] and b["nll_nats"] > 0 and b["stderr_nats"] > 0
    assert m["baselines"]["mixture"]["components"] == 10
    assert m["train"]["samples"] == 5 and m["train"]["trained_this_run"] and m["train"]["items_per_s"] > 0
    assert m["train"]["steps"] <= STEPS and m["cpu"]
    for f in ("bounds.png", "report.md", "manifest.json", "model/model.pt", "eval/per_example.npz"):
        assert (cfg.out / f).is_file(), f
    assert (cfg.out / "bounds.png").read_bytes()[:4] == b"\x89PNG"


def test_bounds_ordered_in_k(digits_run):
    """-ELBO >= -IWAE_1 ~ ... >= -IWAE_K (nested samples): non-increasing up to a few stderrs."""
    _, m = digits_run
    ks = sorted(int(k) for k in m["iwae_nats"])
    nll = [m["iwae_nats"][str(k)] for k in ks]
    se = [m["iwae_stderr_nats"][str(k)] for k in ks]
    assert m["elbo_nats"] >= nll[-1]
    assert abs(m["elbo_nats"] - nll[0]) < 3 * se[0]            # IWAE_1 is a one-sample ELBO
    for a, b, s in zip(nll, nll[1:], se):
        assert b <= a + 3 * s, (ks, nll)
    assert nll[-1] < nll[0]                                    # K = 500 is strictly tighter than K = 1
    # an NLL of discrete data is positive (q(x) <= 1 for a probability mass)
    assert m["nll_nats"] > 0 and all(b["nll_nats"] > 0 for b in m["baselines"].values())


def test_rerun_trains_nothing(digits_run):
    cfg, m = digits_run
    pt = cfg.out / "model" / "model.pt"
    before = pt.stat().st_mtime_ns
    again = vae_density(cfg)
    assert again["run_name"] == m["run_name"] and pt.stat().st_mtime_ns == before
    assert again["train"]["trained_this_run"] is False and again["eval_reused"] is True
    assert again["iwae_nats"] == m["iwae_nats"] and again["baselines"] == m["baselines"]


def test_bad_data_file_is_one_clear_cli_error(tmp_path):
    bad = tmp_path / "BAD.npz"
    np.savez(bad, x=np.zeros((4, 3)))
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    r = subprocess.run([sys.executable, "-m", "flows.vae_density", "--data", str(bad), "--out", str(tmp_path / "o")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    last = [line for line in r.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("vae-density: error: ") and str(bad) in last and "Fix:" in last
    assert "train" in last and "numpy.savez" in last


def test_config_refusals():
    with pytest.raises(ValidationError, match="GPU workers"):
        VaeDensityConfig(preset="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValidationError, match="no CUDA GPU"):
            VaeDensityConfig(preset="gpu", use_gpu=True)
    with pytest.raises(ValidationError):
        VaeDensityConfig(preset="tiny", bogus=1)
    with pytest.raises(ValidationError, match="num_workers"):
        VaeDensityConfig(num_workers=(os.cpu_count() or 1) + 1)
    with pytest.raises(ValidationError, match="train_minutes"):
        VaeDensityConfig(preset="tiny", train_minutes=0)


def test_train_minutes_becomes_the_trainers_loop_budget():
    timed = train_spec(parse_args(["--preset", "tiny", "--train-minutes", "0.5", "--steps", "9000"]))
    assert timed["max_train_s"] == 30.0 and timed["steps"] == 9000  # --steps: the cap of the plan
    plain = train_spec(parse_args(["--preset", "tiny"]))
    assert plain["max_train_s"] == 0.0


def test_known_density_ppca_not_beaten(prefect_harness, ray_local, tmp_path):
    """Gaussian data from a PPCA model: the reported test NLL is an (upper-bound) estimate of a
    fitted model's NLL, so it must not fall below the true model's closed-form NLL beyond 3 s.e."""
    from models.ppca import PPCA
    g = torch.Generator().manual_seed(3)
    D, dz = 6, 2
    true = PPCA(W=torch.randn((D, dz), generator=g, dtype=torch.float64),
                mu=torch.randn(D, generator=g, dtype=torch.float64), s2=0.3)
    x = true.sample(2500, generator=g)
    train, test = x[:2000], x[2000:]
    src = tmp_path / "ppca.npz"
    np.savez(src, train=train.numpy().astype(np.float32), test=test.numpy().astype(np.float32))
    cfg = VaeDensityConfig(preset="tiny", out=tmp_path / "run", data=src, likelihood="gaussian", steps=150, z_dim=2)
    m = vae_density(cfg)
    assert m["data"]["likelihood"] == "gaussian" and set(m["baselines"]) == {"independent_gaussian", "ppca"}
    lp_true = true.log_px(torch.as_tensor(test.numpy().astype(np.float32), dtype=torch.float64)).numpy()
    nll_true = float(-lp_true.mean())
    assert m["nll_nats"] >= nll_true - 3 * m["stderr_nats"], (m["nll_nats"], nll_true)
    # the paired difference per example is far less noisy: check it too
    lp_vae = np.load(cfg.out / "eval" / "per_example.npz")[f"log_px_{m['nll_k']}"]
    d = lp_true - lp_vae
    assert d.mean() >= -3 * d.std(ddof=1) / math.sqrt(len(d)), d.mean()
    # the ML PPCA baseline is (nearly) the true model
    assert abs(m["baselines"]["ppca"]["nll_nats"] - nll_true) < 3 * m["baselines"]["ppca"]["stderr_nats"]
