"""dyndiag.landscape.trajectory_directions: PCA of a training path."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import dyndiag.landscape as L
from tests.models import classification_data, tanh_mlp

CE = nn.CrossEntropyLoss()


def planar_path(dim=50, T=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(dim, 2, generator=g, dtype=torch.float64))
    u, v = Q[:, 0], Q[:, 1]
    center = torch.randn(dim, generator=g, dtype=torch.float64)
    a = torch.linspace(3.0, 0.0, T + 1, dtype=torch.float64)
    b = torch.sin(torch.linspace(0.0, 3.0, T + 1, dtype=torch.float64)) * (a + 0.5)
    b = b - b[-1]  # last point at the centre
    thetas = [center + a[t] * u + b[t] * v for t in range(T + 1)]
    return thetas, u, v, center, torch.stack([a, b], 1).numpy()


def test_planar_path_recovers_plane_variance_and_coordinates():
    thetas, u, v, center, ab = planar_path()
    traj = L.trajectory_directions(thetas, n=2)
    assert isinstance(traj, L.TrajectoryDirections) and len(traj) == 2
    D = torch.stack(list(traj))
    assert D.shape == (2, 50) and D.dtype == torch.float64
    assert torch.allclose(D @ D.T, torch.eye(2, dtype=torch.float64), atol=1e-12)
    P = torch.stack([u, v])  # orthonormal basis of the plane
    for d in traj:
        assert (d - P.T @ (P @ d)).norm() < 1e-10
    assert abs(traj.explained_variance.sum() - 1.0) < 1e-12
    assert traj.explained_variance[0] >= traj.explained_variance[1] > 0
    assert traj.path.shape == (9, 2)
    # same coordinates up to a rotation/reflection: equal Gram matrices
    np.testing.assert_allclose(traj.path @ traj.path.T, ab @ ab.T, atol=1e-10)
    np.testing.assert_allclose(traj.path[-1], 0.0, atol=1e-12)
    # path is the projection (theta_t - center) . d_k
    X = torch.stack(thetas) - center
    np.testing.assert_allclose(traj.path, (X @ D.T).numpy(), atol=1e-12)


def test_noise_leaves_variance_unexplained_and_n1_is_top_component():
    thetas, *_ = planar_path()
    g = torch.Generator().manual_seed(1)
    noisy = [t + 0.05 * torch.randn(t.shape, generator=g, dtype=t.dtype) for t in thetas]
    traj = L.trajectory_directions(noisy, n=2)
    assert 0.9 < traj.explained_variance.sum() < 1.0 - 1e-6
    one = L.trajectory_directions(noisy, n=1)
    assert len(one) == 1
    assert torch.allclose(one[0], traj[0], atol=1e-12)


def test_custom_center_and_sign_convention():
    thetas, *_ = planar_path()
    traj = L.trajectory_directions(thetas, n=2, center=thetas[0])
    np.testing.assert_allclose(traj.path[0], 0.0, atol=1e-12)
    for d in traj:
        assert d[d.abs().argmax()] > 0


def _sgd_checkpoints(steps=12):
    model = tanh_mlp()
    x, y = classification_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    modules, states, flats = [], [], []

    def save():
        modules.append(copy.deepcopy(model))
        states.append({k: t.clone() for k, t in model.state_dict().items()})
        flats.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone())

    save()
    for _ in range(steps):
        opt.zero_grad()
        CE(model(x), y).backward()
        opt.step()
        save()
    return model, (x, y), modules, states, flats


def test_modules_state_dicts_and_flat_tensors_agree():
    _, _, modules, states, flats = _sgd_checkpoints()
    a = L.trajectory_directions(modules)
    b = L.trajectory_directions(states)
    c = L.trajectory_directions(flats)
    d = L.trajectory_directions(states, params_of=modules[0])
    for other in (b, c, d):
        for x, y in zip(a, other):
            assert torch.equal(x, y)
        np.testing.assert_array_equal(a.path, other.path)
        np.testing.assert_array_equal(a.explained_variance, other.explained_variance)
    assert a.directions == list(a) and type(a.directions) is list


def test_state_dict_skips_batchnorm_statistics_and_frozen_params_with_params_of():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double()
    m[2].bias.requires_grad_(False)
    ckpts = []
    for k in range(3):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.1 * (k + 1) * torch.randn_like(p))
            m.train()(torch.randn(8, 3, dtype=torch.float64))  # moves running stats
        ckpts.append({k_: t.clone() for k_, t in m.state_dict().items()})
    dim = sum(p.numel() for p in m.parameters() if p.requires_grad)
    traj = L.trajectory_directions(ckpts, params_of=m)
    assert traj[0].shape == (dim,)
    # without params_of: every floating entry except BN statistics (frozen bias included)
    assert L.trajectory_directions(ckpts)[0].shape == (dim + 2,)


def test_bad_input():
    thetas, *_ = planar_path(T=3)
    with pytest.raises(ValueError, match="checkpoints"):
        L.trajectory_directions(thetas[:1])
    with pytest.raises(ValueError, match="n must"):
        L.trajectory_directions(thetas, n=0)
    with pytest.raises(ValueError, match="n must"):
        L.trajectory_directions(thetas, n=4)  # only 3 differences
    with pytest.raises(ValueError, match="checkpoints"):
        L.trajectory_directions([thetas[0], thetas[1][:-1]], n=1)
    with pytest.raises(ValueError, match="center"):
        L.trajectory_directions(thetas, center=thetas[0][:-1])
    with pytest.raises(ValueError, match="checkpoints"):
        L.trajectory_directions([thetas[0].reshape(5, 10), thetas[1].reshape(5, 10)], n=1)
    with pytest.raises(ValueError, match="fewer than n"):
        L.trajectory_directions([thetas[0]] * 3, n=1)
    with pytest.raises(TypeError, match="checkpoints"):
        L.trajectory_directions(torch.stack(thetas))
    with pytest.raises(TypeError, match="checkpoints\\[1\\]"):
        L.trajectory_directions([thetas[0], "x"], n=1)


def test_surface_around_final_model_covers_the_path():
    final, data, modules, _, _ = _sgd_checkpoints()
    before = [p.detach().clone() for p in final.parameters()]
    traj = L.trajectory_directions(modules, n=2)
    assert traj.explained_variance.sum() <= 1.0 + 1e-12
    np.testing.assert_allclose(traj.path[-1], 0.0, atol=1e-12)
    extent = traj.extent()
    assert extent == pytest.approx(1.2 * np.abs(traj.path).max())
    surf = L.surface(final, CE, data, traj, extent=extent, resolution=5, progress=False)
    surf2 = L.surface(final, CE, data, traj.directions, extent=extent, resolution=5, progress=False)
    np.testing.assert_array_equal(surf.values, surf2.values)
    assert surf.values.shape == (5, 5) and np.isfinite(surf.values).all()
    for k in range(2):
        assert surf.coords[k].min() <= traj.path[:, k].min() and traj.path[:, k].max() <= surf.coords[k].max()
    # the centre of the surface is the final model's loss
    assert surf.values[2, 2] == pytest.approx(float(CE(final(data[0]), data[1]).detach()), rel=1e-12)
    # with n = rank the first checkpoint is exactly centre + its path coordinates
    full = L.trajectory_directions(modules, n=len(modules) - 1)
    theta = torch.cat([p.detach().reshape(-1) for p in final.parameters()])
    point = theta + sum(c * d for c, d in zip(full.path[0], full))
    first = torch.cat([p.detach().reshape(-1) for p in modules[0].parameters()])
    assert torch.allclose(point, first, atol=1e-10)
    assert all(torch.equal(a, b) for a, b in zip(before, final.parameters()))
