"""Probes on the Hessian of the probe batch: spectrum, edge of stability, subspace overlap."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .base import Probe
from .context import StepContext

__all__ = ["HessianSpectrum", "EdgeOfStability", "SubspaceOverlap"]


class HessianSpectrum(Probe):
    """Top-``k`` eigenvalues (``eigenvalue``, keys "0".."k-1"), the trace (Hutch++,
    ``trace``) and optionally the SLQ density (arrays ``density_nodes`` and
    ``density_weights``) of the probe batch's Hessian."""

    modifies_state = False

    needs = frozenset({"curvature"})

    def __init__(
        self, every=1, name=None, *, k: int = 5, tol: float = 1e-4, trace_matvecs: int = 60,
        density: bool = False, num_probes: int = 4, lanczos_steps: int = 40, seed: int = 0,
    ) -> None:
        super().__init__(every, name)
        self.k, self.tol, self.trace_matvecs, self.seed = k, tol, trace_matvecs, seed
        self.density, self.num_probes, self.lanczos_steps = density, num_probes, lanczos_steps

    def compute(self, ctx: StepContext) -> Mapping:
        from ..curvature.density import spectral_density
        from ..curvature.hutchinson import trace

        H = ctx.hessian
        top = ctx.top_eigen(self.k, self.tol, self.seed)
        out: dict = {"eigenvalue": {str(i): v for i, v in enumerate(top.values.tolist())}}
        if self.trace_matvecs:
            out["trace"] = trace(H, num_matvecs=self.trace_matvecs, seed=self.seed).value
        if self.density:
            d = spectral_density(H, self.num_probes, self.lanczos_steps, seed=self.seed, progress=False)
            out["density_nodes"], out["density_weights"] = d.nodes, d.weights
        return out

    def eigen_need(self):
        return (self.k, self.tol, self.seed, False)


class EdgeOfStability(Probe):
    """``sharpness`` (top Hessian eigenvalue of the probe batch) next to the optimizer's
    own ``threshold`` (2/lr for SGD, momentum-aware; read from its param groups at
    every step, so schedules are followed), ``loss`` at the same parameters, and for
    Adam-type optimizers ``preconditioned_sharpness`` with the preconditioner this
    step is about to apply."""

    modifies_state = False

    needs = frozenset({"curvature", "gradients"})

    def __init__(self, every=1, name=None, *, tol: float = 1e-4, group: int | None = None, seed: int = 0) -> None:
        super().__init__(every, name)
        self.tol, self.group, self.seed = tol, group, seed

    def compute(self, ctx: StepContext) -> Mapping:
        from ..quantities.sharpness import preconditioned_sharpness, stability_threshold

        H = ctx.hessian
        out = {
            "sharpness": float(ctx.top_eigen(1, self.tol, self.seed).values[0]),
            "threshold": stability_threshold(ctx.optimizer, group=self.group),
            "loss": ctx.probe_loss,
        }
        if isinstance(ctx.optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            out["preconditioned_sharpness"] = preconditioned_sharpness(
                H, ctx.optimizer, gradient=ctx.gradients, group=self.group, tol=self.tol, seed=self.seed
            )
        return out

    def eigen_need(self):
        return (1, self.tol, self.seed, False)


class SubspaceOverlap(Probe):
    """``overlap``: the fraction ||P_k g||^2 / ||g||^2 of the training gradient in the
    probe batch Hessian's top-``k`` eigenspace (Gur-Ari et al.)."""

    modifies_state = False

    needs = frozenset({"curvature", "gradients"})

    def __init__(self, every=1, name=None, *, k: int = 10, tol: float = 1e-4, seed: int = 0) -> None:
        super().__init__(every, name)
        self.k, self.tol, self.seed = k, tol, seed

    def compute(self, ctx: StepContext) -> Mapping:
        from ..quantities.sharpness import subspace_overlap

        eigen = ctx.top_eigen(self.k, self.tol, self.seed, vectors=True)
        return {"overlap": subspace_overlap(ctx.hessian, ctx.gradients, self.k, eigen=eigen)}

    def eigen_need(self):
        return (self.k, self.tol, self.seed, True)
