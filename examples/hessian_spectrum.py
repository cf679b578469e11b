"""Hessian spectrum of a digits classifier at initialisation and after training.

Prints the top-12 eigenvalues (Lanczos), the trace (Hutch++) and the number of
outliers — the eigenvalues above the largest ratio gap lambda_i / lambda_(i+1)
among the top 12 — and saves both SLQ densities with the outliers marked. Seen
on a 2-core CPU in ~15 s: at initialisation 9 = C - 1 outliers (C = 10 classes)
stand clear of a bulk around zero, the class-structure outliers of Sagun et al.
and Papyan; after training the whole spectrum contracts about 7x and the top
eigenvalues separate further from a bulk pressed against zero.

    python examples/hessian_spectrum.py [--steps 400] [--out figures]
"""

from __future__ import annotations

import argparse

import torch
from matplotlib.figure import Figure
from torch import nn

import dyndiag as dd
from dyndiag.datasets import load_digits
from dyndiag.demo import digits_mlp


def main(steps: int = 400, out: str = "figures") -> dict:
    x, y, _, _ = load_digits(dtype=torch.float64)
    model = digits_mlp(dtype=torch.float64)
    loss_fn = nn.CrossEntropyLoss()
    fig = Figure(figsize=(7.0, 2.8), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    found = {}
    for ax, phase in zip(axes, ("initialisation", "trained")):
        if phase == "trained":
            opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
            gen = torch.Generator().manual_seed(0)
            for _ in range(steps):
                idx = torch.randint(0, len(y), (128,), generator=gen)
                opt.zero_grad()
                loss_fn(model(x[idx]), y[idx]).backward()
                opt.step()
        H = dd.HessianOperator(model, loss_fn, (x, y))
        top = dd.eigenvalues(H, k=12)
        tr = dd.trace(H, num_matvecs=99)
        density = dd.spectral_density(H, num_probes=8, lanczos_steps=60, progress=False)
        vals = top.values.double()
        outliers = int(torch.argmax(vals[:-1] / vals[1:]).item()) + 1  # largest ratio gap
        found[phase] = {"top": vals.tolist(), "trace": tr.value, "outliers": outliers}
        print(f"{phase:15s} top-12 {[round(v, 4) for v in vals.tolist()]}\n{'':15s} trace {tr.value:.3f}, "
              f"outliers above the largest gap: {outliers} ({top.num_matvecs + tr.num_matvecs} HVPs)")
        dd.plot.spectrum(density, ax=ax, top=top.values[:outliers])
        ax.set_title(phase, fontsize=9)
    paths = dd.plot.save(fig, f"{out}/hessian_spectrum", formats=("png", "pdf"))
    print("saved", ", ".join(map(str, paths)))
    return found


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--out", default="figures")
    args = parser.parse_args()
    main(args.steps, args.out)
