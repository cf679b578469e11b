"""Layer rotation of plain SGD vs Layca (Carbonnelle & De Vleeschouwer, "Layer rotation").

A 4-layer ReLU MLP (64-128-128-128-10) learns the digits with mini-batch SGD
(batch 64, no momentum) under a Monitor with the LayerRotation probe: the cosine
distance 1 - cos(w_t, w_0) of every weight matrix from its initialisation. Layca
(implemented below as a small torch.optim.Optimizer) takes the same gradient but,
per weight matrix, removes the component along the weights, scales the step to
lr x ||w|| and puts the weights back on their initial norm: every layer turns by
about arctan(lr) per step, whatever its gradient's scale. Biases take plain SGD
steps in both.

Seen (lr 0.01, 1000 steps): SGD hardly rotates its layers — the first three by
0.004, the last by 0.042 (min/max over layers 0.10) — and is still underfitting
(test accuracy 0.56); Layca at the same lr rotates every layer by 0.23-0.49
(min/max 0.47) and reaches 0.955. SGD at a 10x larger lr (0.1) rotates more
(0.12-0.29, min/max 0.41) and generalises too (0.969): larger, more uniform
rotation goes with better generalisation, as in the paper. Full mode (three runs)
15 s wall; ``--fast`` (the two lr-0.01 runs, 400 steps: rotation 0.000-0.003 vs
0.15-0.30, test accuracy 0.27 vs 0.90) ~12 s on a busy 2-core CPU.

    python examples/layer_rotation.py [--fast] [--out figures]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

import dyndiag as dd
from dyndiag.datasets import load_digits


class Layca(torch.optim.Optimizer):
    """SGD whose steps on weight matrices are rotations of a fixed angle ~arctan(lr).

    For every parameter with at least 2 dimensions: the update -grad is projected
    orthogonal to the weights, rescaled to ``lr * ||w||``, applied, and the weights are
    renormalised to their initial norm. Other parameters (biases) take plain SGD steps.
    """

    def __init__(self, params, lr: float = 0.01):
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr = group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.dim() < 2:
                    p.add_(p.grad, alpha=-lr)
                    continue
                state = self.state[p]
                if "initial_norm" not in state:
                    state["initial_norm"] = p.norm()
                u = -p.grad
                u = u - (u * p).sum() / (p * p).sum() * p  # orthogonal to the weights
                u = u * (lr * p.norm() / u.norm().clamp_min(torch.finfo(p.dtype).tiny))
                p.add_(u)
                p.mul_(state["initial_norm"] / p.norm())
        return loss


def mlp(seed: int = 0) -> nn.Module:
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        layers = [nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                  nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)]
        return nn.Sequential(*layers)
    finally:
        torch.random.set_rng_state(gen_state)


def train(optimizer: str, lr: float, steps: int, every: int, data, seed: int = 0):
    x, y, x_test, y_test = data
    model = mlp(seed)  # the same initialisation and mini-batches for every run
    opt = Layca(model.parameters(), lr=lr) if optimizer == "Layca" else torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    with dd.Monitor(model, opt, [dd.probes.LayerRotation(every=every, reference=initial)]) as mon:
        for _ in range(steps):
            idx = torch.randint(0, len(y), (64,), generator=gen)
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
        df = mon.records()
    with torch.no_grad():
        test_acc = float((model(x_test).argmax(1) == y_test).float().mean())
        train_loss = float(loss_fn(model(x), y))
    # The rotation of the weight matrices only, as "layer 1".."layer 4" (biases are not layers).
    weights = [n for n, p in model.named_parameters() if p.dim() >= 2]
    df = df[df.key.isin(weights)].copy()
    df["key"] = df.key.map({n: f"layer {i + 1}" for i, n in enumerate(weights)})
    final = dd.layer_rotation(model, initial)
    return df, [final[n] for n in weights], test_acc, train_loss


def main(fast: bool = False, out: str = "figures") -> dict:
    data = load_digits(dtype=torch.float32)
    steps, every = (400, 20) if fast else (1000, 10)
    runs = [("SGD", 0.01), ("Layca", 0.01)] + ([] if fast else [("SGD", 0.1)])
    found, frames = {}, []
    for optimizer, lr in runs:
        name = f"{optimizer}, lr {lr}"
        df, rot, acc, loss = train(optimizer, lr, steps, every, data)
        frames.append((name, df, acc))
        found[name] = {"rotation": rot, "min_rotation": min(rot), "max_rotation": max(rot),
                       "uniformity": min(rot) / max(rot), "test_accuracy": acc, "train_loss": loss}
        print(f"{name:14s} after {steps} steps: rotation per layer {np.round(rot, 3).tolist()} "
              f"(min/max {min(rot) / max(rot):.2f}); train loss {loss:.3f}, test accuracy {acc:.3f}")

    with dd.plot.style("paper"):
        fig = Figure(figsize=(dd.plot.DOUBLE_COLUMN, 2.5), layout="constrained")
        axes = fig.subplots(1, len(frames), sharey=True)
        for ax, (name, df, acc) in zip(axes, frames):
            dd.plot.layer_rotation(df, ax=ax)
            rot = found[name]["rotation"]
            ax.set_title(f"{name}: test accuracy {acc:.2f}\nfinal rotation {min(rot):.3f}-{max(rot):.3f}")
        top = max(f["max_rotation"] for f in found.values())
        axes[0].set_ylim(0, 1.1 * top)
        for ax in axes[1:]:
            ax.set_ylabel("")
            if ax.get_legend() is not None:
                ax.get_legend().remove()
        axes[0].legend(loc="upper left", fontsize="small")
        paths = dd.plot.save(fig, f"{out}/layer_rotation", formats=("png", "pdf"))
    print("saved", ", ".join(map(str, paths)))
    return found


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="two runs, fewer steps")
    parser.add_argument("--out", default="figures")
    args = parser.parse_args()
    main(args.fast, args.out)
