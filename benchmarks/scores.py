"""GraNd and EL2N over all 1797 digits: dyndiag's vectorised per-example gradients
against a per-example backward loop (a benchmark, not a test).

Target (issue 4): GraNd at least 10x faster than the loop. Both give the same
numbers (checked here to 1e-5 relative in float32).

    python benchmarks/scores.py [--repeats 3] [--threads 2]
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


def loop_grand(model, loss_fn, x, y) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    out = torch.empty(len(y))
    for i in range(len(y)):
        g = torch.autograd.grad(loss_fn(model(x[i : i + 1]), y[i : i + 1]), params)
        out[i] = torch.sqrt(sum((t * t).sum() for t in g))
    return out


def median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    x_tr, y_tr, x_te, y_te = load_digits()
    x, y = torch.cat([x_tr, x_te]), torch.cat([y_tr, y_te])
    model = digits_mlp().eval()
    loss_fn = nn.CrossEntropyLoss()
    ours = dd.grand_scores(model, loss_fn, (x, y), progress=False)
    ref = loop_grand(model, loss_fn, x, y)
    err = float((ours - ref).abs().max() / ref.abs().max())
    t_loop = median_time(lambda: loop_grand(model, loss_fn, x, y), args.repeats)
    rows = [("per-example loop", t_loop)]
    rows.append(("dd.grand_scores() (default chunks)",
                 median_time(lambda: dd.grand_scores(model, loss_fn, (x, y), progress=False), args.repeats)))
    for chunk in (64, 256, 1024):
        rows.append((f"dd.grand_scores(chunk_size={chunk})",
                     median_time(lambda: dd.grand_scores(model, loss_fn, (x, y), chunk_size=chunk, progress=False), args.repeats)))
    t_el2n = median_time(lambda: dd.el2n_scores(model, (x, y), progress=False), args.repeats)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {len(y)} examples, "
          f"{sum(p.numel() for p in model.parameters())} parameters, median of {args.repeats}")
    print(f"max |dd - loop| / max|loop| = {err:.1e}")
    print(f"{'method':34s} {'seconds':>8s} {'speed-up vs loop':>17s}")
    for name, t in rows:
        print(f"{name:34s} {t:8.4f} {t_loop / t:17.1f}")
    print(f"{'dd.el2n_scores':34s} {t_el2n:8.4f} {'(one forward)':>17s}")
    best = min(t for name, t in rows[1:])
    print(f"target: GraNd >= 10x faster than the loop: {t_loop / best:.1f}x -> {'met' if t_loop / best >= 10 else 'NOT met'}")


if __name__ == "__main__":
    main()
