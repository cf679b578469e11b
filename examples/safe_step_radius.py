"""Safe step radius ("Ghosts of Softmax"): loss spikes happen where the step leaves
the radius of convergence of the cross-entropy.

Full-batch GD trains the digits MLP (float64, cross-entropy, 1,437 training
samples) at a step size that trains smoothly and at larger ones that spike. The
SafeStepRadius probe records, at every step, the normalised step r = lr / rho:
rho is the safe step length pi / (max_k a_k - min_k a_k) along the update,
a_k = grad z_k . v the directional derivative of each logit (one JVP over the
training set, minimum over samples), so the update itself has r = 1 / radius. A
*spike* is a step that raises the full-batch loss by more than 10 %:
L(theta_(t+1)) > 1.1 L(theta_t). Full batch, so every rise comes from the step,
not from a new mini-batch.

Seen (full mode, 150 steps per run, ~20 s on a busy 2-core CPU): at lr = 1.0
r stays below 1 on every step (max 0.23) and the loss never spikes. At lr = 1.2
and 1.5 r crosses 1 early in training (steps 8-42: 20 and 23 steps) and every
spike (2 and 6 of them) falls on a step with r >= 1; no step with r < 1 spikes.
Over the two spiking runs, 100 % of the spikes vs 14 % of the steps have r >= 1
(P(spike | r >= 1) = 0.19, P(spike | r < 1) = 0). Fast mode (80 steps, lr 1.0
and 1.5): 100 % of 6 spikes vs 29 % of steps.

    python examples/safe_step_radius.py [--fast] [--out figures]
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
from dyndiag.demo import digits_mlp

SPIKE = 0.10  # a spike: the step raises the full-batch loss by more than 10 %


def train(lr: float, steps: int, x: torch.Tensor, y: torch.Tensor):
    """Full-batch GD with the SafeStepRadius probe at every step.

    Returns ``(records, ratio, loss)``: the probe's records, ``ratio[t]`` = r of the
    update from step t to t + 1, ``loss[t]`` = L(theta_t) (``steps + 1`` values).
    """
    model = digits_mlp(dtype=torch.float64)
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    with dd.Monitor(model, opt, [dd.probes.SafeStepRadius(every=1)], loss_fn=loss_fn, probe_data=(x, y)) as mon:
        for _ in range(steps):
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            losses.append(loss.item())
            opt.step()
        df = mon.records()
    with torch.no_grad():
        losses.append(loss_fn(model(x), y).item())
    ratio = df[df.metric == "ratio"].sort_values("step").value.to_numpy()
    return df, ratio, np.array(losses)


def main(fast: bool = False, out: str = "figures", steps: int | None = None) -> dict:
    """Train at each step size; print and return where the spikes fall; save the figure."""
    steps = steps if steps is not None else (80 if fast else 150)
    lrs = (1.0, 1.5) if fast else (1.0, 1.2, 1.5)
    x, y, _, _ = load_digits(dtype=torch.float64)
    found = {"steps": steps, "spike_threshold": SPIKE, "runs": {}}
    fig = Figure(figsize=(3.2 * len(lrs), 4.2), layout="constrained")
    axes = fig.subplots(2, len(lrs), sharex=True, sharey="row", height_ratios=(1, 1))
    for col, lr in enumerate(lrs):
        t0 = time.perf_counter()
        df, ratio, loss = train(lr, steps, x, y)
        spike = loss[1:] > (1 + SPIKE) * loss[:-1]  # spike[t]: the update at step t raised the loss
        unsafe = ratio >= 1
        run = found["runs"][lr] = {
            "steps_with_r_ge_1": int(unsafe.sum()),
            "fraction_steps_r_ge_1": float(unsafe.mean()),
            "spikes": int(spike.sum()),
            "spikes_with_r_ge_1": int((spike & unsafe).sum()),
            "spikes_with_r_lt_1": int((spike & ~unsafe).sum()),
            "fraction_spikes_r_ge_1": float((spike & unsafe).sum() / spike.sum()) if spike.any() else float("nan"),
            "max_ratio": float(ratio.max()),
            "median_ratio": float(np.median(ratio)),
            "loss_initial": float(loss[0]),
            "loss_final": float(loss[-1]),
            "seconds": time.perf_counter() - t0,
        }
        print(f"lr={lr:<4g} r >= 1 on {run['steps_with_r_ge_1']:3d}/{steps} steps ({run['fraction_steps_r_ge_1']:.1%}), "
              f"max r {run['max_ratio']:.3g}, median r {run['median_ratio']:.3g}; spikes (>{SPIKE:.0%} loss rise): "
              f"{run['spikes']}, {run['spikes_with_r_ge_1']} at r >= 1 and {run['spikes_with_r_lt_1']} at r < 1; "
              f"loss {run['loss_initial']:.3f} -> {run['loss_final']:.4f} ({run['seconds']:.1f} s)")

        top, bottom = axes[:, col]
        t = np.arange(steps + 1)
        top.plot(t, loss, color="C0", lw=1.0)
        top.plot(t[1:][spike], loss[1:][spike], "^", color="C3", ms=4, label=f"spike (>{SPIKE:.0%} rise)")
        top.set_yscale("log")
        top.set_title(f"full-batch GD, η={lr:g}", fontsize=9)
        dd.plot.metrics(df, "ratio", ax=bottom, probe="safe_step_radius", logy=True)
        bottom.plot(np.arange(steps)[spike], ratio[spike], "^", color="C3", ms=4)  # at the step that spiked
        bottom.axhline(1.0, color="0.3", ls="--", lw=0.9)
        bottom.set_ylabel("")
    axes[0, 0].set_ylabel("training loss")
    axes[1, 0].set_ylabel("r = η / ρ")
    axes[0, 0].legend(fontsize=7, loc="upper right")
    axes[1, 0].annotate("r = 1", (0.98, 1.0), xycoords=("axes fraction", "data"), xytext=(0, 3),
                        textcoords="offset points", ha="right", va="bottom", fontsize=7, color="0.3")

    spiky = [r for r in found["runs"].values() if r["spikes"]]
    if spiky:
        n_spikes = sum(r["spikes"] for r in spiky)
        at_unsafe = sum(r["spikes_with_r_ge_1"] for r in spiky)
        n_unsafe = sum(r["steps_with_r_ge_1"] for r in spiky)
        found["fraction_spikes_r_ge_1"] = at_unsafe / n_spikes
        found["fraction_steps_r_ge_1"] = n_unsafe / (steps * len(spiky))
        found["p_spike_given_r_ge_1"] = at_unsafe / max(n_unsafe, 1)
        found["p_spike_given_r_lt_1"] = (n_spikes - at_unsafe) / max(steps * len(spiky) - n_unsafe, 1)
        print(f"runs that spike: {found['fraction_spikes_r_ge_1']:.0%} of {n_spikes} spikes vs "
              f"{found['fraction_steps_r_ge_1']:.1%} of steps have r >= 1; P(spike | r >= 1) = "
              f"{found['p_spike_given_r_ge_1']:.2f}, P(spike | r < 1) = {found['p_spike_given_r_lt_1']:.3f}")
    paths = dd.plot.save(fig, f"{out}/safe_step_radius", formats=("png", "pdf"))
    print("saved", ", ".join(map(str, paths)))
    return found


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="two step sizes, 80 steps (the test's setting)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--out", default="figures")
    args = parser.parse_args()
    main(fast=args.fast, out=args.out, steps=args.steps)
