"""Independent exact references for the curvature tests (float64, small models).

The Hessian is built by double backward over the identity on a deep copy of the
model, with the model's own forward — no torch.func, no dyndiag code — because
torch.func.hessian is wrong for LayerNorm/BatchNorm models in torch 2.13.
"""

from __future__ import annotations

import copy
import functools

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel


def _prepared_copy(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model)
    for m in model.modules():  # the operator's rule: dropout off, norm layers keep their mode
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()
    return model


def _weights(loss_fn, batches):
    """Each batch's weight in the loss over all of them: n_b / N for a mean, 1 for a sum;
    n_b is ``loss_fn.count(y)`` where the criterion counts its terms (tokens), else samples."""
    if getattr(loss_fn, "reduction", "mean") == "sum":
        return [1.0] * len(batches)
    counts = [loss_fn.count(y) if hasattr(loss_fn, "count") else len(y) for _, y in batches]
    return [n / sum(counts) for n in counts]


def _call(model, x):
    """The model on a batch's inputs: ``model(x)``, or ``model(**x)`` for a dict."""
    return model(**x) if isinstance(x, dict) else model(x)


def total_loss(model, loss_fn, batches):
    return sum(w * loss_fn(_call(model, x), y) for w, (x, y) in zip(_weights(loss_fn, batches), batches))


def _math_attention(fn):
    """Run ``fn`` with PyTorch's MATH attention kernel: the fused CPU kernels have no double backward."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with sdpa_kernel(SDPBackend.MATH):
            return fn(*args, **kwargs)

    return wrapped


@_math_attention
def exact_hessian(model, loss_fn, batches, param_names=None) -> torch.Tensor:
    """(dim, dim) Hessian of the loss over ``batches`` (``(x, y)`` pairs, ``x`` a tensor
    or a dict of keyword inputs): the count-weighted mean of batch means, or the sum of
    batch sums for ``reduction="sum"``; unused parameters get zeros."""
    model = _prepared_copy(model)
    named = dict(model.named_parameters())
    names = param_names or [n for n, p in named.items() if p.requires_grad]
    params = [named[n] for n in names]
    for p in params:
        p.requires_grad_(True)
    g = torch.autograd.grad(total_loss(model, loss_fn, batches), params, create_graph=True, allow_unused=True)
    flat = torch.cat([(torch.zeros_like(p) if gi is None else gi).reshape(-1) for gi, p in zip(g, params)])
    rows = []
    for i in range(flat.numel()):
        if flat[i].requires_grad:
            parts = torch.autograd.grad(flat[i], params, retain_graph=True, allow_unused=True)
        else:
            parts = [None] * len(params)
        rows.append(torch.cat([(torch.zeros_like(p) if h is None else h).reshape(-1) for h, p in zip(parts, params)]))
    return torch.stack(rows)


@_math_attention
def exact_ggn(model, loss_fn, batches, param_names=None) -> torch.Tensor:
    """(dim, dim) J^T H_L J summed over batches with the loss's weights, by explicit Jacobians."""
    model = _prepared_copy(model)
    named = dict(model.named_parameters())
    names = param_names or [n for n, p in named.items() if p.requires_grad]
    base = {n: p.detach() for n, p in named.items()}
    G = 0
    for w, (x, y) in zip(_weights(loss_fn, batches), batches):
        def f(*flat_params):
            mapping = dict(base)
            mapping.update(dict(zip(names, flat_params)))
            return torch.func.functional_call(model, mapping, (), x) if isinstance(x, dict) else (
                torch.func.functional_call(model, mapping, (x,)))

        out = f(*[base[n] for n in names])
        J = torch.autograd.functional.jacobian(f, tuple(base[n] for n in names))
        J = torch.cat([j.reshape(out.numel(), -1) for j in J], dim=1)
        HL = torch.autograd.functional.hessian(lambda o: loss_fn(o.reshape(out.shape), y), out.reshape(-1))
        G = G + w * (J.T @ HL @ J)
    return G
