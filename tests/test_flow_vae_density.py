"""vae-density end to end on scikit-learn's digits (short training), and a known-density check."""
from __future__ import annotations

import json

import numpy as np
import pytest

from flows.vae_density import VaeDensityConfig, vae_density


@pytest.fixture(scope="module")
def digits_run(prefect_harness, ray_local, tmp_path_factory):
    cfg = VaeDensityConfig(preset="tiny", out=tmp_path_factory.mktemp("vae"), steps=60, k_max=500,
                           mixture_components=3)
    return cfg, vae_density(cfg)


def test_metrics_bounds_and_baselines(digits_run):
    cfg, m = digits_run
    assert json.loads((cfg.out / "metrics.json").read_text()) == m
    assert m["n_test"] == 359 and m["x_dim"] == 64 and m["ks"] == [1, 5, 50, 500]
    nll = [m["iwae_nats"][str(k)] for k in m["ks"]]
    se = [m["iwae_stderr_nats"][str(k)] for k in m["ks"]]
    # IWAE NLL bounds tighten with K (within the data noise, the same examples for every K)
    assert all(b <= a + 3 * s for a, b, s in zip(nll, nll[1:], se)), nll
    assert m["nll_nats"] == pytest.approx(nll[-1]) and 0 < m["nll_nats"] < 64 * np.log(17)
    assert m["bits_per_dim"] == pytest.approx(m["nll_nats"] / 64 / np.log(2), rel=1e-6)
    assert m["elbo_nats"] >= m["nll_nats"] - 3 * m["stderr_nats"]
    assert (cfg.out / "bounds.png").is_file()


def test_rerun_trains_nothing(digits_run):
    cfg, m = digits_run
    stamp = (cfg.out / "model" / "model.pt").stat().st_mtime_ns
    again = vae_density(cfg)
    assert again["run_name"] == m["run_name"] and (cfg.out / "model" / "model.pt").stat().st_mtime_ns == stamp
