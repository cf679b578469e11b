"""export_scalars: a real run's records read back from the event file with TensorBoard's own reader.

Also: importing dyndiag (and dyndiag.integrations) loads no framework.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from models import classification_data
from torch import nn

import dyndiag as dd
from dyndiag.integrations.tensorboard import export_scalars

CE = nn.CrossEntropyLoss()
FRAMEWORKS = ("lightning", "pytorch_lightning", "transformers", "accelerate", "tensorboard")


def test_importing_dyndiag_and_its_integrations_package_loads_no_framework():
    code = (
        "import sys, dyndiag, dyndiag.integrations, dyndiag.integrations.tensorboard; "
        "dyndiag.Monitor; dyndiag.probes.GradientNorm; "
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _accumulator():
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return EventAccumulator


class Spiky(dd.Probe):
    """Records a NaN on odd steps: NaN must survive the export."""

    modifies_state = False

    def compute(self, ctx):
        return {"spike": float("nan") if ctx.step % 2 else float(ctx.step)}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    pytest.importorskip("tensorboard")
    log_dir = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = classification_data(n=32, dtype=torch.float32)
    probes = [dd.probes.GradientNorm(per_layer=True), dd.probes.EdgeOfStability(every=2), Spiky(every=1)]
    with pytest.warns(RuntimeWarning, match="non-finite"), dd.Monitor(
        model, opt, probes, loss_fn=CE, probe_data=(x, y), log_dir=log_dir
    ):
        _train(model, opt, x, y, steps=5)
    return log_dir


def _train(model, opt, x, y, steps):
    for _ in range(steps):
        opt.zero_grad()
        CE(model(x), y).backward()
        opt.step()


def _read(tb_dir):
    acc = _accumulator()(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]}


def test_every_scalar_record_is_exported_with_its_step_value_and_wall_time(run):
    tb_dir = export_scalars(run)
    assert tb_dir == run / "tensorboard"
    scalars = _read(tb_dir)
    df = dd.load_records(run)
    expected_tags = {f"{p}/{m}/{k}" if k else f"{p}/{m}" for p, m, k in zip(df.probe, df.metric, df.key)}
    assert set(scalars) == expected_tags
    assert "gradient_norm/grad_norm/0.weight" in scalars and "edge_of_stability/sharpness" in scalars
    for (p, m, k), rows in df.groupby(["probe", "metric", "key"]):
        events = scalars[f"{p}/{m}/{k}" if k else f"{p}/{m}"]
        assert [e.step for e in events] == rows.step.tolist()
        assert [e.wall_time for e in events] == rows.wall_time.tolist()
        got = np.array([e.value for e in events])
        want = rows.value.to_numpy().astype(np.float32)  # TensorBoard stores float32
        assert np.array_equal(got, want, equal_nan=True)
    assert [e.step for e in scalars["edge_of_stability/sharpness"]] == [0, 2, 4]
    assert [math.isnan(e.value) for e in scalars["spiky/spike"]] == [False, True, False, True, False]


def test_re_export_replaces_its_own_event_file_and_leaves_others(tmp_path, run):
    tb_dir = tmp_path / "tb"
    tb_dir.mkdir()
    foreign = tb_dir / "events.out.tfevents.1.host.other"
    foreign.write_bytes(b"")
    export_scalars(run, tb_dir)
    first = _read(tb_dir)
    export_scalars(run, tb_dir)
    ours = sorted(tb_dir.glob("*.dyndiag"))
    assert len(ours) == 1 and foreign.exists()
    second = _read(tb_dir)
    assert {t: [(e.step, e.value) for e in v] for t, v in first.items() if t != "spiky/spike"} == {
        t: [(e.step, e.value) for e in v] for t, v in second.items() if t != "spiky/spike"
    }
    assert len(second["gradient_norm/grad_norm"]) == 5  # not 10: nothing is shown twice


def test_errors_name_the_problem(tmp_path, run, monkeypatch):
    with pytest.raises(ValueError):
        export_scalars(tmp_path / "no_run")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="tb_dir"):
        export_scalars(run, tmp_path / "file")
    with pytest.raises(TypeError, match="log_dir"):
        export_scalars(3)
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r"pip install dyndiag\[tensorboard\]"):
        export_scalars(run)
