"""The gradient of the mean loss over data, evaluated as the curvature operators evaluate."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call

from ..data import check_scalar_loss, iter_batches, loss_count, make_loss_closure, to_device, weighted_mean
from ._common import Evaluate, buffer_copies, check_model, operator_mode, select_params

__all__ = ["mean_gradient"]


def mean_gradient(
    model: nn.Module,
    loss_fn: Callable | None,
    data: object,
    params: Sequence[torch.Tensor] | None = None,
    *,
    closure: Callable | None = None,
) -> torch.Tensor:
    """Flat float64 ``(dim,)`` gradient of the mean loss over ``data``: batches
    weighted by :func:`~dyndiag.data.loss_count` (samples; the tokens not ignored for
    language-model batches), as the curvature operators weight them.

    Evaluated as the curvature operators evaluate (dropout off, normalisation layers
    in the model's mode, buffers copied so running statistics never move); ``.grad``
    is never written. Under ``torch.distributed``: the gradient of the union of the
    ranks' shards. ``ValueError`` when ``data`` yields no samples.
    """
    model = check_model(model)
    fn = make_loss_closure(loss_fn, closure)
    names, chosen = select_params(model, params)
    device = chosen[0].device
    evaluate = Evaluate(model, fn)
    dim = sum(p.numel() for p in chosen)
    zero = torch.zeros(dim, dtype=torch.float64, device=device)
    with operator_mode(model):
        return weighted_mean(
            ((_batch_gradient(evaluate, model, names, chosen, to_device(b, device)), n)
             for b in iter_batches(data) if (n := loss_count(b, loss_fn)) > 0),
            zero,
        )


def _batch_gradient(evaluate, model: nn.Module, names: list, chosen: list, batch) -> torch.Tensor:
    """Flat gradient of one batch's mean loss, with copied buffers and fresh leaves."""
    leaves = [p.detach().requires_grad_(True) for p in chosen]
    mapping = {"model." + name: leaf for name, leaf in zip(names, leaves)}
    mapping.update(buffer_copies(model))
    loss = check_scalar_loss(functional_call(evaluate, mapping, (batch,)), "loss_fn/closure")
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, chosen)])
