"""Probes on the weights themselves."""

from __future__ import annotations

from collections.abc import Mapping

from ..quantities.rotation import RotationMeter, matched_reference
from .base import Probe
from .context import RunContext, StepContext

__all__ = ["LayerRotation"]


class LayerRotation(Probe):
    """``rotation``: 1 - cos(w_t, w_0) per parameter tensor (keys = parameter names)
    of the parameters the optimizer trains, against ``reference`` (a module, a
    state_dict or a list of tensors in parameter order) or, by default, the weights
    when the parameter entered: at setup (the Monitor's attach; offline, the first
    checkpoint), or when it was added to the optimizer or unfrozen later.

    Computed in the parameters' dtype (at least float32) with foreach kernels, by
    :class:`~dyndiag.quantities.rotation.RotationMeter` (no cancellation at small
    angles; its precision floor is documented there); the values stay on the device
    (``syncs = False``)."""

    modifies_state = False
    syncs = False

    def __init__(self, every=1, name=None, *, reference=None) -> None:
        super().__init__(every, name)
        self.reference = reference

    def setup(self, run: RunContext) -> None:
        self._given = None
        if self.reference is not None:  # checked once, for every parameter of the model
            named, refs = matched_reference(run.model, self.reference)
            self._given = {n: r for (n, _), r in zip(named, refs)}
        self._taken: dict[str, tuple] = {}  # name -> (parameter, its weights when it entered)
        self._meter = None
        self._params = None
        self.params_changed(run)

    def params_changed(self, run: RunContext) -> None:
        for n, p in zip(run.names, run.params):
            if (self._given is None or n not in self._given) and self._taken.get(n, (None,))[0] is not p:
                self._taken[n] = (p, p.detach().clone())

    def compute(self, ctx: StepContext) -> Mapping:
        if ctx.params is not self._params:  # a new set of parameters: normalise their references once
            refs = [self._given[n] if self._given is not None and n in self._given else self._taken[n][1]
                    for n in ctx.names]
            self._meter, self._params = RotationMeter(ctx.params, refs), ctx.params
        return {"rotation": dict(zip(ctx.names, self._meter()))}
