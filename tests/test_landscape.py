"""dyndiag.landscape: directions (filter normalisation, eigenvectors) and loss surfaces."""

from __future__ import annotations

import copy
import json
import types

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import dyndiag.landscape as L
from dyndiag.landscape import grid, layerwise
from dyndiag.curvature import HessianOperator
from tests.exact import exact_hessian
from tests.models import TiedFrozen, batchnorm_mlp, classification_data, image_data, tanh_mlp
from tests.snapshots import assert_same, snapshot

CE = nn.CrossEntropyLoss()


def relu_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 7), nn.ReLU(), nn.Linear(7, 4)).double()


def bn_relu_mlp(train, seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(
        nn.Linear(6, 5), nn.BatchNorm1d(5, eps=1e-300), nn.ReLU(), nn.Linear(5, 4)
    ).double()
    with torch.no_grad():
        m.train()
        for _ in range(3):
            m(torch.randn(16, 6, dtype=torch.float64) * 2 + 1)
        m[1].weight.uniform_(0.5, 1.5)
        m[1].bias.uniform_(-0.5, 0.5)
    return m.train(train)


def surf(model, data, normalization="filter", resolution=5, extent=1.0, **kw):
    dirs = L.random_directions(model, 2, normalization, seed=0)
    return L.surface(model, CE, data, dirs, extent=extent, resolution=resolution, progress=False, **kw)


# -- filter normalisation ------------------------------------------------------------
def _rescale_pair(model, c):
    m = copy.deepcopy(model)
    with torch.no_grad():
        m[0].weight.mul_(c)
        m[0].bias.mul_(c)
        m[2].weight.div_(c)
    return m


def test_filter_normalisation_invariant_to_relu_rescaling():
    model, data = relu_mlp(), classification_data()
    scaled = _rescale_pair(model, 3.7)
    a, b = surf(model, data), surf(scaled, data)
    assert np.ptp(a.values) > 0.05  # a non-trivial surface
    np.testing.assert_allclose(b.values, a.values, rtol=0, atol=1e-10)
    # Without filter normalisation the same rescaling changes the surface.
    a, b = surf(model, data, "none"), surf(scaled, data, "none")
    assert np.abs(a.values - b.values).max() > 1e-3


@pytest.mark.parametrize("train", [False, True])
def test_filter_normalisation_invariant_to_scaling_before_batchnorm(train):
    model, data = bn_relu_mlp(train), classification_data()
    scaled = copy.deepcopy(model)
    c = torch.tensor([0.5, 2.0, 3.7, 1.3, 7.0], dtype=torch.float64)  # one scale per filter
    with torch.no_grad():  # BatchNorm (eps ~ 0: negligible next to var in float64) undoes it
        scaled[0].weight.mul_(c[:, None])
        scaled[0].bias.mul_(c)
        scaled[1].running_mean.mul_(c)
        scaled[1].running_var.mul_(c * c)
    a, b = surf(model, data), surf(scaled, data)
    assert np.ptp(a.values) > 0.05
    np.testing.assert_allclose(b.values, a.values, rtol=0, atol=1e-10)
    # Per-layer normalisation is not invariant to per-filter scales.
    a, b = surf(model, data, "layer"), surf(scaled, data, "layer")
    assert np.abs(a.values - b.values).max() > 1e-3


def test_scaling_one_layer_of_plain_mlp_changes_surface():
    model, data = relu_mlp(), classification_data()
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        scaled[0].weight.mul_(3.0)
        scaled[0].bias.mul_(3.0)
    assert np.abs(surf(model, data).values - surf(scaled, data).values).max() > 1e-2


# -- directions ----------------------------------------------------------------------
def test_bias_and_norm_directions_zero_by_default_and_filter_norms():
    model = batchnorm_mlp()
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for p in model.parameters()]
    for d in L.random_directions(model, 2, seed=1):
        parts = dict(zip(names, torch.split(d, sizes)))
        for n in ("0.bias", "1.weight", "1.bias", "3.bias"):
            assert torch.count_nonzero(parts[n]) == 0, n
        for n in ("0.weight", "3.weight"):
            w = dict(model.named_parameters())[n].detach()
            rows = parts[n].reshape(w.shape)
            assert torch.count_nonzero(rows) == w.numel()
            torch.testing.assert_close(rows.norm(dim=1), w.norm(dim=1), rtol=1e-12, atol=0)
    full = L.random_directions(model, 1, seed=1, ignore=())[0]
    assert torch.count_nonzero(full) == full.numel()
    layer = L.random_directions(model, 1, "layer", seed=1, ignore=())[0]
    for (n, p), part in zip(model.named_parameters(), torch.split(layer, sizes)):
        torch.testing.assert_close(part.norm(), p.detach().norm(), rtol=1e-12, atol=0)
    # "norm" alone zeroes BatchNorm parameters but keeps Linear biases.
    only_norm = dict(zip(names, torch.split(L.random_directions(model, 1, seed=1, ignore=("norm",))[0], sizes)))
    assert torch.count_nonzero(only_norm["1.weight"]) == 0
    assert torch.count_nonzero(only_norm["0.bias"]) == only_norm["0.bias"].numel()


def test_seed_reproducible_global_rng_untouched_and_orthogonalize():
    model = tanh_mlp()
    before = torch.get_rng_state()
    a = L.random_directions(model, 3, seed=5)
    assert torch.equal(torch.get_rng_state(), before)
    b = L.random_directions(model, 3, seed=5)
    c = L.random_directions(model, 3, seed=6)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    assert all(d.shape == (sum(p.numel() for p in model.parameters()),) and d.dtype == torch.float64 for d in a)
    assert abs(float(a[0] @ a[1])) > 1e-3  # raw Gaussian directions are not orthogonal
    o = L.random_directions(model, 3, seed=5, orthogonalize=True)
    for i in range(3):
        torch.testing.assert_close(o[i].norm(), a[i].norm(), rtol=1e-12, atol=0)
        for j in range(i):
            assert abs(float(o[i] @ o[j])) < 1e-10 * float(o[i].norm() * o[j].norm())
    torch.testing.assert_close(o[0], a[0], rtol=1e-14, atol=0)


def test_eigen_directions_match_exact_top_eigenvectors():
    model, (x, y) = tanh_mlp(), classification_data()
    H = HessianOperator(model, CE, (x, y))
    evals, evecs = torch.linalg.eigh(exact_hessian(model, CE, [(x, y)]))
    for tol, err in ((1e-6, 1e-6), (1e-10, 1e-10)):
        dirs = L.eigen_directions(H, k=2, tol=tol)
        assert len(dirs) == 2
        for d, i in zip(dirs, (-1, -2)):
            assert d.shape == (H.dim,)
            assert abs(float(d @ evecs[:, i])) == pytest.approx(1.0, abs=err)
            assert d[d.abs().argmax()] > 0  # sign convention


def test_params_selection_with_tied_and_frozen_parameters():
    model, (x, y) = TiedFrozen(), classification_data(d=5, classes=3)
    trainable = [p for p in model.parameters() if p.requires_grad]
    dirs = L.random_directions(model, 1, seed=0)
    assert dirs[0].shape == (sum(p.numel() for p in trainable),)
    s = L.surface(model, CE, (x, y), dirs, resolution=3, progress=False)
    with torch.no_grad():
        assert s.values[1] == pytest.approx(float(CE(model(x), y)), abs=1e-12)
    head_only = L.random_directions(model, 1, params=[model.head.weight], seed=0)[0]
    assert head_only.shape == (model.head.weight.numel(),)
    s = L.surface(model, CE, (x, y), [head_only], resolution=3, params=[model.head.weight], progress=False)
    shifted = copy.deepcopy(model)
    with torch.no_grad():
        shifted.head.weight.add_(head_only.reshape(model.head.weight.shape))
        assert s.values[2] == pytest.approx(float(CE(shifted(x), y)), abs=1e-12)


# -- surface values ------------------------------------------------------------------
def test_centre_is_model_loss_with_weighted_batches():
    model, (x, y) = tanh_mlp(), classification_data(n=25)
    batches = [(x[:7], y[:7]), (x[7:], y[7:])]  # unequal sizes: weighted by sample count
    s = surf(model, batches)
    assert s.values.shape == (5, 5) and len(s.coords) == 2
    np.testing.assert_array_equal(s.coords[0], np.linspace(-1, 1, 5))
    with torch.no_grad():
        assert s.values[2, 2] == pytest.approx(float(CE(model(x), y)), abs=1e-12)


def test_1d_surface_matches_hand_loop_with_batchnorm_in_train_mode():
    model = batchnorm_mlp(train=True)
    x, y = classification_data(n=20)
    batches = [(x[:12], y[:12]), (x[12:], y[12:])]
    d = L.random_directions(model, 1, seed=3, ignore=())[0]
    s = L.surface(model, CE, batches, [d], extent=0.8, resolution=5, progress=False)
    assert s.values.shape == (5,)
    expected = []
    for a in np.linspace(-0.8, 0.8, 5):
        m = copy.deepcopy(model)
        with torch.no_grad():
            theta = nn.utils.parameters_to_vector(m.parameters())
            nn.utils.vector_to_parameters(theta + float(a) * d, m.parameters())
            expected.append(sum(len(xb) * float(CE(m(xb), yb)) for xb, yb in batches) / len(x))
    np.testing.assert_allclose(s.values, expected, rtol=0, atol=1e-12)


def test_metric_and_dataframe():
    model, data = tanh_mlp(), classification_data()
    acc = lambda out, t: (out.argmax(1) == t).double().mean()  # noqa: E731
    s = surf(model, data, resolution=3, metric=acc)
    with torch.no_grad():
        assert s.metric_values[1, 1] == pytest.approx(float(acc(model(data[0]), data[1])))
    df = s.to_dataframe()
    assert list(df.columns) == ["x", "y", "loss", "metric"] and len(df) == 9
    row = df.iloc[5]  # i=1, j=2
    assert (row.x, row.y, row.loss) == (s.coords[0][1], s.coords[1][2], s.values[1, 2])
    d1 = L.surface(model, CE, data, L.random_directions(model, 1), resolution=4, progress=False)
    assert list(d1.to_dataframe().columns) == ["x", "loss"] and d1.metric_values is None
    closure = lambda m, b: CE(m(b[0]), b[1])  # noqa: E731
    s2 = L.surface(model, None, data, L.random_directions(model, 2, seed=0), resolution=3,
                   closure=closure, metric=acc, progress=False)  # per point; s was batched
    np.testing.assert_allclose(s2.values, s.values, rtol=1e-13, atol=0)
    np.testing.assert_array_equal(s2.metric_values, s.metric_values)


def used_model(eval_module: int, moved_statistics: bool = False):
    """A BatchNorm + Dropout MLP (float64) as training leaves it: train mode but module
    ``eval_module`` in eval mode, gradients from one backward except the last weight's
    (None), running statistics moved by one more forward if ``moved_statistics``.
    Returns ``(model, x, y)``."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Dropout(0.3), nn.Linear(5, 4)
    ).double().train()
    x, y = classification_data()
    if moved_statistics:
        model(x)
    CE(model(x), y).backward()
    model[4].weight.grad = None  # one parameter without a grad
    model[eval_module].eval()  # mixed modes
    return model, x, y


def test_model_comes_back_bit_identical():
    model, x, y = used_model(eval_module=3)  # dropout off, BatchNorm on batch statistics
    before = snapshot(model)
    params = list(model.parameters())
    dirs = L.random_directions(model, 2, seed=0, ignore=())
    s = L.surface(model, CE, [(x[:10], y[:10]), (x[10:], y[10:])], dirs, resolution=3,
                  metric=lambda o, t: (o.argmax(1) == t).double().mean(), progress=False)
    assert np.isfinite(s.values).all()
    assert list(model.parameters()) == params
    assert_same(before, snapshot(model))  # params, grad objects and values, flags, modes, buffers, RNGs


# -- batched evaluation (vmap over chunks of grid points) ---------------------------------
def per_point_and(model, data, batch_points, resolution=5, batched=None, **kw):
    """Surfaces with the per-point loop and with ``batch_points``; ``batched=True``
    asserts the second never entered the per-point loop."""
    dirs = L.random_directions(model, 2, seed=0, ignore=())
    run = lambda bp: L.surface(model, CE, data, dirs, resolution=resolution, batch_points=bp,  # noqa: E731
                               progress=False, **kw)
    loop = run(1)
    if not batched:
        return loop, run(batch_points)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(grid, "_per_point", lambda *a: pytest.fail("fell back to the per-point loop"))
        return loop, run(batch_points)


@pytest.mark.parametrize("path", ["layerwise", "vmap"])
@pytest.mark.parametrize("batch_points", ["auto", 4, 7, 25, 256])
def test_batched_equals_per_point_float64(batch_points, path, monkeypatch):
    model, (x, y) = tanh_mlp(), classification_data(n=25)
    if path == "vmap":  # the Sequential MLP through vmap, as any other model
        monkeypatch.setattr(layerwise, "plan", lambda *a: "forced")
    batches = [(x[:7], y[:7]), (x[7:], y[7:])]  # unequal sizes: weighted by sample count
    acc = lambda out, t: (out.argmax(1) == t).double().mean()  # noqa: E731
    loop, batched = per_point_and(model, batches, batch_points, metric=acc, batched=True)
    assert np.ptp(loop.values) > 0.05
    np.testing.assert_allclose(batched.values, loop.values, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(batched.metric_values, loop.metric_values)


def test_batched_equals_per_point_float32_loader_and_1d():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))  # float32
    x, y = classification_data(n=40, dtype=torch.float32)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    loop, batched = per_point_and(model, loader, "auto", resolution=6, batched=True)
    np.testing.assert_allclose(batched.values, loop.values, rtol=1e-6, atol=0)
    d = L.random_directions(model, 1, seed=2)
    one = [L.surface(model, CE, (x, y), d, resolution=7, batch_points=bp, progress=False).values for bp in (0, 3)]
    np.testing.assert_allclose(one[1], one[0], rtol=1e-6, atol=0)


def test_batched_with_tied_frozen_and_selected_params():
    model, (x, y) = TiedFrozen(), classification_data(d=5, classes=3)
    d = L.random_directions(model, 2, seed=0)
    runs = [L.surface(model, CE, (x, y), d, resolution=4, batch_points=bp, progress=False).values for bp in (1, 16)]
    np.testing.assert_allclose(runs[1], runs[0], rtol=0, atol=1e-12)
    head = [L.random_directions(model, 1, params=[model.head.weight], seed=s)[0] for s in (0, 1)]
    runs = [L.surface(model, CE, (x, y), head, resolution=4, params=[model.head.weight], batch_points=bp,
                      progress=False).values for bp in (1, 5)]
    np.testing.assert_allclose(runs[1], runs[0], rtol=0, atol=1e-12)


def test_batchnorm_eval_mode_is_batched_and_train_mode_falls_back():
    data = classification_data()
    loop, batched = per_point_and(batchnorm_mlp(train=False), data, 4, batched=True)
    np.testing.assert_allclose(batched.values, loop.values, rtol=0, atol=1e-12)
    model = batchnorm_mlp(train=True)
    before = snapshot(model)
    loop, auto = per_point_and(model, data, "auto")
    np.testing.assert_array_equal(auto.values, loop.values)  # both per point: same bits
    with pytest.warns(RuntimeWarning, match="BatchNorm1d '1' in train mode"):
        _, forced = per_point_and(model, data, 4)
    np.testing.assert_array_equal(forced.values, loop.values)
    assert_same(before, snapshot(model))  # running statistics never moved


def test_closure_falls_back_to_per_point():
    model, data = tanh_mlp(), classification_data()
    dirs = L.random_directions(model, 2, seed=0)
    counter = Counting()
    s = L.surface(model, None, data, dirs, resolution=3, closure=counter, progress=False)
    assert counter.calls == 9  # one call per point and batch
    with pytest.warns(RuntimeWarning, match="closure"):
        forced = L.surface(model, None, data, dirs, resolution=3, closure=Counting(), batch_points=9, progress=False)
    np.testing.assert_array_equal(forced.values, s.values)


class ItemModel(nn.Module):
    """A forward vmap cannot batch: a Python branch on a tensor's value."""

    def __init__(self):
        super().__init__()
        self.net = tanh_mlp()

    def forward(self, x):
        out = self.net(x)
        return out * 2 if out.sum().item() > 1e9 else out


class CountingBuffer(nn.Module):
    """A forward that writes an (unbatched) buffer: vmap runs it, but not per point."""

    def __init__(self):
        super().__init__()
        self.net = tanh_mlp()
        self.register_buffer("calls", torch.zeros((), dtype=torch.float64))

    def forward(self, x):
        self.calls.add_(1)
        return self.net(x)


@pytest.mark.parametrize("cls, why", [(ItemModel, "first chunk failed batched"), (CountingBuffer, "writes a buffer")])
def test_model_vmap_cannot_handle_falls_back(cls, why):
    model, data = cls(), classification_data()
    before = snapshot(model)
    loop, auto = per_point_and(model, data, "auto")
    np.testing.assert_array_equal(auto.values, loop.values)
    with pytest.warns(RuntimeWarning, match=why):
        _, forced = per_point_and(model, data, 4)
    np.testing.assert_array_equal(forced.values, loop.values)
    assert_same(before, snapshot(model))
    # The same values as a model vmap can batch.
    np.testing.assert_allclose(per_point_and(model.net, data, 4, batched=True)[1].values, loop.values,
                               rtol=0, atol=1e-12)


def test_metric_under_vmap_and_metric_that_falls_back():
    model, data = tanh_mlp(), classification_data()
    acc = lambda out, t: (out.argmax(1) == t).double().mean()  # noqa: E731
    loop, batched = per_point_and(model, data, "auto", metric=acc, batched=True)
    np.testing.assert_array_equal(batched.metric_values, loop.metric_values)
    assert len(np.unique(loop.metric_values)) > 1
    as_float = lambda out, t: float((out.argmax(1) == t).double().mean().item())  # noqa: E731
    with pytest.warns(RuntimeWarning, match="first chunk failed batched"):
        _, fell = per_point_and(model, data, 6, metric=as_float)
    np.testing.assert_array_equal(fell.metric_values, loop.metric_values)
    np.testing.assert_array_equal(fell.values, loop.values)


def test_model_comes_back_bit_identical_after_batched_path():
    # BatchNorm on (moved) running statistics, dropout in train mode: batched
    model, x, y = used_model(eval_module=1, moved_statistics=True)
    before = snapshot(model)
    params = list(model.parameters())
    loop, batched = per_point_and(model, [(x[:10], y[:10]), (x[10:], y[10:])], 4, batched=True)
    np.testing.assert_allclose(batched.values, loop.values, rtol=0, atol=1e-12)  # dropout was off
    assert list(model.parameters()) == params
    assert_same(before, snapshot(model))


def test_auto_takes_the_per_point_loop_for_convolutions_on_large_cpu_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(32, 3)).double()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(129, 1, 6, 6, dtype=torch.float64, generator=g), torch.randint(0, 3, (129,), generator=g)
    d = L.random_directions(model, 2, seed=0)
    auto = L.surface(model, CE, (x, y), d, resolution=4, progress=False)
    assert auto.batch_points == 1  # 129 samples > 128
    forced = L.surface(model, CE, (x, y), d, resolution=4, batch_points=8, progress=False)  # vmap on request
    assert forced.batch_points == 8
    np.testing.assert_allclose(forced.values, auto.values, rtol=0, atol=1e-12)
    small = L.surface(model, CE, (x[:128], y[:128]), d, resolution=4, progress=False)
    assert small.batch_points == 128  # up to 128 samples: batched (2**15 // 128 points, at most 128)
    assert grid._auto_chunk([((x, y), 129)], torch.device("cuda"), 77, conv=True) > 1  # not off the CPU


def test_auto_chunk_rule():
    _auto_chunk = grid._auto_chunk
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    batch = lambda n: ((torch.zeros(n, 64), torch.zeros(n, dtype=torch.long)), n)  # noqa: E731
    assert _auto_chunk([batch(512)], cpu, 3610) == 36  # the digits benchmark: 2**26 // (512 * 3610)
    assert _auto_chunk([batch(128)], cpu, 3610) == 128
    assert _auto_chunk([batch(10), batch(1024)], cpu, 3610) == 18  # the largest batch counts
    assert _auto_chunk([batch(1797)], cpu, 3610) == 1  # 10 < 16 points: per point
    assert _auto_chunk([batch(512)], cpu, 38410) == 1
    assert _auto_chunk([batch(64)], cpu, 38410) == 27
    assert _auto_chunk([batch(1797)], gpu, 3610) == 10  # no 16-point floor off the CPU
    assert _auto_chunk([batch(4096)], gpu, 10) == 8  # 2**15 sample evaluations
    assert _auto_chunk([batch(1)], gpu, 2**21) == 8  # stacked parameters
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(300, 6)), batch_size=128)
    assert _auto_chunk(loader, cpu, 100) == 128  # its first batch (128 samples)
    assert _auto_chunk(loader, gpu, 10**4) == 52  # 2**26 // (128 * 10**4)


# -- layer-by-layer path (Sequential MLPs) ------------------------------------------------


def only_layerwise(mp):
    """Fail if ``surface`` takes the vmap path or the per-point loop."""
    mp.setattr(grid, "_vmapped", lambda *a: pytest.fail("took the vmap path"))
    mp.setattr(grid, "_per_point", lambda *a: pytest.fail("fell back to the per-point loop"))


class Square(nn.Module):
    def forward(self, x):
        return x * x


def test_layerwise_plan_accepts_mlps_and_refuses_the_rest():
    chosen = lambda m: [p for p in m.parameters() if p.requires_grad]  # noqa: E731
    ok = [
        tanh_mlp(),
        nn.Sequential(nn.Flatten(), nn.Sequential(nn.Linear(6, 5, bias=False), nn.GELU()), nn.Dropout(0.2),
                      nn.Linear(5, 3), nn.LogSoftmax(dim=-1)),
    ]
    for m in ok:
        assert isinstance(layerwise.plan(m, chosen(m), CE, None), layerwise.Plan)
    hooked = tanh_mlp()
    hooked[1].register_forward_hook(lambda *a: None)
    outer = nn.Sequential(tanh_mlp())
    outer.register_forward_pre_hook(lambda *a: None)  # on a container the path flattens away

    class MySeq(nn.Sequential):  # a subclass with its own forward: traced, not read as a Sequential
        def forward(self, x):
            h = super().forward(x)
            return h + h.tanh()

    class MyTanh(nn.Tanh):
        def forward(self, x):
            return super().forward(x) * 2

    refused = {
        "a closure": (tanh_mlp(), None, CE),
        "a branch after the first Linear": (MySeq(nn.Linear(6, 4)), CE, None),
        "a hook on Tanh": (hooked, CE, None),
        "a hook on Sequential": (outer, CE, None),
        "Softmax over dim 0": (nn.Sequential(nn.Linear(6, 4), nn.Softmax(dim=0)), CE, None),
        "BatchNorm1d is not": (batchnorm_mlp(train=False), CE, None),
        "MyTanh is not": (nn.Sequential(nn.Linear(6, 4), MyTanh()), CE, None),
        "Flatten after the first Linear": (nn.Sequential(nn.Linear(6, 4), nn.Flatten()), CE, None),
        "LogSoftmax over dim 2": (nn.Sequential(nn.Linear(6, 4), nn.LogSoftmax(dim=2)), CE, None),
        "Square is not": (nn.Sequential(nn.Linear(6, 4), Square()), CE, None),
        "no Linear layer": (nn.Sequential(nn.Tanh()), CE, None),
    }
    for why, (m, loss_fn, closure) in refused.items():
        got = layerwise.plan(m, chosen(m) or [torch.zeros(1)], loss_fn, closure)
        assert isinstance(got, str) and got.startswith(why), (why, got)
    handle = nn.modules.module.register_module_forward_hook(lambda *a: None)
    try:
        assert layerwise.plan(tanh_mlp(), chosen(tanh_mlp()), CE, None) == "global forward hooks"
    finally:
        handle.remove()


def _mlps():
    torch.manual_seed(0)
    deep = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 5, bias=False), nn.Sigmoid()),
                         nn.Dropout(0.5), nn.Linear(5, 4)).double()
    frozen = tanh_mlp()
    frozen[0].weight.requires_grad_(False)  # fixed first-layer weight: its bias still moves
    square = nn.Linear(5, 5).double()
    tied = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), square, nn.Tanh(), square, nn.Linear(5, 4)).double()
    return {"deep": deep, "frozen": frozen, "tied": tied}


@pytest.mark.parametrize("name", ["deep", "frozen", "tied"])
def test_layerwise_equals_per_point_float64(name):
    model = _mlps()[name]
    x, y = classification_data(n=25)
    batches = [(x[:7], y[:7]), (x[7:], y[7:])]
    acc = lambda out, t: (out.argmax(1) == t).double().mean()  # noqa: E731
    before = snapshot(model)
    dirs = L.random_directions(model, 2, seed=0, ignore=())
    run = lambda bp: L.surface(model, CE, batches, dirs, resolution=5, batch_points=bp,  # noqa: E731
                               metric=acc, progress=False)
    loop = run(1)
    with pytest.MonkeyPatch.context() as mp:
        only_layerwise(mp)
        batched = run(7)  # 4 chunks: a short last one
    assert batched.batch_points == 7 and loop.batch_points == 1
    assert np.ptp(loop.values) > 0.05
    np.testing.assert_allclose(batched.values, loop.values, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(batched.metric_values, loop.metric_values)
    assert_same(before, snapshot(model))


class ClassMLP(nn.Module):
    """An MLP as users write them: a class with a forward, traced by torch.fx."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(36, 8), nn.Linear(8, 6), nn.Linear(6, 3)

    def forward(self, x):
        x = x.view(x.size(0), -1) / 2
        x = F.leaky_relu(self.fc1(x), 0.1)
        x = F.dropout(x, 0.3, training=self.training)
        x = torch.tanh(self.fc2(x)).relu()
        return F.log_softmax(self.out(x), dim=1)


class Residual(ClassMLP):
    def forward(self, x):
        h = torch.tanh(self.fc2(F.relu(self.fc1(x.flatten(1)))))
        return self.out(h + h.relu())


class ValueBranch(ClassMLP):
    def forward(self, x):
        h = self.fc1(x.flatten(1))
        return self.out(self.fc2(h if h.sum() > 0 else -h))


class Scaled(ClassMLP):
    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.tensor(0.5, dtype=torch.float64))

    def forward(self, x):
        return self.out(torch.tanh(self.fc2(torch.tanh(self.fc1(x.flatten(1) * self.scale)))))


class Sine(ClassMLP):
    def forward(self, x):
        return self.out(torch.sin(self.fc2(torch.tanh(self.fc1(x.flatten(1))))))


def test_layerwise_traces_class_models():
    torch.manual_seed(0)
    x, y = image_data(n=12)
    nll = nn.NLLLoss()
    model = ClassMLP().double().train()  # dropout: off under surface's evaluation rule, read as such
    d = L.random_directions(model, 2, seed=0, ignore=())
    loop = L.surface(model, nll, (x, y), d, resolution=5, batch_points=1, progress=False)
    with pytest.MonkeyPatch.context() as mp:
        only_layerwise(mp)
        fast = L.surface(model, nll, (x, y), d, resolution=5, batch_points=4, progress=False)
    np.testing.assert_allclose(fast.values, loop.values, rtol=0, atol=1e-12)
    assert np.ptp(loop.values) > 0.05
    chosen = lambda m: list(m.parameters())  # noqa: E731
    why = {Residual: "a branch", ValueBranch: "not traceable", Scaled: "get_attr", Sine: "call_function sin"}
    for cls, reason in why.items():
        m = cls().double().eval()
        assert reason in layerwise.plan(m, chosen(m), nll, None), cls
        # ... and these take the vmap path (ValueBranch: the per-point loop), same values
        runs = [L.surface(m, nll, (x, y), L.random_directions(m, 2, seed=0), resolution=3, batch_points=bp,
                          progress=False).values for bp in (1, "auto")]
        np.testing.assert_allclose(runs[1], runs[0], rtol=0, atol=1e-12)
    on = ClassMLP().double().train()
    assert layerwise.plan(on, chosen(on), nll, None) == "dropout that is on (training=True)"


def test_layerwise_with_selected_params_sequences_and_other_losses():
    model, (x, y) = tanh_mlp(), classification_data(n=12)
    last = [L.random_directions(model, 1, params=[model[2].weight], seed=s)[0] for s in (0, 1)]
    run = lambda bp: L.surface(model, CE, (x, y), last, resolution=4, params=[model[2].weight],  # noqa: E731
                               batch_points=bp, progress=False)
    runs = [run(1)]
    with pytest.MonkeyPatch.context() as mp:  # the first layer fixed: its directions are zero
        only_layerwise(mp)
        runs.append(run(5))
    assert runs[1].batch_points == 5
    np.testing.assert_allclose(runs[1].values, runs[0].values, rtol=0, atol=1e-12)
    # A regression loss and a log-softmax + NLL head, both under vmap over the chunk.
    g = torch.Generator().manual_seed(1)
    xs, ys = torch.randn(12, 6, dtype=torch.float64, generator=g), torch.randn(12, 2, dtype=torch.float64, generator=g)
    reg = nn.Sequential(nn.Linear(6, 5), nn.ELU(), nn.Linear(5, 2)).double()
    logp = nn.Sequential(nn.Linear(6, 5), nn.Softplus(), nn.Linear(5, 4), nn.LogSoftmax(dim=1)).double()
    for model, loss_fn, data in [(reg, nn.MSELoss(), (xs, ys)), (logp, nn.NLLLoss(), (x, y))]:
        d = L.random_directions(model, 2, seed=0, ignore=())
        loop = L.surface(model, loss_fn, data, d, resolution=4, batch_points=1, progress=False)
        with pytest.MonkeyPatch.context() as mp:
            only_layerwise(mp)
            fast = L.surface(model, loss_fn, data, d, resolution=4, batch_points=3, progress=False)
        np.testing.assert_allclose(fast.values, loop.values, rtol=0, atol=1e-12)
    # (n, T, features) inputs: not one feature vector per sample, so the vmap path.
    xt = torch.randn(12, 3, 6, dtype=torch.float64, generator=g)
    yt = torch.randn(12, 3, 2, dtype=torch.float64, generator=g)
    d = L.random_directions(reg, 2, seed=0, ignore=())
    runs = [L.surface(reg, nn.MSELoss(), (xt, yt), d, resolution=4, batch_points=bp, progress=False) for bp in (1, 3)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(layerwise, "evaluator", lambda *a: pytest.fail("took the layer-by-layer path"))
        runs.append(L.surface(reg, nn.MSELoss(), (xt, yt), d, resolution=4, batch_points=3, progress=False))
    np.testing.assert_allclose(runs[2].values, runs[0].values, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kw", [{}, {"ignore_index": 1}, {"label_smoothing": 0.2, "ignore_index": 0}])
def test_layerwise_cross_entropy_per_point(kw):
    ce = nn.CrossEntropyLoss(**kw)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 9, 4, dtype=torch.float64, generator=g)
    y = torch.randint(0, 4, (9,), generator=g)
    stacked = lambda targets: layerwise._stacked_loss(ce)(z.transpose(1, 2), targets)  # noqa: E731 feature-major
    got = stacked(y)
    want = torch.stack([ce(z[p], y) for p in range(5)])
    torch.testing.assert_close(got, want, rtol=1e-13, atol=0)
    probs = torch.softmax(torch.randn(9, 4, dtype=torch.float64, generator=g), 1)  # soft targets: vmap rule
    if "ignore_index" not in kw:  # torch refuses ignore_index with soft targets
        want = torch.stack([ce(z[p], probs) for p in range(5)])
        torch.testing.assert_close(stacked(probs), want, rtol=1e-13, atol=0)
    if "ignore_index" in kw:  # every target ignored: NaN, as the module gives
        all_ignored = torch.full((9,), kw["ignore_index"])
        assert torch.isnan(stacked(all_ignored)).all()


def test_layerwise_cross_entropy_checks_each_batch_once():
    # The targets' check (a device sync on a GPU) runs once per targets tensor, not per chunk.
    ce = nn.CrossEntropyLoss(ignore_index=2)
    loss = layerwise._stacked_loss(ce)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 4, 9, dtype=torch.float64, generator=g)  # feature-major (P, classes, n)
    ya, yb = (torch.randint(0, 4, (9,), generator=g) for _ in range(2))
    where, calls = torch.where, []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "where", lambda *a: calls.append(1) or where(*a))
        got = [loss(z, y) for y in (ya, yb, ya, yb)]
    assert len(calls) == 2
    for value, y in zip(got, (ya, yb, ya, yb)):
        torch.testing.assert_close(value, torch.stack([ce(z[p].T, y) for p in range(3)]), rtol=1e-13, atol=0)
    bad = ya.clone()
    bad[0] = 7
    with pytest.raises(IndexError, match="out of bounds for 4 classes"):
        loss(z, bad)


def test_layerwise_float32_and_chunk_rule():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.Tanh(), nn.Linear(48, 10))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(512, 64, generator=g), torch.randint(0, 10, (512,), generator=g)
    d = L.random_directions(model, 2, seed=0)
    auto = L.surface(model, CE, (x, y), d, resolution=13, progress=False)
    loop = L.surface(model, CE, (x, y), d, resolution=13, batch_points=1, progress=False)
    assert auto.batch_points == 2**21 // (512 * 48) == 85  # the widest activation of a chunk
    np.testing.assert_allclose(auto.values, loop.values, rtol=2e-6, atol=0)
    layers = layerwise.plan(model, list(model.parameters()), CE, None)
    heads = layerwise.head_cache(layers, torch.zeros(3610), [torch.zeros(3610)] * 2, [((x, y), 512)])
    assert layerwise.auto_chunk(layers, heads) == 85
    assert layerwise.auto_chunk(layers, heads[:1] * 2) == 85  # the largest batch counts, not the sum
    wide = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 10))
    layers = layerwise.plan(wide, list(wide.parameters()), CE, None)
    heads = layerwise.head_cache(layers, torch.zeros(38410), [torch.zeros(38410)] * 2, [((x, y), 512)])
    assert layerwise.auto_chunk(layers, heads) == 8
    with pytest.MonkeyPatch.context() as mp:  # the first layer's outputs do not fit: the vmap path
        mp.setattr(layerwise, "_HEAD_ELEMENTS", 1000)
        assert L.surface(model, CE, (x, y), d, resolution=3, progress=False).batch_points == 36


def test_layerwise_falls_back_like_vmap():
    model, data = tanh_mlp(), classification_data()
    # A batch the first layer cannot take: the per-point loop raises its own error.
    with pytest.raises(RuntimeError):
        L.surface(model, CE, (data[0].float(), data[1]), L.random_directions(model, 2), resolution=3,
                  progress=False)
    # A target out of range: the per-point loop raises torch's own error (a warning says why).
    with pytest.raises(IndexError, match="out of bounds"), pytest.warns(RuntimeWarning, match="out of bounds"):
        L.surface(model, CE, (data[0], data[1] + 10), L.random_directions(model, 2), resolution=3, batch_points=4,
                  progress=False)
    # A loader is not cached: the vmap path.
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*data), batch_size=8)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(layerwise, "evaluator", lambda *a: pytest.fail("loader took the layer-by-layer path"))
        s = L.surface(model, CE, loader, L.random_directions(model, 2), resolution=3, batch_points=4,
                      progress=False)
    assert s.batch_points == 4


# -- resumability ----------------------------------------------------------------------
class Counting:
    def __init__(self):
        self.calls = 0

    def __call__(self, model, batch):
        self.calls += 1
        return CE(model(batch[0]), batch[1])


def _failing_metric(after):
    calls = [0]

    def metric(out, t):
        calls[0] += 1
        if calls[0] > after:
            raise RuntimeError("interrupted")
        return (out.argmax(1) == t).double().mean()

    return metric


def test_resume_skips_finished_points_and_matches_uninterrupted(tmp_path):
    model, data = tanh_mlp(), classification_data()
    dirs = L.random_directions(model, 2, seed=0)
    path = tmp_path / "surface.jsonl"
    kw = dict(resolution=4, progress=False)
    acc = _failing_metric(10**9)
    full = L.surface(model, None, data, dirs, closure=Counting(), metric=acc, **kw)

    with pytest.raises(RuntimeError, match="interrupted"):
        L.surface(model, None, data, dirs, path=path, closure=Counting(), metric=_failing_metric(6), **kw)
    assert len(path.read_text().splitlines()) == 1 + 6
    with open(path, "a") as f:  # a torn line from a crash mid-write
        f.write('{"i": 3, "j"')
    counter = Counting()
    resumed = L.surface(model, None, data, dirs, path=path, closure=counter, metric=acc, **kw)
    assert counter.calls == 16 - 6
    np.testing.assert_array_equal(resumed.values, full.values)
    np.testing.assert_array_equal(resumed.metric_values, full.metric_values)
    lines = path.read_text().splitlines()
    assert len(lines) == 17 and all(json.loads(line) for line in lines)

    counter = Counting()
    again = L.surface(model, None, data, dirs, path=path, closure=counter, metric=acc, **kw)
    assert counter.calls == 0
    np.testing.assert_array_equal(again.values, full.values)

    with pytest.raises(ValueError, match="path"):
        L.surface(model, CE, data, dirs, path=path, resolution=5, metric=acc, progress=False)
    with pytest.raises(ValueError, match="path"):
        L.surface(model, CE, data, dirs[::-1], path=path, metric=acc, **kw)
    with pytest.raises(ValueError, match="path"):
        L.surface(model, CE, data, dirs, path=path, **kw)  # no metric
    with pytest.raises(ValueError, match="path"):
        L.surface(model, CE, data, dirs, path=path, extent=2.0, metric=acc, **kw)
    other = tmp_path / "other.txt"
    other.write_text("hello\n")
    with pytest.raises(ValueError, match="path"):
        L.surface(model, CE, data, dirs, path=other, **kw)


def test_resume_1d(tmp_path):
    model, data = tanh_mlp(), classification_data()
    d = L.random_directions(model, 1, seed=0)
    path = tmp_path / "line.jsonl"
    full = L.surface(model, CE, data, d, resolution=6, progress=False)
    first = L.surface(model, CE, data, d, resolution=6, path=str(path), progress=False)
    counter = Counting()
    second = L.surface(model, None, data, d, resolution=6, path=path, closure=counter, progress=False)
    assert counter.calls == 0
    np.testing.assert_array_equal(first.values, full.values)
    np.testing.assert_array_equal(second.values, full.values)


def test_batched_resume_is_bit_identical(tmp_path):
    model, data = tanh_mlp(), classification_data()
    dirs = L.random_directions(model, 2, seed=0)
    path = tmp_path / "surface.jsonl"
    kw = dict(resolution=4, batch_points=4, progress=False)  # 4 fixed chunks of 4 points
    full = L.surface(model, CE, data, dirs, metric=_failing_metric(10**9), **kw)
    # The metric runs once per chunk under vmap: the third chunk fails, two are stored.
    with pytest.raises(RuntimeError, match="interrupted"):
        L.surface(model, CE, data, dirs, path=path, metric=_failing_metric(2), **kw)
    lines = path.read_text().splitlines()
    assert len(lines) == 1 + 8
    path.write_text("\n".join(lines[:1 + 6]) + "\n")  # half of chunk 1 lost: evaluated whole again
    resumed = L.surface(model, CE, data, dirs, path=path, metric=_failing_metric(10**9), **kw)
    np.testing.assert_array_equal(resumed.values, full.values)
    np.testing.assert_array_equal(resumed.metric_values, full.metric_values)
    lines = path.read_text().splitlines()
    assert len(lines) == 17 and len({(json.loads(r)["i"], json.loads(r)["j"]) for r in lines[1:]}) == 16
    # A failure in the first chunk is "cannot batch": the per-point loop raises it again.
    with pytest.raises(RuntimeError, match="interrupted"), pytest.warns(RuntimeWarning, match="first chunk failed batched"):
        L.surface(model, CE, data, dirs, path=tmp_path / "b.jsonl", metric=_failing_metric(0), **kw)


# -- bad input ------------------------------------------------------------------------
def test_bad_input():
    model, data = tanh_mlp(), classification_data()
    dirs = L.random_directions(model, 2)
    dim = dirs[0].numel()
    s = lambda *a, **k: L.surface(model, CE, data, *a, progress=False, **k)  # noqa: E731
    with pytest.raises(ValueError, match="directions"):
        s([])
    with pytest.raises(ValueError, match="directions"):
        s(dirs + dirs[:1])
    with pytest.raises(ValueError, match=r"directions\[1\]"):
        s([dirs[0], torch.zeros(dim + 1, dtype=torch.float64)])
    with pytest.raises(TypeError, match=r"directions\[0\]"):
        s([torch.zeros(dim, dtype=torch.long)])
    with pytest.raises(TypeError, match="directions"):
        s(torch.stack(dirs))
    with pytest.raises(TypeError, match="directions"):
        s("ab")
    with pytest.raises(ValueError, match="resolution"):
        s(dirs, resolution=1)
    with pytest.raises(ValueError, match="extent"):
        s(dirs, extent=0)
    with pytest.raises(ValueError, match="extent"):
        s(dirs, extent=float("nan"))
    with pytest.raises(TypeError, match="metric"):
        s(dirs, metric=3)
    for bad, err in (("fast", ValueError), (-1, ValueError), (2.0, TypeError), (True, TypeError), (None, TypeError)):
        with pytest.raises(err, match="batch_points"):
            s(dirs, batch_points=bad)
    with pytest.raises(ValueError, match="scalar"):  # raised by the per-point loop after vmap gave up
        L.surface(model, nn.CrossEntropyLoss(reduction="none"), data, dirs, resolution=3, progress=False)
    with pytest.raises(TypeError, match="data"):
        L.surface(model, CE, iter([data]), dirs)
    with pytest.raises(ValueError, match="loss_fn"):
        L.surface(model, None, data, dirs)
    with pytest.raises(ValueError, match="^n "):
        L.random_directions(model, 0)
    with pytest.raises(ValueError, match="normalization"):
        L.random_directions(model, 2, "filters")
    with pytest.raises(ValueError, match="ignore"):
        L.random_directions(model, 2, ignore=("biases",))
    with pytest.raises(TypeError, match="model"):
        L.random_directions("model")
    with pytest.raises(TypeError, match="H"):
        L.eigen_directions(model)
    # a single flat tensor is one direction
    assert L.surface(model, CE, data, dirs[0], resolution=3, progress=False).values.shape == (3,)


def test_exports_resolve_and_do_not_shadow():
    for name in L.__all__:
        value = getattr(L, name)
        assert not isinstance(value, types.ModuleType), name
        assert getattr(L, name) is value
    import dyndiag.landscape.directions  # noqa: F401
    import dyndiag.landscape.grid  # noqa: F401

    assert callable(L.surface) and callable(L.random_directions)


def test_resume_path_in_a_folder_that_does_not_exist_yet(tmp_path):
    model, data = tanh_mlp(), classification_data()
    path = tmp_path / "runs" / "exp1" / "landscape.jsonl"
    s = surf(model, data, resolution=3, path=path)
    assert path.exists() and np.isfinite(s.values).all()
