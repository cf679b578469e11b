"""Snapshots of everything a diagnostic must leave untouched, for side-effect tests."""

import random

import numpy as np
import torch


def snapshot(model, opt=None):
    """Parameters, grads (object and values), requires_grad, modes, buffers, RNGs, optimizer state."""
    snap = {
        "params": [p.detach().clone() for p in model.parameters()],
        "grads": [None if p.grad is None else (id(p.grad), p.grad.clone()) for p in model.parameters()],
        "flags": [p.requires_grad for p in model.parameters()],
        "modes": [m.training for m in model.modules()],
        "buffers": [b.clone() for b in model.buffers()],
        "rng": (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()),
    }
    if opt is not None:
        snap["opt_state"] = {
            id(p): {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in st.items()}
            for p, st in opt.state.items()
        }
        snap["opt_groups"] = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return snap


def assert_same(a, b):
    """Assert two snapshots are identical."""
    assert all(torch.equal(x, y) for x, y in zip(a["params"], b["params"]))
    assert all(
        (x is None and y is None) or (x is not None and y is not None and x[0] == y[0] and torch.equal(x[1], y[1]))
        for x, y in zip(a["grads"], b["grads"])
    )
    assert a["flags"] == b["flags"] and a["modes"] == b["modes"]
    assert all(torch.equal(x, y) for x, y in zip(a["buffers"], b["buffers"]))
    assert torch.equal(a["rng"][0], b["rng"][0]) and np.array_equal(a["rng"][1], b["rng"][1])
    assert a["rng"][2] == b["rng"][2]
    if "opt_state" in a:
        assert a["opt_state"].keys() == b["opt_state"].keys()
        for key, st in a["opt_state"].items():
            other = b["opt_state"][key]
            assert st.keys() == other.keys()
            for k, v in st.items():
                assert torch.equal(v, other[k]) if isinstance(v, torch.Tensor) else v == other[k]
        assert a["opt_groups"] == b["opt_groups"]
