"""Integrations with training frameworks and viewers.

* :mod:`dyndiag.integrations.lightning` — ``DiagnosticsCallback`` for a Lightning ``Trainer``;
* :mod:`dyndiag.integrations.transformers` — ``DiagnosticsCallback`` for a Hugging Face ``Trainer``;
* :mod:`dyndiag.integrations.tensorboard` — ``export_scalars``: a run's records as TensorBoard scalars.

Each submodule imports its framework when it is imported; this package imports none
of them, so ``import dyndiag`` never loads Lightning, transformers or TensorBoard.
The helpers below are shared by the two callbacks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

__all__: list[str] = []

def metric_name(probe: str, metric: str, key: str) -> str:
    """The name a record row is logged under: ``probe/metric``, or ``probe/metric/key``."""
    return f"{probe}/{metric}/{key}" if key else f"{probe}/{metric}"


def rows_by_step(
    rows: Iterable[tuple], log_filter: Callable[[str, str, str], bool] | None = None
) -> list[tuple[int, dict[str, float]]]:
    """``(step, {metric_name: value})`` per step, in order, for ``(step, probe, metric,
    key, value)`` rows that pass ``log_filter`` (steps with no such row left out)."""
    out: dict[int, dict[str, float]] = {}
    for step, probe, metric, key, value in rows:
        if log_filter is None or log_filter(probe, metric, key):
            out.setdefault(step, {})[metric_name(probe, metric, key)] = float(value)
    return list(out.items())


def torch_optimizer(optimizer: object, name: str = "optimizer") -> torch.optim.Optimizer:
    """The plain ``torch.optim.Optimizer`` inside framework wrappers.

    Accelerate's ``AcceleratedOptimizer`` and Lightning's ``LightningOptimizer`` hold
    the real optimizer in ``.optimizer``. Probes need the real one: its class
    decides the stability threshold, its hooks fire only when an update is actually
    applied (a gradient scaler may skip it).

    Returns
    -------
    torch.optim.Optimizer
    """
    seen = 0
    while seen < 8:  # wrappers nest at most a few levels; guards against cycles
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer) or inner is optimizer:
            break
        optimizer, seen = inner, seen + 1
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"{name} must be a torch.optim.Optimizer (or wrap one), got {type(optimizer).__name__}")
    return optimizer


def check_callback_args(probes: Sequence, loss_fn: object, closure: object, log_filter: object) -> list:
    """Validate the arguments both callbacks share; the probes as a list."""
    from ..probes.base import check_probes

    probes = check_probes(probes)
    if loss_fn is not None and closure is not None:
        raise ValueError("give at most one of loss_fn and closure")
    for value, name in ((loss_fn, "loss_fn"), (closure, "closure"), (log_filter, "log_filter")):
        if value is not None and not callable(value):
            raise TypeError(f"{name} must be callable, got {type(value).__name__}")
    return probes


def clone_batch(batch: object) -> object:
    """A copy of a (nested) batch whose tensors are detached clones, so training cannot edit it."""
    if isinstance(batch, torch.Tensor):
        return batch.detach().clone()
    if isinstance(batch, Mapping):  # BatchEncoding and other mappings become a plain dict
        return {k: clone_batch(v) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(clone_batch(v) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(clone_batch(v) for v in batch)
    return batch
