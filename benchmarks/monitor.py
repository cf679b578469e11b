"""Monitor overhead on a digits MLP training step (a benchmark, not a test).

design.md: the Monitor's own cost (scheduling, shared needs, state guard, record
writing) beyond hand-written hooks that compute the same numbers must be at most
5 % of a step. The cheap probes' arithmetic itself is not the monitor's cost.

Measures, per training step (MLP 64-48-10, batch 128, SGD with momentum, float32),
the median and the minimum over interleaved repeats:
  plain       the training step alone
  hand        + hand-written hooks computing the same numbers every step (grad norm,
                per-layer rotation as dyndiag computes it: float64 ||u - u0||^2 / 2,
                Softmax-Collapse fraction), appended to a Python list
  hand f32 cos  the same with rotation as a float32 cosine (cheaper, less precise at
                small angles), for reference
  hand+file   hand, and each step's numbers also appended to a CSV file with one
                os.write() (in the page cache when the hook returns, so a SIGKILL
                loses no finished step: the guarantee the record store gives)
  monitor     + dd.Monitor with GradientNorm, LayerRotation, SoftmaxCollapse every
                step, records in memory (log_dir=None)
  monitor+db  the same, written to the record store (log_dir=...): one SQLite
                transaction per step on the training thread (committed, readable
                and safe from a SIGKILL when the step returns)

Each repeat first runs ``--warmup`` untimed steps (default 300), so the timed steps
are the steady state of a run; the first steps' own cost is printed on its own line.

    python benchmarks/monitor.py [--steps 200] [--warmup 300] [--repeats 15] [--threads 1] [--clock wall|thread]
                                 [--modes plain,hand,monitor,monitor+db]

``--modes`` runs a subset (``plain`` and ``hand`` are always in it): fewer modes
give more repeats in the same time.

``--clock thread`` times the loop with ``time.thread_time()``, the training thread's
own CPU time (with one torch thread, all of the step's work): it leaves out time the
thread spends preempted or waiting on a shared VM; the default wall clock keeps it.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
import types

import torch
from torch import nn

import dyndiag as dd
from dyndiag.datasets import load_digits


CLOCK = time.perf_counter


def run(mode: str, steps: int, x, y, seed: int = 0, warmup: int = 0) -> float:
    """Seconds per step over ``steps`` timed steps, after ``warmup`` untimed ones (whose
    seconds per step go to ``WARMUP_TIMES[mode]`` when ``warmup`` > 0)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 48), nn.Tanh(), nn.Linear(48, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    batches = [torch.randint(0, len(y), (128,), generator=gen) for _ in range(warmup + steps)]
    rows: list = []
    mon = None
    handles = []
    tmp = None
    if mode.startswith("hand"):
        fd = None
        if mode == "hand+file":
            tmp = tempfile.TemporaryDirectory()
            fd = os.open(os.path.join(tmp.name, "rows.csv"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            handles.append(types.SimpleNamespace(remove=lambda: os.close(fd)))
        step = [0]
        init = [p.detach().clone() for p in model.parameters()]
        names = [n for n, _ in model.named_parameters()]
        # The same number dyndiag records: 1 - cos as ||u - u0||^2 / 2 in float64.
        unit0 = [(w0.reshape(-1).double() / w0.double().norm()) for w0 in init]
        last = {}
        handles.append(model.register_forward_hook(lambda m, i, o: last.__setitem__("logits", o.detach())))

        def pre_hook(optimizer, args, kwargs):
            g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
            rows.append(("grad_norm", float(torch.linalg.vector_norm(g))))
            for n, p, w0, u0 in zip(names, model.parameters(), init, unit0):
                if mode == "hand f32 cos":  # a cheaper, less precise number (for reference)
                    cos = torch.nn.functional.cosine_similarity(p.detach().reshape(1, -1), w0.reshape(1, -1))
                    rows.append((n, float(1 - cos)))
                else:  # as cheaply as dyndiag does it: in place, one dot product
                    w = p.detach().reshape(-1).double()
                    d = w.div_(torch.linalg.vector_norm(w)).sub_(u0)
                    rows.append((n, 0.5 * float(torch.dot(d, d))))
            z = last["logits"]
            collapsed = (torch.exp(z - z.max(1, keepdim=True).values).sum(1) == 1).float().mean()
            rows.append(("collapsed", float(collapsed)))
            if fd is not None:  # this step's rows (the last 1 + len(names) + 1), one line each
                s = step[0]
                os.write(fd, "".join(f"{s},{n},{v!r}\n" for n, v in rows[-len(names) - 2:]).encode())
            step[0] += 1

        handles.append(opt.register_step_pre_hook(pre_hook))
    elif mode.startswith("monitor"):
        probes = [dd.probes.GradientNorm(), dd.probes.LayerRotation(), dd.probes.SoftmaxCollapse()]
        log_dir = None
        if mode == "monitor+db":
            tmp = tempfile.TemporaryDirectory()
            log_dir = tmp.name
        mon = dd.Monitor(model, opt, probes, log_dir=log_dir)
    t0 = CLOCK()
    for i, idx in enumerate(batches):
        if i == warmup:
            if warmup:
                WARMUP_TIMES.setdefault(mode, []).append((CLOCK() - t0) / warmup)
            t0 = CLOCK()
        opt.zero_grad()
        loss_fn(model(x[idx]), y[idx]).backward()
        opt.step()
    elapsed = (CLOCK() - t0) / steps
    if mon is not None:
        mon.close()
    for h in handles:
        h.remove()
    if tmp is not None:
        tmp.cleanup()
    return elapsed


MODES = ["plain", "hand", "hand f32 cos", "hand+file", "monitor", "monitor+db"]
WARMUP_TIMES: dict = {}  # mode -> seconds per step of each repeat's untimed first steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=300,
                    help="untimed steps per repeat before the timed ones (0: time from the first step)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=["wall", "thread"], default="wall")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of: " + ", ".join(MODES))
    args = ap.parse_args()
    chosen = {m.strip() for m in args.modes.split(",") if m.strip()}
    if chosen - set(MODES):
        ap.error(f"--modes: unknown {sorted(chosen - set(MODES))}; choose from {', '.join(MODES)}")
    modes = [m for m in MODES if m in chosen | {"plain", "hand"}]
    global CLOCK
    CLOCK = time.perf_counter if args.clock == "wall" else time.thread_time
    torch.set_num_threads(args.threads)
    x, y, _, _ = load_digits()
    for m in modes:  # warm-up of the process (imports, allocator), not recorded
        run(m, 20, x, y)
    times = {m: [] for m in modes}
    order = random.Random(0)
    for r in range(args.repeats):
        # Every mode once per round, in a shuffled order: drift hits every mode alike.
        for m in order.sample(modes, len(modes)):
            times[m].append(run(m, args.steps, x, y, seed=r, warmup=args.warmup))
    med = {m: statistics.median(v) for m, v in times.items()}
    low = {m: min(v) for m, v in times.items()}  # noise only adds time: the fastest repeat is one estimate
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.steps} steps x {args.repeats} repeats "
          f"after {args.warmup} untimed steps each, {args.clock} clock")
    print(f"{'mode':17s} {'median ms/step':>15s} {'min ms/step':>12s} {'min vs plain':>13s}")
    for m in modes:
        print(f"{m:17s} {med[m] * 1e3:15.4f} {low[m] * 1e3:12.4f} {low[m] / low['plain']:13.3f}")

    def differences(m: str, base: str, t: dict = times) -> list:
        """(m - base) / plain in each round, all three from the same round."""
        return [(a - b) / c for a, b, c in zip(t[m], t[base], t["plain"])]

    def paired(m: str, base: str, t: dict = times) -> float:
        """Median over rounds of the same round's difference: the estimate least moved
        by the machine's drift between rounds."""
        return statistics.median(differences(m, base, t))

    def interval(m: str, base: str) -> tuple:
        """95 % percentile-bootstrap interval of the paired median (rounds resampled)."""
        d = differences(m, base)
        boot = random.Random(1)
        meds = sorted(statistics.median(boot.choices(d, k=len(d))) for _ in range(2000))
        return meds[50], meds[1949]

    print("the monitor's own cost, % of a plain step (target <= 5 %): "
          "paired = median over rounds of the same round's difference, with a 95 % bootstrap interval")
    print(f"{'mode':17s} {'vs':13s} {'paired':>7s} {'95 % interval':>15s} {'median':>7s} {'min':>7s}")
    rows = [(m, "hand") for m in ("monitor", "monitor+db")] + [("monitor+db", "hand+file"), ("monitor+db", "monitor")]
    for m, base in rows:
        if m not in times or base not in times:
            continue
        lo, hi = interval(m, base)
        own = [100 * (t[m] - t[base]) / t["plain"] for t in (med, low)]
        print(f"{m:17s} {base:13s} {100 * paired(m, base):7.1f} {f'[{100 * lo:.1f}, {100 * hi:.1f}]':>15s} "
              + " ".join(f"{v:7.1f}" for v in own))
    print(f"the probes' arithmetic itself (hand vs plain): paired {100 * paired('hand', 'plain'):.1f} %")
    if args.warmup:
        print(f"the first {args.warmup} steps (untimed above), own cost against hand, paired: "
              + ", ".join(f"{m} {100 * paired(m, 'hand', WARMUP_TIMES):.1f} %"
                          for m in ("monitor", "monitor+db") if m in times))

if __name__ == "__main__":
    main()
