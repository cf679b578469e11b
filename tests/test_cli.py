"""The command line end to end: the demo writes what it promises; errors are one line."""

import json

import click

import pytest
from click.testing import CliRunner

from dyndiag.cli import main


@pytest.mark.slow
def test_demo_writes_summary_and_figures(tmp_path):
    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path), "--steps", "40"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "curvature.json").read_text())
    assert summary["num_parameters"] == 64 * 48 + 48 + 48 * 10 + 10
    assert summary["eigenvalues_converged"] is True
    top = summary["top_eigenvalues"]
    assert len(top) == 5 and top == sorted(top, reverse=True) and top[0] > 0
    assert summary["trace_hvps"] == 99 and summary["trace"] > top[0]
    for stem in ("spectrum", "landscape", "edge_of_stability", "layer_rotation", "coherence", "gradients",
                 "dynamics", "scores"):
        for ext in ("png", "pdf"):
            assert (tmp_path / f"{stem}.{ext}").stat().st_size > 1000
    assert "top-5 eigenvalues" in result.output and "HVPs" in result.output
    import dyndiag as dd

    df = dd.load_records(tmp_path / "records")  # every probe recorded under the Monitor
    assert set(df.probe) == {
        "gradient_norm", "layer_rotation", "softmax_collapse", "edge_of_stability", "hessian_spectrum",
        "gradient_coherence", "data_scores", "directional_sharpness", "safe_step_radius", "subspace_overlap",
    }
    assert df.step.max() == 39 and (df[df.probe == "gradient_norm"].groupby("step").size() > 1).all()
    assert len(dd.load_arrays(tmp_path / "records", "data_scores", "grand_scores")[0]) == 512
    assert "layer_rotation" in result.output


def test_bad_option_is_one_line_without_traceback(tmp_path):
    result = CliRunner().invoke(main, ["demo", "--steps", "-3", "--out", str(tmp_path)])
    assert result.exit_code != 0
    assert "--steps" in result.output and "Traceback" not in result.output


def test_library_errors_are_one_line(tmp_path, monkeypatch):
    import dyndiag.demo

    def fail(**kwargs):
        raise ValueError("steps must be >= 0, got -1")

    monkeypatch.setattr(dyndiag.demo, "run_demo", fail)
    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert result.output.strip() == "dyndiag: error: steps must be >= 0, got -1"


PROJECT = '''
import torch
from torch import nn

def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()

def data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(48, 6, generator=g, dtype=torch.float64)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
'''


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A user's project file with a model factory and a data function, and 4 checkpoints."""
    import torch

    (tmp_path / "proj.py").write_text(PROJECT)
    monkeypatch.chdir(tmp_path)
    ns = {}
    exec(PROJECT, ns)
    model, (x, y) = ns["make_model"](), ns["data"]()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(16):
        if step % 5 == 0:
            torch.save(model.state_dict(), tmp_path / f"model_step_{step}.pt")
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return tmp_path


def _ckpts(root):
    return sorted(str(p) for p in root.glob("model_step_*.pt"))


def test_analyze_then_plot_end_to_end(project):
    import dyndiag as dd

    args = ["analyze", *_ckpts(project), "--model", "proj.py:make_model", "--data", "proj:data", "--out", "run",
            "--probes", "hessian_spectrum,edge_of_stability,gradient_norm,directional_sharpness,data_scores",
            "--lr", "0.5", "--density", "--no-progress"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "analysed 4 checkpoint(s)" in result.output
    df = dd.load_records(project / "run" / "records")
    assert sorted(df.step.unique()) == [0, 5, 10, 15]
    assert (df[df.metric == "threshold"].value == 4.0).all()  # 2 / lr
    assert set(df[df.metric == "directional_sharpness"].step) == {0, 5, 10}  # needs the next checkpoint
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and "skipped 4 already analysed" in again.output
    other = [*args[:args.index("--probes") + 1], "layer_rotation", *args[args.index("--probes") + 2:]]
    added = CliRunner().invoke(main, other)  # other probes into the same --out: computed beside the others
    assert added.exit_code == 0 and "analysed 4 checkpoint(s), skipped 0" in added.output, added.output
    assert set(dd.load_records(project / "run" / "records").probe) >= {"layer_rotation", "edge_of_stability"}

    result = CliRunner().invoke(main, ["tensorboard", "run", "--out", "tb"])
    assert result.exit_code == 0, result.output
    assert any((project / "tb").iterdir())

    result = CliRunner().invoke(main, ["plot", "run", "--out", "figs", "--format", "png,svg"])
    assert result.exit_code == 0, result.output
    for stem in ("edge_of_stability", "spectrum", "gradients", "dynamics", "scores"):
        assert (project / "figs" / f"{stem}.png").stat().st_size > 5000
        assert (project / "figs" / f"{stem}.svg").exists()
    assert (project / "figs" / "layer_rotation.png").exists()  # added by the second analysis
    assert not (project / "figs" / "coherence.png").exists()  # not recorded, not drawn


@pytest.mark.parametrize("kind, dims", [("trajectory", 2), ("hessian", 1), ("random", 2)])
def test_landscape_end_to_end_and_resumes(project, kind, dims):
    import pandas as pd

    args = ["landscape", *_ckpts(project), "--model", "proj.py:make_model", "--data", "proj:data", "--out", "land",
            "--directions", kind, "--dims", str(dims), "--resolution", "7", "--format", "png", "--no-progress"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    table = pd.read_csv(project / "land" / "landscape.csv")
    assert len(table) == 7**dims and list(table.columns[:dims]) == ["x", "y"][:dims]
    assert (project / "land" / "landscape.png").stat().st_size > 5000
    if kind == "trajectory":
        assert "explained variance" in result.output
    assert "points at a time" in result.output or "one point at a time" in result.output
    lines = (project / "land" / "landscape.jsonl").read_text().splitlines()
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and "all points read back" in again.output  # resumed: nothing evaluated twice
    assert (project / "land" / "landscape.jsonl").read_text().splitlines() == lines
    one = [*args, "--batch-points", "1"]
    one[one.index("--out") + 1] = "land1"
    per_point = CliRunner().invoke(main, one)
    assert per_point.exit_code == 0 and "one point at a time" in per_point.output, per_point.output
    assert pd.read_csv(project / "land1" / "landscape.csv").loss.tolist() == pytest.approx(table.loss.tolist(),
                                                                                           rel=1e-6)
    # the centre of the grid is the last checkpoint's loss
    centre = table[(table.x.abs() < 1e-12) & ((table.y.abs() < 1e-12) if dims == 2 else True)].loss.item()
    import torch

    ns = {}
    exec(PROJECT, ns)
    model = ns["make_model"]()
    model.load_state_dict(torch.load(project / "model_step_15.pt"))
    x, y = ns["data"]()
    assert centre == pytest.approx(torch.nn.functional.cross_entropy(model(x), y).item(), rel=1e-12)


@pytest.mark.parametrize(
    "args, message",
    [
        (["analyze", "missing_1.pt"], "checkpoint 'missing_1.pt' skipped: FileNotFoundError"),
        (["analyze", "model_step_0.pt", "--model", "proj.py:nope"], "--model: 'proj.py' has no attribute 'nope'"),
        (["analyze", "model_step_0.pt", "--model", "no_such_module:f"], "--model: cannot import module 'no_such_module'"),
        (["analyze", "model_step_0.pt", "--model", "make_model"], "--model must be MODULE:NAME"),
        (["analyze", "model_step_0.pt", "--probes", "hessian"], "unknown probe 'hessian'"),
        (["analyze", "model_step_0.pt", "--probes", "edge_of_stability"], "--lr is required for edge_of_stability"),
        (["analyze", "model_step_0.pt", "--optimizer", "adam", "--momentum", "0.9"], "--momentum is an SGD option"),
        (["analyze", "model_step_0.pt", "--lr", "0.1", "--nesterov"], "--nesterov needs --momentum > 0"),
        (["analyze", "model_step_0.pt", "--lr", "0.1", "--momentum", "0.9", "--nesterov", "--dampening", "0.1"],
         "--nesterov needs --dampening 0"),
        (["analyze", "model_step_0.pt", "--weight-decay", "0.1"], "--weight-decay describes the run's optimizer with"),
        (["analyze", "model_step_0.pt", "--loss", "hinge"], "--loss must be one of"),
        (["analyze"], "give at least one CHECKPOINT"),
        (["landscape", "model_step_0.pt", "--directions", "trajectory"], "need at least 3 checkpoints"),
        (["landscape", "model_step_0.pt", "--batch-points", "many"], "--batch-points"),
        (["landscape", "model_step_0.pt", "--batch-points", "-2"], "whole number >= 0"),
        (["plot", "."], "holds no records.sqlite"),
    ],
)
def test_bad_input_is_one_line_naming_the_problem(project, args, message):
    defaults = {"--model": "proj.py:make_model", "--data": "proj:data", "--out": "out"}
    if args[0] == "plot":
        defaults = {"--out": "out"}
    for option, value in defaults.items():
        if option not in args:
            args = args + [option, value]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    assert message in result.output, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("dyndiag: error:")]
    assert len(errors) == 1


def test_untrusted_pickle_is_refused_and_names_the_flag(project):
    import torch

    ns = {}
    exec(PROJECT, ns)
    torch.save({"model": ns["make_model"]()}, project / "whole_step_3.pt")
    base = ["analyze", "whole_step_3.pt", "--model", "proj.py:make_model", "--data", "proj:data", "--out", "run"]
    refused = CliRunner().invoke(main, base)
    assert refused.exit_code == 1 and "--trust-checkpoint" in refused.output
    trusted = CliRunner().invoke(main, base + ["--trust-checkpoint"])
    assert trusted.exit_code == 0, trusted.output


def test_every_command_documents_its_options():
    for command in ("demo", "analyze", "plot", "landscape", "tensorboard"):
        result = CliRunner().invoke(main, [command, "--help"])
        assert result.exit_code == 0
        params = main.commands[command].params
        for p in params:
            if isinstance(p, click.Option):
                assert p.help, f"{command} {p.opts} has no help"
                assert p.opts[0] in result.output


def test_probe_names_listed_in_help_are_exactly_the_probes_analyze_builds():
    from dyndiag.cli import PROBE_NAMES, _probe_table

    table = _probe_table(None, 3, False)
    assert PROBE_NAMES == tuple(table)
    assert [table[n]().name for n in PROBE_NAMES] == list(PROBE_NAMES)  # the record names


@pytest.mark.parametrize(
    "options, hyper",
    [
        (["--lr", "0.5", "--momentum", "0.9", "--nesterov", "--weight-decay", "0.01"],
         dict(lr=0.5, momentum=0.9, nesterov=True, weight_decay=0.01)),
        (["--lr", "0.5", "--momentum", "0.5", "--dampening", "0.5"], dict(lr=0.5, momentum=0.5, dampening=0.5)),
    ],
)
def test_analyze_builds_the_sgd_the_threshold_reads_from_its_options(project, options, hyper):
    import torch

    import dyndiag as dd

    args = ["analyze", "model_step_0.pt", "--model", "proj.py:make_model", "--data", "proj:data", "--out", "run",
            "--probes", "edge_of_stability", "--no-progress", *options]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    expected = dd.stability_threshold(torch.optim.SGD([torch.zeros(1, requires_grad=True)], **hyper))
    threshold = dd.load_records(project / "run" / "records").set_index("metric").value["threshold"]
    assert threshold == pytest.approx(expected) and threshold != pytest.approx(4.0)  # not plain 2 / lr
