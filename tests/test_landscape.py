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
from dyndiag.landscape import grid
from dyndiag.curvature import HessianOperator
from tests.exact import exact_hessian
from tests.models import TiedFrozen, batchnorm_mlp, classification_data, image_data, small_cnn, tanh_mlp
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
    asserts the second was evaluated under vmap."""
    dirs = L.random_directions(model, 2, seed=0, ignore=())
    run = lambda bp: L.surface(model, CE, data, dirs, resolution=resolution, batch_points=bp,  # noqa: E731
                               progress=False, **kw)
    loop, other = run(1), run(batch_points)
    assert loop.batch_points == 1
    if batched:
        assert other.batch_points > 1
    return loop, other


@pytest.mark.parametrize("batch_points", ["auto", 4, 7, 25, 256])
def test_batched_equals_per_point_float64(batch_points):
    model, (x, y) = tanh_mlp(), classification_data(n=25)
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


def test_auto_chunk_rule():
    # The most points (<= 128) whose stacked largest module output stays within 2**20
    # elements (and stacked parameters within 2**26); per point on the CPU under 16.
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(1797, 64, generator=g), torch.randint(0, 10, (1797,), generator=g)
    mlp = nn.Sequential(nn.Linear(64, 48), nn.Tanh(), nn.Linear(48, 10))  # float32, the digits MLP's shape
    d = L.random_directions(mlp, 2, seed=0)
    auto = lambda model, data, dirs=d: L.surface(model, CE, data, dirs, resolution=3,  # noqa: E731
                                                 progress=False).batch_points
    assert auto(mlp, (x[:512], y[:512])) == 2**20 // (512 * 48) == 42  # the widest output: 512 x 48
    assert auto(mlp, [(x[:10], y[:10]), (x[:1024], y[:1024])]) == 21  # the largest batch counts
    assert auto(mlp, (x[:128], y[:128])) == 128  # at most 128
    assert auto(mlp, (x, y)) == 1  # 12 points: per point on the CPU
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:300], y[:300]), batch_size=128)
    assert auto(mlp, loader) == 128  # its first batch stands for all
    conv = nn.Sequential(nn.Conv2d(1, 64, 3), nn.Tanh(), nn.Flatten(), nn.Linear(64 * 36, 10))
    images = x.reshape(-1, 1, 8, 8)
    dc = L.random_directions(conv, 2, seed=0)
    assert auto(conv, (images[:16], y[:16]), dc) == 2**20 // (16 * 64 * 36) == 28  # the convolution's output
    assert auto(conv, (images[:64], y[:64]), dc) == 1
    # Off the CPU there is no 16-point floor; the stacked parameters stay within 2**26.
    point_fn = grid._point_fn(grid.make_loss_closure(CE, None), CE, None)
    gpu = torch.device("cuda")
    assert grid._auto_chunk(mlp, point_fn, [((x, y), 1797)], 3610, gpu) == 12
    assert grid._auto_chunk(mlp, point_fn, [((x[:2], y[:2]), 2)], 2**23, gpu) == 8
    # A batch the model cannot take: the per-point loop raises its own error.
    with pytest.raises(RuntimeError):
        L.surface(mlp, CE, (x.double(), y), d, resolution=3, progress=False)
    # A target out of range under vmap: the first chunk fails, the per-point loop
    # raises torch's own error.
    with pytest.raises(IndexError, match="out of bounds"), pytest.warns(RuntimeWarning, match="out of bounds"):
        L.surface(mlp, CE, (x[:20], y[:20] + 10), d, resolution=3, batch_points=4, progress=False)


class Residual(nn.Module):
    """A class model with a residual connection, a buffer and a functional activation."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(36, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, x):
        h = F.leaky_relu(self.fc1(x.flatten(1) * self.scale), 0.1)
        return F.log_softmax(self.out(h + torch.sin(self.fc2(h))), dim=1)


def test_other_models_and_losses_batched_equal_per_point():
    torch.manual_seed(0)
    x, y = image_data(n=12)
    g = torch.Generator().manual_seed(1)
    xs, ys = torch.randn(12, 6, dtype=torch.float64, generator=g), torch.randn(12, 2, dtype=torch.float64, generator=g)
    xt = torch.randn(12, 3, 6, dtype=torch.float64, generator=g)
    yt = torch.randn(12, 3, 2, dtype=torch.float64, generator=g)
    reg = nn.Sequential(nn.Linear(6, 5), nn.ELU(), nn.Linear(5, 2)).double()
    cases = [
        (Residual().double(), nn.NLLLoss(), (x, y)),
        (small_cnn(), CE, (x, y)),
        (reg, nn.MSELoss(), (xs, ys)),  # a regression loss
        (reg, nn.MSELoss(), (xt, yt)),  # (n, T, features) inputs
    ]
    for model, loss_fn, data in cases:
        d = L.random_directions(model, 2, seed=0, ignore=())
        runs = [L.surface(model, loss_fn, data, d, resolution=4, batch_points=bp, progress=False) for bp in (1, 3)]
        assert runs[1].batch_points == 3
        assert np.ptp(runs[0].values) > 1e-3
        np.testing.assert_allclose(runs[1].values, runs[0].values, rtol=0, atol=1e-12)


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
