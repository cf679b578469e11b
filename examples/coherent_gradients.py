"""Gradient coherence with real vs random labels (Chatterjee, "Coherent Gradients").

The digits MLP is trained twice from the same initialisation with the same
mini-batches: once on the real labels, once on labels drawn uniformly at random.
A Monitor runs the GradientCoherence probe every 20 steps on the whole training
set, m = 1438 examples (with the labels that run trains on): the m-coherence
||sum g_i||^2 / sum ||g_i||^2 of their per-example gradients, from ~1 for
orthogonal gradients to m for identical ones, and the mean gradient
signal-to-noise ratio (GSNR). Real labels give gradients that agree — the
examples of a class pull the weights the same way — random labels give nearly
orthogonal ones, and the network can only memorise them one at a time.

Seen (SGD lr 0.02, momentum 0.9, batch 64): over the first 100 steps the
coherence is 20.5-26.4 with real labels (mean 18.4 including step 100) and
1.5-3.6 with random labels (mean 2.1), 8.8x (papers.md: 18.9-70 vs 2-3.8). As the
real labels are fitted (train accuracy 0.99, test 0.97 after 1000 steps) their
coherence falls to the random-label level, ~1-3; the random labels are barely
memorised (train accuracy 0.16) and their coherence stays at ~0.4-2.5 (one
excursion to 8.5 at the last probe). GSNR tells the same story (0.02 vs 0.001
early). Full mode (1000 steps) 44 s wall on a busy 2-core CPU (20 s CPU);
``--fast`` (the first 100 steps only: the same 18.4 vs 2.1) ~12 s.

    python examples/coherent_gradients.py [--fast] [--out figures]
"""

from __future__ import annotations

import argparse

import pandas as pd
import torch
from matplotlib.figure import Figure
from torch import nn

import dyndiag as dd
from dyndiag.datasets import load_digits
from dyndiag.demo import digits_mlp


def train(x, y, steps: int, every: int, m: int, name: str, seed: int = 0):
    """SGD on (x, y) under a Monitor; returns the model and its records."""
    model = digits_mlp(seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)  # same mini-batch indices in both runs
    probes = [dd.probes.GradientCoherence(every=every, name=name)]
    with dd.Monitor(model, opt, probes, loss_fn=loss_fn, probe_data=(x[:m], y[:m])) as mon:
        for _ in range(steps):
            idx = torch.randint(0, len(y), (64,), generator=gen)
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
        df = mon.records()
    return model, df


def main(fast: bool = False, out: str = "figures", m: int | None = None) -> dict:
    x, y, x_test, y_test = load_digits(dtype=torch.float32)
    y_random = torch.randint(0, 10, y.shape, generator=torch.Generator().manual_seed(1))
    m = len(y) if m is None else m  # default: every training example
    steps, every = (101, 20) if fast else (1001, 20)
    early = 100  # "early in training": the first 100 steps
    found, frames = {}, []
    for name, labels in (("real labels", y), ("random labels", y_random)):
        model, df = train(x, labels, steps, every, m, name)
        frames.append(df)
        coh = df[df.metric == "coherence"].sort_values("step")
        with torch.no_grad():
            train_acc = float((model(x).argmax(1) == labels).float().mean())
            test_acc = float((model(x_test).argmax(1) == y_test).float().mean())
        f = found[name] = {
            "coherence_first": float(coh.value.iloc[0]),
            "coherence_early_mean": float(coh[coh.step <= early].value.mean()),
            "coherence_max": float(coh.value.max()),
            "coherence_min": float(coh.value.min()),
            "coherence_final": float(coh.value.iloc[-1]),
            "train_accuracy": train_acc,
            "test_accuracy": test_acc,
        }
        print(f"{name:13s} m-coherence (m = {m}): step 0 {f['coherence_first']:.1f}, mean over steps <= {early} "
              f"{f['coherence_early_mean']:.1f}, range {f['coherence_min']:.1f}-{f['coherence_max']:.1f}, final "
              f"{f['coherence_final']:.1f}; train accuracy {train_acc:.2f}, test {test_acc:.2f}")
    ratio = found["real labels"]["coherence_early_mean"] / found["random labels"]["coherence_early_mean"]
    found["early_ratio"] = ratio
    print(f"real / random coherence over steps 0-{early} of {steps}: {ratio:.1f}x")

    df = pd.concat(frames, ignore_index=True)
    with dd.plot.style("paper"):
        fig = Figure(figsize=(dd.plot.DOUBLE_COLUMN, 2.5), layout="constrained")
        axes = fig.subplots(1, 2)
        dd.plot.metrics(df, "coherence", ax=axes[0], logy=True)
        axes[0].axhline(1.0, color="0.5", lw=0.8, ls=":")
        axes[0].set_ylabel(f"m-coherence (m = {m})")
        axes[0].set_title("per-example gradients agree with real labels")
        dd.plot.metrics(df, "gsnr", ax=axes[1], logy=True)
        axes[1].set_ylabel("mean GSNR")
        axes[1].set_title("gradient signal-to-noise ratio")
        axes[1].get_legend().remove()
        axes[0].legend(loc="upper right", fontsize="small")
        for ax in axes:
            ax.axvspan(0, early, color="0.92", zorder=0)
            ax.text(early / 2, 0.02, "early", transform=ax.get_xaxis_transform(), ha="center",
                    va="bottom", fontsize="small", color="0.4")
        paths = dd.plot.save(fig, f"{out}/coherent_gradients", formats=("png", "pdf"))
    print("saved", ", ".join(map(str, paths)))
    return found


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="fewer steps")
    parser.add_argument("--out", default="figures")
    args = parser.parse_args()
    main(args.fast, args.out)
