"""Landscapes under torch.distributed: 2 gloo processes split the grid (or its data) and
return the single-process surface; rank 0 alone writes the store, which resumes."""

from __future__ import annotations

import os
import warnings
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import dyndiag.landscape as L
from tests.models import classification_data, tanh_mlp
from tests.test_landscape import _failing_metric

pytestmark = pytest.mark.slow  # the module shares one spawn of 2 ranks

CE = nn.CrossEntropyLoss()
SPLIT = 10  # data_parallel: rank 0 holds 10 samples, rank 1 the other 14
KW = dict(resolution=4, progress=False)  # 16 points


def accuracy(outputs, targets):
    return (outputs.argmax(1) == targets).double().mean()


class Counting:
    """A closure counting its calls (one per point and batch), raising from call ``fail_at`` on."""

    def __init__(self, fail_at=None):
        self.calls, self.fail_at = 0, fail_at

    def __call__(self, model, batch):
        self.calls += 1
        if self.fail_at is not None and self.calls >= self.fail_at:
            raise RuntimeError("interrupted")
        return CE(model(batch[0]), batch[1])


def _shard(rank):
    x, y = classification_data()
    part = slice(0, SPLIT) if rank == 0 else slice(SPLIT, None)
    x, y = x[part], y[part]
    return [(x[:4], y[:4]), (x[4:], y[4:])]  # two unequal batches per rank


def _raises(fn, *args, **kw):
    try:
        fn(*args, **kw)
    except Exception as e:  # noqa: BLE001 - the test compares type and message
        return f"{type(e).__name__}: {e}"
    return None


def shard_data():
    """``--data`` of the data-parallel CLI run: this rank's shard."""
    return _shard(dist.get_rank())


def _cli(rank: int, world: int, port: int, out: str) -> dict:
    """``dyndiag landscape --data-parallel`` with torchrun's variables set: the command
    starts (and ends) the process group itself."""
    from click.testing import CliRunner

    from dyndiag.cli import main

    env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    os.environ.update(env)
    try:
        args = ["landscape", os.path.join(out, "model_step_3.pt"), "--model", "tests.models:tanh_mlp",
                "--data", "tests.test_landscape_distributed:shard_data", "--out", os.path.join(out, "cli"),
                "--resolution", "4", "--data-parallel", "--format", "png", "--no-progress"]
        result = CliRunner().invoke(main, args)
        return {"exit_code": result.exit_code, "output": result.output, "left_a_group": dist.is_initialized()}
    finally:
        for k in env:
            del os.environ[k]


def _worker(rank: int, world: int, init_file: str, out: str, port: int) -> None:
    res = {"cli": _cli(rank, world, port, out)}
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model, data = tanh_mlp(), classification_data()
        dirs = L.random_directions(model, 2, seed=0)

        # Split (the default): every rank has all the data and evaluates part of the grid.
        counter = Counting()
        s = L.surface(model, None, data, dirs, closure=counter, path=os.path.join(out, f"split{rank}.jsonl"), **KW)
        res["split_per_point"], res["split_calls"] = s.values, counter.calls
        s = L.surface(model, CE, data, dirs, metric=accuracy, **KW)
        res["split_batched"], res["split_metric"], res["split_chunk"] = s.values, s.metric_values, s.batch_points

        # data_parallel: every rank evaluates every point on its shard; losses all-reduced.
        shard = _shard(rank)
        s = L.surface(model, CE, shard, dirs, metric=accuracy, data_parallel=True, **KW)
        res["dp_batched"], res["dp_metric"], res["dp_chunk"] = s.values, s.metric_values, s.batch_points
        counter = Counting()
        res["dp_per_point"] = L.surface(model, None, shard, dirs, closure=counter, data_parallel=True, **KW).values
        res["dp_calls"] = counter.calls
        # A metric vmap cannot batch on rank 1 only (.item()): both ranks go per point, in step.
        item_metric = (lambda o, t: float(accuracy(o, t))) if rank == 1 else accuracy
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            s = L.surface(model, CE, shard, dirs, metric=item_metric, data_parallel=True, batch_points=4, **KW)
        res["dp_fallback"], res["dp_fallback_chunk"] = s.values, s.batch_points
        res["dp_fallback_warning"] = [str(w.message) for w in caught if w.category is RuntimeWarning]

        # Interrupted on both ranks in the same round (4th point of each), then resumed.
        path = os.path.join(out, "resume.jsonl")
        res["stop_both"] = _raises(L.surface, model, None, data, dirs, closure=Counting(fail_at=4), path=path, **KW)
        counter = Counting()
        res["resumed"] = L.surface(model, None, data, dirs, closure=counter, path=path, **KW).values
        res["resumed_calls"] = counter.calls
        # One rank fails (rank 1, its 3rd point): the other raises instead of waiting for it.
        path = os.path.join(out, "one.jsonl")
        closure = Counting(fail_at=3 if rank == 1 else None)
        res["stop_one"] = _raises(L.surface, model, None, data, dirs, closure=closure, path=path, **KW)
        res["resumed_one"] = L.surface(model, None, data, dirs, closure=Counting(), path=path, **KW).values
        # Batched chunks of 2: the metric runs once per chunk; the 3rd chunk of each rank fails.
        kw = dict(KW, batch_points=2)
        path = os.path.join(out, "batched.jsonl")
        res["full2"] = L.surface(model, CE, data, dirs, metric=accuracy, **kw).values
        res["stop_batched"] = _raises(L.surface, model, CE, data, dirs, metric=_failing_metric(2), path=path, **kw)
        res["resumed2"] = L.surface(model, CE, data, dirs, metric=accuracy, path=path, **kw).values

        # Ranks that disagree on the directions are refused on every rank.
        other = L.random_directions(model, 2, seed=rank)
        res["mismatch"] = _raises(L.surface, model, CE, data, other, **KW)
        torch.save(res, os.path.join(out, f"rank{rank}.pt"))
        # Both ranks past their last collective before either tears gloo down (an exit while
        # the other's last transfer completes aborted with SIGABRT).
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    out = tmp_path_factory.mktemp("landscape_ranks")
    torch.save(tanh_mlp().state_dict(), out / "model_step_3.pt")
    with socket.socket() as s:  # a free port for the CLI's own process group
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, str(out / "init"), str(out), port), nprocs=2, join=True)
    return out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.fixture(scope="module")
def single():
    model, data = tanh_mlp(), classification_data()
    dirs = L.random_directions(model, 2, seed=0)
    return L.surface(model, CE, data, dirs, metric=accuracy, **KW)


def test_split_grid_equals_one_process_and_halves_the_work(ranks, single):
    out, (r0, r1) = ranks
    for key in ("split_per_point", "split_batched", "split_metric"):
        np.testing.assert_array_equal(r0[key], r1[key])  # every rank returns the whole surface
    np.testing.assert_allclose(r0["split_per_point"], single.values, rtol=1e-12, atol=0)
    np.testing.assert_allclose(r0["split_batched"], single.values, rtol=1e-12, atol=0)
    np.testing.assert_array_equal(r0["split_metric"], single.metric_values)
    assert r0["split_calls"] == r1["split_calls"] == 8  # 16 points, one batch each
    assert r0["split_chunk"] == r1["split_chunk"] == 8  # chunks capped so each rank gets one
    # Rank 0 alone wrote its store, with every point; rank 1's path was never created.
    assert len((out / "split0.jsonl").read_text().splitlines()) == 1 + 16
    assert not (out / "split1.jsonl").exists()


def test_data_parallel_equals_one_process_on_the_union(ranks, single):
    _, (r0, r1) = ranks
    for key in ("dp_batched", "dp_metric", "dp_per_point"):
        np.testing.assert_array_equal(r0[key], r1[key])
    np.testing.assert_allclose(r0["dp_batched"], single.values, rtol=1e-12, atol=0)
    np.testing.assert_allclose(r0["dp_per_point"], single.values, rtol=1e-12, atol=0)
    np.testing.assert_allclose(r0["dp_metric"], single.metric_values, rtol=1e-12, atol=0)
    assert r0["dp_calls"] == r1["dp_calls"] == 16 * 2  # every point on both of its batches
    assert r0["dp_chunk"] == r1["dp_chunk"] > 1  # batched on both
    np.testing.assert_array_equal(r0["dp_fallback"], r1["dp_fallback"])
    np.testing.assert_allclose(r0["dp_fallback"], single.values, rtol=1e-12, atol=0)
    assert r0["dp_fallback_chunk"] == r1["dp_fallback_chunk"] == 1
    (w0,), (w1,) = r0["dp_fallback_warning"], r1["dp_fallback_warning"]
    assert "on rank 1, the first chunk failed batched" in w0 and "the first chunk failed batched" in w1


def test_interrupted_distributed_run_resumes_from_the_store(ranks, single):
    out, (r0, r1) = ranks
    for r in (r0, r1):
        assert r["stop_both"] == "RuntimeError: interrupted"
        np.testing.assert_allclose(r["resumed"], single.values, rtol=1e-12, atol=0)
        assert r["resumed_calls"] == 5  # 6 points stored before the stop (3 rounds of 2), 10 left
        np.testing.assert_allclose(r["resumed_one"], single.values, rtol=1e-12, atol=0)
        # Chunks of 2 dealt the same way: resumed values are bit-identical.
        assert r["stop_batched"] == "RuntimeError: interrupted"
        np.testing.assert_array_equal(r["resumed2"], r0["full2"])
    assert r1["stop_one"] == "RuntimeError: interrupted"
    assert r0["stop_one"] == "RuntimeError: surface: rank 1 failed: RuntimeError: interrupted"
    for name in ("resume", "one", "batched"):
        lines = (out / f"{name}.jsonl").read_text().splitlines()
        assert len(lines) == 17 and len(set(lines[1:])) == 16, name
    # A store written by two ranks resumes in one process too.
    model, data = tanh_mlp(), classification_data()
    counter = Counting()
    again = L.surface(model, None, data, L.random_directions(model, 2, seed=0), closure=counter,
                      path=out / "resume.jsonl", **KW)
    assert counter.calls == 0
    np.testing.assert_array_equal(again.values, r0["resumed"])


def test_ranks_with_different_directions_are_refused(ranks):
    _, (r0, r1) = ranks
    assert r0["mismatch"] == r1["mismatch"]
    assert r0["mismatch"].startswith("ValueError: directions, centre parameters")


def test_cli_under_torchrun_variables_averages_the_shards(ranks, single):
    import pandas as pd

    out, (r0, r1) = ranks
    for r in (r0, r1):
        assert r["cli"]["exit_code"] == 0, r["cli"]["output"]
        assert not r["cli"]["left_a_group"]  # the command destroyed the group it started
    assert "2 ranks, data shards averaged" in r0["cli"]["output"]
    assert r1["cli"]["output"] == ""  # rank 0 alone prints and writes
    table = pd.read_csv(out / "cli" / "landscape.csv")
    np.testing.assert_allclose(table.loss.to_numpy(), single.values.reshape(-1), rtol=1e-12, atol=0)
    assert (out / "cli" / "landscape.png").exists()
