"""Density baselines for discrete images: independent pixels and a mixture fitted by EM.

Data are integer arrays (N, D) with values 0..L-1 (L = 2: binary pixels, a Bernoulli).
Both models give an exact log-likelihood, so their test NLL (nats per example) is the
yardstick a VAE's importance-sampled estimate must beat.

* :class:`IndependentPixels`: q(x) = prod_d theta_d[x_d], theta_d = (count + alpha) / (N + alpha L)
  (add-alpha / Laplace smoothing, estimated on train).
* :func:`fit_mixture`: q(x) = sum_k pi_k prod_d theta_kd[x_d] by EM, vectorised, seeded, with
  the E step in log space. The M step is the MAP estimate under symmetric Dirichlet priors
  (``alpha`` pseudo-counts on theta, ``alpha_pi`` on pi), so the quantity EM never decreases is
  the log posterior; ``history`` records it per iteration, beside the plain log-likelihood.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

ROWS_PER_BLOCK = 4096  # one-hot rows materialised at a time (memory bound, exact)


def _as_levels(x, n_levels: int) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.dim() != 2:
        raise ValueError(f"expected data of shape (N, D), got {tuple(x.shape)}")
    x = x.long()
    if x.numel() and (int(x.min()) < 0 or int(x.max()) >= n_levels):
        raise ValueError(f"values must lie in 0..{n_levels - 1}; got {int(x.min())}..{int(x.max())}")
    return x


def _one_hot(x: torch.Tensor, n_levels: int) -> torch.Tensor:
    """(N, D) ints -> (N, D*L) float64 indicators."""
    return torch.nn.functional.one_hot(x, n_levels).reshape(x.shape[0], -1).double()


# ------------------------------------------------------------------ independent pixels
@dataclass
class IndependentPixels:
    log_theta: torch.Tensor   # (D, L)

    @classmethod
    def fit(cls, x, n_levels: int = 2, alpha: float = 1.0) -> "IndependentPixels":
        x = _as_levels(x, n_levels)
        if alpha < 0:
            raise ValueError(f"alpha={alpha}: smoothing pseudo-counts must be >= 0")
        counts = torch.nn.functional.one_hot(x, n_levels).sum(0).double()          # (D, L)
        theta = (counts + alpha) / (x.shape[0] + alpha * n_levels)
        return cls(log_theta=torch.log(theta))

    def log_prob(self, x) -> torch.Tensor:
        """Exact log q(x): (N, D) -> (N,) float64."""
        x = _as_levels(x, self.log_theta.shape[1])
        return self.log_theta.gather(1, x.T).sum(0)        # log_theta[d, x_nd], summed over d

    def nll(self, x) -> float:
        return float(-self.log_prob(x).mean())


# ------------------------------------------------------------------ mixture by EM
@dataclass
class Mixture:
    log_pi: torch.Tensor      # (K,)
    log_theta: torch.Tensor   # (K, D, L)
    history: list[dict] = field(default_factory=list)   # per iteration: log_lik, objective (nats/example)

    def component_log_prob(self, x) -> torch.Tensor:
        """log q(x | k): (N, D) -> (N, K), one matmul per block of rows."""
        K, D, L = self.log_theta.shape
        x = _as_levels(x, L)
        flat = self.log_theta.reshape(K, D * L).T                                  # (D*L, K)
        return torch.cat([_one_hot(x[i:i + ROWS_PER_BLOCK], L) @ flat
                          for i in range(0, max(1, x.shape[0]), ROWS_PER_BLOCK)])

    def log_prob(self, x) -> torch.Tensor:
        """Exact log q(x) = logsumexp_k (log pi_k + log q(x|k)): (N,)."""
        return torch.logsumexp(self.component_log_prob(x) + self.log_pi, dim=1)

    def nll(self, x) -> float:
        return float(-self.log_prob(x).mean())


def _log_prior(m: Mixture, alpha: float, alpha_pi: float) -> float:
    """log Dirichlet density (up to a constant) of the parameters: the MAP objective's prior."""
    return float(alpha * m.log_theta.sum() + alpha_pi * m.log_pi.sum())


def _m_step(onehot_blocks, resp: torch.Tensor, D: int, L: int, alpha: float, alpha_pi: float):
    """MAP parameters from responsibilities (N, K)."""
    K = resp.shape[1]
    counts = torch.zeros(K, D * L, dtype=torch.float64)
    at = 0
    for oh in onehot_blocks:
        counts += resp[at:at + oh.shape[0]].T @ oh                                 # (K, D*L)
        at += oh.shape[0]
    counts = counts.view(K, D, L)
    nk = resp.sum(0)                                                               # (K,)
    tiny = torch.finfo(torch.float64).tiny   # alpha = 0: a zero count must not make 0 * log 0 = NaN
    theta = ((counts + alpha) / (nk[:, None, None] + alpha * L)).clamp_min(tiny)
    pi = ((nk + alpha_pi) / (resp.shape[0] + alpha_pi * K)).clamp_min(tiny)
    return torch.log(pi), torch.log(theta)


def fit_mixture(x, n_components: int, n_levels: int = 2, n_iter: int = 100, tol: float = 1e-7,
                alpha: float = 1e-2, alpha_pi: float = 1.0, seed: int = 0, n_init: int = 1) -> Mixture:
    """EM for a mixture of categoricals (Bernoullis when ``n_levels`` = 2); best of ``n_init``
    seeded starts by final objective. Stops when the objective gains < ``tol`` nats/example."""
    x = _as_levels(x, n_levels)
    N, D = x.shape
    if N == 0 or n_components < 1:
        raise ValueError(f"fit_mixture: need data (N={N}) and n_components >= 1 (got {n_components})")
    blocks = [_one_hot(x[i:i + ROWS_PER_BLOCK], n_levels) for i in range(0, N, ROWS_PER_BLOCK)]
    best = None
    for start in range(n_init):
        g = torch.Generator().manual_seed(int(seed) * 7919 + start)
        resp = -torch.log(torch.rand((N, n_components), generator=g, dtype=torch.float64))  # Dirichlet(1) rows
        resp = resp / resp.sum(1, keepdim=True)
        m = Mixture(*_m_step(blocks, resp, D, n_levels, alpha, alpha_pi))
        prev = -float("inf")
        for it in range(n_iter + 1):   # history[-1] is the returned parameters' objective
            joint = torch.cat([oh @ m.log_theta.reshape(n_components, -1).T for oh in blocks]) + m.log_pi  # (N, K)
            log_px = torch.logsumexp(joint, 1, keepdim=True)                        # E step, log space
            ll = float(log_px.mean())
            obj = ll + _log_prior(m, alpha, alpha_pi) / N
            m.history.append({"iter": it, "log_lik": ll, "objective": obj})
            if obj - prev < tol or it == n_iter:
                break
            prev = obj
            m.log_pi, m.log_theta = _m_step(blocks, torch.exp(joint - log_px), D, n_levels, alpha, alpha_pi)
        if best is None or m.history[-1]["objective"] > best.history[-1]["objective"]:
            best = m
    return best
