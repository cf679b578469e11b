"""Operators under torch.distributed: 2 gloo processes on CPU see the operator of the union."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import dyndiag as dd
from models import classification_data, tanh_mlp

CE = nn.CrossEntropyLoss()
SPLIT = 10  # rank 0 holds 10 samples, rank 1 the other 14: unequal shards


def _results(op):
    top = dd.eigenvalues(op, k=3, tol=1e-10)
    v = torch.linspace(-1, 1, op.dim, dtype=torch.float64)
    return {
        "top": top.values,
        "trace": torch.tensor(dd.trace(op, num_matvecs=30, seed=3).value),
        "Hv": op.matvec(v),
        "HV": op.matmat(torch.stack([v, v.flip(0)], 1)),
    }


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        x, y = classification_data()
        shard = slice(0, SPLIT) if rank == 0 else slice(SPLIT, None)
        model = tanh_mlp()
        # Loader of two unequal batches per rank, and a DDP-wrapped model's inner module.
        data = [(x[shard][:4], y[shard][:4]), (x[shard][4:], y[shard][4:])]
        ddp = nn.parallel.DistributedDataParallel(model)
        res = _results(dd.HessianOperator(ddp.module, CE, data))
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
        # Both ranks past their last collective before either tears gloo down: without
        # it a rank's exit while the other's last transfer completes aborted (SIGABRT).
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_see_the_operator_of_the_union(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    single = _results(dd.HessianOperator(tanh_mlp(), CE, classification_data()))
    for key in single:
        assert torch.equal(r0[key], r1[key]), key  # every rank returns the same numbers
        err = ((r0[key] - single[key]).norm() / single[key].norm()).item()
        assert err <= 1e-6, (key, err)


def _monitor_worker(rank: int, world: int, init_file: str, log_dir: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        x, y = classification_data()
        shard = slice(0, SPLIT) if rank == 0 else slice(SPLIT, None)
        ddp = nn.parallel.DistributedDataParallel(tanh_mlp())
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        P = dd.probes
        probes = [P.GradientNorm(), P.EdgeOfStability(every=2), P.LayerRotation()]
        with dd.Monitor(ddp, opt, probes, loss_fn=CE, probe_data=(x[shard], y[shard]), log_dir=log_dir) as mon:
            for _ in range(5):
                opt.zero_grad()
                CE(ddp(x[shard]), y[shard]).backward()  # DDP averages gradients across ranks
                opt.step()
        torch.save({"step": mon.step}, os.path.join(out_dir, f"mon{rank}.pt"))
        # Both ranks past their last collective before either tears gloo down: without
        # it a rank's exit while the other's last transfer completes aborted (SIGABRT).
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_monitor_in_a_two_rank_ddp_run_writes_one_set_of_records(tmp_path):
    log_dir = tmp_path / "run"
    mp.spawn(_monitor_worker, args=(2, str(tmp_path / "init"), str(log_dir), str(tmp_path)), nprocs=2, join=True)
    df = dd.load_records(log_dir)
    assert sorted(set(df.step)) == [0, 1, 2, 3, 4]
    assert not df.duplicated(["step", "probe", "metric", "key"]).any()  # rank 0 alone wrote
    assert torch.load(tmp_path / "mon1.pt")["step"] == 5  # every rank counted the steps
    # The snapshot at the end of backward runs after DDP averaged the gradients: without
    # clipping it is the gradient the step applies, not rank 0's own.
    norms = df[df.probe == "gradient_norm"].pivot(index="step", columns="metric", values="value")
    assert (norms.grad_norm_before_clip == norms.grad_norm).all()
    # EdgeOfStability's sharpness at step 0 is the operator of the union of both shards.
    union = dd.eigenvalues(dd.HessianOperator(tanh_mlp(), CE, classification_data()), k=1, tol=1e-10)
    first = df[(df.metric == "sharpness") & (df.step == 0)].value.item()
    assert abs(first - union.values[0].item()) <= 1e-4 * abs(first)
