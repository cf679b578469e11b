"""Probes on the training gradients and per-example gradients."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .base import Probe
from .context import StepContext

__all__ = ["GradientNorm", "GradientCoherence"]


class GradientNorm(Probe):
    """``grad_norm``: the L2 norm of the gradient the optimizer's step applies (all
    parameters; after clipping and unscaling: read just before the update), and per
    parameter tensor (keys = parameter names) when ``per_layer=True``;
    ``grad_norm_before_clip``: the norm of the gradient accumulated by the end of the
    last backward before the step (divided by the Monitor's ``grad_scaler`` scale);
    recorded when a backward was seen since the previous step (not offline, where
    the gradient is dyndiag's own and never clipped).

    Computed in the gradients' dtype with foreach kernels; the values stay on the
    device (``syncs = False``)."""

    modifies_state = False
    syncs = False

    needs = frozenset({"gradients", "before_clip"})

    def __init__(self, every=1, name=None, *, per_layer: bool = False) -> None:
        super().__init__(every, name)
        self.per_layer = per_layer

    def compute(self, ctx: StepContext) -> Mapping:
        grads = ctx.grads
        with torch.no_grad():
            if all(g is not None for g in grads):  # the usual case (`in` would compare tensors)
                per = list(torch._foreach_norm(grads)) if grads else []
            else:
                norms = iter(torch._foreach_norm([g for g in grads if g is not None]))
                per = [None if g is None else next(norms) for g in grads]
        total = _l2(per)
        out: dict = {"grad_norm": total}
        before = ctx.norms_before_clip
        if before is not None:
            out["grad_norm_before_clip"] = _l2(before)
        if self.per_layer:
            zero = torch.zeros((), dtype=ctx.params[0].dtype, device=ctx.params[0].device) if ctx.params else 0.0
            out["grad_norm"] = {"": total, **{n: zero if v is None else v for n, v in zip(ctx.names, per)}}
        return out


def _l2(norms: list) -> torch.Tensor | float:
    """The L2 combination of per-tensor norms (0-d tensors; ``None`` skipped), on the device."""
    if any(n is None for n in norms):
        norms = [n for n in norms if n is not None]
    if not norms:
        return 0.0
    if len({(n.dtype, n.device) for n in norms}) > 1:  # mixed: combine in float64
        norms = [n.to(norms[0].device, torch.float64) for n in norms]
    return torch.linalg.vector_norm(torch.stack(norms))


class GradientCoherence(Probe):
    """``coherence`` (m-coherence of the per-example gradients on the probe batch)
    and ``gsnr`` (mean gradient signal-to-noise ratio over parameters).

    The run's ``loss_fn`` or ``closure`` evaluates each example; on language-model
    batches the examples are sequences (see
    :func:`~dyndiag.quantities.gradient_coherence`). ``forward(model, batch) ->
    outputs`` goes with the run's ``loss_fn`` for batches that are not ``(inputs,
    targets)``, as for :func:`~dyndiag.quantities.grand_scores`.
    """

    modifies_state = False

    needs = frozenset({"probe_batch"})

    def __init__(self, every=1, name=None, *, forward=None) -> None:
        super().__init__(every, name)
        if forward is not None and not callable(forward):
            raise TypeError(f"forward must be callable (model, batch) -> outputs, got {type(forward).__name__}")
        self.forward = forward

    def compute(self, ctx: StepContext) -> Mapping:
        from ..quantities.per_example import coherence_and_snr

        r = ctx.run
        forward = self.forward if r.loss_fn is not None else None
        # One pass of per-example gradients for both. reduction="mean": per tensor over
        # elements with non-zero variance; "" is the overall mean.
        coherence, snr = coherence_and_snr(r.model, r.loss_fn, r.probe_data, params=ctx.params, closure=r.closure,
                                           forward=forward, reduction="mean", progress=False)
        return {"coherence": coherence, "gsnr": float(snr[""])}
