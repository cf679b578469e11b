"""Softmax Collapse on token-level logits: ignored labels, the causal shift, and the
dtype the loss is computed in (bf16 autocast), against ``cross_entropy(...) == 0``."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

import dyndiag as dd
import dyndiag.quantities as q
from dyndiag.data import IGNORE_INDEX, CausalLMLoss
from dyndiag.quantities.softmax import _collapsed_rows, collapsed_fraction, loss_dtype
from lm_models import hf_gpt2, tiny_gpt, token_batch

CRIT = CausalLMLoss()


def zero_loss(rows: torch.Tensor) -> torch.Tensor:
    """Per row: is the cross-entropy of its argmax class exactly 0 (where the loss runs)?"""
    return F.cross_entropy(rows, rows.float().argmax(-1), reduction="none") == 0


def counted_zero_loss_fraction(logits, labels):
    """Fraction of zero-loss rows among the positions a causal LM's loss counts."""
    rows, next_labels = logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
    keep = next_labels != IGNORE_INDEX
    return zero_loss(rows)[keep].double().mean().item(), zero_loss(rows).double().mean().item()


def test_bf16_logits_under_autocast_are_judged_in_float32_like_the_loss():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2000, 50, generator=g) * 3
    z[:, 0] += torch.linspace(0, 40, 2000)
    zb = z.bfloat16()
    assert loss_dtype(zb) == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ce_zero = zero_loss(zb)
        dtype = loss_dtype(zb)
    assert dtype == torch.float32
    collapsed, counted = _collapsed_rows(zb, None, dtype, True, IGNORE_INDEX)
    assert counted is None and torch.equal(collapsed, ce_zero)
    assert 0.2 < ce_zero.double().mean() < 0.8
    assert q.softmax_collapse(zb, dtype=dtype) == ce_zero.double().mean().item()
    # Judged in bf16 (no autocast there), far more rows look collapsed than have zero loss.
    assert q.softmax_collapse(zb) > q.softmax_collapse(zb, dtype=dtype) + 0.2
    assert torch.equal(_collapsed_rows(zb, None, None, True, IGNORE_INDEX)[0], zero_loss(zb))  # the bf16 loss


def test_ignored_labels_and_the_causal_shift():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 7, 5, generator=g) * torch.linspace(1, 40, 7)[:, None]
    labels = torch.randint(0, 5, (3, 7), generator=g)
    labels[0, 4:] = IGNORE_INDEX
    labels[2, :3] = IGNORE_INDEX
    counted, every = counted_zero_loss_fraction(logits, labels)
    assert q.softmax_collapse(logits, labels) == counted != every
    # Unshifted (masked LM, token classification): position t by label t.
    keep = labels.reshape(-1) != IGNORE_INDEX
    want = zero_loss(logits.reshape(-1, 5))[keep].double().mean().item()
    assert q.softmax_collapse(logits, labels, shift_labels=False) == want
    flat_labels = labels.reshape(-1)
    assert q.softmax_collapse(logits.reshape(-1, 5), flat_labels) == want
    assert q.softmax_collapse(logits) == zero_loss(logits.reshape(-1, 5)).double().mean().item()
    assert torch.isnan(collapsed_fraction(logits, torch.full_like(labels, IGNORE_INDEX)))  # nothing counted
    with pytest.raises(ValueError, match="targets"):
        q.softmax_collapse(logits, labels[:, :3])
    with pytest.raises(TypeError, match="targets"):
        q.softmax_collapse(logits, labels.float())
    with pytest.raises(TypeError, match="dtype"):
        q.softmax_collapse(logits, dtype=torch.int64)


def test_probe_in_a_bf16_autocast_loop_counts_what_the_loss_counts(tmp_path):
    model, batch = tiny_gpt(dtype=torch.float32), token_batch(batch=4, length=8)
    with torch.no_grad():
        model.ln_f.weight.mul_(5)  # large logits: some positions collapse
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with dd.Monitor(model, opt, [dd.probes.SoftmaxCollapse()], loss_fn=CRIT, log_dir=tmp_path):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(batch["input_ids"], batch["attention_mask"])
            loss = CRIT(logits, batch["labels"])
            counted, every = counted_zero_loss_fraction(logits.detach(), batch["labels"])
        loss.backward()
        opt.step()
    assert logits.dtype == torch.bfloat16
    df = dd.load_records(tmp_path)
    got = df[df.metric == "collapsed_fraction"].value.item()
    assert got == counted
    assert 0 < counted < 1 and counted != every
    assert q.softmax_collapse(logits.detach(), batch["labels"]) > counted + 0.2  # what bf16 judging reported


def test_probe_takes_the_labels_a_hugging_face_model_is_called_with(tmp_path):
    pytest.importorskip("transformers")
    model, batch = hf_gpt2().eval(), token_batch(batch=4, length=8)
    with torch.no_grad():
        model.transformer.ln_f.weight.mul_(1000)  # large logits: some positions collapse
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with dd.Monitor(model, opt, [dd.probes.SoftmaxCollapse()], log_dir=tmp_path):
        out = model(**batch)
        out.loss.backward()
        opt.step()
    counted, every = counted_zero_loss_fraction(out.logits.detach(), batch["labels"])
    assert 0 < counted < 1 and counted != every
    df = dd.load_records(tmp_path)
    assert df[df.metric == "collapsed_fraction"].value.item() == counted
