"""Curvature examples run end to end (fast mode) and reproduce their qualitative findings."""

import pytest

from examples_loader import load as _load


def _figure(tmp_path, name):
    assert (tmp_path / f"{name}.png").stat().st_size > 10_000
    assert (tmp_path / f"{name}.pdf").exists()


@pytest.mark.slow
def test_edge_of_stability_sharpness_settles_at_the_optimizers_threshold(tmp_path):
    found = _load("edge_of_stability").main(fast=True, out=str(tmp_path))
    kinds = {run["optimizer"] for run in found.values()}
    assert {"gd", "heavy_ball", "adam"} <= kinds
    for name, run in found.items():
        # Near the threshold at the end, from either side: period-2 orbits sit above it.
        assert abs(run["ratio"] - 1) < 0.15, (name, run["final_mean"], run["threshold"])
        if run["optimizer"] != "adam":
            # Progressive sharpening: it started well below and rose to the threshold.
            assert run["initial"] < 0.8 * run["threshold"], name
            assert run["final_mean"] > 1.3 * run["initial"], name
        else:
            # Adam's edge is in the preconditioned sharpness; the plain one stays far below 2/lr.
            assert run["metric"] == "preconditioned_sharpness"
            assert run["lambda_max_final"] < 0.5 * 2 / run["lr"]
    _figure(tmp_path, "edge_of_stability")


@pytest.mark.slow
def test_hessian_spectrum_outliers_and_gradient_in_top_eigenspace(tmp_path):
    found = _load("hessian_spectrum").main(fast=True, out=str(tmp_path))
    init, trained = found["initialisation"], found["trained"]
    assert init["outliers"] == 9  # C - 1 for the 10 digit classes
    assert trained["top"][0] < init["top"][0] / 2 and trained["trace"] < init["trace"] / 2
    baseline = found["random_overlap"]
    assert baseline == pytest.approx(found["k"] / found["num_params"])
    # The mini-batch gradient lies mostly in the top-k eigenspace soon after the start...
    assert found["overlap"]["median_after_10_steps"] > max(0.3, 50 * baseline)
    # ...and the full-batch gradient moves into it during training.
    assert trained["full_batch_overlap"] > max(0.5, 3 * init["full_batch_overlap"])
    _figure(tmp_path, "hessian_spectrum")


@pytest.mark.slow
def test_directional_sharpness_adam_updates_are_flatter_than_sgd(tmp_path):
    found = _load("directional_sharpness").main(fast=True, out=str(tmp_path))
    assert found["Adam"]["median"] < found["SGD"]["median"] / 3
    # Not because Adam sits somewhere flatter: its lambda_max is comparable.
    assert found["Adam"]["lambda_max_median"] > 0.5 * found["SGD"]["lambda_max_median"]
    _figure(tmp_path, "directional_sharpness")


@pytest.mark.slow
def test_safe_step_radius_spikes_happen_at_r_above_1(tmp_path):
    found = _load("safe_step_radius").main(fast=True, out=str(tmp_path))
    runs = found["runs"]
    small, large = runs[min(runs)], runs[max(runs)]
    assert small["max_ratio"] < 1 and small["spikes"] == 0
    assert large["spikes"] >= 3
    # Spikes concentrate where r >= 1: far above the share of such steps.
    assert large["fraction_spikes_r_ge_1"] >= 0.8
    assert large["fraction_spikes_r_ge_1"] > 2 * large["fraction_steps_r_ge_1"]
    _figure(tmp_path, "safe_step_radius")


@pytest.mark.slow
def test_transformer_blocks_heterogeneous_cnn_homogeneous(tmp_path):
    found = _load("transformer_blocks").main(fast=True, out=str(tmp_path))
    transformer, cnn = found["transformer"]["points"], found["CNN"]["points"]
    # Shapes: at initialisation (the paper's JS0) the transformer's blocks differ far more.
    assert transformer["initialisation"]["mean"] > 2 * cnn["initialisation"]["mean"]
    assert transformer["initialisation"]["max"] > 0.8 > cnn["initialisation"]["max"]
    # Scales: after training the blocks' largest eigenvalues spread over orders of magnitude
    # in the transformer and stay within a few x in the CNN (one learning rate fits them all).
    assert transformer["trained"]["spread"] > 100 and cnn["trained"]["spread"] < 20
    assert transformer["trained"]["mean"] > cnn["trained"]["mean"]
    _figure(tmp_path, "transformer_blocks")
