"""The command line end to end: the demo writes what it promises; errors are one line."""

import json

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
    for stem in ("spectrum", "landscape", "edge_of_stability", "layer_rotation", "gradients", "scores"):
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
