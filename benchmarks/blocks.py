"""Per-block spectra in one call (``blocks=``) against one operator per block.

A GPT-2 layout built from a config (Hugging Face ``GPT2LMHeadModel``, 4 layers, 64
wide, 4 heads, vocabulary 512, 64-token sequences, float32, no downloads),
``blocks="layer"`` (7 blocks: wte, wpe, h.0-h.3, ln_f). Three ways to multiply one
Lanczos/SLQ step's columns (one per block):

* ``lockstep``: what ``blocks=`` does: one ``block_matmat`` call of the whole
  operator on a ``(dim, 7)`` matrix, column ``b`` zero outside block ``b``: per batch
  one forward (and first backward) shared by the blocks, each column differentiated
  toward its block's parameters only;
* ``full``: the generic path (operators without ``block_matmat``): one ``matmat`` of
  the same matrix, a full-operator product per column, the block's rows kept;
* ``per block``: an operator with ``params=<the block's parameters>`` per block,
  one column each (what a loop over blocks calling the estimators does).

On one batch of 8 sequences and on 4 such batches (a data set the operator reads
once per product call). Reported: median wall time of a step over the repeats (the
two ways interleaved), and the full estimators (top eigenvalue, Hutch++ trace, SLQ)
both ways once, with their agreement. Run: ``python benchmarks/blocks.py [--quick] [--operator ggn]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import dyndiag as dd
from dyndiag.curvature.partition import resolve_blocks
from dyndiag.data import CausalLMLoss


def build(quick: bool):
    import transformers

    config = transformers.GPT2Config(vocab_size=512, n_embd=64, n_layer=4, n_head=4, n_positions=64,
                                      bos_token_id=0, eos_token_id=0, loss_type="ForCausalLM")
    transformers.set_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 512, (8, 32 if quick else 64), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    return model, batch


def closure(model, batch):
    return model(**batch).loss


class Calls:
    """Counts an operator's product calls (matmat, matvec and block_matmat)."""

    def __init__(self, op):
        self.n = 0
        for name in ("matmat", "matvec", "block_matmat"):
            inner = getattr(op, name)

            def wrapped(*args, inner=inner):
                self.n += 1
                return inner(*args)

            setattr(op, name, wrapped)


def operator(model, data, kind, **kwargs):
    if kind == "hessian":
        return dd.HessianOperator(model, None, data, closure=closure, **kwargs)
    return dd.GGNOperator(model, CausalLMLoss(), data, forward=logits, **kwargs)


def logits(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def estimates(ops, blocks, settings):
    k, budget, probes, steps = settings
    if blocks is not None:  # lockstep on one operator
        (op,) = ops
        return (dd.eigenvalues(op, k=k, tol=1e-4, blocks=blocks), dd.trace(op, budget, blocks=blocks),
                dd.spectral_density(op, probes, steps, blocks=blocks, progress=False))
    eig, tr, dens = {}, {}, {}
    for name, op in ops.items():
        eig[name] = dd.eigenvalues(op, k=k, tol=1e-4)
        tr[name] = dd.trace(op, budget)
        dens[name] = dd.spectral_density(op, probes, steps, progress=False)
    return eig, tr, dens


def step_times(model, data, parts, repeats, backend, kind):
    """Median seconds of one step each way (interleaved), after a warm-up each."""
    full = operator(model, data, kind, backend=backend)
    named = dict(model.named_parameters())
    ops = [operator(model, data, kind, params=[named[n] for n in b.params], backend=backend) for b in parts]
    g = torch.Generator().manual_seed(0)
    V = torch.zeros(full.dim, len(parts))
    for j, b in enumerate(parts):
        V[b.index, j] = torch.randn(b.dim, generator=g)
    columns = [V[b.index, j : j + 1] for j, b in enumerate(parts)]
    groups = [(b.params, 1) for b in parts]
    ways = {"lockstep": lambda: full.block_matmat(V, groups), "full": lambda: full.matmat(V),
            "per block": lambda: [op.matmat(c) for op, c in zip(ops, columns)]}
    times = {w: [] for w in ways}
    for way, run in ways.items():
        run()  # warm-up: graphs cached, CPU backends chosen
    for _ in range(repeats):
        for way, run in ways.items():
            start = time.perf_counter()
            run()
            times[way].append(time.perf_counter() - start)
    return {w: statistics.median(t) for w, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter sequences, fewer steps, two repeats")
    parser.add_argument("--repeats", type=int, default=None, help="step timings' repeats (default 5, 2 with --quick)")
    parser.add_argument("--backend", default="auto", choices=("auto", "vmap", "loop"),
                        help="the operators' backend for the step timings (auto: raced on the CPU)")
    parser.add_argument("--steps-only", action="store_true", help="skip the full estimators")
    parser.add_argument("--operator", default="hessian", choices=("hessian", "ggn"))
    parser.add_argument("--estimator-repeats", type=int, default=1, help="runs of the estimators each way")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, batch = build(args.quick)
    repeats = args.repeats or (2 if args.quick else 5)
    kind = args.operator
    full = operator(model, batch, kind)
    parts = resolve_blocks(full, "layer")
    print(f"GPT-2 layout, {kind}, {full.dim} parameters, {len(parts)} blocks ({', '.join(b.name for b in parts)}), "
          f"{torch.get_num_threads()} threads, backend {args.backend}, median of {repeats}")
    print(f"{'one step, data':<22} {'lockstep (s)':>12} {'full (s)':>9} {'per block (s)':>13} "
          f"{'per block / lockstep':>20}")
    for label, data in (("1 batch", batch), ("4 batches", [batch] * 4)):
        t = step_times(model, data, parts, repeats, args.backend, kind)
        print(f"{label:<22} {t['lockstep']:12.3f} {t['full']:9.3f} {t['per block']:13.3f} "
              f"{t['per block'] / t['lockstep']:20.2f}")

    if args.steps_only:
        return
    settings = (1, 12, 2, 8) if args.quick else (1, 30, 4, 20)
    results, calls, columns, seconds = {}, {}, {}, {"lockstep": [], "per block": []}
    for _ in range(args.estimator_repeats):
        for way in seconds:  # interleaved; fresh operators each time
            if way == "lockstep":
                ops = [operator(model, batch, kind)]
            else:
                named = dict(model.named_parameters())
                ops = {b.name: operator(model, batch, kind, params=[named[n] for n in b.params]) for b in parts}
            counters = [Calls(op) for op in (ops if way == "lockstep" else ops.values())]
            start = time.perf_counter()
            results[way] = estimates(ops, "layer" if way == "lockstep" else None, settings)
            seconds[way].append(time.perf_counter() - start)
            calls[way] = sum(c.n for c in counters)
            columns[way] = sum(op.num_matvecs for op in (ops if way == "lockstep" else ops.values()))
    print(f"estimators (k={settings[0]}, trace budget {settings[1]}, SLQ {settings[2]} x {settings[3]}), "
          f"median of {args.estimator_repeats}:")
    for way, t in seconds.items():
        print(f"  {way:<10} {statistics.median(t):8.2f} s {calls[way]:5d} calls {columns[way]:6d} columns"
              f"   (each: {', '.join(f'{x:.1f}' for x in t)})")
    (e1, t1, _), (e2, t2, _) = results["lockstep"], results["per block"]
    top = max(abs(float(e1[b].values[0]) - float(e2[b].values[0])) / abs(float(e2[b].values[0])) for b in e1)
    trace_gap = max(abs(t1[b].value - t2[b].value) / abs(t2[b].value) for b in t1)
    print(f"  agreement: top eigenvalue rel {top:.1e}, trace rel {trace_gap:.1e}")


if __name__ == "__main__":
    main()
