"""VAE / IWAE density estimation (Su, kexue.fm/archives/8791; Burda et al., arXiv 1509.00519).

Letters as in the post: q(z) = N(0, I) is the prior and q(x|z) the decoder (the generative
model); p(z|x) is the encoder, "purely an importance-weighting function". One log-weight is

    lw = log q(x|z) + log q(z) - log p(z|x),        z ~ p(z|x),

and log q(x) = log E_p[exp lw]. Training minimises the negative M-sample bound
-(logsumexp_m lw_m - log M) (M = 1: the plain single-sample VAE loss; with ``kl="analytic"`` its KL term is taken in
closed form, the same expectation with less variance);
evaluation (:func:`log_px`) uses the same estimator with K = 5000 under no_grad, streamed over
chunks of K with a running logsumexp, and reports per example a delta-method standard error.

Any model with this interface can be evaluated (``models.ppca.LinearGaussianVAE`` is the
closed-form test case):

* ``z_dim``;
* ``encode(x) -> (mu, scale)``: ``mu`` (B, dz); ``scale`` (B, dz) standard deviations of a
  diagonal Gaussian, or (B, dz, dz) / (1, dz, dz) lower-triangular, z = mu + scale @ eps;
* ``log_lik(x, z) -> (C, B)``: log q(x|z) summed over data dims, for z (C, B, dz), x (B, D).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

LIKELIHOODS = ("bernoulli", "categorical", "gaussian")
GAUSSIAN_VAR = ("per_dim", "head")
LOG_2PI = math.log(2 * math.pi)


@dataclass(frozen=True)
class VAEConfig:
    x_dim: int = 784
    z_dim: int = 50
    hidden: tuple[int, ...] = (200, 200)   # encoder widths; the decoder mirrors them
    likelihood: str = "bernoulli"           # one of LIKELIHOODS
    n_levels: int = 2                       # categorical: values 0..n_levels-1 (17 for sklearn digits)
    gaussian_var: str = "per_dim"           # "per_dim": one learned log-variance per pixel; "head": decoder output
    min_logvar: float = -7.0                # gaussian: smooth floor on the log-variance
    samples: int = 1                        # M of the training bound (1: VAE, >1: IWAE)
    kl: str = "mc"                          # M = 1 only: "analytic" KL(p(z|x) || q(z)) in the loss (lower variance)
    activation: str = "tanh"                # the IWAE paper's choice
    kind: str = "vae"

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))  # JSON gives a list
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"VAEConfig.likelihood={self.likelihood!r}: choose one of {LIKELIHOODS}")
        if self.likelihood == "categorical" and self.n_levels < 2:
            raise ValueError(f"VAEConfig.n_levels={self.n_levels}: a categorical likelihood needs >= 2 levels")
        if self.gaussian_var not in GAUSSIAN_VAR:
            raise ValueError(f"VAEConfig.gaussian_var={self.gaussian_var!r}: choose one of {GAUSSIAN_VAR}")
        if self.samples < 1 or self.x_dim < 1 or self.z_dim < 1:
            raise ValueError(f"VAEConfig: samples, x_dim and z_dim must be >= 1 (got {self.samples}, "
                             f"{self.x_dim}, {self.z_dim})")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"VAEConfig.activation={self.activation!r}: choose one of {sorted(_ACTIVATIONS)}")
        if self.kl not in ("mc", "analytic"):
            raise ValueError(f"VAEConfig.kl={self.kl!r}: choose 'mc' (the log-weight form) or 'analytic'")
        if self.kl == "analytic" and self.samples != 1:
            raise ValueError(f"VAEConfig.kl='analytic' with samples={self.samples}: the analytic KL only "
                             "applies to the M = 1 ELBO; the IWAE bound needs the log-weights (kl='mc')")
        if self.kind != "vae":
            raise ValueError(f"VAEConfig.kind={self.kind!r}: must be 'vae'")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "VAEConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"VAEConfig: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


_ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU}


def mlp(sizes: list[int], activation: str) -> nn.Sequential:
    """Linear layers with ``activation`` between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(_ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


class VAE(nn.Module):
    """Diagonal-Gaussian encoder p(z|x), N(0, I) prior, Bernoulli / categorical / Gaussian decoder."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.z_dim = cfg.z_dim
        h = list(cfg.hidden)
        self.encoder = mlp([cfg.x_dim, *h, 2 * cfg.z_dim], cfg.activation)
        out = {"bernoulli": cfg.x_dim, "categorical": cfg.x_dim * cfg.n_levels,
               "gaussian": cfg.x_dim * (2 if cfg.gaussian_var == "head" else 1)}[cfg.likelihood]
        self.decoder = mlp([cfg.z_dim, *h[::-1], out], cfg.activation)
        if cfg.likelihood == "gaussian" and cfg.gaussian_var == "per_dim":
            self.raw_logvar = nn.Parameter(torch.zeros(cfg.x_dim))

    # ---------------------------------------------------------------- encoder p(z|x)
    def encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.encoder[0].weight.dtype)
        if self.cfg.likelihood == "categorical":
            return x / (self.cfg.n_levels - 1)  # levels to [0, 1]
        return x

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, std), each (B, dz)."""
        mu, logvar = self.encoder(self.encoder_input(x)).chunk(2, dim=-1)
        return mu, torch.exp(0.5 * logvar)

    # ---------------------------------------------------------------- decoder q(x|z)
    def _logvar(self, raw: torch.Tensor) -> torch.Tensor:
        floor = self.cfg.min_logvar
        return floor + F.softplus(raw - floor)  # smooth floor: logvar >= min_logvar

    def log_lik(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log q(x|z) summed over dims: x (B, D), z (C, B, dz) -> (C, B).

        The decoder runs once on all C*B latents (one batched matmul per layer)."""
        C, B, _ = z.shape
        D = self.cfg.x_dim
        body, last = self.decoder[:-1], self.decoder[-1]
        h = body(z.reshape(C * B, -1))                             # (C*B, H)
        out = last(h).view(C, B, -1)                               # (C, B, out)
        lik = self.cfg.likelihood
        if lik == "bernoulli":
            # log q(x|z) = x.l - sum softplus(l) for logits l = W h + b; the x.l term is
            # (W^T x).h + b.x, so only softplus touches all C*B*D logits.
            xd = x.to(h.dtype)                                     # (B, D)
            xl = (h.view(C, B, -1) * (xd @ last.weight)).sum(-1) + xd @ last.bias   # (C, B)
            return xl - F.softplus(out).sum(-1)
        if lik == "categorical":
            logp = torch.log_softmax(out.view(C, B, D, self.cfg.n_levels), dim=-1)  # (C, B, D, L)
            idx = x.long().view(1, B, D, 1).expand(C, B, D, 1)
            return logp.gather(-1, idx).squeeze(-1).sum(-1)
        if self.cfg.gaussian_var == "head":
            mean, raw = out.chunk(2, dim=-1)
        else:
            mean, raw = out, self.raw_logvar
        logvar = self._logvar(raw)
        xd = x.to(out.dtype)
        return -0.5 * (LOG_2PI + logvar + (xd - mean) ** 2 * torch.exp(-logvar)).sum(-1)

    # ---------------------------------------------------------------- training bound
    def loss(self, batch) -> tuple[torch.Tensor, dict]:
        """Negative M-sample bound (nats per example) and its parts: the negative ELBO
        (mean of -lw) and the negative IWAE_M bound (equal when M = 1).

        ``kl="analytic"`` (M = 1): -E[log q(x|z)] + KL(p(z|x) || N(0, I)) with the KL in closed
        form, Kingma & Welling's estimator B. Same expectation as the log-weight form (tested);
        only the reconstruction term is sampled, so the gradient is less noisy."""
        x = batch["x"] if isinstance(batch, dict) else batch
        mu, std = self.encode(x)
        if self.cfg.kl == "analytic":
            eps = torch.randn((1, *mu.shape), dtype=mu.dtype, device=mu.device)
            rec = self.log_lik(x, mu + std * eps)[0]                                           # (B,)
            kl = 0.5 * (mu * mu + std * std - 1.0).sum(-1) - torch.log(std).sum(-1)             # (B,)
            loss = (kl - rec).mean()
            v = float(loss.detach())  # M = 1: the ELBO is the bound
            return loss, {"elbo": v, "iwae": v, "kl": float(kl.detach().mean())}
        eps = torch.randn((self.cfg.samples, *mu.shape), dtype=mu.dtype, device=mu.device)  # (M, B, dz)
        lw = log_weights(self, x, eps, (mu, std))                                              # (M, B)
        M = self.cfg.samples
        iwae = torch.logsumexp(lw, 0) - math.log(M)                                            # (B,)
        loss = -iwae.mean()
        return loss, {"elbo": float(-lw.detach().mean()), "iwae": float(loss.detach())}


# -------------------------------------------------------------------- importance weights
def log_weights(model, x: torch.Tensor, eps: torch.Tensor, enc=None) -> torch.Tensor:
    """lw = log q(x|z) + log q(z) - log p(z|x) for z = mu + scale eps: eps (C, B, dz) -> (C, B).

    ``enc``: a precomputed ``model.encode(x)`` (it does not depend on the samples)."""
    mu, scale = model.encode(x) if enc is None else enc
    dz = mu.shape[-1]
    if scale.dim() == mu.dim():               # diagonal: scale (B, dz) of std
        z = mu + scale * eps                                          # (C, B, dz)
        log_det = torch.log(scale).sum(-1)                            # (B,)
    else:                                     # lower-triangular: (B, dz, dz) or (1, dz, dz)
        z = mu + (scale @ eps.unsqueeze(-1)).squeeze(-1)                # (C, B, dz)
        log_det = torch.log(torch.diagonal(scale, dim1=-2, dim2=-1)).sum(-1)
    log_prior = -0.5 * (z * z).sum(-1) - 0.5 * dz * LOG_2PI          # (C, B)
    log_post = -0.5 * (eps * eps).sum(-1) - log_det - 0.5 * dz * LOG_2PI
    return model.log_lik(x, z) + log_prior - log_post


def _noise_stream(seed: int, block: int):
    """eps for samples k = 0, 1, ... of one block of examples, independent of how K is chunked
    and of the model's dtype: sample k is always the k-th float32 draw of shape (B, dz) from a
    CPU generator seeded by (seed, block)."""
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(block)) & 0x7FFF_FFFF_FFFF)

    def draw(n: int, B: int, dz: int, dtype, device) -> torch.Tensor:
        eps = torch.stack([torch.randn((B, dz), generator=g) for _ in range(n)])
        return eps.to(dtype=dtype, device=device)  # (n, B, dz)
    return draw


class _Stream:
    """Running per-example statistics of weights u = exp(lw - m) with a moving max m:
    count, sum of u, and the centred sum of squares (Chan et al.'s parallel update), in float64."""

    def __init__(self, B: int, device):
        self.n = 0
        self.m = torch.full((B,), -math.inf, dtype=torch.float64, device=device)
        self.mean = torch.zeros(B, dtype=torch.float64, device=device)   # mean of u
        self.m2 = torch.zeros(B, dtype=torch.float64, device=device)     # sum (u - mean)^2

    def update(self, lw: torch.Tensor) -> None:
        lw = lw.double()                                                 # (C, B)
        c = lw.shape[0]
        m_new = torch.maximum(self.m, lw.max(0).values)
        r = torch.exp(self.m - m_new)                                    # rescale old u (0 at start)
        r = torch.where(torch.isfinite(self.m), r, torch.zeros_like(r))
        u = torch.exp(lw - m_new)                                        # (C, B), <= 1
        mean_c = u.mean(0)
        m2_c = ((u - mean_c) ** 2).sum(0)
        mean_o, m2_o = self.mean * r, self.m2 * r * r
        n = self.n + c
        delta = mean_c - mean_o
        self.mean = mean_o + delta * (c / n)
        self.m2 = m2_o + m2_c + delta * delta * (self.n * c / n)
        self.m, self.n = m_new, n

    def log_mean(self) -> torch.Tensor:
        return self.m + torch.log(self.mean)

    def stderr_log_mean(self) -> torch.Tensor:
        """Delta method: se(log mean w) = sd(w) / (sqrt(K) mean(w)); NaN for K = 1."""
        if self.n < 2:
            return torch.full_like(self.mean, math.nan)
        sd = torch.sqrt(self.m2 / (self.n - 1))
        return sd / (math.sqrt(self.n) * self.mean)


def _blocks(N: int, batch: int):
    for b, start in enumerate(range(0, N, batch)):
        yield b, slice(start, min(N, start + batch))


LATENTS_PER_PASS = 2048  # default chunk * batch: the decoder's (C*B, D) output stays in cache


@torch.no_grad()
def log_px(model, x: torch.Tensor, K: int = 5000, chunk: int | None = None, batch: int = 100,
           seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Importance-sampled log q(x) per example, in nats: logsumexp of K weights - log K.

    x (N, D) -> (estimate, stderr), each (N,) float64. Examples go ``batch`` at a time; K is
    split into chunks of ``chunk`` samples (default ``LATENTS_PER_PASS // batch``; the last
    chunk is shorter: K is never rounded), each a single decoder pass over batch*chunk
    latents, merged by a streaming logsumexp. The noise depends on (seed, example block,
    sample index) only, so any ``chunk`` gives the same estimate. ``stderr`` is the
    delta-method standard error of log(mean w) from the weights (it measures the sampling
    noise of this estimate, not its downward bias, which is O(stderr^2 / 2))."""
    est, se = _stream_eval(model, x, K, chunk, batch, seed, log_space=True)
    return est, se


@torch.no_grad()
def elbo(model, x: torch.Tensor, K: int = 1, chunk: int | None = None, batch: int = 100,
         seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Monte Carlo ELBO per example (mean of K log-weights) and its standard error, in nats.
    With the same arguments it uses the same samples as :func:`log_px`."""
    return _stream_eval(model, x, K, chunk, batch, seed, log_space=False)


def _stream_eval(model, x, K, chunk, batch, seed, log_space: bool):
    if chunk is None:
        chunk = max(1, LATENTS_PER_PASS // max(1, min(batch, x.shape[0])))
    if K < 1 or chunk < 1 or batch < 1:
        raise ValueError(f"K={K}, chunk={chunk}, batch={batch}: all must be >= 1")
    N = x.shape[0]
    est = torch.empty(N, dtype=torch.float64)
    se = torch.empty(N, dtype=torch.float64)
    was_training = getattr(model, "training", False)
    if was_training:
        model.eval()
    try:
        for b, sl in _blocks(N, batch):
            xb = x[sl]
            enc = model.encode(xb)
            mu = enc[0]
            draw = _noise_stream(seed, b)
            stats = _Stream(xb.shape[0], mu.device) if log_space else _Moments(xb.shape[0], mu.device)
            for start in range(0, K, chunk):
                eps = draw(min(chunk, K - start), xb.shape[0], model.z_dim, mu.dtype, mu.device)
                stats.update(log_weights(model, xb, eps, enc))        # (c, B)
            e, s = (stats.log_mean(), stats.stderr_log_mean()) if log_space else stats.result()
            est[sl], se[sl] = e.cpu(), s.cpu()
    finally:
        if was_training:
            model.train()
    return est, se


class _Moments:
    """Running mean and centred sum of squares of lw (for the ELBO), float64."""

    def __init__(self, B: int, device):
        self.n = 0
        self.mean = torch.zeros(B, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(B, dtype=torch.float64, device=device)

    def update(self, lw: torch.Tensor) -> None:
        lw = lw.double()
        c = lw.shape[0]
        mean_c = lw.mean(0)
        m2_c = ((lw - mean_c) ** 2).sum(0)
        n = self.n + c
        delta = mean_c - self.mean
        self.mean = self.mean + delta * (c / n)
        self.m2 = self.m2 + m2_c + delta * delta * (self.n * c / n)
        self.n = n

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.n < 2:
            return self.mean, torch.full_like(self.mean, math.nan)
        return self.mean, torch.sqrt(self.m2 / (self.n - 1) / self.n)


# -------------------------------------------------------------------- units and summaries
def bits_per_dim(nll_nats: float | torch.Tensor, x_dim: int):
    """Nats per example -> bits per dimension."""
    return nll_nats / (x_dim * math.log(2))


def summarize(log_px_est: torch.Tensor, log_px_se: torch.Tensor, x_dim: int) -> dict:
    """Test NLL in nats and bits/dim, with two standard errors: ``mc_stderr`` (importance
    sampling, from the per-example stderrs) and ``data_stderr`` (spread over examples)."""
    n = log_px_est.numel()
    nll = float(-log_px_est.mean())
    mc = float(torch.sqrt(torch.nansum(log_px_se ** 2)) / n)
    data = float(log_px_est.std() / math.sqrt(n)) if n > 1 else math.nan
    return {"nll_nats": nll, "mc_stderr": mc, "data_stderr": data,
            "bits_per_dim": bits_per_dim(nll, x_dim), "n": n}
