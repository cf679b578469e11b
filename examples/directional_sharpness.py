"""Directional sharpness along the optimizer's actual update: Adam vs SGD.

The same digits MLP (float64, same initialisation, same mini-batches of 128) is
trained with SGD, SGD with heavy-ball momentum and Adam. A Monitor records, every
10 steps, the DirectionalSharpness probe — d^T H d / ||d||^2 along the update
d = theta_after - theta_before the optimizer really applied, H the Hessian of a
fixed 512-sample batch at theta_before — and, for reference, the top eigenvalue
lambda_max of the same Hessian and the loss (EdgeOfStability probe).

Seen (full mode, 300 steps, ~25 s on a busy 2-core CPU): SGD's update (the
negative gradient) has a median directional sharpness of 1.04, about half of
lambda_max (~1.9): the gradient points into the sharp directions. Adam's update
has a median of 0.154, 6.7x lower, at a similar loss (0.119 vs 0.107 for SGD)
and lambda_max (~1.7): Adam moves along flat directions, the mechanism
"Toward Understanding Why Adam Converges Faster Than SGD for Transformers"
proposes. Momentum averages gradients and sits in between (0.37).

    python examples/directional_sharpness.py [--fast] [--out figures]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from torch import nn

import dyndiag as dd
from dyndiag.datasets import load_digits
from dyndiag.demo import digits_mlp

# name -> optimizer factory; SGD's lr is the largest that trains smoothly here, Adam's
# gives about the same loss after 300 steps.
OPTIMIZERS = {
    "SGD": lambda p: torch.optim.SGD(p, lr=0.5),
    "SGD + momentum 0.9": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "Adam": lambda p: torch.optim.Adam(p, lr=3e-3),
}


def train(name: str, steps: int, every: int, x: torch.Tensor, y: torch.Tensor):
    model = digits_mlp(dtype=torch.float64)
    loss_fn = nn.CrossEntropyLoss()
    opt = OPTIMIZERS[name](model.parameters())
    gen = torch.Generator().manual_seed(0)  # the same mini-batches for every optimizer
    probes = [dd.probes.DirectionalSharpness(every=every), dd.probes.EdgeOfStability(every=every)]
    with dd.Monitor(model, opt, probes, loss_fn=loss_fn, probe_data=(x[:512], y[:512])) as mon:
        for _ in range(steps):
            idx = torch.randint(0, len(y), (128,), generator=gen)
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
        return mon.records()


def main(fast: bool = False, out: str = "figures", steps: int | None = None, every: int = 10) -> dict:
    """Train each optimizer; print and return the directional sharpness found; save the figure."""
    steps = steps if steps is not None else (150 if fast else 300)
    names = ["SGD", "Adam"] if fast else list(OPTIMIZERS)
    x, y, _, _ = load_digits(dtype=torch.float64)
    found, frames = {"steps": steps}, []
    for name in names:
        t0 = time.perf_counter()
        df = train(name, steps, every, x, y)
        ds = df[df.metric == "directional_sharpness"].sort_values("step").value.to_numpy()
        lam = df[df.metric == "sharpness"].sort_values("step").value.to_numpy()
        loss = df[df.metric == "loss"].sort_values("step").value.to_numpy()
        found[name] = {
            "median": float(np.median(ds)), "mean": float(ds.mean()), "values": ds.tolist(),
            "lambda_max_median": float(np.median(lam)), "median_ratio_to_lambda_max": float(np.median(ds / lam)),
            "final_loss": float(loss[-1]), "seconds": time.perf_counter() - t0,
        }
        f = found[name]
        print(f"{name:19s} directional sharpness along the update: median {f['median']:.4f} (mean {f['mean']:.4f}, "
              f"{len(ds)} records); median lambda_max {f['lambda_max_median']:.3f}, median ratio "
              f"{f['median_ratio_to_lambda_max']:.3f}; loss at the last record {f['final_loss']:.4f} ({f['seconds']:.1f} s)")
        df = df.assign(probe=name)  # one line per optimizer in the combined figure
        frames.append(df)
    found["sgd_over_adam"] = found["SGD"]["median"] / found["Adam"]["median"]
    print(f"SGD's median directional sharpness is {found['sgd_over_adam']:.1f}x Adam's")

    df = pd.concat(frames, ignore_index=True)
    fig = Figure(figsize=(10.0, 2.9), layout="constrained")
    axes = fig.subplots(1, 3)
    for ax, metric, ylabel, title in (
        (axes[0], "directional_sharpness", "$d^\\top H d / \\|d\\|^2$", "curvature along the update $d$"),
        (axes[1], "sharpness", "$\\lambda_{\\max}(H)$", "top Hessian eigenvalue"),
        (axes[2], "loss", "loss (512-sample batch)", "loss"),
    ):
        dd.plot.metrics(df, metric, ax=ax, logy=metric == "directional_sharpness")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.get_legend().remove()
    axes[0].legend(fontsize=7, loc="lower right")
    paths = dd.plot.save(fig, f"{out}/directional_sharpness", formats=("png", "pdf"))
    print("saved", ", ".join(map(str, paths)))
    return found


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="SGD and Adam only, 150 steps (the test's setting)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--out", default="figures")
    args = parser.parse_args()
    main(fast=args.fast, out=args.out, steps=args.steps)
