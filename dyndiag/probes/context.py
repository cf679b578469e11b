"""What probes see: the run they measure (:class:`RunContext`) and one step of it
(:class:`StepContext`). The Monitor (live training) and :func:`~dyndiag.analyze`
(saved checkpoints) build the same two objects; a probe cannot tell them apart.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.parameter import is_lazy

if TYPE_CHECKING:  # pragma: no cover
    from .base import Probe

__all__ = ["RunContext", "StepContext", "HVPProgress", "PROGRESS_DELAY"]

#: Seconds of Hessian-vector products in one step before its progress bar shows.
PROGRESS_DELAY = 2.0


@dataclass
class RunContext:
    """The run that probes measure: given once to :meth:`Probe.setup` and carried by
    every step's :class:`StepContext` as ``ctx.run``.

    Attributes
    ----------
    model, optimizer:
        The module probes evaluate (the Monitor's model, or the module inside its
        DDP wrapper) and its optimizer (``None`` offline when none was given).
    loss_fn, closure:
        How the loss of ``probe_data`` is evaluated: a criterion
        ``loss_fn(outputs, targets)`` or ``closure(model, batch) -> loss`` (at most one).
    probe_data, batch_size_fn:
        The fixed batch (or list of batches) for curvature and loss probes, and
        ``(batch) -> int`` weighting its batches (``None``: dim 0 of a batch's
        first tensor).
    gradient_fn:
        ``() -> Tensor (dim,)``: what ``ctx.gradients`` is. ``None`` (training):
        the parameters' current ``.grad``. Offline analysis gives the gradient of
        the mean probe-data loss.
    logits:
        The last training forward's outputs (detached; ``.logits`` of a Hugging
        Face output), kept current by the Monitor's forward hook; offline, the
        outputs on the first probe batch. ``None`` until one is known.
    targets, loss_dtype:
        The labels that go with ``logits`` and the dtype the training loss was
        computed in, where the Monitor could see them (``None`` otherwise): the
        ``labels`` keyword of the forward (Hugging Face models), or the targets
        and logits that the training loop passed to the Monitor's ``loss_fn``
        module; offline, the first probe batch's targets. ``loss_dtype`` is
        float32 for half-precision logits under autocast
        (:func:`~dyndiag.quantities.softmax.loss_dtype`); ``None`` means the
        logits' dtype.
    progress:
        A progress bar of the Hessian-vector products of a step's curvature
        probes, shown once they have run :data:`PROGRESS_DELAY` seconds: ``None``
        on an interactive terminal only (never into a log file or pipe),
        ``True`` always, ``False`` never.
    params, names:
        The parameters probes measure and their names, in ``named_parameters()``
        order: those of the optimizer's param groups that require gradients (every
        parameter with ``requires_grad`` when there is no optimizer). Re-read by
        :meth:`refresh`, which the Monitor calls at every step.
    norms_before_clip:
        ``{id(param): 0-d tensor}``: the gradient norms at the end of the last
        backward before this step (unscaled), kept by the Monitor's backward hooks
        for probes that need ``before_clip``; ``None`` when none was taken.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer | None = None
    loss_fn: Callable | None = None
    closure: Callable | None = None
    probe_data: object = None
    batch_size_fn: Callable | None = None
    gradient_fn: Callable[[], torch.Tensor] | None = None
    logits: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    loss_dtype: torch.dtype | None = None
    progress: bool | None = None
    norms_before_clip: dict[int, torch.Tensor] | None = None
    params: list[torch.Tensor] = field(init=False, repr=False)
    names: list[str] = field(init=False)

    def __post_init__(self) -> None:
        if self.loss_fn is not None and self.closure is not None:
            raise ValueError("give at most one of loss_fn and closure")
        if self.progress is not None and not isinstance(self.progress, bool):
            raise TypeError(f"progress must be True, False or None, got {type(self.progress).__name__}")
        if self.batch_size_fn is not None and not callable(self.batch_size_fn):
            raise TypeError(f"batch_size_fn must be callable (batch) -> int, got {type(self.batch_size_fn).__name__}")
        for name, p in self.model.named_parameters():
            if is_lazy(p):
                raise ValueError(f"model has uninitialised parameters (lazy modules, e.g. {name!r}): run one "
                                 "forward to materialise them before attaching dyndiag")
            if p.is_meta:
                raise ValueError(f"model has parameters on the meta device (e.g. {name!r}), which hold no values: "
                                 "materialise them (model.to_empty(device=...) and initialise, or load weights) "
                                 "before attaching dyndiag")
        self._chosen: set[int] | None = None
        self.params, self.names = [], []
        self.refresh()

    def refresh(self) -> bool:
        """Re-read :attr:`params` and :attr:`names` from the optimizer's param groups.

        Parameters added to the optimizer (``add_param_group``) or unfrozen
        (``requires_grad_(True)``) enter, frozen ones leave. Returns whether they
        changed; the lists are then new objects (probes may cache on their identity).
        """
        opt = self.optimizer
        chosen = None
        if opt is not None:
            chosen = {id(p) for g in opt.param_groups for p in g["params"] if p.requires_grad}
            if chosen == self._chosen:
                return False
        named = [(n, p) for n, p in self.model.named_parameters()
                 if p.requires_grad and (chosen is None or id(p) in chosen)]
        self._chosen = chosen
        names = [n for n, _ in named]
        if names == self.names and all(a is b for a, b in zip(self.params, (p for _, p in named))):
            return False
        self.names = names
        self.params = [p for _, p in named]
        return True


class StepContext:
    """What probes see at one step. Needs are computed on first use and shared
    between the probes of the step (two probes that need the Hessian share one
    operator and its cached gradient graph).

    Parameters
    ----------
    run:
        The run (``ctx.run``): loss, probe data, optimizer, last outputs.
    step:
        The step (0 for the first ``optimizer.step()``; a checkpoint's step offline).
    due:
        The probes due at this step: their :meth:`Probe.eigen_need` are pooled.

    Attributes
    ----------
    model, optimizer, params, names:
        Those of ``run``.
    theta_before:
        Copies of the parameters before this step's update (set for update probes).
    hvp_progress:
        The :class:`HVPProgress` bar of the step's Hessian-vector products;
        :func:`~dyndiag.probes.base.run_probes` closes it after each phase.
    """

    def __init__(self, run: RunContext, step: int, due: Sequence[Probe] = ()) -> None:
        self.run = run
        self.step = step
        self.due = list(due)
        self.model, self.optimizer, self.params, self.names = run.model, run.optimizer, run.params, run.names
        self.theta_before: list[torch.Tensor] | None = None
        self._eigen: dict = {}
        self.hvp_progress = HVPProgress(step, run.progress)

    # -- needs ------------------------------------------------------------
    @cached_property
    def grads(self) -> list[torch.Tensor | None]:
        """The gradient of each parameter of ``params`` (``None`` where a ``.grad`` is
        None): the ``.grad`` tensors themselves (detached, never copied: read only),
        or views of ``run.gradient_fn()`` when the run gives one."""
        if self.run.gradient_fn is not None:
            flat = self.run.gradient_fn()
            return [g.view_as(p) for g, p in zip(torch.split(flat, [p.numel() for p in self.params]), self.params)]
        # Gradients rarely carry a graph (only after backward(create_graph=True)); detach just those.
        return [None if p.grad is None else p.grad.detach() if p.grad.requires_grad else p.grad for p in self.params]

    @cached_property
    def gradients(self) -> torch.Tensor:
        """Flat ``(dim,)`` copy of the current ``.grad`` (zeros where a grad is None),
        or ``run.gradient_fn()`` when the run gives one."""
        if self.run.gradient_fn is not None:
            return self.run.gradient_fn()
        from ..curvature.sharded import local

        # torch.cat allocates a new tensor: it is already a copy. FSDP's DTensor
        # gradients give their local shards, the layout of a sharded operator's vectors.
        grads = zip(self.params, self.grads)
        return torch.cat([(torch.zeros_like(local(p)) if g is None else local(g)).reshape(-1) for p, g in grads])

    @property
    def norms_before_clip(self) -> list[torch.Tensor | None] | None:
        """Per parameter of ``params``, the 0-d norm of its gradient at the end of the
        last backward before this step (``None`` for a parameter without one), or
        ``None`` when no backward was seen (offline, always)."""
        snap = self.run.norms_before_clip
        if snap is None:
            return None
        return [snap.get(id(p)) for p in self.params]

    def param_groups(self) -> list[tuple[int, list[torch.Tensor]]]:
        """``(group index, its parameters among params)`` for each optimizer param
        group holding any of ``params``, parameters in ``params`` order."""
        if self.optimizer is None:
            return [(0, list(self.params))]
        where = {id(p): i for i, g in enumerate(self.optimizer.param_groups) for p in g["params"]}
        groups: dict[int, list] = {}
        for p in self.params:
            groups.setdefault(where.get(id(p), -1), []).append(p)
        return sorted((i, ps) for i, ps in groups.items() if i >= 0)

    @property
    def logits(self) -> torch.Tensor:
        """The last training forward's outputs before this step (``run.logits``)."""
        out = self.run.logits
        if out is None:
            raise RuntimeError("no training forward was seen before this step")
        return out

    @property
    def probe_batch(self):
        """The run's fixed probe data."""
        return self.run.probe_data

    @cached_property
    def hessian(self):
        """The Hessian of the probe batch's loss at the current parameters (shared)."""
        return self._hessian(None)

    @cached_property
    def hessian_before(self):
        """The Hessian at the parameters before this step's update (update probes)."""
        return self._hessian(self._need_before())

    def hessian_of(self, params: Sequence[torch.Tensor]):
        """The Hessian block of the probe batch's loss on ``params`` (a subset of
        ``params``, in its order) at the current parameters."""
        return self._hessian(None, params)

    def _hessian(self, at, params=None):
        from ..curvature.operators import HessianOperator

        r = self.run
        op = HessianOperator(
            r.model, r.loss_fn, r.probe_data, params=self.params if params is None else params, closure=r.closure,
            at=at, batch_size_fn=r.batch_size_fn,
        )
        op.on_products = self.hvp_progress  # not a method of self: no cycle keeping the operator's graph alive
        self.hvp_progress(0)  # the clock starts with the curvature work
        return op

    @cached_property
    def update(self) -> torch.Tensor:
        """Flat ``(dim,)`` update the optimizer applied: theta_after - theta_before."""
        before = self._need_before()
        return torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(self.params, before)])

    def top_eigen(self, k: int, tol: float, seed: int = 0, vectors: bool = False):
        """The top-``k`` eigenvalues (and unit eigenvectors with ``vectors``) of
        :attr:`hessian`, as an :class:`~dyndiag.EigenResult`.

        One Lanczos run per ``(tol, seed)`` and step serves every due probe: it is
        made for the largest ``k`` that any of them declares in
        :meth:`Probe.eigen_need` (their values agree to ``tol``), and results are
        its leading ``k`` entries; ``num_matvecs`` is that run's.
        """
        from ..curvature.lanczos import eigenvalues
        from ..curvature.results import EigenResult
        from ..curvature.vectors import full_dim

        key = (float(tol), int(seed))
        res = self._eigen.get(key)
        if res is None or res.values.numel() < k or (vectors and res.vectors is None):
            needs = [n for n in (p.eigen_need() for p in self.due) if n is not None and (float(n[1]), int(n[2])) == key]
            want_k = min(max([k] + [n[0] for n in needs]), full_dim(self.hessian) - 1)  # same on every FSDP rank
            want_v = vectors or any(n[3] for n in needs)
            res = eigenvalues(self.hessian, k=max(want_k, k), which="LA", tol=tol, seed=seed, return_vectors=want_v)
            self._eigen[key] = res
        return EigenResult(
            values=res.values[:k],
            vectors=None if res.vectors is None else res.vectors[:, :k],
            num_matvecs=res.num_matvecs,
            converged=res.converged,
            error_bounds=res.error_bounds[:k],
        )

    @cached_property
    def probe_loss(self) -> float:
        """The probe batch's mean loss at the current parameters (evaluated like the Hessian)."""
        return self.hessian.loss()

    def _need_before(self) -> list[torch.Tensor]:
        if self.theta_before is None:
            raise RuntimeError("the update is only known to probes with phase='post' that need 'update'")
        return self.theta_before


class HVPProgress:
    """Counts a step's Hessian-vector products on a tqdm bar, opened with the step's
    Hessian and shown once it has been open :data:`PROGRESS_DELAY` seconds (tqdm's ``delay``);
    ``progress`` as :attr:`RunContext.progress`. ``close()`` ends the bar; more
    products open a new one."""

    def __init__(self, step: int, progress: bool | None) -> None:
        self.step, self.progress, self.bar = step, progress, None

    def __call__(self, k: int) -> None:
        if self.progress is False:
            return
        if self.bar is None:
            from tqdm.auto import tqdm

            # leave=False: the bar goes away with the step, training output stays as it was.
            self.bar = tqdm(desc=f"dyndiag step {self.step}: curvature", delay=PROGRESS_DELAY, leave=False,
                            bar_format="{desc}, {n} Hessian-vector products [{elapsed}]",
                            disable=None if self.progress is None else not self.progress)
        self.bar.update(k)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
