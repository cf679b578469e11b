"""Scale benchmark: top Hessian eigenvalue of ResNet-style CNNs with 0.7-6.3 M parameters.

Run from the repository root::

    python benchmarks/scale.py            # full table (several minutes on a 2-core CPU)
    python benchmarks/scale.py --quick    # three small rows (width 8, batch 32/64/128)

Model: a CIFAR-style ResNet (3x3 stem, four stages of two BasicBlocks with
BatchNorm, widths w, 2w, 4w, 8w, global pooling, 10 classes), float32, eval mode,
on random 32x32x3 inputs with random labels; the width sets the size (w=16:
0.7 M parameters, w=32: 2.8 M, w=48: 6.3 M). Each configuration runs in its own
process so that its peak resident memory (``ru_maxrss``) is its own; the table
reports the peak above the process after building model and data.

Columns: one gradient (forward + backward) in seconds; one HVP (double backward,
the CPU default) in gradients; the top-1 eigenvalue by Lanczos at ``tol=1e-3``
(time, HVPs); peak memory of the eigenvalue run above the baseline, and that
peak in units of "one gradient's" peak (what a plain training step needs).
Memory is bounded by the products, not by Lanczos: the basis holds at most
``max_basis`` vectors of ``dim`` floats (40 x 6.3 M x 4 B = 1 GB at the default),
shown by the `basis MB` column, and can live on the CPU (``basis_device="cpu"``)
when the operator is on a GPU. `micro MB`: the peak of the same eigenvalue run with
``micro_batch_size=16`` (each batch multiplied 16 samples at a time), in a process
of its own: set by the micro-batch, so flat in the batch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def resnet(width: int, classes: int = 10):
    """CIFAR-style ResNet-18 layout at base width ``width``."""
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.skip = nn.Sequential()
            if stride != 1 or cin != cout:
                self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            out = self.bn1(self.conv1(x)).relu()
            return (self.bn2(self.conv2(out)) + self.skip(x)).relu()

    layers = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
    cin = width
    for i, mult in enumerate((1, 2, 4, 8)):
        cout = width * mult
        layers += [Block(cin, cout, 1 if i == 0 else 2), Block(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return nn.Sequential(*layers)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_micro(width: int, batch: int, tol: float, threads: int, micro: int) -> dict:
    """Peak memory of the top-1 eigenvalue run with ``micro_batch_size=micro`` alone."""
    import torch
    from torch import nn

    import dyndiag as dd

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = resnet(width).eval()
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    base = _rss_mb()
    top = dd.eigenvalues(dd.HessianOperator(model, nn.CrossEntropyLoss(), (x, y), micro_batch_size=micro), k=1, tol=tol)
    return {"micro_peak_mb": _rss_mb() - base, "micro_eigenvalue": float(top.values[0])}


def run_one(width: int, batch: int, tol: float, threads: int) -> dict:
    """One configuration, in this process (called in a child process)."""
    import torch
    from torch import nn

    import dyndiag as dd

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = resnet(width).eval()
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    params = [p for p in model.parameters() if p.requires_grad]
    dim = sum(p.numel() for p in params)
    loss_fn = nn.CrossEntropyLoss()
    base = _rss_mb()

    def gradient():
        return torch.autograd.grad(loss_fn(model(x), y), params)

    gradient()  # warm-up (allocator, kernels)
    t = time.perf_counter()
    gradient()
    t_grad = time.perf_counter() - t
    grad_peak = _rss_mb() - base

    H = dd.HessianOperator(model, loss_fn, (x, y), cache_graph=False)
    v = torch.randn(dim)
    H @ v
    t = time.perf_counter()
    H @ v
    t_hvp = time.perf_counter() - t
    H = dd.HessianOperator(model, loss_fn, (x, y))  # the default: graph cached across Lanczos steps
    t = time.perf_counter()
    top = dd.eigenvalues(H, k=1, tol=tol)
    t_eig = time.perf_counter() - t
    max_basis = min(dim, 40)
    return {
        "width": width, "batch": batch, "params": dim, "grad_s": t_grad, "hvp_grads": t_hvp / t_grad,
        "eig_s": t_eig, "eig_hvps": top.num_matvecs, "eigenvalue": float(top.values[0]),
        "converged": bool(top.converged), "peak_mb": _rss_mb() - base, "grad_peak_mb": grad_peak,
        "basis_mb": (max_basis + 1) * dim * 4 / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two small configurations")
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--child", type=str, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        width, batch, micro = map(int, args.child.split(","))
        run = run_micro(width, batch, args.tol, args.threads, micro) if micro else run_one(width, batch, args.tol, args.threads)
        print(json.dumps(run))
        return

    configs = [(8, 32), (8, 64), (8, 128)] if args.quick else [(16, 32), (32, 32), (48, 32), (32, 64), (32, 128)]
    import torch

    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} threads, "
          f"float32, eval mode, top-1 eigenvalue at tol={args.tol}")
    head = (f"{'width':>5} {'batch':>5} {'params':>9} {'grad s':>7} {'HVP/grad':>8} {'eig s':>7} {'HVPs':>5} "
            f"{'lambda_1':>9} {'peak MB':>8} {'grad MB':>8} {'peak/grad':>9} {'basis MB':>8} {'micro MB':>8}")
    print(head)
    print("-" * len(head))
    for width, batch in configs:
        r = {}
        for micro in (0, 16):
            out = subprocess.run(
                [sys.executable, __file__, "--child", f"{width},{batch},{micro}", "--tol", str(args.tol), "--threads",
                 str(args.threads)], capture_output=True, text=True, check=True,
            )
            r.update(json.loads(out.stdout.strip().splitlines()[-1]))
        ratio = r["peak_mb"] / r["grad_peak_mb"] if r["grad_peak_mb"] > 0 else float("nan")
        print(f"{r['width']:5d} {r['batch']:5d} {r['params'] / 1e6:8.2f}M {r['grad_s']:7.3f} {r['hvp_grads']:8.2f} "
              f"{r['eig_s']:7.2f} {r['eig_hvps']:5d} {r['eigenvalue']:9.4g} {r['peak_mb']:8.0f} "
              f"{r['grad_peak_mb']:8.0f} {ratio:9.2f} {r['basis_mb']:8.0f} {r['micro_peak_mb']:8.0f}"
              + ("" if r["converged"] else "  (not converged)"))


if __name__ == "__main__":
    main()
