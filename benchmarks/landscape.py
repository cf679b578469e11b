"""2-D loss landscape cost: dyndiag against loss-landscapes on the same model, data
and grid (a benchmark, not a test).

loss-landscapes draws its own random directions inside `random_plane`, so values
are not compared point by point (design.md: compare cost only); both grids are
steps x steps filter-normalised planes. Also reports whether each call left the
model's parameters exactly as they were.

Rows: dyndiag with the default ``batch_points="auto"`` (the chunk it picks is
printed), loss-landscapes, the per-point loop (``batch_points=1``) and any chunk
sizes given with ``--batch-points``; the methods are timed round-robin. The ratio
line compares the default.

Target (issue 5): dyndiag at least 2x faster.

    pip install loss-landscapes==3.0.6   # needs only numpy
    python benchmarks/landscape.py [--steps 25] [--repeats 3] [--samples 512]
                                   [--model tanh|relu|wide] [--batch-points 16,64]
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
    ap.add_argument("--model", choices=["tanh", "relu", "wide", "class"], default="tanh",
                    help="tanh: the demo's 64-48-10 MLP; relu: the same with ReLU; "
                         "wide: 64-512-10 ReLU (the first layer dominates); class: the tanh MLP "
                         "written as a class with a forward (traced by torch.fx)")
    ap.add_argument("--batch-points", default="",
                    help="extra rows: comma-separated chunk sizes for surface(batch_points=...)")
    args = ap.parse_args()
    extra = [int(s) for s in args.batch_points.split(",") if s.strip()]
    import loss_landscapes
    import loss_landscapes.metrics

    x, y, x_test, y_test = load_digits()
    # Training split first (the first 512 are the same as before), then the test
    # split, so --samples 1797 is every digit.
    x, y = torch.cat([x, x_test])[: args.samples], torch.cat([y, y_test])[: args.samples]
    model = digits_mlp()
    if args.model == "class":
        model = _ClassMLP(model)
    elif args.model != "tanh":
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

    def ours(batch_points="auto"):
        dirs = dd.landscape.random_directions(model, n=2, seed=0)
        return dd.landscape.surface(model, loss_fn, (x, y), dirs, extent=1.0, resolution=args.steps,
                                    batch_points=batch_points, progress=False).values

    def theirs():
        metric = loss_landscapes.metrics.Loss(loss_fn, x, y)
        return loss_landscapes.random_plane(model, metric, distance=1, steps=args.steps, normalization="filter", deepcopy_model=True)

    probe = dd.landscape.surface(model, loss_fn, (x, y), dd.landscape.random_directions(model, n=2, seed=0),
                                 resolution=2, progress=False)
    auto = probe.batch_points  # the chunk "auto" picks for this model and data (1: per point)
    methods = [(f"dyndiag surface (auto: {auto})", ours), ("loss-landscapes random_plane", theirs),
               ("dyndiag batch_points=1", lambda: ours(1))]
    methods += [(f"dyndiag batch_points={b}", lambda b=b: ours(b)) for b in extra]
    # Round-robin over the methods, so a slow spell of this shared machine hits all of
    # them alike; minor page faults per call are reported because on this VM they
    # decide whether a chunk's fresh intermediates cost more than batching saves.
    unchanged, values, times, faults = {}, {}, {n: [] for n, _ in methods}, {n: 0 for n, _ in methods}
    for name, fn in methods:
        before = [p.detach().clone() for p in model.parameters()]
        values[name] = fn()
        unchanged[name] = all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    for _ in range(args.repeats):
        for name, fn in methods:
            f0 = _minor_faults()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
            faults[name] += _minor_faults() - f0
    rows = [(n, statistics.median(times[n]), values[n].shape, unchanged[n], faults[n] // args.repeats)
            for n, _ in methods]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, digits MLP ({args.model}, "
          f"{sum(p.numel() for p in model.parameters())} parameters), {len(y)} samples, "
          f"{args.steps}x{args.steps} grid, median of {args.repeats} (round-robin)")
    print(f"{'method':30s} {'seconds':>8s} {'grid':>9s}  model unchanged  faults/call")
    for name, t, shape, same, nf in rows:
        print(f"{name:30s} {t:8.3f} {str(tuple(shape)):>9s}  {str(same):15s}  {nf:11d}")
    per_point = rows[2][1]
    print(f"default vs per-point loop: {per_point / rows[0][1]:.2f}x")
    ratio = rows[1][1] / rows[0][1]
    # Paired: each round's loss-landscapes time over the same round's default time,
    # so a slow spell of the machine cancels out within the round.
    paired = sorted(a / b for a, b in zip(times[methods[1][0]], times[methods[0][0]]))
    print(f"loss-landscapes / default, paired per round: median {statistics.median(paired):.2f}x, "
          f"range {paired[0]:.2f}-{paired[-1]:.2f}x")
    print(f"target: dyndiag >= 2x faster: {ratio:.1f}x -> {'met' if ratio >= 2 else 'NOT met'}")


class _ClassMLP(nn.Module):
    """The demo's MLP as users often write it: layers as attributes, a forward."""

    def __init__(self, seq: nn.Sequential) -> None:
        super().__init__()
        self.fc1, self.fc2 = seq[0], seq[2]

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _minor_faults() -> int:
    """Minor page faults of this process so far (0 where ``resource`` is missing)."""
    try:
        import resource
    except ImportError:  # Windows
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


if __name__ == "__main__":
    main()
