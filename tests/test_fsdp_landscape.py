"""Loss landscapes of an FSDP-sharded model (fully_shard) on 2 gloo ranks: directions and
surfaces equal one process's, and the sharded model is left as it was."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

import dyndiag as dd
import dyndiag.landscape as L
from models import classification_data, tanh_mlp
from ranks import on_ranks
from test_fsdp import _sharded_mlp  # hidden width 7: rows split 4/3, unequal shards

pytest.importorskip("torch.distributed.fsdp")
if not dist.is_available():
    pytest.skip("torch.distributed not available", allow_module_level=True)

CE = nn.CrossEntropyLoss()
SPLIT = 10  # data_parallel: rank 0 holds 10 samples, rank 1 the other 14
KW = dict(resolution=4, extent=0.5, progress=False)  # 16 points


def _path(state: dict) -> list[dict]:
    """Two checkpoints that, with ``state`` last, span two dimensions around it."""
    return [{k: v * 1.1 for k, v in state.items()}, {k: v * 1.2 + 0.05 * v * v for k, v in state.items()}]


def _landscapes(model, data, shard) -> dict:
    """Everything the test compares, computed on ``model`` (sharded or not)."""
    out = {
        "filter": L.random_directions(model, n=2, seed=3),
        "all": L.random_directions(model, n=2, seed=4, ignore=(), orthogonalize=True),
    }
    dirs = out["filter"]
    out["split"] = L.surface(model, CE, data, dirs, **KW)
    out["split_points"] = L.surface(model, CE, data, dirs, batch_points=1, **KW)
    out["parallel"] = L.surface(model, CE, shard, dirs, data_parallel=True, **KW)
    out["line"] = L.surface(model, CE, data, out["all"][0], **KW)
    last = [model[2].weight]  # a subset of the (sharded) parameters
    out["subset"] = L.surface(model, CE, data, L.random_directions(model, n=1, seed=5, params=last), params=last, **KW)
    out["eigen"] = L.eigen_directions(dd.HessianOperator(model, CE, data), k=2, tol=1e-12)
    # A path of state_dicts (DTensor entries under FSDP) ending at the model itself.
    traj = L.trajectory_directions([*_path(model.state_dict())[:2], model], n=2)
    out["trajectory"] = (traj.directions, torch.from_numpy(traj.path))
    for key in ("split", "split_points", "parallel", "line", "subset"):
        out[key] = torch.from_numpy(out[key].values)
    return out


def _rank(rank: int) -> dict:
    x, y = classification_data()
    part = slice(0, SPLIT) if rank == 0 else slice(SPLIT, None)
    model = _sharded_mlp()
    params = list(model.parameters())
    before = [(p.to_local().clone(), p.requires_grad, p.grad) for p in params]
    out = _landscapes(model, [(x[:16], y[:16]), (x[16:], y[16:])], [(x[part], y[part])])
    out["unchanged"] = list(model.parameters()) == params and all(
        type(p).__name__ == "DTensor" and torch.equal(p.to_local(), v) and p.requires_grad == g and p.grad is d
        for p, (v, g, d) in zip(params, before)
    )
    out["train"] = all(m.training for m in model.modules())
    # The model still trains under FSDP after the landscape (its hooks are back).
    CE(model(x), y).backward()
    out["grads"] = all(type(p.grad).__name__ == "DTensor" for p in params)
    return out


@pytest.mark.slow
def test_landscapes_of_an_fsdp_model_equal_one_process(tmp_path):
    r0, r1 = on_ranks(_rank, tmp_path)
    x, y = classification_data()
    model = tanh_mlp()
    single = _landscapes(model, [(x[:16], y[:16]), (x[16:], y[16:])], [(x, y)])
    for r in (r0, r1):
        assert r["unchanged"] and r["train"] and r["grads"]
        for key in ("filter", "all"):  # the same seed draws the same full-size directions
            assert all(torch.equal(a, b) for a, b in zip(r[key], single[key])), key
        for key in ("split", "split_points", "parallel", "line", "subset"):
            err = ((r[key] - single[key]).norm() / single[key].norm()).item()
            assert err <= 1e-10, (key, err)
        for a, b in zip(r["eigen"], single["eigen"]):
            assert a.shape == b.shape and (a - b).norm() <= 1e-6, (a - b).norm()
        (dirs, path), (dirs1, path1) = r["trajectory"], single["trajectory"]
        assert all((a - b).norm() <= 1e-10 for a, b in zip(dirs, dirs1))
        assert (path - path1).abs().max() <= 1e-10
    assert torch.equal(r0["split"], r1["split"]) and torch.equal(r0["parallel"], r1["parallel"])
