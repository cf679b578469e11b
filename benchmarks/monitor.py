"""Monitor overhead on real training steps (a benchmark, not a test).

design.md: the Monitor's own cost beyond hand-written hooks that compute the same
numbers in the same dtype with foreach kernels, records on disk, at most 5 % of a
step; the default probe set of ``dyndiag demo`` with curvature every 100 steps at
most 10 % amortised on the CNN.

Models (float32, batch 128, random-index mini-batches):
  mlp   64-512-512-10 (0.30 M parameters) on the digits, Adam (lr 1e-3)
  cnn   the CIFAR-style ResNet of benchmarks/scale.py at width 19 (1.0 M parameters),
        random 32x32x3 inputs and labels, SGD with momentum 0.9

Modes, per training step:
  plain    the step alone
  hand     + hooks written by hand: a forward hook keeping the logits, gradient hooks
           taking the gradient norm at the end of backward (before clipping), an
           optimizer pre-step hook computing the gradient norm (torch._foreach_norm),
           the rotation of every parameter tensor as ||w/|w| - w0/|w0| ||^2 / 2
           (foreach, float32) and the Softmax-Collapse fraction (rows whose log_softmax
           max is 0, as the probe judges them), kept on the device;
           every 50 steps one copy to the host and one os.write() of CSV lines
  monitor  + dd.Monitor with GradientNorm, LayerRotation, SoftmaxCollapse every step,
           log_dir on disk (SQLite; sync_every=50, the default): the same numbers
  demo     + dd.Monitor with the probe set of `dyndiag demo` (GradientNorm(per_layer),
           SoftmaxCollapse every step, LayerRotation every 10) with every other probe
           (EdgeOfStability, HessianSpectrum k=5 with density, GradientCoherence,
           DataScores on 512 examples, DirectionalSharpness, SafeStepRadius,
           SubspaceOverlap k=10) every 100 steps, probe batch = a training batch;
           timed on its cheap steps (those between curvature steps).

The amortised demo cost is (one step with every probe due + 99 cheap steps) / 100
plain steps - 1: the step with everything due is timed on its own, as the second
such step of a Monitor (the first pays one-off costs; ``--curvature`` repeats; on the
CNN on a CPU those steps take minutes, so they are measured only with
``--cnn-curvature``).

Rounds interleave the modes in a shuffled order, each after ``--warmup`` untimed
steps; overheads are paired (the median over rounds of the same round's difference,
divided by that round's plain step) with a 95 % bootstrap interval. The Monitor's
own cost is given twice: from whole steps (everything, but as noisy as the machine)
and from the time spent inside the hooks of each (the Monitor's forward, gradient
and optimizer hooks against the hand-written ones; precise, but blind to indirect
costs such as cache misses the hooks cause in the step).

    python benchmarks/monitor.py [--models mlp,cnn] [--rounds R] [--steps S] [--clock wall|thread]
                                 [--threads 1] [--cnn-curvature] [--quick]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dyndiag as dd  # noqa: E402
from dyndiag.probes.context import HVPProgress  # noqa: E402
from scale import resnet  # noqa: E402

P = dd.probes
SYNC_EVERY = 50
CLOCK = time.perf_counter


def make(name: str, quick: bool):
    """(model, optimizer, x, y): a fresh seeded setup."""
    torch.manual_seed(0)
    if name == "mlp":
        from dyndiag.datasets import load_digits

        x, y, _, _ = load_digits()
        model = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
        return model, torch.optim.Adam(model.parameters(), lr=1e-3), x, y
    model = resnet(6 if quick else 19)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(1024, 3, 32, 32, generator=g), torch.randint(0, 10, (1024,), generator=g)
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), x, y


class Hand:
    """The cheap probes' numbers, written by hand in the same dtype with foreach kernels."""

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, path: str) -> None:
        self.params = list(model.parameters())
        with torch.no_grad():
            w0 = [p.detach().clone() for p in self.params]
            self.u0 = torch._foreach_div(w0, torch._foreach_norm(w0))
        self.values: list = []
        self.step = 0
        self.queued = False
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.handles = [model.register_forward_hook(self.keep), opt.register_step_pre_hook(self.measure)]
        self.handles += [p.register_post_accumulate_grad_hook(self.on_grad) for p in self.params]

    def keep(self, module, inputs, output) -> None:
        self.logits = output.detach()

    def on_grad(self, param) -> None:  # the gradient norm before clipping: at the end of backward
        if not self.queued:
            self.queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self.before_clip)

    @torch.no_grad()
    def before_clip(self) -> None:
        self.queued = False
        self.before = torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.grad for p in self.params])))

    @torch.no_grad()
    def measure(self, opt, args, kwargs) -> None:
        grad = torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.grad for p in self.params])))
        u = torch._foreach_div(self.params, torch._foreach_norm(self.params))
        torch._foreach_sub_(u, self.u0)
        rotation = torch.stack(torch._foreach_norm(u)) ** 2 / 2
        z = self.logits
        # The probe's criterion (a row whose log_softmax max is 0: cross_entropy's own rounding).
        collapsed = (torch.log_softmax(z, 1).amax(1) == 0).sum(dtype=torch.float64) / len(z)
        self.values.append((self.step, torch.cat([grad[None], self.before[None], rotation, collapsed[None].float()])))
        self.step += 1
        if len(self.values) == SYNC_EVERY:
            self.flush()

    def flush(self) -> None:
        if self.values:
            rows = torch.stack([v for _, v in self.values]).tolist()  # one copy
            os.write(self.fd, "".join(f"{s},{','.join(map(repr, r))}\n" for (s, _), r in zip(self.values, rows)).encode())
            self.values = []

    def close(self) -> None:
        self.flush()
        for h in self.handles:
            h.remove()
        os.close(self.fd)


IN_HOOKS = [0.0]  # seconds spent inside the hooks of the monitor or the hand-written ones


def _in_hooks(method):
    def timed(*args, **kwargs):
        t0 = CLOCK()  # the steps' clock (with --clock thread, preemption is not counted here either)
        try:
            return method(*args, **kwargs)
        finally:
            IN_HOOKS[0] += CLOCK() - t0

    return timed


for _name in ("_capture", "_on_grad", "_snapshot", "_pre_step", "_post_step"):
    setattr(dd.Monitor, _name, _in_hooks(getattr(dd.Monitor, _name)))
for _name in ("keep", "on_grad", "before_clip", "measure"):
    setattr(Hand, _name, _in_hooks(getattr(Hand, _name)))


def demo_probes(x, y, every: int = 100):
    return [
        P.GradientNorm(per_layer=True), P.LayerRotation(every=10), P.SoftmaxCollapse(),
        P.EdgeOfStability(every=every), P.HessianSpectrum(every=every, k=5, density=True),
        P.GradientCoherence(every=every), P.DataScores((x[:512], y[:512]), every=every),
        P.DirectionalSharpness(every=every), P.SafeStepRadius(every=every), P.SubspaceOverlap(every=every, k=10),
    ]


def run(name: str, mode: str, steps: int, warmup: int, quick: bool, seed: int = 0) -> tuple[float, float]:
    """Seconds per timed step (after ``warmup`` untimed ones), and of that inside hooks."""
    model, opt, x, y = make(name, quick)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    batches = [torch.randint(0, len(y), (128,), generator=gen) for _ in range(warmup + steps)]
    tmp = tempfile.TemporaryDirectory()
    attached = None
    if mode == "hand":
        attached = Hand(model, opt, os.path.join(tmp.name, "rows.csv"))
    elif mode == "monitor":
        attached = dd.Monitor(model, opt, [P.GradientNorm(), P.LayerRotation(), P.SoftmaxCollapse()], log_dir=tmp.name)
    elif mode == "demo":  # its cheap steps: from step 1, and the other probes never due
        attached = dd.Monitor(model, opt, demo_probes(x, y, every=10**9), loss_fn=loss_fn,
                              probe_data=(x[batches[0]], y[batches[0]]), log_dir=tmp.name, start_step=1)
    for i, idx in enumerate(batches):
        if i == warmup:
            t0, IN_HOOKS[0] = CLOCK(), 0.0
        opt.zero_grad()
        loss_fn(model(x[idx]), y[idx]).backward()
        opt.step()
    elapsed, hooks = CLOCK() - t0, IN_HOOKS[0]
    attached is not None and attached.close()
    tmp.cleanup()
    return elapsed / steps, hooks / steps


HVPS = [0]  # Hessian-vector products of the probes' operators (what their progress bar counts)
_count = HVPProgress.__call__


def _counted(self, k: int) -> None:
    HVPS[0] += k
    _count(self, k)


HVPProgress.__call__ = _counted


def curvature_step(name: str, quick: bool, repeats: int) -> list[tuple[float, float, int]]:
    """(seconds of the first, seconds of the second, its Hessian-vector products) for
    the steps at which every demo probe is due, steps 0 and 2 of a Monitor attached
    after 3 plain steps. The first pays one-off costs (the per-example backend race,
    lazy imports); the second is what every later one costs."""
    out = []
    for r in range(repeats):
        model, opt, x, y = make(name, quick)
        loss_fn = nn.CrossEntropyLoss()
        gen = torch.Generator().manual_seed(r)
        batches = [torch.randint(0, len(y), (128,), generator=gen) for _ in range(6)]
        tmp = tempfile.TemporaryDirectory()
        mon, first = None, 0.0
        for i, idx in enumerate(batches):
            if i == 3:
                mon = dd.Monitor(model, opt, demo_probes(x, y, every=2), loss_fn=loss_fn,
                                 probe_data=(x[idx], y[idx]), log_dir=tmp.name)
            t0, HVPS[0] = CLOCK(), 0
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
            elapsed = CLOCK() - t0
            if i == 3:
                first = elapsed
        mon.close()
        tmp.cleanup()
        out.append((first, elapsed, HVPS[0]))
    return out


def paired(times: dict, m: str, base: str) -> list[float]:
    """(m - base) / plain per round, all from the same round."""
    return [(a - b) / c for a, b, c in zip(times[m], times[base], times["plain"])]


def interval(d: list[float]) -> tuple[float, float]:
    boot = random.Random(1)
    meds = sorted(statistics.median(boot.choices(d, k=len(d))) for _ in range(2000))
    return meds[50], meds[1949]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--rounds", type=int, default=None, help="default: mlp 9, cnn 3")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per round; default: mlp 150, cnn 4")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per round; default: mlp 50, cnn 2")
    ap.add_argument("--curvature", type=int, default=1, help="timed steps with every demo probe due (0: none)")
    ap.add_argument("--cnn-curvature", action="store_true",
                    help="also time a CNN step with every demo probe due (minutes on a CPU)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=["wall", "thread"], default="wall")
    ap.add_argument("--quick", action="store_true", help="CNN at width 6, fewer rounds and steps (a smoke run)")
    args = ap.parse_args()
    global CLOCK
    CLOCK = time.perf_counter if args.clock == "wall" else time.thread_time
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.clock} clock, {os.cpu_count()} CPUs")
    for name in args.models.split(","):
        cnn = name == "cnn"
        rounds = args.rounds or (2 if args.quick else 3 if cnn else 9)
        steps = args.steps or (3 if args.quick else 4 if cnn else 150)
        warmup = args.warmup if args.warmup is not None else (2 if cnn else 50)
        model = make(name, args.quick)[0]
        dim = sum(p.numel() for p in model.parameters())
        modes = ["plain", "hand", "monitor", "demo"]
        for m in modes:  # the process's own warm-up (allocator, imports), not recorded
            run(name, m, 2, 0, args.quick)
        times: dict = {m: [] for m in modes}
        hooks: dict = {m: [] for m in modes}
        order = random.Random(0)
        for r in range(rounds):
            for m in order.sample(modes, len(modes)):
                step, inside = run(name, m, steps, warmup, args.quick, seed=r)
                times[m].append(step)
                hooks[m].append(inside)
        print(f"\n{name}: {dim / 1e6:.2f} M parameters, batch 128, {steps} steps x {rounds} rounds "
              f"after {warmup} untimed steps each")
        print(f"{'mode':9s} {'median ms/step':>15s} {'in hooks ms':>12s}")
        for m in modes:
            inside = f"{1e3 * statistics.median(hooks[m]):12.3f}" if m in ("hand", "monitor") else ""
            print(f"{m:9s} {1e3 * statistics.median(times[m]):15.2f} {inside}")
        print(f"{'':9s} {'vs':6s} {'paired %':>9s} {'95 % interval':>16s}")
        for m, base, what in (("hand", "plain", "the arithmetic itself"), ("monitor", "hand", "target <= 5 %"),
                              ("demo", "plain", "cheap steps of the demo set")):
            d = paired(times, m, base)
            lo, hi = interval(d)
            print(f"{m:9s} {base:6s} {100 * statistics.median(d):9.2f} {f'[{100 * lo:.2f}, {100 * hi:.2f}]':>16s}  {what}")
        d = [(a - b) / c for a, b, c in zip(hooks["monitor"], hooks["hand"], times["plain"])]
        lo, hi = interval(d)
        print(f"{'monitor':9s} {'hand':6s} {100 * statistics.median(d):9.2f} {f'[{100 * lo:.2f}, {100 * hi:.2f}]':>16s}"
              "  time inside the hooks only (target <= 5 %)")
        if args.curvature and (not cnn or args.cnn_curvature):
            timed = curvature_step(name, args.quick, 1 if cnn else args.curvature)
            first, step, hvps = (statistics.median(t[i] for t in timed) for i in range(3))
            plain, cheap = statistics.median(times["plain"]), statistics.median(times["demo"])
            amortised = (step + 99 * cheap) / (100 * plain) - 1
            print(f"demo, a step with every probe due: {step:.2f} s = {step / plain:.0f} plain steps "
                  f"(the first: {first:.2f} s), {hvps:.0f} Hessian-vector products (plus per-example "
                  "gradients); amortised "
                  f"over 100 steps: {100 * amortised:.1f} % of a plain step (target <= 10 % on the CNN)")
            # ((step - plain) + (N - 1) (cheap - plain)) / (N plain) <= 10 %  <=>  N >= ...
            room = 0.1 * plain - (cheap - plain)
            needed = f"every {(step - cheap) / room:.0f} steps or more" if room > 0 else "no period (the cheap steps alone cost more)"
            print(f"   the 10 % target needs the probes other than the cheap ones {needed}")

if __name__ == "__main__":
    main()
