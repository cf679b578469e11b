"""1-D and 2-D loss surfaces around a model, optionally resumable from a file.

The loss at ``theta + a*d1 (+ b*d2)`` is the sample-weighted mean loss over
``data`` (each batch's loss weighted by its size), evaluated under
``torch.no_grad()`` with the curvature operators' rule
(:func:`dyndiag.evaluation.operator_mode`): dropout off, normalisation layers in
the model's own mode (BatchNorm in train mode uses batch statistics), all under
:func:`dyndiag.state.preserve_state`, which puts parameters, running statistics,
modes, ``.grad`` and RNG states back exactly on exit (also after an exception or
an interrupt). Do not train the model from another thread while a surface is
evaluated.

The grid, in flat row-major order, is cut into fixed chunks of ``B`` points
(chunk k holds flat indices ``[k*B, (k+1)*B)``), evaluated one after the other
in one of two ways that agree to float rounding:

* under vmap (``B > 1``): a chunk's parameters are one ``addmm``,
  ``theta + C @ D.T`` of shape ``(B, dim)``, viewed as one stacked tensor per
  parameter, and every batch of ``data`` goes through one forward of
  ``torch.func.vmap`` over ``torch.func.functional_call`` (parameters batched,
  the data shared). The model's parameters are never written.
* per point (``B = 1``): the point is written into the model's parameters (one
  ``addmv`` into one buffer whose views are copied in; the state guard restores
  them) and evaluated with a plain forward, which is cheaper than re-binding the
  parameters with ``functional_call`` for every point.

The rule for ``batch_points="auto"``: the most points (at most 128) whose
stacked largest module output stays within ``2**20`` elements and stacked
parameters within ``2**26``, and the per-point loop on the CPU where that is
under 16 points. The largest module output comes from one plain forward on the
largest batch (a loader: its first). Beyond the first budget a chunk's
activations outgrow the CPU caches and cost more in memory traffic than batching
saves; the second bounds the memory of the stacked parameters (256 MiB in
float32); under 16 points vmap's fixed cost per call is not paid back. The
choice depends only on the model, the device and the batch shapes, so repeated
calls give the same bits. Not tuned on GPUs.

Where vmap cannot run, every point goes per point (an explicit
``batch_points > 1`` warns why; ``"auto"`` is silent):

* a ``closure=``: it is arbitrary code that calls the model itself;
* a normalisation layer that would update running statistics (BatchNorm or
  InstanceNorm in train mode with ``track_running_stats``): vmap cannot write an
  unbatched buffer in place;
* any exception while the first chunk to evaluate is run under vmap (a
  ``metric`` or model that calls ``.item()``, branches on a tensor's value,
  returns a Python number, draws random numbers, ...), or a forward that writes a
  buffer: the attempt is discarded (buffers and RNG restored) and every point,
  the first chunk's included, is evaluated per point. Errors that are the
  caller's (a non-scalar loss, a bad batch) are then raised by the per-point loop
  with its usual message.

Resumable store (``path=``): a JSON-lines file. Line 1 is a header holding a
SHA-256 key of the grid (coordinates), the directions, the centre parameters and
whether a metric is evaluated; every later line is one finished point
``{"i": .., "j": .., "loss": .., "metric": ..}``, appended with one fsync per
finished chunk (per point in the per-point loop). Floats are written with
``repr`` precision. A chunk with any point missing is evaluated whole, so with
the same ``batch_points`` (and data) resumed values are bit-identical to an
uninterrupted run; a file resumed with another setting mixes values that agree
to float rounding. A torn last line (a crash while writing) is dropped and
truncated away on the next run. The key does not cover ``data``, the loss or
``batch_points``: reuse a path only for the same data and loss.

Under ``torch.distributed`` (a process group of several ranks; every rank calls
``surface`` with the same directions, centre, grid and metric setting, compared
through the key, and the same ``batch_points``):

* split (default): the fixed chunks holding a point to do are dealt round-robin
  (chunk ``k`` to rank ``k % world``) and each rank evaluates its chunks on the
  data it is given, so give every rank the same data. The chunk size is agreed
  (the smallest any rank chose) and capped at ``ceil(points / world)`` so every
  rank has work. After each round (one chunk per rank) the ranks all-gather the
  round's values, so every rank returns the whole surface; a rank whose
  evaluation raises says so in that gather and the others raise
  ``RuntimeError("surface: rank r failed: ...")`` instead of waiting for it.
  Whether vmap runs (the first-chunk trial) is each rank's own decision.
* ``data_parallel=True``: every rank evaluates every point on its own shard and
  each point's loss (and metric) is the sample-weighted mean over all shards
  (:func:`dyndiag.data.weighted_mean` over ranks, one all-reduce per chunk);
  the chunk size and the first-chunk trial's outcome are agreed across ranks so
  every rank enters the same all-reduces. An error on one rank only (not in the
  trial) leaves the others waiting in the all-reduce, as in any data-parallel
  program.

Rank 0 alone reads and writes ``path`` (the other ranks' ``path`` is ignored) and
broadcasts the finished points, so an interrupted run resumes on any number of
ranks, one process included; with the same world size and ``batch_points`` the
chunks are the same and resumed values bit-identical.
On an FSDP-sharded model (``fully_shard``; ``DTensor`` parameters) every rank
gathers the full parameters once, sets FSDP's hooks aside and evaluates the model
as one process would (:func:`dyndiag.curvature.sharded.gathered`), in either mode
above: directions, centre and points are full-size on every rank, so a rank's
memory is a single process's surface's (FSDP's saving does not apply), and the
sharded parameters are put back untouched.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _NormBase

from ..data import (
    batch_targets,
    check_scalar_loss,
    is_single_batch,
    iter_batches,
    loss_count,
    make_loss_closure,
    model_outputs,
    tensors_in,
    to_device,
    weighted_mean,
)
from ..curvature.sharded import gathered
from ..distributed import all_gather_object, broadcast_object, is_distributed, is_writer, rank, world_size
from ..evaluation import Evaluate, operator_mode, select_params, unwrap
from ..state import preserve_state

__all__ = ["Surface", "surface"]

_FORMAT = "dyndiag-landscape-v1"
# The "auto" rule (module docstring).
_MAX_CHUNK = 128
_ACTIVATION_ELEMENTS = 2**20  # a chunk's largest module output: 4 MiB in float32
_PARAMETER_ELEMENTS = 2**26  # a chunk's stacked parameters: 256 MiB in float32
_CPU_MIN_CHUNK = 16
_KEY_PIECE = 2**20  # entries hashed at a time


@dataclass
class Surface:
    """A loss surface on a grid.

    ``coords`` is a tuple of 1-D arrays (one per direction); ``values`` has shape
    ``(len(coords[0]),)`` or ``(len(coords[0]), len(coords[1]))`` with
    ``values[i, j]`` the loss at ``(coords[0][i], coords[1][j])``;
    ``metric_values`` is the same for ``metric`` (None without one).
    ``batch_points`` is how this call evaluated its points: the chunk size under
    vmap, 1 for the per-point loop, 0 if every point was already stored (under
    ``torch.distributed``, this rank's way; every rank returns the same values).
    """

    coords: tuple[np.ndarray, ...]
    values: np.ndarray
    metric_values: np.ndarray | None = None
    batch_points: int = 0

    @property
    def ndim(self) -> int:
        return len(self.coords)

    def to_dataframe(self):
        """Long format: columns ``x`` [, ``y``], ``loss`` [, ``metric``]; one row per point."""
        import pandas as pd

        grids = np.meshgrid(*self.coords, indexing="ij")
        cols = {name: g.reshape(-1) for name, g in zip(("x", "y"), grids)}
        cols["loss"] = self.values.reshape(-1)
        if self.metric_values is not None:
            cols["metric"] = self.metric_values.reshape(-1)
        return pd.DataFrame(cols)


def surface(
    model: nn.Module,
    loss_fn: Callable | None,
    data: object,
    directions: Sequence[torch.Tensor],
    extent: float = 1.0,
    resolution: int = 21,
    path: str | os.PathLike | None = None,
    *,
    closure: Callable | None = None,
    metric: Callable | None = None,
    params: Sequence[torch.Tensor] | None = None,
    batch_points: int | str = "auto",
    data_parallel: bool = False,
    progress: bool | None = None,
) -> Surface:
    """The loss on a 1-D or 2-D grid around the model's current parameters.

    Parameters
    ----------
    model:
        The network; it is returned bit-identical (parameters, buffers, modes,
        ``.grad``, RNG states). An FSDP-sharded model (``fully_shard``) is evaluated
        on its gathered full parameters (module docstring).
    loss_fn:
        Criterion ``loss_fn(outputs, targets)`` with mean reduction (or None with
        ``closure``).
    data:
        One batch or a re-iterable collection of batches (a list, a DataLoader);
        iterated once per chunk of grid points.
    directions:
        One or two flat ``(dim,)`` tensors in parameter order (see
        :func:`random_directions`); a single 1-D tensor counts as one direction. On an
        FSDP-sharded model ``dim`` is the full number of entries (the directions
        :func:`random_directions` and :func:`eigen_directions` return there).
    extent, resolution:
        Coordinates ``np.linspace(-extent, extent, resolution)`` along each
        direction; 0 is the model as given.
    path:
        Resumable store (JSON lines, see the module docstring). Finished points
        are read back and not recomputed; a file made for another grid,
        directions, centre or metric setting raises ``ValueError``. Under
        ``torch.distributed`` rank 0 alone reads and writes it.
    closure:
        ``closure(model, batch) -> scalar loss`` instead of ``loss_fn`` (always
        evaluated per point).
    metric:
        ``metric(outputs, targets) -> scalar`` (e.g. accuracy), averaged with the
        same sample weights and stored in ``Surface.metric_values``. With a
        ``closure`` the outputs come from one extra forward pass
        (``model(inputs)``, or ``model(**batch)`` for a mapping batch).
    params:
        The parameters the directions span; default every trainable parameter.
    batch_points:
        Grid points evaluated together in one vmapped forward: ``"auto"`` (the
        rule in the module docstring), an int > 1, or 1 (or 0) for the per-point
        loop. Where vmap cannot run, every point goes per point (with a warning
        for an int > 1).
    data_parallel:
        Under ``torch.distributed``: False (default) splits the grid points across
        ranks, each evaluating its points on its own ``data`` (give every rank the
        same data); True evaluates every point on every rank and averages each
        point's loss over the ranks' data shards (the surface of their union).
        Either way every rank returns the same surface and rank 0 writes ``path``
        (module docstring). No effect in a single process.
    progress:
        Progress bar over the grid points; ``None`` shows it on a terminal only
        (rank 0's alone under ``torch.distributed``).

    Returns
    -------
    Surface
        ``values`` of shape ``(resolution,)`` or ``(resolution, resolution)``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    fn = make_loss_closure(loss_fn, closure)
    if metric is not None and not callable(metric):
        raise TypeError(f"metric must be callable (outputs, targets) -> scalar, got {type(metric).__name__}")
    if isinstance(extent, bool) or not isinstance(extent, (int, float)) or not math.isfinite(extent) or extent <= 0:
        raise ValueError(f"extent must be a finite number > 0, got {extent!r}")
    if not isinstance(resolution, int) or isinstance(resolution, bool) or resolution < 2:
        raise ValueError(f"resolution must be an integer >= 2, got {resolution!r}")
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    if data is None:
        raise ValueError("data must be a batch (inputs, targets) or an iterable of batches, got None")
    if isinstance(data, Iterator):
        raise TypeError("data must be re-iterable (a batch, a list of batches or a DataLoader), not an iterator")
    requested = _check_batch_points(batch_points)
    if not isinstance(data_parallel, bool):
        raise TypeError(f"data_parallel must be True or False, got {type(data_parallel).__name__}")

    model = unwrap(model)
    # An FSDP model is evaluated as one process's model: full parameters on every rank.
    with gathered(model) as swap:
        names, chosen = select_params(model, swap(params))
        dtype, device = chosen[0].dtype, chosen[0].device
        dirs = _check_directions(directions, sum(p.numel() for p in chosen), dtype, device)
        coords = tuple(np.linspace(-float(extent), float(extent), resolution) for _ in dirs)
        shape = tuple(len(c) for c in coords)

        theta = torch.cat([p.detach().reshape(-1) for p in chosen])
        ranks = world_size()
        split = ranks > 1 and not data_parallel  # grid points split across ranks
        key = _key(coords, dirs, theta, metric is not None) if path is not None or ranks > 1 else None
        if ranks > 1 and len(set(all_gather_object(key))) > 1:
            raise ValueError(
                "directions, centre parameters, extent, resolution or metric differ across ranks; every rank must "
                "call surface with the same ones (random_directions with the same seed gives the same directions)"
            )
        store = os.fspath(path) if path is not None and is_writer() else None
        done = _resume(store, key, shape)

        values = np.full(shape, np.nan)
        metric_values = np.full(shape, np.nan) if metric is not None else None
        for idx, (loss, m) in done.items():
            values[idx] = loss
            if metric_values is not None:
                metric_values[idx] = m

        grid = list(np.ndindex(*shape))  # flat (row-major) index -> grid index
        todo = [f for f, idx in enumerate(grid) if idx not in done]
        if not todo:
            return Surface(coords=coords, values=values, metric_values=metric_values)

        from tqdm.auto import tqdm

        point_fn = _point_fn(fn, loss_fn if closure is None else None, metric)
        quiet = not is_writer() or (False if progress is None else not progress)
        bar = tqdm(total=len(todo), desc="landscape", disable=True if quiet else None)
        handle = open(store, "a", encoding="utf-8") if store is not None else None

        def keep(points: list[tuple[int, float, float | None]]) -> None:
            """Store finished points ``(flat index, loss, metric)``: arrays, file (one fsync), bar."""
            for f, loss, m in points:
                values[grid[f]] = loss
                if metric_values is not None:
                    metric_values[grid[f]] = m
            if handle is not None and points:
                _append(handle, [(grid[f], loss, m) for f, loss, m in points])
            bar.update(len(points))

        record, on_error = (_gathering(keep), _report_failure) if split else (keep, None)
        try:
            # The state guard restores what the per-point loop writes (parameters, running
            # statistics a train-mode BatchNorm moves); vmap writes nothing.
            with preserve_state(model, params=True), operator_mode(model), torch.no_grad():
                D = torch.stack(dirs, 1)  # (dim, k)
                # Every grid point's coordinates (N, k), made once: a tensor per point
                # costs more than the indexing.
                C = torch.tensor([[float(c[i]) for c, i in zip(coords, idx)] for idx in grid], dtype=dtype, device=device)
                batches = _prepared(data, device)
                evaluator = lambda batched: _evaluator(point_fn, model, names, chosen, theta, D, batches,  # noqa: E731
                                                       device, batched, metric is not None, data_parallel)
                why = _unbatchable(model, closure)
                size = requested or (1 if why else _auto_chunk(model, point_fn, batches, theta.numel(), device))
                if ranks > 1:
                    # One chunk size and one reason for every rank: the chunks are the unit of
                    # work (split) or of the all-reduces every rank must enter (data_parallel).
                    agreed = all_gather_object((size, why))
                    size = min(s for s, _ in agreed)
                    why = next((w for _, w in agreed if w is not None), None)
                if split:
                    size = min(size, -(-len(grid) // ranks))  # every rank gets a chunk of a fresh grid
                chunks = _chunks(todo, size, len(grid), rank() if split else 0, ranks if split else 1)
                agree = _agree_first if data_parallel and ranks > 1 else None
                if size > 1 and why is None:
                    why = _run(evaluator(True), C, chunks, set(todo), record, first=model, agree=agree,
                               on_error=on_error)
                if size > 1 and why is not None:
                    if requested:
                        warnings.warn(f"surface: batch_points={requested} falls back to the per-point loop: {why}",
                                      RuntimeWarning, stacklevel=2)
                    size = 1
                if size == 1:
                    # Split: this rank's chunks as they were dealt (the rounds stay in step across
                    # ranks); one process or data-parallel: one point at a time.
                    points = chunks if split else [(f, f + 1) for f in todo]
                    _run(evaluator(False), C, points, set(todo), record, per_point=True, on_error=on_error)
        finally:
            bar.close()
            if handle is not None:
                handle.close()
        return Surface(coords=coords, values=values, metric_values=metric_values, batch_points=size)


def _resume(store: str | None, key: str | None, shape: tuple[int, ...]) -> dict:
    """Finished points of the store: read by the writer (``store`` is None elsewhere) and
    broadcast, so every rank skips the same points; an error reading it is raised on every rank."""
    done, error = {}, None
    if store is not None:
        try:
            done = _load(store, key, shape)
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            error = e
    if is_distributed():
        done, shared = broadcast_object((done, error))
        error = error or shared
    if error is not None:
        raise error
    return done


def _chunks(todo: list[int], size: int, n: int, rank: int, ranks: int) -> list[tuple[int, int] | None]:
    """This rank's chunks ``(start, stop)`` of flat indices, one per round: the fixed
    chunks ``[k*size, (k+1)*size)`` holding a point to do, dealt round-robin over ``ranks``
    (None: nothing for this rank in the last round)."""
    starts = sorted({f - f % size for f in todo})
    rounds = -(-len(starts) // ranks)
    return [(starts[i], min(starts[i] + size, n)) if i < len(starts) else None
            for i in range(rank, rounds * ranks, ranks)]


def _gathering(keep: Callable) -> Callable:
    """``record`` of a split grid: every rank's points of the round, gathered on every rank
    and kept (arrays everywhere, the file on the writer); a rank that reported a failure
    (:func:`_report_failure`) raises it on the others instead of leaving them waiting."""

    def record(points: list) -> None:
        gathered = all_gather_object(points)
        failed = [(r, g) for r, g in enumerate(gathered) if isinstance(g, str)]
        if failed:
            raise RuntimeError(f"surface: rank {failed[0][0]} failed: {failed[0][1]}")
        keep([p for g in gathered for p in g])

    return record


def _report_failure(error: Exception) -> None:
    """Tell the other ranks of a split grid, in this round's gather, that this rank failed."""
    all_gather_object(f"{type(error).__name__}: {error}")


def _agree_first(result: object) -> object:
    """Data-parallel trial chunk: batched only if it ran batched on every rank."""
    whys = all_gather_object(result if isinstance(result, str) else None)
    if isinstance(result, str):
        return result
    return next((f"on rank {r}, {w}" for r, w in enumerate(whys) if w is not None), result)


def _check_batch_points(batch_points: object) -> int | None:
    """The requested chunk size (1 = per point), or None for ``"auto"``."""
    if isinstance(batch_points, str):
        if batch_points != "auto":
            raise ValueError(f"batch_points must be 'auto' or an integer >= 0, got {batch_points!r}")
        return None
    if isinstance(batch_points, bool) or not isinstance(batch_points, (int, np.integer)):
        raise TypeError(f"batch_points must be 'auto' or an integer >= 0, got {type(batch_points).__name__}")
    if batch_points < 0:
        raise ValueError(f"batch_points must be 'auto' or an integer >= 0 (0 or 1: per point), got {batch_points}")
    return max(int(batch_points), 1)


def _unbatchable(model: nn.Module, closure: Callable | None) -> str | None:
    """Why the grid must be evaluated per point (known before trying), or None."""
    if closure is not None:
        return "closure= is arbitrary code that calls the model itself"
    for name, m in model.named_modules():
        if isinstance(m, _NormBase) and m.training and m.track_running_stats:
            # Under vmap the in-place update of an unbatched buffer fails.
            return f"{type(m).__name__} {name or 'model'!r} in train mode updates its running statistics"
    return None


def _auto_chunk(model: nn.Module, point_fn: Callable, batches: object, dim: int, device: torch.device) -> int:
    """Points per chunk for ``"auto"`` (1: per point), by the module docstring's rule;
    ``dim`` is the number of parameters the directions span."""
    if isinstance(batches, list):
        batch = max(batches, key=lambda b: b[1], default=(None,))[0]
    else:
        batch = next(iter(_iter_prepared(batches, device)), (None,))[0]
    largest = [1]

    def hook(module, inputs, output):
        largest[0] = max([largest[0], *(t.numel() for t in tensors_in(output))])

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        point_fn(model, batch)
    except Exception:  # noqa: BLE001 - the per-point loop raises it with its usual message
        return 1
    finally:
        for h in handles:
            h.remove()
    size = min(_MAX_CHUNK, _ACTIVATION_ELEMENTS // largest[0], _PARAMETER_ELEMENTS // dim)
    return 1 if device.type == "cpu" and size < _CPU_MIN_CHUNK else max(size, 1)


def _evaluator(point_fn, model, names, chosen, theta, D, batches, device, batched: bool, has_metric: bool,
               over_ranks: bool) -> tuple[Callable, Callable]:
    """``(local, reduce)``: ``reduce(local(c))`` maps ``c (P, k)`` to ``(loss (P,),
    metric (P,) or None)``, float64 numpy, the sample-weighted means over ``batches`` at
    ``theta + D @ c[r]`` for every row, under vmap (``batched``) or, for one row, in the
    live parameters. ``local`` runs the forwards on this process's data; ``reduce``
    averages them, over ranks too with ``over_ranks`` (a collective)."""
    if batched:
        vm = _vmapped(model, point_fn)
        numels = [p.numel() for p in chosen]

        def forward_at(c: torch.Tensor) -> Callable:
            P = torch.addmm(theta.unsqueeze(0), c, D.T)  # (chunk, dim)
            parts = P.split(numels, 1)
            stacked = {"model." + n: part.view(len(c), *p.shape) for n, p, part in zip(names, chosen, parts)}
            return lambda batch: vm(stacked, batch)
    else:
        point = torch.empty_like(theta)
        views = [(p, t.view_as(p)) for p, t in zip(chosen, torch.split(point, [p.numel() for p in chosen]))]

        def forward_at(c: torch.Tensor) -> Callable:
            torch.addmv(theta, D, c[0], out=point)
            for p, t in views:
                p.copy_(t)

            def forward(batch):
                loss, m = point_fn(model, batch)
                return (check_scalar_loss(loss, "loss_fn/closure"),) + (() if m is None else (m,))
            return forward

    def local(c: torch.Tensor) -> tuple[list[tuple[torch.Tensor, int]], int]:
        """Per batch of this process: ``(stack([loss, metric]) (2, P), count)`` (metric
        row zeros without one), and P."""
        forward = forward_at(c)
        terms = []
        for batch, n in _iter_prepared(batches, device):
            if n <= 0:
                continue
            loss, *m = forward(batch)
            if has_metric and not m:
                raise TypeError("metric must return a scalar (a tensor or a number), got None")
            metric = torch.as_tensor(m[0], dtype=torch.float64, device=device) if m else torch.zeros((), device=device)
            terms.append((torch.stack([loss.double().expand(len(c)), metric.double().expand(len(c))]), n))
        return terms, len(c)

    def reduce(part) -> tuple[np.ndarray, np.ndarray | None]:
        # Both ways accumulate float64 in batch order: equal per-batch losses give equal means.
        terms, P = part
        mean = weighted_mean(terms, torch.zeros(2, P, dtype=torch.float64, device=device),
                             over_ranks=over_ranks).cpu().numpy()
        return mean[0], (mean[1] if has_metric else None)

    return local, reduce


def _run(evaluator: tuple[Callable, Callable], C: torch.Tensor, chunks: list[tuple[int, int] | None],
         pending: set[int], record: Callable, *, per_point: bool = False, first: nn.Module | None = None,
         agree: Callable | None = None, on_error: Callable | None = None):
    """Evaluate ``chunks`` (``(start, stop)`` flat index ranges, in order) and
    ``record`` the points of ``pending`` each holds, one call per chunk (None: a round
    with nothing to evaluate here, recorded empty).

    A chunk is evaluated whole, so a resumed run evaluates the same chunks as an
    uninterrupted one; ``per_point`` evaluates its pending points one by one instead.
    With ``first`` (the model), the first chunk is a trial (:func:`_first_chunk`,
    its outcome passed through ``agree``): returns why it failed (nothing recorded,
    buffers and RNG as before), else None. ``on_error(exception)`` runs before an
    evaluation error propagates.
    """
    local, reduce = evaluator
    for k, chunk in enumerate(chunks):
        points = []
        if chunk is not None:
            start, stop = chunk
            ranges = [(f, f + 1) for f in range(start, stop) if f in pending] if per_point else [chunk]
            try:
                for a, b in ranges:
                    if k == 0 and first is not None:
                        part = _first_chunk(local, first, C[a:b])
                        part = agree(part) if agree is not None else part
                        if isinstance(part, str):
                            return part
                    else:
                        part = local(C[a:b])
                    losses, metrics = reduce(part)
                    points += [(f, float(losses[f - a]), None if metrics is None else float(metrics[f - a]))
                               for f in range(a, b) if f in pending]
            except Exception as e:
                if on_error is not None:
                    on_error(e)
                raise
        record(points)
    return None


def _first_chunk(chunk_fn: Callable, model: nn.Module, c: torch.Tensor):
    """``chunk_fn(c)``, or a string saying why it cannot be batched.

    Any exception counts (vmap raises on ``.item()``, data-dependent control flow,
    random numbers, Python-number outputs); so does a forward that writes a buffer.
    The attempt runs under its own guard, so a failed one leaves no trace.
    """
    buffers = list(model.buffers())
    with preserve_state(model, grads=False, buffers=True, rng=True):
        versions = [b._version for b in buffers]
        try:
            result = chunk_fn(c)
        except Exception as e:  # noqa: BLE001 - every failure means "evaluate per point"
            first_line = (str(e).strip().splitlines() or [""])[0]
            return f"the first chunk failed batched ({type(e).__name__}: {first_line})"
        if [b._version for b in buffers] != versions:
            return "the forward writes a buffer"
    return result


def _vmapped(model: nn.Module, point_fn: Callable) -> Callable:
    """``(stacked, batch) -> (loss,) or (loss, metric)``, each of shape (chunk,):
    ``point_fn`` at every point of a chunk in one forward. ``stacked`` maps
    ``"model." + name`` to a ``(chunk, *param.shape)`` tensor; the batch is shared."""
    evaluator = Evaluate(model, point_fn)  # functional_call runs point_fn(model, batch)

    def one(ps: dict[str, torch.Tensor], batch: object) -> tuple[torch.Tensor, ...]:
        loss, m = functional_call(evaluator, ps, (batch,))
        loss = check_scalar_loss(loss, "loss_fn/closure")
        return (loss,) if m is None else (loss, m)

    # randomness="error": a forward that draws random numbers is not batched.
    return torch.func.vmap(one, in_dims=(0, None), randomness="error")


def _check_directions(directions, dim, dtype, device) -> list[torch.Tensor]:
    if isinstance(directions, torch.Tensor):
        if directions.dim() != 1:
            raise TypeError(
                f"directions must be a list of flat (dim,) tensors, got one tensor of shape "
                f"{tuple(directions.shape)}"
            )
        directions = [directions]
    if not isinstance(directions, (list, tuple)):
        raise TypeError(f"directions must be a list of 1 or 2 flat tensors, got {type(directions).__name__}")
    if len(directions) not in (1, 2):
        raise ValueError(f"directions must hold 1 or 2 directions, got {len(directions)}")
    out = []
    for i, d in enumerate(directions):
        if not isinstance(d, torch.Tensor):
            raise TypeError(f"directions[{i}] must be a tensor, got {type(d).__name__}")
        if not d.is_floating_point():
            raise TypeError(f"directions[{i}] must be floating point, got {d.dtype}")
        if d.shape != (dim,):
            raise ValueError(
                f"directions[{i}] must have shape ({dim},) (all parameters, flat, in order), "
                f"got {tuple(d.shape)}"
            )
        d = d.detach().to(device=device, dtype=dtype)
        if not torch.isfinite(d).all():
            raise ValueError(f"directions[{i}] holds NaN or inf")
        out.append(d)
    return out


def _point_fn(fn: Callable, loss_fn: Callable | None, metric: Callable | None) -> Callable:
    """``(model, batch) -> (loss, metric or None)``; one forward with a criterion."""
    if metric is None:
        return lambda model, batch: (fn(model, batch), None)

    def both(model, batch):
        if isinstance(batch, Mapping) and loss_fn is None:
            outputs = model_outputs(model, batch)
        elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
            outputs = model_outputs(model, batch[0])
        else:
            raise ValueError(
                "with metric, each batch must be (inputs, targets) (or, with closure, a mapping with 'labels')"
            )
        targets = batch_targets(batch)
        loss = loss_fn(outputs, targets) if loss_fn is not None else fn(model, batch)
        return loss, metric(outputs, targets)

    return both


def _prepared(data, device) -> object:
    """``[(batch on device, count)]`` made once for the whole grid, for one batch or
    (on the CPU, where nothing moves) a list/tuple of batches; otherwise ``data``
    itself, re-iterated per point (a loader, or many batches bound for a GPU)."""
    if is_single_batch(data) or (isinstance(data, (list, tuple)) and device.type == "cpu"):
        return [(to_device(b, device), loss_count(b)) for b in iter_batches(data)]
    return data


def _iter_prepared(batches, device):
    """``(batch on device, count)`` pairs of what :func:`_prepared` returned; a loader's
    batches are moved as they come."""
    if isinstance(batches, list):
        return batches
    return ((to_device(b, device), loss_count(b)) for b in iter_batches(batches))


# -- resumable store -------------------------------------------------------------
def _key(coords, dirs, theta, has_metric: bool) -> str:
    h = hashlib.sha256()
    h.update(_FORMAT.encode())
    h.update(str(has_metric).encode())
    for c in coords:
        h.update(np.ascontiguousarray(c, dtype=np.float64).tobytes())
    for t in [*dirs, theta]:
        h.update(str(t.dtype).encode())
        # The float64 bytes piece by piece: the same key without a float64 copy of a
        # whole (dim,) vector (on a large model, more memory than the point evaluated).
        for part in t.detach().reshape(-1).split(_KEY_PIECE):
            h.update(part.cpu().double().contiguous().numpy())
    return h.hexdigest()


def _load(path: str, key: str, shape: tuple[int, ...]) -> dict:
    """Finished points of ``path`` (creating it with a header if absent)."""
    header = {"format": _FORMAT, "key": key, "shape": list(shape)}
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps(header) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return {}
    with open(path, "rb") as f:
        raw = f.read()
    complete = raw[: raw.rfind(b"\n") + 1]  # a torn last line (crash mid-write) is dropped
    lines = complete.decode("utf-8").splitlines()
    try:
        stored = json.loads(lines[0]) if lines else None
    except json.JSONDecodeError:
        stored = None
    if not isinstance(stored, dict) or stored.get("format") != _FORMAT:
        raise ValueError(f"path {path!r} exists and is not a dyndiag landscape file")
    if stored.get("key") != key:
        raise ValueError(
            f"path {path!r} holds a landscape for another grid, directions, centre parameters or "
            "metric setting; use a new path or delete the file"
        )
    if len(complete) != len(raw):
        os.truncate(path, len(complete))
    done = {}
    for line in lines[1:]:
        rec = json.loads(line)
        idx = (rec["i"],) if len(shape) == 1 else (rec["i"], rec["j"])
        done[idx] = (float(rec["loss"]), None if rec.get("metric") is None else float(rec["metric"]))
    return done


def _append(handle, points: list[tuple[tuple[int, ...], float, float | None]]) -> None:
    """Append finished points ``(grid index, loss, metric)``; one flush and fsync."""
    lines = []
    for idx, loss, m in points:
        rec = {"i": int(idx[0])}
        if len(idx) == 2:
            rec["j"] = int(idx[1])
        rec["loss"] = loss
        rec["metric"] = m
        lines.append(json.dumps(rec) + "\n")
    handle.write("".join(lines))
    handle.flush()
    os.fsync(handle.fileno())
