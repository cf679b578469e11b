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
    ``el2n_scores`` (data order)."""

    modifies_state = False

    needs = frozenset()

    def __init__(self, data, every=1, name=None, *, loss_fn=None) -> None:
        super().__init__(every, name)
        self.data = data
        self.loss_fn = loss_fn

    def compute(self, ctx: StepContext) -> Mapping:
        from ..quantities.per_example import el2n_scores, grand_scores

        loss_fn = self.loss_fn or ctx.run.loss_fn
        closure = None if loss_fn is not None else ctx.run.closure
        grand = grand_scores(ctx.model, loss_fn, self.data, params=ctx.params, closure=closure, progress=False)
        grand = grand.double().cpu().numpy()
        el2n = el2n_scores(ctx.model, self.data, progress=False).double().cpu().numpy()
        return {
            "grand": _summary(grand),
            "el2n": _summary(el2n),
            "grand_scores": grand,
            "el2n_scores": el2n,
        }


def _summary(x: np.ndarray) -> dict:
    return {"mean": float(x.mean()), "p50": float(np.percentile(x, 50)), "p90": float(np.percentile(x, 90))}
