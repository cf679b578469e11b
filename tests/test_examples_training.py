"""Training-dynamics examples run end to end (fast mode) and show their qualitative findings."""

import pytest

from examples_loader import load as _load


def _png(tmp_path, name):
    return (tmp_path / f"{name}.png").stat().st_size > 10_000


@pytest.mark.slow
def test_data_diet_top_scores_catch_flipped_labels(tmp_path):
    found = _load("data_diet").main(fast=True, out=str(tmp_path))
    base = found["flipped_fraction"]
    assert 0.09 < base < 0.11
    # The top-scored 10 % is enriched in flipped labels at least 3x over the base rate.
    assert found["el2n"]["top10_flipped"] >= 3 * base
    assert found["grand"]["top10_flipped"] >= 3 * base
    # Pruning the easiest examples together with the top 10 % (the flipped ones) keeps
    # fewer flipped labels than random pruning and does not lose accuracy to it.
    pruned = found["pruning"][0.3]
    assert pruned["flipped_kept"]["lowest EL2N + top 10 %"] < pruned["flipped_kept"]["random"] / 3
    assert pruned["accuracy"]["lowest EL2N + top 10 %"] >= pruned["accuracy"]["random"]
    assert _png(tmp_path, "data_diet")


@pytest.mark.slow
def test_coherent_gradients_real_labels_above_random_early(tmp_path):
    found = _load("coherent_gradients").main(fast=True, out=str(tmp_path))
    real, rand = found["real labels"], found["random labels"]
    assert real["coherence_early_mean"] >= 3 * rand["coherence_early_mean"]
    assert real["coherence_early_mean"] > 5  # far above orthogonal gradients (1)
    assert real["train_accuracy"] > rand["train_accuracy"]
    assert _png(tmp_path, "coherent_gradients")


@pytest.mark.slow
def test_layer_rotation_layca_rotates_more_and_more_uniformly(tmp_path):
    found = _load("layer_rotation").main(fast=True, out=str(tmp_path))
    sgd, layca = found["SGD, lr 0.01"], found["Layca, lr 0.01"]
    assert len(sgd["rotation"]) == len(layca["rotation"]) == 4  # the four weight matrices
    assert layca["min_rotation"] > 10 * sgd["min_rotation"]
    assert layca["uniformity"] > sgd["uniformity"]
    assert layca["test_accuracy"] > sgd["test_accuracy"]
    assert _png(tmp_path, "layer_rotation")


@pytest.mark.slow
def test_softmax_collapse_float32_not_float64_and_perpgrad_stops_nlm(tmp_path):
    found = _load("softmax_collapse").main(fast=True, out=str(tmp_path))
    plain, perp = found["plain"], found["perpGrad"]
    # Softmax Collapse in float32; the same weights evaluated in float64 do not collapse.
    assert plain["collapsed_float32_max"] > 0.3
    assert plain["collapsed_float64_max"] < 0.01
    # Naive loss minimisation: the descent direction and the step taken point along the weights.
    assert plain["grad_weight_cosine_max"] > 0.6
    assert plain["update_weight_cosine_median"] > 0.5
    # perpGrad: the step taken is nearly orthogonal to the weights, and nothing collapses.
    assert perp["update_weight_cosine_median"] < 0.2
    assert perp["collapsed_float32_max"] < 0.01
    assert perp["weight_norm_final"] < plain["weight_norm_final"]
    assert _png(tmp_path, "softmax_collapse")


@pytest.mark.slow
def test_landscapes_large_batch_minimum_is_sharper(tmp_path):
    found = _load("landscapes").main(fast=True, out=str(tmp_path))
    sb, lb = found["small batch (16)"], found["large batch (1438)"]
    assert max(sb["train_loss"], lb["train_loss"]) < 0.05  # both trained to the same loss
    assert found["lambda_ratio"] > 1.5  # 2.0-3.7 over seeds 0-3
    assert found["trace_ratio"] > 1.5
    assert sum(sb["pca_explained_variance"]) > 0.5
    assert _png(tmp_path, "landscapes")
