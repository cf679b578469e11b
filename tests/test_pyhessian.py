"""Cross-check against PyHessian, the reference implementation users know."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import dyndiag as dd
from models import classification_data

pyhessian = pytest.importorskip("pyhessian")


@pytest.fixture()
def setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 4))  # float32: PyHessian draws float32 vectors
    x, y = classification_data(n=64)
    return model, (x.float(), y)


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")  # inside PyHessian
def test_top_eigenvalue_and_trace_agree_with_pyhessian(setup):
    model, batch = setup
    loss_fn = nn.CrossEntropyLoss()
    op = dd.HessianOperator(model, loss_fn, batch)
    exact = torch.linalg.eigvalsh(op.to_dense().double())

    torch.manual_seed(1)  # PyHessian draws from the global RNG
    ref = pyhessian.hessian(copy.deepcopy(model), loss_fn, data=batch, cuda=False)  # it calls .eval() and .backward()
    ph_top, _ = ref.eigenvalues(maxIter=2000, tol=1e-7, top_n=1)
    ph_trace = ref.trace(maxIter=400, tol=1e-9)

    ours = dd.eigenvalues(op, k=1, tol=1e-6).values[0].item()
    assert abs(ours - exact[-1].item()) <= 1e-4 * exact[-1].item()
    assert abs(ours - ph_top[0]) <= 2e-3 * abs(ours)

    tr = dd.trace(op, num_matvecs=300, method="hutchinson", seed=0)
    ph_mean, ph_se = np.mean(ph_trace), np.std(ph_trace, ddof=1) / np.sqrt(len(ph_trace))
    # Both unbiased estimates of the same exact trace.
    assert abs(tr.value - exact.sum().item()) <= 4 * tr.stderr
    assert abs(ph_mean - exact.sum().item()) <= 4 * ph_se
