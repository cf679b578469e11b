"""A diagonally preconditioned operator ``D^-1/2 (H + S) D^-1/2``.

Adam-type optimizers step by ``P^-1 m``; their linear stability is governed by the
top eigenvalue of ``P^-1/2 H P^-1/2`` (the *preconditioned sharpness*), which this
operator exposes to every estimator (``eigenvalues``, ``trace``, ...). ``S`` is a
diagonal shift, e.g. Adam's coupled weight decay ``w`` (the optimizer then sees the
Hessian of ``loss + w/2 ||theta||^2``, which is ``H + w I``).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

from .vectors import check_operator, multiply
from .base import CurvatureOperator

__all__ = ["PreconditionedOperator"]


class PreconditionedOperator(CurvatureOperator):
    """``D^-1/2 (op + diag(shift)) D^-1/2`` as a curvature operator.

    Parameters
    ----------
    op
        The inner symmetric operator (e.g. a :class:`~dyndiag.HessianOperator`).
    diag
        ``(op.dim,)`` positive, finite diagonal ``D`` (e.g. Adam's denominator),
        converted to ``op``'s dtype and device.
    shift
        A real number (``shift * I``) or an ``(op.dim,)`` tensor (a diagonal) added
        to ``op`` inside the preconditioning; default 0.

    Notes
    -----
    Every product costs one product of ``op`` per column (``op.num_matvecs`` counts
    them; this operator's ``num_matvecs`` counts its own columns). ``params``,
    ``names`` and ``model`` of ``op``, when present, are passed through (vectors keep
    ``op``'s parameter order; ``blocks=`` resolves on them).
    """

    def __init__(self, op: object, diag: torch.Tensor, shift: float | torch.Tensor = 0.0) -> None:
        super().__init__()
        dim, dtype, device = check_operator(op)
        if not isinstance(diag, torch.Tensor):
            raise TypeError(f"diag must be a torch.Tensor, got {type(diag).__name__}")
        if diag.shape != (dim,):
            raise ValueError(f"diag must have shape ({dim},), got {tuple(diag.shape)}")
        if not (diag.dtype.is_floating_point or diag.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"diag must be real, got dtype {diag.dtype}")
        diag = diag.detach().to(dtype=dtype, device=device)
        if not bool(torch.isfinite(diag).all()) or not bool((diag > 0).all()):
            raise ValueError("diag must be finite and positive everywhere")
        if isinstance(shift, torch.Tensor):
            if shift.shape != (dim,) and shift.dim() != 0:
                raise ValueError(f"shift must be a number or a tensor of shape ({dim},), got {tuple(shift.shape)}")
            shift = shift.detach().to(dtype=dtype, device=device)
            if not bool(torch.isfinite(shift).all()):
                raise ValueError("shift must be finite")
            if shift.dim() == 0:
                shift = float(shift)
        elif isinstance(shift, bool) or not isinstance(shift, numbers.Real):
            raise TypeError(f"shift must be a real number or a tensor, got {type(shift).__name__}")
        elif not torch.isfinite(torch.tensor(float(shift))):
            raise ValueError(f"shift must be finite, got {shift!r}")
        self.op = op
        self.dim, self.dtype, self.device = dim, dtype, device
        self.diag = diag
        self.shift = shift
        self._scale = diag.rsqrt()
        for attr in ("params", "names", "model"):
            if hasattr(op, attr):
                setattr(self, attr, getattr(op, attr))

    def _shifted(self, HW: torch.Tensor, W: torch.Tensor, column: bool) -> torch.Tensor:
        if isinstance(self.shift, torch.Tensor):
            s = self.shift if column else self.shift[:, None]
            return HW + s * W
        return HW + self.shift * W if self.shift != 0 else HW

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        w = v * self._scale
        return self._shifted(multiply(self.op, w[:, None])[:, 0], w, True) * self._scale

    def _matmat(self, V: torch.Tensor, blocks: Sequence[tuple[Sequence[str], int]] | None = None) -> torch.Tensor:
        W = V * self._scale[:, None]
        return self._shifted(multiply(self.op, W, blocks), W, False) * self._scale[:, None]

    def block_matmat(self, X: torch.Tensor, blocks: Sequence[tuple[Sequence[str], int]]) -> torch.Tensor:
        """Diagonal blocks' products (see :meth:`dyndiag.HessianOperator.block_matmat`):
        ``D`` and the shift are diagonal, so a block of this operator is
        ``D_b^-1/2 (H_bb + S_b) D_b^-1/2``, multiplied by ``op``'s own block products
        where it has them. Counts ``k`` products."""
        X = self._check_vectors(X, "X", ndim=2)
        out = self._matmat(X, blocks)
        self._counted(X.shape[1])
        return out
