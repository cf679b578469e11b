"""Driving estimators: one operator, or several diagonal blocks of it in lockstep.

Each estimator's algorithm is a generator over a ``(d, q)`` column space: it yields
the columns it wants multiplied (on the operator's device), receives their products
``(d, q)`` and finally returns its result. :func:`drive` feeds it an operator's
products. :func:`drive_blocks` runs one generator per diagonal block of the operator
(:mod:`.partition`) together: at every step it places each block's columns on that
block's rows of one ``(dim, sum q_b)`` matrix (zero elsewhere), multiplies it by one
product call, and hands each block the rows of its own columns that are its own.
That is the block's product ``H_bb V_b`` exactly, and every step is one pass over
the data for all blocks. Model operators multiply such a matrix by
``block_matmat``: per batch one forward (and one first backward) for all blocks,
then each block's columns differentiated toward its own parameters only, so a
column costs what it costs on the block's own operator; other operators get a full
product per column. A step counts ``sum q_b`` operator columns (one per column of
every block still running); the blocks' results count their own columns.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence

import torch
from tqdm.auto import tqdm

from .partition import Block
from .vectors import multiply

__all__ = ["Estimator", "drive", "drive_blocks"]

#: An estimator's algorithm: yields ``(d, q)`` columns, is sent their products, returns its result.
Estimator = Generator[torch.Tensor, torch.Tensor, object]


def drive(op: object, algorithm: Estimator) -> object:
    """Run ``algorithm`` on ``op``'s products; return its result."""
    try:
        columns = next(algorithm)
        while True:
            columns = algorithm.send(multiply(op, columns))
    except StopIteration as stop:
        return stop.value


def drive_blocks(
    op: object,
    blocks: Sequence[Block],
    algorithm: Callable[[Block], Estimator],
    progress: str | None = None,
) -> dict[str, object]:
    """``{block name: result}`` of ``algorithm(block)`` run on every block in lockstep.

    ``progress``: a description to show a bar over the steps (``None``: no bar).
    """
    dim, dtype, device = op.dim, op.dtype, op.device  # type: ignore[attr-defined]
    results: dict[str, object] = {}
    running: dict[int, tuple[Estimator, torch.Tensor]] = {}

    def advance(i: int, algo: Estimator, product: torch.Tensor | None) -> None:
        try:
            running[i] = (algo, next(algo) if product is None else algo.send(product))
        except StopIteration as stop:
            running.pop(i, None)
            results[blocks[i].name] = stop.value

    for i, block in enumerate(blocks):
        advance(i, algorithm(block), None)
    bar = tqdm(desc=progress, unit="step", disable=True if progress is None else None)
    with bar:
        while running:
            widths = [cols.shape[1] for _, cols in running.values()]
            X = torch.zeros(dim, sum(widths), dtype=dtype, device=device)
            start = 0
            for (i, (_, cols)), w in zip(running.items(), widths):
                X[blocks[i].index, start : start + w] = cols.to(dtype)
                start += w
            Y = multiply(op, X, [(blocks[i].params, w) for i, w in zip(running, widths)])
            start = 0
            for (i, (algo, _)), w in zip(list(running.items()), widths):
                advance(i, algo, Y[blocks[i].index, start : start + w])
                start += w
            bar.update()
    return {b.name: results[b.name] for b in blocks}
