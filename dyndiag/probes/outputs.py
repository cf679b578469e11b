"""Probes on model outputs: Softmax Collapse of the training logits, per-example scores."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..quantities.softmax import collapsed_fraction
from .base import Probe
from .context import StepContext

__all__ = ["SoftmaxCollapse", "DataScores"]


class SoftmaxCollapse(Probe):
    """``collapsed_fraction``: the fraction of the last training forward's rows whose
    top softmax probability is exactly 1 in the logits' dtype (the value stays on
    the device: ``syncs = False``)."""

    modifies_state = False
    syncs = False

    needs = frozenset({"logits"})

    def compute(self, ctx: StepContext) -> Mapping:
        logits = ctx.logits
        return {"collapsed_fraction": collapsed_fraction(logits.reshape(-1, logits.shape[-1]))}


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
