"""Primary vs auxiliary multi-task gradients, and the baselines, behind one interface.

ALGORITHMS.md §4 (kexue.fm/archives/8907). With g0 the primary gradient and g_1..g_n the
auxiliary ones, the update direction u maximises ⟨u, g0⟩ − ½‖u‖² subject to ⟨u, g_i⟩ ≥ 0
(no auxiliary loss goes up to first order). Its dual is the non-negative least squares

    min_{λ ≥ 0} ½‖g0 + Gᵀλ‖²,        u = g0 + Gᵀλ,

which only needs the (n+1)×(n+1) Gram matrix M = [g0; G][g0; G]ᵀ. Every method here is
therefore split in two:

1. ``gram(g0, G)``: M, once per step, O(n²P) (float64);
2. ``combine_coefficients(M, method)``: coefficients a ∈ R^{n+1} from M alone (tiny, on the
   CPU in float64, deterministic: under data parallelism each rank gets the same a from the
   same all-reduced gradients; M is also a sum over parameter shards, so a sharded model can
   all-reduce M instead of the gradients);
3. ``apply_coefficients(a, g0, G)``: the direction aᵀ[g0; G], one matvec per parameter.

``combine(g0, G, method)`` chains the three. Methods: "primary_aux" (exact active-set NNLS),
"primary_aux_published" (the post's coordinate iteration, which can stall at a feasible but
suboptimal λ — kept for fidelity), "weighted_sum", "pcgrad", "gradcosine", "primary_only".
Tasks with a (numerically) zero gradient are skipped, never divided by. Pure torch.
"""
from __future__ import annotations

import torch

METHODS = ("primary_aux", "primary_aux_published", "weighted_sum", "pcgrad", "gradcosine", "primary_only")
ZERO_REL = 1e-20  # a task whose ‖g_i‖² ≤ ZERO_REL · max_j ‖g_j‖² counts as zero and is skipped
_F64 = torch.float64


# ----------------------------------------------------------------------------- Gram plumbing

def _stack(g0: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """[g0; G] as one (n+1, P) matrix, after shape checks."""
    if g0.dim() != 1:
        raise ValueError(f"g0 must be a flat (P,) gradient, got shape {tuple(g0.shape)}; flatten it first")
    if G.dim() == 1 and G.numel() == 0:
        G = G.reshape(0, g0.shape[0])
    if G.dim() != 2 or G.shape[1] != g0.shape[0]:
        raise ValueError(f"G must be (n, P) with P = {g0.shape[0]} (one auxiliary gradient per row), "
                         f"got shape {tuple(G.shape)}")
    return torch.cat([g0[None], G.to(g0.dtype)], 0)  # (n+1, P)


def gram(g0: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """M = [g0; G][g0; G]ᵀ, (n+1, n+1) float64 on the CPU; M[0, 0] = ‖g0‖²."""
    A = _stack(g0, G).to(_F64)  # (n+1, P)
    return (A @ A.T).cpu()  # (n+1, n+1)


def apply_coefficients(a: torch.Tensor, g0: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Direction aᵀ[g0; G], shape (P,), in g0's dtype (accumulated in float64)."""
    A = _stack(g0, G)  # (n+1, P)
    return (a.to(device=A.device, dtype=_F64) @ A.to(_F64)).to(g0.dtype)  # (P,)


def _usable(M: torch.Tensor) -> torch.Tensor:
    """(n+1,) bool: tasks whose gradient is not numerically zero."""
    diag = M.diagonal()
    scale = diag.max().clamp_min(torch.finfo(_F64).tiny)
    return diag > ZERO_REL * scale


def _tol(M: torch.Tensor) -> float:
    """Rounding floor for inner products ⟨g_i, u⟩ computed from M."""
    return 1e3 * torch.finfo(_F64).eps * float(M.diagonal().max().clamp_min(0.0))


def _cosines(M: torch.Tensor, usable: torch.Tensor) -> torch.Tensor:
    """(n,) cos(g0, g_i); 0 where either gradient is zero."""
    norms = M.diagonal().clamp_min(0.0).sqrt()  # (n+1,)
    cos = M[0, 1:] / (norms[0] * norms[1:]).clamp_min(torch.finfo(_F64).tiny)
    ok = usable[1:] & usable[0]
    return torch.where(ok, cos, torch.zeros_like(cos))


# ----------------------------------------------------------------------------- primary vs auxiliary

def nnls_gram(K: torch.Tensor, c: torch.Tensor, tol: float = 0.0, skip: torch.Tensor | None = None,
              max_iter: int | None = None) -> tuple[torch.Tensor, int]:
    """Exact argmin_{λ ≥ 0} ½λᵀKλ + cᵀλ (K = G Gᵀ (n, n), c = G g0 (n,)), Lawson–Hanson active set.

    This is Lawson–Hanson's NNLS for min ‖Gᵀλ + g0‖ written on the normal equations: the
    gradient is d = Kλ + c = (⟨g_i, u⟩)_i. ``skip`` (n,) bool: tasks held at λ = 0. Returns
    (λ, iterations); float64 on the CPU.
    """
    K, c = K.to(_F64).cpu(), c.to(_F64).cpu()
    n = c.shape[0]
    lam = torch.zeros(n, dtype=_F64)
    passive = torch.zeros(n, dtype=torch.bool)
    allowed = torch.ones(n, dtype=torch.bool) if skip is None else ~skip.cpu()
    max_iter = 3 * n + 10 if max_iter is None else max_iter
    it = 0
    while it < max_iter:
        d = K @ lam + c  # (n,) ⟨g_i, u⟩
        cand = allowed & ~passive & (d < -tol)
        if not cand.any():
            break
        j = int(torch.where(cand, d, torch.full_like(d, float("inf"))).argmin())
        passive[j] = True
        it += 1
        s = _passive_solve(K, c, passive)
        if s[j] <= 0:  # exact arithmetic forbids this; numerically j is in the span: skip it
            passive[j] = False
            allowed[j] = False
            continue
        while not (s[passive] > 0).all():  # step back until the passive solution is feasible
            bad = passive & (s <= 0)
            ratio = torch.where(bad, lam / (lam - s), torch.full_like(lam, float("inf")))
            k = int(ratio.argmin())
            lam = lam + ratio[k] * (s - lam)
            passive &= lam > torch.finfo(_F64).eps * lam.abs().max()
            passive[k] = False
            lam = torch.where(passive, lam, torch.zeros_like(lam))
            s = _passive_solve(K, c, passive)
        lam = s
    return lam, it


def _passive_solve(K: torch.Tensor, c: torch.Tensor, passive: torch.Tensor) -> torch.Tensor:
    """Unconstrained minimiser on the passive set: K_PP s_P = −c_P (least squares if singular)."""
    s = torch.zeros_like(c)
    idx = passive.nonzero().flatten()
    if idx.numel() == 0:
        return s
    Kp = K[idx][:, idx]  # (p, p)
    sol = torch.linalg.lstsq(Kp, -c[idx, None], driver="gelsd").solution  # (p, 1)
    s[idx] = sol[:, 0]
    return s


def published_iteration(K: torch.Tensor, c: torch.Tensor, skip: torch.Tensor | None = None,
                        max_iter: int = 1000) -> tuple[torch.Tensor, int]:
    """The post's Frank-Wolfe-like coordinate rule from λ⁽⁰⁾ = 0 (ALGORITHMS.md §4).

    Each step: τ = argmin_i ⟨g_i, u⟩, then λ_τ ← relu(−⟨r, g_τ⟩)/‖g_τ‖² with
    r = u − λ_τ g_τ. Stops at a fixed point or after ``max_iter`` steps (the post gives no
    count). Known flaw: once every ⟨g_i, u⟩ ≥ 0 the chosen coordinate cannot move, so a
    λ_j > 0 that should shrink is never revisited — a feasible but suboptimal stall.
    Returns (λ, iterations).
    """
    K, c = K.to(_F64).cpu(), c.to(_F64).cpu()
    n = c.shape[0]
    lam = torch.zeros(n, dtype=_F64)
    allowed = torch.ones(n, dtype=torch.bool) if skip is None else ~skip.cpu()
    if not allowed.any():
        return lam, 0
    d = c.clone()  # (n,) ⟨g_i, u⟩ at λ = 0
    it = 0
    for it in range(1, max_iter + 1):
        tau = int(torch.where(allowed, d, torch.full_like(d, float("inf"))).argmin())
        r_dot = d[tau] - lam[tau] * K[tau, tau]  # ⟨r, g_τ⟩
        gamma = torch.relu(-r_dot) / K[tau, tau]
        step = gamma - lam[tau]
        if step == 0:
            break  # fixed point of the published rule (possibly a stall)
        lam[tau] = gamma
        d = d + step * K[:, tau]
    return lam, it


def closed_form_n1(g0: torch.Tensor, g1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """n = 1: γ = relu(−⟨g0, g1⟩)/‖g1‖², u = g0 + γ g1 (u = g0 if ‖g1‖ = 0). Returns (u, γ)."""
    n1 = (g1.to(_F64) @ g1.to(_F64))
    if n1 <= 0:
        return g0.clone(), torch.zeros((), dtype=_F64)
    gamma = torch.relu(-(g0.to(_F64) @ g1.to(_F64))) / n1
    return (g0.to(_F64) + gamma * g1.to(_F64)).to(g0.dtype), gamma


def lambda_from_gram(M: torch.Tensor, method: str = "exact", max_iter: int | None = None) -> torch.Tensor:
    """λ (n,) of the primary/auxiliary rule from the (n+1)×(n+1) Gram matrix M."""
    M = M.to(_F64).cpu()
    skip = ~_usable(M)[1:]
    K, c = M[1:, 1:], M[1:, 0]
    if method == "exact":
        return nnls_gram(K, c, tol=_tol(M), skip=skip, max_iter=max_iter)[0]
    if method == "published":
        return published_iteration(K, c, skip=skip, max_iter=1000 if max_iter is None else max_iter)[0]
    raise ValueError(f"method must be 'exact' or 'published', got {method!r}")


def primary_aux_direction(g0: torch.Tensor, G: torch.Tensor, method: str = "exact",
                          max_iter: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """u = g0 + Gᵀλ with λ = argmin_{λ≥0} ‖g0 + Gᵀλ‖² ("exact") or the post's iteration
    ("published"). g0 (P,), G (n, P) → (u (P,), λ (n,) float64)."""
    lam = lambda_from_gram(gram(g0, G), method, max_iter)
    a = torch.cat([torch.ones(1, dtype=_F64), lam])
    return apply_coefficients(a, g0, G), lam


def l2_direction(g: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Tuning-free L2: g + relu(−⟨g, θ⟩)/‖θ‖² · θ (the θ factor the post's display drops).

    The n = 1 rule with the auxiliary loss ½‖θ‖², whose gradient is θ. Global over the flat
    (P,) vectors; θ = 0 leaves g unchanged.
    """
    g64, t64 = g.to(_F64), theta.to(_F64)
    tt = t64 @ t64
    if tt <= 0:
        return g.clone()
    return (g64 + torch.relu(-(g64 @ t64)) / tt * t64).to(g.dtype)


# ----------------------------------------------------------------------------- baselines

def _pcgrad_coefficients(M: torch.Tensor, usable: torch.Tensor, seed: int) -> tuple[torch.Tensor, int]:
    """PCGrad (Yu et al. 2020) in Gram space: each task's gradient, projected off every
    other task it conflicts with (in a seeded random order), then summed. Returns (a, #projections)."""
    m = M.shape[0]
    gen = torch.Generator().manual_seed(seed)
    C = torch.eye(m, dtype=_F64)  # row i: g_i^PC as coefficients over [g0; G]
    n_proj = 0
    for i in range(m):
        order = torch.randperm(m, generator=gen).tolist()  # drawn for every i: same stream for any data
        if not usable[i]:
            C[i, i] = 0.0  # a zero task contributes nothing
            continue
        for j in order:
            if j == i or not usable[j]:
                continue
            dot = C[i] @ M[:, j]  # ⟨g_i^PC, g_j⟩
            if dot < 0:
                C[i, j] -= dot / M[j, j]
                n_proj += 1
    return C.sum(0), n_proj


def combine_coefficients(M: torch.Tensor, method: str, weights: torch.Tensor | None = None,
                         seed: int = 0, max_iter: int | None = None) -> tuple[torch.Tensor, dict]:
    """Coefficients a (n+1,) over [g0; G] for ``method``, from the Gram matrix M alone.

    info: "lam" (n,) the auxiliary coefficients a[1:], "cosines" (n,) cos(g0, g_i),
    "dots" (n,) ⟨direction, g_i⟩, "skipped" (n,) bool zero-norm auxiliaries, plus per-method keys.
    ``weights`` (n,): auxiliary weights for "weighted_sum" (default 1); ``seed``: PCGrad's order.
    """
    M = M.to(_F64).cpu()
    n = M.shape[0] - 1
    usable = _usable(M)
    cos = _cosines(M, usable)
    extra: dict = {}
    if method == "primary_aux":
        a = torch.cat([torch.ones(1, dtype=_F64), lambda_from_gram(M, "exact", max_iter)])
    elif method == "primary_aux_published":
        a = torch.cat([torch.ones(1, dtype=_F64), lambda_from_gram(M, "published", max_iter)])
    elif method == "weighted_sum":
        w = torch.ones(n, dtype=_F64) if weights is None else torch.as_tensor(weights, dtype=_F64).cpu()
        if w.shape != (n,):
            raise ValueError(f"weights must have shape ({n},) (one per auxiliary task), got {tuple(w.shape)}")
        a = torch.cat([torch.ones(1, dtype=_F64), torch.where(usable[1:], w, torch.zeros_like(w))])
    elif method == "pcgrad":
        a, extra["n_projections"] = _pcgrad_coefficients(M, usable, seed)
    elif method == "gradcosine":
        a = torch.cat([torch.ones(1, dtype=_F64), (cos > 0).to(_F64)])
    elif method == "primary_only":
        a = torch.cat([torch.ones(1, dtype=_F64), torch.zeros(n, dtype=_F64)])
    else:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    info = {"lam": a[1:].clone(), "cosines": cos, "dots": M[1:] @ a, "skipped": ~usable[1:], **extra}
    return a, info


def combine(g0: torch.Tensor, G: torch.Tensor, method: str = "primary_aux", weights: torch.Tensor | None = None,
            seed: int = 0, max_iter: int | None = None) -> tuple[torch.Tensor, dict]:
    """Update direction (P,) for g0 (P,), G (n, P) by ``method`` (see METHODS), and its info dict."""
    a, info = combine_coefficients(gram(g0, G), method, weights, seed, max_iter)
    return apply_coefficients(a, g0, G), info
