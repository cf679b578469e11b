"""The Probe protocol, and how a list of probes is checked and run.

A probe is one class: it declares what it ``needs`` (names in :data:`NEEDS`), when
it runs (``every=``), whether it runs before the optimizer's update (``phase =
"pre"``: state probes, on the current gradients and parameters) or after it
(``"post"``: update probes, on the update the optimizer actually applied), and
``compute(ctx)`` returns ``{metric: value}``. Values may be

* a number (or 0-d tensor): one record row with ``key=""``;
* a mapping ``{key: number}``: one row per key (per-layer values, eigenvalue
  indices "0".."k-1");
* a tensor/array with at least one dimension: stored in the array table
  (densities, per-example scores); a mapping ``{key: array}`` stores one per key.

``setup(run)`` receives the :class:`~dyndiag.probes.RunContext` once, ``compute``
a :class:`~dyndiag.probes.StepContext` at every step it is due (both in
:mod:`dyndiag.probes.context`).

A probe with ``syncs = False`` promises that ``compute`` never waits for the device
(no ``float()``, ``.item()``, ``.tolist()``, no data-dependent branch) and only reads
tensors (it never calls the model, so it runs without ``torch.compile``'s
eager stance; see :class:`~dyndiag.evaluation.probing`): its values
are 0-d tensors, which the Monitor brings to the host in one copy every few steps
(:func:`resolve_rows`). The cheap per-step probes are such probes.

The Monitor and offline analysis both run a phase's due probes through
:func:`run_probes`, so a probe fails the same way in both. Failure policy: a probe
that raises is reported once as a ``RuntimeWarning`` with its error and disabled
(``probe.enabled = False``); the others go on. Under ``torch.distributed`` the
failure flags are all-reduced, so a probe is disabled on every rank together and
no rank skips a collective the others enter. A NaN or inf value is recorded as it
is, with one warning per probe and metric.
"""

from __future__ import annotations

import math
import numbers
import re
import warnings
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from contextlib import closing, nullcontext
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..arrays import to_floats, to_numpy
from ..distributed import all_reduce_max, is_distributed
from ..evaluation import probing
from ..state import preserve_state

if TYPE_CHECKING:  # pragma: no cover
    from .context import RunContext, StepContext

__all__ = ["Probe", "NEEDS", "check_probes", "run_probes", "resolve_rows", "warn_once", "flatten_result"]

#: What a probe may declare in ``needs``. ``before_clip``: the gradient norms at the end
#: of the last backward (:attr:`StepContext.norms_before_clip`), which the Monitor then
#: snapshots from its backward hooks.
NEEDS = frozenset({"gradients", "before_clip", "logits", "update", "curvature", "probe_batch"})


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
    #: Whether ``compute`` may synchronise with the device (or call the model). False:
    #: its values are 0-d tensors left on the device (see the module docstring); a Monitor runs such
    #: probes without a host synchronisation and copies their values every
    #: ``sync_every`` steps.
    syncs: bool = True

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

    def setup(self, run: RunContext) -> None:
        """Called once before the first step with the run's context (the Monitor at
        attach, :func:`~dyndiag.analyze` at the first checkpoint), e.g. to snapshot
        the initial weights ``run.model``."""

    def params_changed(self, run: RunContext) -> None:
        """Called when ``run.params`` changed (the Monitor re-reads the optimizer's
        param groups at every step): parameters added or unfrozen entered, frozen
        ones left. E.g. take references for the new ones."""

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


def check_probes(probes: Iterable[Probe]) -> list[Probe]:
    """``probes`` as a list, after checking each is a :class:`Probe` and their names
    are unique; ``TypeError``/``ValueError`` naming ``probes`` otherwise."""
    if isinstance(probes, Probe) or not isinstance(probes, Iterable):
        raise TypeError(f"probes must be a sequence of dyndiag Probe instances, got {type(probes).__name__}")
    probes = list(probes)
    for p in probes:
        if not isinstance(p, Probe):
            raise TypeError(f"probes must be dyndiag Probe instances, got {type(p).__name__}")
    names = [p.name for p in probes]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"probe names must be unique; repeated: {dupes} (pass name=...)")
    return probes


def run_probes(
    probes: Sequence[Probe], ctx: StepContext, warned: set, *, defer: bool = False
) -> tuple[list[tuple], list[tuple]]:
    """Run ``probes`` (the due probes of one phase) on ``ctx`` under the failure policy.

    Probes with ``modifies_state`` run under :func:`~dyndiag.state.preserve_state`
    of ``ctx.model`` and ``ctx.optimizer``; read-only probes run unguarded (every
    operator and quantity they call restores modes and RNG itself). All of them run
    under :func:`~dyndiag.evaluation.probing`, so no Monitor takes their forwards
    for training's.

    Parameters
    ----------
    warned:
        The keys already warned about in this run; updated (each warning is given once).
    defer:
        Leave 0-d tensor values on the device (the caller passes the rows to
        :func:`resolve_rows` later); otherwise they are resolved here, in one copy.

    Returns
    -------
    (scalars, arrays)
        Rows ``(probe, metric, key, value)`` and ``(probe, metric, key, ndarray)``
        of the probes that did not fail; ``value`` is a float, or with ``defer`` a
        float or a 0-d tensor.
    """
    scalars: list = []
    arrays: list = []
    failed = []
    guard = any(p.modifies_state for p in probes)
    # Probes that never synchronise only read tensors: no forward to force eager.
    eager = any(p.syncs for p in probes)
    with preserve_state(ctx.model, ctx.optimizer) if guard else nullcontext(), probing(eager), \
            closing(ctx.hvp_progress):
        for probe in probes:
            try:
                s, a = flatten_result(probe.name, probe.compute(ctx), keep_tensors=True)
            except Exception as err:  # a probe must never stop training
                failed.append(probe)
                warn_once(warned, ("failed", probe.name), f"probe {probe.name!r} failed at step {ctx.step} and is "
                          f"disabled: {type(err).__name__}: {err}")
                continue
            scalars += s
            arrays += a
    # Only probes that may synchronise take part in the all-reduce (itself a synchronisation):
    # the others enter no collective, so a rank may disable them alone.
    shared = [p for p in probes if p.syncs]
    flags = [p in failed for p in shared]
    if shared and is_distributed():
        # Disable on every rank together: a rank that skipped a probe would skip its collectives.
        # On the parameters' device, which the process group's backend serves (NCCL: CUDA only).
        device = ctx.params[0].device if ctx.params else None
        flags = [bool(v) for v in all_reduce_max(torch.tensor(flags, dtype=torch.float32, device=device)).tolist()]
    for p in failed:
        p.enabled = False
    for p, flag in zip(shared, flags):
        if flag:
            p.enabled = False
    if not defer:
        scalars = resolve_rows([(ctx.step, scalars)], warned)[0]
    return scalars, arrays


def resolve_rows(steps: Sequence[tuple[int, list[tuple]]], warned: set) -> list[list[tuple]]:
    """The scalar rows of several steps with every value a float, in one device-to-host copy.

    ``steps``: ``(step, rows)`` pairs, rows ``(probe, metric, key, value)`` whose
    value is a float or a 0-d tensor. A non-finite value is kept, with one
    ``RuntimeWarning`` per probe and metric (``warned`` as in :func:`run_probes`).

    Returns
    -------
    list
        The rows of each step, in the order given.
    """
    pending = [row[3] for _, rows in steps for row in rows if type(row[3]) is not float]
    values = iter(to_floats(pending))
    out = []
    for step, rows in steps:
        done = []
        for probe, metric, key, value in rows:
            if type(value) is not float:
                value = next(values)
            if not math.isfinite(value):
                warn_once(warned, ("nonfinite", probe, metric),
                          f"probe {probe!r} recorded a non-finite {metric} ({value}) at step {step}")
            done.append((probe, metric, key, value))
        out.append(done)
    return out


def warn_once(warned: set, key: Hashable, message: str) -> None:
    """A ``RuntimeWarning`` with ``message``, unless ``key`` is in ``warned`` (then added)."""
    if key not in warned:
        warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def flatten_result(
    probe: str, result: Mapping[str, Any], keep_tensors: bool = False
) -> tuple[list[tuple], list[tuple]]:
    """``compute``'s dict -> (scalar rows ``(probe, metric, key, value)``, array rows).

    Scalar values become floats; with ``keep_tensors``, 0-d tensors stay as they are
    (no host synchronisation; see :func:`resolve_rows`).
    """
    if type(result) is not dict and not isinstance(result, Mapping):
        raise TypeError(f"probe {probe!r}: compute() must return a dict {{metric: value}}, got {type(result).__name__}")
    scalars, arrays = [], []
    for metric, value in result.items():
        if type(value) is float and type(metric) is str:  # fast path: a plain scalar
            scalars.append((probe, metric, "", value))
            continue
        if not isinstance(metric, str):
            raise TypeError(f"probe {probe!r}: metric names must be strings, got {metric!r}")
        if type(value) is dict or isinstance(value, Mapping):
            for key, v in value.items():
                if keep_tensors and type(v) is torch.Tensor and not v.ndim and not v.requires_grad:  # per-layer rows
                    scalars.append((probe, metric, key if type(key) is str else str(key), v))
                elif isinstance(v, (torch.Tensor, np.ndarray)) and np.ndim(v) >= 1:  # per-key arrays (per block)
                    arrays.append((probe, metric, str(key), to_numpy(v)))
                else:
                    scalars.append((probe, metric, str(key), _scalar(probe, metric, v, keep_tensors)))
        elif isinstance(value, (torch.Tensor, np.ndarray)) and np.ndim(value) >= 1:
            # A copy: the record store may write it after the probe's tensors change.
            arr = to_numpy(value)
            arrays.append((probe, metric, "", arr))
        else:
            scalars.append((probe, metric, "", _scalar(probe, metric, value, keep_tensors)))
    return scalars, arrays


def _scalar(probe: str, metric: str, value: Any, keep_tensors: bool = False) -> float | torch.Tensor:
    if type(value) is float:  # the common case, first: this runs for every row of every step
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        if keep_tensors and value.dim() == 0:
            return value.detach() if value.requires_grad else value
        return float(value.item())
    if isinstance(value, (numbers.Real, np.floating, np.integer)):
        return float(value)
    raise TypeError(f"probe {probe!r}, metric {metric!r}: expected a number, got {type(value).__name__}")
