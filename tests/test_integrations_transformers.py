"""The Hugging Face callback with a real ``transformers.Trainer`` on a tiny BERT built from a config."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may download
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it

import dyndiag as dd
from dyndiag.integrations.transformers import DiagnosticsCallback

P = dd.probes
BATCH = 4


class Sentences(torch.utils.data.Dataset):
    """Random token sequences with labels from a fixed rule (learnable, deterministic)."""

    def __init__(self, n: int = 24, length: int = 6, vocab: int = 30) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, vocab, (n, length), generator=g)
        self.labels = (self.ids[:, 0] > vocab // 2).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def _model():
    config = transformers.BertConfig(
        vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
        max_position_embeddings=16, num_labels=2, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
    )
    transformers.set_seed(0)
    return transformers.BertForSequenceClassification(config)


def _train(tmp_path, callbacks=(), steps=4, accumulate=1, with_trainer=False, strict=True, **options):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=steps, per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=accumulate, learning_rate=5e-3, use_cpu=True, report_to=[],
        save_strategy="no", logging_strategy="steps", disable_tqdm=True, seed=0,
        dataloader_num_workers=0, **{"logging_steps": 2, **options},
    )
    model = _model()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Sentences(), callbacks=list(callbacks))
    if with_trainer:
        for cb in callbacks:
            cb.trainer = trainer
    with warnings.catch_warnings():
        if strict:
            warnings.simplefilter("error", RuntimeWarning)  # no probe may fail, no logging fallback
        trainer.train()
    return model, trainer


def _probes():
    return [
        P.GradientNorm(),
        P.LayerRotation(every=2),
        P.SoftmaxCollapse(),
        P.EdgeOfStability(every=3),
        P.DirectionalSharpness(every=2),
    ]


def test_training_is_bit_identical_and_records_and_log_history_have_the_steps(tmp_path):
    ref, _ = _train(tmp_path / "ref")
    ref_rng = torch.get_rng_state()
    cb = DiagnosticsCallback(_probes(), log_dir=tmp_path / "run",
                             log_filter=lambda probe, metric, key: probe != "layer_rotation" or key == "")
    got, trainer = _train(tmp_path / "got", [cb])
    assert torch.equal(torch.get_rng_state(), ref_rng)
    for (name, a), b in zip(ref.state_dict().items(), got.state_dict().values()):
        assert torch.equal(a, b), name

    df = dd.load_records(tmp_path / "run")
    steps = lambda probe: sorted(set(df[df.probe == probe].step))
    assert steps("gradient_norm") == steps("softmax_collapse") == [0, 1, 2, 3]
    assert steps("layer_rotation") == steps("directional_sharpness") == [0, 2]
    assert steps("edge_of_stability") == [0, 3]
    eos = set(df[df.probe == "edge_of_stability"].metric)
    assert eos == {"sharpness", "threshold", "loss", "preconditioned_sharpness"}  # AdamW by default
    assert df.value.notna().all()

    # Through Trainer.log: one entry per probe step, "step" = that step, next to the Trainer's own logs.
    history = [h for h in trainer.state.log_history if "gradient_norm/grad_norm" in h]
    assert [h["step"] for h in history] == [0, 1, 2, 3]
    gn = df[df.metric == "grad_norm"].sort_values("step")
    assert [h["gradient_norm/grad_norm"] for h in history] == pytest.approx(gn.value.tolist(), rel=1e-6)
    # The Trainer's AdamW has two param groups (decay, no decay): one row per group.
    sharp = df[df.metric == "sharpness"].sort_values(["step", "key"])
    assert set(sharp.key) == {"0", "1"}
    logged = [h[f"edge_of_stability/sharpness/{g}"] for h in history for g in "01" if f"edge_of_stability/sharpness/{g}" in h]
    assert logged == pytest.approx(sharp.value.tolist())
    assert any("loss" in h and "gradient_norm/grad_norm" not in h for h in trainer.state.log_history)
    assert not any(k.startswith("layer_rotation/rotation/") for h in history for k in h)  # filtered out
    assert cb.trainer is trainer  # found without being passed


def test_probe_batch_is_the_first_examples_and_gradients_are_the_clipped_ones(tmp_path):
    seen = []

    class Spy(transformers.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            seen.append(float(torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]).norm()))

    cb = DiagnosticsCallback([P.GradientNorm(), P.EdgeOfStability(every=10)], log_dir=tmp_path / "run")
    _train(tmp_path, [Spy(), cb], steps=2, with_trainer=True)
    batch = cb.monitor.run.probe_data
    data = Sentences()
    assert torch.equal(batch["input_ids"], data.ids[:BATCH]) and torch.equal(batch["labels"], data.labels[:BATCH])
    df = dd.load_records(tmp_path / "run")
    assert df[df.metric == "grad_norm"].sort_values("step").value.tolist() == pytest.approx(seen, rel=1e-6)
    assert max(seen) <= 1.0 + 1e-6  # max_grad_norm=1: probes see what the optimizer applies
    # The probe loss at step 0: the initial model (dropout off) on the first examples.
    model = _model().eval()
    with torch.no_grad():
        expected = float(model(**batch).loss)
    loss = df[(df.probe == "edge_of_stability") & (df.metric == "loss")]
    assert list(loss.step) == [0] and loss.value.iloc[0] == pytest.approx(expected, rel=1e-5)


def test_max_grad_norm_grad_norm_is_the_applied_gradient_and_before_clip_the_trainers_own(tmp_path):
    cb = DiagnosticsCallback([P.GradientNorm()], log_dir=tmp_path / "run")
    _, trainer = _train(tmp_path, [cb], steps=3, accumulate=2, with_trainer=True, max_grad_norm=0.05, logging_steps=1)
    df = dd.load_records(tmp_path / "run")
    values = lambda metric: df[df.metric == metric].sort_values("step").value.tolist()  # noqa: E731
    # The Trainer logs the norm clip_grad_norm_ returned (before clipping) after each step.
    logged = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    assert len(logged) == 3 and min(logged) > 0.05
    assert values("grad_norm_before_clip") == pytest.approx(logged, rel=1e-5)
    assert values("grad_norm") == pytest.approx([b * 0.05 / (b + 1e-6) for b in logged], rel=1e-5)


def test_gradient_accumulation_probes_optimizer_steps_only(tmp_path, monkeypatch):
    """Also: without a Trainer to log through, values still reach log_history, with one warning."""
    import dyndiag.integrations.transformers as integration

    monkeypatch.setattr(integration, "_find_trainer", lambda state: None)
    cb = DiagnosticsCallback([P.GradientNorm(), P.DirectionalSharpness()], log_dir=tmp_path / "run")
    with pytest.warns(RuntimeWarning, match="pass trainer=") as caught:
        _, trainer = _train(tmp_path, [cb], steps=2, accumulate=2, strict=False)
    assert len([w for w in caught if "pass trainer=" in str(w.message)]) == 1
    assert trainer.state.global_step == 2
    df = dd.load_records(tmp_path / "run")
    assert df.groupby("step").size().to_dict() == {0: 3, 1: 3}
    history = [h for h in trainer.state.log_history if "directional_sharpness/directional_sharpness" in h]
    assert [h["step"] for h in history] == [0, 1]


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match="probes"):
        DiagnosticsCallback(P.GradientNorm())
    with pytest.raises(TypeError, match="trainer"):
        DiagnosticsCallback([P.GradientNorm()], trainer=object())
    with pytest.raises(ValueError, match="loss_fn and closure"):
        DiagnosticsCallback([P.GradientNorm()], loss_fn=torch.nn.CrossEntropyLoss(), closure=lambda m, b: 0)
