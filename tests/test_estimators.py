"""Tests of the curvature estimators (eigenvalues, trace, diagonal, spectral density).

Every operator is a ``MatrixOperator`` on a dense float64 matrix with a known
spectrum, ``Q diag(lam) Q^T`` with a seeded random orthogonal ``Q``.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import scipy.stats
import torch

from dyndiag.curvature.base import MatrixOperator
from dyndiag.curvature.density import SpectralDensity, spectral_density
from dyndiag.curvature.lanczos import eigenvalues
from dyndiag.curvature.results import EigenResult, TraceResult
from dyndiag.curvature.hutchinson import diagonal, trace




def with_spectrum(lam, seed: int = 0) -> torch.Tensor:
    """Symmetric float64 matrix ``Q diag(lam) Q^T`` with a seeded random orthogonal ``Q``."""
    lam = torch.as_tensor(lam, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(lam), len(lam), generator=g, dtype=torch.float64))
    A = (Q * lam) @ Q.T
    return (A + A.T) / 2


def uniform(n: int, lo: float, hi: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)


# Outliers on both sides of a bulk in [-3, 3]; magnitudes all distinct.
INDEFINITE = torch.cat(
    [torch.tensor([40.0, 30.0, 25.0, 20.0, 16.0, -35.0, -28.0, -22.0, -17.0, -14.0]), uniform(190, -3, 3, 1)]
)


def exact(A: torch.Tensor, which: str, k: int) -> torch.Tensor:
    lam = torch.linalg.eigvalsh(A)
    order = {"LA": torch.argsort(-lam), "SA": torch.argsort(lam), "LM": torch.argsort(-lam.abs())}[which]
    return lam[order[:k]]


# -- eigenvalues ----------------------------------------------------------------


@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
@pytest.mark.parametrize("k", [1, 5])
def test_eigenvalues_match_eigvalsh(which, k):
    A = with_spectrum(INDEFINITE)
    res = eigenvalues(MatrixOperator(A), k=k, which=which, tol=1e-8)
    want = exact(A, which, k)
    assert isinstance(res, EigenResult) and res.converged
    assert res.values.shape == (k,) and res.values.dtype == torch.float64 and res.values.device.type == "cpu"
    torch.testing.assert_close(res.values, want, rtol=1e-6, atol=0)
    assert res.vectors is None
    assert res.error_bounds.shape == (k,) and bool((res.error_bounds >= 0).all())


def test_lm_picks_by_magnitude_and_sorts_by_it():
    res = eigenvalues(MatrixOperator(with_spectrum(INDEFINITE)), k=4, which="LM", tol=1e-8)
    torch.testing.assert_close(res.values, torch.tensor([40.0, -35.0, 30.0, -28.0], dtype=torch.float64))


def test_block_sizes_agree():
    A = with_spectrum(INDEFINITE)
    one = eigenvalues(MatrixOperator(A), k=5, tol=1e-10, block_size=1)
    four = eigenvalues(MatrixOperator(A), k=5, tol=1e-10, block_size=4)
    assert one.converged and four.converged
    torch.testing.assert_close(one.values, four.values, rtol=1e-8, atol=0)


def test_clustered_eigenvalues():
    lam = torch.cat([torch.tensor([10.0, 10.0 - 1e-3, 10.0 - 2e-3, 9.0]), uniform(196, 0, 5, 3)])
    A = with_spectrum(lam)
    for b in (1, 4):
        res = eigenvalues(MatrixOperator(A), k=3, tol=1e-8, block_size=b)
        assert res.converged
        torch.testing.assert_close(res.values, exact(A, "LA", 3), rtol=1e-8, atol=0)


def test_repeated_eigenvalue_found_with_a_block():
    lam = torch.cat([torch.tensor([10.0, 10.0, 10.0, 9.0]), uniform(196, 0, 5, 4)])
    A = with_spectrum(lam)
    res = eigenvalues(MatrixOperator(A), k=4, tol=1e-8, block_size=4)
    assert res.converged
    torch.testing.assert_close(res.values, torch.tensor([10.0, 10.0, 10.0, 9.0], dtype=torch.float64))


def test_zero_eigenspace_smallest_in_absolute_terms():
    # A 50-fold zero eigenvalue: judged against ||H|| (there is no relative accuracy
    # to have), found three times by a block of 4.
    lam = torch.cat([torch.zeros(50), uniform(150, 0.5, 10.0, 5)])
    A = with_spectrum(lam)
    res = eigenvalues(MatrixOperator(A), k=3, which="SA", block_size=4)
    assert res.converged
    norm = float(torch.linalg.matrix_norm(A, ord=2))
    assert float(res.values.abs().max()) <= 1e-6 * norm


def test_thick_restart_converges():
    A = with_spectrum(INDEFINITE)
    op = MatrixOperator(A)
    for which in ("LA", "SA", "LM"):
        res = eigenvalues(op, k=3, which=which, tol=1e-8, max_basis=12)
        assert res.converged
        assert res.num_matvecs > 12  # the 12-column basis must have been restarted
        torch.testing.assert_close(res.values, exact(A, which, 3), rtol=1e-6, atol=0)
    blocked = eigenvalues(op, k=3, tol=1e-8, block_size=3, max_basis=12)
    assert blocked.converged
    torch.testing.assert_close(blocked.values, exact(A, "LA", 3), rtol=1e-6, atol=0)


def test_max_basis_too_small():
    with pytest.raises(ValueError, match="max_basis"):
        eigenvalues(MatrixOperator(with_spectrum(INDEFINITE)), k=5, block_size=4, max_basis=8)


def test_return_vectors_are_unit_eigenvectors():
    A = with_spectrum(INDEFINITE)
    res = eigenvalues(MatrixOperator(A), k=5, which="LM", tol=1e-10, return_vectors=True)
    X = res.vectors
    assert X is not None and X.shape == (200, 5) and X.dtype == torch.float64
    torch.testing.assert_close(torch.linalg.vector_norm(X, dim=0), torch.ones(5, dtype=torch.float64))
    torch.testing.assert_close(X.T @ X, torch.eye(5, dtype=torch.float64), atol=1e-8, rtol=0)
    # The values converge like residual^2 / gap, the vectors like residual / gap.
    residual = torch.linalg.vector_norm(A @ X - X * res.values, dim=0)
    assert float(residual.max()) <= 1e-4 * 40.0
    torch.testing.assert_close(torch.einsum("ik,ij,jk->k", X, A, X), res.values, rtol=1e-9, atol=0)


def test_num_matvecs_counts_every_product():
    op = MatrixOperator(with_spectrum(INDEFINITE))
    for kwargs in ({}, {"k": 3, "block_size": 4}, {"k": 3, "max_basis": 12}):
        before = op.num_matvecs
        res = eigenvalues(op, **kwargs)
        assert res.num_matvecs == op.num_matvecs - before > 0


def test_max_matvecs_respected():
    op = MatrixOperator(with_spectrum(INDEFINITE))
    res = eigenvalues(op, k=3, tol=1e-12, max_matvecs=7)
    assert res.num_matvecs == 7 and not res.converged
    assert res.values.shape == (3,) and bool(torch.isfinite(res.error_bounds).all())
    # A block is cut short so that the budget is spent exactly.
    before = op.num_matvecs
    res = eigenvalues(op, k=3, tol=1e-12, max_matvecs=10, block_size=4)
    assert res.num_matvecs == op.num_matvecs - before == 10 and not res.converged


def test_reproducible_for_a_seed():
    A = with_spectrum(INDEFINITE)
    a = eigenvalues(MatrixOperator(A), k=3, tol=1e-3, seed=7, return_vectors=True)
    b = eigenvalues(MatrixOperator(A), k=3, tol=1e-3, seed=7, return_vectors=True, basis_device="cpu")
    c = eigenvalues(MatrixOperator(A), k=3, tol=1e-3, seed=8)
    assert torch.equal(a.values, b.values) and torch.equal(a.vectors, b.vectors)
    assert a.num_matvecs == b.num_matvecs
    assert not torch.equal(a.values, c.values)  # a different start vector


def test_float32_operator():
    A = with_spectrum(INDEFINITE)
    res = eigenvalues(MatrixOperator(A.float()), k=5, tol=1e-4, return_vectors=True)
    assert res.converged and res.values.dtype == torch.float32 and res.vectors.dtype == torch.float32
    torch.testing.assert_close(res.values.double(), exact(A, "LA", 5), rtol=1e-4, atol=0)


@pytest.mark.parametrize("block_size", [1, 4])
def test_small_dim_fills_the_space(block_size):
    lam = torch.tensor([3.0, 1.0, -2.0, 0.5, 7.0, -4.0])
    A = with_spectrum(lam)
    op = MatrixOperator(A)
    for which in ("LA", "SA", "LM"):
        res = eigenvalues(op, k=5, which=which, block_size=block_size)
        assert res.converged and res.num_matvecs <= 6
        torch.testing.assert_close(res.values, exact(A, which, 5), rtol=0, atol=1e-12)


def test_few_matvecs_on_outliers_plus_bulk():
    # Five outliers over a bulk, the shape of an early-training Hessian: Lanczos
    # with full reorthogonalisation and the residual^2/gap bound stops early.
    lam = torch.cat([torch.tensor([10.0, 8.0, 6.5, 5.0, 4.0]), uniform(395, 0, 2, 1)])
    A = with_spectrum(lam)
    res = eigenvalues(MatrixOperator(A), k=5, tol=1e-4)
    want = exact(A, "LA", 5)
    assert res.converged
    assert float(((res.values - want).abs() / want).max()) <= 1e-4
    assert res.num_matvecs <= 25


class SpyOperator(MatrixOperator):
    """Records how many columns each product call received (0 = a matvec)."""

    def __init__(self, A):
        super().__init__(A)
        self.calls = []

    def _matvec(self, v):
        self.calls.append(0)
        return self.A @ v

    def _matmat(self, V):
        self.calls.append(V.shape[1])
        return super()._matmat(V)


def test_single_vectors_go_through_matvec():
    # Real operators multiply one vector by a cheaper path (double backward).
    A = with_spectrum(INDEFINITE)
    op = SpyOperator(A)
    eigenvalues(op, k=2)
    assert set(op.calls) == {0}
    op = SpyOperator(A)
    res = eigenvalues(op, k=2, block_size=4, max_matvecs=10)
    assert op.calls == [4, 4, 2] and res.num_matvecs == 10
    op = SpyOperator(A)
    trace(op, 100, block_size=40)  # 33 sketch columns, then 67 = 40 + 27
    assert op.calls == [33, 40, 27]


def test_zero_operator():
    res = eigenvalues(MatrixOperator(torch.zeros(10, 10, dtype=torch.float64)), k=2)
    assert res.converged and torch.equal(res.values, torch.zeros(2, dtype=torch.float64))


# -- trace and diagonal ---------------------------------------------------------


def low_rank_plus_noise(n: int = 300) -> torch.Tensor:
    """Ten dominant outliers over a small positive bulk."""
    lam = torch.cat([torch.tensor([100.0, 80, 60, 50, 40, 30, 25, 20, 15, 10]), uniform(n - 10, 0, 0.5, 2)])
    return with_spectrum(lam, seed=1)


def test_hutchinson_is_unbiased():
    A = with_spectrum(uniform(200, 0, 2, 6), seed=2)
    values = np.array([trace(MatrixOperator(A), 20, "hutchinson", seed=s).value for s in range(30)])
    se = values.std(ddof=1) / math.sqrt(len(values))
    assert abs(values.mean() - float(A.trace())) <= 3 * se


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
@pytest.mark.parametrize("budget", [1, 2, 3, 10, 100, 101])
def test_trace_spends_exactly_the_budget(method, budget):
    op = MatrixOperator(low_rank_plus_noise())
    res = trace(op, num_matvecs=budget, method=method)
    assert isinstance(res, TraceResult)
    assert res.num_matvecs == op.num_matvecs == budget
    assert math.isfinite(res.value)


def test_hutchpp_beats_hutchinson_on_outliers():
    A = low_rank_plus_noise()
    exact_trace = float(A.trace())
    op = MatrixOperator(A)
    errors = {
        m: np.mean([abs(trace(op, 100, m, seed=s).value - exact_trace) for s in range(20)])
        for m in ("hutchinson", "hutch++")
    }
    assert errors["hutch++"] <= 0.5 * errors["hutchinson"]


def test_hutchpp_exact_when_rank_fits_the_sketch():
    # Rank 5 < floor(30/3): the sketch captures the whole range, nothing is left random.
    A = with_spectrum(torch.cat([torch.tensor([5.0, 4, 3, 2, 1]), torch.zeros(95)]))
    res = trace(MatrixOperator(A), 30)
    assert res.value == pytest.approx(15.0, rel=1e-10)


def test_hutchpp_on_a_tiny_operator_spends_the_budget_and_is_exact():
    # floor(100/3) = 33 > dim: the sketch is capped at dim and spans everything.
    A = with_spectrum(uniform(8, -1, 3, 10))
    op = MatrixOperator(A)
    res = trace(op, 100)
    assert res.num_matvecs == op.num_matvecs == 100
    assert res.value == pytest.approx(float(A.trace()), rel=1e-10)


def test_trace_stderr():
    op = MatrixOperator(low_rank_plus_noise())
    assert math.isnan(trace(op, 1, "hutchinson").stderr)
    assert math.isnan(trace(op, 3, "hutch++").stderr)  # one sketch, one projection, one sample
    assert math.isfinite(trace(op, 2, "hutch++").stderr)  # B < 3: plain Hutchinson
    res = trace(op, 50, "hutchinson")
    assert 0 < res.stderr < abs(res.value)


def test_trace_does_not_depend_on_block_size():
    op = MatrixOperator(low_rank_plus_noise())
    for method in ("hutchinson", "hutch++"):
        a = trace(op, 50, method, seed=3)
        b = trace(op, 50, method, seed=3, block_size=7)
        assert b.value == pytest.approx(a.value, rel=1e-12)
        assert b.stderr == pytest.approx(a.stderr, rel=1e-9)


def test_diagonal_exact_for_diagonal_matrix():
    d = uniform(50, -3, 3, 7)
    op = MatrixOperator(torch.diag(d))
    est = diagonal(op, num_matvecs=3)
    assert op.num_matvecs == 3
    torch.testing.assert_close(est, d, rtol=0, atol=1e-14)


def test_diagonal_of_diagonally_dominant_matrix():
    n, N = 100, 400
    g = torch.Generator().manual_seed(8)
    E = 0.01 * torch.randn(n, n, generator=g, dtype=torch.float64)
    A = torch.diag(uniform(n, 1, 10, 9)) + (E + E.T)
    est = diagonal(MatrixOperator(A), num_matvecs=N, block_size=64)
    assert est.shape == (n,) and est.dtype == torch.float64
    # Entry i has variance sum_{j != i} A_ij^2 / N.
    off = A - torch.diag(torch.diagonal(A))
    sd = torch.linalg.vector_norm(off, dim=1) / math.sqrt(N)
    assert bool(((est - torch.diagonal(A)).abs() <= 5 * sd).all())


# -- spectral density -----------------------------------------------------------


def test_spectral_density_against_exact_spectrum():
    A = low_rank_plus_noise()
    lam = torch.linalg.eigvalsh(A).numpy()
    op = MatrixOperator(A)
    d = spectral_density(op, num_probes=8, lanczos_steps=60)
    assert isinstance(d, SpectralDensity) and d.dim == 300
    assert d.num_matvecs == op.num_matvecs == 8 * 60
    assert d.nodes.shape == d.weights.shape == (8 * 60,)
    assert d.weights.sum() == pytest.approx(1.0, abs=1e-12) and bool((d.weights >= 0).all())
    spread = lam.max() - lam.min()
    assert scipy.stats.wasserstein_distance(d.nodes, lam, u_weights=d.weights) < 0.02 * spread
    grid = np.linspace(lam.min() - 0.2 * spread, lam.max() + 0.2 * spread, 40001)
    assert np.trapezoid(d.pdf(grid), grid) == pytest.approx(1.0, abs=1e-3)
    assert np.trapezoid(d.pdf(grid, bandwidth=5.0), grid) == pytest.approx(1.0, abs=1e-3)
    # The SLQ trace is Hutchinson's estimate with the same (normalised) probes.
    assert d.trace == pytest.approx(trace(op, 8, "hutchinson").value, rel=1e-10)
    hutchinson_var = 2 * float((A**2).sum() - (torch.diagonal(A) ** 2).sum())  # Rademacher probes
    assert abs(d.trace - float(A.trace())) <= 4 * math.sqrt(hutchinson_var / 8)
    assert "SpectralDensity(dim=300" in repr(d)


def test_spectral_density_without_reorthogonalisation():
    A = low_rank_plus_noise()
    lam = torch.linalg.eigvalsh(A).numpy()
    d = spectral_density(MatrixOperator(A), num_probes=4, lanczos_steps=30, reorthogonalize=False)
    assert d.weights.sum() == pytest.approx(1.0, abs=1e-12)
    w1 = scipy.stats.wasserstein_distance(d.nodes, lam, u_weights=d.weights)
    assert w1 < 0.05 * (lam.max() - lam.min())


def test_spectral_density_exact_on_small_diagonal():
    # Krylov spaces of dimension 4 < 6 steps: each probe stops at its invariant
    # subspace, the nodes are the distinct eigenvalues and the weights
    # multiplicity / dim exactly (|v_i|^2 = 1/dim for a unit Rademacher probe).
    op = MatrixOperator(torch.diag(torch.tensor([1.0, 2.0, 3.0, 3.0, 3.0, 5.0], dtype=torch.float64)))
    d = spectral_density(op, num_probes=3, lanczos_steps=80)
    assert d.num_matvecs == op.num_matvecs == 3 * 6
    for node, mass in [(1.0, 1 / 6), (2.0, 1 / 6), (3.0, 3 / 6), (5.0, 1 / 6)]:
        near = np.abs(d.nodes - node) < 1e-8
        assert d.weights[near].sum() == pytest.approx(mass, abs=1e-10)
    assert d.trace == pytest.approx(17.0, rel=1e-12)


def test_pdf_default_bandwidth_and_single_node():
    d = SpectralDensity(nodes=np.array([2.0, 2.0]), weights=np.array([0.5, 0.5]), num_matvecs=2, dim=4)
    assert d.default_bandwidth == pytest.approx(2e-3)
    grid = np.linspace(1.9, 2.1, 20001)
    assert np.trapezoid(d.pdf(grid), grid) == pytest.approx(1.0, abs=1e-6)
    assert d.pdf(np.array([2.0]))[0] == pytest.approx(1 / (2e-3 * math.sqrt(2 * math.pi)))


# -- global state and reproducibility -------------------------------------------


ESTIMATORS = {
    "eigenvalues": lambda op: eigenvalues(op, k=2, block_size=2).values,
    "trace": lambda op: torch.tensor(trace(op, 20).value),
    "hutchinson": lambda op: torch.tensor(trace(op, 20, "hutchinson").value),
    "diagonal": lambda op: diagonal(op, 20),
    "spectral_density": lambda op: torch.as_tensor(spectral_density(op, 4, 10).nodes),
}


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_global_rng_untouched_and_reproducible(name):
    op = MatrixOperator(low_rank_plus_noise(60))
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    states = torch.get_rng_state(), np.random.get_state(), random.getstate()
    first = ESTIMATORS[name](op)
    assert torch.equal(torch.get_rng_state(), states[0])
    np_state = np.random.get_state()
    assert np_state[0] == states[1][0] and np_state[2:] == states[1][2:]
    assert np.array_equal(np_state[1], states[1][1])
    assert random.getstate() == states[2]
    # Same seed, same result, whatever the global RNG is doing.
    torch.manual_seed(999)
    assert torch.equal(ESTIMATORS[name](op), first)


# -- bad input ------------------------------------------------------------------


def _op() -> MatrixOperator:
    return MatrixOperator(with_spectrum(uniform(8, 1, 2, 0)))


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: eigenvalues(_op(), k=8), ValueError, "k"),
        (lambda: eigenvalues(_op(), k=0), ValueError, "k"),
        (lambda: eigenvalues(_op(), k=1.5), TypeError, "k"),
        (lambda: eigenvalues(_op(), which="XX"), ValueError, "which"),
        (lambda: eigenvalues(_op(), tol=0.0), ValueError, "tol"),
        (lambda: eigenvalues(_op(), block_size=0), ValueError, "block_size"),
        (lambda: eigenvalues(_op(), k=2, max_matvecs=1), ValueError, "max_matvecs"),
        (lambda: eigenvalues(_op(), seed="a"), TypeError, "seed"),
        (lambda: eigenvalues(torch.eye(3)), TypeError, "op"),
        (lambda: trace(_op(), num_matvecs=0), ValueError, "num_matvecs"),
        (lambda: trace(_op(), method="foo"), ValueError, "method"),
        (lambda: trace(_op(), block_size=0), ValueError, "block_size"),
        (lambda: trace(np.eye(3)), TypeError, "op"),
        (lambda: diagonal(_op(), num_matvecs=0), ValueError, "num_matvecs"),
        (lambda: diagonal("op"), TypeError, "op"),
        (lambda: spectral_density(_op(), num_probes=0), ValueError, "num_probes"),
        (lambda: spectral_density(_op(), lanczos_steps=0), ValueError, "lanczos_steps"),
        (lambda: spectral_density(None), TypeError, "op"),
        (lambda: spectral_density(_op(), 2, 3).pdf(np.zeros((2, 2))), ValueError, "grid"),
        (lambda: spectral_density(_op(), 2, 3).pdf(np.zeros(3), bandwidth=0.0), ValueError, "bandwidth"),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_lanczos_basis_grows_with_use_not_to_max_basis_up_front(monkeypatch):
    dim = 3000
    lam = torch.cat([torch.tensor([100.0, 50.0]), torch.linspace(0.0, 1.0, dim - 2, dtype=torch.float64)])
    op = MatrixOperator(torch.diag(lam))
    widths = []
    real_empty = torch.empty

    def spy(*size, **kw):
        shape = size[0] if len(size) == 1 and isinstance(size[0], (tuple, list)) else size
        if len(shape) == 2 and shape[0] == dim:
            widths.append(shape[1])
        return real_empty(*size, **kw)

    monkeypatch.setattr(torch, "empty", spy)
    res = eigenvalues(op, k=1, tol=1e-8, max_basis=dim)
    monkeypatch.undo()
    assert res.converged and abs(res.values[0].item() - 100.0) < 1e-6
    assert max(widths) < 60 and max(widths) >= res.num_matvecs  # what was used, not dim columns


def test_block_products_and_one_column_svd_match_their_plain_forms():
    from dyndiag.curvature.vectors import combine, inner, thin_svd

    g = torch.Generator().manual_seed(0)
    op = MatrixOperator(torch.eye(50, dtype=torch.float64))
    basis = torch.randn(50, 12, generator=g, dtype=torch.float64)[:, :7]  # a slice of a wider basis
    W, C = torch.randn(50, 3, generator=g, dtype=torch.float64), torch.randn(7, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(inner(op, basis, W), basis.T @ W, rtol=1e-14, atol=1e-13)
    torch.testing.assert_close(inner(op, basis, W[:, 0]), basis.T @ W[:, 0], rtol=1e-14, atol=1e-13)  # a vector
    torch.testing.assert_close(combine(basis, C), basis @ C, rtol=1e-14, atol=1e-13)
    w = W[:, :1]
    U, S, Vh = thin_svd(op, w)
    U0, S0, Vh0 = torch.linalg.svd(w, full_matrices=False)
    torch.testing.assert_close(S, S0, rtol=1e-14, atol=0)
    torch.testing.assert_close(U @ Vh, U0 @ Vh0, rtol=1e-14, atol=1e-15)  # up to the sign convention
    assert thin_svd(op, torch.zeros(50, 1, dtype=torch.float64))[1].item() == 0
