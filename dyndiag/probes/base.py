"""The Probe protocol and the per-step context that shares needs between probes.

A probe is one class: it declares what it ``needs`` (names in :data:`NEEDS`), when
it runs (``every=``), whether it runs before the optimizer's update (``phase =
"pre"``: state probes, on the current gradients and parameters) or after it
(``"post"``: update probes, on the update the optimizer actually applied), and
``compute(ctx)`` returns ``{metric: value}``. Values may be

* a number (or 0-d tensor): one record row with ``key=""``;
* a mapping ``{key: number}``: one row per key (per-layer values, eigenvalue
  indices "0".."k-1");
* a tensor/array with at least one dimension: stored in the array table
  (densities, per-example scores).

The monitor builds one :class:`StepContext` per step; its properties compute each
need on first use and keep it, so two probes that both need the Hessian share one
operator (and its cached gradient graph).
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Callable, Mapping
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:  # pragma: no cover
    from ..monitor import Monitor

__all__ = ["Probe", "StepContext", "NEEDS", "flatten_result"]

#: What a probe may declare in ``needs``.
NEEDS = frozenset({"gradients", "logits", "update", "curvature", "probe_batch"})


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


class Probe:
    """Base class of every probe. Subclass it and implement :meth:`compute`.

    Parameters
    ----------
    every:
        Run on steps with ``step % every == 0`` (int >= 1), or a callable
        ``step -> bool``.
    name:
        The ``probe`` column of its records; default the class name in snake case.
    """

    needs: frozenset[str] = frozenset()
    phase: str = "pre"
    #: Whether ``compute`` may change the model, its ``.grad``, buffers, the
    #: optimizer or a global RNG. True (the safe default) runs the probe under the
    #: full state guard, which copies gradients, buffers, optimizer state and RNG
    #: states every step it runs. The built-in probes set False: they only read,
    #: and the operators and quantities they call restore modes and RNG themselves.
    modifies_state: bool = True

    def __init__(self, every: int | Callable[[int], bool] = 1, name: str | None = None) -> None:
        self._every = 0  # an int schedule's period; 0 for a callable one
        if callable(every):
            self._due = every
        elif isinstance(every, numbers.Integral) and not isinstance(every, bool) and every >= 1:
            self._every = int(every)
            self._due = None
        else:
            raise ValueError(f"every must be an int >= 1 or a callable step -> bool, got {every!r}")
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        self.name = name or _snake(type(self).__name__)
        unknown = set(self.needs) - NEEDS
        if unknown:
            raise ValueError(f"{type(self).__name__}.needs has unknown entries {sorted(unknown)}; allowed: {sorted(NEEDS)}")
        if self.phase not in ("pre", "post"):
            raise ValueError(f"{type(self).__name__}.phase must be 'pre' or 'post', got {self.phase!r}")
        self.enabled = True

    def due(self, step: int) -> bool:
        """Whether the probe runs at ``step``."""
        n = self._every
        return step % n == 0 if n else bool(self._due(step))

    def setup(self, monitor: Monitor) -> None:
        """Called once when the monitor attaches (e.g. to snapshot initial weights)."""

    def eigen_need(self) -> tuple[int, float, int, bool] | None:
        """``(k, tol, seed, vectors)`` if ``compute`` will call
        :meth:`StepContext.top_eigen` on the probe Hessian, else ``None``. Probes due
        at the same step with the same ``tol`` and ``seed`` then share one Lanczos
        run for the largest ``k`` (with vectors if any of them wants vectors)."""
        return None

    def compute(self, ctx: StepContext) -> Mapping[str, Any]:  # pragma: no cover - abstract
        """Measure at this step; return ``{metric: value}`` (see the module docstring)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class StepContext:
    """What probes see at one optimizer step. Needs are computed once, on first use.

    Attributes
    ----------
    step:
        The optimizer step (0 for the first ``optimizer.step()``).
    model, optimizer:
        The live objects (probes run under the monitor's state guard).
    params, names:
        Trainable parameters in the monitor's order and their names.
    """

    def __init__(self, monitor: Monitor, step: int) -> None:
        self.monitor = monitor
        self.step = step
        self.model = monitor.model
        self.optimizer = monitor.optimizer
        self.params = monitor.params
        self.names = monitor.names
        self.theta_before: list[torch.Tensor] | None = None
        self.theta_after: list[torch.Tensor] | None = None
        #: The probes due at this step (set by the monitor): their eigen needs are pooled.
        self.due: list[Probe] = []
        self._eigen: dict = {}

    # -- needs ------------------------------------------------------------
    @cached_property
    def gradients(self) -> torch.Tensor:
        """Flat ``(dim,)`` copy of the current ``.grad`` (zeros where a grad is None)."""
        # torch.cat allocates a new tensor: it is already a copy. Gradients rarely carry a
        # graph (only after backward(create_graph=True)); detach just those.
        parts = []
        for p in self.params:
            g = p.grad
            if g is None:
                g = torch.zeros_like(p)
            elif g.requires_grad:
                g = g.detach()
            parts.append(g.reshape(-1))
        return torch.cat(parts)

    @property
    def logits(self) -> torch.Tensor:
        """The last training forward's outputs before this step (``.logits`` of a HF output)."""
        out = self.monitor._last_logits
        if out is None:
            raise RuntimeError("no training forward was seen before this step")
        return out

    @property
    def probe_batch(self):
        """The monitor's fixed probe data."""
        return self.monitor.probe_data

    @cached_property
    def hessian(self):
        """The Hessian of the probe batch's loss at the current parameters (shared)."""
        from ..curvature.operators import HessianOperator

        m = self.monitor
        return HessianOperator(
            m.model, m.loss_fn, m.probe_data, params=self.params, closure=m.closure,
            batch_size_fn=getattr(m, "batch_size_fn", None),
        )

    @cached_property
    def hessian_before(self):
        """The Hessian at the parameters before this step's update (update probes)."""
        from ..curvature.operators import HessianOperator

        m = self.monitor
        return HessianOperator(
            m.model, m.loss_fn, m.probe_data, params=self.params, closure=m.closure, at=self._need_before(),
            batch_size_fn=getattr(m, "batch_size_fn", None),
        )

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

        key = (float(tol), int(seed))
        res = self._eigen.get(key)
        if res is None or res.values.numel() < k or (vectors and res.vectors is None):
            needs = [n for n in (p.eigen_need() for p in self.due) if n is not None and (float(n[1]), int(n[2])) == key]
            want_k = min(max([k] + [n[0] for n in needs]), self.hessian.dim - 1)
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


def flatten_result(probe: str, result: Mapping[str, Any]) -> tuple[list[tuple], list[tuple]]:
    """``compute``'s dict -> (scalar rows ``(probe, metric, key, value)``, array rows)."""
    if not isinstance(result, Mapping):
        raise TypeError(f"probe {probe!r}: compute() must return a dict {{metric: value}}, got {type(result).__name__}")
    scalars, arrays = [], []
    for metric, value in result.items():
        if type(value) is float and type(metric) is str:  # fast path: a plain scalar
            scalars.append((probe, metric, "", value))
            continue
        if not isinstance(metric, str):
            raise TypeError(f"probe {probe!r}: metric names must be strings, got {metric!r}")
        if isinstance(value, Mapping):
            for key, v in value.items():
                scalars.append((probe, metric, str(key), _scalar(probe, metric, v)))
        elif isinstance(value, (torch.Tensor, np.ndarray)) and np.ndim(value) >= 1:
            # A copy: the record store may write it after the probe's tensors change.
            arr = _to_numpy(value) if isinstance(value, torch.Tensor) else np.array(value)
            arrays.append((probe, metric, "", arr))
        else:
            scalars.append((probe, metric, "", _scalar(probe, metric, value)))
    return scalars, arrays


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds it exactly
        t = t.float()
    return t.numpy().copy()


def _scalar(probe: str, metric: str, value: Any) -> float:
    if type(value) is float:  # the common case, first: this runs for every row of every step
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value.item())
    if isinstance(value, (numbers.Real, np.floating, np.integer)):
        return float(value)
    raise TypeError(f"probe {probe!r}, metric {metric!r}: expected a number, got {type(value).__name__}")
