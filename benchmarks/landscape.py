"""2-D loss landscape cost: dyndiag against loss-landscapes on the same model, data
and grid (a benchmark, not a test).

loss-landscapes draws its own random directions inside `random_plane`, so values
are not compared point by point (design.md: compare cost only); both grids are
steps x steps filter-normalised planes. Also reports whether each call left the
model's parameters exactly as they were.

Target (issue 5): dyndiag at least 2x faster.

    pip install loss-landscapes==3.0.6   # needs only numpy
    python benchmarks/landscape.py [--steps 25] [--repeats 3] [--samples 512]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import dyndiag as dd
from dyndiag.datasets import load_digits
from dyndiag.demo import digits_mlp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--model", choices=["tanh", "relu", "wide"], default="tanh",
                    help="tanh: the demo's 64-48-10 MLP; relu: the same with ReLU; "
                         "wide: 64-512-10 ReLU (the first layer dominates)")
    args = ap.parse_args()
    import loss_landscapes
    import loss_landscapes.metrics

    x, y, _, _ = load_digits()
    x, y = x[: args.samples], y[: args.samples]
    model = digits_mlp()
    if args.model != "tanh":
        torch.manual_seed(0)
        hidden = 512 if args.model == "wide" else 48
        model = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        idx = torch.randint(0, len(y), (128,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    loss_fn = nn.CrossEntropyLoss()

    def ours():
        dirs = dd.landscape.random_directions(model, n=2, seed=0)
        return dd.landscape.surface(model, loss_fn, (x, y), dirs, extent=1.0, resolution=args.steps, progress=False).values

    def theirs():
        metric = loss_landscapes.metrics.Loss(loss_fn, x, y)
        return loss_landscapes.random_plane(model, metric, distance=1, steps=args.steps, normalization="filter", deepcopy_model=True)

    rows = []
    for name, fn in (("dyndiag surface", ours), ("loss-landscapes random_plane", theirs)):
        before = [p.detach().clone() for p in model.parameters()]
        fn()
        unchanged = all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            values = fn()
            times.append(time.perf_counter() - t0)
        rows.append((name, statistics.median(times), values.shape, unchanged))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, digits MLP ({args.model}, "
          f"{sum(p.numel() for p in model.parameters())} parameters), {args.samples} samples, "
          f"{args.steps}x{args.steps} grid, median of {args.repeats}")
    print(f"{'method':30s} {'seconds':>8s} {'grid':>9s}  model unchanged")
    for name, t, shape, unchanged in rows:
        print(f"{name:30s} {t:8.3f} {str(tuple(shape)):>9s}  {unchanged}")
    ratio = rows[1][1] / rows[0][1]
    print(f"target: dyndiag >= 2x faster: {ratio:.1f}x -> {'met' if ratio >= 2 else 'NOT met'}")


if __name__ == "__main__":
    main()
