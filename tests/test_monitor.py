"""The Monitor: scheduling, shared needs, failure policy, and zero side effects on training."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import dyndiag as dd
from dyndiag.probes import Probe
from models import classification_data

CE = nn.CrossEntropyLoss()


def _mlp(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "batchnorm":
        return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 4))
    if kind == "dropout":
        return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 4))
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))


def _train(kind, opt_name, steps, probes=None, seed=0):
    """Seeded mini-batch training; with probes it runs under a Monitor."""
    model = _mlp(kind, seed)
    x, y = classification_data(n=64, dtype=torch.float32)
    if opt_name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    mon = None
    if probes is not None:
        mon = dd.Monitor(model, opt, probes, loss_fn=CE, probe_data=(x[:32], y[:32]))
    torch.manual_seed(123)  # the loop's own randomness: batch order and dropout
    for _ in range(steps):
        idx = torch.randint(0, 64, (16,))
        opt.zero_grad()
        CE(model(x[idx]), y[idx]).backward()
        opt.step()
    if mon is not None:
        mon.close()
    return model, opt, mon, (x, y)


def every_probe(x, y):
    P = dd.probes
    return [
        P.GradientNorm(per_layer=True),
        P.LayerRotation(),
        P.SoftmaxCollapse(),
        P.HessianSpectrum(every=10, k=2, trace_matvecs=6, density=True, num_probes=2, lanczos_steps=5),
        P.EdgeOfStability(every=7),
        P.GradientCoherence(every=9),
        P.DataScores((x[:20], y[:20]), every=13),
        P.DirectionalSharpness(every=5),
        P.SafeStepRadius(every=5),
        P.SubspaceOverlap(every=11, k=2),
    ]


@pytest.mark.slow
@pytest.mark.parametrize("kind,opt_name", [("plain", "sgd"), ("plain", "adam"), ("batchnorm", "sgd"), ("dropout", "adam")])
def test_training_with_every_probe_is_bit_identical(kind, opt_name):
    x, y = classification_data(n=64, dtype=torch.float32)
    ref, ref_opt, _, _ = _train(kind, opt_name, 50)
    ref_rng = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no probe may fail or warn on this healthy run
        got, got_opt, mon, _ = _train(kind, opt_name, 50, probes=every_probe(x, y))
    assert torch.equal(torch.get_rng_state(), ref_rng)  # the dropout stream was untouched
    for a, b in zip(ref.state_dict().values(), got.state_dict().values()):
        assert torch.equal(a, b)
    for pa, pb in zip(ref.parameters(), got.parameters()):
        assert torch.equal(pa.grad, pb.grad)
    sa, sb = ref_opt.state_dict()["state"], got_opt.state_dict()["state"]
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i] if isinstance(sa[i][k], torch.Tensor))
    df = mon.records()
    assert set(df["probe"]) == {p.name for p in every_probe(x, y)}
    assert df["step"].max() == 49 and df.groupby("probe")["step"].min().max() == 0


def test_step_numbering_schedules_and_update_probes_share_the_step():
    calls = []

    class Recorder(Probe):
        def compute(self, ctx):
            calls.append((self.name, ctx.step))
            return {"seen": ctx.step}

    class AfterUpdate(Probe):
        needs = frozenset({"update"})
        phase = "post"

        def compute(self, ctx):
            return {"update_norm": float(ctx.update.norm())}

    model = _mlp("plain")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = classification_data(n=16, dtype=torch.float32)
    with dd.Monitor(model, opt, [Recorder(every=3), Recorder(every=lambda s: s in (1, 4), name="odd"), AfterUpdate(every=2)]) as mon:
        for _ in range(7):
            opt.zero_grad()
            CE(model(x), y).backward()
            before = [p.detach().clone() for p in model.parameters()]
            opt.step()
            update = torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(model.parameters(), before)])
            if mon.step - 1 in (0, 2, 4, 6):
                last_update = float(update.norm())
    assert [s for n, s in calls if n == "recorder"] == [0, 3, 6]
    assert [s for n, s in calls if n == "odd"] == [1, 4]
    df = mon.records()
    upd = df[df.metric == "update_norm"]
    assert list(upd.step) == [0, 2, 4, 6]
    assert math.isclose(upd.value.iloc[-1], last_update, rel_tol=1e-6)
    assert mon.step == 7


def test_failing_probe_is_disabled_with_one_warning_and_nan_is_recorded():
    class Broken(Probe):
        def compute(self, ctx):
            raise ZeroDivisionError("boom")

    class Nan(Probe):
        def compute(self, ctx):
            return {"value": float("nan")}

    model = _mlp("plain")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = classification_data(n=16, dtype=torch.float32)
    broken = Broken()
    with pytest.warns(RuntimeWarning) as record, dd.Monitor(model, opt, [broken, Nan()]) as mon:
        for _ in range(4):
            opt.zero_grad()
            CE(model(x), y).backward()
            opt.step()
    messages = [str(w.message) for w in record]
    assert sum("'broken' failed at step 0" in m and "ZeroDivisionError: boom" in m for m in messages) == 1
    assert sum("non-finite value" in m for m in messages) == 1
    assert broken.enabled is False
    df = mon.records()
    assert df[df.probe == "nan"].value.isna().all() and len(df[df.probe == "nan"]) == 4


def test_a_custom_probes_setup_receives_the_run_context_that_its_steps_carry():
    seen = {}

    class Spy(Probe):
        needs = frozenset({"logits"})

        def setup(self, run):
            seen["setup"] = run

        def compute(self, ctx):
            seen.setdefault("ctx_run", ctx.run)
            return {"n": float(ctx.logits.shape[0])}

    model = _mlp("plain")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = classification_data(n=16, dtype=torch.float32)
    probe_data = (x[:4], y[:4])
    with dd.Monitor(model, opt, [Spy()], loss_fn=CE, probe_data=probe_data) as mon:
        opt.zero_grad()
        CE(model(x), y).backward()
        opt.step()
    run = seen["setup"]
    assert isinstance(run, dd.probes.RunContext) and run is mon.run and seen["ctx_run"] is run
    assert run.model is model and run.optimizer is opt and run.loss_fn is CE and run.probe_data is probe_data
    assert run.names == [n for n, _ in model.named_parameters()]
    assert all(a is b for a, b in zip(run.params, model.parameters(), strict=True))
    assert mon.records().value.tolist() == [16.0]


def test_logits_are_the_last_training_forward_not_the_probes():
    seen = []

    class Peek(Probe):
        needs = frozenset({"logits", "curvature"})

        def compute(self, ctx):
            ctx.hessian.matvec(torch.ones(ctx.hessian.dim))  # a probe's own forward
            seen.append(ctx.logits.clone())
            return {}

    model = _mlp("plain")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = classification_data(n=16, dtype=torch.float32)
    with dd.Monitor(model, opt, [Peek()], loss_fn=CE, probe_data=(x[:4], y[:4])):
        for micro in (x[:8], x[8:]):  # gradient accumulation: the last micro-batch counts
            out = model(micro)
            CE(out, y[: len(micro)]).backward()
        opt.step()
    assert torch.equal(seen[0], out.detach())


def test_closure_driven_steps_skip_gradient_probes_with_a_warning():
    model = _mlp("plain")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = classification_data(n=16, dtype=torch.float32)

    def closure():
        opt.zero_grad()
        loss = CE(model(x), y)
        loss.backward()
        return loss

    with pytest.warns(RuntimeWarning, match="closure"), dd.Monitor(model, opt, [dd.probes.GradientNorm(), dd.probes.LayerRotation()]) as mon:
        for _ in range(3):
            opt.step(closure)
    df = mon.records()
    assert "grad_norm" not in set(df.metric) and "rotation" in set(df.metric)


def test_close_removes_every_hook_and_bad_input():
    model = _mlp("plain")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = dd.Monitor(model, opt, [dd.probes.GradientNorm()])
    mon.close()
    assert not model._forward_hooks
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    mon.close()  # idempotent
    with pytest.raises(ValueError, match="unique"):
        dd.Monitor(model, opt, [dd.probes.GradientNorm(), dd.probes.GradientNorm()])
    with pytest.raises(ValueError, match="need probe_data"):
        dd.Monitor(model, opt, [dd.probes.EdgeOfStability()])
    with pytest.raises(TypeError, match="probes must be"):
        dd.Monitor(model, opt, ["grad_norm"])
    with pytest.raises(TypeError, match="optimizer must be"):
        dd.Monitor(model, None, [])
    with pytest.raises(ValueError, match="every"):
        dd.probes.GradientNorm(every=0)
    assert dd.probes.EdgeOfStability(every=1).name == "edge_of_stability"


TRAIN_SCRIPT = """
import sys, time, torch
from torch import nn
import dyndiag as dd
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
mon = dd.Monitor(model, opt, [dd.probes.GradientNorm(), dd.probes.LayerRotation()], log_dir=sys.argv[1],
                 sync_every=1)  # every step written as it ends
print("start", mon.step, flush=True)
while True:
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    print(mon.step - 1, flush=True)   # this step's records are committed
    time.sleep(0.01)
"""


@pytest.mark.slow
def test_sigkill_mid_training_keeps_every_completed_step_and_resume_continues(tmp_path):
    import signal
    import subprocess
    import sys

    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    log_dir = tmp_path / "run"
    done = []
    for _ in range(2):  # run, kill, run again on the same log_dir, kill
        proc = subprocess.Popen([sys.executable, str(script), str(log_dir)], stdout=subprocess.PIPE, text=True)
        start = int(proc.stdout.readline().split()[1])
        assert start == (done[-1] + 1 if done else 0)  # resumes from the stored counter
        for line in proc.stdout:
            done.append(int(line))
            if len(done) % 15 == 0:
                break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    df = dd.load_records(log_dir)
    steps = sorted(set(df.step))
    assert steps[: len(done)] == done == list(range(len(done)))  # every completed step, no duplicates
    per_step = df.groupby("step").size()
    assert (per_step.loc[done] == per_step.loc[0]).all()  # each completed step is whole



def test_steps_without_a_due_probe_write_nothing_and_close_stores_the_counter(tmp_path):
    import sqlite3
    from contextlib import closing

    def stored_counter():
        with closing(sqlite3.connect(tmp_path / "records.sqlite")) as c:
            return c.execute("SELECT value FROM meta WHERE name = 'next_step'").fetchone()[0]

    model = _mlp("plain")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = classification_data(n=16, dtype=torch.float32)
    mon = dd.Monitor(model, opt, [dd.probes.GradientNorm(every=4)], log_dir=tmp_path, sync_every=1)
    for step in range(10):
        opt.zero_grad()
        CE(model(x), y).backward()
        opt.step()
        if step == 4:  # records() reads every step written so far
            assert sorted(mon.records().step.unique()) == [0, 4]
    assert stored_counter() == 9  # step 8 was the last one written: step 9 wrote nothing
    mon.close()
    assert stored_counter() == 10  # close brings the counter up to the Monitor's
    assert sorted(dd.load_records(tmp_path).step.unique()) == [0, 4, 8]
    with dd.Monitor(model, opt, [dd.probes.GradientNorm(every=4)], log_dir=tmp_path) as mon:
        assert mon.step == 10


def test_probes_due_together_share_one_lanczos_run(monkeypatch):
    import dyndiag.curvature.lanczos as lanczos

    calls = []
    real = lanczos.eigenvalues

    def counting(op, k=1, *args, **kwargs):
        calls.append((k, kwargs.get("return_vectors", False)))
        return real(op, k, *args, **kwargs)

    monkeypatch.setattr(lanczos, "eigenvalues", counting)
    model = _mlp("plain")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = classification_data(n=32, dtype=torch.float64)
    model.double()
    P = dd.probes
    probes = [P.EdgeOfStability(every=2), P.HessianSpectrum(every=2, k=3, trace_matvecs=0),
              P.SubspaceOverlap(every=4, k=4)]
    with dd.Monitor(model, opt, probes, loss_fn=CE, probe_data=(x, y)) as mon:
        for step in range(5):
            opt.zero_grad()
            CE(model(x), y).backward()
            if step == 4:  # the parameters the step-4 probes see (before the update)
                at = [p.detach().clone() for p in model.parameters()]
            opt.step()
    # steps 0 and 4: all three due -> one k=4 run with vectors; step 2: one k=3 run
    assert calls == [(4, True), (3, False), (4, True)]
    df = mon.records()
    for step in (0, 2, 4):
        rows = df[df.step == step].set_index(["metric", "key"]).value
        assert rows[("sharpness", "")] == rows[("eigenvalue", "0")]  # the same run
    H = dd.HessianOperator(model, CE, (x, y), at=at)
    exact = torch.linalg.eigvalsh(H.to_dense()).flip(0)
    last = df[df.step == 4].set_index(["metric", "key"]).value
    assert [last[("eigenvalue", str(i))] for i in range(3)] == pytest.approx(exact[:3].tolist(), rel=1e-4)


def test_batch_size_fn_weights_the_probe_batches_of_curvature_probes():
    model = _mlp("plain").double()
    x, y = classification_data(n=32, dtype=torch.float64)
    batches = [(x[:8], y[:8]), (x[8:], y[8:])]
    weight = lambda batch: 3 if len(batch[0]) == 8 else 1  # noqa: E731 - not the sample counts
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = dd.probes.HessianSpectrum(k=1, trace_matvecs=0, tol=1e-10)
    with dd.Monitor(model, opt, [probe], loss_fn=CE, probe_data=batches, batch_size_fn=weight) as mon:
        opt.zero_grad()
        CE(model(x), y).backward()
        at = [p.detach().clone() for p in model.parameters()]
        opt.step()
    recorded = mon.records().value.iloc[0]
    exact = dd.eigenvalues(dd.HessianOperator(model, CE, batches, batch_size_fn=weight, at=at), k=1, tol=1e-10)
    plain = dd.eigenvalues(dd.HessianOperator(model, CE, batches, at=at), k=1, tol=1e-10)
    assert recorded == pytest.approx(float(exact.values[0]), rel=1e-9)
    assert abs(recorded - float(plain.values[0])) > 1e-6 * recorded  # the weights made a difference
    with pytest.raises(TypeError, match="batch_size_fn"):
        dd.Monitor(model, opt, [], batch_size_fn=3)
