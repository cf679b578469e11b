"""The operator interface every curvature estimator works on.

An operator is a symmetric ``(dim, dim)`` matrix known only through products.
Estimators (``eigenvalues``, ``trace``, ``diagonal``, ``spectral_density``) call
:meth:`CurvatureOperator.matmat` with blocks of columns so that subclasses can
multiply many vectors in one batched pass; ``num_matvecs`` counts columns.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.sparse.linalg
import torch

__all__ = ["CurvatureOperator", "MatrixOperator"]


class CurvatureOperator:
    """A symmetric linear operator of shape ``(dim, dim)`` on flat parameter vectors.

    Subclasses set ``dim``, ``dtype`` and ``device`` and implement
    :meth:`_matmat`, which receives a validated ``(dim, k)`` tensor on the
    operator's device and dtype and returns ``(dim, k)``. Everything else —
    validation, counting, ``@``, the scipy view — lives here.
    """

    dim: int
    dtype: torch.dtype
    device: torch.device
    #: ``None``, or called with the number of products after each :meth:`matvec` (1) and
    #: :meth:`matmat` (``k``): how a progress bar follows a long estimate.
    on_products: Callable[[int], None] | None = None

    def __init__(self) -> None:
        self.num_matvecs = 0

    # -- products -------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return (self.dim, self.dim)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """Multiply one vector: ``v`` of shape ``(dim,)`` -> ``(dim,)``."""
        v = self._check_vectors(v, "v", ndim=1)
        out = self._matvec(v)
        self._counted(1)
        return out

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """Multiply a block of columns: ``V`` of shape ``(dim, k)`` -> ``(dim, k)``.

        Counts ``k`` towards :attr:`num_matvecs`. ``k = 0`` returns an empty block.
        """
        V = self._check_vectors(V, "V", ndim=2)
        k = V.shape[1]
        if k == 0:
            return torch.empty_like(V)
        out = self._matmat(V)
        self._counted(k)
        return out

    def _counted(self, k: int) -> None:
        """Record ``k`` products (:attr:`num_matvecs`, :attr:`on_products`)."""
        self.num_matvecs += k
        if self.on_products is not None:
            self.on_products(k)

    def __matmul__(self, other: torch.Tensor) -> torch.Tensor:
        if isinstance(other, torch.Tensor) and other.dim() == 1:
            return self.matvec(other)
        return self.matmat(other)

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self._matmat(v.unsqueeze(1)).squeeze(1)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- views ----------------------------------------------------------
    def to_scipy(self) -> scipy.sparse.linalg.LinearOperator:
        """A ``scipy.sparse.linalg.LinearOperator`` view (float64 numpy in and out).

        Products through the view are counted in :attr:`num_matvecs` too.
        """
        op = self

        def _mv(x: np.ndarray) -> np.ndarray:
            x = np.asarray(x).reshape(-1)
            t = torch.as_tensor(x, dtype=op.dtype, device=op.device)
            return op.matvec(t).detach().cpu().double().numpy()

        def _mm(X: np.ndarray) -> np.ndarray:
            t = torch.as_tensor(np.asarray(X), dtype=op.dtype, device=op.device)
            return op.matmat(t).detach().cpu().double().numpy()

        return scipy.sparse.linalg.LinearOperator(
            shape=self.shape, matvec=_mv, rmatvec=_mv, matmat=_mm, rmatmat=_mm, dtype=np.float64
        )

    def to_dense(self, chunk: int = 256) -> torch.Tensor:
        """The full ``(dim, dim)`` matrix by ``dim`` products (small operators only)."""
        eye = torch.eye(self.dim, dtype=self.dtype, device=self.device)
        return torch.cat([self.matmat(eye[:, i : i + chunk]) for i in range(0, self.dim, chunk)], 1)

    # -- validation -----------------------------------------------------
    def _check_vectors(self, V: object, name: str, ndim: int) -> torch.Tensor:
        if isinstance(V, np.ndarray):
            V = torch.as_tensor(V, dtype=self.dtype, device=self.device)
        if not isinstance(V, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(V).__name__}")
        if V.dim() != ndim or V.shape[0] != self.dim:
            want = f"({self.dim},)" if ndim == 1 else f"({self.dim}, k)"
            raise ValueError(f"{name} must have shape {want}, got {tuple(V.shape)}")
        if V.dtype != self.dtype:
            # Half-precision vectors (a bf16 model's gradient or update) go up exactly;
            # anything that would lose digits is refused rather than rounded silently.
            if not (V.dtype in (torch.float16, torch.bfloat16) and self.dtype in (torch.float32, torch.float64)):
                raise TypeError(f"{name} has dtype {V.dtype}, but the operator works in {self.dtype}")
            V = V.to(self.dtype)
        if V.device != self.device:
            V = V.to(self.device)
        return V

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim={self.dim}, dtype={self.dtype}, device={self.device})"


class MatrixOperator(CurvatureOperator):
    """An explicit symmetric matrix as an operator (tests, small problems, baselines).

    ``A``: a ``(dim, dim)`` tensor; its symmetry is checked to ``1e-8`` relative.
    """

    def __init__(self, A: torch.Tensor) -> None:
        super().__init__()
        if not isinstance(A, torch.Tensor):
            raise TypeError(f"A must be a torch.Tensor, got {type(A).__name__}")
        if A.dim() != 2 or A.shape[0] != A.shape[1]:
            raise ValueError(f"A must be square, got shape {tuple(A.shape)}")
        scale = A.abs().max().clamp_min(torch.finfo(A.dtype).tiny)
        if (A - A.T).abs().max() > 1e-8 * scale:
            raise ValueError("A must be symmetric")
        self.A = A
        self.dim = A.shape[0]
        self.dtype = A.dtype
        self.device = A.device

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.A @ V
