"""What the quantities share: parameter selection, evaluation modes, argument checks,
per-example splitting of batches and the collectives used under ``torch.distributed``.

The evaluation rules (``operator_mode``, ``per_example_mode``), the closure wrapper
``Evaluate`` and ``select_params`` live in :mod:`dyndiag.evaluation`, shared with the
curvature operators; they are re-exported here for the quantities' modules.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..evaluation import Evaluate, operator_mode, outputs_fn, per_example_mode, select_params, unwrap
from ..data import batch_targets, default_batch_size, make_loss_closure
from ..distributed import is_distributed

__all__ = [
    "Evaluate",
    "Examples",
    "buffer_copies",
    "check_indices",
    "select_params",
    "check_model",
    "check_chunk_size",
    "check_flat",
    "check_at",
    "per_example_mode",
    "operator_mode",
    "split_examples",
    "gather_scores",
    "to_float",
    "loss_closure",
    "unwrap",
]


def check_model(model: object) -> nn.Module:
    """``model``, or the module inside its DDP/``torch.compile`` wrappers (:func:`unwrap`)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return unwrap(model)


def check_chunk_size(chunk_size: object) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
        raise TypeError(f"chunk_size must be an int, got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return int(chunk_size)


def check_flat(v: object, name: str, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """A flat ``(dim,)`` tensor of ``dtype``, or ``TypeError``/``ValueError`` naming ``name``."""
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name} must be a flat torch.Tensor of shape ({dim},), got {type(v).__name__}")
    if v.dim() != 1 or v.shape[0] != dim:
        raise ValueError(f"{name} must have shape ({dim},) (flat, in parameter order), got {tuple(v.shape)}")
    if v.dtype != dtype:
        raise TypeError(f"{name} has dtype {v.dtype}, but the parameters are {dtype}")
    if not bool(torch.isfinite(v).all()):
        raise ValueError(f"{name} must be finite (it holds NaN or inf)")
    return v.detach()


def check_at(at: object, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Parameter values to evaluate at: one tensor per parameter, same shape and dtype."""
    if isinstance(at, torch.Tensor) or not isinstance(at, Sequence):
        raise TypeError("at must be a sequence of tensors, one per parameter in parameter order")
    at = list(at)
    if len(at) != len(params):
        raise ValueError(f"at must hold one tensor per parameter ({len(params)}), got {len(at)}")
    for i, (a, p) in enumerate(zip(at, params)):
        if not isinstance(a, torch.Tensor) or a.shape != p.shape or a.dtype != p.dtype:
            raise ValueError(
                f"at[{i}] must be a tensor of shape {tuple(p.shape)} and dtype {p.dtype} like its parameter"
            )
    return [a.detach().to(params[0].device) for a in at]


def buffer_copies(model: nn.Module, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """Fresh copies of every buffer, keyed for ``functional_call`` on an :class:`Evaluate`."""
    return {prefix + n: b.clone() for n, b in model.named_buffers()}


class Examples:
    """A batch split into examples along dim 0.

    Every tensor leaf of the (nested) batch whose dim 0 equals the batch size ``n`` is
    split; other leaves (scalars, tensors of another length, non-tensors) are shared
    by every example. :meth:`one` rebuilds a batch of one example from the split
    leaves of that example (each given a leading dimension of 1).
    """

    def __init__(self, batch: object) -> None:
        self.n = default_batch_size(batch)
        leaves, self.spec = tree_flatten(batch)
        self.leaves = leaves
        self.split = [
            isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == self.n for t in leaves
        ]
        self.split_leaves = tuple(t for t, s in zip(leaves, self.split) if s)

    def chunk(self, start: int, stop: int) -> tuple[torch.Tensor, ...]:
        return tuple(t[start:stop] for t in self.split_leaves)

    def one(self, example: Sequence[torch.Tensor]) -> object:
        it = iter(example)
        leaves = [next(it).unsqueeze(0) if s else t for t, s in zip(self.leaves, self.split)]
        return tree_unflatten(leaves, self.spec)

    def part(self, start: int, stop: int) -> object:
        """The sub-batch of examples ``start:stop`` (shared leaves kept whole)."""
        leaves = [t[start:stop] if s else t for t, s in zip(self.leaves, self.split)]
        return tree_unflatten(leaves, self.spec)


def split_examples(batch: object) -> Examples:
    return Examples(batch)


def loss_closure(loss_fn: Callable | None, closure: Callable | None, forward: Callable | None) -> Callable:
    """``(model, batch) -> scalar loss`` from a criterion, a closure, or a criterion
    with ``forward(model, batch) -> outputs`` (targets ``batch[1]`` or ``batch["labels"]``),
    as the curvature operators take them."""
    if forward is None:
        fn = make_loss_closure(loss_fn, closure)
        if closure is not None:
            return fn

        def tuple_closure(model: nn.Module, batch: object) -> torch.Tensor:
            if isinstance(batch, Mapping):
                raise ValueError(
                    "with loss_fn, a mapping batch (e.g. input_ids, attention_mask, labels) needs "
                    "forward=(model, batch) -> outputs; or pass closure=(model, batch) -> loss"
                )
            return fn(model, batch)

        return tuple_closure
    if closure is not None:
        raise ValueError("give forward= with a criterion loss_fn, not with closure= (the closure computes the loss itself)")
    if loss_fn is None or not callable(loss_fn):
        raise TypeError("forward= needs a criterion loss_fn(outputs, targets)")
    outputs = outputs_fn(forward)

    def criterion_closure(model: nn.Module, batch: object) -> torch.Tensor:
        return loss_fn(outputs(model, batch), batch_targets(batch))

    return criterion_closure


# -- distributed ------------------------------------------------------------------
def _all_gather_varlen(local: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's 1-D tensor, rank 0 first (padding to the longest shard)."""
    world = dist.get_world_size()
    n = torch.tensor([local.numel()], dtype=torch.int64, device=local.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]
    longest = max(sizes)
    padded = torch.zeros(longest, dtype=local.dtype, device=local.device)
    padded[: local.numel()] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def check_indices(indices: object, n: int, device: torch.device) -> torch.Tensor:
    if isinstance(indices, torch.Tensor):
        idx = indices.detach()
        if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
            raise TypeError(f"indices must hold integers, got dtype {idx.dtype}")
    else:
        try:
            idx = torch.as_tensor(list(indices), dtype=torch.int64)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError("indices must be a 1-D tensor or a sequence of ints") from None
    if idx.dim() != 1:
        raise ValueError(f"indices must be 1-D, got shape {tuple(idx.shape)}")
    if idx.numel() != n:
        raise ValueError(f"indices must hold one index per example of data ({n}), got {idx.numel()}")
    if idx.numel() and int(idx.min()) < 0:
        raise ValueError("indices must be non-negative")
    return idx.to(device=device, dtype=torch.int64)


def gather_scores(local: torch.Tensor, indices: object | None) -> torch.Tensor:
    """Every rank's per-example scores, whole, and optionally put in dataset order.

    Without ``indices``: the concatenation of the ranks' scores, rank 0 first (just
    ``local`` outside a process group). With ``indices`` (each rank's global index of
    each of its examples): one score per distinct index, in increasing index order;
    an index seen more than once (a ``DistributedSampler`` pads by repeating) keeps
    its first occurrence in rank order.
    """
    idx = None if indices is None else check_indices(indices, local.numel(), local.device)
    if is_distributed():
        local = _all_gather_varlen(local)
        if idx is not None:
            idx = _all_gather_varlen(idx)
    if idx is None:
        return local
    unique, inverse = torch.unique(idx, sorted=True, return_inverse=True)
    first = torch.full((unique.numel(),), idx.numel(), dtype=torch.int64, device=idx.device)
    first.scatter_reduce_(0, inverse, torch.arange(idx.numel(), device=idx.device), reduce="amin")
    return local[first]


def to_float(x: object, name: str) -> float:
    """A float from a Python number or a one-element tensor (torch param groups allow both)."""
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got shape {tuple(x.shape)}")
        return float(x.detach().cpu().item())
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    value = float(x)
    if math.isnan(value):
        raise ValueError(f"{name} is NaN")
    return value
