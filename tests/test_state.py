"""preserve_state restores everything a diagnostic could disturb, also after an exception."""

import random

import numpy as np
import pytest
import torch
from torch import nn

from dyndiag.state import preserve_state
from models import batchnorm_mlp, classification_data


def _trained():
    model = nn.Sequential(batchnorm_mlp(), nn.Dropout(0.2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = classification_data()
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt, (x, y)


def _vandalise(model, opt, batch):
    x, y = batch
    model.eval()
    model[0][0].weight.requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        for g in (p.grad for p in model.parameters() if p.grad is not None):
            g.mul_(3.0)
    model.train()
    model(x)  # moves BatchNorm running statistics
    for st in opt.state.values():
        st["exp_avg"].add_(1.0)
        st["extra"] = torch.ones(1)
    opt.state[nn.Parameter(torch.zeros(1))] = {"step": torch.tensor(1.0)}
    torch.randn(10), np.random.rand(), random.random()
    model[0][0].weight.grad = None
    raise RuntimeError("boom")


def test_everything_is_restored_after_an_exception():
    model, opt, batch = _trained()
    model.eval()
    params = [p.detach().clone() for p in model.parameters()]
    grads = [(p.grad, p.grad.clone()) for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    opt_state = {id(p): {k: v.clone() for k, v in st.items()} for p, st in opt.state.items()}
    opt_objects = {id(p): {k: v for k, v in st.items()} for p, st in opt.state.items()}
    rng = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())

    with pytest.raises(RuntimeError, match="boom"):
        with preserve_state(model, opt, params=True):
            _vandalise(model, opt, batch)

    assert all(torch.equal(a, p) for a, p in zip(params, model.parameters()))
    assert all(p.grad is g and torch.equal(p.grad, v) for p, (g, v) in zip(model.parameters(), grads))
    assert all(p.requires_grad for p in model.parameters())
    assert not any(m.training for m in model.modules())
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    assert set(map(id, opt.state)) == set(opt_state)
    for p, st in opt.state.items():
        assert set(st) == set(opt_state[id(p)])
        for k, v in st.items():
            assert v is opt_objects[id(p)][k] and torch.equal(v, opt_state[id(p)][k])
    assert torch.equal(torch.get_rng_state(), rng[0])
    assert np.array_equal(np.random.get_state()[1], rng[1]) and random.getstate() == rng[2]


def test_params_are_not_copied_unless_asked():
    model, opt, batch = _trained()
    before = [p.detach().clone() for p in model.parameters()]
    with preserve_state(model):
        with torch.no_grad():
            next(model.parameters()).add_(1.0)
    # params=False: the guard documents that it leaves parameter values alone.
    assert not torch.equal(next(model.parameters()), before[0])


def test_unchanged_tensors_are_not_written_back():
    # A write-back would bump versions and break the user's pending backward.
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).eval()
    x = torch.randn(8, 4)
    loss = model(x).square().sum()  # eval BatchNorm saves its running stats for backward
    versions = [t._version for t in list(model.parameters()) + list(model.buffers())]
    with preserve_state(model, params=True):
        pass
    assert versions == [t._version for t in list(model.parameters()) + list(model.buffers())]
    loss.backward()  # would raise "modified by an inplace operation" after a write-back
    assert model[0].weight.grad is not None
