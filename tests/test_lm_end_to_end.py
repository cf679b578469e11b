"""Causal language models end to end: a plain AdamW loop on a tiny GPT-2 (plain torch,
and Hugging Face's from a config), eager and ``torch.compile``d, with the curvature and
output probes on dict batches ``{input_ids, attention_mask, labels}`` (-100 on padding)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may download
pytest.importorskip("transformers")

import dyndiag as dd  # noqa: E402
from dyndiag.data import CausalLMLoss, loss_count  # noqa: E402
from tests.lm_models import hf_gpt2, tiny_gpt, token_batch  # noqa: E402

P = dd.probes
CRITERION = CausalLMLoss()


def tiny_closure(model, batch):
    """A plain module returning ``(B, T, V)`` logits: the shifted cross-entropy of its outputs."""
    return CRITERION(model(batch["input_ids"], batch["attention_mask"]), batch["labels"])


def hf_closure(model, batch):
    """A Hugging Face causal LM computes the same loss itself."""
    return model(**batch).loss


MODELS = {"tiny_gpt": (tiny_gpt, tiny_closure), "hf_gpt2": (hf_gpt2, hf_closure)}
# Two probe batches with different numbers of (non-padding) tokens: the curvature is that
# of the token-weighted mean loss over both.
PROBE_DATA = [token_batch(batch=3, length=8, seed=100), token_batch(batch=2, length=8, seed=101)]
TRAIN = [token_batch(batch=4, length=8, seed=s) for s in range(3)]


SCORING = token_batch(batch=4, length=8, seed=7)


def _probes(name: str = "hf_gpt2"):
    """The issue's probe set: AdamW's preconditioned sharpness, per-block spectra, per-sequence scores, collapse."""
    forward = None if name == "hf_gpt2" else (lambda m, b: m(b["input_ids"], b["attention_mask"]))
    return [P.EdgeOfStability(every=2), P.HessianSpectrum(k=2, trace_matvecs=6, every=2, blocks="layer"),
            P.DataScores(SCORING, every=2, forward=forward), P.SoftmaxCollapse()]


def _train(name: str, probes=None, compiled: bool = False):
    """AdamW on ``TRAIN``, with a Monitor running ``probes`` unless None: (model, records, compiles)."""
    make, closure = MODELS[name]
    model = make()
    counter = None
    run = model
    if compiled:
        from torch._dynamo.testing import CompileCounterWithBackend

        torch._dynamo.reset()
        counter = CompileCounterWithBackend("aot_eager")
        run = torch.compile(model, backend=counter)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    mon = None
    if probes is not None:
        mon = dd.Monitor(run, opt, probes, closure=closure, probe_data=PROBE_DATA, batch_size_fn=loss_count)
    torch.manual_seed(0)  # dropout (Hugging Face's GPT-2 trains with it)
    for batch in TRAIN:
        opt.zero_grad()
        closure(run, batch).backward()
        opt.step()
    records = None
    if mon is not None:
        records = mon.records()
        mon.close()
        failed = [p.name for p in mon.probes if not p.enabled]
        assert not failed, f"probes {failed} failed on LM batches"
    return model, records, None if counter is None else counter.frame_count


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["eager", "compiled"])
@pytest.mark.parametrize("name", list(MODELS))
def test_plain_loop_is_bit_identical_with_a_monitor_and_records_token_weighted_curvature(name, compiled):
    got, df, frames = _train(name, _probes(name), compiled)
    rng = torch.get_rng_state()
    ref, _, frames_ref = _train(name, None, compiled)
    assert torch.equal(rng, torch.get_rng_state())
    for (key, a), b in zip(ref.state_dict().items(), got.state_dict().values()):
        assert torch.equal(a, b), key
    if compiled:
        assert frames_ref >= 1 and frames == frames_ref  # the Monitor compiled nothing more

    assert df.value.notna().all()
    metrics = set(zip(df.probe, df.metric))
    assert {("edge_of_stability", m) for m in ("sharpness", "preconditioned_sharpness", "threshold", "loss")} <= metrics
    assert {("hessian_spectrum", "eigenvalue_0"), ("hessian_spectrum", "trace"),
            ("softmax_collapse", "collapsed_fraction")} <= metrics
    prefix = "transformer." if name == "hf_gpt2" else ""
    assert {prefix + "h.0", prefix + "h.1"} <= set(df[df.metric == "eigenvalue_0"].key)
    assert sorted(set(df[df.probe == "edge_of_stability"].step)) == [0, 2]
    assert sorted(set(df[df.probe == "hessian_spectrum"].step)) == [0, 2]
    assert sorted(set(df[df.probe == "data_scores"].step)) == [0, 2]
    assert sorted(set(df[df.probe == "softmax_collapse"].step)) == [0, 1, 2]

    # Step 0 is the initial model: the probe loss is the token-weighted mean over the two
    # batches, the sharpness the top eigenvalue of that loss's Hessian.
    make, closure = MODELS[name]
    model = make().eval()
    summed = CausalLMLoss(reduction="sum")
    with torch.no_grad():
        outputs = [model(**b).logits if name == "hf_gpt2" else model(b["input_ids"], b["attention_mask"])
                   for b in PROBE_DATA]
        expected_loss = sum(summed(o, b["labels"]) for o, b in zip(outputs, PROBE_DATA)) / sum(
            CRITERION.count(b["labels"]) for b in PROBE_DATA)
    row = lambda metric: df[(df.step == 0) & (df.probe == "edge_of_stability") & (df.metric == metric)]  # noqa: E731
    assert row("loss").value.iloc[0] == pytest.approx(float(expected_loss), rel=1e-5)
    op = dd.HessianOperator(make(), closure=closure, data=PROBE_DATA, loss_fn=None, batch_size_fn=loss_count)
    sharpness = dd.eigenvalues(op, k=1, tol=1e-4).values[0]
    # To Lanczos' tolerance: the probes' one Lanczos run serves k=2 (HessianSpectrum) too.
    assert row("sharpness").value.iloc[0] == pytest.approx(float(sharpness), rel=2e-4)


@pytest.mark.parametrize("name", list(MODELS))
def test_data_scores_on_lm_batches_record_one_score_per_sequence(name, tmp_path):
    scoring = token_batch(batch=4, length=8, seed=7)
    make, closure = MODELS[name]
    model = make()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    forward = None if name == "hf_gpt2" else (lambda m, b: m(b["input_ids"], b["attention_mask"]))
    mon = dd.Monitor(model, opt, [P.DataScores(scoring, forward=forward)], closure=closure,
                     probe_data=PROBE_DATA, log_dir=tmp_path)
    for batch in TRAIN[:1]:
        opt.zero_grad()
        closure(model, batch).backward()
        opt.step()
    mon.close()
    assert all(p.enabled for p in mon.probes)
    for metric in ("grand_scores", "el2n_scores"):
        scores = dd.load_arrays(tmp_path, "data_scores", metric)[0]
        assert scores.shape == (4,) and (scores >= 0).all()


@pytest.mark.parametrize("name", list(MODELS))
def test_per_layer_hessian_spectrum_runs_on_lm_batches(name):
    _, df, _ = _train(name, [P.HessianSpectrum(k=2, trace_matvecs=6, blocks="layer")])
    rows = df[(df.probe == "hessian_spectrum") & (df.metric == "eigenvalue_0")]
    prefix = "transformer." if name == "hf_gpt2" else ""
    assert {prefix + "h.0", prefix + "h.1"} <= set(rows.key), set(rows.key)
    assert rows.value.notna().all()


class Tokens(torch.utils.data.Dataset):
    """Token sequences with right padding of 0-3 tokens (label -100), as a tokenizer pads."""

    def __init__(self, n: int = 16, length: int = 8, vocab: int = 11) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, vocab, (n, length), generator=g)
        self.mask = torch.ones(n, length, dtype=torch.long)
        for i in range(n):
            if i % 4:
                self.mask[i, length - i % 4:] = 0
        self.labels = self.ids.masked_fill(self.mask == 0, -100)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def _trainer_run(tmp_path, callbacks=(), compiled=False):
    import transformers

    options = {}
    if compiled:
        torch._dynamo.reset()  # a fresh cache: no earlier test's compiles count against its size limit
        options = {"torch_compile": True, "torch_compile_backend": "aot_eager"}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4, learning_rate=5e-3,
        use_cpu=True, report_to=[], save_strategy="no", logging_strategy="steps", logging_steps=1,
        disable_tqdm=True, seed=0, dataloader_num_workers=0, **options,
    )
    model = hf_gpt2()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=list(callbacks))
    trainer.train()
    return model, trainer


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["eager", "compiled"])
def test_hugging_face_trainer_on_gpt2_is_bit_identical_with_the_callback_and_records_curvature(tmp_path, compiled):
    pytest.importorskip("accelerate")
    from dyndiag.integrations.transformers import DiagnosticsCallback

    cb = DiagnosticsCallback(_probes(), log_dir=tmp_path / "run", batch_size_fn=loss_count)
    got, trainer = _trainer_run(tmp_path / "got", [cb], compiled)
    ref, _ = _trainer_run(tmp_path / "ref", [], compiled)
    for (key, a), b in zip(ref.state_dict().items(), got.state_dict().values()):
        assert torch.equal(a, b), key
    assert all(p.enabled for p in cb.monitor.probes)
    if compiled:
        assert type(trainer.model_wrapped).__name__ == "OptimizedModule"  # training ran the compiled graph
    # The forward hook saw the training forwards (probes' own forwards are never kept).
    assert cb.monitor.run.logits is not None and cb.monitor.run.logits.shape == (4, 8, 11)

    df = dd.load_records(tmp_path / "run")
    assert df.value.notna().all()
    eos = df[df.probe == "edge_of_stability"]
    assert sorted(set(eos.step)) == [0, 2]
    # The Trainer's AdamW: two param groups (decay, no decay), one row of each per step.
    assert set(eos[eos.metric == "preconditioned_sharpness"].key) == {"0", "1"}
    assert sorted(set(df[df.metric == "collapsed_fraction"].step)) == [0, 1, 2]
    assert {"transformer.h.0", "transformer.h.1"} <= set(df[(df.probe == "hessian_spectrum")].key)
    assert sorted(set(df[df.probe == "data_scores"].step)) == [0, 2]
    # Step 0's probe loss: the initial model (dropout off) on the first four examples.
    batch = cb.monitor.run.probe_data
    assert torch.equal(batch["labels"], Tokens().labels[:4])
    with torch.no_grad():
        expected = float(hf_gpt2().eval()(**batch).loss)
    assert eos[(eos.metric == "loss") & (eos.step == 0)].value.iloc[0] == pytest.approx(expected, rel=1e-5)


class OnceDifferentiableSoftmax(torch.autograd.Function):
    """Softmax with a hand-written backward that autograd cannot differentiate, as a fused
    attention kernel's."""

    @staticmethod
    def forward(ctx, x):
        y = torch.softmax(x, -1)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return y * (g - (g * y).sum(-1, keepdim=True))


class CustomAttention(torch.nn.Module):
    """Attention on a custom kernel, with the documented reference path for dyndiag."""

    def __init__(self, reference_when_probing: bool) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(4, 12)
        self.head = torch.nn.Linear(4, 3)
        self.reference_when_probing = reference_when_probing

    def forward(self, x):
        from dyndiag.evaluation import is_probing

        q, k, v = self.qkv(x).split(4, -1)
        scores = q @ k.transpose(-1, -2) / 2
        if self.reference_when_probing and is_probing():
            weights = torch.softmax(scores, -1)  # plain torch ops: double-differentiable
        else:
            weights = OnceDifferentiableSoftmax.apply(scores)
        return self.head((weights @ v).mean(1))


def test_custom_attention_gets_exact_curvature_from_a_reference_path_taken_while_dyndiag_evaluates():
    torch.manual_seed(0)
    x, y = torch.randn(5, 6, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    loss = torch.nn.CrossEntropyLoss()

    def hessian(reference_when_probing):
        torch.manual_seed(1)
        model = CustomAttention(reference_when_probing).double()
        H = dd.HessianOperator(model, loss, (x, y), backend="loop")
        return H @ torch.eye(H.dim, dtype=torch.float64)

    exact = _exact_hessian(x, y, loss)
    torch.testing.assert_close(hessian(True), exact, rtol=1e-10, atol=1e-12)
    # Without it PyTorch raises nothing here: the second-order term through the kernel is
    # silently missing (what docs/integrations.md warns about).
    assert not torch.allclose(hessian(False), exact, rtol=1e-3, atol=1e-6)


def _exact_hessian(x, y, loss):
    """Double backward over the identity, on the model's plain-softmax path."""
    from dyndiag.evaluation import probing

    torch.manual_seed(1)
    model = CustomAttention(True).double()
    params = list(model.parameters())
    with probing():
        grads = torch.autograd.grad(loss(model(x), y), params, create_graph=True)
        flat = torch.cat([g.reshape(-1) for g in grads])
        rows = [torch.cat([h.reshape(-1) for h in torch.autograd.grad(flat[i], params, retain_graph=True)])
                for i in range(flat.numel())]
    return torch.stack(rows)
