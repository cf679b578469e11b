"""``torch.compile``d models everywhere: read through the module inside, the numbers of
the uncompiled model, training untouched, and nothing compiled or recompiled by dyndiag.

Compiles use the cheap ``aot_eager`` backend (the AOTAutograd graph that has no double
backward, without code generation); one test runs the default inductor backend.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

torch_dynamo = pytest.importorskip("torch._dynamo")
from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402

import dyndiag as dd  # noqa: E402
from dyndiag.evaluation import hook_module, is_compiled, unwrap  # noqa: E402
from dyndiag.quantities.gradients import mean_gradient  # noqa: E402
from dyndiag.quantities.softmax import collapsed_fraction  # noqa: E402
from tests.models import classification_data, tanh_mlp  # noqa: E402

P = dd.probes
LOSS = nn.CrossEntropyLoss()
D = sum(p.numel() for p in tanh_mlp().parameters())  # 81


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # Dynamo's caches are per process: every test counts its own compiles, and none
    # runs into the cache-size limit (past it Dynamo silently runs eagerly).
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compiled(model: nn.Module) -> tuple[nn.Module, CompileCounterWithBackend]:
    counter = CompileCounterWithBackend("aot_eager")
    return torch.compile(model, backend=counter), counter


def _dropout_bn_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 7), nn.BatchNorm1d(7), nn.Tanh(), nn.Dropout(0.2), nn.Linear(7, 4)
    ).double()


def test_unwrap_reads_the_module_inside_compile_and_data_parallel_in_any_order():
    m = tanh_mlp()
    compiled = torch.compile(m, backend="eager")
    assert is_compiled(compiled) and not is_compiled(m)
    assert unwrap(compiled) is m
    assert unwrap(torch.compile(nn.DataParallel(m), backend="eager")) is m
    assert unwrap(nn.DataParallel(compiled)) is m
    assert unwrap(m) is m
    # Forward hooks go on the compiled wrapper (they run around its graph), else inside DDP/DP.
    assert hook_module(compiled) is compiled
    assert hook_module(nn.DataParallel(compiled)) is compiled
    assert hook_module(nn.DataParallel(m)) is m


def _train_compiled_once(model, x, y):
    run, counter = _compiled(model)
    LOSS(run(x), y).backward()
    model.zero_grad(set_to_none=True)
    assert counter.frame_count == 1
    return run, counter


ENTRY_POINTS = {
    "hessian_matmat": lambda m, x, y: dd.HessianOperator(m, LOSS, (x, y)) @ torch.eye(D, dtype=torch.float64)[:, :3],
    "ggn_matvec": lambda m, x, y: dd.GGNOperator(m, LOSS, (x, y)) @ torch.ones(D, dtype=torch.float64),
    "eigenvalues": lambda m, x, y: dd.eigenvalues(dd.HessianOperator(m, LOSS, (x, y)), k=2).values,
    "grand": lambda m, x, y: dd.grand_scores(m, LOSS, (x, y), progress=False),
    "el2n": lambda m, x, y: dd.el2n_scores(m, (x, y), progress=False),
    "coherence": lambda m, x, y: torch.tensor(dd.gradient_coherence(m, LOSS, (x, y), progress=False)),
    "gsnr": lambda m, x, y: dd.gradient_snr(m, LOSS, (x, y), progress=False),
    "mean_gradient": lambda m, x, y: mean_gradient(m, LOSS, (x, y)),
    "safe_step_radius": lambda m, x, y: torch.tensor(
        dd.safe_step_radius(m, (x, y), torch.ones(D, dtype=torch.float64))),
    "layer_rotation": lambda m, x, y: dd.layer_rotation(m, tanh_mlp(seed=1)),
    "random_directions": lambda m, x, y: torch.stack(dd.landscape.random_directions(m, n=2, seed=3)),
    "surface": lambda m, x, y: torch.as_tensor(dd.landscape.surface(
        m, LOSS, (x, y), dd.landscape.random_directions(m, n=1, seed=3), resolution=3, progress=False).values),
}


@pytest.mark.parametrize("name", list(ENTRY_POINTS))
def test_every_entry_point_takes_a_compiled_model_gives_the_uncompiled_numbers_and_compiles_nothing(name):
    x, y = classification_data()
    fn = ENTRY_POINTS[name]
    expected = fn(tanh_mlp(), x, y)
    model = tanh_mlp()
    run, counter = _train_compiled_once(model, x, y)
    got = fn(run, x, y)
    if isinstance(expected, dict):  # per-parameter results: the inner module's names, no _orig_mod. prefix
        assert list(got) == list(expected)
        got, expected = (torch.cat([torch.as_tensor(v).reshape(-1) for v in d.values()]) for d in (got, expected))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert counter.frame_count == 1  # dyndiag ran nothing through the compiled graph
    LOSS(run(x), y).backward()
    assert counter.frame_count == 1  # and training's graph still passes its guards


def test_analyze_takes_a_factory_returning_a_compiled_model(tmp_path):
    x, y = classification_data()
    path = tmp_path / "model_step_3.pt"
    torch.save(torch.compile(tanh_mlp(seed=1), backend="eager").state_dict(), path)  # keys start with _orig_mod.
    probes = lambda: [P.HessianSpectrum(k=2), P.LayerRotation()]  # noqa: E731
    res = dd.analyze([path], lambda: torch.compile(tanh_mlp(), backend="eager"), probes(), (x, y),
                     tmp_path / "compiled", LOSS)
    ref = dd.analyze([path], tanh_mlp, probes(), (x, y), tmp_path / "plain", LOSS)
    got, want = dd.load_records(tmp_path / "compiled"), dd.load_records(tmp_path / "plain")
    assert len(got) == len(want) > 0 and res["failed"] == ref["failed"] == {}
    cols = ["step", "probe", "metric", "key", "value"]
    assert got[cols].equals(want[cols])


def test_checkpoints_match_between_compiled_and_plain_models_both_ways():
    from dyndiag.checkpoints import match_state_dict

    plain, compiled = tanh_mlp(seed=1), torch.compile(tanh_mlp(), backend="eager")
    compiled.load_state_dict(match_state_dict(plain.state_dict(), compiled))  # prefix added back
    assert all(torch.equal(a, b) for a, b in zip(compiled.parameters(), plain.parameters()))
    target = tanh_mlp()
    target.load_state_dict(match_state_dict(torch.compile(tanh_mlp(seed=2), backend="eager").state_dict(), target))
    assert torch.equal(target[0].weight, tanh_mlp(seed=2)[0].weight)


def test_trajectory_directions_read_state_dicts_saved_through_torch_compile():
    path = [tanh_mlp(seed=s) for s in range(4)]
    plain = dd.landscape.trajectory_directions([m.state_dict() for m in path], n=2, params_of=tanh_mlp())
    saved = [torch.compile(m, backend="eager").state_dict() for m in path]  # keys start with _orig_mod.
    got = dd.landscape.trajectory_directions(saved, n=2, params_of=torch.compile(tanh_mlp(), backend="eager"))
    for a, b in zip(got, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = tanh_mlp()

    def forward(self, x):
        return self.body(x)


def test_a_model_compiled_in_place_is_evaluated_eagerly_with_its_uncompiled_hessian():
    x, y = classification_data()
    exact = dd.HessianOperator(tanh_mlp(), LOSS, (x, y)) @ torch.eye(D, dtype=torch.float64)
    model = Net()
    counter = CompileCounterWithBackend("aot_eager")
    model.compile(backend=counter)  # module.compile(): no wrapper to unwrap
    LOSS(model(x), y).backward()
    assert counter.frame_count == 1
    got = dd.HessianOperator(model, LOSS, (x, y)) @ torch.eye(D, dtype=torch.float64)
    torch.testing.assert_close(got, exact, rtol=1e-12, atol=1e-12)
    assert counter.frame_count == 1


def test_marking_without_the_eager_stance_still_forces_eager_inside_a_nested_evaluation():
    from dyndiag.evaluation import is_probing, probing

    counter = CompileCounterWithBackend("aot_eager")
    double = torch.compile(lambda t: t * 2, backend=counter)
    x = torch.ones(3)
    with probing(eager=False):  # the cheap probes' steps: marked, compiled code may run
        assert is_probing()
        double(x)
        assert counter.frame_count == 1
        torch._dynamo.reset()
        with probing():  # an operator or quantity inside: eager, nothing compiles
            double(x)
        assert counter.frame_count == 1
    assert not is_probing()


def _probes(data):
    return [P.EdgeOfStability(), P.HessianSpectrum(k=2), P.GradientNorm(), P.SoftmaxCollapse(), P.LayerRotation(),
            P.DataScores(data, every=2), P.DirectionalSharpness(every=2)]


def _train(make, compiled: bool, monitor: bool, steps: int = 4):
    """Adam training of ``make()`` on a fixed batch: (model, records, compiles, outputs of each step)."""
    x, y = classification_data()
    model = make()
    run, counter = _compiled(model) if compiled else (model, None)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    mon = (dd.Monitor(run, opt, _probes((x[:5], y[:5])), loss_fn=LOSS, probe_data=(x, y), sync_every=1)
           if monitor else None)
    outputs, captured = [], []
    torch.manual_seed(1)  # dropout masks: the same stream with and without the monitor
    for _ in range(steps):
        opt.zero_grad()
        out = run(x)
        LOSS(out, y).backward()
        outputs.append(out.detach().clone())
        opt.step()
        if mon is not None:
            captured.append(mon.run.logits.clone())
    records = None
    if mon is not None:
        records = mon.records()
        mon.close()
        assert all(torch.equal(a, b) for a, b in zip(outputs, captured))  # the training forward's logits
    return model, records, None if counter is None else counter.frame_count, outputs


def test_compiled_training_under_a_monitor_records_the_uncompiled_curvature():
    model_c, rec_c, frames, _ = _train(tanh_mlp, compiled=True, monitor=True)
    model_e, rec_e, _, _ = _train(tanh_mlp, compiled=False, monitor=True)
    assert frames == 1
    assert set(rec_c.probe) == {p.name for p in _probes(None)}
    assert not rec_c.value.isna().any()
    merged = rec_c.merge(rec_e, on=["step", "probe", "metric", "key"], suffixes=("_c", "_e"))
    assert len(merged) == len(rec_c) == len(rec_e)
    # Compiled (aot_eager) and eager training reach the same weights up to rounding of the
    # compiled graph's kernels, so the curvature agrees to that rounding, not to Lanczos'
    # tolerance.
    for metric in ["sharpness", "preconditioned_sharpness", "eigenvalue", "trace", "directional_sharpness"]:
        m = merged[merged.metric == metric]
        assert len(m) > 0, metric
        torch.testing.assert_close(torch.tensor(m.value_c.values), torch.tensor(m.value_e.values),
                                   rtol=1e-9, atol=1e-12)


def test_compiled_training_is_bit_identical_with_a_monitor_and_the_monitor_adds_no_compiles():
    with_mon, records, frames_mon, out_mon = _train(_dropout_bn_mlp, compiled=True, monitor=True)
    without, _, frames_plain, out_plain = _train(_dropout_bn_mlp, compiled=True, monitor=False)
    assert frames_plain >= 1 and frames_mon == frames_plain  # probes' mode changes, hooks: no recompile
    assert all(torch.equal(a, b) for a, b in zip(out_mon, out_plain))
    assert all(torch.equal(a, b) for a, b in zip(with_mon.state_dict().values(), without.state_dict().values()))
    assert set(records.probe) == {p.name for p in _probes(None)}


def test_logits_capture_sees_the_compiled_training_forward_of_a_traced_container():
    # nn.Sequential is traced with its hooks: a hook added inside after compiling would
    # never run; the Monitor's hook is on the compiled wrapper.
    x, y = classification_data()
    model = tanh_mlp()
    run, counter = _compiled(model)
    LOSS(run(x), y).backward()  # compiled before the Monitor attaches
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = dd.Monitor(run, opt, [P.SoftmaxCollapse(), P.EdgeOfStability()], loss_fn=LOSS, probe_data=(x[:7], y[:7]))
    for _ in range(2):
        opt.zero_grad()
        out = run(x * 10)
        LOSS(out, y).backward()
        opt.step()
        assert torch.equal(mon.run.logits, out.detach())  # not the probe batch's outputs
    df = mon.records()
    mon.close()
    got = df[df.metric == "collapsed_fraction"].value.iloc[-1]
    assert got == float(collapsed_fraction(out.detach()))
    assert counter.frame_count == 1


def _compiled_step_run(monitor: bool):
    """A whole training step compiled (the model called inside it), Monitor attached first."""
    x, y = classification_data()
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = dd.Monitor(model, opt, [P.SoftmaxCollapse(), P.EdgeOfStability()], loss_fn=LOSS,
                     probe_data=(x[:7], y[:7])) if monitor else None
    counter = CompileCounterWithBackend("aot_eager")

    @torch.compile(backend=counter)
    def forward_loss(x, y):
        out = model(x)
        return LOSS(out, y), out

    outputs = []
    for i in range(3):
        opt.zero_grad()
        loss, out = forward_loss(x * (i + 1), y)
        loss.backward()
        opt.step()
        outputs.append(out.detach())
        if mon is not None:  # the hook traced into the step's graph still keeps its logits
            assert torch.equal(mon.run.logits, out.detach())
    if mon is not None:
        assert all(p.enabled for p in mon.probes)
        mon.close()
    return model, counter.frame_count


def test_a_compiled_training_step_traces_the_monitors_hook_without_a_graph_break():
    got, frames = _compiled_step_run(monitor=True)
    torch._dynamo.reset()
    ref, frames_ref = _compiled_step_run(monitor=False)
    assert frames == frames_ref == 1  # one graph: the hook adds no break and no recompile
    assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), ref.state_dict().values()))


def _compiled_optimizer_run(monitor: bool):
    """``torch.compile(optimizer.step)`` (PyTorch's recipe): the Monitor's step hooks are traced."""
    x, y = classification_data()
    model = tanh_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    mon = dd.Monitor(model, opt, [P.EdgeOfStability(), P.GradientNorm(), P.DirectionalSharpness()],
                     loss_fn=LOSS, probe_data=(x, y)) if monitor else None
    counter = CompileCounterWithBackend("aot_eager")
    step = torch.compile(opt.step, backend=counter)
    for _ in range(3):
        opt.zero_grad()
        LOSS(model(x), y).backward()
        step()
    records = None
    if mon is not None:
        assert all(p.enabled for p in mon.probes)
        records = mon.records()
        mon.close()
    return model, records, counter.frame_count


def test_a_compiled_optimizer_step_runs_the_monitors_probes_eagerly_around_its_graph():
    got, records, frames = _compiled_optimizer_run(monitor=True)
    torch._dynamo.reset()
    ref, _, frames_ref = _compiled_optimizer_run(monitor=False)
    assert frames_ref >= 1 and frames == frames_ref
    assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), ref.state_dict().values()))
    assert sorted(set(records.step)) == [0, 1, 2]
    assert {"sharpness", "preconditioned_sharpness", "grad_norm", "directional_sharpness"} <= set(records.metric)


def _have_cxx() -> bool:
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


@pytest.mark.slow
@pytest.mark.skipif(not _have_cxx(), reason="inductor on CPU needs a C++ compiler")
def test_inductor_compiled_training_under_a_monitor_records_the_eager_sharpness():
    x, y = classification_data()
    model = tanh_mlp()
    run = torch.compile(model)  # the default backend: inductor
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = dd.Monitor(run, opt, [P.EdgeOfStability()], loss_fn=LOSS, probe_data=(x, y))
    sharpness = []
    for _ in range(2):
        opt.zero_grad()
        LOSS(run(x), y).backward()
        expected = dd.eigenvalues(dd.HessianOperator(model, LOSS, (x, y)), k=1, tol=1e-4).values[0]  # the probe's tol
        opt.step()
        sharpness.append(float(expected))
    df = mon.records()
    mon.close()
    got = df[df.metric == "sharpness"].sort_values("step").value.to_numpy()
    torch.testing.assert_close(torch.tensor(got), torch.tensor(sharpness, dtype=torch.float64), rtol=1e-9, atol=0)


def test_lightning_fit_of_a_compiled_module_is_bit_identical_with_the_callback(tmp_path):
    """Lightning compiles ``forward`` and ``training_step`` in place; the callback's default
    loss calls ``training_step``, which probes run eagerly."""
    L = pytest.importorskip("lightning")
    import warnings

    from dyndiag.integrations.lightning import DiagnosticsCallback

    class Classifier(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, 4))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    def fit(callbacks):
        L.seed_everything(0, verbose=False)
        x, y = classification_data(n=64, dtype=torch.float32)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=True)
        model = Classifier()
        counter = CompileCounterWithBackend("aot_eager")
        trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=4, callbacks=callbacks, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            default_root_dir=tmp_path)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*does not have many workers.*|.*LeafSpec.*")
            trainer.fit(torch.compile(model, backend=counter), loader)
        return model, counter.frame_count

    cb = DiagnosticsCallback([P.EdgeOfStability(every=2), P.SoftmaxCollapse(), P.GradientNorm()],
                             log_dir=tmp_path / "run")
    got, frames = fit([cb])
    torch._dynamo.reset()
    ref, frames_ref = fit([])
    assert frames_ref >= 1 and frames == frames_ref
    for (key, a), b in zip(ref.state_dict().items(), got.state_dict().values()):
        assert torch.equal(a, b), key
    assert all(p.enabled for p in cb.monitor.probes)
    df = dd.load_records(tmp_path / "run")
    assert sorted(set(df[df.metric == "sharpness"].step)) == [0, 2]
    assert sorted(set(df[df.metric == "collapsed_fraction"].step)) == [0, 1, 2, 3]
