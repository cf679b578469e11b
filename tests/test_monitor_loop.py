"""The Monitor in the loops people write: no host synchronisation on cheap steps,
gradient clipping and scaling, several param groups, parameters that change, two
monitors on one model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dyndiag as dd
from dyndiag.probes import Probe
from models import classification_data

P = dd.probes
CE = nn.CrossEntropyLoss()


def _mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 4)).to(dtype)


def _grad_norm(params):
    return float(torch.cat([p.grad.reshape(-1) for p in params if p.grad is not None]).double().norm())


def _step(model, opt, x, y):
    opt.zero_grad()
    CE(model(x), y).backward()
    opt.step()


# -- no host synchronisation on cheap steps -------------------------------------------

CONVERSIONS = ("item", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__", "__array__")


@pytest.fixture
def conversions(monkeypatch):
    """Counts every tensor-to-Python conversion made from Python while it is on."""
    count = {"n": 0, "on": False}
    for name in CONVERSIONS:
        real = getattr(torch.Tensor, name)

        def counting(self, *args, _real=real, **kwargs):
            if count["on"]:
                count["n"] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    return count


def test_cheap_steps_make_no_host_synchronisation_and_one_copy_brings_their_values(conversions, tmp_path):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = classification_data(n=32, dtype=torch.float32)
    probes = [P.GradientNorm(per_layer=True), P.LayerRotation(), P.SoftmaxCollapse(),
              P.EdgeOfStability(every=6, tol=1e-3)]
    per_step = []
    with dd.Monitor(model, opt, probes, loss_fn=CE, probe_data=(x[:8], y[:8]), log_dir=tmp_path, sync_every=4):
        for step in range(12):
            conversions.update(n=0, on=True)
            _step(model, opt, x, y)  # forward, backward (the gradient snapshot), step
            conversions["on"] = False
            per_step.append(conversions["n"])
    # Curvature at steps 0 and 6 (which also write what waits); the queue is written after
    # steps 3-ish: sync_every=4 counts from the oldest step waiting (1 -> written after 4; 7 -> 10).
    cheap = [s for s in range(12) if s not in (0, 6, 4, 10)]
    assert [per_step[s] for s in cheap] == [0] * len(cheap), per_step
    assert per_step[4] > 0 and per_step[0] > 0  # the counter sees conversions
    df = dd.load_records(tmp_path)
    assert sorted(df.step.unique()) == list(range(12))
    assert set(df[df.step == 11].metric) == {"grad_norm", "grad_norm_before_clip", "rotation", "collapsed_fraction"}


def _run(sync_every, log_dir=None, steps=9, fail_at=None):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = classification_data(n=32, dtype=torch.float32)
    probes = [P.GradientNorm(per_layer=True), P.LayerRotation(), P.SoftmaxCollapse(),
              P.EdgeOfStability(every=5, tol=1e-3)]
    torch.manual_seed(1)
    try:
        with dd.Monitor(model, opt, probes, loss_fn=CE, probe_data=(x[:8], y[:8]), log_dir=log_dir,
                        sync_every=sync_every) as mon:
            for step in range(steps):
                idx = torch.randint(0, 32, (16,))
                _step(model, opt, x[idx], y[idx])
                if step == fail_at:
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    df = mon.records() if log_dir is None else dd.load_records(log_dir)
    return df.drop(columns=["wall_time"] + (["run"] if "run" in df else [])).reset_index(drop=True)


def test_deferred_records_are_the_rows_and_values_of_immediate_ones(tmp_path):
    now = _run(1, tmp_path / "now")
    assert len(now) > 0
    for sync_every in (3, 100):
        assert _run(sync_every, tmp_path / f"every{sync_every}").equals(now)
        assert _run(sync_every).equals(now)  # records in memory
    # An exception leaves the with-block: what waited is written.
    interrupted = _run(100, tmp_path / "interrupted", fail_at=7)
    assert interrupted.equals(now[now.step <= 7].reset_index(drop=True))


def test_steps_wait_at_most_sync_every_steps_and_flush_writes_them(tmp_path):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = classification_data(n=16, dtype=torch.float32)
    mon = dd.Monitor(model, opt, [P.GradientNorm(every=2)], log_dir=tmp_path, sync_every=5)
    written = []
    for _ in range(8):
        _step(model, opt, x, y)
        stored = (tmp_path / "records.sqlite").exists()
        written.append(sorted(dd.load_records(tmp_path).step.unique()) if stored else [])
    assert written[3] == [] and written[4] == [0, 2, 4]  # step 0 waited 5 steps
    assert written[7] == [0, 2, 4]
    rows = mon.flush()
    assert [r[0] for r in rows] == [6, 6] and {r[2] for r in rows} == {"grad_norm", "grad_norm_before_clip"}
    assert sorted(dd.load_records(tmp_path).step.unique()) == [0, 2, 4, 6]
    mon.close()
    with pytest.raises(ValueError, match="sync_every"):
        dd.Monitor(model, opt, [], sync_every=0)


# -- clipping and scaling ---------------------------------------------------------------


def _norms(df, step):
    rows = df[(df.step == step) & (df.key == "")].set_index("metric").value
    return rows["grad_norm"], rows["grad_norm_before_clip"]


@pytest.mark.parametrize("accumulate", [1, 3])
def test_clip_grad_norm_gives_the_applied_norm_and_the_one_before_clipping(accumulate):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = classification_data(n=48, dtype=torch.float32)
    seen = []
    with dd.Monitor(model, opt, [P.GradientNorm()]) as mon:
        for step in range(3):
            opt.zero_grad()
            for micro in range(accumulate):  # gradient accumulation: the sum of the micro-batches
                sl = slice(16 * micro, 16 * micro + 16)
                (CE(model(x[sl]), y[sl]) / accumulate).backward()
            before = float(nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.05))
            seen.append((_grad_norm(model.parameters()), before))
            opt.step()
    df = mon.records()
    for step, (applied, before) in enumerate(seen):
        got_applied, got_before = _norms(df, step)
        assert before > 0.05 and got_applied == pytest.approx(applied, rel=1e-5) and applied <= 0.05 + 1e-6
        assert got_before == pytest.approx(before, rel=1e-5)


def test_grad_scaler_norms_are_unscaled_before_and_after_clipping():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = classification_data(n=16, dtype=torch.float32)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    seen = []
    with dd.Monitor(model, opt, [P.GradientNorm()], grad_scaler=scaler) as mon:
        for _ in range(3):
            opt.zero_grad()
            scaler.scale(CE(model(x), y)).backward()
            scaler.unscale_(opt)
            before = float(nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.05))
            seen.append((_grad_norm(model.parameters()), before))
            scaler.step(opt)
            scaler.update()
    df = mon.records()
    for step, (applied, before) in enumerate(seen):
        got_applied, got_before = _norms(df, step)
        assert got_applied == pytest.approx(applied, rel=1e-5) and got_before == pytest.approx(before, rel=1e-5)
    with pytest.raises(TypeError, match="grad_scaler"):
        dd.Monitor(model, opt, [], grad_scaler=2.0)


# -- param groups --------------------------------------------------------------------------


def _two_groups(opt_name, model):
    groups = [{"params": model[0].parameters(), "lr": 0.05}, {"params": list(model[2].parameters()) +
                                                                list(model[4].parameters()), "lr": 0.2}]
    if opt_name == "sgd":
        return torch.optim.SGD(groups, lr=0.1, momentum=0.5)
    return torch.optim.Adam(groups, lr=1e-2)


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_edge_of_stability_records_each_groups_block_against_its_threshold(opt_name):
    model = _mlp(dtype=torch.float64)
    x, y = classification_data(n=32)
    opt = _two_groups(opt_name, model)
    probes = [P.EdgeOfStability(every=3, tol=1e-10), P.EdgeOfStability(every=3, tol=1e-10, group=1, name="one")]
    with dd.Monitor(model, opt, probes, loss_fn=CE, probe_data=(x, y)) as mon:
        for step in range(4):
            opt.zero_grad()
            CE(model(x), y).backward()
            if step == 3:  # what the step-3 probes see
                at = [p.detach().clone() for p in model.parameters()]
                grads = [p.grad.detach().clone() for p in model.parameters()]
                state = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()}
            opt.step()
    df = mon.records()
    rows = df[(df.step == 3) & (df.probe == "edge_of_stability")].set_index(["metric", "key"]).value
    H = dd.HessianOperator(model, CE, (x, y), at=at).to_dense()
    sizes = [p.numel() for p in model.parameters()]
    bounds = torch.tensor([0] + sizes).cumsum(0)
    index = {id(p): i for i, p in enumerate(model.parameters())}
    for g, group in enumerate(opt.param_groups):
        idx = torch.cat([torch.arange(bounds[index[id(p)]], bounds[index[id(p)] + 1]) for p in group["params"]])
        block = H[idx][:, idx]
        assert rows[("sharpness", str(g))] == pytest.approx(float(torch.linalg.eigvalsh(block)[-1]), rel=1e-7)
        lr, b = group["lr"], (group["momentum"] if opt_name == "sgd" else group["betas"][0])
        want = (2 + 2 * b) / lr if opt_name == "sgd" else (2 + 2 * b) / ((1 - b) * lr)
        assert rows[("threshold", str(g))] == pytest.approx(want)
        if opt_name == "adam":  # P of the coming step: t + 1, v updated with this gradient
            b1, b2 = group["betas"]
            g_flat = torch.cat([grads[index[id(p)]].reshape(-1) for p in group["params"]])
            v = torch.cat([state[id(p)]["exp_avg_sq"].reshape(-1) for p in group["params"]])
            t = float(state[id(group["params"][0])]["step"]) + 1
            v = b2 * v + (1 - b2) * g_flat**2
            pre = (1 - b1**t) * ((v / (1 - b2**t)).sqrt() + group["eps"])
            scaled = block / pre.sqrt()[:, None] / pre.sqrt()[None, :]
            assert rows[("preconditioned_sharpness", str(g))] == pytest.approx(
                float(torch.linalg.eigvalsh(scaled)[-1]), rel=1e-7)
    one = df[(df.step == 3) & (df.probe == "one")]
    assert set(one.key) == {"1", ""} and set(one[one.key == ""].metric) == {"loss"}
    assert one.set_index(["metric", "key"]).value[("sharpness", "1")] == rows[("sharpness", "1")]
    with pytest.raises(ValueError, match="group"):
        P.EdgeOfStability(group=-1)


# -- the Monitor follows the optimizer --------------------------------------------------


def test_progressive_unfreezing_enters_every_probe_from_the_next_step_and_freezing_leaves():
    model = _mlp(dtype=torch.float64)
    x, y = classification_data(n=32)
    for p in list(model[0].parameters()) + list(model[2].parameters()):
        p.requires_grad_(False)
    opt = torch.optim.SGD(model[4].parameters(), lr=0.1)
    probes = [P.GradientNorm(per_layer=True), P.LayerRotation(), P.EdgeOfStability(tol=1e-10)]
    names = lambda layers: {f"{i}.{w}" for i in layers for w in ("weight", "bias")}  # noqa: E731
    seen = {}
    with dd.Monitor(model, opt, probes, loss_fn=CE, probe_data=(x, y)) as mon:
        for step in range(8):
            if step == 3:  # unfreeze the middle layer into its own group
                model[2].requires_grad_(True)
                opt.add_param_group({"params": model[2].parameters(), "lr": 0.05})
                middle_at_3 = [p.detach().clone() for p in model[2].parameters()]
            if step == 6:  # freeze the head
                model[4].requires_grad_(False)
            opt.zero_grad()
            CE(model(x), y).backward()
            trained = [p for p in model.parameters() if p.requires_grad]
            seen[step] = (_grad_norm(trained), [p.detach().clone() for p in model.parameters()])
            opt.step()
    df = mon.records()
    def keys(probe, metric, step):
        return set(df[(df.probe == probe) & (df.metric == metric) & (df.step == step)].key)

    for step, layers in ((2, [4]), (3, [2, 4]), (5, [2, 4]), (6, [2]), (7, [2])):
        assert keys("gradient_norm", "grad_norm", step) == names(layers) | {""}
        assert keys("layer_rotation", "rotation", step) == names(layers)
        total = df[(df.metric == "grad_norm") & (df.key == "") & (df.step == step)].value.item()
        assert total == pytest.approx(seen[step][0], rel=1e-10)
        before = df[(df.metric == "grad_norm_before_clip") & (df.step == step)].value.item()
        assert before == pytest.approx(seen[step][0], rel=1e-10)  # no clipping: the same gradient
    assert keys("edge_of_stability", "sharpness", 2) == {""}
    assert keys("edge_of_stability", "sharpness", 3) == {"0", "1"}
    assert keys("edge_of_stability", "sharpness", 6) == {"1"}  # group 0 is all frozen now
    rot = df[(df.probe == "layer_rotation")].set_index(["step", "key"]).value
    assert rot[(3, "2.weight")] == 0 and rot[(3, "2.bias")] == 0  # reference taken when it entered
    w5 = seen[5][1][2].reshape(-1)
    w3 = middle_at_3[0].reshape(-1)
    assert rot[(5, "2.weight")] == pytest.approx(1 - float(w5 @ w3 / (w5.norm() * w3.norm())), abs=1e-12)
    # EdgeOfStability at step 7 on the middle layer alone (the only trained one).
    at = seen[7][1]
    H = dd.HessianOperator(model, CE, (x, y), params=list(model[2].parameters()), at=at[2:4]).to_dense()
    sharp = df[(df.metric == "sharpness") & (df.step == 7)].value.item()
    assert sharp == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-7)


# -- isolation ----------------------------------------------------------------------------------


def test_two_monitors_on_one_model_do_not_see_each_others_probe_forwards():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = classification_data(n=16, dtype=torch.float32)
    shapes = []

    class Shape(Probe):
        needs = frozenset({"logits"})

        def compute(self, ctx):
            shapes.append(tuple(ctx.logits.shape))
            return {}

    first = dd.Monitor(model, opt, [P.EdgeOfStability(tol=1e-3), Shape()], loss_fn=CE, probe_data=(x[:5], y[:5]))
    second = dd.Monitor(model, opt, [Shape(), P.EdgeOfStability(tol=1e-3)], loss_fn=CE, probe_data=(x[:3], y[:3]))
    for _ in range(2):
        opt.zero_grad()
        CE(model(x), y).backward()
        dd.HessianOperator(model, CE, (x[:7], y[:7])).loss()  # a quantity evaluated inside the loop
        opt.step()
    first.close()
    second.close()
    assert shapes == [(16, 4)] * 4


def test_meta_and_uninitialised_parameters_are_refused_at_attach():
    meta = nn.Linear(3, 2, device="meta")
    with pytest.raises(ValueError, match="meta device.*'weight'"):
        dd.Monitor(meta, torch.optim.SGD(meta.parameters(), lr=0.1), [P.GradientNorm()])
    lazy = nn.Sequential(nn.LazyLinear(2))
    with pytest.raises(ValueError, match="uninitialised.*'0.weight'"):
        dd.Monitor(lazy, torch.optim.SGD(lazy.parameters(), lr=0.1), [P.GradientNorm()])
