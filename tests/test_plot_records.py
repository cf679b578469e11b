"""Record-based figures (plot.edge_of_stability, plot.metrics, plot.layer_rotation) and plot.style."""

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from torch import nn

import dyndiag as dd
from models import classification_data

CE = nn.CrossEntropyLoss()
PARAMS = ["0.weight", "0.bias", "2.weight", "2.bias"]


def _run(tmp, opt_name):
    """10 monitored steps of a tiny MLP; the learning rate halves every 4 steps."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))
    x, y = classification_data(n=64, dtype=torch.float32)
    opt = (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) if opt_name == "sgd"
           else torch.optim.Adam(model.parameters(), lr=1e-2))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    P = dd.probes
    probes = [P.EdgeOfStability(every=2), P.GradientNorm(per_layer=True), P.LayerRotation(),
              P.GradientCoherence(every=3)]
    with dd.Monitor(model, opt, probes, loss_fn=CE, probe_data=(x[:32], y[:32]), log_dir=tmp):
        for i in range(10):
            idx = torch.arange(16) + 16 * (i % 4)
            opt.zero_grad()
            CE(model(x[idx]), y[idx]).backward()
            opt.step()
            sched.step()
    return dd.load_records(tmp)


@pytest.fixture(scope="module")
def sgd_records(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("sgd"), "sgd")


@pytest.fixture(scope="module")
def adam_records(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("adam"), "adam")


def _values(df, metric, key=""):
    sub = df[(df.metric == metric) & (df.key == key)].sort_values("step")
    return sub.step.to_numpy(float), sub.value.to_numpy(float)


def test_edge_of_stability_draws_sharpness_threshold_and_log_loss(sgd_records):
    df = sgd_records
    rc = dict(matplotlib.rcParams)
    fig = dd.plot.edge_of_stability(df)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    top, bottom = fig.axes
    assert top.get_shared_x_axes().joined(top, bottom)
    steps, sharp = _values(df, "sharpness")
    t_steps, thresh = _values(df, "threshold")
    assert len(np.unique(thresh)) >= 2  # the schedule changed the threshold
    assert len(top.lines) == 2  # SGD: no preconditioned sharpness
    curve, threshold = top.lines
    np.testing.assert_array_equal(curve.get_xdata(), steps)
    np.testing.assert_array_equal(curve.get_ydata(), sharp)
    np.testing.assert_array_equal(threshold.get_xdata(), t_steps)
    np.testing.assert_array_equal(threshold.get_ydata(), thresh)
    assert threshold.get_linestyle() == "--" and threshold.get_drawstyle() == "steps-post"
    labels = [t.get_text() for t in top.get_legend().get_texts()]
    assert labels == ["$\\lambda_{\\max}$ of the loss Hessian", "stability threshold"]
    assert top.get_ylabel() == "sharpness" and bottom.get_xlabel() == "step"
    assert bottom.get_yscale() == "log" and bottom.get_ylabel() == "loss"
    np.testing.assert_array_equal(bottom.lines[0].get_ydata(), _values(df, "loss")[1])
    assert dict(matplotlib.rcParams) == rc


def test_edge_of_stability_with_adam_adds_preconditioned_sharpness(adam_records):
    fig = dd.plot.edge_of_stability(adam_records)
    top = fig.axes[0]
    assert len(top.lines) == 3
    np.testing.assert_array_equal(top.lines[1].get_ydata(), _values(adam_records, "preconditioned_sharpness")[1])
    assert "preconditioned sharpness" in [t.get_text() for t in top.get_legend().get_texts()]


def test_edge_of_stability_draws_one_line_set_per_param_group(tmp_path):
    # Two groups of different learning rates: rows keyed "0" and "1", each drawn with its own threshold.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))
    x, y = classification_data(n=32, dtype=torch.float32)
    opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.1},
                           {"params": model[2].parameters(), "lr": 0.02}])
    with dd.Monitor(model, opt, [dd.probes.EdgeOfStability(every=2)], loss_fn=CE, probe_data=(x, y),
                    log_dir=tmp_path):
        for _ in range(4):
            opt.zero_grad()
            CE(model(x), y).backward()
            opt.step()
    df = dd.load_records(tmp_path)
    fig = dd.plot.edge_of_stability(df)
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    for g in ("0", "1"):
        steps, sharp = _values(df, "sharpness", g)
        np.testing.assert_array_equal(lines[f"$\\lambda_{{\\max}}$ of the loss Hessian (group {g})"].get_ydata(), sharp)
        _, thresh = _values(df, "threshold", g)
        np.testing.assert_array_equal(lines[f"stability threshold (group {g})"].get_ydata(), thresh)
    assert _values(df, "threshold", "0")[1][0] == pytest.approx(2 / 0.1)
    assert _values(df, "threshold", "1")[1][0] == pytest.approx(2 / 0.02)


def test_edge_of_stability_on_given_axes_draws_one_panel(sgd_records):
    fig = Figure()
    ax = fig.add_subplot()
    assert dd.plot.edge_of_stability(sgd_records, ax=ax) is fig
    assert fig.axes == [ax] and len(ax.lines) == 2 and ax.get_xlabel() == "step"


def test_edge_of_stability_rejects_records_without_its_metrics(sgd_records):
    with pytest.raises(ValueError, match=r"df has no 'sharpness' or 'threshold' records"):
        dd.plot.edge_of_stability(sgd_records[sgd_records.probe != "edge_of_stability"])
    with pytest.raises(ValueError, match=r"df .*columns"):
        dd.plot.edge_of_stability(pd.DataFrame({"step": [0], "value": [1.0]}))
    with pytest.raises(ValueError, match="probe 'eos'"):
        dd.plot.edge_of_stability(sgd_records, probe="eos")


def test_metrics_panels_per_layer_lines_and_total(sgd_records):
    df = sgd_records
    fig = dd.plot.metrics(df, ["grad_norm", "sharpness"])
    assert len(fig.axes) == 2
    gn, sh = fig.axes
    assert [l.get_label() for l in gn.lines] == PARAMS + ["total"]
    total = gn.lines[-1]
    assert to_hex(total.get_color()) == "#000000" and total.get_linewidth() > gn.lines[0].get_linewidth()
    np.testing.assert_array_equal(total.get_ydata(), _values(df, "grad_norm")[1])
    np.testing.assert_array_equal(gn.lines[2].get_ydata(), _values(df, "grad_norm", "2.weight")[1])
    assert [t.get_text() for t in gn.get_legend().get_texts()] == PARAMS + ["total"]
    assert gn.get_ylabel() == "gradient norm" and sh.get_xlabel() == "step"
    assert len(sh.lines) == 1 and sh.get_legend() is None  # a scalar: one plain line
    assert dd.plot.metrics(df, "grad_norm", logy=True).axes[0].get_yscale() == "log"


def test_metrics_reference_line_and_fraction_axis():
    rows = [(s, "safe_step_radius", "ratio", "", 0.1 * (s + 1), 0.0) for s in range(4)]
    rows += [(s, "softmax_collapse", "collapsed_fraction", "", 0.0, 0.0) for s in range(4)]
    df = pd.DataFrame(rows, columns=["step", "probe", "metric", "key", "value", "wall_time"])
    ratio, frac = dd.plot.metrics(df, ["ratio", "collapsed_fraction"]).axes
    ref = [l for l in ratio.lines if l.get_gid() == "dyndiag-reference"]
    assert len(ref) == 1 and list(ref[0].get_ydata()) == [1.0, 1.0]  # a ratio >= 1 predicts a spike
    assert ratio.get_ylabel() == "step / safe radius" and ratio.get_ylim()[1] >= 1.0
    low, high = frac.get_ylim()
    assert -0.05 * high < low < 0 and frac.get_ylabel() == "collapsed fraction"
    assert min(t for t in frac.get_yticks() if low <= t <= high) == 0  # no negative ticks


def test_metrics_many_keys_use_a_colormap_and_bad_input_errors():
    steps = np.arange(5)
    keys = sorted(str(k) for k in range(12))  # stored in string order: "0", "1", "10", "11", "2", ...
    rows = [(s, "p", "eigenvalue", k, float(int(k) + s), 0.0) for s in steps for k in keys]
    df = pd.DataFrame(rows, columns=["step", "probe", "metric", "key", "value", "wall_time"])
    fig = dd.plot.metrics(df, ["eigenvalue"])
    ax = fig.axes[0]
    assert len(ax.lines) == 12 and ax.get_legend() is None
    assert len(fig.axes) == 2  # the colorbar
    np.testing.assert_array_equal(ax.lines[10].get_ydata(), steps + 10.0)  # keys in numeric order
    with pytest.raises(ValueError, match=r"df has no records of metric\(s\) \['nope'\]"):
        dd.plot.metrics(df, ["eigenvalue", "nope"])
    other = Figure().add_subplot()
    assert dd.plot.metrics(df, "eigenvalue", ax=other) is other.figure
    with pytest.raises(ValueError, match="one metric"):
        dd.plot.metrics(df, ["eigenvalue", "eigenvalue"], ax=other)


def test_layer_rotation_one_line_per_parameter(sgd_records):
    fig = dd.plot.layer_rotation(sgd_records)
    ax = fig.axes[0]
    assert [l.get_label() for l in ax.lines] == PARAMS
    assert [t.get_text() for t in fig.legends[0].get_texts()] == PARAMS
    steps, rot = _values(sgd_records, "rotation", "0.weight")
    np.testing.assert_array_equal(ax.lines[0].get_xdata(), steps)
    np.testing.assert_array_equal(ax.lines[0].get_ydata(), rot)
    assert rot[0] == pytest.approx(0, abs=1e-6) and rot[-1] > 0
    assert ax.get_ylabel() == "1 − cos(w, w₀)" and ax.get_xlabel() == "step"
    given = Figure().add_subplot()
    assert dd.plot.layer_rotation(sgd_records, ax=given) is given.figure
    with pytest.raises(ValueError, match="df has no 'rotation' records"):
        dd.plot.layer_rotation(sgd_records[sgd_records.metric != "rotation"])


def test_style_is_scoped_and_sizes_figures():
    rc = dict(matplotlib.rcParams)
    with dd.plot.style("paper"):
        assert matplotlib.rcParams["font.size"] == 8
        assert matplotlib.rcParams["figure.figsize"][0] == dd.plot.SINGLE_COLUMN == 3.25
        colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
        assert colors[0] == "#0173b2"  # seaborn colorblind
        df = pd.DataFrame([(s, "p", "m", "", 1.0 + s, 0.0) for s in range(3)],
                          columns=["step", "probe", "metric", "key", "value", "wall_time"])
        assert dd.plot.metrics(df, "m").get_figwidth() == pytest.approx(3.25)
    assert dict(matplotlib.rcParams) == rc
    with dd.plot.style("talk"):
        assert matplotlib.rcParams["font.size"] > 8
    assert dict(matplotlib.rcParams) == rc
    with pytest.raises(ValueError, match="unknown style 'poster'"):
        with dd.plot.style("poster"):
            pass
    assert dd.plot.DOUBLE_COLUMN == 6.75


def test_run_figures_leaves_out_what_was_not_recorded(tmp_path):
    """A spectrum without its density, and no scores: the eigenvalues are drawn, nothing crashes."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(20, 4, dtype=torch.float64), torch.randint(0, 3, (20,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probes = [dd.probes.HessianSpectrum(every=2, k=3, trace_matvecs=0), dd.probes.GradientNorm()]
    with dd.Monitor(model, opt, probes, loss_fn=nn.CrossEntropyLoss(), probe_data=(x, y), log_dir=tmp_path):
        for _ in range(4):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    figures = dd.plot.run_figures(tmp_path)
    assert set(figures) == {"spectrum", "gradients"}
    stems = [c for c in figures["spectrum"].axes[0].collections if c.get_segments()]
    assert len(stems[0].get_segments()) == 3  # the three top eigenvalues as stems


def test_coherence_on_real_records_matches_the_recorded_values(sgd_records):
    df = sgd_records
    fig = dd.plot.coherence(df, m=32)
    top, bottom = fig.axes
    line = top.lines[0]
    steps, values = _values(df, "coherence")
    assert list(steps) == [0, 3, 6, 9] and np.allclose(line.get_ydata(), values)
    assert np.allclose(bottom.lines[0].get_ydata(), _values(df, "gsnr")[1])
    assert any(l.get_label() == "32: identical gradients" for l in top.lines)


def _pieces(line) -> list[list[float]]:
    """The steps of each unbroken piece of a drawn line (matplotlib breaks it at NaN)."""
    pieces, piece = [], []
    for x, y in line.get_xydata():
        if np.isnan(x) or np.isnan(y):
            pieces, piece = pieces + [piece] * bool(piece), []
        else:
            piece.append(float(x))
    return pieces + [piece] * bool(piece)


def test_a_rerun_into_the_same_log_dir_is_drawn_as_its_own_segment(tmp_path):
    _run(tmp_path, "sgd")  # a notebook cell run twice: the second run continues at step 10
    df = _run(tmp_path, "sgd")
    assert df.step.max() == 19 and set(df[df.step < 10].run) == {0} and set(df[df.step >= 10].run) == {1}
    top, bottom = dd.plot.edge_of_stability(df).axes
    for line in top.lines + bottom.lines:  # sharpness, threshold, loss: measured every 2 steps
        assert _pieces(line) == [[0.0, 2.0, 4.0, 6.0, 8.0], [10.0, 12.0, 14.0, 16.0, 18.0]], line.get_label()
    gn = dd.plot.metrics(df, "grad_norm").axes[0]
    assert len(gn.lines) == len(PARAMS) + 1  # one line per key (and the total), each broken between runs
    for line in gn.lines:
        assert _pieces(line) == [[float(s) for s in range(10)], [float(s) for s in range(10, 20)]]
    rot = dd.plot.layer_rotation(df).axes[0]
    assert all(len(_pieces(line)) == 2 for line in rot.lines)
    coherence = dd.plot.coherence(df).axes[0].lines[0]
    assert _pieces(coherence) == [[0.0, 3.0, 6.0, 9.0], [12.0, 15.0, 18.0]]  # every 3 steps of the counter
    one = dd.plot.metrics(df.drop(columns="run"), "grad_norm").axes[0]  # a frame without runs: one segment
    assert _pieces(one.lines[-1]) == [[float(s) for s in range(20)]]


def test_offline_ratios_over_several_steps_get_no_one_step_spike_line():
    rows = [(s, "safe_step_radius", "ratio", "", 0.5 * (s // 50 + 1), 0.0) for s in (0, 50, 100)]
    rows += [(s, "safe_step_radius", "update_steps", "", 50.0, 0.0) for s in (0, 50, 100)]
    df = pd.DataFrame(rows, columns=["step", "probe", "metric", "key", "value", "wall_time"])
    ax = dd.plot.metrics(df, "ratio").axes[0]
    assert not [l for l in ax.lines if l.get_gid() == "dyndiag-reference"]
    assert ax.get_ylabel() == "update / safe radius"
    assert ax.get_title(loc="right") == "updates over 50 steps: no one-step reference"
    one_step = df.assign(value=np.where(df.metric == "update_steps", 1.0, df.value))  # a Monitor's updates
    ax = dd.plot.metrics(one_step, "ratio").axes[0]
    assert [l.get_gid() for l in ax.lines].count("dyndiag-reference") == 1 and ax.get_ylabel() == "step / safe radius"
