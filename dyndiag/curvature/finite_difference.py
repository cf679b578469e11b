"""Hessian-vector products by central differences of gradients (``hvp="finite_difference"``).

``H v ~ (g(theta + h v) - g(theta - h v)) / (2 h)``, where ``g`` is the gradient of
the operator's loss over all of its data computed by the model's ordinary forward
and ``backward()`` (for an FSDP model, its sharded forward and backward: the
gradient arrives reduce-scattered in ``.grad``). Two gradients per column, no
second-order graph, so it works wherever training works: attention kernels without
a double backward, FSDP-sharded models.

Step rule. The truncation error of a central difference is ``h^2/6 * T[v, v, .]``
(``T`` the third derivative), and the round-off error is about
``eps * |g| / h`` (each gradient carries a relative error of a few ``eps``, which
the division by ``2 h`` amplifies). They balance at ``h ~ eps^(1/3)`` in units
where ``theta`` and ``h v`` have comparable size, so the step is

    h = 0.1 * eps^(1/3) * max(||theta||, 1) / ||v||

(``eps`` of the parameters' dtype; norms over every rank's shard): the
perturbation ``h v`` is a fixed fraction of the parameter vector (``6e-7`` in
float64, ``5e-4`` in float32), whatever the length of ``v``, and at least that
much in absolute terms for tiny parameters. The error is then ``O(eps^(2/3))``
relative to ``||H v||``. The factor 0.1 is measured: on the float64 tanh,
LayerNorm and BatchNorm MLPs of the tests, against the exact Hessian, the largest
relative error of ``H v`` over the three was 3e-10 (float64) and 2e-4 (float32)
with 0.1, against 1e-9 and 7e-4 with 1 and 3e-9 and 2e-3 with 0.01: the
normalisation layers' third derivatives are large enough that a shorter step pays.
A sum-reduced loss on a parameter subset gave 6e-10 (float64).
``tests/test_finite_difference.py`` asserts 1e-8 (float64) and 2e-3 (float32).

Side effects: the parameters are moved in place and written back from a saved copy
(bitwise), each ``.grad`` object is put back with its values, buffers (BatchNorm
statistics), modes and RNG states are restored (:func:`dyndiag.state.preserve_state`);
the model runs as in every operator (dropout off, normalisation layers in the
model's mode).
"""

from __future__ import annotations

import math

import torch

from ..data import check_scalar_loss
from ..distributed import all_reduce_max, all_reduce_sum, world_size
from ..evaluation import operator_mode
from ..state import preserve_state
from .sharded import local
from .vectors import reduce

__all__ = ["central_differences", "step_size"]


def step_size(theta_norm: float, v_norm: float, dtype: torch.dtype) -> float:
    """The central-difference step ``h`` for a direction of norm ``v_norm`` at
    parameters of norm ``theta_norm`` (see the module's step rule)."""
    return 0.1 * torch.finfo(dtype).eps ** (1 / 3) * max(theta_norm, 1.0) / v_norm


def central_differences(op, V: torch.Tensor) -> torch.Tensor:
    """``H V`` for a ``(dim, k)`` block of ``op``'s vectors, two gradients per column.

    ``op`` is a :class:`~dyndiag.curvature.operators.HessianOperator`; a sharded
    operator's columns are local shards and so is the result.
    """
    out = torch.zeros_like(V)
    with preserve_state(op.model, params=True, grads=True, buffers=False, rng=False), operator_mode(op.model):
        live = [local(p) for p in op.params]
        with torch.no_grad():
            base = [t.detach().clone() for t in (op._at if op._at is not None else live)]
        theta_norm = math.sqrt(float(reduce(op, sum(b.double().pow(2).sum() for b in base).reshape(1))))
        for j in range(V.shape[1]):
            v = V[:, j]
            v_norm = math.sqrt(float(reduce(op, v.double().pow(2).sum().reshape(1))))
            if v_norm == 0:
                continue
            h = step_size(theta_norm, v_norm, op.dtype)
            parts = [t.view_as(b) for t, b in zip(torch.split(v, [b.numel() for b in base]), base)]
            plus = _gradient_at(op, live, base, parts, h)
            minus = _gradient_at(op, live, base, parts, -h)
            out[:, j] = (plus - minus) / (2 * h)
    return out


def _gradient_at(op, live, base, parts, h: float) -> torch.Tensor:
    """The flat (local) gradient of the loss over all data at ``base + h * parts``."""
    with torch.no_grad():
        for t, b, d in zip(live, base, parts):
            t.copy_(b).add_(d, alpha=h)
    for p in op.model.parameters():
        p.grad = None
    batches = list(op._batches())
    count = sum(n for _, n in batches)
    if op.shards is not None:
        # FSDP's forward and backward are collectives: every rank must run as many.
        lengths = all_reduce_max(torch.tensor([len(batches), -len(batches)], dtype=torch.float64))
        if lengths[0] != -lengths[1]:
            raise ValueError(
                "hvp='finite_difference' on an FSDP model runs FSDP's forward and backward, collectives "
                "every rank must enter together: give every rank the same number of batches"
            )
    for batch, n in batches:
        if n <= 0 and op.shards is None:
            continue
        out = op._evaluate(batch)
        loss = check_scalar_loss(out, "closure") if op.loss_fn is None else op._criterion(out, batch)
        (loss * n if op.reduction == "mean" else loss).backward()
    g = torch.cat(
        [
            torch.zeros(t.numel(), dtype=op.dtype, device=t.device) if p.grad is None else local(p.grad).reshape(-1)
            for p, t in zip(op.params, live)
        ]
    )
    if op.shards is not None:
        # FSDP's reduce-scatter averaged the ranks' gradients (its default divide
        # factor, the world size): undo the mean, the weights are per sample.
        g = g * world_size()
    else:
        g = all_reduce_sum(g)
    count_t = all_reduce_sum(torch.tensor([float(count)], dtype=torch.float64))
    if count_t.item() == 0:
        raise ValueError("data yielded no samples")
    return g / count_t.item() if op.reduction == "mean" else g
