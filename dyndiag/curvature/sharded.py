"""Flat vectors of an FSDP-sharded model (``torch.distributed.fsdp.fully_shard``).

FSDP2 holds each parameter as a ``DTensor`` split by rows (``Shard(0)``) over a
one-dimensional device mesh; rank ``r`` keeps a contiguous block of rows (FSDP's
``torch.chunk`` split, possibly empty). An operator on such a model works on *local*
flat vectors: the concatenation, in parameter order, of this rank's row blocks, so
``dim`` is the local length and the full vector is the union of the ranks' pieces
(parameter by parameter, rank 0's rows first). :class:`Shards` maps between the two
and reduces inner products over the ranks; no estimator ever holds a full vector.

Exact products (double backward) need the full parameters: the model is evaluated
functionally on gathered parameter values with FSDP's forward hooks set aside
(:func:`fsdp_hooks_off`), each rank on its own data, and the product is taken at the
gathered vector and reduced over ranks (its graph holds every layer's full weights,
like a single process's product). ``hvp="finite_difference"`` instead runs FSDP's
own sharded forward and backward (:mod:`dyndiag.curvature.finite_difference`).
Code that evaluates or writes parameters like on one process (the loss landscapes)
uses :func:`gathered`: full plain parameters swapped in for a block.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["Shards", "fsdp_hooks_off", "gathered", "is_sharded_param"]


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return None
    return DTensor


def is_sharded_param(p: torch.Tensor) -> bool:
    """Whether ``p`` is a ``DTensor`` (a parameter sharded by FSDP2)."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(p, dtensor)


def local(p: torch.Tensor) -> torch.Tensor:
    """This rank's block of a ``DTensor`` parameter (the tensor itself otherwise), as
    a tensor sharing its storage, so in-place edits reach the parameter."""
    if not is_sharded_param(p):
        return p
    with torch.no_grad():
        return p.to_local()


class Shards:
    """The layout of an operator's flat vectors over the ranks of an FSDP mesh.

    Attributes: ``dim`` (this rank's length), ``full_dim`` (the model's number of
    parameters), ``ranges`` (``(start, length)`` in the full flat vector of each
    parameter's local block, in order), ``group`` (the process group of the mesh),
    ``values`` (the gathered full parameter values after :meth:`refresh`).
    """

    def __init__(self, params: Sequence[torch.Tensor]) -> None:
        from torch.distributed.tensor import Shard

        mesh = params[0].device_mesh
        for p in params:
            if not is_sharded_param(p):
                raise ValueError("params mixes DTensor (FSDP-sharded) parameters with plain tensors")
            if p.device_mesh != mesh or p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
                raise ValueError(
                    "sharded parameters must be row-sharded (Shard(0)) over one 1-D device mesh "
                    f"(fully_shard on a flat mesh), got {tuple(p.placements)} on a {p.device_mesh.ndim}-D mesh"
                )
        self.group = mesh.get_group()
        self.world = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        self.full_shapes = [p.shape for p in params]
        full_numels = [p.numel() for p in params]
        mine = torch.tensor([local(p).numel() for p in params], dtype=torch.int64)
        counts = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(counts, mine, group=self.group)
        #: ``counts[r, i]``: entries of parameter ``i`` on rank ``r``.
        self.counts = torch.stack(counts)
        before = self.counts[: self.rank].sum(0)
        offsets = torch.tensor([0] + full_numels[:-1], dtype=torch.int64).cumsum(0)
        self.ranges = [(int(o + b), int(n)) for n, o, b in zip(mine, offsets, before)]
        self.dim = int(mine.sum())
        self.full_dim = sum(full_numels)
        self.values: list[torch.Tensor] = []
        self._key: tuple | None = None

    @staticmethod
    def of(params: Sequence[torch.Tensor]) -> Shards | None:
        """The layout of ``params``, or ``None`` when none of them is sharded."""
        if not any(is_sharded_param(p) for p in params):
            return None
        return Shards(params)

    # -- vectors ----------------------------------------------------------
    def full(self, V: torch.Tensor) -> torch.Tensor:
        """The full ``(full_dim, k)`` block whose local rows are ``V`` ``(dim, k)``
        (one all-gather; only a product's transient, never an estimator's)."""
        width = int(self.counts.sum(1).max())
        padded = V.new_zeros(width, V.shape[1])
        padded[: V.shape[0]] = V
        blocks = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(blocks, padded.contiguous(), group=self.group)
        pieces = [torch.split(b[: int(c.sum())], c.tolist()) for b, c in zip(blocks, self.counts)]
        return torch.cat([pieces[r][i] for i in range(self.counts.shape[1]) for r in range(self.world)])

    @property
    def index(self) -> torch.Tensor:
        """``(dim,)`` int64: the position in the full flat vector of every local entry."""
        return torch.cat([torch.arange(start, start + n, dtype=torch.int64) for start, n in self.ranges])

    def take(self, V_full: torch.Tensor) -> torch.Tensor:
        """This rank's rows ``(dim, ...)`` of a full ``(full_dim, ...)`` tensor."""
        return torch.cat([V_full[start : start + n] for start, n in self.ranges])

    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the mesh's ranks in place (partial inner products)."""
        dist.all_reduce(t, group=self.group)
        return t

    # -- parameters -------------------------------------------------------
    def refresh(self, params: Sequence[torch.Tensor]) -> bool:
        """Gather the full parameter values into :attr:`values` when any rank's shard
        changed since the last gather (decided together, so every rank gathers);
        returns whether it gathered."""
        # In-place DTensor ops (an optimizer step) bump the DTensor's version, edits of
        # the local block (finite differences) the local tensor's: either means new values.
        key = tuple((p._version, local(p)._version, local(p).data_ptr()) for p in params)
        stale = torch.tensor([float(key != self._key)])
        dist.all_reduce(stale, op=dist.ReduceOp.MAX, group=self.group)
        if not stale.item():
            return False
        with torch.no_grad():
            self.values = [p.full_tensor() for p in params]
        self._key = key
        return True


@contextmanager
def fsdp_hooks_off(model: nn.Module) -> Iterator[None]:
    """FSDP's forward hooks (unshard before, reshard after) set aside in a block.

    A functional evaluation on gathered parameters must not let FSDP swap its own
    unsharded parameters in: they would replace the tensors being differentiated
    (the "appears to not have been used in the graph" error). Restored in order.
    """
    saved = []
    for m in model.modules():
        for hooks in (m._forward_pre_hooks, m._forward_hooks):
            fsdp = [k for k, h in hooks.items() if type(getattr(h, "__self__", None)).__name__ == "FSDPState"]
            if fsdp:
                saved.append((hooks, list(hooks.items())))
                for k in fsdp:
                    del hooks[k]
    try:
        yield
    finally:
        for hooks, items in saved:
            hooks.clear()
            hooks.update(items)


@contextmanager
def gathered(model: nn.Module) -> Iterator[Callable]:
    """The model as one process's model in a block: FSDP's hooks set aside
    (:func:`fsdp_hooks_off`) and every ``DTensor`` parameter replaced by a plain
    ``nn.Parameter`` holding its full value (gathered once, on every rank; the same
    ``requires_grad``; tied parameters stay tied).

    For code that evaluates or writes parameters as on an unsharded model (the loss
    landscapes): every rank holds a full copy of the sharded parameters for the
    block. The sharded parameters are neither read again nor written, and are put
    back on exit (their values, ``.grad`` and flags untouched). Any placement and
    mesh works; every rank of the mesh must enter the block (the gathers are
    collectives, in module order). A no-op on a model with no ``DTensor`` parameter.

    Yields ``swap(params)``: a sequence of the model's parameters with each sharded
    one replaced by its full stand-in (``None`` and name globs pass through).
    """
    held = []  # (a module's parameter dict, name, the sharded parameter)
    full: dict[int, nn.Parameter] = {}
    for m in model.modules():
        for name, p in m._parameters.items():
            if p is not None and is_sharded_param(p):
                held.append((m._parameters, name, p))
    with fsdp_hooks_off(model):
        try:
            for params, name, p in held:
                if id(p) not in full:
                    with torch.no_grad():
                        full[id(p)] = nn.Parameter(p.full_tensor(), requires_grad=p.requires_grad)
                params[name] = full[id(p)]

            def swap(params):
                if params is None or isinstance(params, (str, torch.Tensor)):
                    return params  # the default, a glob, or a mistake the caller reports
                return [full.get(id(p), p) for p in params]

            yield swap
        finally:
            for params, name, p in held:
                params[name] = p
