"""plot.landscape on real and constructed surfaces: the artists it promises."""

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
from matplotlib.figure import Figure

import dyndiag as dd
from dyndiag.landscape.grid import Surface


def bowl(n=15):
    x = np.linspace(-1, 1, n)
    X, Y = np.meshgrid(x, x, indexing="ij")
    return Surface(coords=(x, x), values=0.01 + 2 * X**2 + Y**2)


def test_contour_uses_log_levels_marks_the_model_and_overlays_a_path():
    rc = dict(matplotlib.rcParams)
    path = np.array([[0.8, -0.6], [0.4, -0.2], [0.0, 0.0]])
    fig = dd.plot.landscape(bowl(), trajectory=path)
    ax = fig.axes[0]
    cs = [c for c in ax.collections if hasattr(c, "levels")][0]
    assert np.allclose(np.diff(np.log(cs.levels)), np.log(cs.levels[1] / cs.levels[0]))  # geometric
    lines = {l.get_label(): l for l in ax.lines}
    assert np.array_equal(lines["training path"].get_xydata(), path)
    assert lines["model"].get_xydata().tolist() == [[0.0, 0.0]]
    assert dict(matplotlib.rcParams) == rc


def test_filled_has_a_colorbar_and_line_for_1d():
    fig = dd.plot.landscape(bowl(), kind="filled")
    assert len(fig.axes) == 2 and fig.axes[1].get_ylabel() == "loss"  # the colourbar
    x = np.linspace(-1, 1, 11)
    fig1 = dd.plot.landscape(Surface(coords=(x,), values=1 + x**2))
    (line,) = [l for l in fig1.axes[0].lines if l.get_linestyle() == "-"]
    assert np.array_equal(line.get_xdata(), x) and fig1.axes[0].get_yscale() == "linear"


def test_surface_3d_and_given_axes_and_bad_input():
    assert dd.plot.landscape(bowl(), kind="surface").axes[0].name == "3d"
    fig = Figure()
    ax = fig.add_subplot()
    assert dd.plot.landscape(bowl(), ax=ax) is fig
    with pytest.raises(ValueError, match="3-D axes"):
        dd.plot.landscape(bowl(), ax=ax, kind="surface")
    with pytest.raises(ValueError, match="kind"):
        dd.plot.landscape(bowl(), kind="line")
    with pytest.raises(TypeError, match="Surface"):
        dd.plot.landscape(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="log=True needs positive"):
        dd.plot.landscape(Surface(coords=(np.arange(3.0),), values=np.array([-1.0, 0.0, 1.0])), log=True)


def test_several_1d_lines_on_one_axes_get_colours_labels_and_one_origin_line():
    x = np.linspace(-1, 1, 11)
    fig = dd.plot.landscape(Surface(coords=(x,), values=1 + x**2), label="small batch")
    ax = fig.axes[0]
    dd.plot.landscape(Surface(coords=(x,), values=1 + 3 * x**2), ax=ax, label="large batch", color="C3")
    solid = [l for l in ax.lines if l.get_linestyle() == "-"]
    assert [l.get_label() for l in solid] == ["small batch", "large batch"]
    assert solid[0].get_color() != solid[1].get_color() and solid[1].get_color() == "C3"
    assert sum(l.get_linestyle() == ":" for l in ax.lines) == 1
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["small batch", "large batch"]


def test_contours_have_a_colorbar_named_by_the_metric_and_labels_off_the_minimum():
    x = np.linspace(-1, 1, 25)
    X, Y = np.meshgrid(x, x, indexing="ij")
    surf = Surface(coords=(x, x), values=0.01 + 2 * (X - 0.3) ** 2 + Y**2)  # minimum at (0.3, 0)
    fig = dd.plot.landscape(surf)
    ax, bar = fig.axes
    assert bar.get_ylabel() == "loss"
    cs = [c for c in ax.collections if hasattr(c, "levels")][0]
    points = np.array([t.get_position() for t in cs.labelTexts])
    assert 3 <= len(points) <= 5
    # Off the minimum (not on the crowded inner levels) and apart from each other, in axes fractions.
    assert np.all(np.linalg.norm((points - [0.3, 0.0]) / 2, axis=1) > 0.15)
    gaps = np.linalg.norm((points[:, None] - points[None]) / 2, axis=2)
    assert np.all(gaps[~np.eye(len(points), dtype=bool)] > 0.15)
    assert np.all(np.abs(points) < 0.8 + 1e-9)  # clear of the edges, where a label is cut
    assert dd.plot.landscape(surf, metric="error", kind="filled").axes[1].get_ylabel() == "error"
    with pytest.raises(TypeError, match="metric"):
        dd.plot.landscape(surf, metric=None)


def test_trajectory_axes_show_the_explained_variance():
    from dyndiag.landscape import TrajectoryDirections

    path = np.array([[0.8, -0.6], [0.4, -0.2], [0.0, 0.0]])
    traj = TrajectoryDirections([], explained_variance=np.array([0.912, 0.071]), path=path)
    ax = dd.plot.landscape(bowl(), trajectory=traj, labels=("PC 1", "PC 2")).axes[0]
    assert ax.get_xlabel() == "PC 1 (91.2 % of path variance)"
    assert ax.get_ylabel() == "PC 2 (7.1 % of path variance)"
    x = np.linspace(-1, 1, 11)
    line = dd.plot.landscape(Surface(coords=(x,), values=1 + x**2), trajectory=traj, labels=("PC 1", "")).axes[0]
    assert line.get_xlabel() == "PC 1 (91.2 % of path variance)" and line.get_ylabel() == "loss"
    assert dd.plot.landscape(bowl(), trajectory=path).axes[0].get_xlabel() == "direction 1"  # coordinates only
