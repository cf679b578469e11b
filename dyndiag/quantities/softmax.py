"""Softmax Collapse and naive loss minimisation ("Grokking at the Edge of Numerical
Stability", Prieto et al. 2025).

Softmax Collapse: when one logit dominates, ``sum_j exp(z_j - max z)`` rounds to
exactly 1 in the working dtype; that row's loss for its argmax class and the
gradient of that logit are then exactly zero, and the example stops teaching.
Naive loss minimisation: past overfitting the gradient aligns with the weights, so
training only scales the logits up.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ._common import check_model, select_params
from .gradients import mean_gradient

__all__ = ["softmax_collapse", "collapsed_fraction", "gradient_weight_cosine"]


def softmax_collapse(logits: torch.Tensor) -> float:
    """Fraction of rows whose largest softmax probability is exactly 1 in ``logits.dtype``.

    A row collapses when ``s = sum_j exp(z_j - max_j z_j)`` equals 1 after rounding
    to the logits' dtype, i.e. its top probability ``exp(0) / s`` is exactly 1.0 and
    its cross-entropy for the argmax class is exactly 0. Computed entirely in the
    logits' dtype — never upcast, since the phenomenon is the dtype's rounding
    (float64 collapses orders of magnitude later than float32). torch accumulates
    float16/bfloat16 sums in float32 internally and rounds the result to the dtype,
    as its own softmax kernels do.

    Parameters
    ----------
    logits
        ``(n, C)`` floating-point tensor, ``n >= 1`` rows, ``C >= 1`` classes (for
        sequence models flatten to ``(-1, C)`` first). Rows holding NaN or inf
        never count as collapsed.

    Returns
    -------
    float
        The collapsed fraction in ``[0, 1]``.
    """
    return float(collapsed_fraction(logits))


def collapsed_fraction(logits: torch.Tensor) -> torch.Tensor:
    """:func:`softmax_collapse` as a 0-d float64 tensor on the logits' device (float32 on MPS), computed
    without a host synchronisation (what the SoftmaxCollapse probe records).

    Parameters
    ----------
    logits
        As for :func:`softmax_collapse`: ``(n, C)`` floating point, ``n, C >= 1``.
    """
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D (n, C), got shape {tuple(logits.shape)}")
    if not logits.dtype.is_floating_point:
        raise TypeError(f"logits must be floating point, got dtype {logits.dtype}")
    n, C = logits.shape
    if n == 0 or C == 0:
        raise ValueError(f"logits must have at least one row and one column, got shape {tuple(logits.shape)}")
    z = logits.detach()
    s = torch.exp(z - z.amax(dim=1, keepdim=True)).sum(dim=1)
    # An exact count divided in float64: the same number as float(count) / n (MPS has no float64).
    return (s == 1).sum(dtype=torch.float32 if z.device.type == "mps" else torch.float64) / n


def gradient_weight_cosine(
    model: nn.Module,
    loss_fn: Callable | None,
    data: object,
    params: Sequence[torch.Tensor] | None = None,
    *,
    closure: Callable | None = None,
) -> float:
    """Cosine between the full loss gradient and the weights, flat over ``params``.

    ``cos(g, theta) = g . theta / (||g|| ||theta||)`` with ``g`` the gradient of the
    sample-weighted mean loss over ``data``. Under naive loss minimisation the
    descent direction ``-g`` points along ``theta`` (training only scales the
    weights and so the logits), and the value approaches **-1**.

    The model is evaluated as the curvature operators evaluate it: dropout off,
    normalisation layers in the model's own mode, running statistics untouched;
    ``.grad`` is never written.

    Parameters
    ----------
    model, loss_fn, data, params, closure
        As for :class:`dyndiag.HessianOperator`: a criterion with mean reduction (or
        ``closure(model, batch) -> scalar``), one batch or an iterable of batches
        (weighted by their sizes), and the parameters (default: every parameter
        with ``requires_grad``).

    Returns
    -------
    float
        The cosine in ``[-1, 1]`` (dimensionless); NaN when the gradient or the
        weights are zero. Under ``torch.distributed`` the gradient is that of the
        union of the ranks' shards.
    """
    model = check_model(model)
    _, chosen = select_params(model, params)
    g = mean_gradient(model, loss_fn, data, params, closure=closure)
    theta = torch.cat([p.detach().reshape(-1) for p in chosen]).double()
    denom = torch.linalg.vector_norm(g) * torch.linalg.vector_norm(theta)
    if float(denom) == 0:
        return float("nan")
    return float(((g @ theta) / denom).clamp(-1, 1))
