"""How a model operator multiplies a block of columns: which backend, how many at once.

Two exact backends multiply several columns (design.md): ``vmap`` (forward-over-
reverse, batched) and the column ``loop`` (double backward on one gradient graph).
Which is faster depends on the model, the data and the number of columns: vmap
turns many small kernels into a few large ones (convolutions, small models,
several batches), the loop wins where each column is already a large matrix
product and a single batch's gradient graph is reused. ``backend="auto"`` on the
CPU therefore races them: the first chunk of each width is split, one part
multiplied by each backend, and the faster per column serves every later chunk of
that width. The loser's columns are recomputed by the winner, so every chunk of a
width comes from one backend and results are reproducible. Decisions are kept for
the process, keyed by what the cost depends on (operator type, parameter names
and shapes, dtype, batch shapes, chunk width), so operators rebuilt at every step
(the Monitor's) race once per run and operators on equal models agree.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

__all__ = ["AUTO_CPU_CHUNK", "AUTO_MAX_CHUNK", "auto_chunk", "remembered", "race"]

#: ``max_batch_vectors="auto"`` off CUDA.
AUTO_CPU_CHUNK = 32
#: Largest chunk ``"auto"`` picks: past it, vmap gains nothing and compile times grow.
AUTO_MAX_CHUNK = 256

_DECISIONS: dict[tuple, str] = {}


def auto_chunk(per_column_bytes: int, free_bytes: int, spare: float = 0.5) -> int:
    """Columns per vmapped pass that fit in ``(1 - spare) * free_bytes`` at
    ``per_column_bytes`` each, between 1 and :data:`AUTO_MAX_CHUNK`."""
    if per_column_bytes <= 0:
        return AUTO_MAX_CHUNK
    return int(max(1, min(AUTO_MAX_CHUNK, (1 - spare) * free_bytes // per_column_bytes)))


def remembered(key: tuple) -> str | None:
    """The backend an earlier race chose for ``key``, else ``None``."""
    return _DECISIONS.get(key)


def race(
    key: tuple,
    V: torch.Tensor,
    vmap_fn: Callable[[torch.Tensor], torch.Tensor],
    loop_fn: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """``H V`` for a ``(dim, w)`` chunk (``w >= 2``), choosing the backend for ``key``.

    The first half of the columns goes through ``vmap_fn``, the rest through
    ``loop_fn``, each timed; the faster per column is remembered for ``key``. The loop's columns do not depend on how a block is split, vmap's
    may in the last bits, so a loop win recomputes the vmapped half and a vmap win
    the whole chunk: the result is what the winner gives for the chunk alone.
    """
    half = V.shape[1] // 2
    start = time.perf_counter()
    first = vmap_fn(V[:, :half])
    per_vmap = (time.perf_counter() - start) / half
    start = time.perf_counter()
    rest = loop_fn(V[:, half:])
    per_loop = (time.perf_counter() - start) / (V.shape[1] - half)
    winner = "vmap" if per_vmap <= per_loop else "loop"
    _DECISIONS[key] = winner
    if winner == "vmap":
        return vmap_fn(V)
    return torch.cat([loop_fn(V[:, :half]), rest], dim=1)
