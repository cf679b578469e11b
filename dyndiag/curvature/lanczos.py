"""Extreme eigenvalues by block Lanczos with full reorthogonalisation and thick restart.

One implementation serves every block size (``block_size=1`` is plain Lanczos).
The state is an orthonormal basis ``Q`` (``dim x m``, the *settled* columns), the
projected matrix ``T = Q^T H Q`` (``m x m``, float64 on the CPU), the *pending*
block ``P`` (``dim x p``, orthonormal and orthogonal to ``Q``) and the coupling
``C = P^T H Q`` (``p x m``) such that ``H Q = Q T + P C``. A step multiplies the
pending block, orthogonalises the products against every stored column
(classical Gram-Schmidt twice), grows ``T`` and makes the remainder the next
pending block. The residual of a Ritz pair ``(theta, Q y)`` is ``||C y||``
exactly, so convergence is checked after every step at the cost of a small
``eigh``. When the basis is full, a thick restart (Wu & Simon 2000) keeps the
best Ritz vectors and continues.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from .lockstep import Estimator, drive, drive_blocks
from .partition import BlockSpec, resolve_blocks
from .results import EigenResult
from .vectors import (
    check_count, check_int, check_operator, column_norms, combine, full_dim, gaussian, inner, make_generator,
    orthonormal, shards_of, thin_svd,
)

__all__ = ["eigenvalues"]

_WHICH = ("LA", "SA", "LM")


def eigenvalues(
    op: object,
    k: int = 1,
    which: str = "LA",
    tol: float = 1e-6,
    max_matvecs: int | None = None,
    seed: int = 0,
    return_vectors: bool = False,
    *,
    block_size: int = 1,
    max_basis: int | None = None,
    basis_device: torch.device | str | None = None,
    blocks: BlockSpec | None = None,
) -> EigenResult | dict[str, EigenResult]:
    """Extreme eigenvalues of a symmetric operator by block Lanczos.

    Parameters
    ----------
    op
        A curvature operator (``matmat``, ``dim``, ``dtype``, ``device``).
    k
        Number of eigenvalues, ``1 <= k < op.dim``.
    which
        ``"LA"`` largest algebraic (returned descending), ``"SA"`` smallest
        algebraic (ascending), ``"LM"`` largest magnitude (by ``|value|`` descending).
    tol
        Relative tolerance. A value ``theta`` is converged when its error bound
        ``min(r, r**2 / gap)`` is at most ``tol * max(|theta|, eps**(2/3) * ||H||)``,
        with ``r = ||H x - theta x||`` the residual of its unit Ritz vector, ``gap``
        the distance to the nearest other Ritz value, ``eps`` the machine epsilon of
        ``op.dtype`` and ``||H||`` estimated by the largest ``|Ritz value|``
        (ARPACK's rule: near-zero eigenvalues are judged against ``||H||``). A
        bound at or below ``3 * sqrt(m) * eps * ||H||`` (``m`` basis columns), the
        round-off level of the basis, also counts as converged, whatever ``tol``.
        Under ``"LM"`` the values must also be the largest in magnitude within
        the residuals of the other Ritz values.
    max_matvecs
        Budget of operator columns (at least ``k``); the last block is shortened so
        the budget is spent exactly when it runs out. Default
        ``block_size * max(200, 20 * k)``.
    seed
        Seed of the Gaussian start block and of the random vectors that replace
        directions lost to an invariant subspace.
    return_vectors
        Also return the ``(dim, k)`` unit Ritz vectors.
    block_size
        Columns multiplied per step (one ``op.matmat`` call). A block of ``b``
        columns resolves eigenvalues of multiplicity up to ``b``; ``block_size=1``
        finds only one copy of a repeated eigenvalue (a Krylov space of one vector
        sees each eigenspace as one direction).
    max_basis
        Most settled basis columns kept before a thick restart; memory is at
        most ``(max_basis + block_size) * dim`` numbers of ``op.dtype`` on
        ``basis_device``, allocated as the basis grows (doubling from
        ``2 * (k + block_size) + 8`` columns), so a run that converges early holds
        only what it used. Default ``min(dim, max(40, 2 * k + 2 * block_size))``;
        must be at least ``k + block_size`` unless it is ``dim``.
    basis_device
        Where the basis lives (e.g. ``"cpu"`` to spare GPU memory); products still
        run on ``op.device``. Default: ``op.device``.
    blocks
        Eigenvalues of diagonal blocks of ``op`` instead of ``op`` itself:
        ``"module"``, ``"layer"``, ``{name: [parameter-name glob, ...]}`` or a
        callable ``param_name -> block name`` (see
        :mod:`dyndiag.curvature.partition`). Every block runs its own Lanczos (with
        these settings, the same ``seed``) and all advance together: one product
        call per step multiplies one column per running block (``block_size``
        each). A block of at most ``k`` coordinates is solved exactly from that
        many products and returns all its eigenvalues.

    Returns
    -------
    EigenResult
        ``values`` ``(k,)`` on the CPU in ``op.dtype``, ``vectors`` ``(dim, k)`` on
        ``op.device`` or ``None``, ``num_matvecs`` spent by this call,
        ``converged`` and the float64 ``error_bounds`` ``(k,)``.
        With ``blocks``: ``{block: EigenResult}`` in block order; a block's
        ``vectors`` are ``(d_b, k)`` over its own coordinates (its parameters in
        ``op``'s order) and its ``num_matvecs`` counts its own columns, each one
        operator column: ``op.num_matvecs`` grows by their sum.
    """
    _, dtype, device = check_operator(op)
    dim = full_dim(op)  # a sharded operator holds op.dim of the dim rows
    k = check_int(k, "k")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if which not in _WHICH:
        raise ValueError(f"which must be one of {_WHICH}, got {which!r}")
    if not isinstance(tol, numbers.Real) or not math.isfinite(tol) or tol <= 0:
        raise ValueError(f"tol must be a positive finite number, got {tol!r}")
    block_size = check_count(block_size, "block_size")
    if max_basis is not None:
        max_basis = check_int(max_basis, "max_basis")
    if max_matvecs is not None:
        max_matvecs = check_int(max_matvecs, "max_matvecs")
    basis_device = device if basis_device is None else torch.device(basis_device)
    settings = (k, which, tol, max_matvecs, seed, return_vectors, block_size, max_basis, dtype, device, basis_device)
    if blocks is None:
        if k >= dim:
            raise ValueError(f"k must satisfy 1 <= k < op.dim = {dim}, got {k}")
        return drive(op, _lanczos(op, *settings))
    parts = resolve_blocks(op, blocks)
    return drive_blocks(
        op, parts,
        lambda b: _lanczos(b, *settings) if k < b.dim else _dense(b.dim, which, return_vectors, dtype, device),
    )


def _lanczos(
    space: object,
    k: int,
    which: str,
    tol: float,
    max_matvecs: int | None,
    seed: int,
    return_vectors: bool,
    block_size: int,
    max_basis: int | None,
    dtype: torch.dtype,
    device: torch.device,
    basis_device: torch.device,
) -> Estimator:
    """The Lanczos iteration of :func:`eigenvalues` on the vectors of ``space`` (the
    operator, or one of its diagonal blocks; ``k`` below its dimension), as an
    :data:`~.lockstep.Estimator`."""
    shards, dim = shards_of(space), full_dim(space)  # a sharded operator holds op.dim of the dim rows
    b = min(block_size, dim)
    if max_basis is None:
        max_basis = min(dim, max(40, 2 * k + 2 * b))
    else:
        max_basis = min(max_basis, dim)
        if max_basis < dim and max_basis < k + b:
            raise ValueError(
                f"max_basis must be at least k + block_size = {k + b} (or >= op.dim), got {max_basis}"
            )
    if max_matvecs is None:
        max_matvecs = b * max(200, 20 * k)
    elif max_matvecs < k:
        raise ValueError(f"max_matvecs must be at least k = {k}, got {max_matvecs}")

    eps = torch.finfo(dtype).eps
    gen = make_generator(seed)

    # One buffer holds the settled columns [0, m) and the pending block [m, m + p);
    # during a step new directions are appended behind the pending block. The
    # small matrices (T, C, Ritz) are float64 numpy: LAPACK through numpy is
    # reliably fast at these sizes (MKL's eigh through torch stalls for some).
    # The buffer grows by doubling up to max_basis + b columns: a run that converges
    # in a dozen products never allocates the full basis (on a GPU that is real memory).
    capacity = max_basis + b
    V = torch.empty(space.dim, min(capacity, 2 * (k + b) + 8), dtype=dtype, device=basis_device)
    V[:, :b] = orthonormal(space, gaussian(gen, dim, b, dtype, basis_device, shards=shards))
    m, p = 0, b
    T = np.zeros((0, 0))
    C = np.zeros((b, 0))
    theta, Y, bounds = np.zeros(0), np.zeros((0, 0)), np.zeros(0)
    spent = 0
    converged = False

    while p > 0 and spent < max_matvecs:
        q = min(p, max_matvecs - spent)
        if m + q > max_basis:
            # Thick restart: keep the k wanted Ritz vectors and half of the rest.
            keep = _order(theta, which)[: min(k + (m - k) // 2, max_basis - b)]
            m = _thick_restart(V, m, p, Y[:, keep])
            T, C = np.diag(theta[keep]), C @ Y[:, keep]

        # -- one block step: multiply q pending columns X, keep the rest R pending
        if V.shape[1] < m + q + p:  # room for the next pending block behind the current one
            V = _grow(V, m + q + p, capacity, used=m + p)
        W = (yield V[:, m : m + q].to(device)).to(basis_device)
        spent += q
        # ||H X|| <= ||H||: a lower estimate of the operator's scale before any Ritz value.
        scale = max(float(column_norms(space, W).max()), float(np.abs(theta).max(initial=0.0)))
        h = _cgs2(V[:, : m + p], W, space)
        t = np.zeros((m + q, m + q))
        t[:m, :m] = T
        t[:, m:] = h[: m + q]
        t[m:, :m] = h[:m].T
        T = (t + t.T) / 2

        # Residual directions with singular value below eps^(3/4) ||H|| count as lost
        # to an invariant subspace and are replaced by random directions with zero
        # coupling. The cut is far above CGS2 round-off (~eps ||H||); T = Q^T H Q
        # stays exact, only the residual estimate misses what is cut.
        U, S, Vh = thin_svd(space, W)
        rank = int((S > eps**0.75 * scale).sum()) if scale > 0 else 0
        width = min(p, dim - m - q)  # next pending block: R, new directions, random fill
        rank = min(rank, width - (p - q))
        n_rand = width - (p - q) - rank
        V[:, m + p : m + p + rank] = U[:, :rank]
        if n_rand > 0:
            Z = gaussian(gen, dim, n_rand, dtype, basis_device, shards=shards)
            _cgs2(V[:, : m + p + rank], Z, space)
            V[:, m + p + rank : m + p + rank + n_rand] = orthonormal(space, Z)
        coupling = (S[:rank, None] * Vh[:rank]).cpu().double().numpy()
        C = np.block(
            [
                [C[q:], h[m + q :]],
                [np.zeros((rank, m)), coupling],
                [np.zeros((n_rand, m + q))],
            ]
        )
        m, p = m + q, width

        # -- Ritz values and their error bounds, after every step
        theta, Y = np.linalg.eigh(T)
        resid = np.linalg.norm(C @ Y, axis=0)
        bounds = _error_bounds(theta, resid)
        if m >= k and _converged(theta, resid, bounds, which, k, tol, eps, m):
            converged = True
            break

    idx = _order(theta, which)[:k]
    vectors = None
    if return_vectors:
        X = V[:, :m] @ torch.from_numpy(Y[:, idx]).to(device=basis_device, dtype=dtype)
        vectors = (X / column_norms(space, X)).to(device)
    return EigenResult(
        values=torch.from_numpy(theta[idx]).to(dtype),
        vectors=vectors,
        num_matvecs=spent,
        converged=converged,
        error_bounds=torch.from_numpy(bounds[idx].copy()),
    )


def _dense(
    dim: int, which: str, return_vectors: bool, dtype: torch.dtype, device: torch.device
) -> Estimator:
    """All eigenvalues of a ``dim``-dimensional operator from its ``dim`` columns
    (the identity's products), in :func:`eigenvalues`' order; error bounds 0."""
    H = (yield torch.eye(dim, dtype=dtype, device=device)).cpu().double().numpy()
    theta, Y = np.linalg.eigh((H + H.T) / 2)
    idx = _order(theta, which)
    return EigenResult(
        values=torch.from_numpy(theta[idx]).to(dtype),
        vectors=torch.from_numpy(Y[:, idx]).to(dtype=dtype, device=device) if return_vectors else None,
        num_matvecs=dim,
        converged=True,
        error_bounds=torch.zeros(dim, dtype=torch.float64),
    )


def _grow(V: torch.Tensor, need: int, capacity: int, used: int) -> torch.Tensor:
    """A copy of ``V`` with at least ``need`` columns (doubling, at most ``capacity``)."""
    wider = torch.empty(V.shape[0], min(capacity, max(need, 2 * V.shape[1])), dtype=V.dtype, device=V.device)
    wider[:, :used] = V[:, :used]
    return wider


def _order(theta: np.ndarray, which: str) -> np.ndarray:
    """Indices of the Ritz values from most to least wanted."""
    key = {"LA": -theta, "SA": theta, "LM": -np.abs(theta)}[which]
    return np.argsort(key, kind="stable")


def _cgs2(Q: torch.Tensor, W: torch.Tensor, space: object) -> np.ndarray:
    """Orthogonalise ``W`` against the orthonormal columns of ``Q`` in place, twice.

    Returns the float64 coefficients ``Q^T W`` summed over both passes. One
    classical Gram-Schmidt pass loses orthogonality in proportion to the
    cancellation; a second pass restores it to working precision ("twice is enough").
    """
    h = np.zeros((Q.shape[1], W.shape[1]))
    for _ in range(2):
        c = inner(space, Q, W)
        W -= combine(Q, c)
        h += c.cpu().double().numpy()
    return h


def _error_bounds(theta: np.ndarray, resid: np.ndarray) -> np.ndarray:
    """``min(r_i, r_i**2 / gap_i)`` per Ritz value ``theta_i`` with residual ``r_i``.

    ``gap_i = min_{j != i} |theta_i - theta_j| - r_j``: the distance to the other
    Ritz values, each moved towards ``theta_i`` by its own residual (an eigenvalue
    lies within ``r_j`` of ``theta_j``), so an unconverged neighbour does not
    fake a wide gap. ``r**2 / gap`` is used only where ``gap > r_i``; a lone Ritz
    value has no gap and keeps ``r_i``.
    """
    gap = np.abs(theta[:, None] - theta[None, :]) - resid[None, :]
    np.fill_diagonal(gap, np.inf)
    gap = gap.min(axis=1, initial=np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        refined = np.where((gap > resid) & np.isfinite(gap), resid**2 / gap, resid)
    return np.minimum(resid, refined)


def _converged(
    theta: np.ndarray,
    resid: np.ndarray,
    bounds: np.ndarray,
    which: str,
    k: int,
    tol: float,
    eps: float,
    m: int,
) -> bool:
    """Whether the ``k`` wanted Ritz values have converged, and are the wanted ones.

    Each needs ``bound <= tol * max(|theta|, eps**(2/3) * ||H||)`` (ARPACK's rule),
    floored at ``3 * sqrt(m) * eps * ||H||``, the round-off of Gram-Schmidt over
    ``m`` columns: below it a bound is noise, and without the floor a repeated
    near-zero eigenvalue never converges (its copies keep residuals of a few
    ``eps * ||H||``, far above ``tol * eps**(2/3) * ||H||``).

    Under ``"LM"``, moreover, no other Ritz value moved by its own residual may
    exceed the last wanted magnitude by more than that value's target: the two
    ends of the spectrum converge separately, and a value at the other end can
    still be growing into the answer. Under ``"LA"``/``"SA"`` the Ritz values at
    the wanted end only move outwards, in order (interlacing), and the same test
    would stall on a repeated near-zero eigenvalue, whose extra copies would all
    have to reach round-off.
    """
    order = _order(theta, which)
    wanted, rest = order[:k], order[k:]
    h_norm = np.abs(theta).max()
    target = tol * np.maximum(np.abs(theta[wanted]), eps ** (2 / 3) * h_norm)
    target = np.maximum(target, 3 * math.sqrt(m) * eps * h_norm)
    if not np.all(bounds[wanted] <= target):
        return False
    if which != "LM":
        return True
    edge = np.abs(theta[wanted[-1]]) + target[-1]
    return bool(np.all(np.abs(theta[rest]) + resid[rest] <= edge))


def _thick_restart(V: torch.Tensor, m: int, p: int, Y_keep: np.ndarray) -> int:
    """Replace the ``m`` settled columns of ``V`` by the Ritz vectors ``Q Y_keep``.

    The pending block moves behind them; returns the new number of settled columns.
    """
    r = Y_keep.shape[1]
    Qr = V[:, :m] @ torch.from_numpy(Y_keep).to(device=V.device, dtype=V.dtype)
    pending = V[:, m : m + p].clone()  # source and destination may overlap
    V[:, :r] = Qr
    V[:, r : r + p] = pending
    return r
