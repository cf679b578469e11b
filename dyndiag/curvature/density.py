"""Spectral density by stochastic Lanczos quadrature (SLQ; Ghorbani et al. 2019).

Each unit Rademacher probe ``v`` defines the spectral measure
``mu_v = sum_i (u_i^T v)^2 delta(lambda_i)``, whose average over probes is the
eigenvalue density ``(1/dim) sum_i delta(lambda_i)`` in expectation. ``m`` Lanczos
steps from ``v`` give its Gauss quadrature: nodes = eigenvalues of the ``m x m``
tridiagonal matrix, weights = squared first components of its eigenvectors.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch
from tqdm.auto import tqdm

from .lockstep import Estimator, drive, drive_blocks
from .partition import BlockSpec, resolve_blocks
from .vectors import check_count, check_operator, column_norms, full_dim, make_generator, rademacher, reduce, shards_of

__all__ = ["SpectralDensity", "spectral_density"]


@dataclass(frozen=True, eq=False, repr=False)
class SpectralDensity:
    """A discrete approximation of an operator's eigenvalue density.

    Attributes
    ----------
    nodes : np.ndarray
        ``(n,)`` float64 eigenvalue locations (all probes' quadrature nodes).
    weights : np.ndarray
        ``(n,)`` float64 non-negative weights summing to 1.
    num_matvecs : int
        Operator columns spent to build it.
    dim : int
        Dimension of the operator (to turn the density into counts or a trace).
    """

    nodes: np.ndarray
    weights: np.ndarray
    num_matvecs: int
    dim: int

    def pdf(self, grid: np.ndarray, bandwidth: float | None = None) -> np.ndarray:
        """The density smoothed by Gaussian kernels, evaluated on ``grid``.

        Parameters
        ----------
        grid
            ``(g,)`` eigenvalue positions.
        bandwidth
            Kernel standard deviation in eigenvalue units. Default: 1 % of the node
            range ``max(nodes) - min(nodes)``, or ``1e-3 * max(1, |node|)`` when all
            nodes coincide.

        Returns
        -------
        np.ndarray
            ``(g,)`` float64 density values; the density integrates to 1 over the
            real line.
        """
        grid = np.asarray(grid, dtype=np.float64)
        if grid.ndim != 1:
            raise ValueError(f"grid must be a 1-D array, got shape {grid.shape}")
        if bandwidth is None:
            bandwidth = self.default_bandwidth
        elif (
            isinstance(bandwidth, bool)
            or not isinstance(bandwidth, numbers.Real)
            or not math.isfinite(bandwidth)
            or bandwidth <= 0
        ):
            raise ValueError(f"bandwidth must be a positive finite number, got {bandwidth!r}")
        out = np.empty_like(grid)
        # Grid chunks keep the (chunk, n) kernel matrix small.
        chunk = max(1, 2**22 // max(1, self.nodes.size))
        for i in range(0, grid.size, chunk):
            z = (grid[i : i + chunk, None] - self.nodes[None, :]) / bandwidth
            out[i : i + chunk] = np.exp(-0.5 * z**2) @ self.weights
        return out / (bandwidth * math.sqrt(2 * math.pi))

    @property
    def default_bandwidth(self) -> float:
        """The bandwidth :meth:`pdf` uses when none is given."""
        lo, hi = float(self.nodes.min()), float(self.nodes.max())
        if hi > lo:
            return 0.01 * (hi - lo)
        return 1e-3 * max(1.0, abs(hi))

    @property
    def trace(self) -> float:
        """SLQ estimate of ``tr(H)``: ``dim * sum(weights * nodes)``."""
        return float(self.dim * np.dot(self.weights, self.nodes))

    def __repr__(self) -> str:
        return (
            f"SpectralDensity(dim={self.dim}, nodes={self.nodes.size}, "
            f"range=[{self.nodes.min():.4g}, {self.nodes.max():.4g}], num_matvecs={self.num_matvecs})"
        )


def spectral_density(
    op: object,
    num_probes: int = 8,
    lanczos_steps: int = 80,
    seed: int = 0,
    *,
    reorthogonalize: bool = True,
    basis_device: torch.device | str | None = None,
    progress: bool | None = None,
    blocks: BlockSpec | None = None,
) -> SpectralDensity | dict[str, SpectralDensity]:
    """Eigenvalue density of a symmetric operator by stochastic Lanczos quadrature.

    All probes advance together: each Lanczos step is one ``op.matmat`` of
    ``num_probes`` columns, running an independent Lanczos recurrence per probe.

    Parameters
    ----------
    op
        A curvature operator (``matmat``, ``dim``, ``dtype``, ``device``).
    num_probes
        Number of Rademacher probes (normalised to unit length), at least 1.
    lanczos_steps
        Lanczos steps per probe, at least 1; capped at ``op.dim``. A probe whose
        recurrence reaches an invariant subspace (``beta <= sqrt(eps) * ||H||``)
        stops there; its column is still multiplied (as zeros) and counted.
    seed
        Seed of the probes.
    reorthogonalize
        Fully reorthogonalise each probe's new Lanczos vector against its own
        basis (classical Gram-Schmidt twice). Without it, lost orthogonality
        produces spurious copies ("ghosts") of converged nodes, which shift weight.
        It stores every basis vector: ``num_probes * steps * dim`` numbers of
        ``op.dtype`` on ``basis_device`` (e.g. 8 x 80 x 1M float32 = 2.6 GB).
    basis_device
        Where the reorthogonalisation basis lives; ``"cpu"`` spares GPU memory at the
        cost of moving one block per step. Default: ``op.device``.
    progress
        Show a progress bar over the steps; ``None`` shows it on a terminal only.
    blocks
        Densities of diagonal blocks of ``op`` instead: ``"module"``, ``"layer"``,
        ``{name: [parameter-name glob, ...]}`` or a callable ``param_name -> block
        name`` (see :mod:`dyndiag.curvature.partition`). Each block runs its own
        ``num_probes`` probes (the same ``seed``) and all advance together: a step
        is one product call of ``num_probes`` columns per running block.

    Returns
    -------
    SpectralDensity
        ``nodes`` and ``weights`` (``num_probes * steps`` at most, weights summing
        to 1), ``num_matvecs = num_probes * steps`` and ``dim``. With ``blocks``:
        ``{block: SpectralDensity}`` in block order, each with its block's ``dim``
        and columns; ``op.num_matvecs`` grows by their sum.
    """
    _, dtype, device = check_operator(op)
    num_probes = check_count(num_probes, "num_probes")
    lanczos_steps = check_count(lanczos_steps, "lanczos_steps")
    basis_device = device if basis_device is None else torch.device(basis_device)
    settings = (num_probes, lanczos_steps, seed, reorthogonalize, dtype, device, basis_device)
    if blocks is None:
        return drive(op, _slq(op, *settings, progress=progress))
    parts = resolve_blocks(op, blocks)
    desc = None if progress is False else "block spectral densities"
    return drive_blocks(op, parts, lambda b: _slq(b, *settings, progress=False), progress=desc)


def _slq(
    space: object,
    num_probes: int,
    lanczos_steps: int,
    seed: int,
    reorthogonalize: bool,
    dtype: torch.dtype,
    device: torch.device,
    basis_device: torch.device,
    progress: bool | None,
) -> Estimator:
    """:func:`spectral_density` on the vectors of ``space`` (the operator, or one of
    its diagonal blocks), as an :data:`~.lockstep.Estimator`."""
    shards, dim = shards_of(space), full_dim(space)  # a sharded operator holds op.dim of the dim rows
    steps = min(lanczos_steps, dim)
    gen = make_generator(seed)
    threshold = math.sqrt(torch.finfo(dtype).eps)

    # Probes are rows: (num_probes, dim); per-probe scalars are (num_probes,) vectors.
    v = rademacher(gen, dim, num_probes, dtype, device, shards=shards).T.contiguous() / math.sqrt(dim)
    v_prev = torch.zeros_like(v)
    beta_prev = torch.zeros(num_probes, dtype=dtype, device=device)
    alpha = torch.zeros(num_probes, steps, dtype=torch.float64)
    beta = torch.zeros(num_probes, steps, dtype=torch.float64)
    basis = torch.empty(num_probes, steps, space.dim, dtype=dtype, device=basis_device) if reorthogonalize else None
    length = torch.full((num_probes,), steps)
    active = torch.ones(num_probes, dtype=torch.bool, device=device)
    scale = torch.zeros(num_probes, dtype=dtype, device=device)
    spent = 0

    for i in tqdm(range(steps), desc="spectral density", disable=None if progress is None else not progress):
        w = (yield v.T).T
        spent += num_probes
        a = reduce(space, (w * v).sum(1))
        w = w - a[:, None] * v - beta_prev[:, None] * v_prev
        if basis is not None:
            basis[:, i] = v.to(basis_device)
            Bi = basis[:, : i + 1]
            w = w.to(basis_device)
            for _ in range(2):
                # Row vectors times the basis: the same products as Bi w and Bi^T c, in the
                # orientation CPU bmm runs fast (see docs/decisions.md).
                coef = reduce(space, torch.bmm(w.unsqueeze(1), Bi.transpose(1, 2)))  # (P, 1, i + 1)
                w = w - torch.bmm(coef, Bi).squeeze(1)
            w = w.to(device)
        b = column_norms(space, w, dim=1)
        alpha[:, i], beta[:, i] = a.cpu().double(), b.cpu().double()
        scale = torch.maximum(scale, torch.maximum(a.abs(), b))
        # A probe whose Krylov space is (numerically) invariant has its full
        # quadrature already; later steps would only add noise for it.
        done = active & (b <= threshold * scale)
        length[done.cpu()] = i + 1
        active &= ~done
        v_prev, v = v, torch.where(active[:, None], w / b.clamp_min(torch.finfo(dtype).tiny)[:, None], 0.0)
        beta_prev = torch.where(active, b, 0.0)

    nodes, weights = [], []
    for j in range(num_probes):
        n = int(length[j])
        theta, S = scipy.linalg.eigh_tridiagonal(alpha[j, :n].numpy(), beta[j, : n - 1].numpy())
        nodes.append(theta)
        weights.append(S[0] ** 2)
    w_all = np.concatenate(weights)
    return SpectralDensity(
        nodes=np.concatenate(nodes),
        weights=w_all / w_all.sum(),
        num_matvecs=spent,
        dim=dim,
    )
