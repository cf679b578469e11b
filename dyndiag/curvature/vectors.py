"""Seeded random probe vectors, and the operator checks and products every estimator uses.

Every estimator draws its random vectors from a private CPU ``torch.Generator``
seeded with the estimator's ``seed``, so results are reproducible for a seed, the
same on every device, and the global RNG states (torch, CUDA, numpy, python) are
never touched. Probes are drawn one probe at a time (row by row of a ``(k, dim)``
draw), so Rademacher blocks drawn in chunks equal one block drawn at once.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

__all__ = [
    "check_operator",
    "check_int",
    "check_count",
    "multiply",
    "make_generator",
    "rademacher",
    "gaussian",
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
    gen: torch.Generator, dim: int, k: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """``(dim, k)`` block of independent +-1 entries, in ``dtype`` on ``device``.

    Drawn on the CPU as int8 (one byte per entry) and moved before the cast, so a
    GPU operator receives a quarter of the bytes of a float32 block.
    """
    bits = torch.randint(0, 2, (k, dim), generator=gen, dtype=torch.int8)
    return bits.T.to(device=device).to(dtype).mul_(2).sub_(1).contiguous()


def gaussian(
    gen: torch.Generator, dim: int, k: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """``(dim, k)`` block of standard normal entries (drawn in float64), in ``dtype`` on ``device``."""
    z = torch.randn((k, dim), generator=gen, dtype=torch.float64)
    return z.T.to(device=device, dtype=dtype).contiguous()
