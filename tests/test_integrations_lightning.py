"""The Lightning callback with a real ``lightning.Trainer`` on CPU: steps, logging, zero side effects."""

from __future__ import annotations

import csv
import warnings

import pytest
import torch
from torch import nn

L = pytest.importorskip("lightning")

from models import classification_data

import dyndiag as dd
from dyndiag.integrations.lightning import DiagnosticsCallback

P = dd.probes
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*")  # Lightning's own, on torch 2.13


class Classifier(L.LightningModule):
    """A tiny MLP classifier that logs its loss and uses dropout (a consumer of the global RNG)."""

    def __init__(self, opt: str = "sgd") -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, 4))
        self.opt = opt

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return {"loss": loss}

    def configure_optimizers(self):
        if self.opt == "adam":
            return torch.optim.Adam(self.parameters(), lr=1e-2)
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _probes():
    return [
        P.GradientNorm(),
        P.LayerRotation(every=2),
        P.SoftmaxCollapse(),
        P.EdgeOfStability(every=3),
        P.DirectionalSharpness(every=2),
    ]


def _fit(tmp_path, callbacks=(), steps=6, opt="sgd", accumulate=1, logger=False, clip=None, plugins=None):
    """Seeded training on a shuffling loader; returns the trained module and its trainer."""
    L.seed_everything(0, verbose=False)
    x, y = classification_data(n=64, dtype=torch.float32)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=True)
    model = Classifier(opt)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, callbacks=list(callbacks), logger=logger,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        accumulate_grad_batches=accumulate, default_root_dir=tmp_path, log_every_n_steps=1,
        gradient_clip_val=clip, plugins=plugins,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*GPU available but not used.*")
        trainer.fit(model, loader)
    return model, trainer


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_training_is_bit_identical_and_records_have_the_trainer_steps(tmp_path, opt):
    ref, _ = _fit(tmp_path / "ref", opt=opt)
    ref_rng = torch.get_rng_state()
    cb = DiagnosticsCallback(_probes(), log_dir=tmp_path / "run")
    got, trainer = _fit(tmp_path / "got", [cb], opt=opt)
    assert torch.equal(torch.get_rng_state(), ref_rng)  # dropout and shuffling streams untouched
    for (name, a), b in zip(ref.state_dict().items(), got.state_dict().values()):
        assert torch.equal(a, b), name
    assert trainer.global_step == 6

    df = dd.load_records(tmp_path / "run")
    steps = lambda probe: sorted(set(df[df.probe == probe].step))
    assert steps("gradient_norm") == [0, 1, 2, 3, 4, 5]
    assert steps("softmax_collapse") == [0, 1, 2, 3, 4, 5]
    assert steps("layer_rotation") == [0, 2, 4]
    assert steps("edge_of_stability") == [0, 3]
    assert steps("directional_sharpness") == [0, 2, 4]
    eos = df[df.probe == "edge_of_stability"]
    metrics = {"sharpness", "threshold", "loss"} | ({"preconditioned_sharpness"} if opt == "adam" else set())
    assert set(eos.metric) == metrics
    assert df.value.notna().all()
    rot = df[(df.probe == "layer_rotation") & (df.step == 0)]
    assert set(rot.key) == {n for n, _ in got.named_parameters()} and (rot.value == 0).all()


def test_gradients_are_the_current_ones_and_the_loss_is_the_first_batch(tmp_path):
    """grad_norm equals the norm of the gradient the optimizer applies; loss = training_step on batch 0."""
    seen = {}

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            seen.setdefault("batch", [t.clone() for t in batch])

        def on_before_optimizer_step(self, trainer, module, optimizer):
            g = torch.cat([p.grad.reshape(-1) for p in module.parameters()])
            seen.setdefault("grad_norm", []).append(float(g.norm()))

    cb = DiagnosticsCallback([P.GradientNorm(), P.EdgeOfStability(every=10)], log_dir=tmp_path / "run")
    _fit(tmp_path, [Spy(), cb], steps=3)
    df = dd.load_records(tmp_path / "run")
    gn = df[df.metric == "grad_norm"].sort_values("step")
    assert gn.value.tolist() == pytest.approx(seen["grad_norm"], rel=1e-6)
    # The probe loss at step 0 is training_step's loss on the first batch at the initial weights
    # (dropout off, as the operators evaluate), which no later batch matches.
    loss = df[(df.probe == "edge_of_stability") & (df.metric == "loss")]
    assert list(loss.step) == [0]
    L.seed_everything(0, verbose=False)
    fresh = Classifier().eval()
    x, y = seen["batch"]
    with torch.no_grad():
        expected = float(nn.functional.cross_entropy(fresh(x), y))
    assert loss.value.iloc[0] == pytest.approx(expected, rel=1e-6)


def test_gradient_accumulation_probes_the_optimizer_steps_only(tmp_path):
    cb = DiagnosticsCallback(
        [P.GradientNorm(), P.DirectionalSharpness()], loss_fn=nn.CrossEntropyLoss(), log_dir=tmp_path / "run"
    )
    _, trainer = _fit(tmp_path, [cb], steps=3, accumulate=2)
    assert trainer.global_step == 3
    df = dd.load_records(tmp_path / "run")
    assert sorted(set(df.step)) == [0, 1, 2]
    assert df.groupby("step").size().tolist() == [3, 3, 3]  # grad_norm, grad_norm_before_clip, directional


@pytest.mark.parametrize("accumulate,scaler", [(1, False), (2, False), (2, True)])
def test_gradient_clip_val_grad_norm_is_the_applied_gradient_and_before_clip_the_accumulated_one(
    tmp_path, accumulate, scaler
):
    """With a gradient scaler Lightning runs the closure itself, then scaler.step(optimizer):
    the other path of the callback; the snapshot at the end of backward is divided by the scale."""
    plugins = None
    if scaler:
        amp = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        plugins = [L.pytorch.plugins.MixedPrecision("16-mixed", "cpu", scaler=amp)]
    before = []

    class Spy(L.Callback):
        def on_before_optimizer_step(self, trainer, module, optimizer):  # after unscaling, before clipping
            before.append(float(torch.cat([p.grad.reshape(-1) for p in module.parameters()]).norm()))

    cb = DiagnosticsCallback([P.GradientNorm(), P.EdgeOfStability(every=2)], log_dir=tmp_path / "run")
    _fit(tmp_path, [Spy(), cb], steps=3, accumulate=accumulate, clip=0.05, plugins=plugins)
    df = dd.load_records(tmp_path / "run")
    values = lambda metric: df[df.metric == metric].sort_values("step").value.tolist()  # noqa: E731
    assert min(before) > 0.05  # every step was clipped
    assert values("grad_norm_before_clip") == pytest.approx(before, rel=1e-6)
    assert values("grad_norm") == pytest.approx([b * 0.05 / (b + 1e-6) for b in before], rel=1e-5)


def test_scalars_reach_the_trainers_logger_and_probes_do_not_log_through_the_module(tmp_path):
    losses = []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    logger = L.pytorch.loggers.CSVLogger(tmp_path, name="csv")
    cb = DiagnosticsCallback(
        [P.GradientNorm(), P.LayerRotation(every=2), P.EdgeOfStability()], log_dir=tmp_path / "run",
        log_filter=lambda probe, metric, key: key in ("", "net.0.weight"),
    )
    _fit(tmp_path, [Spy(), cb], steps=4, logger=logger)
    with open(logger.experiment.metrics_file_path) as f:
        rows = list(csv.DictReader(f))
    logged = {}
    for row in rows:
        for name, value in row.items():
            if value not in ("", None) and name != "step":
                logged[(name, int(row["step"]))] = float(value)
    df = dd.load_records(tmp_path / "run")
    gn = df[df.metric == "grad_norm"]
    assert [logged[("gradient_norm/grad_norm", s)] for s in range(4)] == pytest.approx(gn.value.tolist(), rel=1e-6)
    sharp = df[df.metric == "sharpness"]
    assert [logged[("edge_of_stability/sharpness", s)] for s in range(4)] == pytest.approx(sharp.value.tolist())
    rot = df[(df.probe == "layer_rotation") & (df.key == "net.0.weight")]
    assert [logged[("layer_rotation/rotation/net.0.weight", s)] for s in (0, 2)] == pytest.approx(rot.value.tolist())
    assert not any(name.startswith("layer_rotation/rotation/net.3") for name, _ in logged)  # filtered out
    # The module's own logging is training's: the probes' training_step calls were silenced.
    assert [logged[("train_loss", s)] for s in range(4)] == pytest.approx(losses, rel=1e-6)


def test_without_log_dir_records_stay_in_memory_and_bad_arguments_are_named(tmp_path):
    cb = DiagnosticsCallback([P.GradientNorm()])
    _fit(tmp_path, [cb], steps=2)
    assert cb.monitor.records().step.tolist() == [0, 0, 1, 1]  # grad_norm, grad_norm_before_clip
    with pytest.raises(TypeError, match="probes"):
        DiagnosticsCallback(P.GradientNorm())
    with pytest.raises(ValueError, match="loss_fn and closure"):
        DiagnosticsCallback([P.GradientNorm()], loss_fn=nn.CrossEntropyLoss(), closure=lambda m, b: 0)
    with pytest.raises(TypeError, match="log_filter"):
        DiagnosticsCallback([P.GradientNorm()], log_filter="net")


# -- the Monitor's manual driving, which both callbacks build on ---------------------------


def _plain_step(model, opt, x, y):
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()


def test_manual_monitor_registers_no_step_hooks_and_numbers_steps_as_told():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = classification_data(n=16, dtype=torch.float32)
    mon = dd.Monitor(model, opt, [P.GradientNorm(), P.DirectionalSharpness(every=2)], loss_fn=nn.CrossEntropyLoss(),
                     probe_data=(x, y), step_hooks=False)
    _plain_step(model, opt, x, y)
    opt.step()  # not driven: nothing recorded, the counter stays
    assert mon.records().empty and mon.step == 0
    for step in (4, 5):
        _plain_step(model, opt, x, y)
        g = float(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm())
        mon.before_step(step)
        opt.step()
        rows = mon.after_step()  # directional sharpness synchronises: the step is written now
        assert (step, "gradient_norm", "grad_norm", "", pytest.approx(g)) in rows or step % 2
        assert any(r[1] == "directional_sharpness" for r in rows) == (step % 2 == 0)
    # A step whose update never came (a skipped AMP step): its state rows are written at the next
    # before_step for another step, replaced when the same step is begun again, written at close.
    _plain_step(model, opt, x, y)
    mon.before_step(6)
    mon.before_step(6)
    mon.before_step(7)
    mon.before_step(8)
    mon.close()
    df = mon.records()
    assert df[df.metric != "grad_norm_before_clip"].groupby("step").probe.apply(sorted).to_dict() == {
        4: ["directional_sharpness", "gradient_norm"], 5: ["gradient_norm"], 6: ["gradient_norm"],
        7: ["gradient_norm"], 8: ["gradient_norm"],
    }
    with pytest.raises(ValueError, match="step"):
        dd.Monitor(model, opt, [P.GradientNorm()], step_hooks=False, start_step=3).before_step(2)
    with pytest.raises(RuntimeError, match="step_hooks=False"):
        dd.Monitor(model, opt, [P.GradientNorm()]).before_step()
