"""Edge of stability: full-batch GD, heavy ball and Adam train until the sharpness
reaches the optimizer's own stability threshold, then hover there.

A tanh MLP (64 -> 48 -> 10, float64) fits one-hot targets of 500 digits with the
squared loss 0.5 * ||f(x) - y||^2 (mean over samples), full batch. The
EdgeOfStability probe records the top Hessian eigenvalue of the full-batch loss
every few steps next to the threshold it reads from the optimizer: 2/lr for GD,
(2 + 2 beta)/lr for heavy-ball momentum, and for Adam the preconditioned sharpness
lambda_max(P^-1/2 H P^-1/2) against (2 + 2 beta1)/((1 - beta1) lr) = 38/lr
(Cohen et al. 2021; Cohen et al. 2022 for Adam).

Seen (full mode, ~70 s on a busy 2-core CPU): the sharpness starts at 9.4 and
rises (progressive sharpening) until it meets the threshold, then stays there
while the loss keeps falling non-monotonically. Mean over the last quarter of
training / threshold: GD lr=0.1 20.3 / 20 (1.02x), lr=0.15 13.8 / 13.3 (1.04x),
lr=0.2 10.7 / 10 (1.07x); heavy ball beta=0.9, lr=0.25 14.7 / 15.2 (0.97x); Adam
lr=0.01 preconditioned 3768 / 3800 (0.99x) while its plain lambda_max (~27) is
nowhere near 2/lr = 200 (Adam's first record, 5.5e4, is the step-0
preconditioner built from a single gradient). Fast mode (GD lr=0.15 for 700
steps, heavy ball 250, Adam 200): ratios 1.03, 0.91, 1.01. The ratios can exceed 1: at the edge the iterate
oscillates (period-2 orbits sit above 2/lr), so never expect sharpness <= 2/lr.

    python examples/edge_of_stability.py [--fast] [--out figures]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

import dyndiag as dd
from dyndiag.datasets import load_digits

N_SAMPLES = 500
HIDDEN = 48
# (label, optimizer, lr, steps in full mode, steps in fast mode; 0 = skipped there)
RUNS = [
    ("GD", "gd", 0.1, 2500, 0),
    ("GD", "gd", 0.15, 1500, 700),
    ("GD", "gd", 0.2, 1000, 0),
    ("heavy ball β=0.9", "heavy_ball", 0.25, 1000, 250),
    ("Adam β1=0.9", "adam", 0.01, 800, 200),
]


def squared_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0.5 * ||f(x) - y||^2, summed over outputs, mean over samples."""
    return 0.5 * ((outputs - targets) ** 2).sum(1).mean()


def make_model(seed: int = 0) -> nn.Module:
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = nn.Sequential(nn.Linear(64, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 10))
    finally:
        torch.random.set_rng_state(gen_state)
    return model.double()


def make_optimizer(kind: str, params, lr: float) -> torch.optim.Optimizer:
    if kind == "gd":
        return torch.optim.SGD(params, lr=lr)
    if kind == "heavy_ball":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999))


def train(kind: str, lr: float, steps: int, every: int, data):
    """Full-batch training under a Monitor with the EdgeOfStability probe; its records."""
    x, y = data
    model = make_model()
    opt = make_optimizer(kind, model.parameters(), lr)
    probe = dd.probes.EdgeOfStability(every=lambda s: s % every == 0 or s == steps - 1)
    with dd.Monitor(model, opt, [probe], loss_fn=squared_loss, probe_data=(x, y)) as mon:
        for _ in range(steps):
            opt.zero_grad()
            squared_loss(model(x), y).backward()
            opt.step()
        return mon.records()


def summarise(df, kind: str) -> dict:
    metric = "preconditioned_sharpness" if kind == "adam" else "sharpness"
    rows = df[df.metric == metric].sort_values("step")
    steps, values = rows.step.to_numpy(), rows.value.to_numpy()
    threshold = float(df[df.metric == "threshold"].value.iloc[-1])
    last = values[steps >= steps.max() - 0.25 * (steps.max() + 1)]  # the last quarter of training
    lam = df[df.metric == "sharpness"].sort_values("step").value.to_numpy()
    loss = df[df.metric == "loss"].sort_values("step").value.to_numpy()
    return {
        "metric": metric,
        "threshold": threshold,
        "initial": float(values[0]),
        "min": float(values.min()),
        "max": float(values.max()),
        "final_mean": float(last.mean()),
        "final_median": float(np.median(last)),
        "ratio": float(last.mean() / threshold),
        "first_step_at_threshold": int(steps[np.argmax(values >= 0.95 * threshold)]) if (values >= 0.95 * threshold).any() else None,
        "lambda_max_final": float(lam[-max(1, len(lam) // 4):].mean()),
        "loss_initial": float(loss[0]),
        "loss_final": float(loss[-1]),
        "loss_increases": int((np.diff(loss) > 0).sum()),
    }


def main(fast: bool = False, out: str = "figures", every: int | None = None) -> dict:
    """Train every run; print and return ``{run name: summary}``; save the figure."""
    x, labels, _, _ = load_digits(dtype=torch.float64)
    x, labels = x[:N_SAMPLES], labels[:N_SAMPLES]
    y = nn.functional.one_hot(labels, 10).double()
    runs = [(label, kind, lr, fast_steps if fast else steps) for label, kind, lr, steps, fast_steps in RUNS]
    runs = [r for r in runs if r[3] > 0]

    fig = Figure(figsize=(2.6 * len(runs), 4.4), layout="constrained")
    axes = fig.subplots(2, len(runs), sharex="col", height_ratios=(3, 2))
    found = {}
    for col, (label, kind, lr, steps) in enumerate(runs):
        t0 = time.perf_counter()
        # Fast mode records about 25 times per run; full mode every 10 steps.
        df = train(kind, lr, steps, every or (max(10, steps // 28) if fast else 10), (x, y))
        name = f"{kind} lr={lr:g}"
        s = found[name] = summarise(df, kind) | {"optimizer": kind, "lr": lr, "steps": steps,
                                                 "seconds": time.perf_counter() - t0}
        print(f"{label:17s} lr={lr:<5g} {s['metric']:>24s}: {s['initial']:9.3f} -> mean of last quarter "
              f"{s['final_mean']:9.3f} vs threshold {s['threshold']:9.3f} (ratio {s['ratio']:.3f}); "
              f"loss {s['loss_initial']:.3f} -> {s['loss_final']:.3f}, rose on {s['loss_increases']} of "
              f"{len(df[df.metric == 'loss']) - 1} records ({steps} steps, {s['seconds']:.1f} s)")
        if kind == "adam":
            print(f"{'':17s} its plain lambda_max at the end: {s['lambda_max_final']:.2f} vs 2/lr = {2 / lr:g}")
        top, bottom = axes[:, col]
        dd.plot.edge_of_stability(df, ax=top)
        if kind == "adam":  # lambda_max (~25) and the preconditioned one (~10^3-10^4) differ 100x
            top.set_yscale("log")
            lo, hi = min(v.min() for v in top.get_lines()[0].get_data()[1:]), top.dataLim.ymax
            top.set_ylim(lo / 2, hi * 2)
        dd.plot.metrics(df, "loss", ax=bottom, probe="edge_of_stability")
        top.set_title(f"{label}, η={lr:g}", fontsize=9)
        top.set_xlabel("")
        if col:
            top.set_ylabel("")
            bottom.set_ylabel("")
        for i, ax in enumerate((top, bottom)):
            if ax.get_legend() is not None:
                ax.get_legend().remove()
        if kind == "adam":
            top.legend(loc="center right", fontsize=7)
    axes[0, 0].legend(loc="lower right", fontsize=7)
    paths = dd.plot.save(fig, f"{out}/edge_of_stability", formats=("png", "pdf"))
    print("saved", ", ".join(map(str, paths)))
    return found


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="fewer runs and steps (the test's setting)")
    parser.add_argument("--out", default="figures")
    args = parser.parse_args()
    main(fast=args.fast, out=args.out)
