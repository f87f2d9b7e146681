"""Sector probability (ALGORITHMS.md §5): closed forms, Monte Carlo kernel, Ray shards, the flow."""
from __future__ import annotations

import flows  # noqa: F401  # env defaults before prefect / ray are imported

import itertools
import json
import math
from fractions import Fraction

import numpy as np
import pytest
from pydantic import ValidationError

from models import sector as S
from models.sector import (TAU, degrees_to_frac, inclusion_exclusion, is_certain, sector_mc_count,
                           sector_mc_count_reference, sector_prob, sector_prob_exact,
                           sorting_network)

DEG_GRID = (60, 90, 120, 180, 200, 240, 270, 300, 330)


def z_score(hits: int, samples: int, n: int, theta: float) -> float:
    """(p̂ − p)/sqrt(p(1−p)/N) at the exact p; 0 when p = 1 and every set fit."""
    p = Fraction(1) if is_certain(n, theta) else sector_prob_exact(n, Fraction(theta / TAU))
    if p == 1:
        return 0.0 if hits == samples else math.inf
    return (hits / samples - float(p)) / math.sqrt(float(p * (1 - p)) / samples)


# ---------------------------------------------------------------- exact values

def test_four_ducks_is_one_half() -> None:
    assert sector_prob_exact(4, Fraction(1, 2)) == Fraction(1, 2)
    assert sector_prob(4, math.pi) == 0.5


@pytest.mark.parametrize("n", range(1, 10))
def test_small_angle_closed_form(n: int) -> None:
    for frac in (Fraction(1, 360), Fraction(1, 7), Fraction(1, 4), Fraction(1, 3),
                 Fraction(5, 12), Fraction(1, 2)):
        assert sector_prob_exact(n, frac) == n * frac ** (n - 1)
        assert sector_prob_exact(n, frac) == inclusion_exclusion(n, 1 - frac)  # k ≥ 2 vanish


@pytest.mark.parametrize("n", range(1, 13))
def test_full_circle_and_pigeonhole(n: int) -> None:
    assert sector_prob_exact(n, Fraction(1)) == 1
    assert sector_prob(n, TAU) == 1.0
    frac = Fraction(n - 1, n) if n > 1 else Fraction(1, 3)
    assert sector_prob_exact(n, frac) == 1
    assert inclusion_exclusion(n, 1 - frac) == 1  # the shortcut agrees with the sum


@pytest.mark.parametrize("n, deg, expected", [
    (4, 180, Fraction(1, 2)), (3, 180, Fraction(3, 4)), (3, 200, Fraction(8, 9)),
    (4, 240, Fraction(26, 27)), (5, 270, Fraction(255, 256)), (5, 90, Fraction(5, 256)),
    (2, 180, Fraction(1)), (2, 300, Fraction(1)), (3, 240, Fraction(1)), (3, 330, Fraction(1)),
])
def test_table_exact(n: int, deg: int, expected: Fraction) -> None:
    assert sector_prob_exact(n, degrees_to_frac(deg)) == expected
    assert sector_prob(n, math.radians(deg)) == pytest.approx(float(expected), rel=1e-14)


@pytest.mark.parametrize("deg, decimal", [(240, 0.58573), (270, 0.92627)])
def test_table_seven_points(deg: int, decimal: float) -> None:
    assert round(float(sector_prob_exact(7, degrees_to_frac(deg))), 5) == decimal
    assert round(sector_prob(7, math.radians(deg)), 5) == decimal


@pytest.mark.parametrize("n", range(1, 11))
def test_polynomial_identity(n: int) -> None:
    """Σ(−1)^{k−1} C(n,k)(1−kx)^{n−1} ≡ 1 without truncation, for any x."""
    for x in (Fraction(-3, 2), Fraction(0), Fraction(1, 9), Fraction(1, 2), Fraction(5, 7), 1, 4):
        assert inclusion_exclusion(n, Fraction(x), truncate=False) == 1


@pytest.mark.parametrize("n", range(1, 10))
def test_continuous_at_pi_and_kinks(n: int) -> None:
    eps = Fraction(1, 10**12)
    kinks = [Fraction(1, 2)] + [1 - Fraction(1, k) for k in range(2, n + 1)]  # θ/2π
    for f0 in kinks:
        mid = sector_prob_exact(n, f0)
        for f in (f0 - eps, f0 + eps):
            assert abs(sector_prob_exact(n, f) - mid) < 1e-8, (n, f0)
            assert abs(inclusion_exclusion(n, 1 - f) - mid) < 1e-8, (n, f0)  # no shortcuts


@pytest.mark.parametrize("n", range(1, 10))
def test_non_decreasing_in_theta(n: int) -> None:
    fracs = [Fraction(i, 1440) for i in range(1, 1441)]
    exact = [sector_prob_exact(n, f) for f in fracs]
    assert all(a <= b for a, b in zip(exact, exact[1:]))
    assert all(0 < p <= 1 for p in exact)
    floats = [sector_prob(n, TAU * i / 1440) for i in range(1, 1441)]
    assert all(a <= b + 1e-15 for a, b in zip(floats, floats[1:]))


def test_float_matches_exact() -> None:
    rng = np.random.default_rng(0)
    for n in range(1, 16):
        for theta in rng.uniform(1e-3, TAU, 50):
            exact = float(sector_prob_exact(n, Fraction(theta / TAU)))
            assert sector_prob(n, theta) == pytest.approx(exact, rel=1e-13, abs=1e-300)
            if n <= 8:  # the naive float sum of ALGORITHMS.md is fine for small n
                x = 1 - theta / TAU
                naive = sum((-1) ** (k - 1) * math.comb(n, k) * (1 - k * x) ** (n - 1)
                            for k in range(1, n + 1) if 1 - k * x > 0)
                assert sector_prob(n, theta) == pytest.approx(naive, abs=1e-12)


@pytest.mark.parametrize("n, theta, exc", [
    (0, 1.0, ValueError), (-2, 1.0, ValueError), (2.5, 1.0, TypeError), (True, 1.0, TypeError),
    (3, 0.0, ValueError), (3, -1.0, ValueError), (3, TAU * 1.000001, ValueError),
    (3, math.nan, ValueError), (3, math.inf, ValueError),
])
def test_bad_inputs(n: object, theta: float, exc: type) -> None:
    with pytest.raises(exc):
        sector_prob(n, theta)  # type: ignore[arg-type]
    with pytest.raises(exc):
        sector_mc_count(n, theta, 10, np.random.default_rng(0))  # type: ignore[arg-type]


def test_bad_exact_inputs() -> None:
    for frac in (Fraction(0), Fraction(-1, 2), Fraction(3, 2)):
        with pytest.raises(ValueError, match="frac"):
            sector_prob_exact(3, frac)
    with pytest.raises(TypeError, match="Fraction"):
        sector_prob_exact(3, 0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="samples"):
        sector_mc_count(3, 1.0, -1, np.random.default_rng(0))


# ---------------------------------------------------------------- Monte Carlo kernel

@pytest.mark.parametrize("m", range(1, 15))
def test_sorting_network_sorts_all_01_inputs(m: int) -> None:
    """0-1 principle: a comparator network that sorts every 0/1 input sorts everything."""
    bits = np.array(list(itertools.product((0, 1), repeat=m)), dtype=np.uint8).T  # (m, 2^m)
    rows = list(bits.copy())
    for i, j in sorting_network(m):
        rows[i], rows[j] = np.minimum(rows[i], rows[j]), np.maximum(rows[i], rows[j])
    assert np.array_equal(np.stack(rows), np.sort(bits, axis=0))


def test_mc_kernel_within_4_sigma() -> None:
    """The fast kernel against the exact P on a grid that includes θ > π; 2e5 sets per cell."""
    for i, (n, deg) in enumerate(itertools.product((1, 2, 3, 4, 5, 7, 9), DEG_GRID)):
        theta = math.radians(deg)
        hits = sector_mc_count(n, theta, 200_000, np.random.default_rng(1000 + i))
        assert abs(z_score(hits, 200_000, n, theta)) < 4, (n, deg, hits)


def test_mc_reference_kernel_within_4_sigma() -> None:
    """The literal n-angle kernel of ALGORITHMS.md (no rotation trick, float64, np.sort)."""
    for i, (n, deg) in enumerate(itertools.product((2, 4, 7), (90, 200, 270))):
        theta = math.radians(deg)
        hits = sector_mc_count_reference(n, theta, 200_000, np.random.default_rng(2000 + i))
        assert abs(z_score(hits, 200_000, n, theta)) < 4, (n, deg, hits)


def test_mc_sort_path_within_4_sigma(monkeypatch: pytest.MonkeyPatch) -> None:
    """np.sort fallback (forced for small n; automatic above NETWORK_MAX_ROWS + 1 points)."""
    cases = [(3, 200), (5, 240), (9, 300), (S.NETWORK_MAX_ROWS + 6, 335)]
    monkeypatch.setattr(S, "NETWORK_MAX_ROWS", 0)
    for i, (n, deg) in enumerate(cases):
        theta = math.radians(deg)
        hits = sector_mc_count(n, theta, 100_000, np.random.default_rng(3000 + i))
        assert abs(z_score(hits, 100_000, n, theta)) < 4, (n, deg, hits)


def test_mc_kernel_reproducible_and_ragged_batches() -> None:
    args = (4, math.radians(200))
    a = sector_mc_count(*args, 100_001, np.random.default_rng(5), batch=4096)
    b = sector_mc_count(*args, 100_001, np.random.default_rng(5), batch=4096)
    assert a == b and 0 < a < 100_001
    assert sector_mc_count(*args, 0, np.random.default_rng(5)) == 0
    ragged = sector_mc_count(6, math.radians(150), 12_345, np.random.default_rng(5), batch=10)
    assert abs(z_score(ragged, 12_345, 6, math.radians(150))) < 4, ragged  # tiny batches count right


# ---------------------------------------------------------------- config (before Ray)

@pytest.mark.parametrize("kwargs, field", [
    ({"samples_per_cell": -5}, "samples_per_cell"), ({"n": (0, 3)}, "n"),
    ({"theta_deg": (90, 400)}, "theta_deg"), ({"bogus": 1}, "bogus"),
    ({"shards": 0}, "shards"), ({"seed": -1}, "seed"), ({"preset": "huge"}, "preset"),
])
def test_bad_config_names_field(kwargs: dict, field: str) -> None:
    from flows.sector_montecarlo import SectorConfig

    with pytest.raises(ValidationError) as err:
        SectorConfig(**{"preset": "tiny", **kwargs})
    assert field in {str(e["loc"][0]) for e in err.value.errors()}


def test_cli_rejects_bad_config_before_ray(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    import tasks.sector
    from flows.sector_montecarlo import main

    def boom(*a: object, **k: object) -> None:
        raise AssertionError("Ray must not start on a bad config")

    monkeypatch.setattr(tasks.sector, "ensure_ray", boom)
    with pytest.raises(ValidationError, match="samples_per_cell"):
        main(["--preset", "tiny", "--samples", "-1", "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0


def test_config_presets_and_grid() -> None:
    from flows.sector_montecarlo import SectorConfig

    cfg = SectorConfig(preset="tiny", samples_per_cell=1000)
    assert cfg.samples_per_cell == 1000 and cfg.n == (2, 3, 4, 5, 7)
    assert (4, math.pi) in cfg.grid() and all(0 < t <= TAU for _, t in cfg.grid())
    with pytest.raises(ValidationError):
        cfg.seed = 3  # type: ignore[misc]  # frozen


# ---------------------------------------------------------------- Ray and the flow

# ray_local and prefect_harness are the session-scoped fixtures of tests/conftest.py


def test_shards_give_identical_totals(ray_local) -> None:
    from tasks.sector import BLOCK_SAMPLES, run_grid

    grid = [(4, math.pi), (3, math.radians(200)), (7, math.radians(270)), (2, math.radians(300))]
    samples = 2 * BLOCK_SAMPLES + 12_345  # 3 blocks per cell, the last one ragged
    one = run_grid(grid, samples, shards=1, seed=11)
    eight = run_grid(grid, samples, shards=8, seed=11)
    assert one["grid"] == eight["grid"]  # bitwise identical counts → identical cells
    assert all(c["samples"] == samples for c in one["grid"])
    assert all(abs(c["z"]) < 4 for c in one["grid"])
    other = run_grid(grid, samples, shards=3, seed=12)
    assert [c["estimate"] for c in other["grid"]] != [c["estimate"] for c in one["grid"]]
    with pytest.raises(ValueError, match="theta"):
        run_grid([(3, 7.0)], 10, shards=1, seed=0)


def test_flow_end_to_end_tiny(ray_local, prefect_harness, tmp_path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.sector_montecarlo import SectorConfig, sector_montecarlo

    cfg = SectorConfig(preset="tiny", out=tmp_path / "sector")
    sector_montecarlo(cfg)
    metrics = json.loads((cfg.out / "metrics.json").read_text())
    assert {"grid", "samples_per_s_per_core", "max_abs_z", "config"} <= metrics.keys()
    assert len(metrics["grid"]) == len(cfg.n) * len(cfg.theta_deg)
    for cell in metrics["grid"]:
        assert {"n", "theta", "exact", "estimate", "stderr", "samples", "z"} <= cell.keys()
        assert 0 < cell["theta"] <= TAU and cell["samples"] == cfg.samples_per_cell
        assert abs(cell["z"]) < 4, cell
    assert metrics["samples_per_s_per_core"] > 0
    assert (cfg.out / "sector.png").read_bytes()[:4] == b"\x89PNG"
    assert (cfg.out / "manifest.json").is_file()
    with get_client(sync_client=True) as client:
        keys = ["sector-grid", "sector-report"]
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))
    assert {a.key for a in found} == set(keys)
    report = next(a for a in found if a.key == "sector-report")
    assert "data:image/png;base64," in report.data
