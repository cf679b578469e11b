"""The process-group questions every layer asks, and the reductions they lead to.

Nothing here imports torch: a process group cannot exist before torch is imported,
so the record store (which stays torch-free) can ask :func:`is_writer` for free.
"""

from __future__ import annotations

import sys

__all__ = [
    "initialized", "rank", "world_size", "is_distributed", "is_writer", "all_reduce_sum", "all_reduce_max",
    "broadcast_object", "all_gather_object",
]


def initialized() -> bool:
    """Whether a ``torch.distributed`` process group is initialised (any size)."""
    if "torch" not in sys.modules:
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank, 0 outside a process group."""
    if not initialized():
        return 0
    import torch.distributed as dist

    return dist.get_rank()


def world_size() -> int:
    """The number of ranks, 1 outside a process group."""
    if not initialized():
        return 1
    import torch.distributed as dist

    return dist.get_world_size()


def is_distributed() -> bool:
    """Whether a process group with more than one rank is initialised."""
    return world_size() > 1


def is_writer() -> bool:
    """Whether this process writes files (records, stores): rank 0, or no process group."""
    return rank() == 0


def all_reduce_sum(t):
    """``t`` summed over ranks in place (returned; unchanged outside a group of several ranks)."""
    if is_distributed():
        import torch.distributed as dist

        dist.all_reduce(t)
    return t


def all_reduce_max(t):
    """``t``'s elementwise maximum over ranks in place (returned)."""
    if is_distributed():
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s picklable ``obj`` on every rank (``obj`` itself outside a group of several ranks)."""
    if not is_distributed():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's picklable ``obj``, in rank order, on every rank (``[obj]`` outside a group)."""
    if not is_distributed():
        return [obj]
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
