"""2-D loss landscape cost: dyndiag against loss-landscapes on the same model, data
and grid (a benchmark, not a test).

Models, each trained for 200 SGD steps on the digits (float32):

* ``mlp``: the demo's digits MLP, 64-48-10 with tanh (3.6k parameters);
* ``resnet``: the CIFAR-style ResNet-18 layout of ``benchmarks/scale.py`` (BatchNorm,
  residual connections) at base width ``--width`` (8: 0.17M parameters), in eval
  mode, on the digits as 3x8x8 images (the grey level in each channel).

loss-landscapes draws its own random directions inside ``random_plane``, so values
are not compared point by point (only cost); both grids are steps x steps
filter-normalised planes. Also reports whether each call left the model's
parameters exactly as they were.

Rows per model and sample count: dyndiag's default (``batch_points="auto"``, the
chunk it picked in brackets; 1 is the per-point loop), dyndiag's per-point loop
(``batch_points=1``) and loss-landscapes, timed round-robin (median of
``--repeats``). The ratio is paired: each round's loss-landscapes time over the
same round's dyndiag default time (median and range over the rounds), so a slow
spell of a shared machine cancels out within a round. Above 1: dyndiag is faster.

    pip install --no-deps loss-landscapes==3.0.6   # needs only numpy
    python benchmarks/landscape.py [--steps 25] [--repeats 3] [--samples 128,512]
                                   [--models mlp,resnet] [--width 8]
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
from scale import resnet  # this folder is on sys.path when the script runs


def trained(name: str, x: torch.Tensor, y: torch.Tensor, width: int) -> nn.Module:
    torch.manual_seed(0)
    model = digits_mlp() if name == "mlp" else resnet(width)
    opt = torch.optim.SGD(model.parameters(), lr=0.5 if name == "mlp" else 0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(200):
        idx = torch.randint(0, len(y), (128,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=25, help="grid points per direction")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--samples", default="128,512", help="comma-separated sample counts (one batch each)")
    ap.add_argument("--models", default="mlp,resnet", help="comma-separated: mlp, resnet")
    ap.add_argument("--width", type=int, default=8, help="the ResNet's base width")
    args = ap.parse_args()
    import loss_landscapes
    import loss_landscapes.metrics

    x, y, x_test, y_test = load_digits()
    x, y = torch.cat([x, x_test]), torch.cat([y, y_test])  # every digit: 1797 samples
    loss_fn = nn.CrossEntropyLoss()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.steps}x{args.steps} grid, "
          f"median of {args.repeats} (round-robin); ratio = loss-landscapes / dyndiag default, paired per round")
    print(f"{'model':22s} {'samples':>7s} {'dyndiag (chunk)':>16s} {'per point':>9s} {'loss-landscapes':>15s} "
          f"{'ratio (range)':>18s}  unchanged")
    for name in args.models.split(","):
        inputs = x.reshape(-1, 1, 8, 8).expand(-1, 3, 8, 8).contiguous() if name == "resnet" else x
        model = trained(name, inputs, y, args.width)
        label = f"{name} ({sum(p.numel() for p in model.parameters())} params)"
        dirs = dd.landscape.random_directions(model, n=2, seed=0)
        for n in (int(s) for s in args.samples.split(",")):
            data = (inputs[:n], y[:n])

            def ours(batch_points="auto", data=data, model=model, dirs=dirs):
                return dd.landscape.surface(model, loss_fn, data, dirs, extent=1.0, resolution=args.steps,
                                            batch_points=batch_points, progress=False)

            def theirs(data=data, model=model):
                metric = loss_landscapes.metrics.Loss(loss_fn, *data)
                return loss_landscapes.random_plane(model, metric, distance=1, steps=args.steps,
                                                    normalization="filter", deepcopy_model=True)

            methods = {"auto": ours, "point": lambda: ours(1), "theirs": theirs}
            unchanged, times = True, {k: [] for k in methods}
            chunk = None
            for key, fn in methods.items():  # warm-up, and the side-effect check
                before = [p.detach().clone() for p in model.parameters()]
                out = fn()
                chunk = out.batch_points if key == "auto" else chunk
                unchanged &= all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
            for _ in range(args.repeats):
                for key, fn in methods.items():
                    t0 = time.perf_counter()
                    fn()
                    times[key].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) for k, v in times.items()}
            paired = sorted(a / b for a, b in zip(times["theirs"], times["auto"]))
            print(f"{label:22s} {n:7d} {med['auto']:9.3f} ({chunk:>3d}) {med['point']:9.3f} {med['theirs']:15.3f} "
                  f"{statistics.median(paired):6.2f}x ({paired[0]:.2f}-{paired[-1]:.2f})  {unchanged}")


if __name__ == "__main__":
    main()
