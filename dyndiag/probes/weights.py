"""Probes on the weights themselves."""

from __future__ import annotations

from collections.abc import Mapping

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
        from ..quantities.rotation import RotationMeter, matched_reference

        # Checked, copied and normalised once for the whole run (the model itself: its weights now).
        ref = run.model if self.reference is None else self.reference
        self._meter = RotationMeter(*matched_reference(run.model, ref))

    def compute(self, ctx: StepContext) -> Mapping:
        return {"rotation": self._meter()}
