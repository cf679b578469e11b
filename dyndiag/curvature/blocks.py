"""How a model operator multiplies a block of columns: which backend, how many at once.

Two exact backends multiply several columns (design.md): ``vmap`` (double backward
with the columns batched by vmap) and the column ``loop`` (double backward on one
gradient graph, one column at a time).
Which is faster depends on the model, the data and the number of columns: vmap
turns many small kernels into a few large ones (convolutions, small models,
several batches), the loop wins where each column is already a large matrix
product and a single batch's gradient graph is reused. ``backend="auto"`` on the
CPU therefore races them on the first chunk of each width (:func:`race`), and the
faster per column serves every later chunk of that width. Every chunk of a width
comes from one backend, so results are reproducible. Decisions are kept for
the process, keyed by what the cost depends on (operator type, parameter names
and shapes, dtype, batch shapes, chunk width), so operators rebuilt at every step
(the Monitor's) race once per run and operators on equal models agree.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

__all__ = ["AUTO_CPU_CHUNK", "AUTO_MAX_CHUNK", "auto_chunk", "cpu_chunk", "remembered", "race"]

#: Most columns ``max_batch_vectors="auto"`` multiplies at once off CUDA.
AUTO_CPU_CHUNK = 32
#: Bytes a vmapped column holds per byte the forward saves for backward (derivatives of
#: the activations and their gradients), measured 1.0-3.0 on CPU MLPs and CNNs.
VMAP_BYTES_PER_SAVED_BYTE = 4
#: Largest chunk ``"auto"`` picks: past it, vmap gains nothing and compile times grow.
AUTO_MAX_CHUNK = 256

_DECISIONS: dict[tuple, str] = {}

#: The race's clock: CPU time of the calling thread. It leaves out the time other
#: processes hold the core, so a race on a busy machine measures the work, not the
#: neighbours. CPU autograd runs on the calling thread, which also works its share
#: of torch's parallel kernels, so on an idle machine this is the wall time.
_clock = time.thread_time


def auto_chunk(per_column_bytes: int, free_bytes: int, spare: float = 0.5) -> int:
    """Columns per vmapped pass that fit in ``(1 - spare) * free_bytes`` at
    ``per_column_bytes`` each, between 1 and :data:`AUTO_MAX_CHUNK`."""
    if per_column_bytes <= 0:
        return AUTO_MAX_CHUNK
    return int(max(1, min(AUTO_MAX_CHUNK, (1 - spare) * free_bytes // per_column_bytes)))


def cpu_chunk(saved_bytes: int) -> int:
    """Columns per vmapped pass off CUDA: at most :data:`AUTO_CPU_CHUNK`, and as many
    as fit in half of the host's available memory at
    :data:`VMAP_BYTES_PER_SAVED_BYTE` times the forward's saved bytes per column."""
    try:
        with open("/proc/meminfo") as f:
            free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):  # not Linux: no bound from memory
        return AUTO_CPU_CHUNK
    return min(AUTO_CPU_CHUNK, auto_chunk(VMAP_BYTES_PER_SAVED_BYTE * saved_bytes, free))


def remembered(key: tuple) -> str | None:
    """The backend an earlier race chose for ``key``, else ``None``."""
    return _DECISIONS.get(key)


def race(
    key: tuple,
    V: torch.Tensor,
    vmap: tuple[Callable[[], object], Callable[[object, torch.Tensor], torch.Tensor]],
    loop: tuple[Callable[[], object], Callable[[object, torch.Tensor], torch.Tensor]],
    graph_is_reused: bool,
) -> tuple[torch.Tensor, str]:
    """``(H V, backend)`` for a ``(dim, w)`` chunk (``w >= 2``), choosing the backend for ``key``.

    ``vmap`` and ``loop`` are each ``(build, columns)``: ``build()`` makes the graph
    the backend differentiates, ``columns(graph, W)`` multiplies ``W`` on it. A
    backend's cost per column is its build spread over the chunk (nothing when the
    graph is kept across products) plus its columns' time per column: the loop's
    timed on a quarter of the chunk (its columns cost the same whatever their
    number), vmap's on the whole chunk. The faster is remembered for ``key``. The
    result is what the winner gives for the chunk alone: vmap's whole chunk, or
    the loop's columns (which do not depend on how a chunk is split).
    """
    width = V.shape[1]
    m = max(1, width // 4)
    costs, results = {}, {}
    for name, (build, columns), cols in (("loop", loop, slice(0, m)), ("vmap", vmap, slice(0, width))):
        start = _clock()
        graph = build()
        built = _clock()
        results[name] = (graph, columns(graph, V[:, cols]))
        costs[name] = (0.0 if graph_is_reused else built - start) / width + (_clock() - built) / (cols.stop - cols.start)
    winner = _DECISIONS[key] = "vmap" if costs["vmap"] <= costs["loop"] else "loop"
    if winner == "vmap":
        return results["vmap"][1], winner
    graph, first = results["loop"]
    return torch.cat([first, loop[1](graph, V[:, m:])], dim=1), winner
