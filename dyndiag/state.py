"""One state guard for everything dyndiag does to a live model.

Nothing dyndiag does may change training. :func:`preserve_state` snapshots what a
diagnostic could disturb — train/eval flags, ``requires_grad`` flags, ``.grad``
tensors, buffers (BatchNorm running statistics), optionally parameter values and
optimizer state, and every global RNG stream — and puts it back exactly on exit,
also when the body raises.

It sits below every layer (curvature, quantities, probes, monitor, landscape) so
that they all share one definition of "untouched".
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

__all__ = ["preserve_state", "rng_state", "set_rng_state"]


def rng_state() -> dict:
    """Snapshot of every global RNG: torch CPU, every initialised CUDA device, numpy, python."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    # Querying CUDA RNG would initialise CUDA in a CPU-only process; only touch it when live.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore a snapshot taken by :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def preserve_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    params: bool = False,
    grads: bool = True,
    buffers: bool = True,
    rng: bool = True,
) -> Iterator[None]:
    """Run a block and restore the model (and optimizer) exactly as they were.

    Parameters
    ----------
    model:
        The module whose state is guarded. Restored always: every submodule's
        ``training`` flag and every parameter's ``requires_grad`` flag.
    optimizer:
        If given, every tensor in ``optimizer.state`` is copied and written back
        in place (same tensor objects, so fused/foreach kernels and user references
        keep working), and entries added during the block are removed.
    params:
        Copy parameter values and write them back in place. Off by default because
        dyndiag's curvature code never writes parameters (it evaluates the model
        functionally); the landscape layer, which moves the weights, turns it on.
    grads:
        Keep each parameter's ``.grad`` object and a copy of its values; on exit the
        same tensor object is reattached with its original values.
    buffers:
        Copy every buffer (running statistics, ``num_batches_tracked``) and write it
        back in place.
    rng:
        Restore torch (CPU and initialised CUDA devices), numpy and python RNG states.
    """
    modes = [(m, m.training) for m in model.modules()]
    named = list(model.named_parameters(remove_duplicate=True))
    flags = [(p, p.requires_grad) for _, p in named]
    saved_grads = []
    if grads:
        for _, p in named:
            g = p.grad
            saved_grads.append((p, g, None if g is None else _Saved(g)))
    saved_params = [_Saved(p) for _, p in named] if params else []
    saved_buffers = [_Saved(b) for b in model.buffers()] if buffers else []
    saved_opt = _snapshot_optimizer(optimizer) if optimizer is not None else None
    saved_rng = rng_state() if rng else None
    try:
        yield
    finally:
        for saved in saved_params + saved_buffers:
            saved.restore()
        for p, g, saved in saved_grads:
            if saved is not None:
                saved.restore()
            if p.grad is not g:
                p.grad = g
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, flag in modes:
            m.training = flag
        if saved_opt is not None:
            _restore_optimizer(optimizer, saved_opt)
        if saved_rng is not None:
            set_rng_state(saved_rng)


class _Saved:
    """A tensor's value and version; written back only if it changed.

    Writing an unchanged tensor back in place would bump its version counter, which
    breaks the user's pending autograd graph ("modified by an inplace operation")
    and invalidates caches keyed on versions. The version alone cannot tell: the
    batch-norm kernel updates running statistics without bumping theirs.
    """

    __slots__ = ("tensor", "value", "version")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self.value = tensor.detach().clone()
        self.version = tensor._version

    def restore(self) -> None:
        if self.tensor._version != self.version or not torch.equal(self.tensor, self.value):
            with torch.no_grad():
                self.tensor.copy_(self.value)


def _snapshot_optimizer(optimizer: torch.optim.Optimizer) -> dict:
    snap = {}
    for p, st in optimizer.state.items():
        snap[p] = {
            k: (v, v.detach().clone()) if isinstance(v, torch.Tensor) else (v, None)
            for k, v in st.items()
        }
    return snap


def _restore_optimizer(optimizer: torch.optim.Optimizer, snap: dict) -> None:
    for p in list(optimizer.state.keys()):
        if p not in snap:
            del optimizer.state[p]
    with torch.no_grad():
        for p, entries in snap.items():
            st = optimizer.state[p]
            for k in list(st.keys()):
                if k not in entries:
                    del st[k]
            for k, (obj, value) in entries.items():
                if value is not None:
                    obj.copy_(value)
                st[k] = obj
