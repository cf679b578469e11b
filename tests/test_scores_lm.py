"""Per-sequence scores on language-model batches against a per-sequence backward loop.

The reference evaluates each sequence as a batch of one (its own attention mask and
labels) with ``backward`` on a deep copy in eval mode: never the code under test.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import dyndiag as dd
import dyndiag.quantities as q
from dyndiag.data import IGNORE_INDEX, CausalLMLoss
from lm_models import hf_gpt2, tiny_gpt, token_batch
from snapshots import assert_same, snapshot

CRIT = CausalLMLoss()


def fwd(model, batch):
    return model(batch["input_ids"], batch["attention_mask"])


def one(batch, i):
    return {k: v[i : i + 1] for k, v in batch.items()}


def loop_gradients(model, batches, loss):
    """(N, dim) per-sequence gradients: ``loss(model, one-sequence batch)`` by backward."""
    ref = copy.deepcopy(model).eval()
    params = [p for p in ref.parameters() if p.requires_grad]
    rows = []
    for b in batches:
        for i in range(b["input_ids"].shape[0]):
            grads = torch.autograd.grad(loss(ref, one(b, i)), params)
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def loop_el2n(model, batches, logits_of):
    ref = copy.deepcopy(model).eval()
    out = []
    with torch.no_grad():
        for b in batches:
            for i in range(b["input_ids"].shape[0]):
                z, labels = logits_of(ref, one(b, i))[0, :-1], b["labels"][i, 1:]
                keep = labels != IGNORE_INDEX
                p = torch.softmax(z[keep].double(), dim=-1)
                onehot = torch.nn.functional.one_hot(labels[keep], z.shape[-1]).double()
                out.append((p - onehot).norm(dim=-1).mean())
    return torch.stack(out)


def rel(a, b):
    return float((a - b).norm() / b.norm())


def lm_batches():
    return [token_batch(batch=4, length=6, seed=0), token_batch(batch=3, length=6, seed=1)]


def coherence_of(G):
    return float(G.sum(0).pow(2).sum() / G.pow(2).sum())


def test_grand_el2n_coherence_gsnr_on_dict_batches_match_a_per_sequence_loop():
    model, batches = tiny_gpt(), lm_batches()
    G = loop_gradients(model, batches, lambda m, b: CRIT(fwd(m, b), b["labels"]))
    before = snapshot(model)
    for chunk in (1, 3, None):
        got = q.grand_scores(model, CRIT, batches, forward=fwd, chunk_size=chunk, progress=False)
        assert rel(got, G.norm(dim=1)) < 1e-12
    closure = q.grand_scores(model, None, batches, closure=lambda m, b: CRIT(fwd(m, b), b["labels"]), progress=False)
    assert rel(closure, G.norm(dim=1)) < 1e-12
    coh = q.gradient_coherence(model, CRIT, batches, forward=fwd, chunk_size=2, progress=False)
    assert coh == pytest.approx(coherence_of(G), rel=1e-12)
    snr = q.gradient_snr(model, CRIT, batches, forward=fwd, progress=False)
    var = G.var(0, unbiased=False)
    want = G.mean(0).pow(2) / var
    got = torch.cat([v.reshape(-1) for v in snr.values()])
    spread = var > 1e-20 * var.max()  # elements whose variance is not rounding noise
    assert spread.float().mean() > 0.9
    assert rel(got[spread], want[spread]) < 1e-10
    el2n = q.el2n_scores(model, batches, forward=fwd, chunk_size=2, progress=False)
    assert rel(el2n, loop_el2n(model, batches, fwd)) < 1e-13
    assert_same(before, snapshot(model))


def test_each_sequence_is_scored_under_its_own_mask():
    # Right padding under the sequence's own mask: the same as the sequence without its padding.
    model, batch = tiny_gpt(), token_batch(batch=4, length=6)
    got = q.grand_scores(model, CRIT, batch, forward=fwd, progress=False)
    el2n = q.el2n_scores(model, batch, forward=fwd, progress=False)
    for i in range(4):
        n = int(batch["attention_mask"][i].sum())
        alone = {k: v[i : i + 1, :n] for k, v in batch.items()}
        assert got[i] == pytest.approx(float(q.grand_scores(model, CRIT, alone, forward=fwd, progress=False)), rel=1e-12)
        assert el2n[i] == pytest.approx(float(q.el2n_scores(model, alone, forward=fwd, progress=False)), rel=1e-12)
    # Left padding is attended unless masked: the scores follow each sequence's mask.
    left = {k: torch.stack([v[i].roll(i) for i in range(4)]) for k, v in batch.items()}
    G = loop_gradients(model, [left], lambda m, b: CRIT(fwd(m, b), b["labels"]))
    masked = q.grand_scores(model, CRIT, left, forward=fwd, chunk_size=4, progress=False)
    assert rel(masked, G.norm(dim=1)) < 1e-12
    unmasked = q.grand_scores(model, CRIT, left, forward=lambda m, b: m(b["input_ids"]), progress=False)
    assert unmasked[0] == pytest.approx(float(masked[0]), rel=1e-12)  # sequence 0 has no padding
    assert (unmasked[1:] - masked[1:]).abs().min() > 1e-6


def test_tuple_batches_of_ids_and_labels():
    model, batch = tiny_gpt(), token_batch(batch=3, length=6, pad=False)
    data = (batch["input_ids"], batch["labels"])
    G = loop_gradients(model, [batch], lambda m, b: CRIT(m(b["input_ids"]), b["labels"]))
    assert rel(q.grand_scores(model, CRIT, data, progress=False), G.norm(dim=1)) < 1e-12
    el2n = q.el2n_scores(model, data, progress=False)
    assert rel(el2n, loop_el2n(model, [batch], lambda m, b: m(b["input_ids"]))) < 1e-13


def test_a_sequence_without_scored_tokens_is_nan_and_left_out_of_coherence():
    model, batch = tiny_gpt(), token_batch(batch=4, length=6)
    batch["labels"][2, 1:] = IGNORE_INDEX  # only its first label, which nothing predicts
    grand = q.grand_scores(model, CRIT, batch, forward=fwd, progress=False)
    el2n = q.el2n_scores(model, batch, forward=fwd, progress=False)
    assert torch.isnan(grand[2]) and torch.isnan(el2n[2])
    rest = [0, 1, 3]
    assert torch.isfinite(grand[rest]).all() and torch.isfinite(el2n[rest]).all()
    kept = {k: v[rest] for k, v in batch.items()}
    G = loop_gradients(model, [kept], lambda m, b: CRIT(fwd(m, b), b["labels"]))
    assert rel(grand[rest], G.norm(dim=1)) < 1e-12
    coh = q.gradient_coherence(model, CRIT, batch, forward=fwd, progress=False)
    assert coh == pytest.approx(coherence_of(G), rel=1e-12)


def test_hugging_face_gpt2_falls_back_to_a_loop_with_one_warning():
    pytest.importorskip("transformers")
    model, batches = hf_gpt2().train(), lm_batches()
    G = loop_gradients(model, batches, lambda m, b: m(**b).loss)
    before = snapshot(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = q.grand_scores(model, None, batches, closure=lambda m, b: m(**b).loss, chunk_size=2, progress=False)
    fallback = [w for w in caught if issubclass(w.category, RuntimeWarning) and "vmap" in str(w.message)]
    assert len(fallback) == 1 and "one example at a time" in str(fallback[0].message)
    assert torch.allclose(got, G.norm(dim=1), rtol=1e-4, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        coh = q.gradient_coherence(model, None, batches, closure=lambda m, b: m(**b).loss, progress=False)
    assert coh == pytest.approx(coherence_of(G.double()), rel=1e-4)
    # EL2N calls model(**batch) on mappings and reads .logits.
    el2n = q.el2n_scores(model, batches, progress=False)
    assert torch.allclose(el2n, loop_el2n(model, batches, lambda m, b: m(**b).logits).float(), rtol=1e-5, atol=0)
    assert_same(before, snapshot(model))


def test_what_cannot_run_even_one_sequence_alone_raises_its_own_error():
    pytest.importorskip("transformers")
    model, batch = hf_gpt2(), token_batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="scalar loss") as err:
            q.grand_scores(model, None, batch, closure=lambda m, b: m(**b).loss.reshape(1), progress=False)
    assert "vmap" not in str(err.value)
    with pytest.raises(ValueError, match="forward= needs|not with closure"):
        q.grand_scores(model, None, batch, closure=lambda m, b: m(**b).loss, forward=fwd)
    with pytest.raises(ValueError, match="mapping batch .* needs forward=") as err:
        q.grand_scores(tiny_gpt(), CRIT, batch, progress=False)
    assert "vmap" not in str(err.value)
    with pytest.raises(TypeError, match="forward="):
        q.el2n_scores(tiny_gpt(), batch, progress=False)  # model(**batch) with labels: refused, named
    with pytest.raises(ValueError, match="labels of shape"):
        q.el2n_scores(tiny_gpt(), (batch["input_ids"], batch["labels"][:, :3]), progress=False)


def test_data_scores_and_coherence_probes_on_lm_batches(tmp_path):
    model, batches = tiny_gpt(), lm_batches()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probes = [
        dd.probes.DataScores(batches, loss_fn=CRIT, forward=fwd),
        dd.probes.GradientCoherence(forward=fwd),
    ]
    G = loop_gradients(model, batches, lambda m, b: CRIT(fwd(m, b), b["labels"]))
    P = loop_gradients(model, batches[:1], lambda m, b: CRIT(fwd(m, b), b["labels"]))
    el2n = loop_el2n(model, batches, fwd)
    with dd.Monitor(model, opt, probes, loss_fn=CRIT, probe_data=batches[0], log_dir=tmp_path) as mon:
        b = batches[0]
        CRIT(fwd(model, b), b["labels"]).backward()
        opt.step()
    assert mon.step == 1
    arrays = dd.load_arrays(tmp_path, "data_scores", "grand_scores")
    assert rel(torch.as_tensor(arrays[0]), G.norm(dim=1)) < 1e-12
    assert rel(torch.as_tensor(dd.load_arrays(tmp_path, "data_scores", "el2n_scores")[0]), el2n) < 1e-13
    df = dd.load_records(tmp_path)
    coh = df[(df.probe == "gradient_coherence") & (df.metric == "coherence")].value.item()
    assert coh == pytest.approx(coherence_of(P), rel=1e-10)


def test_probes_on_a_hugging_face_model_with_its_own_loss(tmp_path):
    pytest.importorskip("transformers")
    model, batch = hf_gpt2().train(), token_batch(batch=4, length=6)
    G = loop_gradients(model, [batch], lambda m, b: m(**b).loss)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    probes = [dd.probes.DataScores(batch), dd.probes.GradientCoherence()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the per-example loop's notice
        with dd.Monitor(model, opt, probes, closure=lambda m, b: m(**b).loss, probe_data=batch, log_dir=tmp_path):
            model(**batch).loss.backward()
            opt.step()
    grand = torch.as_tensor(dd.load_arrays(tmp_path, "data_scores", "grand_scores")[0])
    assert torch.allclose(grand, G.norm(dim=1).double(), rtol=1e-4, atol=0)
    df = dd.load_records(tmp_path)
    coh = df[(df.probe == "gradient_coherence") & (df.metric == "coherence")].value.item()
    assert coh == pytest.approx(coherence_of(G.double()), rel=1e-4)
