"""Probes on the weights themselves."""

from __future__ import annotations

from collections.abc import Mapping

from .base import Probe, StepContext

__all__ = ["LayerRotation"]


class LayerRotation(Probe):
    """``rotation``: 1 - cos(w_t, w_0) per parameter tensor (keys = parameter names)
    against the weights when the monitor attached (or ``reference``: a module, a
    state_dict or a list of tensors in parameter order)."""

    modifies_state = False

    def __init__(self, every=1, name=None, *, reference=None) -> None:
        super().__init__(every, name)
        self.reference = reference

    def setup(self, monitor) -> None:
        if self.reference is None:
            self.reference = {n: p.detach().clone() for n, p in monitor.model.named_parameters()}

    def compute(self, ctx: StepContext) -> Mapping:
        from ..quantities.rotation import layer_rotation

        return {"rotation": layer_rotation(ctx.model, self.reference)}
