"""Closed-form Hessians of common criteria with respect to the model's outputs.

The GGN ``J^T H_L J`` needs ``H_L u`` for the criterion's Hessian ``H_L``. For
cross-entropy and MSE it has a closed form, so a GGN product never differentiates
the loss twice (on a language model, a double backward through the loss holds
several copies of the ``(tokens, vocabulary)`` logits):

* softmax cross-entropy (``nn.CrossEntropyLoss``, :class:`~dyndiag.data.CausalLMLoss`):
  per row, ``w * (diag(p) - p p^T) u`` with ``p`` the row's softmax and ``w`` the
  row's weight in the reduction (``1 / count`` of the rows not ignored for a mean,
  1 for a sum, 0 for ignored rows). Label smoothing leaves the matrix unchanged
  (each class's ``-log p_c`` has the same Hessian), so it changes nothing here;
* ``nn.MSELoss``: ``2 u / numel`` for a mean, ``2 u`` for a sum.

Anything else (other criteria, class weights, shapes these rules do not cover)
gets ``None``, and the caller differentiates the criterion instead.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..data import CausalLMLoss

__all__ = ["loss_hessian"]


def loss_hessian(loss_fn: object, outputs: torch.Tensor, targets: object) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``u -> H_L u`` (``u`` shaped like ``outputs``) for ``loss_fn(outputs, targets)``
    in closed form, or ``None`` where no closed form applies."""
    reduction = getattr(loss_fn, "reduction", None)
    if reduction not in ("mean", "sum") or not isinstance(targets, torch.Tensor):
        return None
    mean = reduction == "mean"
    if isinstance(loss_fn, CausalLMLoss):
        if outputs.dim() != 3 or targets.shape != outputs.shape[:2]:
            return None
        rows = torch.zeros(targets.shape, dtype=outputs.dtype, device=outputs.device)
        rows[:, :-1] = targets[:, 1:] != loss_fn.ignore_index  # position t predicts token t + 1
        return _softmax_hessian(outputs, rows / rows.sum().clamp_min(1) if mean else rows, -1)
    if type(loss_fn) is nn.CrossEntropyLoss and loss_fn.weight is None:
        class_dim = 0 if outputs.dim() == 1 else 1
        if targets.is_floating_point():  # class probabilities: a row weighs the sum of its (smoothed) targets
            if targets.shape != outputs.shape:
                return None
            eps = loss_fn.label_smoothing
            rows = (1 - eps) * targets.to(outputs.dtype).sum(class_dim) + eps
            return _softmax_hessian(outputs, rows / max(rows.numel(), 1) if mean else rows, class_dim)
        if targets.shape != outputs.shape[:class_dim] + outputs.shape[class_dim + 1 :]:
            return None
        rows = (targets != loss_fn.ignore_index).to(outputs.dtype)
        return _softmax_hessian(outputs, rows / rows.sum().clamp_min(1) if mean else rows, class_dim)
    if type(loss_fn) is nn.MSELoss and targets.shape == outputs.shape:
        scale = 2.0 / outputs.numel() if reduction == "mean" else 2.0
        return lambda u: scale * u
    return None


def _softmax_hessian(logits: torch.Tensor, weights: torch.Tensor, class_dim: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``u -> w * p * (u - <p, u>)`` (that is ``w * (diag(p) - p p^T) u``) along ``class_dim``: ``p`` the softmax of
    ``logits``, ``w`` each row's weight in the loss (``weights``, shaped like the
    logits without ``class_dim``)."""
    p = torch.softmax(logits.detach(), dim=class_dim)
    w = weights.unsqueeze(class_dim)

    def apply(u: torch.Tensor) -> torch.Tensor:
        # p * (u - <p, u>) * w with one logits-sized temporary alive at a time (a language
        # model's largest tensors).
        return (u - (p * u).sum(class_dim, keepdim=True)).mul_(p).mul_(w)

    return apply
