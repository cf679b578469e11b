"""Stochastic trace (Hutchinson, Hutch++) and diagonal estimators.

Probes are Rademacher vectors from a private generator seeded with ``seed``.
Products go through ``op.matmat`` in chunks of ``block_size`` columns (default
64), so a chunk is one batched pass of the operator; the estimate does not
depend on the chunking.
"""

from __future__ import annotations

import math

import torch

from .lockstep import Estimator, drive, drive_blocks
from .partition import BlockSpec, resolve_blocks
from .results import TraceResult
from .vectors import (
    check_count, check_operator, combine, full_dim, inner, make_generator, multiply, orthonormal, rademacher, reduce,
    shards_of,
)

__all__ = ["trace", "diagonal"]

_METHODS = ("hutchinson", "hutch++")
_DEFAULT_BLOCK = 64


def trace(
    op: object,
    num_matvecs: int = 100,
    method: str = "hutch++",
    seed: int = 0,
    *,
    block_size: int | None = None,
    blocks: BlockSpec | None = None,
) -> TraceResult | dict[str, TraceResult]:
    """Estimate ``tr(H)`` from ``num_matvecs`` products.

    Parameters
    ----------
    op
        A curvature operator (``matmat``, ``dim``, ``dtype``, ``device``).
    num_matvecs
        Budget ``B >= 1`` of operator columns; every method spends exactly ``B``.
    method
        ``"hutchinson"``: mean of ``z^T H z`` over ``B`` Rademacher probes.
        ``"hutch++"`` (Meyer et al. 2021): ``s = min(B // 3, dim)`` sketch columns
        ``S``, an orthonormal basis ``Q`` of ``H S``, ``tr(Q^T H Q)`` exactly from
        ``s`` more products, and Hutchinson on the deflated operator
        ``(I - QQ^T) H (I - QQ^T)`` with the remaining ``B - 2s`` probes (the
        products of ``Q`` and of the first probes share ``matmat`` calls). With
        ``B < 3`` it is Hutchinson. Hutch++ wins where a few eigenvalues dominate
        the trace: what the sketch captures is exact, and only the rest is sampled.
    seed
        Seed of the probes.
    block_size
        Most columns per ``op.matmat`` call (default 64). With ``blocks``, the most
        columns of one call over all blocks: each block multiplies
        ``max(1, block_size // #blocks)`` per call.
    blocks
        Traces of diagonal blocks of ``op`` (``tr(H_bb)``) instead: ``"module"``,
        ``"layer"``, ``{name: [parameter-name glob, ...]}`` or a callable
        ``param_name -> block name`` (see :mod:`dyndiag.curvature.partition`).
        Each block spends the budget ``B`` on its own probes (the same ``seed``);
        all blocks share every product call.

    Returns
    -------
    TraceResult
        ``value``; ``stderr`` of the Hutchinson part (``nan`` with fewer than two
        samples); ``num_matvecs`` (always ``B``). With ``blocks``:
        ``{block: TraceResult}`` in block order, each spending ``B`` columns, so
        ``op.num_matvecs`` grows by ``B * #blocks``.
    """
    _, dtype, device = check_operator(op)
    num_matvecs = check_count(num_matvecs, "num_matvecs")
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    block = _check_block(block_size)
    if blocks is None:
        return drive(op, _trace(op, num_matvecs, method, seed, block, dtype, device))
    parts = resolve_blocks(op, blocks)
    block = max(1, block // len(parts))
    return drive_blocks(op, parts, lambda b: _trace(b, num_matvecs, method, seed, block, dtype, device))


def _trace(
    space: object, num_matvecs: int, method: str, seed: int, block: int, dtype: torch.dtype, device: torch.device
) -> Estimator:
    """:func:`trace` on the vectors of ``space`` (the operator, or one of its diagonal
    blocks), as an :data:`~.lockstep.Estimator`."""
    shards, dim = shards_of(space), full_dim(space)  # a sharded operator holds op.dim of the dim rows
    gen = make_generator(seed)

    # Columns to multiply: s basis columns Q (Hutch++ only), then the probes. Probes
    # are drawn chunk by chunk so memory stays at O(dim * (s + block_size)).
    s = min(num_matvecs // 3, dim) if method == "hutch++" else 0
    Q = None
    if s > 0:
        S = rademacher(gen, dim, s, dtype, device, shards=shards)
        Y = []
        for i in range(0, s, block):
            Y.append((yield S[:, i : i + block]))
        Q = orthonormal(space, torch.cat(Y, 1))
        del S, Y
    n_cols = num_matvecs - s
    exact = torch.zeros((), dtype=torch.float64)
    samples = []
    for start in range(0, n_cols, block):
        stop = min(start + block, n_cols)
        parts = [Q[:, start:stop]] if start < s else []  # type: ignore[index]
        n_probe = max(0, stop - max(start, s))
        if n_probe > 0:
            G = rademacher(gen, dim, n_probe, dtype, device, shards=shards)
            if Q is not None:
                G = G - combine(Q, inner(space, Q, G))  # deflated probes (I - QQ^T) g
            parts.append(G)
        X = torch.cat(parts, 1)
        quad = reduce(space, (X * (yield X)).sum(0, dtype=torch.float64)).cpu()
        n_exact = X.shape[1] - n_probe
        exact += quad[:n_exact].sum()
        samples.append(quad[n_exact:])
    samples_t = torch.cat(samples)
    n = samples_t.numel()
    stderr = float(samples_t.std() / math.sqrt(n)) if n >= 2 else math.nan
    return TraceResult(value=float(exact + samples_t.mean()), stderr=stderr, num_matvecs=num_matvecs)


def diagonal(
    op: object, num_matvecs: int = 100, seed: int = 0, *, block_size: int | None = None
) -> torch.Tensor:
    """Hutchinson estimate of ``diag(H)``: the mean of ``z * (H z)`` over Rademacher ``z``.

    Unbiased; the variance of entry ``i`` is ``sum_{j != i} H_ij^2 / num_matvecs``,
    so it is exact for a diagonal operator and good for diagonally dominant ones.

    Parameters
    ----------
    op
        A curvature operator.
    num_matvecs
        Number of probes ``N >= 1`` (= operator columns spent).
    seed
        Seed of the probes.
    block_size
        Most columns per ``op.matmat`` call (default 64).

    Returns
    -------
    torch.Tensor
        ``(dim,)`` in ``op.dtype`` on ``op.device``.
    """
    dim, dtype, device = check_operator(op)
    num_matvecs = check_count(num_matvecs, "num_matvecs")
    block = _check_block(block_size)
    gen = make_generator(seed)
    total = torch.zeros(dim, dtype=dtype, device=device)
    for start in range(0, num_matvecs, block):
        Z = rademacher(gen, dim, min(block, num_matvecs - start), dtype, device, shards=shards_of(op))
        total += (Z * multiply(op, Z)).sum(1)
    return total / num_matvecs


def _check_block(block_size: object) -> int:
    if block_size is None:
        return _DEFAULT_BLOCK
    return check_count(block_size, "block_size")
