"""LM benchmark: one Hessian and one GGN product on a GPT-2 layout, against hessian-eigenthings.

Run from the repository root::

    python benchmarks/lm.py              # 5 interleaved rounds (a few minutes on a 2-core CPU)
    python benchmarks/lm.py --rounds 3

Needs transformers and hessian-eigenthings, installed pinned to the torch in use::

    echo "torch==2.13.0" > pin.txt; pip install -c pin.txt hessian-eigenthings==1.0.0a5

Model: Hugging Face ``GPT2LMHeadModel`` from a ``GPT2Config`` (2 layers, 128 wide,
4 heads, vocabulary 50257, dropout 0, eval mode, float32, no download), one batch
of 4 x 128 random tokens with ``labels = input_ids`` (next-token loss, as the model's
``.loss``). Attention runs on PyTorch's MATH kernel everywhere (dyndiag does so for
every product; the gradient and hessian-eigenthings are run under the same kernel so
that all rows compare the same forward).

Time is the CPU time of the calling thread (``time.thread_time``) with one torch
thread (``--threads``): on a shared machine the wall clock mostly measures the
neighbours, this measures the work.

Rows (each one product with a fixed random vector, time in units of one gradient
``torch.autograd.grad(model(**batch).loss, params)``, median over interleaved rounds):

* dyndiag Hessian: ``HessianOperator(model, closure=lambda m, b: m(**b).loss,
  data=batch, cache_graph=False)`` (every product pays forward and backward);
* dyndiag Hessian, graph kept: the default for one batch (``cache_graph=True``),
  what each Lanczos step after the first pays;
* dyndiag GGN: ``GGNOperator(model, CausalLMLoss(), batch, forward=logits)``
  (one forward with forward-mode ``J v``, closed-form softmax Hessian, one
  backward; every product is its own, nothing is kept between products);
* hessian-eigenthings ``HessianOperator`` (``hf_lm_loss``) and ``GGNOperator``
  (``hf_lm_forward``, ``hf_lm_loss_of_output``) ``.matvec`` on the same batch.

Peak memory: the peak resident memory of the process during one product started
cold (operator just built, so a kept graph is counted), above the resident memory
just before it, in units of the same measure for one gradient. The peak is reset
before each measurement (Linux ``/proc/self/clear_refs``) and the script runs with
``MALLOC_MMAP_THRESHOLD_`` fixed at 64 KiB, so every tensor larger than that is its
own mapping, returned to the system when freed: resident memory then follows the
live tensors rather than what the allocator keeps. That setting makes every large
allocation fault its pages in afresh, so memory is measured in a child process of
its own and the timings in this one, with the allocator as users have it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import transformers  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

import dyndiag as dd  # noqa: E402
from dyndiag.data import CausalLMLoss  # noqa: E402


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


def peak_bytes(fn) -> int:
    """Peak resident bytes above the current ones while ``fn()`` runs."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak (VmHWM) to the current resident size
    base = _status("VmRSS")
    fn()
    return _status("VmHWM") - base


def gpt2(vocab: int, width: int, layers: int, heads: int, context: int):
    config = transformers.GPT2Config(
        vocab_size=vocab, n_embd=width, n_layer=layers, n_head=heads, n_positions=context,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import hessian_eigenthings as he

    model = gpt2(args.vocab, 128, 2, 4, args.length)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.length), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    params = [p for p in model.parameters() if p.requires_grad]
    dim = sum(p.numel() for p in params)
    v = torch.randn(dim, generator=g)

    def hf_loss(m, b):
        return m(**b).loss

    def logits(m, b):
        return m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits

    def math(fn):
        def run():
            with sdpa_kernel(SDPBackend.MATH):
                return fn()
        return run

    def gradient():
        return torch.autograd.grad(hf_loss(model, batch), params)

    makers = {  # name -> () -> product function (built cold: a kept graph is built by its first product)
        "gradient": lambda: math(gradient),
        "dyndiag Hessian": lambda: (lambda op: lambda: op @ v)(
            dd.HessianOperator(model, closure=hf_loss, data=batch, cache_graph=False)),
        "dyndiag Hessian, graph kept": lambda: (lambda op: lambda: op @ v)(
            dd.HessianOperator(model, closure=hf_loss, data=batch)),
        "eigenthings Hessian": lambda: (lambda op: math(lambda: op.matvec(v)))(
            he.HessianOperator(model, [batch], he.hf_lm_loss())),
        "dyndiag GGN": lambda: (lambda op: lambda: op @ v)(
            dd.GGNOperator(model, CausalLMLoss(), batch, forward=logits)),
        "eigenthings GGN": lambda: (lambda op: math(lambda: op.matvec(v)))(
            he.GGNOperator(model, [batch], he.hf_lm_forward(), he.hf_lm_loss_of_output())),
    }

    if args.memory:  # the child: cold peaks, each product on a freshly built operator
        print(json.dumps({name: peak_bytes(make()) for name, make in makers.items()}))
        return
    child = subprocess.run(
        [sys.executable, *sys.argv, "--memory"], capture_output=True, text=True, check=True,
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"},
    )
    peaks = json.loads(child.stdout.strip().splitlines()[-1])
    # Warm operators (a kept graph built, allocator and kernels warmed), then interleaved timings.
    products = {name: make() for name, make in makers.items()}
    for product in products.values():
        product()
    times: dict[str, list[float]] = {name: [] for name in products}
    for _ in range(args.rounds):
        for name, product in products.items():
            start = time.thread_time()
            product()
            times[name].append(time.thread_time() - start)

    # Both libraries compute the same products.
    ref_h, ref_g = products["dyndiag Hessian"](), products["dyndiag GGN"]()
    agree_h = ((products["eigenthings Hessian"]() - ref_h).norm() / ref_h.norm()).item()
    agree_g = ((products["eigenthings GGN"]() - ref_g).norm() / ref_g.norm()).item()

    median = {name: statistics.median(t) for name, t in times.items()}
    grad_s, grad_peak = median["gradient"], peaks["gradient"]
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, hessian-eigenthings "
          f"{he.__version__}, {platform.processor() or platform.machine()}, {args.threads} thread(s), float32, "
          "thread CPU time")
    print(f"GPT-2 layout 2x128, 4 heads, vocab {args.vocab}, {dim / 1e6:.2f} M parameters, batch "
          f"{args.batch}x{args.length} tokens; median of {args.rounds} interleaved rounds")
    print(f"one gradient: {grad_s:.3f} s CPU, peak {grad_peak / 2**20:.0f} MB")
    head = f"{'product':30s} {'s':>7} {'gradients':>9} {'peak MB':>8} {'x grad peak':>11}"
    print(head)
    print("-" * len(head))
    for name in products:
        print(f"{name:30s} {median[name]:7.3f} {median[name] / grad_s:9.2f} {peaks[name] / 2**20:8.0f} "
              f"{peaks[name] / grad_peak:11.2f}")
    for kind, kept in (("Hessian", " (graph kept: {:.2f})"), ("GGN", "")):
        peer = median[f"eigenthings {kind}"]
        kept = kept.format(peer / median[f"dyndiag {kind}, graph kept"]) if kept else ""
        print(f"{kind}: hessian-eigenthings / dyndiag time {peer / median[f'dyndiag {kind}']:.2f}{kept}; "
              f"memory {peaks[f'eigenthings {kind}'] / peaks[f'dyndiag {kind}']:.2f}")
    print(f"relative difference dyndiag vs hessian-eigenthings: Hessian {agree_h:.1e}, GGN {agree_g:.1e}")


if __name__ == "__main__":
    main()
