"""Input- and parameter-gradient penalties, and the inequality between them.

ALGORITHMS.md §2 (kexue.fm/archives/8796, after "Geometric Occam's Razor", arXiv 2111.15090).
For an l-layer MLP h^{(t+1)} = g^{(t)}(W^{(t)} h^{(t)} + b^{(t)}), h^{(1)} = x, and any scalar f of
h^{(l+1)}, at one sample x:

    ‖∇ₓf‖² Σ_t (1 + ‖h^{(t)}‖²) / (‖W^{(t)}‖₂² ‖∇ₓh^{(t)}‖₂²)  ≤  ‖∇_θ f‖²,

with spectral norms ‖·‖₂ for W and the Jacobian ∇ₓh^{(t)} (the identity for t = 1), and the
per-sample parameter gradient on the right. Both penalties are differentiable
(create_graph=True), so they can be added to a loss. Pure torch.
"""
from __future__ import annotations

import copy
from typing import Callable, Iterable

import torch
from torch import nn


def input_gradient_penalty(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                           create_graph: bool = True, reduction: str = "mean") -> torch.Tensor:
    """Per-sample ‖∇ₓ f(x_b)‖², reduced over the batch (first dim of x).

    x: (B, ...) inputs — for text, the embeddings (B, T, D), not the token ids. f maps x to one
    scalar per sample, (B,) (anything else is summed per sample). The per-sample gradients come
    from one backward pass of Σ_b f(x_b), exact as long as samples do not interact (no batch
    norm in train mode). ``reduction``: "mean", "sum" or "none" ((B,)). With create_graph the
    penalty trains the parameters of f (and whatever produced x).
    """
    if not x.requires_grad:
        x = x.detach().requires_grad_(True)
    y = f(x)
    if y.dim() == 0:
        raise ValueError("f must return one value per sample (B,), got a scalar; for a single sample "
                         "pass x with a leading batch dimension of 1")
    (gx,) = torch.autograd.grad(y.sum(), x, create_graph=create_graph)  # (B, ...)
    per_sample = gx.pow(2).flatten(1).sum(1)  # (B,)
    return _reduce(per_sample, reduction)


def parameter_gradient_penalty(loss: torch.Tensor, params: Iterable[torch.Tensor],
                               create_graph: bool = True) -> torch.Tensor:
    """‖∇_θ loss‖² over ``params`` (parameters the loss does not reach contribute 0).

    ``loss`` is one scalar: for the batch loss this is the implicit-gradient-regularisation
    penalty; it is *not* the per-sample quantity of the inequality unless the loss is one
    sample's f (ALGORITHMS.md §2, pitfall 1).
    """
    if loss.dim() != 0:
        raise ValueError(f"loss must be a scalar, got shape {tuple(loss.shape)}; reduce it (e.g. .mean()) first")
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no parameter requires grad: nothing to penalise")
    grads = torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)
    terms = [g.pow(2).sum() for g in grads if g is not None]
    return torch.stack(terms).sum() if terms else loss.new_zeros(())


def _reduce(v: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return v.mean()
    if reduction == "sum":
        return v.sum()
    if reduction == "none":
        return v
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


# ----------------------------------------------------------------------------- the inequality

def mlp_layers(mlp: nn.Sequential) -> list[tuple[nn.Linear, list[nn.Module]]]:
    """Split an nn.Sequential into (Linear, [activation modules after it]) layers."""
    if not isinstance(mlp, nn.Sequential) or len(mlp) == 0:
        raise TypeError(f"mlp must be a non-empty nn.Sequential of Linear and activation modules, "
                        f"got {type(mlp).__name__}")
    layers: list[tuple[nn.Linear, list[nn.Module]]] = []
    for i, m in enumerate(mlp):
        if isinstance(m, nn.Linear):
            layers.append((m, []))
        elif not layers:
            raise TypeError(f"mlp[{i}] is {type(m).__name__}: the first module must be nn.Linear")
        elif isinstance(m, nn.Sequential):
            raise TypeError(f"mlp[{i}] is a nested nn.Sequential; flatten the MLP first")
        else:
            layers[-1][1].append(m)  # part of g^{(t)}
    return layers


def _forward_hidden(layers, x: torch.Tensor) -> list[torch.Tensor]:
    """[h^{(1)} = x, h^{(2)}, ..., h^{(l+1)}] for one sample x (d_in,)."""
    hs = [x]
    for lin, acts in layers:
        h = lin(hs[-1])  # z^{(t+1)}
        for a in acts:
            h = a(h)
        hs.append(h)
    return hs


def _spectral(A: torch.Tensor) -> torch.Tensor:
    return torch.linalg.matrix_norm(A, ord=2)


def inequality_sides(mlp: nn.Sequential, x: torch.Tensor,
                     f: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     dtype: torch.dtype | None = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """(lhs, rhs) of the §2 inequality at one sample x (d_in,); lhs ≤ rhs always.

    lhs = ‖∇ₓf‖² Σ_t (1 + ‖h^{(t)}‖²) / (‖W^{(t)}‖₂² ‖∇ₓh^{(t)}‖₂²)  (no "1 +" for a bias-free layer;
    a term with a zero Jacobian or zero W is 0, since then ∇ₓf = 0 too),
    rhs = Σ_t ‖∇_{W^{(t)}} f‖_F² + ‖∇_{b^{(t)}} f‖². f: scalar function of the output h^{(l+1)}
    (default: the sum of the outputs; the equality case is f = uᵀz with u the top left singular
    vector of a single linear layer). ``dtype``: evaluate on a copy in this dtype (None: as is).
    """
    if x.dim() != 1:
        raise ValueError(f"x must be one sample of shape (d_in,), got {tuple(x.shape)}; "
                         f"the inequality is pointwise (per-sample gradients)")
    if dtype is not None:
        mlp, x = copy.deepcopy(mlp).to(dtype), x.to(dtype)
    f = (lambda out: out.sum()) if f is None else f
    layers = mlp_layers(mlp)
    x = x.detach().requires_grad_(True)
    hs = _forward_hidden(layers, x)
    params = [p for lin, _ in layers for p in ((lin.weight,) if lin.bias is None else (lin.weight, lin.bias))]
    fx = f(hs[-1])
    if fx.dim() != 0:
        raise ValueError(f"f must return a scalar, got shape {tuple(fx.shape)}")
    gx, *gparams = torch.autograd.grad(fx, [x, *params], allow_unused=True)
    rhs = sum(g.pow(2).sum() for g in gparams if g is not None)
    gx2 = gx.pow(2).sum() if gx is not None else x.new_zeros(())
    jacs = _hidden_jacobians(layers, x.detach())  # [(d_t, d_in) for t = 1..l]
    lhs_sum = x.new_zeros(())
    for (lin, _), h, J in zip(layers, hs[:-1], jacs):
        denom = _spectral(lin.weight.detach()) ** 2 * _spectral(J) ** 2
        if denom > 0:
            num = h.detach().pow(2).sum() + (0.0 if lin.bias is None else 1.0)
            lhs_sum = lhs_sum + num / denom
    return (gx2 * lhs_sum).detach(), torch.as_tensor(rhs).detach()


def _hidden_jacobians(layers, x: torch.Tensor) -> list[torch.Tensor]:
    """J_t = ∂h^{(t)}/∂x, (d_t, d_in), for t = 1..l (J_1 = I)."""
    def hidden(x_):
        return tuple(_forward_hidden(layers, x_)[1:-1])  # h^{(2)} .. h^{(l)}
    eye = torch.eye(x.shape[0], dtype=x.dtype, device=x.device)
    if len(layers) == 1:
        return [eye]
    jac = torch.autograd.functional.jacobian(hidden, x)
    return [eye, *jac]
