"""Safe step radius along a direction ("Ghosts of Softmax").

Cross-entropy is analytic in the step length ``tau`` only within a radius set by the
complex zeros of the softmax partition function ``sum_k exp(z_k + tau a_k)``. To first
order along a direction ``v`` each sample's logits move as ``z + tau a`` with
``a_k = grad z_k . v``, and the nearest complex zero lies at
``|tau| = pi / (max_k a_k - min_k a_k)``. A step ``theta + tau v`` is safe for
``tau`` below the smallest such radius over the samples; a ratio
``tau / radius >= 1`` predicts a loss spike.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call, jvp

from ..data import iter_batches, to_device
from ..evaluation import outputs_fn
from ..distributed import all_reduce_max
from ._common import (
    Evaluate,
    buffer_copies,
    check_at,
    check_flat,
    check_model,
    operator_mode,
    select_params,
)

__all__ = ["safe_step_radius"]

with warnings.catch_warnings():
    # torch's forward-AD decompositions load on the first jvp and call the deprecated
    # torch.jit.script; load them here once so users are not shown torch's own warning.
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=DeprecationWarning)
    try:
        import torch._decomp.decompositions_for_jvp  # noqa: F401
    except ImportError:  # pragma: no cover - layout differs across torch versions
        pass


def safe_step_radius(
    model: nn.Module,
    data: object,
    direction: torch.Tensor,
    *,
    params: Sequence[torch.Tensor] | None = None,
    forward: Callable | None = None,
    at: Sequence[torch.Tensor] | None = None,
) -> float:
    """The largest safe step length along ``direction``: ``min_i pi / spread_i``.

    For each sample ``i`` with logits ``z_i`` (``C`` classes), ``a_i = J_i v`` is the
    directional derivative of its logits along ``v`` (one forward-mode JVP per
    batch, ``torch.func.jvp`` over ``functional_call``), and
    ``spread_i = max_k a_ik - min_k a_ik``.

    The model is evaluated as the curvature operators evaluate it: dropout off,
    normalisation layers in the model's own mode (train-mode BatchNorm uses the
    batch's statistics, and its JVP includes them), running statistics untouched.

    Parameters
    ----------
    model
        A classifier returning logits ``(..., C)``; every leading index is a sample
        (a sequence model's ``(n, T, C)`` gives ``n * T`` samples).
    data
        One batch ``(inputs, targets)`` or an iterable of batches; only the inputs
        are used.
    direction
        Flat ``(dim,)`` tensor ``v`` in parameter order and dtype. The SafeStepRadius
        probe passes the real update ``theta_after - theta_before``, so a step of the
        update itself has ``tau = 1``.
    params
        The parameters ``v`` moves (default: every parameter with ``requires_grad``).
    forward
        ``forward(model, batch) -> logits`` for batches that are not
        ``(inputs, targets)``.
    at
        Parameter values (one tensor per parameter of ``params``, in order) to take
        the derivative at instead of the model's current ones, e.g. a saved
        ``theta_before``; the model is never moved.

    Returns
    -------
    float
        The radius in units of ``||v||`` (the step ``theta + tau v`` is safe for
        ``tau < radius``); ``inf`` when no sample's logits spread along ``v`` (e.g.
        ``v = 0``). Under ``torch.distributed``, the minimum over every rank's
        samples.
    """
    model = check_model(model)
    if forward is not None and not callable(forward):
        raise TypeError(f"forward must be callable (model, batch) -> logits, got {type(forward).__name__}")
    names, chosen = select_params(model, params)
    dtype, device = chosen[0].dtype, chosen[0].device
    dim = sum(p.numel() for p in chosen)
    v = check_flat(direction, "direction", dim, dtype).to(device)
    values = tuple(check_at(at, chosen) if at is not None else [p.detach() for p in chosen])
    tangents = tuple(t.reshape(p.shape) for t, p in zip(torch.split(v, [p.numel() for p in chosen]), chosen))
    keys = ["model." + n for n in names]

    evaluate = Evaluate(model, outputs_fn(forward))
    spread = torch.zeros(1, dtype=torch.float64, device=device)
    with operator_mode(model):
        for batch in iter_batches(data):
            batch = to_device(batch, device)

            def logits_of(tensors, batch=batch):
                mapping = dict(zip(keys, tensors))
                mapping.update(buffer_copies(model))  # fresh copies: running statistics never move
                return functional_call(evaluate, mapping, (batch,))

            _, a = jvp(logits_of, (values,), (tangents,))
            if not isinstance(a, torch.Tensor) or a.dim() < 2:
                shape = tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__
                raise ValueError(f"the model must return logits of shape (..., C), got {shape}")
            a = a.detach().reshape(-1, a.shape[-1])
            if a.numel():
                spread = torch.maximum(spread, (a.amax(1) - a.amin(1)).max().double().reshape(1))
    spread = all_reduce_max(spread)
    s = float(spread.item())
    return math.inf if s == 0 else math.pi / s
