"""plot.spectrum and plot.save render real results; no global matplotlib state changes."""

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

import dyndiag as dd


@pytest.fixture(scope="module")
def results():
    lam = torch.cat([torch.linspace(-0.1, 0.3, 60, dtype=torch.float64), torch.tensor([4.0, 6.0, 9.0], dtype=torch.float64)])
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(63, 63, generator=g, dtype=torch.float64))
    op = dd.MatrixOperator((Q * lam) @ Q.T)
    return lam, dd.spectral_density(op, num_probes=4, lanczos_steps=30, progress=False), dd.eigenvalues(op, k=3)


def test_density_with_top_eigenvalues(results):
    lam, density, top = results
    rc = dict(matplotlib.rcParams)
    fig = dd.plot.spectrum(density, top=top)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    dashed = [l for l in ax.lines if l.get_linestyle() == "--"]
    assert sorted(round(l.get_xdata()[0], 6) for l in dashed) == [4.0, 6.0, 9.0]
    assert [t.get_text() for t in ax.texts] == ["λ1", "λ2", "λ3"]
    curve = ax.lines[0]
    assert curve.get_xdata().min() < lam.min().item() and curve.get_xdata().max() > 9.0
    assert dict(matplotlib.rcParams) == rc


def test_exact_spectrum_and_eigen_result_and_given_axes(results):
    lam, _, top = results
    fig = dd.plot.spectrum(lam.numpy(), logy=False)
    assert fig.axes[0].get_yscale() == "linear"
    fig2 = Figure()
    ax = fig2.add_subplot()
    assert dd.plot.spectrum(top, ax=ax) is fig2
    assert len(ax.collections) >= 1  # the stems
    with pytest.raises(ValueError, match="eigenvalues"):
        dd.plot.spectrum(np.array([np.nan]))
    with pytest.raises(TypeError, match="ax must be"):
        dd.plot.spectrum(top, ax="left")


def test_save_writes_every_format(tmp_path, results):
    fig = dd.plot.spectrum(results[1])
    paths = dd.plot.save(fig, tmp_path / "sub" / "spec", formats=("pdf", "png", "svg"))
    assert [p.name for p in paths] == ["spec.pdf", "spec.png", "spec.svg"]
    assert all(p.stat().st_size > 500 for p in paths)
    assert (tmp_path / "sub" / "spec.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="formats"):
        dd.plot.save(fig, tmp_path / "x", formats=("doc",))


def test_scores_histograms_split_by_label_share_bins():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.uniform(0, 0.5, 90), rng.uniform(1.0, 1.4, 10)])
    flipped = np.arange(100) >= 90
    fig = dd.plot.scores(torch.as_tensor(values), flipped, names={True: "flipped", False: "clean"}, bins=20)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["clean (n=90)", "flipped (n=10)"]
    fills = [p for p in ax.patches if p.get_fill()]
    assert len(fills) == 2  # one filled step histogram per group
    xs = [p.get_xy()[:, 0] for p in fills]
    assert np.isclose(min(xs[0].min(), xs[1].min()), values.min()) and np.isclose(max(xs[0].max(), xs[1].max()), values.max())
    clean, flip = (p.get_xy() for p in fills)
    assert (clean[clean[:, 0] > 0.6, 1] == 0).all() and (flip[flip[:, 0] < 0.9, 1] == 0).all()  # each where its scores are
    assert clean[:, 1].max() > 0 and flip[:, 1].max() > 0
    assert dd.plot.scores(values).axes[0].get_legend() is None
    with pytest.raises(ValueError, match="labels has 3 entries"):
        dd.plot.scores(values, [True, False, True])
    with pytest.raises(ValueError, match="finite"):
        dd.plot.scores(np.array([1.0, np.nan]))


def test_close_outliers_share_one_label_and_each_keeps_its_line():
    eigs = np.array([10.0, 9.9, 9.85, 5.0, 1.0])
    fig = dd.plot.spectrum(np.linspace(-1, 1, 50), top=eigs)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.texts] == ["λ1–λ3", "λ4", "λ5"]
    assert len([l for l in ax.lines if l.get_linestyle() == "--"]) == 5


def test_edge_of_stability_goes_log_when_adam_values_span_orders_of_magnitude():
    import pandas as pd

    rows = [(s, "edge_of_stability", m, "", v, 0.0) for s in range(5)
            for m, v in (("sharpness", 20.0 + s), ("threshold", 3800.0), ("preconditioned_sharpness", 3000.0 + 100 * s))]
    df = pd.DataFrame(rows, columns=["step", "probe", "metric", "key", "value", "wall_time"])
    assert dd.plot.edge_of_stability(df).axes[0].get_yscale() == "log"
    sgd = df[df.metric != "preconditioned_sharpness"].copy()
    sgd.loc[sgd.metric == "threshold", "value"] = 40.0
    ax = dd.plot.edge_of_stability(sgd).axes[0]
    assert ax.get_yscale() == "linear" and ax.get_ylim()[0] == 0
    assert dd.plot.edge_of_stability(sgd, logy=True).axes[0].get_yscale() == "log"


def _coherence_frame():
    import pandas as pd

    rows = []
    for s in range(0, 50, 10):
        rows += [(s, "real labels", "coherence", "", 40.0 - s / 2, 0.0), (s, "real labels", "gsnr", "", 0.5, 0.0),
                 (s, "random labels", "coherence", "", 2.0 + s / 100, 0.0), (s, "random labels", "gsnr", "", 0.1, 0.0)]
    return pd.DataFrame(rows, columns=["step", "probe", "metric", "key", "value", "wall_time"])


def test_coherence_draws_each_run_against_the_orthogonal_and_identical_lines():
    rc = dict(matplotlib.rcParams)
    fig = dd.plot.coherence(_coherence_frame(), m=128)
    top, bottom = fig.axes
    labels = [l.get_label() for l in top.lines]
    assert labels[:2] == ["real labels", "random labels"]
    refs = {l.get_label(): l.get_ydata()[0] for l in top.lines if l.get_label().startswith(("1:", "128:"))}
    assert refs == {"1: orthogonal gradients": 1.0, "128: identical gradients": 128.0}
    assert top.get_yscale() == "log"  # 1 .. 128 spans more than 100x
    assert len(bottom.lines) == 2 and bottom.get_ylabel() == "GSNR (mean)"
    assert dict(matplotlib.rcParams) == rc
    one = dd.plot.coherence(_coherence_frame(), probes="random labels")
    assert len(one.axes) == 2 and one.axes[0].lines[0].get_label() == "m-coherence"
    assert one.axes[0].get_yscale() == "linear"
    with pytest.raises(ValueError, match="coherence"):
        dd.plot.coherence(_coherence_frame(), probes="nope")
    with pytest.raises(ValueError, match="m must"):
        dd.plot.coherence(_coherence_frame(), m=0)
