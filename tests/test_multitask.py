"""Primary/auxiliary gradient rule (ALGORITHMS.md §4) and its baselines, on tiny CPU problems."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models.multitask import (METHODS, closed_form_n1, combine, combine_coefficients, gram, l2_direction,
                              primary_aux_direction, published_iteration)

F64 = torch.float64


def _pg_nnls(g0: np.ndarray, G: np.ndarray, iters: int = 200_000, kkt_tol: float = 1e-10) -> np.ndarray:
    """Brute-force reference: accelerated projected gradient (FISTA) on ½‖g0 + Gᵀλ‖², λ ≥ 0,
    run until the KKT residual max(|d_i| if λ_i > 0 else relu(−d_i)), d = ⟨g_i, u⟩, is tiny."""
    K, c = G @ G.T, G @ g0
    L = max(np.linalg.eigvalsh(K).max(), 1e-300)
    lam = y = np.zeros(len(c))
    t = 1.0
    for it in range(iters):
        lam_new = np.maximum(y - (K @ y + c) / L, 0.0)
        t_new = (1 + np.sqrt(1 + 4 * t * t)) / 2
        y = lam_new + (t - 1) / t_new * (lam_new - lam)
        lam, t = lam_new, t_new
        if it % 50 == 0:
            d = K @ lam + c
            if np.abs(np.where(lam > 0, d, np.minimum(d, 0.0))).max() < kkt_tol:
                return lam
    raise AssertionError(f"reference projected gradient did not converge in {iters} steps")


def _problems(seed: int, count: int):
    """Random (g0, G) with n ≤ 8, a third of them built to conflict with g0, some with a
    zero row or duplicated rows, some with n > P (rank-deficient Gram)."""
    rng = np.random.default_rng(seed)
    for k in range(count):
        n, P = int(rng.integers(1, 9)), int(rng.integers(2, 12))
        g0, G = rng.normal(size=P), rng.normal(size=(n, P))
        if k % 3 == 0:
            G = G - rng.uniform(0.5, 3.0) * rng.uniform(0, 1, size=(n, 1)) * g0[None]
        if k % 7 == 0:
            G[rng.integers(n)] = 0.0
        if k % 5 == 0 and n > 1:
            G[1] = 2.0 * G[0]
        yield g0, G


def _stall_case():
    """The published rule's stall (3 parameters, 2 auxiliaries), worked by hand:

    g0 = (1, 0, 1), g1 = (−1, −0.1, 0), g2 = (−0.5, 1, 0).
    Step 1: τ = 1 (⟨g0,g1⟩ = −1 < −0.5): λ1 = 1/1.01, u = (0.0099, −0.099, 1), ⟨u,g2⟩ = −0.104.
    Step 2: τ = 2: λ2 = 0.0832, u = (−0.0317, −0.0158, 1): ⟨u,g1⟩ = +0.0333, ⟨u,g2⟩ = 0.
    Step 3: τ = argmin = 2 again, whose coordinate is already optimal: fixed point. λ1 = 0.990
    should shrink (its derivative is positive) but is never chosen. The optimum is u = (0, 0, 1)
    (g0's first two coordinates lie in the polar cone of {g1, g2}), λ = (20/21, 2/21);
    the stall over-corrects: ‖u − g0‖² = 1.0646 against 1.
    """
    g0 = torch.tensor([1.0, 0.0, 1.0], dtype=F64)
    G = torch.tensor([[-1.0, -0.1, 0.0], [-0.5, 1.0, 0.0]], dtype=F64)
    return g0, G


def test_exact_matches_projected_gradient_nnls_and_is_feasible():
    worst_u, worst_feas = 0.0, 0.0
    for g0, G in _problems(seed=0, count=150):
        u, lam = primary_aux_direction(torch.tensor(g0), torch.tensor(G))
        assert (lam >= 0).all()
        u_ref = g0 + G.T @ _pg_nnls(g0, G)
        worst_u = max(worst_u, float(np.abs(u.numpy() - u_ref).max()))
        worst_feas = min(worst_feas, float((G @ u.numpy()).min()))
    assert worst_feas >= -1e-6, f"some ⟨u, g_i⟩ = {worst_feas} < 0"
    assert worst_u <= 1e-6, f"u differs from the projected-gradient NNLS by {worst_u}"


def test_exact_matches_scipy_nnls():
    optimize = pytest.importorskip("scipy.optimize")
    for g0, G in _problems(seed=1, count=300):
        u, lam = primary_aux_direction(torch.tensor(g0), torch.tensor(G))
        lam_ref, _ = optimize.nnls(G.T, -g0, maxiter=10_000)
        u_ref = g0 + G.T @ lam_ref
        np.testing.assert_allclose(u.numpy(), u_ref, atol=1e-6, rtol=0)
        # objective, not λ: with dependent rows λ is not unique
        assert np.sum(u.numpy() ** 2) <= np.sum(u_ref ** 2) + 1e-9


def test_kkt_at_the_exact_solution():
    for g0, G in _problems(seed=2, count=100):
        u, lam = primary_aux_direction(torch.tensor(g0), torch.tensor(G))
        d = torch.tensor(G) @ u  # ⟨g_i, u⟩
        assert (lam >= 0).all() and (d >= -1e-9).all()
        assert (lam * d).abs().max() <= 1e-9  # complementary slackness


def test_no_conflict_returns_g0_exactly():
    rng = np.random.default_rng(3)
    g0 = torch.tensor(rng.normal(size=10))
    G = torch.stack([g0 * s + 0.1 * torch.tensor(rng.normal(size=10)) for s in (0.5, 1.0, 2.0)])
    assert (G @ g0 > 0).all()
    for method in ("exact", "published"):
        u, lam = primary_aux_direction(g0, G, method=method)
        assert torch.equal(u, g0) and torch.equal(lam, torch.zeros(3, dtype=F64))


def test_n1_closed_form_equals_iteration_and_exact():
    rng = np.random.default_rng(4)
    for _ in range(50):
        g0, g1 = (torch.tensor(rng.normal(size=6)) for _ in range(2))
        u_cf, gamma = closed_form_n1(g0, g1)
        for method in ("exact", "published"):
            u, lam = primary_aux_direction(g0, g1[None], method=method)
            assert torch.allclose(u, u_cf, atol=1e-12) and torch.allclose(lam[0], gamma, atol=1e-12)
        if g0 @ g1 < 0:
            assert abs(float(u_cf @ g1)) < 1e-12  # u ⟂ g1 on conflict
        else:
            assert torch.equal(u_cf, g0)


def test_published_iteration_stalls_on_constructed_case():
    g0, G = _stall_case()
    M = gram(g0, G)
    lam_pub, its = published_iteration(M[1:, 1:], M[1:, 0], max_iter=100_000)
    assert its == 3  # a fixed point after two updates, long before max_iter
    u_pub = g0 + G.T @ lam_pub
    u_ex, lam_ex = primary_aux_direction(g0, G)
    assert torch.allclose(lam_ex, torch.tensor([20 / 21, 2 / 21], dtype=F64), atol=1e-12)
    assert torch.allclose(u_ex, torch.tensor([0.0, 0.0, 1.0], dtype=F64), atol=1e-12)
    d_pub = G @ u_pub
    assert (d_pub >= -1e-12).all()  # feasible ...
    assert d_pub[0] > 0.03 and lam_pub[0] > 0.98  # ... but λ1 > 0 with slack: KKT violated
    excess = float(((u_pub - g0) ** 2).sum() / ((u_ex - g0) ** 2).sum()) - 1
    assert excess > 0.06  # 6.5% over-correction
    u_c, info = combine(g0, G, "primary_aux_published")
    assert torch.allclose(u_c, u_pub) and torch.allclose(info["lam"], lam_pub)


def test_published_iteration_misses_nnls_on_random_conflicts():
    misses = 0
    for g0, G in _problems(seed=5, count=60):
        u_ex, _ = primary_aux_direction(torch.tensor(g0), torch.tensor(G))
        u_pub, _ = primary_aux_direction(torch.tensor(g0), torch.tensor(G), method="published")
        misses += float((u_pub - u_ex).abs().max()) > 1e-6
    assert misses >= 5, "the published rule was expected to miss the NNLS optimum on some problems"


def _toy_losses(theta):
    """Primary ½‖θ − (2, 1)‖²; auxiliary ½(θ₁ + θ₂ + 1)². At θ = 0 their gradients conflict."""
    L0 = 0.5 * ((theta - torch.tensor([2.0, 1.0], dtype=theta.dtype)) ** 2).sum()
    L1 = 0.5 * (theta.sum() + 1.0) ** 2
    return L0, L1


def _toy_run(method: str, steps: int = 40, lr: float = 0.1):
    theta = torch.zeros(2, dtype=F64, requires_grad=True)
    opt = torch.optim.SGD([theta], lr=lr)
    hist = []
    for _ in range(steps):
        L0, L1 = _toy_losses(theta)
        hist.append((L0.item(), L1.item()))
        g0 = torch.autograd.grad(L0, theta, retain_graph=True)[0]
        g1 = torch.autograd.grad(L1, theta)[0]
        theta.grad, _ = combine(g0, g1[None], method)
        opt.step()
    L0, L1 = _toy_losses(theta)
    hist.append((L0.item(), L1.item()))
    return np.array(hist)


def test_toy_primary_descent_raises_aux_and_rule_does_not():
    plain, rule = _toy_run("primary_only"), _toy_run("primary_aux")
    assert plain[-1, 1] > plain[0, 1] + 3.0  # plain GD on L0 drives L1 from 0.5 to ~8
    assert np.all(np.diff(rule[:, 1]) <= 1e-12)  # the rule: L1 never goes up
    assert rule[-1, 0] < rule[0, 0] - 0.2  # while still making progress on L0 (2.5 → 2.25)
    assert plain[-1, 0] < rule[-1, 0]  # the price: less progress than unconstrained descent


def test_l2_rule_keeps_the_theta_factor():
    rng = np.random.default_rng(6)
    theta = torch.tensor(rng.normal(size=7))
    g = -theta + 0.3 * torch.tensor(rng.normal(size=7))  # conflicts with ½‖θ‖²
    assert g @ theta < 0
    u = l2_direction(g, theta)
    assert torch.allclose(u, closed_form_n1(g, theta)[0])
    assert abs(float(u @ theta)) < 1e-12 and u.shape == theta.shape
    assert torch.equal(l2_direction(theta, theta), theta)  # no conflict: unchanged
    assert torch.equal(l2_direction(g, torch.zeros(7, dtype=F64)), g)  # θ = 0: no division


def test_pcgrad_matches_naive_projection():
    rng = np.random.default_rng(7)
    for trial in range(20):
        n, P = int(rng.integers(1, 6)), 9
        g0, G = torch.tensor(rng.normal(size=P)), torch.tensor(rng.normal(size=(n, P)))
        d, info = combine(g0, G, "pcgrad", seed=trial)
        # naive form, same seeded order as the Gram form
        tasks = [g0, *G]
        gen = torch.Generator().manual_seed(trial)
        out = torch.zeros(P, dtype=F64)
        for i, gi in enumerate(tasks):
            pc = gi.clone()
            for j in torch.randperm(n + 1, generator=gen).tolist():
                if j != i and pc @ tasks[j] < 0:
                    pc = pc - (pc @ tasks[j]) / (tasks[j] @ tasks[j]) * tasks[j]
            out += pc
        assert torch.allclose(d, out, atol=1e-10)
    # two conflicting tasks: each projected onto the other's normal plane
    g0, g1 = torch.tensor([1.0, 0.0], dtype=F64), torch.tensor([-1.0, 1.0], dtype=F64)
    d, info = combine(g0, g1[None], "pcgrad")
    assert torch.allclose(d, torch.tensor([0.5, 0.5], dtype=F64) + torch.tensor([0.0, 1.0], dtype=F64))
    assert info["n_projections"] == 2


def test_gradcosine_weighted_sum_primary_only():
    g0 = torch.tensor([1.0, 0.0, 0.0], dtype=F64)
    G = torch.tensor([[1.0, 1.0, 0.0], [-1.0, 0.0, 1.0], [0.0, 0.0, 2.0]], dtype=F64)
    d, info = combine(g0, G, "gradcosine")
    assert torch.allclose(info["cosines"], torch.tensor([2 ** -0.5, -(2 ** -0.5), 0.0], dtype=F64))
    assert torch.equal(d, g0 + G[0])  # only the positive-cosine auxiliary is kept
    d, info = combine(g0, G, "weighted_sum", weights=torch.tensor([1.0, 0.5, 2.0]))
    assert torch.allclose(d, g0 + G[0] + 0.5 * G[1] + 2 * G[2])
    assert torch.allclose(info["dots"], G @ d)
    d, info = combine(g0, G, "primary_only")
    assert torch.equal(d, g0) and torch.equal(info["lam"], torch.zeros(3, dtype=F64))


@pytest.mark.parametrize("method", METHODS)
def test_zero_norm_tasks_are_skipped(method):
    g0 = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    G = torch.tensor([[0.0, 0.0, 0.0], [-1.0, 1.0, 0.0]], dtype=F64)
    d, info = combine(g0, G, method)
    assert torch.isfinite(d).all() and info["skipped"].tolist() == [True, False]
    assert info["lam"][0] == 0
    d_ref, _ = combine(g0, G[1:], method)  # same as without the zero task
    if method != "pcgrad":  # PCGrad's random order depends on the task count
        assert torch.allclose(d, d_ref)
    zero = torch.zeros(3, dtype=F64)
    d0, info0 = combine(zero, G, method)  # zero primary: nothing blows up
    assert torch.isfinite(d0).all() and torch.isfinite(info0["cosines"]).all()


def test_gram_path_equals_direct_and_float32_inputs():
    rng = np.random.default_rng(8)
    g0, G = torch.tensor(rng.normal(size=50)), torch.tensor(rng.normal(size=(4, 50)) - 1.0)
    a, info = combine_coefficients(gram(g0, G), "primary_aux")
    u, lam = primary_aux_direction(g0, G)
    assert torch.allclose(a[1:], lam) and torch.allclose(a[1:] @ G + g0, u)
    u32, _ = combine(g0.float(), G.float(), "primary_aux")
    assert u32.dtype == torch.float32 and (G.float() @ u32).min() > -1e-4
    with pytest.raises(ValueError, match="unknown method"):
        combine(g0, G, "mgda")
    with pytest.raises(ValueError, match="flat"):
        combine(g0[None], G, "primary_aux")
