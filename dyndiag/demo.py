"""``dyndiag demo``: train an MLP on digits under a Monitor with every probe, then
measure the final curvature and draw it.

During training every built-in probe records into ``OUT/records`` (SQLite). After
training: top eigenvalues by Lanczos, the Hessian trace by Hutch++ and the
spectral density by stochastic Lanczos quadrature on the whole training set, with
HVP counts and times, and the spectrum figure.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import nn

__all__ = ["run_demo", "digits_mlp"]


def digits_mlp(hidden: int = 48, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """64 -> hidden (tanh) -> 10: about 3.6k parameters for hidden=48."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))
    finally:
        torch.random.set_rng_state(gen_state)
    return model.to(dtype)


def run_demo(out: str | Path = "dyndiag-demo", steps: int = 300, seed: int = 0, echo=print) -> dict:
    """Train, measure, write ``curvature.json`` and ``spectrum.{png,pdf}`` to ``out``.

    Returns the summary dict that is written to ``curvature.json``.
    """
    import dyndiag as dd
    from dyndiag.datasets import load_digits

    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    x, y, x_test, y_test = load_digits(dtype=torch.float64, seed=seed)
    model = digits_mlp(seed=seed, dtype=torch.float64)
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    probe_batch = (x[:256], y[:256])  # fixed, so changes over steps come from the model
    records = out / "records"
    if records.exists():  # a fresh run each time: the demo is not a resumable job
        import shutil

        shutil.rmtree(records)
    P = dd.probes
    probes = [
        P.GradientNorm(per_layer=True),
        P.LayerRotation(every=10),
        P.SoftmaxCollapse(),
        P.EdgeOfStability(every=25),
        P.HessianSpectrum(every=100, k=5, density=True),
        P.GradientCoherence(every=50),
        P.DataScores((x[:512], y[:512]), every=100),
        P.DirectionalSharpness(every=25),
        P.SafeStepRadius(every=25),
        P.SubspaceOverlap(every=50, k=10),
    ]
    t0 = time.perf_counter()
    with dd.Monitor(model, opt, probes, loss_fn=loss_fn, probe_data=probe_batch, log_dir=records):
        for _ in range(steps):  # mini-batch SGD, batch 128
            idx = torch.randint(0, len(y), (128,), generator=gen)
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
    train_time = time.perf_counter() - t0
    with torch.no_grad():
        train_loss = loss_fn(model(x), y).item()
        test_acc = (model(x_test).argmax(1) == y_test).double().mean().item()
    echo(f"trained {steps} SGD steps under a Monitor with {len(probes)} probes in {train_time:.1f}s: "
         f"train loss {train_loss:.4f}, test accuracy {test_acc:.3f}")
    if steps:
        df = dd.load_records(records)
        echo(f"\nlast recorded value of each probe metric ({len(df)} rows in {records})")
        echo(f"{'probe':22s} {'metric':34s} {'step':>5s} {'value':>12s}")
        for (probe, metric), rows in df.groupby(["probe", "metric"], sort=True):
            rows = rows[rows.step == rows.step.max()]
            by_key = dict(zip(rows.key, rows.value))
            # Scalars have key ""; eigenvalues "0".."k-1"; scores mean/p50/p90; else per layer.
            for key, label in (("", metric), ("0", f"{metric} [largest]"), ("mean", f"{metric} [mean]")):
                if key in by_key:
                    value = by_key[key]
                    break
            else:
                value, label = rows.value.mean(), f"{metric} [mean of {len(rows)} layers]"
            echo(f"{probe:22s} {label:34s} {int(rows.step.iloc[0]):5d} {value:12.5g}")

    op = dd.HessianOperator(model, loss_fn, (x, y))
    t = time.perf_counter()
    top = dd.eigenvalues(op, k=5, tol=1e-6, return_vectors=False)
    t_eig = time.perf_counter() - t
    t = time.perf_counter()
    tr = dd.trace(op, num_matvecs=99, method="hutch++")
    t_tr = time.perf_counter() - t
    t = time.perf_counter()
    dens = dd.spectral_density(op, num_probes=8, lanczos_steps=60)
    t_dens = time.perf_counter() - t

    rows = [
        ("top-5 eigenvalues (Lanczos)", ", ".join(f"{v:.4g}" for v in top.values.tolist()), top.num_matvecs, t_eig),
        ("trace (Hutch++)", f"{tr.value:.4g} ± {tr.stderr:.2g}", tr.num_matvecs, t_tr),
        ("spectral density (SLQ 8x60)", f"trace estimate {dens.trace:.4g}", dens.num_matvecs, t_dens),
    ]
    echo(f"\nHessian of the mean training loss ({op.dim} parameters, {len(y)} samples, float64)")
    echo(f"{'quantity':30s} {'value':45s} {'HVPs':>5s} {'seconds':>8s}")
    for name, value, hvps, secs in rows:
        echo(f"{name:30s} {value:45s} {hvps:5d} {secs:8.2f}")

    t = time.perf_counter()
    directions = dd.landscape.random_directions(model, n=2, normalization="filter", seed=seed)
    surf = dd.landscape.surface(model, loss_fn, (x[:512], y[:512]), directions, extent=1.0, resolution=25, progress=False)
    echo(f"2-D filter-normalised loss landscape, 25x25 points on 512 samples: {time.perf_counter() - t:.2f}s "
         f"({surf.batch_points} points per chunk), "
         f"loss {surf.values.min():.4g} .. {surf.values.max():.4g}")
    with dd.plot.style("paper"):
        figures = {"spectrum": dd.plot.spectrum(dens, top=top), "landscape": dd.plot.landscape(surf)}
        figures["spectrum"].axes[0].set_title(f"Hessian spectrum, digits MLP after {steps} steps")
        if steps:  # the records' own figures; the spectrum above is the full training set's
            figures = {**dd.plot.run_figures(records), **figures}
        paths = [p for name, fig in figures.items() for p in dd.plot.save(fig, out / name, formats=("png", "pdf"))]
    summary = {
        "steps": steps,
        "seed": seed,
        "num_parameters": op.dim,
        "train_loss": train_loss,
        "test_accuracy": test_acc,
        "top_eigenvalues": top.values.tolist(),
        "eigenvalues_converged": bool(top.converged),
        "eigenvalue_hvps": top.num_matvecs,
        "trace": tr.value,
        "trace_stderr": tr.stderr,
        "trace_hvps": tr.num_matvecs,
        "density_hvps": dens.num_matvecs,
        "figures": [str(p) for p in paths],
        "records": str(records),
    }
    (out / "curvature.json").write_text(json.dumps(summary, indent=2))
    echo(f"\nwrote {out / 'curvature.json'} and {', '.join(str(p) for p in paths)}")
    return summary
