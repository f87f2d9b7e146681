"""VAE / IWAE density estimation: closed-form exactness (PPCA), bound ordering, honest
standard errors, chunking, and a VAE never beating the true density."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from models.ppca import PPCA, LinearGaussianVAE, fit_ppca
from models.vae import VAE, VAEConfig, _noise_stream, bits_per_dim, elbo, log_px, log_weights, summarize
from tasks.adapters.vae import load_model


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def random_ppca(D: int = 5, dz: int = 2, s2: float = 1.0, seed: int = 0) -> PPCA:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(D, dz, generator=g, dtype=torch.float64)
    return PPCA(W=W, mu=torch.randn(D, generator=g, dtype=torch.float64), s2=s2)


def bernoulli_mixture_data(n: int, D: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    theta = torch.rand(3, D, generator=g) * 0.8 + 0.1
    k = torch.randint(0, 3, (n,), generator=g)
    return (torch.rand(n, D, generator=g) < theta[k]).float()


def train(model, x: torch.Tensor, steps: int, lr: float = 3e-3, batch: int = 64, seed: int = 0):
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for step in range(steps):
        rows = torch.randint(0, len(x), (batch,))
        loss, _ = model.loss({"x": x[rows]})
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained_bernoulli():
    torch.set_num_threads(1)  # module fixtures run before the autouse one
    x = bernoulli_mixture_data(800, D=32)
    torch.manual_seed(0)
    model = train(VAE(VAEConfig(x_dim=32, z_dim=8, hidden=(32,), samples=1)), x[:600], steps=200)
    return model.double(), x[600:].double()


# ---------------------------------------------------------------- closed form (PPCA)
def test_ppca_closed_form_matches_torch_distribution() -> None:
    p = random_ppca(D=6, dz=3, s2=0.4)
    x = p.sample(7, torch.Generator().manual_seed(1))
    ref = torch.distributions.MultivariateNormal(p.mu, covariance_matrix=p.covariance()).log_prob(x)
    torch.testing.assert_close(p.log_px(x), ref, rtol=0, atol=1e-10)
    # Bayes' rule: log q(x) = log q(x|z) + log q(z) - log p(z|x) at any z
    mean, L = p.posterior(x)
    z = torch.randn(7, 3, dtype=torch.float64)
    post = torch.distributions.MultivariateNormal(mean, scale_tril=L).log_prob(z)
    lik = torch.distributions.Normal(z @ p.W.T + p.mu, math.sqrt(p.s2)).log_prob(x).sum(-1)
    prior = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    torch.testing.assert_close(lik + prior - post, p.log_px(x), rtol=0, atol=1e-10)


@pytest.mark.parametrize("K", [1, 2, 37])
def test_exact_posterior_gives_exact_log_px(K: int) -> None:
    p = random_ppca(D=5, dz=2, s2=0.3)
    x = p.sample(9, torch.Generator().manual_seed(2))
    est, se = log_px(LinearGaussianVAE(p), x, K=K, chunk=5, batch=4)
    assert (est - p.log_px(x)).abs().max() < 1e-9
    if K == 1:
        assert torch.isnan(se).all()       # one weight: no spread to estimate
    else:
        assert se.max() < 1e-9


def test_perturbed_encoder_converges_and_elbo_stays_below() -> None:
    p = random_ppca(D=4, dz=2, s2=1.0, seed=3)
    x = p.sample(8, torch.Generator().manual_seed(4))
    truth = p.log_px(x)
    model = LinearGaussianVAE(p, shift=0.5, scale=math.sqrt(2.0))  # mean +0.5, covariance x2
    est, se = log_px(model, x, K=5000, seed=5)
    z = (est - truth) / se
    assert z.abs().max() < 3.0, z
    assert abs(float((est - truth).mean() / torch.sqrt((se ** 2).mean() / len(x)))) < 3.0
    assert 0 < se.max() < 0.05
    e, e_se = elbo(model, x, K=5000, seed=5)
    assert (e + 3 * e_se < truth).all() and (truth - e).min() > 0.05
    # E[L_K] increases with K towards log q(x): averaged over 400 replicas of each example
    reps = x.repeat(400, 1)
    means = [float((log_px(model, reps, K=K, seed=6)[0] - truth.repeat(400)).mean()) for K in (1, 4, 32)]
    assert means[0] < means[1] < means[2] < 0.0, means


# ---------------------------------------------------------------- chunking and the naive form
def naive_log_px(model, x: torch.Tensor, K: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All K weights at once (one block of examples), plain numpy logsumexp and sd."""
    eps = _noise_stream(seed, 0)(K, x.shape[0], model.z_dim, torch.float64, "cpu")
    lw = log_weights(model, x, eps).detach().numpy()                    # (K, B)
    m = lw.max(0)
    w = np.exp(lw - m)
    est = m + np.log(w.mean(0))
    se = w.std(0, ddof=1) / (math.sqrt(K) * w.mean(0))
    return torch.from_numpy(est), torch.from_numpy(se)


class CountingVAE(VAE):
    def log_lik(self, x, z):
        self.n_latents = getattr(self, "n_latents", 0) + z.shape[0] * z.shape[1]
        return super().log_lik(x, z)


def test_chunking_is_exact_and_matches_naive() -> None:
    torch.manual_seed(0)
    model = CountingVAE(VAEConfig(x_dim=12, z_dim=3, hidden=(16,))).double().eval()
    x = (torch.rand(6, 12) < 0.4).double()
    K = 23
    ref_est, ref_se = naive_log_px(model, x, K, seed=7)
    for chunk in (1, 7, K, 100):
        model.n_latents = 0
        est, se = log_px(model, x, K=K, chunk=chunk, batch=6, seed=7)
        assert model.n_latents == K * 6   # K never rounded to a multiple of the chunk
        torch.testing.assert_close(est, ref_est, rtol=0, atol=1e-12)
        torch.testing.assert_close(se, ref_se, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="K=0"):
        log_px(model, x, K=0)


# ---------------------------------------------------------------- bounds and standard errors
def test_bounds_are_ordered(trained_bernoulli) -> None:
    model, x = trained_bernoulli
    # 2,000 rows; one seed: L_1, L_5, L_10 share their first samples (common random numbers),
    # which cuts the noise of the differences; the ordering is still only in expectation.
    reps = x.repeat(10, 1)
    e = elbo(model, reps, K=1, seed=1)[0]
    l5 = log_px(model, reps, K=5, seed=1)[0]
    l10 = log_px(model, reps, K=10, seed=1)[0]
    best = log_px(model, x, K=2000, seed=4)[0].repeat(10)
    for lo, hi in ((e, l5), (l5, l10), (l10, best)):
        d = hi - lo
        assert float(d.mean()) > 3 * float(d.std() / math.sqrt(len(d))), (float(d.mean()), float(d.std()))


def test_reported_stderr_matches_spread_of_repeats(trained_bernoulli) -> None:
    model, x = trained_bernoulli
    n_ex, R, K = 20, 50, 200
    reps = x[:n_ex].repeat(R, 1)                            # row r*n_ex + i: repeat r of example i
    est, se = log_px(model, reps, K=K, seed=9)
    spread = est.view(R, n_ex).var(0, unbiased=True)        # (n_ex,) variance across repeats
    ratio = math.sqrt(float(spread.mean()) / float((se ** 2).mean()))
    assert 0.7 <= ratio <= 1.4, ratio


def test_training_loss_parts() -> None:
    torch.manual_seed(0)
    x = bernoulli_mixture_data(32)
    vae = VAE(VAEConfig(x_dim=16, z_dim=3, hidden=(8,), samples=1))
    loss, parts = vae.loss({"x": x})
    assert parts["elbo"] == parts["iwae"] == pytest.approx(float(loss.detach()), abs=0)
    iwae = VAE(VAEConfig(x_dim=16, z_dim=3, hidden=(8,), samples=8))
    loss, parts = iwae.loss(x)
    assert parts["iwae"] < parts["elbo"]                    # Jensen, same samples
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in iwae.parameters())


def test_analytic_kl_has_the_mc_forms_expectation_and_less_variance() -> None:
    """kl='analytic' (M = 1): the same negative ELBO in expectation as the log-weight form, with
    a smaller spread over the noise, for the loss and for its gradient; refused for M > 1."""
    x = bernoulli_mixture_data(64, D=16, seed=3).double()
    torch.manual_seed(0)
    mc = VAE(VAEConfig(x_dim=16, z_dim=4, hidden=(16,), samples=1)).double()
    an = VAE(VAEConfig(x_dim=16, z_dim=4, hidden=(16,), samples=1, kl="analytic")).double()
    an.load_state_dict(mc.state_dict())
    with torch.no_grad():  # a non-trivial posterior: means away from 0, scales away from 1
        mc.encoder[-1].bias.copy_(torch.linspace(-1.0, 1.0, 8, dtype=torch.float64))
        an.encoder[-1].bias.copy_(mc.encoder[-1].bias)
    la, lm, ga, gm = [], [], [], []
    for seed in range(400):
        for model, losses, grads in ((an, la, ga), (mc, lm, gm)):
            torch.manual_seed(seed)
            model.zero_grad()
            loss, parts = model.loss({"x": x})
            loss.backward()
            losses.append(float(loss.detach()))
            grads.append(model.encoder[-1].bias.grad.clone())
    la, lm = torch.tensor(la), torch.tensor(lm)
    se = math.sqrt(float(la.var()) / len(la) + float(lm.var()) / len(lm))
    assert abs(float(la.mean() - lm.mean())) < 4 * se, (float(la.mean()), float(lm.mean()), se)
    assert float(la.std()) < 0.8 * float(lm.std())
    ga, gm = torch.stack(ga), torch.stack(gm)
    assert torch.allclose(ga.mean(0), gm.mean(0), atol=float(4 * (gm.std(0) / math.sqrt(400)).max()))
    assert float(ga.var(0).sum()) < float(gm.var(0).sum())
    assert "kl" in an.loss({"x": x})[1] and "kl" not in parts  # parts: the mc model's, last
    with pytest.raises(ValueError, match="only applies to the M = 1 ELBO"):
        VAEConfig(samples=5, kl="analytic")
    with pytest.raises(ValueError, match="choose 'mc'"):
        VAEConfig(kl="exact")


# ---------------------------------------------------------------- a VAE never beats the truth
def test_gaussian_vae_nll_not_below_true_density() -> None:
    p = random_ppca(D=6, dz=2, s2=0.2, seed=11)
    g = torch.Generator().manual_seed(12)
    x_train, x_test = p.sample(1500, g), p.sample(400, g)
    true_ll = p.log_px(x_test)
    ml = fit_ppca(x_train, 2)                                # the right family, fitted: near the truth
    assert abs(float((ml.log_px(x_test) - true_ll).mean())) < 0.1
    torch.manual_seed(0)
    vae = train(VAE(VAEConfig(x_dim=6, z_dim=2, hidden=(32,), likelihood="gaussian", samples=4)).double(),
                x_train, steps=300, lr=1e-2)
    est, se = log_px(vae, x_test, K=500, seed=13)
    gap = true_ll - est                                      # the VAE's excess NLL per example
    total_se = math.sqrt(float(gap.var()) / len(gap) + float((se ** 2).sum()) / len(gap) ** 2)
    assert float(gap.mean()) > -3 * total_se, (float(gap.mean()), total_se)
    assert float(gap.mean()) < 5.0                           # it did learn something
    s = summarize(est, se, x_dim=6)
    assert s["nll_nats"] == pytest.approx(float(-est.mean())) and s["mc_stderr"] > 0
    assert s["bits_per_dim"] == pytest.approx(s["nll_nats"] / (6 * math.log(2)))


# ---------------------------------------------------------------- likelihoods and config
@pytest.mark.parametrize("cfg", [
    VAEConfig(x_dim=10, z_dim=2, hidden=(8,), likelihood="categorical", n_levels=17, samples=3),
    VAEConfig(x_dim=10, z_dim=2, hidden=(8, 8), likelihood="gaussian", gaussian_var="head", samples=2),
    VAEConfig(x_dim=10, z_dim=2, hidden=(8,), likelihood="gaussian", gaussian_var="per_dim", min_logvar=-2.0),
])
def test_likelihoods_normalise_and_roundtrip(cfg: VAEConfig) -> None:
    torch.manual_seed(0)
    model = VAE(cfg).double().eval()
    z = torch.randn(1, 1, cfg.z_dim, dtype=torch.float64)
    if cfg.likelihood == "categorical":   # q(x|z) sums to one over one pixel's levels (others fixed)
        xs = torch.zeros(cfg.n_levels, cfg.x_dim, dtype=torch.float64)
        xs[:, 0] = torch.arange(cfg.n_levels)
        total = torch.logsumexp(model.log_lik(xs, z.expand(1, cfg.n_levels, -1)).squeeze(0), 0)
        base = model.log_lik(xs[:1], z) - torch.log_softmax(
            model.decoder(z.view(1, -1)).view(cfg.x_dim, -1), -1)[0, 0]
        torch.testing.assert_close(total, base.squeeze(), atol=1e-10, rtol=0)
        x = torch.randint(0, cfg.n_levels, (5, cfg.x_dim)).double()
    else:
        out = model.decoder(z.view(1, -1))
        logvar = model._logvar(out[:, cfg.x_dim:] if cfg.gaussian_var == "head" else model.raw_logvar)
        assert (logvar >= cfg.min_logvar).all()
        x = torch.randn(5, cfg.x_dim, dtype=torch.float64)
    loss, parts = model.loss({"x": x})
    assert math.isfinite(float(loss.detach())) and set(parts) == {"elbo", "iwae"}
    est, se = log_px(model, x, K=30, chunk=8)
    assert torch.isfinite(est).all() and (se > 0).all()
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["kind"] == "vae"
    loaded = load_model(d).double()
    loaded.load_state_dict(model.state_dict())
    torch.testing.assert_close(log_px(loaded.eval(), x, K=30, chunk=8)[0], est)


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="likelihood"):
        VAEConfig(likelihood="poisson")
    with pytest.raises(ValueError, match="unknown field"):
        VAEConfig.from_dict({"x_dim": 4, "zdim": 2})
    with pytest.raises(ValueError, match="n_levels"):
        VAEConfig(likelihood="categorical", n_levels=1)
    assert bits_per_dim(784 * math.log(2), 784) == pytest.approx(1.0)


def test_float32_default_agrees_with_float64() -> None:
    torch.manual_seed(0)
    model = VAE(VAEConfig(x_dim=64, z_dim=8, hidden=(32, 32))).eval()
    x = (torch.rand(30, 64) < 0.3).float()
    e32, s32 = log_px(model, x, K=300, chunk=64, seed=2)     # same samples in both precisions
    e64, s64 = log_px(model.double(), x.double(), K=300, chunk=64, seed=2)
    assert (e32 - e64).abs().max() < 1e-3 and (s32 - s64).abs().max() < 1e-3


@pytest.mark.parametrize("likelihood,var", [("bernoulli", "per_dim"), ("categorical", "per_dim"),
                                            ("gaussian", "per_dim"), ("gaussian", "head")])
def test_log_lik_fast_form_equals_torch_distributions(likelihood: str, var: str) -> None:
    torch.manual_seed(0)
    cfg = VAEConfig(x_dim=9, z_dim=3, hidden=(8,), likelihood=likelihood, n_levels=5, gaussian_var=var)
    model = VAE(cfg).double()
    if var == "per_dim" and likelihood == "gaussian":
        model.raw_logvar.data.normal_()
    z = torch.randn(4, 6, 3, dtype=torch.float64)                       # (C, B, dz)
    x = {"bernoulli": (torch.rand(6, 9) < 0.5).double(), "categorical": torch.randint(0, 5, (6, 9)).double(),
         "gaussian": torch.randn(6, 9, dtype=torch.float64)}[likelihood]
    out = model.decoder(z)                                              # (C, B, out), the slow way
    if likelihood == "bernoulli":
        ref = torch.distributions.Bernoulli(logits=out).log_prob(x).sum(-1)
    elif likelihood == "categorical":
        ref = torch.distributions.Categorical(logits=out.view(4, 6, 9, 5)).log_prob(x.long()).sum(-1)
    else:
        mean, raw = (out.chunk(2, -1) if var == "head" else (out, model.raw_logvar))
        ref = torch.distributions.Normal(mean, torch.exp(0.5 * model._logvar(raw))).log_prob(x).sum(-1)
    torch.testing.assert_close(model.log_lik(x, z), ref, rtol=0, atol=1e-10)
