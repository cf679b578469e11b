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

Three ways to evaluate the grid, equal to float rounding (~1e-16 relative in
float64, ~1e-7 in float32):

* layer by layer, for an MLP (an ``nn.Sequential``, or a class whose forward
  traces to a plain chain of Linear layers; :mod:`dyndiag.landscape.layerwise`):
  the first layer's output is affine in the grid coordinates, so it is computed
  once per batch along each direction and combined per point with one matmul;
  later layers are one ``baddbmm`` per chunk. Chosen by ``"auto"`` and by an int
  > 1 whenever the model qualifies (see that module), with its own chunk rule.
* batched with vmap (``batch_points`` > 1, the default ``"auto"``): the grid, in flat
  row-major order, is cut into fixed chunks of ``batch_points`` points (chunk k
  holds flat indices ``[k*B, (k+1)*B)``). A chunk's parameters are one ``addmm``,
  ``theta + C @ D.T`` of shape ``(chunk, dim)``, viewed as one stacked tensor per
  parameter, and every batch of ``data`` goes through one forward of
  ``torch.func.vmap`` over ``torch.func.functional_call`` (parameters batched,
  the data shared). The model's parameters are never written. Bigger ops use both
  cores of a small CPU and pay the per-op overhead once per chunk.
* per point (``batch_points=1``): each point is written into the model's
  parameters (one ``addmv`` into one buffer whose views are copied in) and
  evaluated with a plain forward; 2.3x cheaper per point than re-binding the
  parameters with ``functional_call`` one point at a time.

Otherwise ``"auto"`` batches with vmap unless it is unsafe, and then falls back to the per-point loop
(an explicit ``batch_points`` > 1 falls back too, with a warning saying why):

* a ``closure=``: it is arbitrary code that calls the model itself;
* a normalisation layer that would update running statistics (BatchNorm or
  InstanceNorm in train mode with ``track_running_stats``): the per-point loop
  moves them (the state guard puts them back) and vmap cannot;
* any exception while the first chunk to evaluate is run under vmap (a
  ``metric`` or model that calls ``.item()``, branches on a tensor's value,
  returns a Python number, draws random numbers, ...), or a forward that writes a
  buffer: the attempt is discarded (buffers and RNG restored) and every point,
  the first chunk's included, is evaluated per point. Errors that are the
  caller's (a non-scalar loss, a bad batch) are then raised by the per-point loop
  with its usual message.

On the CPU, ``"auto"`` takes the per-point loop for a model with a convolution
when a batch holds more than 128 samples (vmap's grouped convolutions lost to
plain ones there; with fewer samples they won). Otherwise ``"auto"`` picks the chunk from the largest batch's sample count n and the
number of parameters dim: the largest chunk with at most 128 points, at most
``2**15`` sample evaluations (``chunk * n``), at most ``2**26`` for
``chunk * n * dim`` (a stand-in for the size of a chunk's activations) and at
most ``2**24`` stacked parameter elements (``chunk * dim``). On the CPU a chunk
under 16 points means the per-point loop: vmap costs ~0.5 ms per call, and a
forward that large already keeps the cores busy. Bigger chunks lost on a 2-core
machine: a chunk's intermediates are fresh allocations, returned to the OS after
it, so every chunk pays page faults for them. The digits benchmark (512 samples,
3.6k parameters) gets chunks of 36; all 1797 digits, or a 512-unit hidden layer
on 512 samples, get the per-point loop (those models are MLPs, so they take the
layer-by-layer path instead). Not measured on GPUs. ``"auto"`` depends only on
the data's batch sizes and the model, so repeated calls give the same bits.
``Surface.batch_points`` is the chunk size a call used (1: the per-point loop).

Resumable store (``path=``): a JSON-lines file. Line 1 is a header holding a
SHA-256 key of the grid (coordinates), the directions, the centre parameters and
whether a metric is evaluated; every later line is one finished point
``{"i": .., "j": .., "loss": .., "metric": ..}``, appended as soon as it is
evaluated: per point in the per-point loop (one fsync each), per chunk in the
batched path (each new point of a finished chunk appended, then one fsync).
Floats are written with ``repr`` precision. Chunk boundaries are fixed by the
grid index, not by what is left to do, and a chunk with any point missing is
evaluated whole, so with the same ``batch_points`` (and data) resumed values are
bit-identical to an uninterrupted run; a file resumed with another setting mixes
values that agree to float rounding. A torn last line (a crash while writing) is
dropped and truncated away on the next run. The key does not cover ``data``, the
loss or ``batch_points``: reuse a path only for the same data and loss.
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
    default_batch_size,
    is_single_batch,
    iter_batches,
    make_loss_closure,
    model_outputs,
    to_device,
)
from ..evaluation import Evaluate, operator_mode, select_params, unwrap
from ..state import preserve_state
from . import layerwise

__all__ = ["Surface", "surface"]

_FORMAT = "dyndiag-landscape-v1"
# "auto" chunk rule (module docstring; measured in docs/benchmarks.md). A chunk's
# intermediates are fresh allocations that glibc hands back to the OS after it, so
# each chunk pays page faults for them: bigger chunks lost on a 2-core VM.
_MAX_CHUNK = 128
_SAMPLE_EVALUATIONS = 2**15  # chunk x samples per vmapped forward
_CHUNK_WORK = 2**26  # chunk x samples x parameters (a stand-in for activation size)
_MAX_PARAM_ELEMENTS = 2**24  # stacked (chunk, dim) parameters: 64 MiB in float32
_CPU_MIN_CHUNK = 16  # smaller chunks lost to vmap's ~0.5 ms per call
# With a convolution on the CPU, batches of more samples than this go per point:
# vmap runs per-point convolution weights as a grouped convolution, which won at
# 16-128 samples (1.5-2.6x) and lost from 256 on (0.45-0.8x) on a digits CNN.
_CPU_CONV_SAMPLES = 128


@dataclass
class Surface:
    """A loss surface on a grid.

    ``coords`` is a tuple of 1-D arrays (one per direction); ``values`` has shape
    ``(len(coords[0]),)`` or ``(len(coords[0]), len(coords[1]))`` with
    ``values[i, j]`` the loss at ``(coords[0][i], coords[1][j])``;
    ``metric_values`` is the same for ``metric`` (None without one).
    ``batch_points`` is how this call evaluated its points: the chunk size of the
    batched paths, 1 for the per-point loop, 0 if every point was already stored.
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
    progress: bool | None = None,
) -> Surface:
    """The loss on a 1-D or 2-D grid around the model's current parameters.

    Parameters
    ----------
    model:
        The network; it is returned bit-identical (parameters, buffers, modes,
        ``.grad``, RNG states).
    loss_fn:
        Criterion ``loss_fn(outputs, targets)`` with mean reduction (or None with
        ``closure``).
    data:
        One batch or a re-iterable collection of batches (a list, a DataLoader);
        iterated once per chunk of grid points (once per point in the per-point
        loop).
    directions:
        One or two flat ``(dim,)`` tensors in parameter order (see
        :func:`random_directions`); a single 1-D tensor counts as one direction.
    extent, resolution:
        Coordinates ``np.linspace(-extent, extent, resolution)`` along each
        direction; 0 is the model as given.
    path:
        Resumable store (JSON lines, see the module docstring). Finished points
        are read back and not recomputed; a file made for another grid,
        directions, centre or metric setting raises ``ValueError``.
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
        Grid points evaluated together in one vmapped forward: ``"auto"`` (chunk
        from memory bounds; the per-point loop where batching is unsafe), an int
        > 1, or 1 (or 0) for the per-point loop. An int > 1 that cannot be used
        falls back to the per-point loop with a warning. See the module docstring.
    progress:
        Progress bar over the grid points; ``None`` shows it on a terminal only.

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

    model = unwrap(model)
    names, chosen = select_params(model, params)
    dtype, device = chosen[0].dtype, chosen[0].device
    dirs = _check_directions(directions, sum(p.numel() for p in chosen), dtype, device)
    coords = tuple(np.linspace(-float(extent), float(extent), resolution) for _ in dirs)
    shape = tuple(len(c) for c in coords)

    theta = torch.cat([p.detach().reshape(-1) for p in chosen])
    store = None
    done: dict[tuple[int, ...], tuple[float, float | None]] = {}
    if path is not None:
        key = _key(coords, dirs, theta, metric is not None)
        store = os.fspath(path)
        done = _load(store, key, shape)

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
    bar = tqdm(total=len(todo), desc="landscape", disable=None if progress is None else not progress)
    handle = open(store, "a", encoding="utf-8") if store is not None else None

    def record(points: list[tuple[int, float, float | None]]) -> None:
        """Store finished points ``(flat index, loss, metric)``: arrays, file (one fsync), bar."""
        for f, loss, m in points:
            values[grid[f]] = loss
            if metric_values is not None:
                metric_values[grid[f]] = m
        if handle is not None:
            _append(handle, [(grid[f], loss, m) for f, loss, m in points])
        bar.update(len(points))

    try:
        # The state guard restores everything the per-point loop writes (parameters,
        # running statistics a train-mode BatchNorm moves); the batched path writes
        # nothing, but runs under the same guard.
        with preserve_state(model, params=True), operator_mode(model), torch.no_grad():
            D = torch.stack(dirs, 1)  # (dim, k)
            # Every grid point's coordinates (N, k), made once: a tensor per point
            # costs more than the indexing.
            C = torch.tensor([[float(c[i]) for c, i in zip(coords, idx)] for idx in grid], dtype=dtype, device=device)
            batches = _prepared(data, device)
            why = _unbatchable(model, closure)
            chunk_fn, size = None, requested
            if why is None and requested != 1:
                chunk_fn, auto = _layerwise(model, chosen, loss_fn, closure, metric, theta, dirs, D, batches, device)
                if chunk_fn is None:
                    conv = any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
                    auto = _auto_chunk(batches, device, theta.numel(), conv)
                    if (requested or auto) > 1:
                        layout = [("model." + n, p.shape) for n, p in zip(names, chosen)]
                        stages = _vmap_stages(_vmapped(model, point_fn), layout, theta, D)
                        chunk_fn = _chunk_evaluator(*stages, batches, device)
                size = requested or auto
            if chunk_fn is not None:
                why = _batched(chunk_fn, model, C, todo, size, record)
            if why is not None and requested not in (None, 1):
                warnings.warn(f"surface: batch_points={requested} falls back to the per-point loop: {why}",
                              RuntimeWarning, stacklevel=2)
            if chunk_fn is None or why is not None:
                size = 1
                _per_point(point_fn, model, chosen, theta, D, C, todo, batches, device, record)
    finally:
        bar.close()
        if handle is not None:
            handle.close()
    return Surface(coords=coords, values=values, metric_values=metric_values, batch_points=size)


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
            # The per-point loop moves the running statistics (restored on exit);
            # under vmap the in-place update of an unbatched buffer fails.
            return f"{type(m).__name__} {name or 'model'!r} in train mode updates its running statistics"
    return None


def _auto_chunk(batches: object, device: torch.device, dim: int, conv: bool = False) -> int:
    """Points per chunk for ``"auto"`` (1: per point), from the largest batch's sample
    count n, the number of parameters ``dim`` and whether the model has a
    convolution; the bounds are in the module docstring."""
    if isinstance(batches, list):
        n = max((count for _, count in batches), default=0)
    else:  # a loader: its first batch stands for all
        first = next(iter(iter_batches(batches)), None)
        n = 0 if first is None else default_batch_size(first)
    n, dim = max(n, 1), max(dim, 1)
    if conv and device.type == "cpu" and n > _CPU_CONV_SAMPLES:
        return 1  # vmap's grouped convolutions lost to plain ones here (docs/benchmarks.md)
    size = min(_MAX_CHUNK, _SAMPLE_EVALUATIONS // n, _CHUNK_WORK // (n * dim), _MAX_PARAM_ELEMENTS // dim)
    if device.type == "cpu" and size < _CPU_MIN_CHUNK:
        return 1  # vmap's ~0.5 ms per call is not paid back (or one point fills the cores)
    return max(size, 1)


def _layerwise(model, chosen, loss_fn, closure, metric, theta, dirs, D, batches, device):
    """``(chunk_fn, auto chunk size)`` of the layer-by-layer path for an MLP
    (:mod:`dyndiag.landscape.layerwise`), or ``(None, None)`` where it does not apply."""
    if not isinstance(batches, list):
        return None, None  # a loader: the first layer's outputs cannot be kept
    try:
        plan = layerwise.plan(model, chosen, loss_fn, closure)
        heads = None if isinstance(plan, str) else layerwise.head_cache(plan, theta, dirs, batches)
    except Exception:  # noqa: BLE001 - a model or batch it cannot read: the other paths decide
        return None, None
    if heads is None or isinstance(heads, str):
        return None, None
    stages = layerwise.evaluator(plan, heads, loss_fn, metric, theta, D)
    return _chunk_evaluator(*stages, batches, device), layerwise.auto_chunk(plan, heads)


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


def _vmap_stages(vm: Callable, layout, theta, D) -> tuple[Callable, Callable]:
    """``(prepare, on_batch)`` for :func:`_chunk_evaluator` on the vmap path: a chunk's
    parameters ``theta + c @ D.T`` (one GEMM), viewed per parameter, and ``vm`` on a batch."""
    numels = [math.prod(s) for _, s in layout]

    def prepare(c: torch.Tensor) -> dict[str, torch.Tensor]:
        P = torch.addmm(theta.unsqueeze(0), c, D.T)  # (chunk, dim)
        return {key: part.view(c.shape[0], *s) for (key, s), part in zip(layout, P.split(numels, 1))}

    return prepare, lambda stacked, b, batch: vm(stacked, batch)


def _chunk_evaluator(prepare: Callable, on_batch: Callable, batches, device) -> Callable:
    """``c (chunk, k) -> (loss (chunk,), metric (chunk,) or None)``, float64 numpy:
    the sample-weighted means over ``batches`` at ``theta + D @ c[r]`` for every row.
    ``prepare(c)`` makes the chunk's state once; ``on_batch(state, b, batch)`` returns
    ``(loss,)`` or ``(loss, metric)`` on batch number ``b``."""

    def evaluate(c: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        n_pts = c.shape[0]
        state = prepare(c)
        # Accumulated like the per-point loop (float64, n * loss, batch order), so
        # equal per-batch losses give equal means.
        total = torch.zeros(n_pts, dtype=torch.float64, device=device)
        total_m = torch.zeros(n_pts, dtype=torch.float64, device=device)
        has_m = False
        count = 0
        for b, (batch, n) in enumerate(_iter_prepared(batches, device)):
            if n <= 0:
                continue
            out = on_batch(state, b, batch)
            total += n * out[0].double()
            if len(out) > 1:
                has_m = True
                total_m += n * out[1].double()
            count += n
        if count == 0:
            raise ValueError("data yielded no samples")
        return (total / count).cpu().numpy(), ((total_m / count).cpu().numpy() if has_m else None)

    return evaluate


def _batched(chunk_fn: Callable, model: nn.Module, C: torch.Tensor, todo: list[int], size: int, record) -> str | None:
    """Evaluate ``todo`` (flat indices) in fixed chunks ``[k*size, (k+1)*size)``.

    A chunk with any point to do is evaluated whole, so a resumed run evaluates
    the same GEMMs as an uninterrupted one; only its new points are recorded.
    Returns None when done, or why batching failed on the first chunk (then
    nothing was recorded and buffers and RNG are as before).
    """
    pending = set(todo)
    starts = sorted({f - f % size for f in todo})
    for k, start in enumerate(starts):
        stop = min(start + size, C.shape[0])
        if k == 0:
            result = _first_chunk(chunk_fn, model, C[start:stop])
            if isinstance(result, str):
                return result
        else:
            result = chunk_fn(C[start:stop])
        losses, metrics = result
        record([
            (f, float(losses[f - start]), None if metrics is None else float(metrics[f - start]))
            for f in range(start, stop)
            if f in pending
        ])
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


def _per_point(point_fn, model, chosen, theta, D, C, todo, batches, device, record) -> None:
    """Evaluate ``todo`` one point at a time, written into the live parameters."""
    # theta + D c as one addmv into one buffer whose views are copied into the live
    # parameters (the caller's state guard restores them). A plain forward per point
    # was 2.3x cheaper than re-binding the parameters with functional_call per point.
    point = torch.empty_like(theta)
    targets = [(p, t.view_as(p)) for p, t in zip(chosen, torch.split(point, [p.numel() for p in chosen]))]
    for f in todo:
        torch.addmv(theta, D, C[f], out=point)
        for p, t in targets:
            p.copy_(t)
        loss, m = _mean_over_data(point_fn, model, batches, device)
        record([(f, loss, m)])


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
        return [(to_device(b, device), default_batch_size(b)) for b in iter_batches(data)]
    return data


def _iter_prepared(batches, device):
    """``(batch on device, count)`` pairs of what :func:`_prepared` returned; a loader's
    batches are moved as they come."""
    if isinstance(batches, list):
        return batches
    return ((to_device(b, device), default_batch_size(b)) for b in iter_batches(batches))


def _mean_over_data(point_fn, model, batches, device) -> tuple[float, float | None]:
    total = 0.0
    total_m = 0.0
    has_m = False
    count = 0
    for batch, n in _iter_prepared(batches, device):
        if n <= 0:
            continue
        loss, m = point_fn(model, batch)
        loss = check_scalar_loss(loss, "loss_fn/closure")
        total += n * float(loss)  # a float32 or float64 scalar is exact in a Python float
        if m is not None:
            has_m = True
            total_m += n * float(torch.as_tensor(m, dtype=torch.float64))
        count += n
    if count == 0:
        raise ValueError("data yielded no samples")
    return total / count, (total_m / count if has_m else None)


# -- resumable store -------------------------------------------------------------
def _key(coords, dirs, theta, has_metric: bool) -> str:
    h = hashlib.sha256()
    h.update(_FORMAT.encode())
    h.update(str(has_metric).encode())
    for c in coords:
        h.update(np.ascontiguousarray(c, dtype=np.float64).tobytes())
    for t in [*dirs, theta]:
        h.update(str(t.dtype).encode())
        h.update(np.ascontiguousarray(t.detach().cpu().double().numpy()).tobytes())
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
