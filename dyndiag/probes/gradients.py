"""Probes on the training gradients and per-example gradients."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .base import Probe
from .context import StepContext

__all__ = ["GradientNorm", "GradientCoherence"]


class GradientNorm(Probe):
    """``grad_norm``: the L2 norm of the current training gradient (all parameters),
    and per parameter tensor (keys = parameter names) when ``per_layer=True``."""

    modifies_state = False

    needs = frozenset({"gradients"})

    def __init__(self, every=1, name=None, *, per_layer: bool = False) -> None:
        super().__init__(every, name)
        self.per_layer = per_layer

    def compute(self, ctx: StepContext) -> Mapping:
        g = ctx.gradients
        out: dict = {"grad_norm": float(torch.linalg.vector_norm(g))}
        if self.per_layer:
            parts = torch.split(g, [p.numel() for p in ctx.params])
            out["grad_norm"] = {"": out["grad_norm"], **{n: float(torch.linalg.vector_norm(t)) for n, t in zip(ctx.names, parts)}}
        return out


class GradientCoherence(Probe):
    """``coherence`` (m-coherence of the per-example gradients on the probe batch)
    and ``gsnr`` (mean gradient signal-to-noise ratio over parameters)."""

    modifies_state = False

    needs = frozenset({"probe_batch"})

    def compute(self, ctx: StepContext) -> Mapping:
        from ..quantities.per_example import gradient_coherence, gradient_snr

        r = ctx.run
        coherence = gradient_coherence(r.model, r.loss_fn, r.probe_data, params=ctx.params, closure=r.closure, progress=False)
        # reduction="mean": per tensor over elements with non-zero variance; "" is the overall mean.
        snr = gradient_snr(
            r.model, r.loss_fn, r.probe_data, params=ctx.params, closure=r.closure, reduction="mean", progress=False
        )
        return {"coherence": coherence, "gsnr": float(snr[""])}
