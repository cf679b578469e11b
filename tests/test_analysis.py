"""Offline analysis of saved checkpoints: formats, steps, prefixes, exact numbers, re-runs."""

import json

import numpy as np
import pytest
import torch
from torch import nn

import dyndiag as dd
from dyndiag.checkpoints import checkpoint_step, load_checkpoint, match_state_dict, sort_checkpoints
from tests.models import batchnorm_mlp, classification_data, tanh_mlp
from tests.snapshots import assert_same, snapshot


def _train_checkpoints(tmp_path, steps=(0, 5, 10), lr=0.3):
    model = tanh_mlp()
    x, y = classification_data()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    states = {}
    for s in range(max(steps) + 1):
        if s in steps:
            states[s] = {k: v.clone() for k, v in model.state_dict().items()}
            torch.save(states[s], tmp_path / f"model_step_{s}.pt")
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return states, (x, y)


@pytest.mark.parametrize(
    "name, step",
    [("model_step_120.pt", 120), ("epoch=3-step=450.ckpt", 450), ("checkpoint-500", 500), ("final.pt", None),
     ("run2_step_7.safetensors", 7)],
)
def test_step_is_the_last_integer_in_the_name(name, step):
    assert checkpoint_step(name) == step


def test_step_falls_back_to_contents_then_position(tmp_path):
    assert checkpoint_step("final.pt", {"global_step": 31}) == 31
    order = sort_checkpoints([tmp_path / "b.pt", tmp_path / "a_3.pt", tmp_path / "c.pt"])
    assert [(s, p.name) for s, p in order] == [(0, "b.pt"), (2, "c.pt"), (3, "a_3.pt")]
    with pytest.raises(ValueError, match="same step"):
        sort_checkpoints([tmp_path / "x_1.pt", tmp_path / "y_1.pt"])


def test_formats_and_prefixes_load_the_same_weights(tmp_path):
    model = tanh_mlp()
    sd = model.state_dict()
    torch.save(sd, tmp_path / "plain.pt")
    torch.save({"state_dict": {f"net.{k}": v for k, v in sd.items()}, "global_step": 3, "epoch": 0},
               tmp_path / "lightning.ckpt")
    torch.save({"model_state_dict": {f"module._orig_mod.{k}": v for k, v in sd.items()}, "optimizer_state_dict": {}},
               tmp_path / "train.pt")
    torch.save({"model": {f"classifier.{k}": v for k, v in sd.items()}}, tmp_path / "attr.pt")
    hf = tmp_path / "checkpoint-final"
    hf.mkdir()
    from safetensors.torch import save_file

    half = len(sd) // 2
    keys = list(sd)
    save_file({k: sd[k].contiguous() for k in keys[:half]}, str(hf / "model-00001-of-00002.safetensors"))
    save_file({k: sd[k].contiguous() for k in keys[half:]}, str(hf / "model-00002-of-00002.safetensors"))
    weight_map = {k: f"model-0000{1 + (i >= half)}-of-00002.safetensors" for i, k in enumerate(keys)}
    (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (hf / "trainer_state.json").write_text(json.dumps({"global_step": 40}))
    for name, step in [("plain.pt", None), ("lightning.ckpt", 3), ("train.pt", None), ("attr.pt", None),
                       ("checkpoint-final", 40)]:
        ck = load_checkpoint(tmp_path / name)
        assert ck.step == step, name
        matched = match_state_dict(ck.state_dict, model)
        assert matched.keys() == sd.keys() and all(torch.equal(matched[k], sd[k]) for k in sd), name
    assert sort_checkpoints([hf])[0][0] == 40


def test_bad_checkpoints_are_refused_with_the_reason(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"model": tanh_mlp()}, tmp_path / "pickled.pt")  # a whole module: needs unpickling code
    with pytest.raises(ValueError, match="--trust-checkpoint"):
        load_checkpoint(tmp_path / "pickled.pt")
    assert load_checkpoint(tmp_path / "pickled.pt", trust=True).state_dict.keys() == tanh_mlp().state_dict().keys()
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a torch checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"epoch": 1, "lr": 0.1}, tmp_path / "nothing.pt")
    with pytest.raises(ValueError, match="without model weights"):
        load_checkpoint(tmp_path / "nothing.pt")
    with pytest.raises(ValueError, match="do not match the model"):
        match_state_dict({"encoder.weight": torch.zeros(2)}, tanh_mlp())


def test_analyze_records_the_exact_quantities_at_each_checkpoint(tmp_path):
    states, data = _train_checkpoints(tmp_path)
    model = tanh_mlp()
    before = snapshot(model)
    probes = [dd.probes.HessianSpectrum(k=2, trace_matvecs=0), dd.probes.GradientNorm(),
              dd.probes.DirectionalSharpness(), dd.probes.EdgeOfStability(), dd.probes.LayerRotation()]
    paths = [tmp_path / f"model_step_{s}.pt" for s in (10, 0, 5)]  # any order: analysed by step
    result = dd.analyze(paths, model, probes, data, tmp_path / "run", nn.CrossEntropyLoss(),
                        optimizer=lambda params: torch.optim.SGD(params, lr=0.3, momentum=0.5), progress=False)
    assert result["analysed"] == [0, 5, 10] and not result["failed"]
    assert_same(before, snapshot(model))  # the model given comes back as it was
    df = dd.load_records(tmp_path / "run")
    ref = tanh_mlp()
    for s in (0, 5, 10):
        ref.load_state_dict(states[s])
        H = dd.HessianOperator(ref, nn.CrossEntropyLoss(), data)
        exact = torch.linalg.eigvalsh(H.to_dense())
        rows = df[df.step == s].set_index(["metric", "key"]).value
        assert rows[("eigenvalue", "0")] == pytest.approx(exact[-1].item(), rel=1e-4)  # the probes' tol
        assert rows[("sharpness", "")] == pytest.approx(exact[-1].item(), rel=1e-4)
        assert rows[("threshold", "")] == pytest.approx((2 + 2 * 0.5) / 0.3)
        g = torch.autograd.grad(nn.functional.cross_entropy(ref(data[0]), data[1]), list(ref.parameters()))
        assert rows[("grad_norm", "")] == pytest.approx(torch.cat([t.reshape(-1) for t in g]).norm().item(), rel=1e-9)
        if s < 10:  # along the displacement to the next checkpoint, with H at this one
            nxt = (5, 10)[(0, 5).index(s)]
            d = torch.cat([(states[nxt][k] - states[s][k]).reshape(-1) for k in states[s]])
            assert rows[("directional_sharpness", "")] == pytest.approx(((d @ (H @ d)) / (d @ d)).item(), rel=1e-9)
        else:  # the last checkpoint has no next one
            assert ("directional_sharpness", "") not in rows.index
    rot = df[(df.metric == "rotation") & (df.key == "0.weight")].set_index("step").value
    w0, w10 = states[0]["0.weight"].reshape(-1), states[10]["0.weight"].reshape(-1)
    assert rot[0] == pytest.approx(0.0, abs=1e-12)  # against the first checkpoint
    assert rot[10] == pytest.approx(1 - (w0 @ w10 / (w0.norm() * w10.norm())).item(), rel=1e-9)


def test_analyze_evaluates_eval_mode_by_default_and_train_mode_on_request(tmp_path):
    model = batchnorm_mlp(train=True)
    x, y = classification_data()
    with torch.no_grad():
        model(x)  # running statistics away from their initial values
    torch.save(model.state_dict(), tmp_path / "bn_1.pt")
    found = []
    for train_mode in (False, True):
        out = tmp_path / f"run{train_mode}"
        probe = dd.probes.HessianSpectrum(k=1, trace_matvecs=0, tol=1e-10)
        dd.analyze([tmp_path / "bn_1.pt"], batchnorm_mlp(train=True), [probe],
                   (x, y), out, nn.CrossEntropyLoss(), train_mode=train_mode, progress=False)
        ref = batchnorm_mlp(train=train_mode)
        ref.load_state_dict(torch.load(tmp_path / "bn_1.pt"))
        exact = torch.linalg.eigvalsh(dd.HessianOperator(ref, nn.CrossEntropyLoss(), (x, y)).to_dense())[-1]
        found.append(dd.load_records(out).value.iloc[0])
        assert found[-1] == pytest.approx(exact.item(), rel=1e-8)
    assert abs(found[0] - found[1]) > 1e-3 * found[0]  # the two modes are different Hessians


def test_rerun_computes_only_the_probes_a_step_lacks_beside_what_is_stored(tmp_path):
    states, data = _train_checkpoints(tmp_path, steps=(0, 5, 10, 15))
    ckpts = {s: tmp_path / f"model_step_{s}.pt" for s in states}
    run = tmp_path / "run"
    kw = dict(probe_data=data, log_dir=run, loss_fn=nn.CrossEntropyLoss(), progress=False)
    first = dd.analyze([ckpts[0], ckpts[10]], tanh_mlp, [dd.probes.GradientNorm()], **kw)
    assert first["analysed"] == [0, 10]
    again = dd.analyze([ckpts[0], ckpts[10]], tanh_mlp, [dd.probes.GradientNorm()], **kw)
    assert again["analysed"] == [] and again["skipped"] == [0, 10]
    before = dd.load_records(run)

    def three():
        return [dd.probes.GradientNorm(), dd.probes.LayerRotation(), dd.probes.DirectionalSharpness()]

    more = dd.analyze([ckpts[s] for s in (0, 5, 10)], tanh_mlp, three(), **kw)  # other probes, a new checkpoint
    assert more["analysed"] == [0, 5, 10] and more["skipped"] == []
    df = dd.load_records(run)
    norms = df[df.metric == "grad_norm"]
    assert norms.step.tolist() == [0, 5, 10] and norms.run.tolist() == [0, 1, 0]  # stored rows stay as they were
    assert norms[norms.step != 5].value.tolist() == before.value.tolist()
    assert set(df[df.metric == "rotation"].step) == {0, 5, 10} and (df[df.metric == "rotation"].run == 1).all()
    span = df[df.metric == "update_steps"].set_index("step").value
    assert span.to_dict() == {0: 5.0, 5: 5.0}  # 10 is the last checkpoint given: no update yet

    last = dd.analyze([ckpts[s] for s in (0, 5, 10, 15)], tanh_mlp, three(), **kw)
    assert last["analysed"] == [10, 15] and last["skipped"] == [0, 5]  # 10 gained a next checkpoint
    df = dd.load_records(run)
    assert sorted(df[df.metric == "directional_sharpness"].step) == [0, 5, 10]
    assert len(df) == len(df.drop_duplicates(["step", "probe", "metric", "key"]))  # nothing computed twice
    # Probes are set up at the first checkpoint given, though it had nothing to compute.
    rot = df[(df.metric == "rotation") & (df.key == "0.weight")].set_index("step").value
    w0, w15 = states[0]["0.weight"].reshape(-1), states[15]["0.weight"].reshape(-1)
    assert rot[15] == pytest.approx(1 - (w0 @ w15 / (w0.norm() * w15.norm())).item(), rel=1e-9)


def test_one_bad_checkpoint_is_reported_and_the_rest_go_on(tmp_path):
    _train_checkpoints(tmp_path, steps=(0, 10))
    (tmp_path / "model_step_5.pt").write_bytes(b"truncated")
    seen = []
    result = dd.analyze([tmp_path / f"model_step_{s}.pt" for s in (0, 5, 10)], tanh_mlp, [dd.probes.GradientNorm()],
                        classification_data(), tmp_path / "run", nn.CrossEntropyLoss(), progress=False,
                        on_error=lambda path, err: seen.append(path.name))
    assert result["analysed"] == [0, 10] and list(result["failed"]) == [str(tmp_path / "model_step_5.pt")]
    assert seen == ["model_step_5.pt"]
    with pytest.warns(RuntimeWarning, match="model_step_5.pt"):
        dd.analyze([tmp_path / "model_step_5.pt"], tanh_mlp, [dd.probes.GradientNorm()], classification_data(),
                   tmp_path / "run2", nn.CrossEntropyLoss(), progress=False)


def test_analyze_rejects_bad_arguments(tmp_path):
    kw = dict(probe_data=classification_data(), log_dir=tmp_path, loss_fn=nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match="checkpoints"):
        dd.analyze([], tanh_mlp, [dd.probes.GradientNorm()], **kw)
    with pytest.raises(TypeError, match="probes"):
        dd.analyze(["a_1.pt"], tanh_mlp, ["gradient_norm"], **kw)
    with pytest.raises(TypeError, match="model"):
        dd.analyze(["a_1.pt"], 3, [dd.probes.GradientNorm()], **kw)
    with pytest.raises(ValueError, match="probe_data"):
        dd.analyze(["a_1.pt"], tanh_mlp, [dd.probes.GradientNorm()], None, tmp_path, nn.CrossEntropyLoss())


@pytest.mark.parametrize("layout", ["lightning", "training_dict", "hf_dir"])
def test_a_checkpoints_optimizer_state_gives_the_threshold_and_adams_preconditioned_sharpness(tmp_path, layout):
    model = tanh_mlp()
    x, y = classification_data()
    opt = torch.optim.Adam(model.parameters(), lr=0.02, betas=(0.8, 0.99))
    for _ in range(6):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    for group in opt.param_groups:
        group["lr"] = 0.01  # as a schedule would have left it
    if layout == "lightning":
        path = tmp_path / "epoch=0-step=6.ckpt"
        torch.save({"state_dict": {f"net.{k}": v for k, v in model.state_dict().items()},
                    "optimizer_states": [opt.state_dict()], "global_step": 6}, path)
    elif layout == "training_dict":
        path = tmp_path / "ckpt_6.pt"
        torch.save({"model_state_dict": model.state_dict(), "optimizer_state_dict": opt.state_dict()}, path)
    else:
        from safetensors.torch import save_file

        path = tmp_path / "checkpoint-6"
        path.mkdir()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
        torch.save(opt.state_dict(), path / "optimizer.pt")
    assert load_checkpoint(path).optimizer_state is not None
    dd.analyze([path], tanh_mlp, [dd.probes.EdgeOfStability(tol=1e-10)], (x, y), tmp_path / "run",
               nn.CrossEntropyLoss(), optimizer=torch.optim.Adam, progress=False)
    rows = dd.load_records(tmp_path / "run").set_index("metric").value
    assert rows["threshold"] == pytest.approx((2 + 2 * 0.8) / ((1 - 0.8) * 0.01))  # the checkpoint's lr and beta1
    # the same number as the live model and optimizer give, with the probe data's gradient
    H = dd.HessianOperator(model, nn.CrossEntropyLoss(), (x, y))
    g = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), list(model.parameters()))
    expected = dd.preconditioned_sharpness(H, opt, gradient=torch.cat([t.reshape(-1) for t in g]), tol=1e-10)
    assert rows["preconditioned_sharpness"] == pytest.approx(expected, rel=1e-8)


def test_an_optimizer_class_needs_the_checkpoints_state(tmp_path):
    _train_checkpoints(tmp_path, steps=(0,))
    seen = []
    result = dd.analyze([tmp_path / "model_step_0.pt"], tanh_mlp, [dd.probes.EdgeOfStability()],
                        classification_data(), tmp_path / "run", nn.CrossEntropyLoss(),
                        optimizer=torch.optim.SGD, progress=False, on_error=lambda p, e: seen.append(str(e)))
    assert result["failed"] and "carries no optimizer state" in seen[0]
    ok = dd.analyze([tmp_path / "model_step_0.pt"], tanh_mlp, [dd.probes.EdgeOfStability()],
                    classification_data(), tmp_path / "run2", nn.CrossEntropyLoss(),
                    optimizer=lambda params: torch.optim.SGD(params, lr=0.5), progress=False)
    assert ok["analysed"] == [0]
    assert dd.load_records(tmp_path / "run2").set_index("metric").value["threshold"] == pytest.approx(4.0)


def test_optimizer_state_of_another_kind_is_reported_by_name(tmp_path):
    model = tanh_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    x, y = classification_data()
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "adam_1.pt")
    seen = []
    dd.analyze([tmp_path / "adam_1.pt"], tanh_mlp, [dd.probes.EdgeOfStability()], (x, y), tmp_path / "run",
               nn.CrossEntropyLoss(), optimizer=lambda p: torch.optim.SGD(p, lr=0.1), progress=False,
               on_error=lambda path, err: seen.append(str(err)))
    assert len(seen) == 1 and "not a SGD's" in seen[0] and "momentum" in seen[0]


def test_analyze_runs_probes_like_the_monitor_a_failing_one_is_disabled_with_the_same_warning(tmp_path):
    _train_checkpoints(tmp_path, steps=(0, 5, 10))
    x, y = classification_data()
    seen = {}

    class Broken(dd.Probe):
        def compute(self, ctx):
            raise ZeroDivisionError("boom")

    class Spy(dd.Probe):
        needs = frozenset({"logits"})

        def setup(self, run):
            seen["setup"] = run

        def compute(self, ctx):
            seen.setdefault("logits", []).append(ctx.logits)
            return {"seen": 1.0}

    broken = Broken()
    with pytest.warns(RuntimeWarning) as record:
        result = dd.analyze([tmp_path / f"model_step_{s}.pt" for s in (0, 5, 10)], tanh_mlp, [broken, Spy()],
                            (x, y), tmp_path / "run", nn.CrossEntropyLoss(), progress=False)
    assert result["analysed"] == [0, 5, 10] and not result["failed"]  # the checkpoints go on
    messages = [str(w.message) for w in record if w.category is RuntimeWarning]
    assert messages == ["probe 'broken' failed at step 0 and is disabled: ZeroDivisionError: boom"]  # the Monitor's
    assert broken.enabled is False
    assert dd.load_records(tmp_path / "run").step.tolist() == [0, 5, 10]
    assert isinstance(seen["setup"], dd.probes.RunContext) and seen["setup"].probe_data[0] is x
    ref = tanh_mlp()  # offline, the logits are the model's outputs on the first probe batch
    ref.load_state_dict(torch.load(tmp_path / "model_step_10.pt"))
    ref.eval()
    assert torch.equal(seen["logits"][-1], ref(x).detach())
