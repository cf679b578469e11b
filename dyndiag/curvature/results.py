"""Result records returned by the curvature estimators."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["EigenResult", "TraceResult"]


@dataclass(frozen=True, eq=False)
class EigenResult:
    """Eigenvalues of a curvature operator found by :func:`dyndiag.eigenvalues`.

    Attributes
    ----------
    values : torch.Tensor
        ``(k,)`` on the CPU in the operator's dtype, sorted as ``which`` asks:
        ``"LA"`` descending, ``"SA"`` ascending, ``"LM"`` by ``|value|`` descending.
    vectors : torch.Tensor or None
        ``(dim, k)`` unit eigenvectors (column ``i`` belongs to ``values[i]``) on the
        operator's device, or ``None`` unless ``return_vectors=True``.
    num_matvecs : int
        Operator columns multiplied by this call, setup included.
    converged : bool
        Whether all ``k`` values met the tolerance (``False`` when the budget ran out).
    error_bounds : torch.Tensor
        ``(k,)`` float64 on the CPU: the final bound on ``|value - eigenvalue|`` for
        each value, ``min(residual, residual**2 / gap)`` (see :func:`dyndiag.eigenvalues`).
    """

    values: torch.Tensor
    vectors: torch.Tensor | None
    num_matvecs: int
    converged: bool
    error_bounds: torch.Tensor

    def __repr__(self) -> str:
        vals = ", ".join(f"{v:.6g}" for v in self.values.tolist())
        vec = "None" if self.vectors is None else f"tensor{tuple(self.vectors.shape)}"
        return (
            f"EigenResult(values=[{vals}], vectors={vec}, num_matvecs={self.num_matvecs}, "
            f"converged={self.converged})"
        )


@dataclass(frozen=True)
class TraceResult:
    """A stochastic trace estimate from :func:`dyndiag.trace`.

    Attributes
    ----------
    value : float
        The estimate of ``tr(H)``.
    stderr : float
        Standard error of the random (Hutchinson) part: sample standard deviation
        (``ddof=1``) over its samples divided by ``sqrt(#samples)``; ``nan`` with
        fewer than two samples.
    num_matvecs : int
        Operator columns multiplied by this call.
    """

    value: float
    stderr: float
    num_matvecs: int
