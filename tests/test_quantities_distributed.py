"""Per-example scores and gradient statistics under torch.distributed (2 gloo ranks, CPU)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import dyndiag.quantities as q
from models import batchnorm_mlp, classification_data

CE = nn.CrossEntropyLoss()
N = 11  # odd: a DistributedSampler over 2 ranks pads one index
SPLIT = 4  # contiguous unequal shards: rank 0 holds 4 samples, rank 1 the other 7


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        x, y = classification_data(n=N)
        model = batchnorm_mlp(train=True)
        sampler = DistributedSampler(TensorDataset(x, y), num_replicas=world, rank=rank, shuffle=False)
        loader = DataLoader(TensorDataset(x, y), batch_size=4, sampler=sampler)
        indices = list(sampler)
        shard = slice(0, SPLIT) if rank == 0 else slice(SPLIT, None)
        data = (x[shard], y[shard])
        v = torch.linspace(-1, 1, sum(p.numel() for p in model.parameters()), dtype=torch.float64)
        res = {
            "grand_indexed": q.grand_scores(model, CE, loader, indices=indices, chunk_size=3, progress=False),
            "el2n_indexed": q.el2n_scores(model, loader, indices=indices, progress=False),
            "grand_concat": q.grand_scores(model, CE, data, progress=False),
            "coherence": torch.tensor(q.gradient_coherence(model, CE, data, progress=False), dtype=torch.float64),
            "gsnr": torch.cat([t.reshape(-1) for t in q.gradient_snr(model, CE, data, progress=False).values()]),
            "cosine": torch.tensor(q.gradient_weight_cosine(model, CE, data), dtype=torch.float64),
            "radius": torch.tensor(q.safe_step_radius(model, data, v), dtype=torch.float64),
        }
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
        # Both ranks past their last collective before either tears gloo down: without
        # it a rank's exit while the other's last transfer completes aborted (SIGABRT).
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_return_whole_scores_and_statistics_of_the_union(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for key in r0:
        assert torch.equal(r0[key], r1[key]), key  # every rank returns the same numbers
    x, y = classification_data(n=N)
    model = batchnorm_mlp(train=True)
    grand = q.grand_scores(model, CE, (x, y), progress=False)
    assert r0["grand_indexed"].shape == (N,)  # dataset order, the padded repeat dropped
    assert torch.allclose(r0["grand_indexed"], grand, rtol=1e-12, atol=0)
    assert torch.allclose(r0["el2n_indexed"], q.el2n_scores(model, (x, y), progress=False), rtol=1e-12, atol=0)
    assert torch.allclose(r0["grand_concat"], grand, rtol=1e-12, atol=0)  # rank 0's shard first
    # Reductions over the union of the unequal shards. BatchNorm in train mode: the
    # full-batch gradient of the cosine differs from the union of two shards' batches,
    # so compare with the same two batches in one process.
    shards = [(x[:SPLIT], y[:SPLIT]), (x[SPLIT:], y[SPLIT:])]
    assert abs(float(r0["coherence"]) - q.gradient_coherence(model, CE, (x, y), progress=False)) < 1e-10
    gsnr = torch.cat([t.reshape(-1) for t in q.gradient_snr(model, CE, (x, y), progress=False).values()])
    assert torch.allclose(r0["gsnr"], gsnr, rtol=1e-9, atol=0)
    assert abs(float(r0["cosine"]) - q.gradient_weight_cosine(model, CE, shards)) < 1e-12
    v = torch.linspace(-1, 1, sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    assert abs(float(r0["radius"]) - q.safe_step_radius(model, shards, v)) < 1e-12
