"""FSDP benchmark: top Hessian eigenvalue and an 11x11 landscape of a ~5 M-parameter model on 2 FSDP ranks
against one process.

Run from the repository root::

    python benchmarks/distributed.py            # 3 interleaved repeats
    python benchmarks/distributed.py --quick    # 1 repeat
    python benchmarks/distributed.py --quick --only landscape

Model: an MLP 512-768x9-10 with tanh (5.1 M parameters in ten layers of at
most 0.6 M each, so FSDP's one unsharded layer at a time is a small part of the
model), float32, on random inputs and labels, 64 samples in all. One process holds the whole model and all 64
samples; the FSDP run shards the model with ``fully_shard`` (each Linear and the
root) over 2 gloo ranks on the CPU, each rank holding 32 samples, so both compute
the same operator. Products by double backward (``hvp="exact"``: parameters
gathered, FSDP's hooks set aside) and by central differences
(``hvp="finite_difference"``: FSDP's own sharded forward and backward).

Columns per configuration: the first product (``matvec``, graph built) in
seconds and the resident memory it raised each process to; then
``eigenvalues(op, k=1, tol=1e-2, max_matvecs=20)`` in seconds, HVPs, the
eigenvalue, and the peak resident memory of each process (memory: ``ru_maxrss``
above the process after building model and data; each configuration runs in
fresh processes, so its peak is its own; medians over repeats, times the slower
rank). The Lanczos basis is part of the peak (up to 24 columns here: 0.5 GB in
one process, half of it per FSDP rank). On a shared CPU the two ranks compete
for the same cores: times compare the work, not a multi-machine speed-up; memory
per rank is the figure FSDP is about.

Landscape: ``random_directions(model, n=2, seed=0)`` then an 11x11 ``surface``
(``extent=1``, ``batch_points="auto"``) on all 64 samples. One process evaluates
the 121 points; on 2 FSDP ranks the grid is split (each rank evaluates its chunks
on the same 64 samples, about 60 points each) and every rank works on the full
parameters, gathered once (so its peak holds a full model, the two directions and
the point being evaluated, like one process; FSDP saves no memory here). Columns:
the forwards this rank ran (its points, plus one forward with which
``batch_points="auto"`` sizes the chunks), the chunk size, seconds for the
directions and for directions and surface together (times the slower rank), the
loss at the centre, and the peak resident memory per process above the built
model and data (which is half the parameters on an FSDP rank).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

N, WIDTHS = 64, (512,) + (768,) * 9 + (10,)
WORKS = ("exact", "finite_difference", "landscape")


def build(seed: int = 0):
    import torch
    from torch import nn

    torch.manual_seed(seed)
    layers = []
    for a, b in zip(WIDTHS[:-1], WIDTHS[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    model = nn.Sequential(*layers[:-1])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, WIDTHS[0], generator=g)
    y = torch.randint(0, WIDTHS[-1], (N,), generator=g)
    return model, x, y


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(model, data, hvp: str) -> dict:
    """Top-1 eigenvalue of the model's Hessian on ``data``: time, HVPs, value, peak MB."""
    import torch
    from torch import nn

    import dyndiag as dd

    # A product on a tiny model first: the autograd engine's and the allocator's
    # first-use memory would otherwise count as the product's.
    tiny = nn.Sequential(nn.Linear(data[0].shape[1], 4), nn.Tanh(), nn.Linear(4, WIDTHS[-1]))
    dd.HessianOperator(tiny, nn.CrossEntropyLoss(), data, hvp=hvp).matvec(torch.ones(sum(p.numel() for p in tiny.parameters())))
    base = _rss_mb()
    op = dd.HessianOperator(model, nn.CrossEntropyLoss(), data, hvp=hvp)
    v = torch.ones(op.dim)
    t = time.perf_counter()
    op.matvec(v)
    product = time.perf_counter() - t
    product_mb = _rss_mb() - base
    t = time.perf_counter()
    res = dd.eigenvalues(op, k=1, tol=1e-2, max_matvecs=20)
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "hvps": res.num_matvecs, "value": float(res.values[0]), "product_s": product,
            "product_mb": product_mb, "peak_mb": _rss_mb() - base, "dim": op.dim}


def measure_landscape(model, data) -> dict:
    """Directions and an 11x11 surface: time, forwards this rank ran, peak MB."""
    import torch
    from torch import nn

    import dyndiag as dd

    # A tiny surface first: imports (tqdm) and first-use memory are not the landscape's.
    tiny = nn.Sequential(nn.Linear(data[0].shape[1], 4), nn.Tanh(), nn.Linear(4, WIDTHS[-1]))
    dd.landscape.surface(tiny, nn.CrossEntropyLoss(), data, dd.landscape.random_directions(tiny), resolution=2,
                         progress=False)
    base = _rss_mb()
    calls = [0]

    def count(module, inputs, output):  # one per point and batch (per chunk under vmap)
        calls[0] += 1

    handle = model[0].register_forward_hook(count)
    t = time.perf_counter()
    dirs = dd.landscape.random_directions(model, n=2, seed=0)
    directions = time.perf_counter() - t
    surf = dd.landscape.surface(model, nn.CrossEntropyLoss(), data, dirs, extent=1.0, resolution=11, progress=False)
    seconds = time.perf_counter() - t
    handle.remove()
    return {"seconds": seconds, "directions_s": directions, "forwards": calls[0], "centre": float(surf.values[5, 5]),
            "batch_points": surf.batch_points, "peak_mb": _rss_mb() - base, "dim": dirs[0].numel()}


def _rank(rank: int, world: int, init_file: str, hvp: str, out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model, x, y = build()
        for m in model:
            if isinstance(m, torch.nn.Linear):
                fully_shard(m)
        fully_shard(model)
        if hvp == "landscape":  # the grid split: every rank evaluates its points on all the data
            result = measure_landscape(model, (x, y))
        else:
            part = slice(rank * N // world, (rank + 1) * N // world)
            data = (x[part].clone(), y[part].clone())
            del x, y
            result = measure(model, data, hvp)
        with open(f"{out}.{rank}", "w") as f:
            json.dump(result, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_one(kind: str, hvp: str) -> list[dict]:
    """One configuration in this (fresh) process: ``single`` or ``fsdp`` (2 ranks)."""
    if kind == "single":
        import torch

        torch.set_num_threads(1)  # the same per-process threads as each FSDP rank
        model, x, y = build()
        if hvp == "landscape":
            return [measure_landscape(model, (x, y))]
        return [measure(model, (x, y), hvp)]
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result")
        mp.spawn(_rank, args=(2, os.path.join(tmp, "init"), hvp, out), nprocs=2, join=True)
        results = []
        for r in range(2):
            with open(f"{out}.{r}") as f:
                results.append(json.load(f))
        return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="+", choices=WORKS, default=list(WORKS), help="what to measure")
    parser.add_argument("--run", nargs=2, metavar=("KIND", "WORK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        print(json.dumps(run_one(*args.run)))
        return
    import torch

    repeats = 1 if args.quick else args.repeats
    configs = [(k, w) for w in WORKS if w in args.only for k in ("single", "fsdp")]
    runs: dict = {c: [] for c in configs}
    for _ in range(repeats):  # interleaved: drift on a shared machine hits every configuration alike
        for kind, work in configs:
            proc = subprocess.run([sys.executable, __file__, "--run", kind, work], capture_output=True, text=True,
                                  check=True)
            runs[(kind, work)].append(json.loads(proc.stdout.strip().splitlines()[-1]))

    def per_rank(rs, key):
        return "/".join(f"{statistics.median(rep[i][key] for rep in rs):.0f}" for i in range(len(rs[0])))

    def slowest(rs, key):
        return statistics.median(max(r[key] for r in rep) for rep in rs)

    def table(rows, columns) -> None:
        """A header and one line per configuration; ``columns``: ``(header, width, value(kind, work, rs))``."""
        if not rows:
            return
        print(" ".join(f"{h:<{w}}" if i == 0 else f"{h:>{w}}" for i, (h, w, _) in enumerate(columns)))
        for (kind, work), rs in rows:
            cells = [(value(kind, work, rs), w) for _, w, value in columns]
            print(" ".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(cells)))

    def first(key, spec=""):
        return lambda kind, work, rs: format(rs[0][0][key], spec)

    def slowest_of(key):
        return lambda kind, work, rs: f"{slowest(rs, key):.2f}"

    def per_rank_of(key):
        return lambda kind, work, rs: per_rank(rs, key)

    table([(c, rs) for c, rs in runs.items() if c[1] != "landscape"], [
        ("config", 26, lambda kind, work, rs: f"{kind} {work}"), ("dim/rank", 9, first("dim")),
        ("HVP s", 6, slowest_of("product_s")), ("HVP MB/rank", 12, per_rank_of("product_mb")),
        ("top-1 s", 8, slowest_of("seconds")), ("HVPs", 5, first("hvps")), ("eigenvalue", 11, first("value", ".5g")),
        ("peak MB/rank", 13, per_rank_of("peak_mb"))])
    print()
    table([(c, rs) for c, rs in runs.items() if c[1] == "landscape"], [
        ("11x11 landscape", 26, lambda kind, work, rs: kind), ("dim", 9, first("dim")),
        ("forwards/rank", 13, per_rank_of("forwards")), ("chunk", 6, first("batch_points")),
        ("dirs s", 7, slowest_of("directions_s")), ("seconds", 8, slowest_of("seconds")),
        ("centre loss", 12, first("centre", ".6g")), ("peak MB/rank", 13, per_rank_of("peak_mb"))])
    for work in WORKS:
        if ("single", work) in runs:
            single = statistics.median(rep[0]["peak_mb"] for rep in runs[("single", work)])
            print(f"{work}: FSDP peak per rank / single-process peak = "
                  f"{slowest(runs[('fsdp', work)], 'peak_mb') / max(single, 1e-9):.2f}")
    only = "" if len(args.only) == len(WORKS) else " --only " + " ".join(args.only)
    print(f"command: python benchmarks/distributed.py --repeats {repeats}{only}; torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, one thread per process")


if __name__ == "__main__":
    main()
