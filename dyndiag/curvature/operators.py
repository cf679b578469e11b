"""Hessian and generalized Gauss–Newton operators of a model's loss over its data.

Products are exact and side-effect free (``HessianOperator(..., hvp="finite_difference")``
instead differentiates gradients numerically, :mod:`.finite_difference`; FSDP-sharded
models work on local vectors, :mod:`.sharded`).

Hessian:

* ``matvec(v)`` (and a one-column ``matmat``) multiplies by double backward on
  the gradient graph (kept between products for a single batch);
* ``matmat(V)`` multiplies ``k`` columns in chunks of ``max_batch_vectors``
  (memory grows with the chunk, not with ``k``), by double backward with the
  columns batched by ``torch.func.vmap`` (``backend="vmap"``) or one column at a
  time on a gradient graph built once per batch (``backend="loop"``). Both are
  reverse mode only, so losses without forward-mode derivatives (MSE, Huber in
  torch 2.13) work on both.

GGN ``J^T H_L J``: ``J v`` by forward mode in the product's own forward, which also
records the graph ``J^T`` pulls back through; ``H_L`` in closed form for
cross-entropy, :class:`~dyndiag.data.CausalLMLoss` and MSE
(:mod:`dyndiag.curvature.loss_hessian`), else by double backward through the
criterion alone. Nothing is differentiated twice through the model, which on a
language model would hold several logits-sized tensors. ``vmap`` batches the
columns of a chunk, ``loop`` takes them one at a time.

``block_matmat(X, blocks)`` multiplies columns of several diagonal blocks at once
(``blocks=`` on the estimators): one gradient graph (Hessian) or one forward (GGN)
per batch for all blocks, each block's columns differentiated toward its own
parameters only.

``backend="auto"`` takes vmap on CUDA and, on the CPU, whichever of the two is
faster for this operator and chunk width, timed on the first such chunk
(:mod:`dyndiag.curvature.blocks`; both are exact, ``op.block_backends`` holds the
choices). A model ``vmap`` cannot handle falls back to the loop with one warning.

The loss over several batches is the loss's own reduction over all the data: for
``reduction="mean"`` the mean over every term the batch means average, i.e. the
batch means weighted by :func:`dyndiag.data.loss_count` (samples; for causal-LM
batches the tokens whose label is not ignored), for ``reduction="sum"`` the sum of
batch losses (an ``nn`` loss's ``reduction`` attribute, or the operator's
``reduction=`` argument for a closure). ``micro_batch_size=m`` cuts every batch
into micro-batches of at most ``m`` samples weighted the same way: the same
operator with a product's peak memory set by ``m``.

The model is evaluated functionally (``torch.func.functional_call``) on detached
views of its parameters and on fresh copies of its buffers, so parameters,
``.grad``, ``requires_grad`` and BatchNorm running statistics never move. While an
operator evaluates the model every module except BatchNorm/InstanceNorm layers is
in eval mode — dropout (including attention dropout) is off, since a random
operator breaks Lanczos — and normalisation layers keep the model's mode (train
mode: batch statistics, the loss training sees). Attention runs with PyTorch's
MATH scaled-dot-product kernel, the only one with a double backward on CPU.
Modes and RNG states are restored after every product (:func:`dyndiag.evaluation.operator_mode`).
Data that is not the same on every pass (a shuffling DataLoader with train-mode
BatchNorm or ``drop_last``, random augmentation) is refused on first use.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vjp, vmap
from torch.nn.modules.batchnorm import _NormBase

from ..data import (
    batch_targets,
    check_scalar_loss,
    criterion_outputs,
    default_batch_size,
    iter_batches,
    is_single_batch,
    loss_count,
    loss_reduction,
    make_loss_closure,
    split_batch,
    tensors_in,
    to_device,
    weighted_mean,
)
from ..evaluation import Evaluate, operator_mode, outputs_fn, select_params, unwrap
from ..state import rng_state, set_rng_state
from .base import CurvatureOperator
from .blocks import AUTO_CPU_CHUNK, VMAP_BYTES_PER_SAVED_BYTE, auto_chunk, cpu_chunk, race, remembered
from .loss_hessian import loss_hessian
from .finite_difference import central_differences
from .sharded import Shards, fsdp_hooks_off

__all__ = ["HessianOperator", "GGNOperator"]


class _ModelOperator(CurvatureOperator):
    """Shared machinery: parameter selection, data iteration, guards, chunking."""

    def __init__(
        self,
        model: nn.Module,
        data: object,
        params: Sequence[torch.Tensor] | str | Sequence[str] | None,
        fn: Callable,
        criterion: Callable | None,
        *,
        reduction: str,
        batch_size_fn: Callable | None,
        max_batch_vectors: int | str,
        cache_data: bool,
        backend: str,
        cache_graph: bool | None = None,
        at: Sequence[torch.Tensor] | None = None,
        compute_dtype: torch.dtype | None = None,
        micro_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        model = unwrap(model)
        if data is None:
            raise ValueError("data must be a batch (inputs, targets) or an iterable of batches, got None")
        if max_batch_vectors != "auto" and (
            not isinstance(max_batch_vectors, int) or isinstance(max_batch_vectors, bool) or max_batch_vectors < 1
        ):
            raise ValueError(f"max_batch_vectors must be a positive int or 'auto', got {max_batch_vectors!r}")
        if backend not in ("auto", "vmap", "loop"):
            raise ValueError(f"backend must be 'auto', 'vmap' or 'loop', got {backend!r}")
        if batch_size_fn is not None and not callable(batch_size_fn):
            raise TypeError("batch_size_fn must be callable (batch) -> int")
        if micro_batch_size is not None and (
            not isinstance(micro_batch_size, int) or isinstance(micro_batch_size, bool) or micro_batch_size < 1
        ):
            raise ValueError(f"micro_batch_size must be a positive int or None, got {micro_batch_size!r}")
        self.model = model
        self.loss_fn = criterion
        self.reduction = reduction
        self.names, self.params = select_params(model, params)
        self.dim = sum(p.numel() for p in self.params)
        #: Products by double backward (``"exact"``) or ``"finite_difference"`` (HessianOperator).
        self.hvp = "exact"
        #: FSDP-sharded parameters: vectors are this rank's shards (:mod:`.sharded`).
        self.shards = Shards.of(self.params)
        if self.shards is not None:
            self._check_sharded(data, at, cache_data)
            self.dim = self.shards.dim
        self.param_dtype = self.params[0].dtype
        self.dtype = _compute_dtype(self.param_dtype, compute_dtype)
        self.device = self.params[0].device
        self._at = None
        if at is not None:
            at = list(at)
            if len(at) != len(self.params) or any(
                not isinstance(a, torch.Tensor) or a.shape != p.shape or a.dtype != p.dtype
                for a, p in zip(at, self.params)
            ):
                raise ValueError("at must hold one tensor per parameter, with its shape and dtype")
            self._at = [a.to(self.device) for a in at]
        self._shapes = [p.shape for p in self.params]
        self._numels = [p.numel() for p in self.params]
        self._offsets = np.cumsum([0, *self._numels]).tolist()  # parameter i: rows offsets[i]:offsets[i + 1]
        self._evaluate = Evaluate(model, fn)
        self._buffer_names = ["model." + n for n, _ in model.named_buffers()]
        chosen = set(self.names)
        self._other_params = [(n, p) for n, p in model.named_parameters() if n not in chosen]
        self._batch_size_fn = batch_size_fn or (lambda batch: loss_count(batch, criterion))
        self.micro_batch_size = micro_batch_size
        self._norm_layers = [m for m in model.modules() if isinstance(m, _NormBase)]
        self._check_micro_batching()
        self.max_batch_vectors = max_batch_vectors
        self.backend = backend
        #: ``backend="auto"`` on the CPU: the backend each chunk width was multiplied by.
        self.block_backends: dict[int, str] = {}
        self._vmap_failed = False
        self._data = data
        self._cached = None
        if cache_data:
            self._cached = list(self._read())
        elif isinstance(data, Iterator):
            raise ValueError(
                "data is a one-shot iterator, but every product reads the data again: pass a list "
                "of batches, a DataLoader, or cache_data=True"
            )
        # Only an iterable that is not a list of batches can give other batches on the next pass.
        self._repeatable = (
            self._cached is not None or is_single_batch(data) or isinstance(data, (list, tuple))
        )
        one_batch = (self._cached is not None and len(self._cached) == 1) or (
            is_single_batch(data) and (micro_batch_size is None or default_batch_size(data) <= micro_batch_size)
        )
        if cache_graph and not one_batch:
            raise ValueError(
                "cache_graph=True needs data to be a single batch of at most micro_batch_size samples "
                "(or cache_data=True with one such batch)"
            )
        self.cache_graph = one_batch if cache_graph is None else bool(cache_graph)
        self._graphs: dict[str, tuple] = {}  # backend -> (key, graph) of the single batch

    # -- data -----------------------------------------------------------
    def _count(self, batch) -> int:
        n = self._batch_size_fn(batch)
        if not isinstance(n, int) or isinstance(n, bool):
            n = int(n)
        return n

    def _check_micro_batching(self) -> None:
        """Refuse micro-batches where they would change the function: BatchNorm in
        train mode normalises with the statistics of the batch it sees."""
        if self.micro_batch_size is not None and any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in self._norm_layers
        ):
            raise ValueError(
                "micro_batch_size: the model has BatchNorm in train mode, whose batch statistics "
                "would be those of each micro-batch, a different function from the whole batch's. "
                "Put the model in eval mode (model.eval()) or leave micro_batch_size=None."
            )

    def _batches(self) -> Iterable[tuple[object, int]]:
        self._check_micro_batching()
        if self._cached is not None:
            yield from self._cached
            return
        self._check_repeatable()
        yield from self._read()

    def _read(self) -> Iterator[tuple[object, int]]:
        """``(batch, weight)`` for every batch of ``data`` on the device, cut into
        micro-batches of at most ``micro_batch_size`` samples, each weighing its own
        count (the loss over all data is unchanged, products only need less memory)."""
        for b in iter_batches(self._data):
            b = self._prepare(b)
            for part in [b] if self.micro_batch_size is None else split_batch(b, self.micro_batch_size):
                yield part, self._count(part)

    def _check_repeatable(self) -> None:
        """Refuse data whose loss changes between two passes with the RNG moved
        between them (run once, on first use, inside the product's guard)."""
        if self._repeatable:
            return
        state = rng_state()
        try:
            first = self._total_loss(self._read())
            set_rng_state(state)
            # Whatever a DataLoader or an augmentation draws from (its sampler's seed,
            # worker seeds, numpy or python transforms) now starts elsewhere.
            torch.rand(1)
            np.random.random()
            random.random()
            second = self._total_loss(self._read())
        finally:
            set_rng_state(state)
        tol = 1000 * torch.finfo(self.dtype).eps * (abs(first) + abs(second))
        if not abs(first - second) <= tol:
            raise ValueError(
                f"data gives another loss on each pass ({first:.10g}, then {second:.10g} after the "
                "random number generator moved), so the operator would change between products. "
                "Typical causes: BatchNorm in train mode with a shuffling DataLoader, drop_last=True "
                "with shuffling, random augmentation. Remedies: cache_data=True (fixes the batches "
                "once), BatchNorm in eval mode (model.eval() before building the operator), or a "
                "DataLoader with shuffle=False and no random transforms."
            )
        self._repeatable = True

    def _prepare(self, batch):
        """The batch on the operator's device; floating tensors in the compute dtype
        when it differs from the parameters' (mixed precision: bf16 inputs of a bf16
        model meet float32 parameters)."""
        dtype = self.dtype if self.dtype != self.param_dtype else None
        return to_device(batch, self.device, float_dtype=dtype)

    # -- functional evaluation -------------------------------------------
    def _mapping(self, tensors: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        mapping = {"model." + n: t for n, t in zip(self.names, tensors)}
        # Parameters outside the operator enter as constants: the model's own tensors
        # require grad and would tie every product to an autograd graph through them.
        cast = self.dtype != self.param_dtype
        for n, p in self._other_params:
            mapping["model." + n] = p.detach().to(self.dtype) if cast and p.is_floating_point() else p.detach()
        # Fresh buffer copies made inside the transformed function: BatchNorm in train
        # mode updates them in place, which torch.func allows only on tensors created
        # at the innermost level, and the model's own buffers never move.
        for name, b in zip(self._buffer_names, self.model.buffers()):
            cast = b.is_floating_point() and b.dtype != self.dtype and self.dtype != self.param_dtype
            mapping[name] = b.to(self.dtype) if cast else b.clone()
        return mapping

    def _call(self, tensors: Sequence[torch.Tensor], batch):
        """``fn(model, batch)`` with the model's parameters replaced by ``tensors``."""
        return functional_call(self._evaluate, self._mapping(tensors), (batch,))

    def _criterion(self, outputs: torch.Tensor, batch) -> torch.Tensor:
        return check_scalar_loss(self.loss_fn(outputs, batch_targets(batch)), "loss_fn")

    def _loss(self, tensors: Sequence[torch.Tensor], batch) -> torch.Tensor:
        """The batch's loss: ``loss_fn(outputs, targets)``, or the closure's value."""
        if self.loss_fn is None:
            return check_scalar_loss(self._call(tensors, batch), "closure")
        return self._criterion(self._call(tensors, batch), batch)

    def _total_loss(self, batches: Iterable[tuple[object, int]]) -> float:
        with torch.no_grad():
            values = self._values()
            terms = ((self._loss(values, b), n) for b, n in batches if n > 0)
            zero = torch.zeros((), dtype=torch.float64, device=self.device)
            return float(weighted_mean(terms, zero, self.reduction))

    def loss(self) -> float:
        """The loss over ``data`` (mean or sum, as ``reduction``) at the operator's
        parameters, evaluated as products are (dropout off, normalisation layers in
        the model's mode, buffers copied); reduced over ranks like the products."""
        if self.shards is not None:
            self.shards.refresh(self.params)
        with self._guarded():
            return self._total_loss(self._batches())

    def _split(self, V: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Rows of ``V`` (k, dim) -> per-parameter tensors (k, *shape)."""
        k = V.shape[0]
        return tuple(
            t.reshape(k, *s) for t, s in zip(torch.split(V, self._numels, dim=1), self._shapes)
        )

    def _rows(self, V: torch.Tensor, i: int) -> torch.Tensor:
        """Parameter ``i``'s rows of ``V`` (dim, k) as ``(k, *shape)``."""
        return V[self._offsets[i] : self._offsets[i + 1]].T.reshape(V.shape[1], *self._shapes[i])

    def _put(self, out: torch.Tensor, positions: Sequence[int], parts: Sequence[torch.Tensor | None]) -> None:
        """Write ``(k, *shape)`` ``parts`` of the parameters at ``positions`` into their
        rows of ``out`` (dim, k); ``None`` (no path to the loss) leaves them as they are."""
        for i, p in zip(positions, parts):
            if p is not None:
                out[self._offsets[i] : self._offsets[i + 1]] = p.reshape(out.shape[1], -1).T

    def _join(self, parts: Sequence[torch.Tensor | None], k: int) -> torch.Tensor:
        """Per-parameter ``(k, *shape)`` tensors -> ``(k, dim)``; ``None`` (a parameter
        with no path to the loss) is a block of zeros."""
        return torch.cat(
            [
                (torch.zeros(k, n, dtype=self.dtype, device=self.device) if p is None else p.reshape(k, -1))
                for p, n in zip(parts, self._numels)
            ],
            dim=1,
        )

    def _sources(self) -> list[torch.Tensor]:
        """The parameter tensors the operator is taken at (``at=`` or the live ones;
        a sharded operator's gathered values)."""
        if self.shards is not None:
            return self.shards.values
        return self._at if self._at is not None else self.params

    def _values(self) -> list[torch.Tensor]:
        """Fresh detached views of the parameter values, in the compute dtype."""
        if self.dtype == self.param_dtype:
            return [t.detach() for t in self._sources()]
        return [t.detach().to(self.dtype) for t in self._sources()]

    def _leaves(self) -> list[torch.Tensor]:
        """The parameter values as fresh leaves that require grad."""
        return [p.requires_grad_(True) for p in self._values()]

    def clear_cache(self) -> None:
        """Free the cached gradient graphs (see ``cache_graph``)."""
        self._graphs.clear()

    def _graph_key(self) -> tuple:
        # Everything the cached graph depends on: in-place parameter updates (optimizer
        # steps, load_state_dict) bump versions, ``p.data = ...`` swaps the storage,
        # buffers feed eval-mode BatchNorm, norm layers keep the user's mode, and the
        # batch tensors could be edited in place. (BatchNorm's kernel moves running
        # statistics without bumping their versions, but num_batches_tracked moves
        # with them.)
        return (
            tuple((p._version, p.data_ptr()) for p in self._sources()),
            tuple(b._version for b in self.model.buffers()),
            tuple(m.training for m in self._norm_layers),
            tuple(t._version for t in tensors_in(self._data)),
        )

    def _reuse_graph(self, kind: str, build: Callable) -> object:
        """``build()``'s graph for backend ``kind``, cached across products while
        its key is unchanged (one graph per backend: ``matvec`` uses the loop's,
        blocks may use vmap's)."""
        if not self.cache_graph:
            return build()
        key = self._graph_key()
        cached = self._graphs.get(kind)
        if cached is None or cached[0] != key:
            self._graphs.pop(kind, None)  # free the stale graph before building the new one
            self._graphs[kind] = cached = (key, build())
        return cached[1]

    @contextmanager
    def _guarded(self) -> Iterator[None]:
        with operator_mode(self.model), (fsdp_hooks_off(self.model) if self.shards is not None else nullcontext()):
            yield

    # -- FSDP-sharded models and finite differences (see .sharded, .finite_difference)
    @staticmethod
    def _check_sharded(data, at, cache_data) -> None:
        if at is not None:
            raise ValueError("at= is not supported on an FSDP-sharded model")
        if not (cache_data or is_single_batch(data) or isinstance(data, (list, tuple))):
            raise ValueError(
                "on an FSDP-sharded model data must be a batch or a list of batches (or cache_data=True): "
                "every rank must read the same batches on every pass"
            )

    def _product(self, per_batch: Callable, V: torch.Tensor) -> torch.Tensor:
        """``H V`` over all data: exact, or by central differences (``hvp``). A sharded
        operator multiplies the gathered columns at the gathered parameters and keeps
        its own rows."""
        if self.hvp == "finite_difference":
            return central_differences(self, V)
        if self.shards is None:
            return self._accumulate(per_batch, V)
        self.shards.refresh(self.params)
        return self.shards.take(self._accumulate(per_batch, self.shards.full(V)))

    # -- products ---------------------------------------------------------
    def _accumulate(self, per_batch: Callable, V: torch.Tensor) -> torch.Tensor:
        """The loss's reduction over batches (and ranks) of ``per_batch(batch, V)``."""
        with self._guarded():
            terms = ((per_batch(b, V), n) for b, n in self._batches() if n > 0)
            return weighted_mean(terms, torch.zeros_like(V), self.reduction)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self._product(self._batch_matmat, V)

    def block_matmat(self, X: torch.Tensor, blocks: Sequence[tuple[Sequence[str], int]]) -> torch.Tensor:
        """Products of diagonal blocks of the operator, all of them in one pass over the data.

        ``X``: ``(dim, k)``, its columns in consecutive groups, one per ``(names,
        width)`` of ``blocks``: ``width`` columns of the diagonal block ``H_bb`` of the
        parameters ``names`` (a subset of :attr:`names`; blocks may overlap). Returns
        ``(dim, k)``: each group's columns multiplied by its block, ``H_bb X_b`` on the
        block's rows, zeros on the others (a group's rows outside its block are not
        read). Counts ``k`` products.

        On every batch one gradient graph serves all blocks: the Hessian's first
        backward (kept between products with ``cache_graph``), then for each block
        the pullback of its parameters' gradients toward its parameters alone; the
        GGN's forward carries every column's tangents at once (batched by vmap), then
        each block's columns are pulled back toward its parameters alone. Other
        parameters' weight-gradient work is left out, so a column costs what it costs
        on an operator of the block's parameters, or less. Columns are batched or
        looped as ``backend`` says (``"auto"``: raced on the CPU per layout of
        blocks), in chunks of ``max_batch_vectors``.
        """
        X = self._check_vectors(X, "X", ndim=2)
        groups = self._groups(blocks, X.shape[1])
        if X.shape[1] == 0:
            return torch.empty_like(X)
        if self.hvp == "finite_difference" or self.shards is not None:  # the full product, its block rows kept
            out = self._product(self._batch_matmat, self._block_rows(X, groups))
        else:
            out = self._accumulate(lambda batch, V: self._batch_blocks(batch, V, groups), self._block_rows(X, groups))
        self._counted(X.shape[1])
        return self._block_rows(out, groups)  # reverse-mode GGN products fill every row

    def _block_rows(self, X: torch.Tensor, groups: list[tuple[list[int], slice]]) -> torch.Tensor:
        """``X`` with each group's columns zero off its block's rows."""
        out = torch.zeros_like(X)
        for positions, cols in groups:
            for i in positions:
                rows = slice(self._offsets[i], self._offsets[i + 1])
                out[rows, cols] = X[rows, cols]
        return out

    def _groups(self, blocks: object, k: int) -> list[tuple[list[int], slice]]:
        """``blocks`` of :meth:`block_matmat` as ``(parameter positions, columns)``."""
        position = {n: i for i, n in enumerate(self.names)}
        groups, start = [], 0
        for entry in blocks:  # type: ignore[attr-defined]
            names, width = entry
            names = [names] if isinstance(names, str) else list(names)
            unknown = [n for n in names if n not in position]
            if not names or unknown:
                raise ValueError(f"blocks: a block must name some of the operator's parameters (op.names), got {names[:3]}")
            if not isinstance(width, int) or isinstance(width, bool) or width < 0:
                raise ValueError(f"blocks: widths must be non-negative ints, got {width!r}")
            groups.append((sorted({position[n] for n in names}), slice(start, start + width)))
            start += width
        if start != k:
            raise ValueError(f"blocks: widths add up to {start} columns, X has {k}")
        return groups

    def _batch_blocks(self, batch, V: torch.Tensor, groups: list[tuple[list[int], slice]]) -> torch.Tensor:
        """:meth:`block_matmat` on one batch (``V``: each group's columns zero off its
        block's rows): one graph (the loop's) for every block, the columns in chunks of
        ``max_batch_vectors`` whichever blocks they belong to."""
        graph = self._loop_graph(batch)
        k = V.shape[1]
        step = self._block_step(batch, k)
        out = torch.empty_like(V)
        for start in range(0, k, step):
            stop = min(start + step, k)
            out[:, start:stop] = self._block_chunk(batch, graph, V[:, start:stop], _columns_in(groups, start, stop))
        return out

    def _block_step(self, batch, k: int) -> int:
        """Columns multiplied together: ``max_batch_vectors``; ``"auto"`` resolved
        from the bytes a forward saves (a batched column holds a few times that)."""
        if self.max_batch_vectors != "auto":
            return self.max_batch_vectors
        if self.backend == "loop" or k <= 1:
            return AUTO_CPU_CHUNK
        saved = self._saved_bytes(batch)
        if _is_cuda(self.device):
            self.max_batch_vectors = auto_chunk(VMAP_BYTES_PER_SAVED_BYTE * saved, _cuda_free(self.device))
        else:
            self.max_batch_vectors = cpu_chunk(saved)
        return self.max_batch_vectors

    def _block_chunk(self, batch, graph, V: torch.Tensor, groups: list[tuple[list[int], slice]]) -> torch.Tensor:
        """``V``'s columns times their blocks on ``graph``: ``groups`` holds each block's
        parameter positions and columns of ``V`` (zero off the block's rows). Batched
        or column by column, chosen as :meth:`_chunk` chooses (raced on the CPU for
        each layout of blocks and widths)."""
        # Batching helps where it batches columns: those of one block, or for an operator
        # whose batched pass is shared by all blocks (the GGN's forward), every column.
        width = V.shape[1] if self._blocks_share_batch else max(c.stop - c.start for _, c in groups)

        def columns(batched: bool) -> Callable:
            return lambda g, W: self._block_columns(g, W, groups, batched)

        def loop() -> torch.Tensor:
            return columns(False)(graph, V)

        def batched() -> torch.Tensor:
            return columns(True)(graph, V)

        def key() -> tuple:
            layout = tuple((tuple(p), c.stop - c.start) for p, c in groups)
            return ("blocks", type(self).__name__, tuple(zip(self.names, self._shapes)), layout, self.dtype,
                    self.cache_graph, tuple((tuple(t.shape), t.dtype) for t in tensors_in(batch)))

        def run() -> torch.Tensor:
            done = [0]

            def loop_on(g, W: torch.Tensor) -> torch.Tensor:
                # The race loops over the first columns, then (if the loop wins) the rest.
                start, done[0] = done[0], done[0] + W.shape[1]
                return self._block_columns(g, W, _columns_in(groups, start, done[0]), False)

            return race(key(), V, (lambda: graph, columns(True)), (lambda: graph, loop_on), graph_is_reused=True)[0]

        return self._by_backend(batch, V, width, key, batched, loop, run)

    #: Whether a batched block chunk batches the columns of all its blocks together.
    _blocks_share_batch = False

    def _block_columns(
        self, graph, V: torch.Tensor, groups: list[tuple[Sequence[int], slice]], batched: bool
    ) -> torch.Tensor:  # pragma: no cover - abstract
        """``(dim, w)``: each group's columns of ``V`` (zero off the rows of the
        parameters at its positions) times the diagonal block of those parameters, on
        a graph from :meth:`_loop_graph`, differentiating toward them alone; its rows
        (other rows: zero or the full product's); columns ``batched`` or one at a time."""
        raise NotImplementedError

    def _batch_matmat(self, batch, V: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(V)
        start = 0
        if self.max_batch_vectors == "auto":
            start = self._size_chunks(batch, V, out)
        step = 1 if self.max_batch_vectors == "auto" else self.max_batch_vectors
        for start in range(start, V.shape[1], step):
            out[:, start : start + step] = self._chunk(batch, V[:, start : start + step])
        return out

    def _size_chunks(self, batch, V: torch.Tensor, out: torch.Tensor) -> int:
        """Resolve ``max_batch_vectors="auto"``; returns the columns already multiplied.

        On CUDA with the vmap backend, the first column is multiplied alone while the
        allocator's peak is watched; its cost per column and the free memory (the
        driver's plus what torch's cache holds unused) give the chunk, keeping half of
        the free memory spare. Elsewhere at most
        :data:`~dyndiag.curvature.blocks.AUTO_CPU_CHUNK`, fewer where vmap's columns
        (sized from what one forward saves for backward) would not fit in half of
        the host's available memory.
        """
        if self.backend == "loop":
            self.max_batch_vectors = AUTO_CPU_CHUNK
            return 0
        if V.shape[1] <= 1:  # a single column needs no chunk: decide on the first block
            return 0
        if not _is_cuda(self.device):
            self.max_batch_vectors = cpu_chunk(self._saved_bytes(batch))
            return 0
        base, peak_before = _cuda_memory(self.device)
        out[:, :1] = self._vmap_or_fallback(batch, V[:, :1])
        _, peak_after = _cuda_memory(self.device)
        # Without resetting the user's peak statistics: a new peak measures the column;
        # an older, higher peak bounds it from above (a conservative estimate).
        per_column = max(peak_after, peak_before) - base
        self.max_batch_vectors = auto_chunk(per_column, _cuda_free(self.device))
        return 1

    def _saved_bytes(self, batch) -> int:
        """Bytes one forward of the loss on ``batch`` saves for backward."""
        sizes = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            sizes.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            self._loss(self._leaves(), batch)
        return sum(sizes)

    def _chunk(self, batch, V: torch.Tensor) -> torch.Tensor:
        width = V.shape[1]

        def key() -> tuple:
            return (type(self).__name__, tuple(zip(self.names, self._shapes)), self.dtype, self.cache_graph,
                    width, tuple((tuple(t.shape), t.dtype) for t in tensors_in(batch)))

        def run() -> torch.Tensor:
            out, self.block_backends[width] = race(
                key(), V, (lambda: self._vmap_graph(batch), self._vmap_columns),
                (lambda: self._loop_graph(batch), self._loop_columns), graph_is_reused=self.cache_graph,
            )
            if self.block_backends[width] == "loop":
                self._graphs.pop("vmap", None)  # the loser's graph would only hold memory
            return out

        return self._by_backend(
            batch, V, width, key, lambda: self._vmap_chunk(batch, V), lambda: self._loop_chunk(batch, V), run,
            record=True,
        )

    def _by_backend(
        self, batch, V: torch.Tensor, width: int, key: Callable[[], tuple], batched: Callable, loop: Callable,
        run_race: Callable, *, record: bool = False,
    ) -> torch.Tensor:
        """``V``'s chunk multiplied by ``batched()`` (vmap) or ``loop()``, as ``backend``
        says: the loop for ``"loop"``, one column, or a model vmap failed on; vmap for
        ``"vmap"`` and on CUDA; on the CPU the winner remembered for ``key()``, or
        ``run_race()`` (which times both) the first time. ``record`` keeps a remembered
        choice in ``block_backends[width]``."""
        if self.backend == "loop" or (self.backend == "auto" and (width == 1 or self._vmap_failed)):
            return loop()
        if self.backend == "vmap" or _is_cuda(self.device):
            return self._vmap_or_fallback(batch, V, batched, loop)
        backend = remembered(key())
        if backend is None:
            return self._vmap_or_fallback(batch, V, run_race, loop)
        if record:
            self.block_backends[width] = backend
        return self._vmap_or_fallback(batch, V, batched, loop) if backend == "vmap" else loop()

    def _vmap_or_fallback(
        self, batch, V: torch.Tensor, run: Callable | None = None, loop: Callable | None = None
    ) -> torch.Tensor:
        """``run()`` (default: vmap on ``V``), or with ``backend="auto"`` the loop
        (``loop()``, default: the loop on ``V``) with one warning when vmap fails for
        this model."""
        try:
            return run() if run is not None else self._vmap_chunk(batch, V)
        except (ValueError, TypeError):
            raise
        except RuntimeError as err:
            if self.backend == "vmap":
                raise
            warnings.warn(
                f"{type(self).__name__}: batched products (torch.func.vmap) failed for this "
                f"model ({str(err).splitlines()[0][:200]}); falling back to one product per "
                "column. Pass backend='loop' to skip the attempt.",
                RuntimeWarning,
                stacklevel=10,  # the caller of matmat, past _chunk and _by_backend
            )
        self._vmap_failed = True
        self.block_backends[V.shape[1]] = "loop"
        return loop() if loop is not None else self._loop_chunk(batch, V)

    def _loop_chunk(self, batch, V: torch.Tensor) -> torch.Tensor:
        return self._loop_columns(self._loop_graph(batch), V)

    def _vmap_chunk(self, batch, V: torch.Tensor) -> torch.Tensor:
        return self._vmap_columns(self._vmap_graph(batch), V)

    def _vmap_graph(self, batch) -> object:  # pragma: no cover - abstract
        """The pullbacks vmap batches the columns of a chunk on ``batch`` through."""
        raise NotImplementedError

    def _vmap_columns(self, graph: object, V: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """``H V`` with the columns batched by ``torch.func.vmap`` on a graph from :meth:`_vmap_graph`."""
        raise NotImplementedError

    def _loop_graph(self, batch) -> object:  # pragma: no cover - abstract
        """What the loop differentiates for every column of a chunk on ``batch``."""
        raise NotImplementedError

    def _loop_columns(self, graph: object, V: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """``H V`` column by column on a graph from :meth:`_loop_graph`."""
        raise NotImplementedError


def _columns_in(groups: list[tuple[list[int], slice]], start: int, stop: int) -> list[tuple[list[int], slice]]:
    """The ``(positions, columns)`` groups that meet columns ``start:stop``, their
    columns counted from ``start``."""
    return [(p, slice(max(c.start, start) - start, min(c.stop, stop) - start))
            for p, c in groups if c.start < stop and c.stop > start]


def _is_cuda(device: torch.device) -> bool:
    return device.type == "cuda"


def _cuda_memory(device: torch.device) -> tuple[int, int]:
    """(bytes allocated, peak bytes allocated) once the device's queued work is done."""
    torch.cuda.synchronize(device)
    return torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device)


def _cuda_free(device: torch.device) -> int:
    """Bytes a new allocation could use: the driver's free memory plus what torch's
    caching allocator holds without using it."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def _compute_dtype(param_dtype: torch.dtype, requested: torch.dtype | None) -> torch.dtype:
    """float32 for half-precision parameters (bf16/fp16 HVPs lose most of their
    digits to round-off and overflow); otherwise the parameters' own dtype."""
    if requested is not None:
        if not isinstance(requested, torch.dtype) or not requested.is_floating_point:
            raise TypeError(f"compute_dtype must be a floating torch.dtype, got {requested!r}")
        return requested
    return torch.float32 if param_dtype in (torch.float16, torch.bfloat16) else param_dtype


class HessianOperator(_ModelOperator):
    """The Hessian of the loss over every sample in ``data``, as an operator.

    Parameters
    ----------
    model:
        The network. Evaluated functionally; never modified.
    loss_fn:
        Criterion ``loss_fn(outputs, targets) -> scalar`` (mean or sum reduction).
    data:
        One batch ``(inputs, targets)`` or an iterable of batches of any sizes. The
        operator is the Hessian of the loss over all of it: the sample-weighted mean
        of the batch losses (each batch's mean weighted by its size) for a mean
        reduction, their sum for a sum. An iterable must give the same batches on
        every pass (checked on first use, see ``cache_data``).
    params:
        The parameters to differentiate, in order, or name globs (a string or a
        list of them, e.g. ``"transformer.h.*.attn.*"``, matched against the
        trainable parameters' names, in model order); default: every parameter of
        the model with ``requires_grad``. Flat vectors follow this order. A parameter
        with no path to the loss has zero rows and columns; the others enter as
        constants.
    closure:
        ``closure(model, batch) -> scalar loss``, instead of ``loss_fn``, for dict
        batches or losses that are not a criterion.
    reduction:
        ``"mean"`` or ``"sum"``: how batch losses combine. Default: read from
        ``loss_fn.reduction`` (``nn`` losses), else ``"mean"``; a closure that sums
        over its batch declares ``reduction="sum"``.
    batch_size_fn:
        ``(batch) -> int``: the batch's weight among batches, the number of terms
        its mean loss averages. Default :func:`dyndiag.data.loss_count`: the tokens
        whose label is not ignored for language-model batches (``labels`` with
        ``-100``, or ``loss_fn.count``), else dim 0 of the batch's first tensor.
    max_batch_vectors:
        Columns multiplied in one vmapped pass; bounds memory of ``matmat``.
        ``"auto"`` (default): on CUDA with the vmap backend, sized from the free GPU
        memory and the measured cost of one column (half the free memory kept
        spare); elsewhere at most 32, fewer where vmap's columns would not fit in
        half of the host's available memory.
    cache_data:
        Materialise the batches once on the operator's device. Needed when the
        batches change between passes over ``data``: a shuffling DataLoader with
        BatchNorm in train mode or ``drop_last=True``, random augmentation (such
        data is refused with a ``ValueError`` on first use otherwise).
    backend:
        How blocks of several columns are multiplied: ``"vmap"`` (double
        backward, columns batched by ``torch.func.vmap``), ``"loop"`` (double
        backward column by column, the gradient graph reused across the columns
        of a block) or ``"auto"``: vmap on CUDA; on the CPU the faster of the two
        for this model, data and chunk width, timed on the first chunk of that
        width (``block_backends`` holds the choices). One column is always
        multiplied by double backward unless ``backend="vmap"``.
    cache_graph:
        Keep the gradient graph (of the backend in use) between products when
        ``data`` is one batch, so later products skip the forward and the first
        backward (what Lanczos pays at each of its one-vector steps). The graph is
        rebuilt when the parameters, buffers, normalisation-layer modes or batch
        tensors change (an optimizer step, ``load_state_dict``), so it is never
        stale. It holds the activations of one forward/backward between calls:
        ``clear_cache()`` frees them. Default: on for a single batch, off for
        iterables.
    at:
        Parameter values to take the Hessian at instead of the model's current ones
        (one tensor per parameter of ``params``, e.g. a saved copy of the weights
        before an optimizer step); the model itself is not touched.
    compute_dtype:
        The dtype products are computed and returned in (``H.dtype``). Default: the
        parameters' dtype, except float32 for bfloat16/float16 parameters (mixed
        precision models): parameters, floating buffers and floating batch tensors
        are then cast to float32 for the evaluation, so the products are those of
        the float32 model with the same (rounded) weights. Autocast regions inside
        the model still apply.
    hvp:
        ``"auto"`` (default): ``"finite_difference"`` on an FSDP-sharded model
        computing in its parameters' dtype (no full-size vector or parameter is
        ever gathered), ``"exact"`` everywhere else.
        ``"exact"``: products by double backward, as above.
        ``"finite_difference"``: central differences of two gradients per column,
        each computed by the model's ordinary forward and ``backward()`` (FSDP's
        sharded ones on an FSDP model), for models without a double backward;
        parameters and ``.grad`` are restored bitwise. Step
        ``h = 0.1 * eps^(1/3) * max(||theta||, 1) / ||v||``, relative error ``O(eps^(2/3))``
        (see :mod:`dyndiag.curvature.finite_difference` for the rule and the
        accuracy measured). Needs the parameters' dtype (no ``compute_dtype``).

    micro_batch_size:
        Cut every batch along dim 0 into micro-batches of at most this many samples
        (sequences, for a language model) and accumulate their products, each
        weighted by its count: the same operator, with a product's peak memory set
        by ``micro_batch_size`` rather than by the batch. Dict batches are cut in
        every tensor entry. Refused (``ValueError``) with BatchNorm in train mode,
        whose batch statistics would change with the cut. ``None`` (default): whole
        batches.

    Notes
    -----
    Under an initialised ``torch.distributed`` process group each rank passes its
    shard; products are reduced over ranks like the loss (sample-weighted mean or
    sum), so every rank holds the operator of the union of the shards.

    On a model sharded with ``torch.distributed.fsdp.fully_shard`` (parameters
    are ``DTensor`` row shards over a 1-D mesh spanning the process group), the
    operator's vectors are local: ``dim`` is this rank's number of entries, a
    vector is the concatenation of this rank's row blocks in parameter order, and
    ``op.shards`` describes the layout; the estimators reduce their inner
    products over ranks. ``data`` must be a batch or a list of batches, ``at=`` is
    not supported. Exact products gather the parameters (FSDP's hooks set aside)
    and hold, during a product, the full vector and the graph of a single-process
    product; ``hvp="finite_difference"`` runs FSDP's own forward and backward and
    never materialises a full vector (every rank must then give the same number of
    batches, and FSDP's default gradient averaging over ranks is assumed).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable | None = None,
        data: object = None,
        params: Sequence[torch.Tensor] | str | Sequence[str] | None = None,
        closure: Callable | None = None,
        *,
        reduction: str | None = None,
        batch_size_fn: Callable | None = None,
        max_batch_vectors: int | str = "auto",
        cache_data: bool = False,
        backend: str = "auto",
        cache_graph: bool | None = None,
        at: Sequence[torch.Tensor] | None = None,
        compute_dtype: torch.dtype | None = None,
        micro_batch_size: int | None = None,
        hvp: str = "auto",
    ) -> None:
        make_loss_closure(loss_fn, closure)  # exactly one of them, callable
        if hvp not in ("auto", "exact", "finite_difference"):
            raise ValueError(f"hvp must be 'auto', 'exact' or 'finite_difference', got {hvp!r}")
        super().__init__(
            model,
            data,
            params,
            closure if loss_fn is None else criterion_outputs,
            loss_fn,
            reduction=loss_reduction(loss_fn, reduction),
            batch_size_fn=batch_size_fn,
            max_batch_vectors=max_batch_vectors,
            cache_data=cache_data,
            backend=backend,
            cache_graph=cache_graph,
            at=at,
            compute_dtype=compute_dtype,
            micro_batch_size=micro_batch_size,
        )
        if hvp == "auto":
            # Sharded models are sharded because they do not fit on one device: by default
            # nothing of full size is gathered there.
            sharded = self.shards is not None and self.dtype == self.param_dtype
            hvp = "finite_difference" if sharded else "exact"
        self.hvp = hvp
        if hvp == "finite_difference" and self.dtype != self.param_dtype:
            raise ValueError("hvp='finite_difference' computes in the parameters' dtype: leave compute_dtype unset")

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        def product(batch, V):
            return self._loop_columns(self._loop_graph(batch), V, last_use=not self.cache_graph)

        return self._product(product, v.unsqueeze(1)).squeeze(1)

    def _vmap_graph(self, batch):
        # Double backward with the columns batched: the pullback of the gradient
        # (H^T u = H u) under vmap. Reverse mode only: jvp(grad(loss)) fails for MSE
        # and Huber losses in torch 2.13, and costs more per column.
        def build():
            return vjp(grad(lambda tensors: self._loss(tensors, batch)), tuple(self._values()))[1]

        return self._reuse_graph("vmap", build)

    def _vmap_columns(self, pullback, V: torch.Tensor) -> torch.Tensor:
        return self._join(vmap(pullback)(self._split(V.T))[0], V.shape[1]).T

    def _gradient_graph(self, batch):
        leaves = self._leaves()
        g = torch.autograd.grad(self._loss(leaves, batch), leaves, create_graph=True, allow_unused=True)
        # Parameters that do not reach the loss, or reach it only linearly, have no
        # second-order graph: their rows of H are zero.
        live = {i for i, gi in enumerate(g) if gi is not None and gi.requires_grad}
        return leaves, g, live

    def _loop_graph(self, batch):
        return self._reuse_graph("loop", lambda: self._gradient_graph(batch))

    def _loop_columns(self, graph, V: torch.Tensor, last_use: bool = False) -> torch.Tensor:
        """``last_use``: nothing multiplies on ``graph`` after these columns, so the
        last one frees it as it goes (a lower peak than keeping it whole)."""
        return self._block_columns(graph, V, [(range(len(self.params)), slice(0, V.shape[1]))], False, last_use)

    def _block_columns(
        self, graph, V: torch.Tensor, groups: list[tuple[Sequence[int], slice]], batched: bool, last_use: bool = False
    ) -> torch.Tensor:
        # d/dθ_b <g_b, v_b> = H_bb v_b: only the gradients of the block's parameters are
        # pulled back, only toward them, so autograd leaves out every other parameter's
        # weight-gradient work and the first backward's nodes that do not reach g_b.
        leaves, g, live = graph
        out = torch.zeros_like(V)
        for n, (positions, cols) in enumerate(groups):
            outs = [i for i in positions if i in live]
            inputs = [leaves[i] for i in positions]
            if not outs:
                continue
            if batched and cols.stop - cols.start > 1:  # the pullback vmapped over the columns by autograd
                parts = torch.autograd.grad([g[i] for i in outs], inputs, [self._rows(V[:, cols], i) for i in outs],
                                            retain_graph=True, allow_unused=True, is_grads_batched=True)
                self._put(out[:, cols], positions, parts)
                continue
            for j in range(cols.start, cols.stop):
                free = last_use and n == len(groups) - 1 and j == cols.stop - 1
                parts = torch.autograd.grad([g[i] for i in outs], inputs, [self._rows(V[:, j : j + 1], i)[0] for i in outs],
                                            retain_graph=not free, allow_unused=True)
                self._put(out[:, j : j + 1], positions, parts)
        return out


class GGNOperator(_ModelOperator):
    """The generalized Gauss–Newton matrix ``J^T H_L J`` of the loss over ``data``.

    ``J`` is the Jacobian of the model's outputs with respect to the parameters and
    ``H_L`` the Hessian of the criterion with respect to the outputs. For a loss
    convex in the outputs (cross-entropy, MSE) the GGN is positive semi-definite;
    for a linear model with MSE it equals the Hessian. Batches combine as the
    criterion's reduction says (:class:`HessianOperator`).

    A product costs one forward with forward-mode tangents (``J v``), ``H_L`` in
    closed form for ``nn.CrossEntropyLoss`` (ignored targets, label smoothing and
    class-probability targets included; class ``weight`` takes the generic path),
    :class:`~dyndiag.data.CausalLMLoss` and ``nn.MSELoss``, and one backward
    (``J^T``); other criteria get ``H_L`` by double backward through the criterion
    alone. A model with an op that has no forward-mode derivative is multiplied in
    reverse mode instead (one warning), on a graph kept between products like the
    Hessian's (``cache_graph``); in forward mode nothing is kept.

    Parameters are as for :class:`HessianOperator`, except ``loss_fn`` and ``forward``
    (and there is no ``closure`` or ``reduction``).

    Parameters
    ----------
    loss_fn:
        A criterion ``loss_fn(outputs, targets)`` (required: the GGN needs the
        outputs and the loss separately); ``loss_fn.reduction="sum"`` makes the
        operator the GGN of the summed loss.
    forward:
        ``forward(model, batch) -> outputs`` for batches that are not
        ``(inputs, targets)``; targets are then ``batch[1]`` or ``batch["labels"]``.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable | None = None,
        data: object = None,
        params: Sequence[torch.Tensor] | str | Sequence[str] | None = None,
        forward: Callable | None = None,
        *,
        batch_size_fn: Callable | None = None,
        max_batch_vectors: int | str = "auto",
        cache_data: bool = False,
        backend: str = "auto",
        cache_graph: bool | None = None,
        at: Sequence[torch.Tensor] | None = None,
        compute_dtype: torch.dtype | None = None,
        micro_batch_size: int | None = None,
    ) -> None:
        if loss_fn is None or not callable(loss_fn):
            raise TypeError("loss_fn must be a criterion loss_fn(outputs, targets) for the GGN")
        super().__init__(
            model,
            data,
            params,
            outputs_fn(forward),
            loss_fn,
            reduction=loss_reduction(loss_fn, None),
            batch_size_fn=batch_size_fn,
            max_batch_vectors=max_batch_vectors,
            cache_data=cache_data,
            backend=backend,
            cache_graph=cache_graph,
            at=at,
            compute_dtype=compute_dtype,
            micro_batch_size=micro_batch_size,
        )
        #: ``J v`` by forward mode until a model op turns out to have no forward-mode derivative.
        self._forward_mode = True

    # Products: ``J v`` by forward mode in the same forward that records the graph
    # ``J^T`` pulls back through, ``H_L`` in closed form where the criterion has one
    # (:mod:`~dyndiag.curvature.loss_hessian`), else by double backward through the
    # criterion alone; the loss is never differentiated through the model twice. The
    # forward is the product's own, so no graph is kept between products. A model op
    # without a forward-mode derivative switches the operator to reverse mode: ``J v``
    # as the pullback of the linear map ``u -> J^T u`` (the double-vjp trick) on a
    # graph built once per batch (kept between products like the Hessian's).
    def _vmap_graph(self, batch):
        return batch

    _loop_graph = _vmap_graph  # the forward is each product's own: nothing to build ahead

    def _vmap_columns(self, batch, V: torch.Tensor) -> torch.Tensor:
        return self._columns(batch, V, batched=True)

    def _loop_columns(self, batch, V: torch.Tensor) -> torch.Tensor:
        return self._columns(batch, V, batched=False)

    _blocks_share_batch = True  # one forward carries every block's tangents

    def _block_columns(self, batch, V: torch.Tensor, groups: list[tuple[Sequence[int], slice]], batched: bool) -> torch.Tensor:
        return self._columns(batch, V, batched, groups)

    def _columns(
        self, batch, V: torch.Tensor, batched: bool, groups: list[tuple[Sequence[int], slice]] | None = None
    ) -> torch.Tensor:
        """``G V`` on one batch, columns batched by vmap or one at a time. ``groups``:
        ``(parameter positions, columns)`` of diagonal blocks (``V`` zero off each
        block's rows): forward mode then pulls each block's columns back toward its
        own parameters only, and a column alone carries tangents of its block's
        parameters only (their rows of ``G V``, zeros elsewhere); reverse mode
        multiplies the whole ``V``."""
        tangents = self._split(V.T)
        k = V.shape[1]
        groups = [(range(len(self.params)), slice(0, k))] if groups is None else groups
        if self._forward_mode:
            try:
                if batched:
                    return self._forward_mode_products(batch, tangents, groups)
                out = torch.zeros_like(V)
                for positions, cols in groups:
                    for j in range(cols.start, cols.stop):
                        column = tuple(t[j : j + 1] for t in tangents)
                        out[:, j : j + 1] = self._forward_mode_products(batch, column, [(positions, slice(0, 1))])
                return out
            except RuntimeError as err:
                if "forward ad" not in str(err).lower() and "jvp" not in str(err).lower():
                    raise
                self._forward_mode = False
                warnings.warn(
                    f"GGNOperator: this model has an op without a forward-mode derivative "
                    f"({str(err).splitlines()[0][:200]}); Jacobian products use reverse mode instead.",
                    RuntimeWarning,
                    stacklevel=2,
                )
        pullback, jacobian, loss_hessian_ = self._reuse_graph("reverse", lambda: self._reverse_graph(batch))

        def column(t):
            return pullback(loss_hessian_(jacobian(t)[0]))[0]

        if batched:
            return self._join(vmap(column)(tangents), k).T
        return torch.stack([self._join(column(tuple(t[j] for t in tangents)), 1)[0] for j in range(k)], 1)

    def _forward_mode_products(
        self, batch, tangents: tuple[torch.Tensor, ...], groups: list[tuple[Sequence[int], slice]]
    ) -> torch.Tensor:
        """``(dim, k)``: ``G V`` for per-parameter tangents ``(k, *shape)``, one forward
        with the tangents of the parameters of ``groups`` (the others enter as
        constants), batched by vmap where ``k > 1``; then each group's columns pulled
        back toward its own parameters (its rows of ``G V``; zeros elsewhere)."""
        values = self._values()
        k = tangents[0].shape[0]
        dual = sorted({i for positions, _ in groups for i in positions})
        leaves = tuple(values[i].requires_grad_(True) for i in dual)

        def call(block):
            tensors = list(values)
            for i, t in zip(dual, block):
                tensors[i] = t
            return self._call(tensors, batch)

        def forward(t):
            return jvp(call, (leaves,), (t,))

        with warnings.catch_warnings():
            # torch loads its forward-mode decompositions on first use through the
            # deprecated torch.jit.script: torch's own business, not the caller's.
            warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", DeprecationWarning)
            dual_tangents = tuple(tangents[i] for i in dual)
            if k > 1:
                outputs, jv = vmap(forward, out_dims=(None, 0))(dual_tangents)
            else:
                outputs, jv = forward(tuple(t[0] for t in dual_tangents))
                jv = jv.unsqueeze(0)
        loss_hessian_ = self._loss_hessian(outputs.detach(), batch)
        # The tangents' own graph (J depends on the parameters) is not differentiated.
        hjv = (vmap(loss_hessian_) if k > 1 else lambda u: loss_hessian_(u[0]).unsqueeze(0))(jv.detach())
        del jv
        leaf = dict(zip(dual, leaves))
        out = torch.zeros(self._offsets[-1], k, dtype=self.dtype, device=self.device)
        for n, (positions, cols) in enumerate(groups):
            w = cols.stop - cols.start
            parts = torch.autograd.grad(outputs, [leaf[i] for i in positions], hjv[cols] if w > 1 else hjv[cols][0],
                                        is_grads_batched=w > 1, retain_graph=n < len(groups) - 1, allow_unused=True)
            self._put(out[:, cols], positions, parts)
        return out

    def _loss_hessian(self, outputs: torch.Tensor, batch) -> Callable[[torch.Tensor], torch.Tensor]:
        """``u -> H_L u`` at ``outputs``: in closed form where there is one, else by
        double backward through the criterion."""
        closed = loss_hessian(self.loss_fn, outputs, batch_targets(batch))
        if closed is not None:
            self._criterion(outputs, batch)  # the checks the criterion makes (a scalar loss)
            return closed
        _, pullback = vjp(grad(lambda o: self._criterion(o, batch)), outputs)
        return lambda u: pullback(u)[0]

    def _reverse_graph(self, batch):
        primals = tuple(self._values())
        outputs, pullback = vjp(lambda tensors: self._call(tensors, batch), primals)
        outputs = outputs.detach()
        _, jacobian = vjp(lambda u: pullback(u)[0], torch.zeros_like(outputs))
        return pullback, jacobian, self._loss_hessian(outputs, batch)
