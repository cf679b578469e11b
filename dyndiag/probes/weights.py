"""Probes on the weights themselves."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .base import Probe
from .context import RunContext, StepContext

__all__ = ["LayerRotation"]


class LayerRotation(Probe):
    """``rotation``: 1 - cos(w_t, w_0) per parameter tensor (keys = parameter names)
    against the weights at setup (the Monitor's attach; offline, the first
    checkpoint) or against ``reference`` (a module, a state_dict or a list of
    tensors in parameter order)."""

    modifies_state = False

    def __init__(self, every=1, name=None, *, reference=None) -> None:
        super().__init__(every, name)
        self.reference = reference

    def setup(self, run: RunContext) -> None:
        from ..quantities.rotation import layer_rotation

        if self.reference is None:
            self.reference = {n: p.detach().clone() for n, p in run.model.named_parameters()}
        layer_rotation(run.model, self.reference)  # validates the reference once, at attach
        self._meter = None

    def compute(self, ctx: StepContext) -> Mapping:
        if self._meter is None:  # the reference flattened once for the whole run
            from ..quantities.rotation import RotationMeter

            named = list(ctx.model.named_parameters())
            ref = self.reference
            if isinstance(ref, Mapping):
                refs = [ref[n] for n, _ in named]
            elif isinstance(ref, torch.nn.Module):
                by_name = dict(ref.named_parameters())
                refs = [by_name[n] for n, _ in named]
            else:
                refs = list(ref)
            self._meter = RotationMeter(named, refs)
        return {"rotation": self._meter()}
