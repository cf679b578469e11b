"""Every operator and backend against exact float64 references on the shared cases."""

from __future__ import annotations

import warnings

import pytest
import torch

import dyndiag as dd
from curvature_cases import CASES, build
from exact import exact_ggn, exact_hessian

OPERATORS = {"hessian": (dd.HessianOperator, exact_hessian), "ggn": (dd.GGNOperator, exact_ggn)}


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


@pytest.mark.parametrize("kind", list(OPERATORS))
@pytest.mark.parametrize("name", CASES)
def test_products_match_exact_reference(name, kind):
    cls, exact = OPERATORS[kind]
    case = build(name)
    M = exact(case.model, case.loss_fn, case.batches, param_names=case.param_names)
    assert (M - M.T).abs().max() <= 1e-12 * M.abs().max()
    V = torch.randn(M.shape[0], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no backend may fall back (MSE runs on vmap too)
        for backend in ("vmap", "loop", "auto"):
            op = cls(case.model, case.loss_fn, case.data, params=case.params, backend=backend)
            assert op.shape == M.shape
            assert rel(op.matmat(V), M @ V) < 1e-12, backend
            assert rel(op.matvec(V[:, 0]), M @ V[:, 0]) < 1e-12, backend
            if name.startswith("unused"):  # exact zeros in the rows and columns of the idle layer
                idle = sum(p.numel() for n, p in case.model.named_parameters() if n.startswith("unused"))
                assert torch.count_nonzero(op.matmat(V)[-idle:]) == 0
                E = torch.zeros_like(V)
                E[-idle:] = V[-idle:]
                assert torch.count_nonzero(op.matmat(E)) == 0 and torch.count_nonzero(op.matvec(E[:, 0])) == 0
