"""Input/parameter gradient penalties and the §2 inequality between them (ALGORITHMS.md §2)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from models.gradient_penalty import inequality_sides, input_gradient_penalty, parameter_gradient_penalty

F64 = torch.float64
ACTS = (nn.Tanh, nn.ReLU, nn.GELU, nn.Softplus)


def _random_mlp(gen: torch.Generator, depth: int, act: type[nn.Module], bias: bool) -> tuple[nn.Sequential, int]:
    widths = torch.randint(2, 13, (depth + 1,), generator=gen).tolist()
    scale = [0.3, 1.0, 3.0][int(torch.randint(3, (1,), generator=gen))]
    mods: list[nn.Module] = []
    for t in range(depth):
        lin = nn.Linear(widths[t], widths[t + 1], bias=bias).to(F64)
        with torch.no_grad():
            lin.weight.copy_(scale * torch.randn(lin.weight.shape, generator=gen, dtype=F64) / widths[t] ** 0.5)
            if bias:
                lin.bias.copy_(0.5 * torch.randn(lin.bias.shape, generator=gen, dtype=F64))
        mods += [lin, act()]
    return nn.Sequential(*mods), widths[0]


def test_inequality_holds_on_100_random_mlps():
    gen = torch.Generator().manual_seed(0)
    worst, ratios = 0.0, []
    for k in range(100):
        depth = 2 + k % 5  # depths 2–6
        act = ACTS[k % 4]
        mlp, d_in = _random_mlp(gen, depth, act, bias=(k % 10 != 0))
        x = torch.randn(d_in, generator=gen, dtype=F64)
        f = None
        if k % 2:  # a nonlinear f of the output
            w = torch.randn(mlp[-2].out_features, generator=gen, dtype=F64)
            f = lambda out, w=w: torch.sin(out @ w) + (out ** 2).sum()  # noqa: E731
        lhs, rhs = inequality_sides(mlp, x, f)
        assert lhs <= rhs * (1 + 1e-10) + 1e-12, f"case {k}: lhs {float(lhs)} > rhs {float(rhs)}"
        if rhs > 0:
            ratios.append(float(lhs / rhs))
    assert max(ratios) > 0.05  # not vacuous: the left side is a real fraction of the right


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_equality_in_the_one_layer_linear_case(dtype):
    gen = torch.Generator().manual_seed(2)
    lin = nn.Linear(5, 3).to(dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(3, 5, generator=gen).to(dtype))
    U, _, _ = torch.linalg.svd(lin.weight.detach().double())
    u = U[:, 0].to(dtype)
    x = torch.randn(5, generator=gen).to(dtype)
    lhs, rhs = inequality_sides(nn.Sequential(lin), x, lambda z: u @ z, dtype=None)
    expect = 1 + float(x.double() @ x.double())  # LHS = RHS = 1 + ‖x‖²
    assert abs(float(lhs) - expect) <= 1e-6 * expect and abs(float(rhs) - expect) <= 1e-6 * expect
    assert abs(float(lhs) - float(rhs)) <= 1e-6 * expect


def test_equality_fails_for_a_non_singular_direction():
    """Any other f = vᵀz gives a strict inequality (so the equality test is not trivial)."""
    gen = torch.Generator().manual_seed(3)
    lin = nn.Linear(5, 3).to(F64)
    v = torch.randn(3, generator=gen, dtype=F64)
    lhs, rhs = inequality_sides(nn.Sequential(lin), torch.randn(5, generator=gen, dtype=F64), lambda z: v @ z)
    assert lhs < rhs * (1 - 1e-3)


def test_dead_relu_term_is_zero_not_nan():
    lin1, lin2 = nn.Linear(3, 4).to(F64), nn.Linear(4, 2).to(F64)
    with torch.no_grad():
        lin1.weight.zero_()
        lin1.bias.fill_(-1.0)  # every unit dead: J_2 = 0, ∇ₓf = 0
    lhs, rhs = inequality_sides(nn.Sequential(lin1, nn.ReLU(), lin2), torch.ones(3, dtype=F64))
    assert torch.isfinite(lhs) and lhs == 0 and rhs > 0


def test_input_penalty_linear_model_hand_derived_and_finite_difference():
    gen = torch.Generator().manual_seed(4)
    lin = nn.Linear(6, 1).to(F64)
    x = torch.randn(5, 6, generator=gen, dtype=F64)
    pen = input_gradient_penalty(lambda z: lin(z)[:, 0], x)
    w = lin.weight.detach()[0]
    assert torch.isclose(pen, w @ w)  # ∇ₓ(wᵀx + b) = w for every sample
    # a nonlinear f: compare with central finite differences of one sample
    f = lambda z: torch.tanh(lin(z)[:, 0]) * (z ** 2).sum(-1)  # noqa: E731
    per = input_gradient_penalty(f, x, reduction="none")
    eps = 1e-6
    for b in range(2):
        fd = torch.stack([(f(x[b:b + 1] + eps * e) - f(x[b:b + 1] - eps * e))[0] / (2 * eps)
                          for e in torch.eye(6, dtype=F64)])
        assert torch.isclose(per[b], (fd ** 2).sum(), rtol=1e-7)


def test_input_penalty_on_embeddings_trains_the_model():
    torch.manual_seed(5)
    emb, head = nn.Embedding(10, 4).to(F64), nn.Linear(4, 1).to(F64)
    ids = torch.randint(10, (3, 7))
    x = emb(ids)  # (B, T, D): the penalty is taken w.r.t. the embeddings
    pen = input_gradient_penalty(lambda e: torch.tanh(head(e)).sum((1, 2)), x)
    pen.backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    assert emb.weight.grad is not None and emb.weight.grad.abs().sum() > 0
    # descending the penalty lowers it
    opt = torch.optim.SGD([*head.parameters(), *emb.parameters()], lr=0.05)
    before = pen.item()
    for _ in range(20):
        opt.zero_grad()
        pen = input_gradient_penalty(lambda e: torch.tanh(head(e)).sum((1, 2)), emb(ids))
        pen.backward()
        opt.step()
    assert pen.item() < before


def test_parameter_penalty_hand_derived_and_differentiable():
    gen = torch.Generator().manual_seed(6)
    lin = nn.Linear(3, 1).to(F64)
    x = torch.randn(3, generator=gen, dtype=F64)
    out = lin(x)[0]  # f = wᵀx + b: ∇_W f = x, ∇_b f = 1
    pen = parameter_gradient_penalty(out, lin.parameters())
    assert torch.isclose(pen, 1 + x @ x)
    # through a nonlinearity the penalty depends on the weights, and its gradient flows
    lin2 = nn.Linear(1, 1).to(F64)
    loss = torch.tanh(lin2(torch.tanh(lin(x))))[0]
    pen = parameter_gradient_penalty(loss, [*lin.parameters(), *lin2.parameters()])
    pen.backward()
    assert lin.weight.grad.abs().sum() > 0 and lin2.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="scalar"):
        parameter_gradient_penalty(lin(torch.ones(2, 3, dtype=F64)), lin.parameters())


def test_bad_inputs_fail_loudly():
    mlp = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="one sample"):
        inequality_sides(mlp, torch.ones(4, 3))
    with pytest.raises(TypeError, match="first module"):
        inequality_sides(nn.Sequential(nn.Tanh(), nn.Linear(3, 2)), torch.ones(3))
