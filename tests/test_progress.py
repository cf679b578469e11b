"""Progress of long curvature steps: a bar of Hessian-vector products on a terminal only."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dyndiag as dd
import dyndiag.probes.context
from models import classification_data

CE = nn.CrossEntropyLoss()


def _one_step(progress, log_dir=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))
    x, y = classification_data(n=32, dtype=torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probes = [dd.probes.EdgeOfStability(), dd.probes.GradientNorm()]
    with dd.Monitor(model, opt, probes, loss_fn=CE, probe_data=(x, y), log_dir=log_dir, progress=progress) as mon:
        opt.zero_grad()
        CE(model(x), y).backward()
        opt.step()
    return mon


@pytest.mark.parametrize("progress, shown", [(None, False), (False, False), (True, True)])
def test_a_curvature_step_shows_its_hvps_only_on_a_terminal_or_when_asked(monkeypatch, capfd, progress, shown):
    # No delay, so a bar that is not disabled shows at once; pytest's stderr is no terminal.
    monkeypatch.setattr(dyndiag.probes.context, "PROGRESS_DELAY", 0.0)
    capfd.readouterr()
    mon = _one_step(progress)
    out = capfd.readouterr()
    assert mon.records().metric.tolist().count("sharpness") == 1  # the bar changes nothing recorded
    if shown:
        assert "dyndiag step 0: curvature, " in out.err and "Hessian-vector products" in out.err
    else:
        assert out.err == "" and out.out == ""


def test_a_step_shorter_than_the_delay_stays_silent_even_when_forced(monkeypatch, capfd):
    monkeypatch.setattr(dyndiag.probes.context, "PROGRESS_DELAY", 1e9)
    capfd.readouterr()
    _one_step(True)
    assert capfd.readouterr().err == ""


def test_progress_is_validated():
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="progress must be True, False or None, got str"):
        dd.Monitor(model, opt, [dd.probes.GradientNorm()], progress="yes")
    with pytest.raises(TypeError, match="progress"):
        dd.analyze(["m_1.pt"], nn.Linear(2, 2), [dd.probes.GradientNorm()], (torch.zeros(1, 2), torch.zeros(1)),
                   "unused", nn.MSELoss(), progress=1)


def test_analyze_shows_a_checkpoints_curvature_under_its_checkpoint_bar(tmp_path, monkeypatch, capfd):
    monkeypatch.setattr(dyndiag.probes.context, "PROGRESS_DELAY", 0.0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))
    torch.save(model.state_dict(), tmp_path / "model_step_3.pt")
    x, y = classification_data(n=32, dtype=torch.float32)
    probes = [dd.probes.HessianSpectrum(k=1, trace_matvecs=0)]
    capfd.readouterr()
    dd.analyze([tmp_path / "model_step_3.pt"], model, probes, (x, y), tmp_path / "quiet", CE)  # not a terminal
    assert capfd.readouterr().err == ""
    dd.analyze([tmp_path / "model_step_3.pt"], model, probes, (x, y), tmp_path / "run", CE, progress=True)
    err = capfd.readouterr().err
    assert "checkpoints" in err and "dyndiag step 3: curvature, " in err
