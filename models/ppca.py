"""Probabilistic PCA (Tipping & Bishop 1999): the VAE whose log q(x) has a closed form.

Generative model: z ~ N(0, I_dz), x | z ~ N(W z + mu, s2 I_D), so

    log q(x) = log N(x; mu, C),  C = W W^T + s2 I,
    p(z | x) = N(S W^T (x - mu) / s2, S),  S = (I + W^T W / s2)^{-1}.

:class:`LinearGaussianVAE` exposes the interface of ``models.vae.log_px`` with this exact
posterior as its encoder (every importance weight then equals q(x)), optionally perturbed
(mean shift, scale factor) to test the estimator's convergence.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

LOG_2PI = math.log(2 * math.pi)


@dataclass(frozen=True)
class PPCA:
    W: torch.Tensor     # (D, dz)
    mu: torch.Tensor    # (D,)
    s2: float           # isotropic noise variance

    @property
    def dims(self) -> tuple[int, int]:
        return self.W.shape[0], self.W.shape[1]

    def covariance(self) -> torch.Tensor:
        D = self.W.shape[0]
        return self.W @ self.W.T + self.s2 * torch.eye(D, dtype=self.W.dtype)  # (D, D)

    def log_px(self, x: torch.Tensor) -> torch.Tensor:
        """Closed-form log q(x): (N, D) -> (N,)."""
        L = torch.linalg.cholesky(self.covariance())
        r = torch.linalg.solve_triangular(L, (x - self.mu).T, upper=False)    # (D, N)
        D = self.W.shape[0]
        return -0.5 * (r * r).sum(0) - torch.log(torch.diagonal(L)).sum() - 0.5 * D * LOG_2PI

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact p(z|x): (mean (N, dz), scale_tril (dz, dz)) with S = scale_tril scale_tril^T."""
        dz = self.W.shape[1]
        prec = torch.eye(dz, dtype=self.W.dtype) + self.W.T @ self.W / self.s2   # S^{-1}
        S = torch.cholesky_inverse(torch.linalg.cholesky(prec))
        mean = (x - self.mu) @ self.W @ S / self.s2                             # S symmetric
        return mean, torch.linalg.cholesky(S)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        D, dz = self.dims
        z = torch.randn((n, dz), generator=generator, dtype=self.W.dtype)
        e = torch.randn((n, D), generator=generator, dtype=self.W.dtype)
        return z @ self.W.T + self.mu + math.sqrt(self.s2) * e


def fit_ppca(x: torch.Tensor, dz: int) -> PPCA:
    """Maximum-likelihood PPCA (closed form): the top-dz eigenvectors of the sample covariance."""
    N, D = x.shape
    if not 0 < dz < D:
        raise ValueError(f"fit_ppca: dz={dz} must be in 1..{D - 1}")
    mu = x.mean(0)
    evals, evecs = torch.linalg.eigh((x - mu).T @ (x - mu) / N)     # ascending
    evals, evecs = evals.flip(0), evecs.flip(1)
    s2 = float(evals[dz:].mean())
    W = evecs[:, :dz] * torch.sqrt(torch.clamp(evals[:dz] - s2, min=0.0))
    return PPCA(W=W, mu=mu, s2=s2)


class LinearGaussianVAE(nn.Module):
    """A PPCA model as a VAE: the decoder N(W z + mu, s2 I) and the exact posterior as encoder.

    ``shift`` is added to the posterior mean and ``scale`` multiplies its Cholesky factor
    (covariance x scale^2): with the defaults (0, 1) every importance weight equals q(x)."""

    def __init__(self, ppca: PPCA, shift: float = 0.0, scale: float = 1.0):
        super().__init__()
        self.ppca, self.shift, self.scale = ppca, float(shift), float(scale)
        self.z_dim = ppca.W.shape[1]

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, L = self.ppca.posterior(x)
        return mean + self.shift, (L * self.scale).unsqueeze(0)   # (B, dz), (1, dz, dz)

    def log_lik(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log N(x; W z + mu, s2 I): x (B, D), z (C, B, dz) -> (C, B)."""
        p = self.ppca
        D = p.W.shape[0]
        r = x - (z @ p.W.T + p.mu)                         # (C, B, D)
        return -0.5 * ((r * r).sum(-1) / p.s2 + D * math.log(p.s2) + D * LOG_2PI)
