"""FSDP-sharded models (fully_shard) on 2 gloo ranks: local vectors, the operator of the union."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import dyndiag as dd
from models import classification_data, tanh_mlp

fsdp = pytest.importorskip("torch.distributed.fsdp")

CE = nn.CrossEntropyLoss()
SPLIT = 10  # rank 0 holds 10 samples, rank 1 the other 14: unequal shards


def _sharded_mlp():
    model = tanh_mlp()
    for layer in (model[0], model[2]):
        fsdp.fully_shard(layer)
    fsdp.fully_shard(model)
    return model


def _results(op, full_v):
    take = (lambda t: t) if op.shards is None else op.shards.take
    density = dd.spectral_density(op, num_probes=2, lanczos_steps=6, seed=1, progress=False)
    return {
        "top": dd.eigenvalues(op, k=5, tol=1e-10).values,
        "trace": torch.tensor(dd.trace(op, num_matvecs=30, seed=3).value),
        "Hv": op.matvec(take(full_v)),
        "nodes": torch.from_numpy(density.nodes),
    }


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        x, y = classification_data()
        shard = slice(0, SPLIT) if rank == 0 else slice(SPLIT, None)
        model = _sharded_mlp()
        data = [(x[shard][:4], y[shard][:4]), (x[shard][4:], y[shard][4:])]  # two unequal batches per rank
        before = [p.to_local().clone() for p in model.parameters()]
        full_v = torch.linspace(-1, 1, sum(p.numel() for p in model.parameters()), dtype=torch.float64)
        out = {}
        for hvp in ("exact", "finite_difference"):
            op = dd.HessianOperator(model, CE, data, hvp=hvp)
            out[hvp] = _results(op, full_v)
            out[hvp]["index"] = op.shards.index
            out[hvp]["dim"] = op.dim
        out["unchanged"] = all(torch.equal(p.to_local(), b) for p, b in zip(model.parameters(), before))
        out["grads"] = [p.grad for p in model.parameters()]
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # both ranks past their last collective before gloo is torn down
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_fsdp_ranks_see_the_operator_of_the_union(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    model = tanh_mlp()
    full_v = torch.linspace(-1, 1, sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    single = _results(dd.HessianOperator(model, CE, classification_data()), full_v)
    for hvp, tol in (("exact", 1e-6), ("finite_difference", 1e-8)):
        a, b = r0[hvp], r1[hvp]
        assert a["dim"] + b["dim"] == full_v.numel() and a["dim"] < full_v.numel()  # local vectors
        Hv = torch.empty_like(full_v)
        Hv[a["index"]], Hv[b["index"]] = a["Hv"], b["Hv"]  # the union of the shards
        for key in ("top", "trace", "nodes"):
            assert torch.equal(a[key], b[key]), (hvp, key)  # every rank returns the same numbers
        for key, got in (("top", a["top"]), ("trace", a["trace"]), ("Hv", Hv), ("nodes", a["nodes"])):
            err = ((got - single[key]).norm() / single[key].norm()).item()
            assert err <= tol, (hvp, key, err)
    assert r0["unchanged"] and r1["unchanged"]
    assert r0["grads"] == [None] * 4  # no .grad appeared


class _Seen(dd.probes.EdgeOfStability):
    """EdgeOfStability that also keeps what it computed on this rank (only rank 0 writes)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seen: dict[int, float] = {}

    def compute(self, ctx):
        out = super().compute(ctx)
        self.seen[ctx.step] = out["sharpness"][""]
        return out


def _spectrum():
    return dd.probes.HessianSpectrum(every=2, k=3, tol=1e-10, trace_matvecs=9, density=True, num_probes=2, lanczos_steps=5)


def _monitor_worker(rank: int, world: int, init_file: str, log_dir: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        x, y = classification_data()
        shard = slice(0, 12) if rank == 0 else slice(12, None)  # equal shards: FSDP's mean is the full batch's
        model = _sharded_mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        probe = _Seen(every=2, name="edge_of_stability", tol=1e-10)
        with dd.Monitor(model, opt, [probe, _spectrum()], loss_fn=CE, probe_data=(x[shard], y[shard]), log_dir=log_dir):
            for _ in range(4):
                opt.zero_grad()
                CE(model(x[shard]), y[shard]).backward()
                opt.step()
        torch.save(probe.seen, os.path.join(out_dir, f"mon{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_edge_of_stability_in_an_fsdp_loop_matches_one_process(tmp_path):
    log_dir = tmp_path / "run"
    mp.spawn(_monitor_worker, args=(2, str(tmp_path / "init"), str(log_dir), str(tmp_path)), nprocs=2, join=True)
    x, y = classification_data()
    model = tanh_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probes = [dd.probes.EdgeOfStability(every=2, tol=1e-10), _spectrum()]
    with dd.Monitor(model, opt, probes, loss_fn=CE, probe_data=(x, y)) as mon:
        for _ in range(4):
            opt.zero_grad()
            CE(model(x), y).backward()
            opt.step()
    single = mon.records()
    df = dd.load_records(log_dir)
    assert not df.duplicated(["step", "probe", "metric", "key"]).any()  # rank 0 alone wrote
    # The spectrum probe (Lanczos, Hutch++ with the same probes, SLQ) as in one process.
    spectra = [d[d.probe == "hessian_spectrum"].set_index(["step", "metric", "key"]).value for d in (df, single)]
    assert len(spectra[0]) == len(spectra[1]) == 2 * 4
    assert ((spectra[0] - spectra[1]).abs() <= 1e-6 * spectra[1].abs()).all(), spectra
    single = single[single.metric == "sharpness"].set_index("step").value
    written = df[df.metric == "sharpness"].set_index("step").value
    assert list(written.index) == [0, 2] == list(single.index)
    assert ((written - single).abs() <= 1e-6 * single.abs()).all(), (written, single)
    for rank in (0, 1):  # every rank computed the same sharpness
        assert torch.load(tmp_path / f"mon{rank}.pt") == written.to_dict(), rank
