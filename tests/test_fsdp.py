"""FSDP-sharded models (fully_shard) on 2 gloo ranks: local vectors, the operator of the union."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

import dyndiag as dd
from models import classification_data, tanh_mlp
from ranks import on_ranks

fsdp = pytest.importorskip("torch.distributed.fsdp")
if not dist.is_available():
    pytest.skip("torch.distributed not available", allow_module_level=True)

CE = nn.CrossEntropyLoss()
SPLIT = 10  # rank 0 holds 10 samples, rank 1 the other 14: unequal shards


def _sharded_mlp():
    model = tanh_mlp()
    for layer in (model[0], model[2]):
        fsdp.fully_shard(layer)
    fsdp.fully_shard(model)
    return model


def _full_v():
    return torch.linspace(-1, 1, sum(p.numel() for p in tanh_mlp().parameters()), dtype=torch.float64)


def _results(op, tol=1e-10):
    take = (lambda t: t) if op.shards is None else op.shards.take
    out = {
        "top": dd.eigenvalues(op, k=5, tol=tol).values,
        "trace": torch.tensor(dd.trace(op, num_matvecs=30, seed=3).value),
        "Hv": op.matvec(take(_full_v())),
    }
    if op.hvp == "exact":
        out["nodes"] = torch.from_numpy(dd.spectral_density(op, num_probes=2, lanczos_steps=6, seed=1).nodes)
    return out


def _refused(make) -> str:
    try:
        make()
    except ValueError as err:
        return str(err)
    return ""


def _operators(rank: int) -> dict:
    x, y = classification_data()
    shard = slice(0, SPLIT) if rank == 0 else slice(SPLIT, None)
    data = [(x[shard][:4], y[shard][:4]), (x[shard][4:], y[shard][4:])]  # two unequal batches per rank
    model = _sharded_mlp()
    before = [p.to_local().clone() for p in model.parameters()]
    out = {}
    for hvp, tol in (("exact", 1e-10), ("finite_difference", 1e-8)):  # the accuracy of each
        op = dd.HessianOperator(model, CE, data, hvp=hvp)
        out[hvp] = dict(_results(op, tol), index=op.shards.index, dim=op.dim)
    out["auto"] = dd.HessianOperator(model, CE, data).hvp
    ggn = dd.GGNOperator(model, CE, data)
    out["GGNv"] = ggn.matvec(ggn.shards.take(_full_v()))
    out["refused"] = [
        _refused(lambda: dd.HessianOperator(model, CE, iter(data))),  # a pass each rank could read differently
        _refused(lambda: dd.HessianOperator(model, CE, data, at=list(model.parameters()))),
    ]
    out["unchanged"] = all(torch.equal(p.to_local(), b) for p, b in zip(model.parameters(), before))
    out["grads"] = [p.grad for p in model.parameters()]
    # An operator kept across an optimizer step multiplies at the new parameters.
    op, v = dd.HessianOperator(model, CE, data), torch.ones(out["exact"]["dim"], dtype=torch.float64)
    op.matvec(v)
    CE(model(x[shard]), y[shard]).backward()
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    out["after_step"] = (op.matvec(v), dd.HessianOperator(model, CE, data).matvec(v))
    # Finite differences between a backward and a step: FSDP's gradients are put back.
    grads = [(p.grad, p.grad.to_local().clone()) for p in model.parameters()]
    fd = dd.HessianOperator(model, CE, data, hvp="finite_difference").matvec(v)
    out["fd_with_grads"] = (fd, all(p.grad is g and torch.equal(g.to_local(), c) for p, (g, c) in zip(model.parameters(), grads)))
    # Finite differences on a plain (unsharded) model under the same process group:
    # every rank's gradient is its own, and the products are all-reduced.
    out["plain_fd"] = dd.HessianOperator(tanh_mlp(), CE, data, hvp="finite_difference").matvec(_full_v())
    return out


@pytest.mark.slow
def test_two_fsdp_ranks_see_the_operator_of_the_union(tmp_path):
    r0, r1 = on_ranks(_operators, tmp_path)
    full_v = _full_v()
    single = _results(dd.HessianOperator(tanh_mlp(), CE, classification_data()))

    def union(key, a=r0, b=r1):  # the full vector from the two ranks' local ones
        out = torch.empty_like(full_v)
        out[a["index"]], out[b["index"]] = a[key], b[key]
        return out

    for hvp, tol in (("exact", 1e-6), ("finite_difference", 1e-8)):
        a, b = r0[hvp], r1[hvp]
        assert a["dim"] + b["dim"] == full_v.numel() and a["dim"] < full_v.numel()  # local vectors
        keys = [k for k in ("top", "trace", "nodes") if k in a]
        for key in keys:
            assert torch.equal(a[key], b[key]), (hvp, key)  # every rank returns the same numbers
        for key, got in [(k, a[k]) for k in keys] + [("Hv", union("Hv", a, b))]:
            err = ((got - single[key]).norm() / single[key].norm()).item()
            assert err <= tol, (hvp, key, err)
    ggn = dd.GGNOperator(tanh_mlp(), CE, classification_data()).matvec(full_v)
    got = torch.empty_like(full_v)
    got[r0["exact"]["index"]], got[r1["exact"]["index"]] = r0["GGNv"], r1["GGNv"]
    assert (got - ggn).norm() <= 1e-10 * ggn.norm()
    assert "FSDP" in r0["refused"][0] and "at=" in r0["refused"][1]
    assert r0["unchanged"] and r1["unchanged"]
    assert r0["auto"] == r1["auto"] == "finite_difference"  # nothing full-size gathered by default
    for r in (r0, r1):
        kept, fresh = r["after_step"]
        assert torch.equal(kept, fresh)
        fd, restored = r["fd_with_grads"]
        assert restored and (fd - fresh).norm() <= 1e-8 * fresh.norm()
    assert r0["grads"] == [None] * 4  # no .grad appeared
    for r in (r0, r1):
        assert (r["plain_fd"] - single["Hv"]).norm() <= 1e-8 * single["Hv"].norm()


class _Seen(dd.probes.EdgeOfStability):
    """EdgeOfStability that also keeps what it computed on this rank (only rank 0 writes)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seen: dict[int, float] = {}

    def compute(self, ctx):
        out = super().compute(ctx)
        self.seen[ctx.step] = out["sharpness"][""]
        return out


def _curvature_probes():
    P = dd.probes
    return [
        P.HessianSpectrum(every=2, k=3, tol=1e-10, trace_matvecs=9, density=True, num_probes=2, lanczos_steps=5),
        P.SubspaceOverlap(every=2, k=2, tol=1e-10),
        # The cheap probes: their values are DTensors on FSDP, made full when written.
        P.GradientNorm(per_layer=True), P.LayerRotation(), P.SoftmaxCollapse(),
    ]


def _train(model, opt, probes, x, y, **monitor):
    with dd.Monitor(model, opt, probes, loss_fn=CE, probe_data=(x, y), **monitor) as mon:
        for _ in range(4):
            opt.zero_grad()
            CE(model(x), y).backward()
            opt.step()
    return mon


def _monitored(rank: int, log_dir: str) -> dict:
    x, y = classification_data()
    shard = slice(0, 12) if rank == 0 else slice(12, None)  # equal shards: FSDP's mean is the full batch's
    model = _sharded_mlp()
    probe = _Seen(every=2, name="edge_of_stability", tol=1e-10)
    _train(model, torch.optim.SGD(model.parameters(), lr=0.1), [probe, *_curvature_probes()], x[shard], y[shard], log_dir=log_dir)
    return probe.seen


@pytest.mark.slow
def test_edge_of_stability_in_an_fsdp_loop_matches_one_process(tmp_path):
    log_dir = tmp_path / "run"
    seen = on_ranks(_monitored, tmp_path, str(log_dir))
    model = tanh_mlp()
    probes = [dd.probes.EdgeOfStability(every=2, tol=1e-10), *_curvature_probes()]
    single = _train(model, torch.optim.SGD(model.parameters(), lr=0.1), probes, *classification_data()).records()
    df = dd.load_records(log_dir)
    assert not df.duplicated(["step", "probe", "metric", "key"]).any()  # rank 0 alone wrote
    # The spectrum (Lanczos, Hutch++ with the same probes, SLQ) and the gradient's overlap
    # with the top eigenspace (sharded gradient, TSQR of the eigenvectors) as in one process.
    probes = ("hessian_spectrum", "subspace_overlap")
    spectra = [d[d.probe.isin(probes)].set_index(["step", "metric", "key"]).value for d in (df, single)]
    assert len(spectra[0]) == len(spectra[1]) == 2 * 5
    assert ((spectra[0] - spectra[1]).abs() <= 1e-6 * spectra[1].abs()).all(), spectra
    cheap = ("gradient_norm", "layer_rotation", "softmax_collapse")
    rows = [d[d.probe.isin(cheap)].set_index(["step", "probe", "metric", "key"]).value for d in (df, single)]
    assert len(rows[0]) == len(rows[1]) == 4 * 11  # 4 steps of 11 rows
    assert set(rows[0].index.get_level_values("probe")) == set(cheap)
    assert ((rows[0] - rows[1]).abs() <= 1e-12 * rows[1].abs().clip(lower=1e-300)).all(), (rows[0], rows[1])
    single = single[single.metric == "sharpness"].set_index("step").value
    written = df[df.metric == "sharpness"].set_index("step").value
    assert list(written.index) == [0, 2] == list(single.index)
    assert ((written - single).abs() <= 1e-6 * single.abs()).all(), (written, single)
    assert seen[0] == seen[1] == written.to_dict()  # every rank computed the same sharpness
