"""Probes on model outputs: Softmax Collapse of the training logits, per-example scores."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from ..data import IGNORE_INDEX
from ..quantities.softmax import collapsed_fraction
from .base import Probe
from .context import StepContext

__all__ = ["SoftmaxCollapse", "DataScores"]


class SoftmaxCollapse(Probe):
    """``collapsed_fraction``: the fraction of the last training forward's rows whose
    top softmax probability is exactly 1 in the dtype the training loss was computed
    in (float32 for half-precision logits under autocast, else the logits' dtype),
    see :func:`~dyndiag.quantities.softmax_collapse`. The value stays on the
    device (``syncs = False``).

    Rows whose label is ``ignore_index`` are not counted when the labels of that
    forward are known (``ctx.run.targets``): the ``labels`` a Hugging Face model is
    called with, or the targets the training loop passes to the Monitor's
    ``loss_fn`` module together with these logits. For token-level logits
    ``(B, T, V)`` position ``t`` is judged by label ``t + 1`` (``shift_labels``:
    causal LM), so the last position and the positions before an ignored label are
    not counted. Without labels every row counts.
    """

    modifies_state = False
    syncs = False

    needs = frozenset({"logits"})

    def __init__(self, every=1, name=None, *, shift_labels: bool = True, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__(every, name)
        self.shift_labels = shift_labels
        self.ignore_index = ignore_index

    def compute(self, ctx: StepContext) -> Mapping:
        logits, targets = ctx.logits, ctx.run.targets
        fits = (
            logits.dim() in (2, 3)
            and isinstance(targets, torch.Tensor)
            and targets.shape == logits.shape[:-1]
            and not (targets.is_floating_point() or targets.dtype == torch.bool)
        )
        if not fits:  # no labels (or soft ones): every row counts
            logits, targets = logits.reshape(-1, logits.shape[-1]), None
        value = collapsed_fraction(
            logits, targets, dtype=ctx.run.loss_dtype, shift_labels=self.shift_labels, ignore_index=self.ignore_index
        )
        return {"collapsed_fraction": value}


class DataScores(Probe):
    """GraNd and EL2N on a fixed scoring set: ``grand`` and ``el2n`` with keys
    ``mean``, ``p50``, ``p90``, and the per-example arrays ``grand_scores`` and
    ``el2n_scores`` (data order).

    On language-model batches the examples are sequences (one score each, see
    :func:`~dyndiag.quantities.grand_scores` and
    :func:`~dyndiag.quantities.el2n_scores`); the summaries skip NaN scores (sequences
    with no scored token).

    Parameters
    ----------
    data
        The scoring set: one batch or a list of batches (tuples or mappings).
    loss_fn, closure, forward
        How GraNd evaluates the loss, as for :func:`~dyndiag.quantities.grand_scores`
        (default: the run's ``loss_fn`` or ``closure``); ``forward(model, batch) ->
        logits`` is also what EL2N evaluates (default: ``model(inputs)`` on
        ``(inputs, targets)`` batches, ``model(**batch)`` on mappings).
    shift_labels
        Token-level EL2N scores position ``t`` against label ``t + 1`` (causal LM);
        ``False`` for masked LMs and token classification.
    """

    modifies_state = False

    needs = frozenset()

    def __init__(self, data, every=1, name=None, *, loss_fn=None, closure=None, forward=None, shift_labels=True) -> None:
        super().__init__(every, name)
        if loss_fn is not None and closure is not None:
            raise ValueError("give at most one of loss_fn and closure")
        for arg, value in (("closure", closure), ("forward", forward)):
            if value is not None and not callable(value):
                raise TypeError(f"{arg} must be callable, got {type(value).__name__}")
        self.data = data
        self.loss_fn = loss_fn
        self.closure = closure
        self.forward = forward
        self.shift_labels = shift_labels

    def compute(self, ctx: StepContext) -> Mapping:
        from ..quantities.per_example import el2n_scores, grand_scores

        loss_fn, closure = self.loss_fn, self.closure
        if loss_fn is None and closure is None:
            loss_fn = ctx.run.loss_fn
            closure = None if loss_fn is not None else ctx.run.closure
        grand = grand_scores(
            ctx.model, loss_fn, self.data, params=ctx.params, closure=closure,
            forward=self.forward if loss_fn is not None else None, progress=False,
        )
        grand = grand.double().cpu().numpy()
        el2n = el2n_scores(ctx.model, self.data, forward=self.forward, shift_labels=self.shift_labels, progress=False)
        el2n = el2n.double().cpu().numpy()
        return {
            "grand": _summary(grand),
            "el2n": _summary(el2n),
            "grand_scores": grand,
            "el2n_scores": el2n,
        }


def _summary(x: np.ndarray) -> dict:
    x = x[~np.isnan(x)]
    if x.size == 0:
        return {"mean": float("nan"), "p50": float("nan"), "p90": float("nan")}
    return {"mean": float(x.mean()), "p50": float(np.percentile(x, 50)), "p90": float(np.percentile(x, 90))}
