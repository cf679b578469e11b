"""Probes on the Hessian of the probe batch: spectrum, edge of stability, subspace overlap."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from .base import Probe
from .context import StepContext

if TYPE_CHECKING:  # pragma: no cover
    from ..curvature.partition import BlockSpec

__all__ = ["HessianSpectrum", "EdgeOfStability", "SubspaceOverlap"]


class HessianSpectrum(Probe):
    """Top-``k`` eigenvalues (``eigenvalue``, keys "0".."k-1"), the trace (Hutch++,
    ``trace``) and optionally the SLQ density (arrays ``density_nodes`` and
    ``density_weights``) of the probe batch's Hessian.

    With ``blocks=`` (``"module"``, ``"layer"``, a dict of parameter-name globs or a
    callable, as for :func:`dyndiag.eigenvalues`) the same quantities of each
    diagonal block, all blocks sharing every product call, recorded with ``key`` =
    the block's name: metrics ``eigenvalue_0`` .. ``eigenvalue_{k-1}`` (a block of
    ``d <= k`` coordinates has ``d`` of them), ``trace``, and the arrays
    ``density_nodes``/``density_weights`` under the block's key.
    """

    modifies_state = False

    needs = frozenset({"curvature"})

    def __init__(
        self, every=1, name=None, *, k: int = 5, tol: float = 1e-4, trace_matvecs: int = 60,
        density: bool = False, num_probes: int = 4, lanczos_steps: int = 40, seed: int = 0,
        blocks: BlockSpec | None = None,
    ) -> None:
        super().__init__(every, name)
        from ..curvature.partition import MODES

        if isinstance(blocks, str) and blocks not in MODES:
            raise ValueError(f"blocks must be 'module', 'layer', a dict of name globs or a callable, got {blocks!r}")
        if blocks is not None and not (isinstance(blocks, (str, Mapping)) or callable(blocks)):
            raise TypeError(
                f"blocks must be 'module', 'layer', a dict of name globs or a callable, got {type(blocks).__name__}"
            )
        self.k, self.tol, self.trace_matvecs, self.seed = k, tol, trace_matvecs, seed
        self.density, self.num_probes, self.lanczos_steps = density, num_probes, lanczos_steps
        self.blocks = blocks

    def compute(self, ctx: StepContext) -> Mapping:
        from ..curvature.density import spectral_density
        from ..curvature.hutchinson import trace

        H = ctx.hessian
        if self.blocks is not None:
            return self._per_block(H)
        top = ctx.top_eigen(self.k, self.tol, self.seed)
        out: dict = {"eigenvalue": {str(i): v for i, v in enumerate(top.values.tolist())}}
        if self.trace_matvecs:
            out["trace"] = trace(H, num_matvecs=self.trace_matvecs, seed=self.seed).value
        if self.density:
            d = spectral_density(H, self.num_probes, self.lanczos_steps, seed=self.seed, progress=False)
            out["density_nodes"], out["density_weights"] = d.nodes, d.weights
        return out

    def _per_block(self, H) -> dict:
        from ..curvature.density import spectral_density
        from ..curvature.hutchinson import trace
        from ..curvature.lanczos import eigenvalues

        out: dict = {}
        tops = eigenvalues(H, k=self.k, which="LA", tol=self.tol, seed=self.seed, blocks=self.blocks)
        for block, res in tops.items():
            for i, v in enumerate(res.values.tolist()):
                out.setdefault(f"eigenvalue_{i}", {})[block] = v
        if self.trace_matvecs:
            traces = trace(H, num_matvecs=self.trace_matvecs, seed=self.seed, blocks=self.blocks)
            out["trace"] = {block: res.value for block, res in traces.items()}
        if self.density:
            densities = spectral_density(
                H, self.num_probes, self.lanczos_steps, seed=self.seed, progress=False, blocks=self.blocks
            )
            out["density_nodes"] = {block: d.nodes for block, d in densities.items()}
            out["density_weights"] = {block: d.weights for block, d in densities.items()}
        return out

    def eigen_need(self):
        return None if self.blocks is not None else (self.k, self.tol, self.seed, False)


class EdgeOfStability(Probe):
    """``sharpness`` (top Hessian eigenvalue of the probe batch) next to the optimizer's
    own ``threshold`` (2/lr for SGD, momentum-aware; read from its param groups at
    every step, so schedules are followed), ``loss`` at the same parameters, and for
    Adam-type optimizers ``preconditioned_sharpness`` with the preconditioner this
    step is about to apply.

    With several param groups, one row per group (``key`` = the group index): the
    sharpness of that group's diagonal Hessian block (preconditioned for Adam)
    against that group's threshold; ``group=`` records only that group. With one
    group the key is ``""``.
    """

    modifies_state = False

    needs = frozenset({"curvature", "gradients"})

    def __init__(self, every=1, name=None, *, tol: float = 1e-4, group: int | None = None, seed: int = 0) -> None:
        super().__init__(every, name)
        if group is not None and (isinstance(group, bool) or not isinstance(group, int) or group < 0):
            raise ValueError(f"group must be an int >= 0 (an index into optimizer.param_groups), got {group!r}")
        self.tol, self.group, self.seed = tol, group, seed

    def compute(self, ctx: StepContext) -> Mapping:
        from ..curvature.lanczos import eigenvalues
        from ..quantities.sharpness import preconditioned_sharpness, stability_threshold

        groups = ctx.param_groups()
        several = len(ctx.optimizer.param_groups) > 1 if ctx.optimizer is not None else False
        if self.group is not None:
            stability_threshold(ctx.optimizer, group=self.group)  # checks the index
            groups = [(i, ps) for i, ps in groups if i == self.group]
            if not groups:
                raise ValueError(f"param group {self.group} holds no trained parameter (all frozen?)")
        adam = isinstance(ctx.optimizer, (torch.optim.Adam, torch.optim.AdamW))
        where = {id(p): i for i, p in enumerate(ctx.params)}
        out: dict = {"sharpness": {}, "threshold": {}, "loss": ctx.probe_loss}
        if adam:
            out["preconditioned_sharpness"] = {}
        for i, ps in groups:
            key = str(i) if several else ""
            if len(ps) == len(ctx.params):  # the whole model: the step's shared operator and Lanczos run
                H = ctx.hessian
                out["sharpness"][key] = float(ctx.top_eigen(1, self.tol, self.seed).values[0])
            else:  # the group's diagonal block
                H = ctx.hessian_of(ps)
                if H.dim == 1:
                    top = H.to_dense()
                else:
                    top = eigenvalues(H, k=1, which="LA", tol=self.tol, seed=self.seed).values
                out["sharpness"][key] = float(top.reshape(-1)[0])
            out["threshold"][key] = stability_threshold(ctx.optimizer, group=i)
            if adam:
                grads = [ctx.grads[where[id(p)]] for p in ps]
                g = torch.cat([(torch.zeros_like(p) if gp is None else gp).reshape(-1) for p, gp in zip(ps, grads)])
                out["preconditioned_sharpness"][key] = preconditioned_sharpness(
                    H, ctx.optimizer, gradient=g.to(H.dtype), tol=self.tol, seed=self.seed
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
