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

from ..data import IGNORE_INDEX
from ._common import check_model, select_params
from .gradients import mean_gradient

__all__ = ["softmax_collapse", "collapsed_fraction", "loss_dtype", "gradient_weight_cosine"]


def softmax_collapse(
    logits: torch.Tensor,
    targets: torch.Tensor | None = None,
    *,
    dtype: torch.dtype | None = None,
    shift_labels: bool = True,
    ignore_index: int = IGNORE_INDEX,
) -> float:
    """Fraction of rows whose largest softmax probability is exactly 1 in the dtype
    the loss is computed in.

    A row collapses when ``s = sum_j exp(z_j - max_j z_j)`` equals 1 after rounding
    to that dtype, i.e. its top probability ``exp(0) / s`` is exactly 1.0 and its
    cross-entropy for the argmax class is exactly 0. Judged by torch's own
    ``log_softmax`` (the kernel ``cross_entropy`` runs) in that dtype, so a row
    counts exactly when ``cross_entropy(row, argmax)`` is 0. Never upcast beyond
    that dtype, since the phenomenon is the dtype's rounding (float64 collapses
    orders of magnitude later than float32).

    Parameters
    ----------
    logits
        ``(n, C)`` floating-point scores, or token-level ``(B, T, V)`` (a language
        model's), at least one row and one class. Rows holding NaN or ``+inf``
        never count as collapsed.
    targets
        Optional integer labels, ``(n,)`` or ``(B, T)``: rows whose label is
        ``ignore_index`` (padding, prompt tokens) are not counted. For
        ``(B, T, V)`` logits with ``shift_labels`` position ``t`` is judged by
        label ``t + 1`` (the causal shift of :class:`~dyndiag.data.CausalLMLoss` and
        Hugging Face causal LMs), so the last position is never counted.
        ``None``: every row counts.
    dtype
        The dtype the loss is computed in (default: the logits' dtype). Under
        autocast, cross-entropy runs in float32: pass ``torch.float32`` for
        half-precision logits captured there (:func:`loss_dtype` tells).
    shift_labels
        Token-level logits only: ``False`` when ``logits[:, t]`` predicts
        ``targets[:, t]`` (masked LM, token classification).
    ignore_index
        The label value of rows not counted.

    Returns
    -------
    float
        The collapsed fraction in ``[0, 1]`` of the counted rows; NaN when no row
        is counted (every label ignored).
    """
    return float(collapsed_fraction(logits, targets, dtype=dtype, shift_labels=shift_labels, ignore_index=ignore_index))


def collapsed_fraction(
    logits: torch.Tensor,
    targets: torch.Tensor | None = None,
    *,
    dtype: torch.dtype | None = None,
    shift_labels: bool = True,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """:func:`softmax_collapse` as a 0-d float64 tensor on the logits' device (float32 on MPS), computed
    without a host synchronisation (what the SoftmaxCollapse probe records).

    Parameters are as for :func:`softmax_collapse`.
    """
    collapsed, counted = _collapsed_rows(logits, targets, dtype, shift_labels, ignore_index)
    # An exact count divided in float64: the same number as float(count) / n (MPS has no float64).
    exact = torch.float32 if collapsed.device.type == "mps" else torch.float64
    if counted is None:
        return collapsed.sum(dtype=exact) / collapsed.numel()
    return (collapsed & counted).sum(dtype=exact) / counted.sum(dtype=exact)


def _collapsed_rows(
    logits: object, targets: object, dtype: object, shift_labels: bool, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(collapsed, counted)``: bool per row (flat), and the rows counted (None: all)."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits must be 2-D (n, C) or 3-D (B, T, V), got shape {tuple(logits.shape)}")
    if not logits.dtype.is_floating_point:
        raise TypeError(f"logits must be floating point, got dtype {logits.dtype}")
    if logits.numel() == 0:
        raise ValueError(f"logits must have at least one row and one column, got shape {tuple(logits.shape)}")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    z = logits.detach() if logits.requires_grad else logits  # the Monitor's logits are detached already
    counted = None
    if targets is not None:
        if not isinstance(targets, torch.Tensor) or targets.dtype.is_floating_point or targets.dtype == torch.bool:
            raise TypeError(f"targets must be an integer tensor of labels, got {_describe(targets)}")
        if targets.shape != z.shape[:-1]:
            raise ValueError(f"targets must have shape {tuple(z.shape[:-1])} (the logits' rows), got {tuple(targets.shape)}")
        targets = targets.detach().to(z.device)
        if z.dim() == 3 and shift_labels:
            z, targets = z[:, :-1], targets[:, 1:]
        counted = (targets != ignore_index).reshape(-1)
    if z.dim() != 2:
        z = z.reshape(-1, z.shape[-1])
    if dtype is not None and dtype != z.dtype:
        z = z.to(dtype)
    # The loss kernel's own rounding: a hand-written exp-sum reduces in another order
    # and disagrees with cross_entropy on rows at the edge of collapse.
    return torch.log_softmax(z, dim=-1).amax(dim=-1) == 0, counted


def _describe(x: object) -> str:
    return f"dtype {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__


def loss_dtype(logits: torch.Tensor) -> torch.dtype:
    """The dtype cross-entropy computes in on ``logits`` here and now: float32 for
    float16/bfloat16 logits inside an autocast region of their device (autocast runs
    ``log_softmax``/``cross_entropy`` in float32), else the logits' own dtype."""
    if logits.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(logits.device.type):
        return torch.float32
    return logits.dtype


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
