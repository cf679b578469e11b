"""hvp="finite_difference": central differences of gradients against the exact Hessian."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import dyndiag as dd
from exact import exact_hessian
from lm_models import tiny_gpt, token_batch
from models import batchnorm_mlp, classification_data, layernorm_mlp, tanh_mlp

CE = nn.CrossEntropyLoss()

# The accuracy documented in dyndiag.curvature.finite_difference (largest relative
# error of a column of H V over these models: 3e-10 in float64, 2e-4 in float32).
TOL = {torch.float64: 1e-8, torch.float32: 2e-3}


def _columns(dim, k=3, seed=1):
    return torch.randn(dim, k, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("make", [tanh_mlp, layernorm_mlp, batchnorm_mlp], ids=["tanh", "layernorm", "batchnorm"])
def test_products_match_the_exact_hessian_within_the_documented_accuracy(make, dtype):
    x, y = classification_data()
    model = make()
    batches = [(x[:10], y[:10]), (x[10:], y[10:])]  # unequal batches: sample-weighted mean
    H = exact_hessian(model, CE, batches)
    V = _columns(H.shape[0])
    low = copy.deepcopy(model).to(dtype)
    op = dd.HessianOperator(low, CE, [(xb.to(dtype), yb) for xb, yb in batches], hvp="finite_difference")
    got = op.matmat(V.to(dtype)).double()
    err = ((got - H @ V).norm(dim=0) / (H @ V).norm(dim=0)).max().item()
    assert err <= TOL[dtype], err
    assert op.num_matvecs == 3
    one = op.matvec(V[:, 0].to(dtype)).double()
    assert torch.allclose(one, got[:, 0], rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-5)


def test_training_state_is_restored_bitwise():
    x, y = classification_data()
    model = batchnorm_mlp(train=True)
    CE(model(x), y).backward()  # existing gradients the product must leave alone
    grads = [p.grad for p in model.parameters()]
    values = [p.grad.clone() for p in model.parameters()]
    params = [p.detach().clone() for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    model[0].bias.requires_grad_(False)
    rng = torch.get_rng_state()
    op = dd.HessianOperator(model, CE, (x, y), hvp="finite_difference")
    op.matvec(torch.ones(op.dim, dtype=torch.float64))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert all(p.grad is g and torch.equal(g, v) for p, g, v in zip(model.parameters(), grads, values))
    assert all(torch.equal(b, c) for b, c in zip(model.buffers(), buffers))
    assert not model[0].bias.requires_grad and model.training and model[1].training
    assert torch.equal(torch.get_rng_state(), rng)


def test_sum_reduction_and_a_params_subset():
    x, y = classification_data()
    model = tanh_mlp()
    summed = nn.CrossEntropyLoss(reduction="sum")
    names = ["2.weight", "2.bias"]
    batches = [(x[:7], y[:7]), (x[7:], y[7:])]
    H = exact_hessian(model, summed, batches, param_names=names)
    params = [dict(model.named_parameters())[n] for n in names]
    op = dd.HessianOperator(model, summed, batches, params=params, hvp="finite_difference")
    v = _columns(op.dim, 1)[:, 0]
    assert (op.matvec(v) - H @ v).norm() <= TOL[torch.float64] * (H @ v).norm()


def test_attention_model_with_a_closure_matches_double_backward():
    model = tiny_gpt()
    batch = token_batch()
    loss = dd.data.CausalLMLoss()

    def closure(m, b):
        return loss(m(b["input_ids"]), b["labels"])

    exact = dd.HessianOperator(model, data=batch, closure=closure)
    fd = dd.HessianOperator(model, data=batch, closure=closure, hvp="finite_difference")
    v = _columns(exact.dim, 1, seed=2)[:, 0]
    want = exact.matvec(v)
    assert (fd.matvec(v) - want).norm() <= 1e-7 * want.norm()


def test_eigenvalues_by_finite_differences():
    x, y = classification_data()
    model = tanh_mlp()
    H = exact_hessian(model, CE, [(x, y)])
    top = dd.eigenvalues(dd.HessianOperator(model, CE, (x, y), hvp="finite_difference"), k=2, tol=1e-8)
    want = torch.linalg.eigvalsh(H).flip(0)[:2]
    assert torch.allclose(top.values, want, rtol=1e-7)


def test_bad_arguments():
    x, y = classification_data()
    with pytest.raises(ValueError, match="hvp"):
        dd.HessianOperator(tanh_mlp(), CE, (x, y), hvp="forward")
    with pytest.raises(ValueError, match="compute_dtype"):
        dd.HessianOperator(tanh_mlp(), CE, (x, y), hvp="finite_difference", compute_dtype=torch.float32)
    # "auto" is exact on a model that is not FSDP-sharded, whatever its dtype.
    assert dd.HessianOperator(tanh_mlp(), CE, (x, y)).hvp == "exact"
    assert dd.HessianOperator(tanh_mlp(), CE, (x, y), compute_dtype=torch.float32).hvp == "exact"


def test_per_block_eigenvalues_by_finite_differences_match_the_exact_blocks():
    x, y = classification_data()
    exact = dd.eigenvalues(dd.HessianOperator(tanh_mlp(), CE, (x, y)), k=2, blocks="module")
    fd = dd.eigenvalues(dd.HessianOperator(tanh_mlp(), CE, (x, y), hvp="finite_difference"), k=2, blocks="module")
    assert list(fd) == list(exact) == ["0", "2"]
    for name in exact:
        torch.testing.assert_close(fd[name].values, exact[name].values, rtol=1e-7, atol=1e-9)
