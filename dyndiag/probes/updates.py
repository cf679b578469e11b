"""Update probes: they run after ``optimizer.step()`` on the update it applied."""

from __future__ import annotations

from collections.abc import Mapping

from .base import Probe
from .context import StepContext

__all__ = ["DirectionalSharpness", "SafeStepRadius"]


class DirectionalSharpness(Probe):
    """``directional_sharpness``: d^T H d / ||d||^2 along the real update
    d = theta_after - theta_before, with H taken at theta_before (a saved copy; the
    live model is never moved back)."""

    modifies_state = False

    needs = frozenset({"update", "curvature"})
    phase = "post"

    def compute(self, ctx: StepContext) -> Mapping:
        from ..quantities.sharpness import directional_sharpness

        return {"directional_sharpness": directional_sharpness(ctx.hessian_before, ctx.update)}


class SafeStepRadius(Probe):
    """``radius`` (the safe step length along the update direction, in units of the
    update, at theta_before) and ``ratio`` = 1 / radius: a ratio >= 1 predicts a loss
    spike ("Ghosts of Softmax")."""

    modifies_state = False

    needs = frozenset({"update", "probe_batch"})
    phase = "post"

    def compute(self, ctx: StepContext) -> Mapping:
        from ..quantities.radius import safe_step_radius

        radius = safe_step_radius(ctx.model, ctx.probe_batch, ctx.update, params=ctx.params, at=ctx.theta_before)
        return {"radius": radius, "ratio": 1.0 / radius if radius > 0 else float("inf")}
