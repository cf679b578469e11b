"""HessianOperator / GGNOperator against exact float64 matrices built independently."""

from __future__ import annotations


import random

import numpy as np
import pytest
import scipy.sparse.linalg
import torch
from torch import nn

import dyndiag as dd
from dyndiag.curvature import blocks, operators
from exact import exact_ggn, exact_hessian
from snapshots import assert_same, snapshot
from models import (
    KeywordModel,
    TiedFrozen,
    batchnorm_mlp,
    classification_data,
    dropout_mlp,
    image_data,
    layernorm_mlp,
    small_cnn,
    tanh_mlp,
)

CE = nn.CrossEntropyLoss()


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def cases():
    x, y = classification_data()
    xi, yi = image_data()
    return {
        "tanh_mlp": (tanh_mlp(), (x, y)),
        "cnn": (small_cnn(), (xi, yi)),
        "batchnorm_train": (batchnorm_mlp(train=True), (x, y)),
        "batchnorm_eval": (batchnorm_mlp(train=False), (x, y)),
        "layernorm": (layernorm_mlp(), (x, y)),
        "tied_frozen": (TiedFrozen(d=6), (x, y % 3)),
    }


def test_tied_parameters_counted_once_and_frozen_excluded():
    model = TiedFrozen(d=6)
    op = dd.HessianOperator(model, CE, classification_data(classes=3))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert op.dim == sum(p.numel() for p in model.parameters() if id(p) in trainable)
    assert "frozen.weight" not in op.names and "b.weight" not in op.names


def test_shuffling_loader_gives_the_same_operator_and_leaves_rng_alone():
    model = tanh_mlp()
    x, y = classification_data(n=20)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=6, shuffle=True)
    op = dd.HessianOperator(model, CE, loader)
    before = torch.get_rng_state()
    v = torch.ones(op.dim, dtype=torch.float64)
    assert rel(op.matvec(v), exact_hessian(model, CE, [(x, y)]) @ v) < 1e-10
    assert torch.equal(torch.get_rng_state(), before)


def test_dropout_is_off_and_products_are_deterministic():
    model = dropout_mlp()
    batch = classification_data()
    op = dd.HessianOperator(model, CE, batch)
    v = torch.randn(op.dim, dtype=torch.float64)
    a, b = op.matvec(v), op.matvec(v)
    assert torch.equal(a, b)
    assert rel(a, exact_hessian(model, CE, [batch]) @ v) < 1e-10
    assert model.training and model[2].training


def test_float32_matches_float64():
    model64 = tanh_mlp()
    batch = classification_data()
    H = exact_hessian(model64, CE, [batch])
    model32 = tanh_mlp().float()
    op = dd.HessianOperator(model32, CE, (batch[0].float(), batch[1]))
    assert op.dtype == torch.float32
    V = torch.randn(op.dim, 4)
    assert rel(op.matmat(V).double(), H @ V.double()) < 1e-5


def test_closure_with_dict_batches():
    model = KeywordModel()
    x, y = classification_data()
    batches = [{"features": x[:10], "labels": y[:10]}, {"features": x[10:], "labels": y[10:]}]
    op = dd.HessianOperator(model, data=batches, closure=lambda m, b: CE(m(features=b["features"]), b["labels"]))
    assert rel(op.to_dense(), exact_hessian(model.net, CE, [(x, y)])) < 1e-10


def test_to_scipy_top_eigenvalue():
    model = tanh_mlp()
    batch = classification_data()
    H = exact_hessian(model, CE, [batch])
    op = dd.HessianOperator(model, CE, batch)
    lin = op.to_scipy()
    assert isinstance(lin, scipy.sparse.linalg.LinearOperator)
    top = scipy.sparse.linalg.eigsh(lin, k=1, which="LA", tol=1e-12)[0][0]
    assert abs(top - torch.linalg.eigvalsh(H)[-1].item()) < 1e-9 * abs(top)
    assert op.num_matvecs > 0


@pytest.mark.parametrize("backend", ["vmap", "loop"])
def test_ggn_equals_hessian_for_linear_mse(backend):
    torch.manual_seed(0)
    model = nn.Linear(5, 3).double()
    x = torch.randn(12, 5, dtype=torch.float64)
    y = torch.randn(12, 3, dtype=torch.float64)
    G = dd.GGNOperator(model, nn.MSELoss(), (x, y), backend=backend).to_dense()
    assert rel(G, exact_hessian(model, nn.MSELoss(), [(x, y)])) < 1e-10


def test_ggn_differs_from_hessian_for_a_nonlinear_model():
    model, batch = cases()["tanh_mlp"]
    G = dd.GGNOperator(model, CE, batch).to_dense()
    H = dd.HessianOperator(model, CE, batch).to_dense()
    assert rel(G, H) > 1e-3


@pytest.mark.parametrize("cls", [dd.HessianOperator, dd.GGNOperator])
@pytest.mark.parametrize("backend", ["vmap", "loop"])
def test_no_side_effects_batchnorm_train_with_grads(cls, backend):
    model = nn.Sequential(batchnorm_mlp(train=True), nn.Dropout(0.3)).train()
    x, y = classification_data()
    CE(model(x), y).backward()  # live .grad that must survive untouched
    model[0][3].weight.requires_grad_(False)
    op = cls(model, CE, (x, y), backend=backend)
    V = torch.randn(op.dim, 3, dtype=torch.float64)
    before = snapshot(model)
    op.matmat(V)
    op.matvec(V[:, 0])
    assert_same(before, snapshot(model))


def test_vmap_failure_falls_back_with_one_warning():
    class NoVmap(torch.autograd.Function):  # a custom Function without vmap support
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return torch.tanh(x)

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return g * (1 - torch.tanh(x) ** 2)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 5).double(), nn.Linear(5, 4).double()

        def forward(self, x):
            return self.b(NoVmap.apply(self.a(x)))

    model = Model()
    batch = classification_data()
    op = dd.HessianOperator(model, CE, batch)  # "auto" tries vmap on the first block
    V = torch.randn(op.dim, 3, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="falling back"):
        out = op.matmat(V)
    assert op.block_backends == {3: "loop"}
    ref = dd.HessianOperator(model, CE, batch, backend="loop").matmat(V)
    assert torch.equal(out, ref)


# -- bad input -------------------------------------------------------------
def test_bad_input_errors_name_the_argument():
    model = tanh_mlp()
    batch = classification_data()
    with pytest.raises(ValueError, match="scalar"):
        dd.HessianOperator(model, nn.CrossEntropyLoss(reduction="none"), batch).matvec(torch.zeros(81, dtype=torch.float64))
    frozen = tanh_mlp()
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        dd.HessianOperator(frozen, CE, batch)
    op = dd.HessianOperator(model, CE, [])
    with pytest.raises(ValueError, match="no samples"):
        op.matvec(torch.zeros(op.dim, dtype=torch.float64))
    op = dd.HessianOperator(model, CE, batch)
    with pytest.raises(ValueError, match=r"v must have shape \(81,\)"):
        op.matvec(torch.zeros(5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"V must have shape \(81, k\)"):
        op.matmat(torch.zeros(81, dtype=torch.float64).reshape(1, 81))
    with pytest.raises(TypeError, match="dtype"):
        op.matvec(torch.zeros(81, dtype=torch.float32))
    with pytest.raises(TypeError, match="v must be a torch.Tensor"):
        op.matvec([0.0] * 81)
    with pytest.raises(ValueError, match="exactly one of loss_fn"):
        dd.HessianOperator(model, CE, batch, closure=lambda m, b: 0)
    with pytest.raises(ValueError, match="exactly one of loss_fn"):
        dd.HessianOperator(model, data=batch)
    with pytest.raises(ValueError, match="not a parameter of model"):
        dd.HessianOperator(model, CE, batch, params=[nn.Parameter(torch.zeros(3))])
    with pytest.raises(TypeError, match="model must be"):
        dd.HessianOperator(lambda x: x, CE, batch)
    with pytest.raises(ValueError, match="data must be"):
        dd.HessianOperator(model, CE, None)
    with pytest.raises(TypeError, match="data must be"):
        dd.HessianOperator(model, CE, torch.zeros(3)).matvec(torch.zeros(81, dtype=torch.float64))
    with pytest.raises(ValueError, match="max_batch_vectors"):
        dd.HessianOperator(model, CE, batch, max_batch_vectors=0)
    with pytest.raises(ValueError, match="backend"):
        dd.HessianOperator(model, CE, batch, backend="fast")
    with pytest.raises(TypeError, match="loss_fn must be a criterion"):
        dd.GGNOperator(model, None, batch)


def test_params_may_name_a_frozen_parameter():
    model = tanh_mlp()
    batch = classification_data()
    model[2].weight.requires_grad_(False)
    op = dd.HessianOperator(model, CE, batch, params=[model[2].weight])
    unfrozen = tanh_mlp()
    H = exact_hessian(unfrozen, CE, [batch], param_names=["2.weight"])
    assert rel(op.to_dense(), H) < 1e-10
    assert model[2].weight.requires_grad is False


def test_ggn_forward_for_dict_batches():
    model = tanh_mlp()
    x, y = classification_data()
    batches = [{"x": x[:10], "labels": y[:10]}, {"x": x[10:], "labels": y[10:]}]
    G = dd.GGNOperator(model, CE, batches, forward=lambda m, b: m(b["x"])).to_dense()
    assert rel(G, exact_ggn(model, CE, [(x[:10], y[:10]), (x[10:], y[10:])])) < 1e-10


# -- the gradient graph cached across products for a single batch --------------
def _count_forwards(model):
    calls = []
    model.register_forward_hook(lambda m, i, o: calls.append(1))
    return calls


def test_cached_graph_is_reused_and_matches_uncached():
    model = batchnorm_mlp(train=True)
    batch = classification_data()
    calls = _count_forwards(model)
    op = dd.HessianOperator(model, CE, batch, backend="loop")  # vmap would run its own forward
    assert op.cache_graph is True
    ref = dd.HessianOperator(model, CE, batch, cache_graph=False, backend="loop")
    V = torch.randn(op.dim, 3, dtype=torch.float64)
    first = [op.matvec(V[:, j]) for j in range(3)] + [op.matmat(V)]
    assert len(calls) == 1  # one forward for four products
    assert torch.equal(first[3], torch.stack(first[:3], 1))
    assert rel(first[3], ref.matmat(V)) < 1e-14
    op.clear_cache()
    op.matvec(V[:, 0])
    assert len(calls) == 1 + 1 + 1  # the uncached reference's forward, then a rebuild


@pytest.mark.parametrize("change", ["optimizer_step", "mode", "batch_in_place", "data_swap", "load_state_dict"])
@pytest.mark.parametrize("cls", [dd.HessianOperator, dd.GGNOperator])
def test_cached_graph_is_rebuilt_when_what_it_depends_on_changes(cls, change):
    model = batchnorm_mlp(train=True)
    x, y = classification_data()
    x = x.clone()
    ops = [cls(model, CE, (x, y), backend=backend) for backend in ("loop", "vmap")]
    V = torch.randn(ops[0].dim, 2, dtype=torch.float64)
    before = [op.matmat(V) for op in ops]
    assert all(torch.equal(op.matmat(V), b) for op, b in zip(ops, before))  # a kept graph gives the same products
    if change == "optimizer_step":
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        CE(model(x), y).backward()
        opt.step()
    elif change == "mode":
        model.eval()
    elif change == "batch_in_place":
        x.mul_(2.0)
    elif change == "data_swap":
        model[0].weight.data = model[0].weight.data * 1.5
    else:
        sd = {k: v * 1.1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
        model.load_state_dict(sd)
    fresh = cls(model, CE, (x, y), cache_graph=False, backend="loop").matmat(V)
    for op, b in zip(ops, before):
        after = op.matmat(V)
        assert rel(after, fresh) < 1e-12
        assert rel(after, b) > 1e-6  # the change mattered, so reuse would have been caught


def test_cache_graph_needs_a_single_batch():
    model = tanh_mlp()
    x, y = classification_data()
    assert dd.HessianOperator(model, CE, [(x[:5], y[:5]), (x[5:], y[5:])]).cache_graph is False
    with pytest.raises(ValueError, match="cache_graph=True needs data to be a single batch"):
        dd.HessianOperator(model, CE, [(x[:5], y[:5]), (x[5:], y[5:])], cache_graph=True)
    assert dd.HessianOperator(model, CE, [(x, y)], cache_data=True).cache_graph is True


@pytest.mark.parametrize("name", ["tanh_mlp", "cnn", "batchnorm_train", "batchnorm_eval", "layernorm", "tied_frozen"])
def test_eigenvalues_of_model_hessians_match_exact(name):
    model, batch = cases()[name]
    exact = torch.linalg.eigvalsh(exact_hessian(model, CE, [batch]))
    norm = exact.abs().max()
    op = dd.HessianOperator(model, CE, batch)
    for which, want in (("LA", exact.flip(0)[:3]), ("SA", exact[:3]), ("LM", exact[exact.abs().argsort(descending=True)][:3])):
        res = dd.eigenvalues(op, k=3, which=which, tol=1e-10, block_size=2)
        assert res.converged, which
        # Near-zero eigenvalues are judged against ||H|| (design.md's tol rule).
        assert (res.values - want).abs().max() <= 1e-6 * norm, (which, res.values, want)


def test_operator_at_other_parameter_values_leaves_the_model_alone():
    model = tanh_mlp()
    batch = classification_data()
    other = tanh_mlp(seed=5)
    at = [p.detach().clone() for p in other.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    for cls in (dd.HessianOperator, dd.GGNOperator):
        op = cls(model, CE, batch, at=at)
        ref = cls(other, CE, batch)
        assert rel(op.to_dense(), ref.to_dense()) < 1e-12
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    with pytest.raises(ValueError, match="at must hold one tensor per parameter"):
        dd.HessianOperator(model, CE, batch, at=at[:2])


def test_loss_is_the_mean_over_batches_evaluated_like_products():
    model = nn.Sequential(batchnorm_mlp(train=True), nn.Dropout(0.5))
    x, y = classification_data(n=15)
    batches = [(x[:7], y[:7]), (x[7:], y[7:])]
    buffers = [b.clone() for b in model.buffers()]
    op = dd.HessianOperator(model, CE, batches)
    ref = nn.Sequential(model[0])  # dropout off, BatchNorm in train mode
    expected = (7 * CE(ref(x[:7]), y[:7]) + 8 * CE(ref(x[7:]), y[7:])).item() / 15
    for b, saved in zip(model.buffers(), buffers):
        b.copy_(saved)  # the reference forward above moved the running statistics
    assert abs(op.loss() - expected) < 1e-12
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    assert model.training and model[1].training


def _norm_mlp(dtype):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cls", [dd.HessianOperator, dd.GGNOperator])
def test_half_precision_models_get_float32_products_of_their_rounded_weights(half, cls):
    model = _norm_mlp(half)
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(1)).to(half)
    y = torch.randint(0, 3, (32,), generator=torch.Generator().manual_seed(2))
    ref = _norm_mlp(torch.float32)
    before = snapshot(model)
    op = cls(model, nn.CrossEntropyLoss(), (x, y))
    assert op.dtype == torch.float32 and op.param_dtype == half
    ref.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    ref_op = cls(ref, nn.CrossEntropyLoss(), (x.float(), y))
    assert torch.equal(op.to_dense(), ref_op.to_dense())  # the same float32 arithmetic
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(3)).to(half)  # a half-precision gradient or update goes in exactly
    assert torch.equal(op @ v, ref_op @ v.float())
    assert_same(before, snapshot(model))
    assert all(p.dtype == half for p in model.parameters())


def test_compute_dtype_float64_on_a_float32_model():
    model = _norm_mlp(torch.float32)
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 3, (16,))
    op = dd.HessianOperator(model, nn.CrossEntropyLoss(), (x.float(), y), compute_dtype=torch.float64)
    ref = _norm_mlp(torch.float32).double()
    assert op.dtype == torch.float64
    assert torch.equal(op.to_dense(), dd.HessianOperator(ref, nn.CrossEntropyLoss(), (x.float().double(), y)).to_dense())
    with pytest.raises(TypeError, match="dtype"):  # a float64 vector would be rounded by a float32 operator
        dd.HessianOperator(model, nn.CrossEntropyLoss(), (x.float(), y)) @ torch.ones(op.dim, dtype=torch.float64)
    with pytest.raises(TypeError, match="compute_dtype"):
        dd.HessianOperator(model, nn.CrossEntropyLoss(), (x.float(), y), compute_dtype=torch.int32)


def test_auto_chunk_fits_half_the_free_memory():
    assert blocks.auto_chunk(per_column_bytes=10, free_bytes=1000) == 50
    assert blocks.auto_chunk(per_column_bytes=10**9, free_bytes=10**8) == 1  # never below one column
    assert blocks.auto_chunk(per_column_bytes=1, free_bytes=10**12) == blocks.AUTO_MAX_CHUNK
    assert blocks.auto_chunk(per_column_bytes=0, free_bytes=10) == blocks.AUTO_MAX_CHUNK
    model, (x, y) = tanh_mlp(), classification_data()
    op = dd.HessianOperator(model, nn.CrossEntropyLoss(), (x, y))
    assert op.max_batch_vectors == "auto"
    V = torch.randn(op.dim, 5, dtype=op.dtype)
    assert torch.allclose(op @ V, dd.HessianOperator(model, nn.CrossEntropyLoss(), (x, y), max_batch_vectors=2) @ V,
                          rtol=1e-12, atol=1e-14)
    assert op.max_batch_vectors == blocks.AUTO_CPU_CHUNK  # resolved on first use, off CUDA
    for bad in (0, -1, "big", True, 2.5):
        with pytest.raises(ValueError, match="max_batch_vectors"):
            dd.HessianOperator(model, nn.CrossEntropyLoss(), (x, y), max_batch_vectors=bad)


def test_density_basis_on_another_device_gives_the_same_density():
    model, data = tanh_mlp(), classification_data()
    H = dd.HessianOperator(model, nn.CrossEntropyLoss(), data)
    a = dd.spectral_density(H, num_probes=3, lanczos_steps=12, progress=False)
    b = dd.spectral_density(H, num_probes=3, lanczos_steps=12, progress=False, basis_device="cpu")
    assert np.array_equal(a.nodes, b.nodes) and np.array_equal(a.weights, b.weights)


def test_auto_chunk_on_cuda_measures_one_column_then_fills_half_the_free_memory(monkeypatch):
    """The CUDA branch with the device's memory queries replaced by a fake (no GPU here)."""
    model, (x, y) = tanh_mlp(), classification_data()
    readings = iter([(1000, 1500), (1000, 1800)])  # (allocated, peak) before and after the first column
    monkeypatch.setattr(operators, "_is_cuda", lambda device: True)
    monkeypatch.setattr(operators, "_cuda_memory", lambda device: next(readings))
    monkeypatch.setattr(operators, "_cuda_free", lambda device: 8000)
    op = dd.HessianOperator(model, nn.CrossEntropyLoss(), (x, y), backend="vmap")
    V = torch.randn(op.dim, 12, dtype=op.dtype, generator=torch.Generator().manual_seed(0))
    got = op @ V
    assert op.max_batch_vectors == 5  # (1800 - 1000) bytes a column, half of 8000 free
    ref = dd.HessianOperator(model, nn.CrossEntropyLoss(), (x, y), backend="loop") @ V
    assert torch.allclose(got, ref, rtol=1e-10, atol=1e-12)  # 1 + 5 + 5 + 1 columns, all multiplied
    assert op.num_matvecs == 12


# -- sum-reduced criteria ----------------------------------------------------------
@pytest.mark.parametrize("cls", [dd.HessianOperator, dd.GGNOperator])
def test_sum_reduction_gives_one_operator_for_every_split_of_the_data(cls):
    model = tanh_mlp()
    x, y = classification_data(n=8)
    CE_sum = nn.CrossEntropyLoss(reduction="sum")
    splits = [
        (x, y),
        [(x[:4], y[:4]), (x[4:], y[4:])],
        [(x[:2], y[:2]), (x[2:], y[2:])],
        torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=3),
    ]
    exact = (exact_hessian if cls is dd.HessianOperator else exact_ggn)(model, CE_sum, [(x, y)])
    for data in splits:
        op = cls(model, CE_sum, data)
        assert op.reduction == "sum"
        assert rel(op.to_dense(), exact) < 1e-12
    mean = cls(model, CE, splits[2]).to_dense()
    assert rel(exact, 8 * mean) < 1e-12


def test_a_closure_declares_that_it_sums():
    model = tanh_mlp()
    x, y = classification_data(n=8)
    batches = [(x[:3], y[:3]), (x[3:], y[3:])]
    summed = nn.CrossEntropyLoss(reduction="sum")
    op = dd.HessianOperator(model, data=batches, closure=lambda m, b: summed(m(b[0]), b[1]), reduction="sum")
    assert rel(op.to_dense(), exact_hessian(model, summed, [(x, y)])) < 1e-12
    assert op.loss() == pytest.approx(summed(model(x), y).item(), rel=1e-12)
    with pytest.raises(ValueError, match="contradicts"):
        dd.HessianOperator(model, CE, batches, reduction="sum")
    with pytest.raises(ValueError, match="reduction must be"):
        dd.HessianOperator(model, CE, batches, reduction="max")


def test_estimators_and_the_monitor_on_a_sum_reduced_loss():
    model = tanh_mlp()
    x, y = classification_data(n=8)
    summed = nn.CrossEntropyLoss(reduction="sum")
    H_sum = dd.HessianOperator(model, summed, [(x[:5], y[:5]), (x[5:], y[5:])])
    H_mean = dd.HessianOperator(model, CE, (x, y))
    top_sum = dd.eigenvalues(H_sum, k=2, tol=1e-10).values
    assert torch.allclose(top_sum, 8 * dd.eigenvalues(H_mean, k=2, tol=1e-10).values, rtol=1e-8)
    assert dd.trace(H_sum, 30, seed=1).value == pytest.approx(8 * dd.trace(H_mean, 30, seed=1).value, rel=1e-10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with dd.Monitor(model, opt, [dd.probes.HessianSpectrum(k=1, trace_matvecs=0, tol=1e-10)], loss_fn=summed,
                    probe_data=(x, y)) as mon:
        opt.zero_grad()
        summed(model(x), y).backward()
        at = [p.detach().clone() for p in model.parameters()]
        opt.step()
    exact = torch.linalg.eigvalsh(dd.HessianOperator(model, summed, (x, y), at=at).to_dense())[-1]
    assert mon.records().value.iloc[0] == pytest.approx(float(exact), rel=1e-8)


# -- data that changes between passes ----------------------------------------------
class _Augmented(torch.utils.data.Dataset):
    """Random noise added to every input when it is read."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i] + 0.1 * torch.randn_like(self.x[i]), self.y[i]


def _changing_data(kind):
    x, y = classification_data(n=20)
    dataset = torch.utils.data.TensorDataset(x, y)
    if kind == "batchnorm_shuffle":
        return batchnorm_mlp(train=True), torch.utils.data.DataLoader(dataset, batch_size=6, shuffle=True)
    if kind == "drop_last_shuffle":
        return tanh_mlp(), torch.utils.data.DataLoader(dataset, batch_size=6, shuffle=True, drop_last=True)
    return tanh_mlp(), torch.utils.data.DataLoader(_Augmented(x, y), batch_size=6)


@pytest.mark.parametrize("kind", ["batchnorm_shuffle", "drop_last_shuffle", "augmentation"])
@pytest.mark.parametrize("cls", [dd.HessianOperator, dd.GGNOperator])
def test_data_that_changes_between_passes_is_refused_and_rng_is_restored(kind, cls):
    model, loader = _changing_data(kind)
    op = cls(model, CE, loader)
    states = torch.get_rng_state(), np.random.get_state(), random.getstate()
    for use in (lambda: op.matvec(torch.ones(op.dim, dtype=torch.float64)), op.loss):
        with pytest.raises(ValueError, match=r"cache_data=True.*eval mode.*shuffle=False"):
            use()
        assert torch.equal(torch.get_rng_state(), states[0])
        assert np.array_equal(np.random.get_state()[1], states[1][1]) and random.getstate() == states[2]
    fixed = cls(model, CE, loader, cache_data=True)
    v = torch.ones(fixed.dim, dtype=torch.float64)
    first = fixed.matvec(v)
    torch.rand(3)
    assert torch.equal(fixed.matvec(v), first)


def test_shuffled_batches_without_batch_statistics_are_accepted_and_iterators_refused():
    x, y = classification_data(n=20)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=6, shuffle=True)
    model = batchnorm_mlp(train=False)  # running statistics: the order does not matter
    assert rel(dd.HessianOperator(model, CE, loader).to_dense(), exact_hessian(model, CE, [(x, y)])) < 1e-10
    with pytest.raises(ValueError, match="one-shot iterator"):
        dd.HessianOperator(tanh_mlp(), CE, iter([(x, y)]))


# -- the CPU backend race ----------------------------------------------------------
@pytest.mark.parametrize("winner", ["vmap", "loop"])
def test_race_keeps_the_faster_backend_and_returns_its_own_result(monkeypatch, winner):
    clock = [0.0]
    monkeypatch.setattr(blocks, "_clock", lambda: clock[0])
    costs = {"vmap": 1.0, "loop": 3.0} if winner == "vmap" else {"vmap": 3.0, "loop": 1.0}
    calls = []

    def vmap_fn(W):  # vmap's columns differ in the last bits from the loop's
        calls.append(("vmap", W.shape[1]))
        clock[0] += costs["vmap"] * W.shape[1]
        return 2 * W + 1e-16

    def loop_columns(graph, W):
        calls.append(("loop", W.shape[1]))
        clock[0] += costs["loop"] * W.shape[1]
        return 2 * W

    V = torch.randn(5, 8, dtype=torch.float64)
    key = ("test", winner)
    out, chosen = blocks.race(key, V, (lambda: None, lambda g, W: vmap_fn(W)), (lambda: None, loop_columns),
                              graph_is_reused=True)
    assert chosen == blocks.remembered(key) == winner
    assert torch.equal(out, vmap_fn(V) if winner == "vmap" else 2 * V)  # all from the winner
    assert calls[:2] == [("loop", 2), ("vmap", 8)]


def test_auto_backend_is_reproducible_and_recorded():
    model, batch = small_cnn(), image_data()
    op = dd.HessianOperator(model, CE, batch)
    V = torch.randn(op.dim, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    first = op.matmat(V)
    assert set(op.block_backends) == {6} and op.block_backends[6] in ("vmap", "loop")
    assert torch.equal(op.matmat(V), first)
    ref = dd.HessianOperator(model, CE, batch, backend=op.block_backends[6]).matmat(V)
    assert torch.equal(first, ref)


def test_race_counts_a_graph_build_unless_the_graph_is_kept(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(blocks, "_clock", lambda: clock[0])

    def backend(build_seconds, column_seconds):
        def build():
            clock[0] += build_seconds

        def columns(graph, W):
            clock[0] += column_seconds * W.shape[1]
            return W

        return build, columns

    V = torch.randn(5, 8, dtype=torch.float64)
    vmap, loop = backend(16.0, 1.0), backend(0.0, 2.0)  # vmap: 16 s / 8 columns + 1 s a column = 3 s
    assert blocks.race(("build", False), V, vmap, loop, graph_is_reused=False)[1] == "loop"
    assert blocks.race(("build", True), V, vmap, loop, graph_is_reused=True)[1] == "vmap"
