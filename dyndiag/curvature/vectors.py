"""Seeded random probe vectors, and the operator checks and products every estimator uses.

Every estimator draws its random vectors from a private CPU ``torch.Generator``
seeded with the estimator's ``seed``, so results are reproducible for a seed, the
same on every device, and the global RNG states (torch, CUDA, numpy, python) are
never touched. Probes are drawn one probe at a time (row by row of a ``(k, dim)``
draw), so Rademacher blocks drawn in chunks equal one block drawn at once.

Operators of FSDP-sharded models (``op.shards`` set, :mod:`dyndiag.curvature.sharded`)
hold only this rank's entries of every vector: estimators take inner products,
norms, QR and SVD through :func:`inner`, :func:`column_norms`, :func:`orthonormal`
and :func:`thin_svd`, which reduce over the ranks, and draw probes with
``shards=``, which keeps this rank's entries of the single-process draw.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

__all__ = [
    "check_operator",
    "check_int",
    "check_count",
    "combine",
    "multiply",
    "make_generator",
    "rademacher",
    "gaussian",
    "shards_of",
    "full_dim",
    "reduce",
    "inner",
    "column_norms",
    "orthonormal",
    "thin_svd",
]


def check_operator(op: object, name: str = "op") -> tuple[int, torch.dtype, torch.device]:
    """Return ``(dim, dtype, device)`` of a curvature operator, or raise ``TypeError``.

    An operator needs ``matmat(V)`` for ``(dim, k)`` blocks and the attributes
    ``dim``, ``dtype`` and ``device`` (see :class:`dyndiag.curvature.base.CurvatureOperator`).
    """
    missing = [a for a in ("matmat", "dim", "dtype", "device") if not hasattr(op, a)]
    if missing or not callable(getattr(op, "matmat")):
        raise TypeError(
            f"{name} must be a curvature operator with matmat(V), dim, dtype and device "
            f"(e.g. dyndiag.HessianOperator or MatrixOperator), got {type(op).__name__}"
        )
    dim = op.dim  # type: ignore[attr-defined]
    if not isinstance(dim, numbers.Integral) or dim < 1:
        raise TypeError(f"{name}.dim must be a positive int, got {dim!r}")
    dtype = op.dtype  # type: ignore[attr-defined]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{name}.dtype must be a floating torch.dtype, got {dtype!r}")
    return int(dim), dtype, torch.device(op.device)  # type: ignore[attr-defined]


def multiply(op: object, V: torch.Tensor, blocks: Sequence[tuple[Sequence[str], int]] | None = None) -> torch.Tensor:
    """``H V`` for a ``(dim, k)`` block: ``op.matmat``, or ``op.matvec`` for one column.

    Operators multiply a single vector by a cheaper path than a batch (double
    backward on a kept gradient graph rather than a vmapped pass), and both count
    one product.

    ``blocks``: ``V``'s columns come in groups ``(parameter names, width)``, each
    group's columns zero off its block's rows, and only each group's rows of its
    own block are wanted (``H_bb V_b``): ``op.block_matmat`` where the operator has
    it (it differentiates each block toward its own parameters only), else the full
    product (whose other rows are then not zero).
    """
    if blocks is not None and callable(getattr(op, "block_matmat", None)):
        return op.block_matmat(V, blocks)  # type: ignore[attr-defined]
    if V.shape[1] == 1 and callable(getattr(op, "matvec", None)):
        return op.matvec(V[:, 0]).unsqueeze(1)  # type: ignore[attr-defined]
    return op.matmat(V)  # type: ignore[attr-defined]


def check_int(value: object, name: str) -> int:
    """``value`` as an int, or ``TypeError`` naming ``name`` (bools are refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return int(value)


def check_count(value: object, name: str) -> int:
    """``value`` as an int ``>= 1``, or ``TypeError``/``ValueError`` naming ``name``."""
    value = check_int(value, name)
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def make_generator(seed: int) -> torch.Generator:
    """A private CPU generator seeded with ``seed`` (the global RNG is left alone)."""
    return torch.Generator(device="cpu").manual_seed(check_int(seed, "seed"))


def rademacher(
    gen: torch.Generator, dim: int, k: int, dtype: torch.dtype, device: torch.device, *, shards=None
) -> torch.Tensor:
    """``(dim, k)`` block of independent +-1 entries, in ``dtype`` on ``device``.

    Drawn on the CPU as int8 (one byte per entry) and moved before the cast, so a
    GPU operator receives a quarter of the bytes of a float32 block. With
    ``shards`` (a sharded operator's layout), every probe is drawn whole, one at a
    time (int8 draws row by row equal one block), and this rank keeps its entries:
    the union over ranks is the single-process block for the same generator.
    """
    if shards is None:
        bits = torch.randint(0, 2, (k, dim), generator=gen, dtype=torch.int8)
    else:
        rows = [shards.take(torch.randint(0, 2, (shards.full_dim,), generator=gen, dtype=torch.int8)) for _ in range(k)]
        bits = torch.stack(rows) if rows else torch.empty(0, shards.dim, dtype=torch.int8)
    return bits.T.to(device=device).to(dtype).mul_(2).sub_(1).contiguous()


def gaussian(
    gen: torch.Generator, dim: int, k: int, dtype: torch.dtype, device: torch.device, *, shards=None
) -> torch.Tensor:
    """``(dim, k)`` block of standard normal entries (drawn in float64), in ``dtype`` on ``device``.

    With ``shards``, the full ``(k, full_dim)`` block is drawn (the few columns of a
    Lanczos start) and this rank keeps its rows: the single-process block's.
    """
    z = torch.randn((k, dim if shards is None else shards.full_dim), generator=gen, dtype=torch.float64)
    if shards is not None:
        z = shards.take(z.T).T
    return z.T.to(device=device, dtype=dtype).contiguous()


# -- reductions: the operator's vectors may be split over ranks ----------------
def shards_of(op: object):
    """The layout of a sharded operator's vectors (``op.shards``), else ``None``."""
    return getattr(op, "shards", None)


def full_dim(op: object) -> int:
    """The length of the operator's full vectors: ``op.dim``, or the sum over ranks."""
    shards = shards_of(op)
    return op.dim if shards is None else shards.full_dim  # type: ignore[attr-defined]


def reduce(op: object, t: torch.Tensor) -> torch.Tensor:
    """``t`` (this rank's part of sums over the operator's vector entries) summed
    over ranks when the operator is sharded; ``t`` itself otherwise."""
    shards = shards_of(op)
    return t if shards is None else shards.reduce(t)


def inner(op: object, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``A^T B`` of two blocks of the operator's vectors, summed over ranks when sharded."""
    # (B^T A)^T: the same product in the orientation CPU BLAS runs fast when A is a
    # slice of a wider basis and B has several columns (see docs/decisions.md).
    return reduce(op, B @ A if B.dim() == 1 else (B.T @ A).T)


def combine(Q: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """``Q @ C`` for a block ``Q`` of the operator's vectors, as ``(C^T Q^T)^T`` (faster
    on CPU for the same reason as :func:`inner`)."""
    return Q @ C if C.dim() == 1 else (C.T @ Q.T).T


def column_norms(op: object, W: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Euclidean norms of the vectors along ``dim`` of ``W`` (reduced over ranks when sharded)."""
    shards = shards_of(op)
    if shards is None:
        return torch.linalg.vector_norm(W, dim=dim)
    return shards.reduce((W * W).sum(dim)).sqrt()


def _tsqr(shards, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Thin QR of a tall block split by rows over ranks (TSQR): the local QR's
    ``R`` factors are gathered (``k x k`` each) and factored once more, so ``Q``
    stays local and as orthonormal as a single-process QR."""
    import torch.distributed as dist

    k = W.shape[1]
    Q1, R1 = torch.linalg.qr(W)
    R = W.new_zeros(k, k)
    R[: R1.shape[0]] = R1
    Rs = [torch.empty_like(R) for _ in range(shards.world)]
    dist.all_gather(Rs, R, group=shards.group)
    Q2, R = torch.linalg.qr(torch.cat(Rs))
    return Q1 @ Q2[shards.rank * k : shards.rank * k + R1.shape[0]], R


def orthonormal(op: object, W: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis ``Q`` of the columns of ``W`` (thin QR, ``(dim, k)``)."""
    shards = shards_of(op)
    return torch.linalg.qr(W).Q if shards is None else _tsqr(shards, W)[0]


def thin_svd(op: object, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U, S, Vh`` of ``W`` (``full_matrices=False``); by TSQR then the ``k x k``
    SVD of ``R`` when the operator is sharded."""
    shards = shards_of(op)
    if W.shape[1] == 1:  # one column: its norm, which LAPACK's SVD of a tall vector computes slowly
        S = column_norms(op, W)
        U = W / S.clamp_min(torch.finfo(W.dtype).tiny)
        return U, S, torch.ones(1, 1, dtype=W.dtype, device=W.device)
    if shards is None:
        return torch.linalg.svd(W, full_matrices=False)
    Q, R = _tsqr(shards, W)
    U, S, Vh = torch.linalg.svd(R)
    return Q @ U, S, Vh
