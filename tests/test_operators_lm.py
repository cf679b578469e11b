"""Operators on causal-LM batches (token-weighted), the closed-form GGN, micro-batching."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dyndiag as dd
from dyndiag.curvature.loss_hessian import loss_hessian
from dyndiag.data import IGNORE_INDEX, CausalLMLoss, loss_count, split_batch
from dyndiag.quantities.gradients import mean_gradient
from exact import exact_ggn, exact_hessian
from lm_models import tiny_gpt, token_batch
from models import batchnorm_mlp, classification_data, image_data, small_cnn

LM = CausalLMLoss()


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def lm_batches():
    """Two dict batches whose numbers of non-ignored tokens differ from their sizes'
    ratio: token-weighting and sample-weighting give different operators."""
    first = token_batch(batch=3, length=6, seed=0)  # 0, 1, 2 padding tokens
    second = token_batch(batch=2, length=6, seed=1, pad=False)
    second["labels"][0, 2:] = IGNORE_INDEX  # a prompt-like prefix loss: only two targets
    return [first, second]


def forward(model, batch):
    return model(batch["input_ids"], batch["attention_mask"])


def closure(model, batch):
    return LM(forward(model, batch), batch["labels"])


def pairs(batches):
    """The same batches as (keyword inputs, labels) for tests/exact.py."""
    return [({"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}, b["labels"]) for b in batches]


@pytest.fixture(scope="module")
def gpt():
    return tiny_gpt(width=4, heads=2, layers=1)


def test_hessian_of_lm_batches_is_the_token_weighted_mean(gpt):
    batches = lm_batches()
    H = dd.HessianOperator(gpt, closure=closure, data=batches).to_dense()
    exact = exact_hessian(gpt, LM, pairs(batches))
    assert rel(H, exact) < 1e-10
    # Sample-weighting would be another operator: the test can tell them apart.
    by_samples = dd.HessianOperator(gpt, closure=closure, data=batches, batch_size_fn=lambda b: len(b["labels"]))
    assert rel(by_samples.to_dense(), exact) > 1e-3


def test_ggn_of_lm_batches_is_the_token_weighted_mean(gpt):
    batches = lm_batches()
    G = dd.GGNOperator(gpt, LM, batches, forward=forward).to_dense()
    assert rel(G, exact_ggn(gpt, LM, pairs(batches))) < 1e-10


def test_tuple_lm_batches_of_plain_modules(gpt):
    """(input_ids, labels) batches with CausalLMLoss weigh batches by loss_fn.count: the
    operators equal those of the dict batches (weighted by their labels) on the same model."""
    batches = lm_batches()
    tuples = [(b["input_ids"], b["labels"]) for b in batches]
    no_mask = lambda model, batch: LM(model(batch["input_ids"]), batch["labels"])  # noqa: E731
    H = dd.HessianOperator(gpt, closure=no_mask, data=batches).to_dense()
    assert rel(dd.HessianOperator(gpt, LM, tuples).to_dense(), H) < 1e-10
    G = dd.GGNOperator(gpt, LM, batches, forward=lambda model, batch: model(batch["input_ids"])).to_dense()
    assert rel(dd.GGNOperator(gpt, LM, tuples).to_dense(), G) < 1e-10


def test_loss_and_mean_gradient_are_token_weighted(gpt):
    batches = lm_batches()
    total = sum(CausalLMLoss(reduction="sum")(forward(gpt, b), b["labels"]) for b in batches)
    mean = total / sum(LM.count(b["labels"]) for b in batches)
    H = dd.HessianOperator(gpt, closure=closure, data=batches)
    assert H.loss() == pytest.approx(mean.item(), rel=1e-12)
    expected = torch.cat([g.reshape(-1) for g in torch.autograd.grad(mean, list(gpt.parameters()))])
    assert rel(mean_gradient(gpt, None, batches, closure=closure), expected) < 1e-12


class Generic(nn.Module):
    """The criterion behind a type the closed forms do not know: the generic path."""

    def __init__(self, loss_fn) -> None:
        super().__init__()
        self.loss_fn = loss_fn
        self.reduction = loss_fn.reduction

    def forward(self, outputs, targets):
        return self.loss_fn(outputs, targets)

    def count(self, targets):  # the same batch weights as the wrapped criterion
        return loss_count((None, targets), self.loss_fn)


def ignored(y):
    y = y.clone()
    y[::3] = IGNORE_INDEX
    return y


def closed_form_cases():
    x, y = classification_data(n=12)
    xi, yi = image_data(n=6)
    probs = torch.softmax(torch.randn(12, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64), 1)
    seg = torch.randint(0, 3, (6, 3), generator=torch.Generator().manual_seed(2))
    seg[0, 1] = IGNORE_INDEX
    mlp = lambda: nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).double()  # noqa: E731
    cases = {}
    for reduction in ("mean", "sum"):
        cases[f"ce-{reduction}"] = (mlp, nn.CrossEntropyLoss(reduction=reduction), (x, ignored(y)))
        cases[f"ce-smoothing-{reduction}"] = (
            mlp, nn.CrossEntropyLoss(reduction=reduction, label_smoothing=0.2), (x, ignored(y)))
        cases[f"ce-probabilities-{reduction}"] = (mlp, nn.CrossEntropyLoss(reduction=reduction), (x, probs))
        cases[f"ce-spatial-{reduction}"] = (
            lambda: nn.Sequential(nn.Conv2d(1, 3, (4, 6)), nn.Flatten(2)).double(),
            nn.CrossEntropyLoss(reduction=reduction), (xi, seg))
        cases[f"mse-{reduction}"] = (mlp, nn.MSELoss(reduction=reduction), (x, probs))
        ids = token_batch(batch=3, length=6, seed=0)
        cases[f"causal-lm-{reduction}"] = (
            lambda: tiny_gpt(width=4, heads=2), CausalLMLoss(reduction=reduction), (ids["input_ids"], ids["labels"]))
    return cases


@pytest.mark.parametrize("name", list(closed_form_cases()))
def test_closed_form_ggn_equals_generic_and_exact(name):
    make, loss_fn, batch = closed_form_cases()[name]
    torch.manual_seed(0)
    model = make()
    assert loss_hessian(loss_fn, model(batch[0]), batch[1]) is not None
    assert loss_hessian(Generic(loss_fn), model(batch[0]), batch[1]) is None
    G = dd.GGNOperator(model, loss_fn, batch).to_dense()
    assert rel(G, dd.GGNOperator(model, Generic(loss_fn), batch).to_dense()) < 1e-10
    assert rel(G, exact_ggn(model, loss_fn, [batch])) < 1e-10
    # One column at a time (matvec) and vmapped blocks agree.
    v = torch.randn(G.shape[0], dtype=torch.float64)
    assert rel(dd.GGNOperator(model, loss_fn, batch, backend="vmap") @ v, G @ v) < 1e-10


def test_class_weights_take_the_generic_path():
    x, y = classification_data(n=12)
    loss_fn = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5, 1.0], dtype=torch.float64))
    model = nn.Sequential(nn.Linear(6, 4)).double()
    assert loss_hessian(loss_fn, model(x), y) is None
    assert rel(dd.GGNOperator(model, loss_fn, (x, y)).to_dense(), exact_ggn(model, loss_fn, [(x, y)])) < 1e-10


class _NoForwardAD(torch.autograd.Function):
    """tanh with a backward and no forward-mode derivative."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class NoForwardAD(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 5), nn.Linear(5, 4)

    def forward(self, x):
        return self.b(_NoForwardAD.apply(self.a(x)))


def test_ggn_falls_back_to_reverse_mode_without_forward_ad():
    x, y = classification_data(n=12)
    torch.manual_seed(0)
    model = NoForwardAD().double()
    CE = nn.CrossEntropyLoss()
    with pytest.warns(RuntimeWarning, match="forward-mode"):
        G = dd.GGNOperator(model, CE, (x, y), backend="loop").to_dense()
    assert rel(G, exact_ggn(model, CE, [(x, y)])) < 1e-10


# -- micro-batching ------------------------------------------------------------
@pytest.mark.parametrize("cls", [dd.HessianOperator, dd.GGNOperator])
def test_micro_batches_give_the_same_operator_on_an_eval_batchnorm_cnn(cls):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(8, 3)
    ).double()
    with torch.no_grad():
        model.train()
        model(torch.randn(16, 1, 6, 6, dtype=torch.float64))  # non-trivial running statistics
    model.eval()
    x, y = image_data(n=10)
    CE = nn.CrossEntropyLoss()
    whole = cls(model, CE, (x, y)).to_dense()
    micro = cls(model, CE, [(x[:7], y[:7]), (x[7:], y[7:])], micro_batch_size=3)
    assert rel(micro.to_dense(), whole) < 1e-10
    assert micro.loss() == pytest.approx(cls(model, CE, (x, y)).loss(), rel=1e-12)


@pytest.mark.parametrize("cls", [dd.HessianOperator, dd.GGNOperator])
def test_micro_batches_of_padded_lm_batches(gpt, cls):
    batch = token_batch(batch=4, length=6, seed=3)  # 0, 1, 2, 3 padding tokens
    kwargs = {"closure": closure} if cls is dd.HessianOperator else {"loss_fn": LM, "forward": forward}
    whole = cls(gpt, data=batch, **kwargs).to_dense()
    micro = cls(gpt, data=batch, micro_batch_size=3, **kwargs)
    assert not micro.cache_graph  # two micro-batches: no single graph to keep
    assert rel(micro.to_dense(), whole) < 1e-10
    assert cls(gpt, data=batch, micro_batch_size=4, **kwargs).cache_graph  # fits in one


def test_micro_batching_refuses_train_mode_batchnorm():
    x, y = classification_data(n=12)
    with pytest.raises(ValueError, match="micro_batch_size.*BatchNorm in train mode"):
        dd.HessianOperator(batchnorm_mlp(train=True), nn.CrossEntropyLoss(), (x, y), micro_batch_size=4)
    model = batchnorm_mlp(train=False)
    H = dd.GGNOperator(model, nn.CrossEntropyLoss(), (x, y), micro_batch_size=4)
    model.train()  # the operator follows the model's mode: the product refuses too
    with pytest.raises(ValueError, match="BatchNorm in train mode"):
        H @ torch.ones(H.dim, dtype=torch.float64)
    assert model.training


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_micro_batch_size_is_validated(bad):
    x, y = classification_data(n=12)
    with pytest.raises(ValueError, match="micro_batch_size"):
        dd.HessianOperator(small_cnn(), nn.CrossEntropyLoss(), (x, y), micro_batch_size=bad)


def test_cache_graph_needs_one_micro_batch():
    x, y = classification_data(n=12)
    model = nn.Sequential(nn.Linear(6, 4)).double()
    with pytest.raises(ValueError, match="cache_graph=True"):
        dd.HessianOperator(model, nn.CrossEntropyLoss(), (x, y), micro_batch_size=5, cache_graph=True)


def test_split_batch_cuts_every_tensor_entry():
    batch = token_batch(batch=5, length=4)
    parts = split_batch(batch, 2)
    assert [len(p["input_ids"]) for p in parts] == [2, 2, 1]
    for key in batch:
        assert torch.equal(torch.cat([p[key] for p in parts]), batch[key])
    with pytest.raises(ValueError, match="dim 0"):
        split_batch((torch.zeros(5, 2), torch.zeros(4)), 2)


def test_hugging_face_loss_closure_is_token_weighted():
    """``model(**batch).loss`` of a Hugging Face causal LM over two padded batches: the
    operator equals the one of CausalLMLoss on its logits (token-weighted)."""
    pytest.importorskip("transformers")
    from lm_models import hf_gpt2

    model = hf_gpt2(width=4, heads=2, layers=1).double()
    batches = lm_batches()
    logits = lambda m, b: m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits  # noqa: E731
    H = dd.HessianOperator(model, closure=lambda m, b: m(**b).loss, data=batches)
    reference = dd.HessianOperator(model, closure=lambda m, b: LM(logits(m, b), b["labels"]), data=batches)
    V = torch.randn(H.dim, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    # Hugging Face computes its loss in float32 (it casts the logits), hence the tolerance;
    # sample-weighting instead of token-weighting would be off by more than 1e-3.
    assert rel(H @ V, reference @ V) < 1e-5
    G = dd.GGNOperator(model, LM, batches, forward=logits)
    assert rel(G @ V, dd.GGNOperator(model, Generic(LM), batches, forward=logits) @ V) < 1e-10


@pytest.mark.parametrize("cls, exact", [(dd.HessianOperator, exact_hessian), (dd.GGNOperator, exact_ggn)])
def test_cross_entropy_batches_weigh_the_targets_they_do_not_ignore(cls, exact):
    """nn.CrossEntropyLoss with ignored targets: two batches combine as their concatenation."""
    x, y = classification_data(n=12)
    y = y.clone()
    y[:5] = IGNORE_INDEX  # the first batch keeps 1 of its 6 targets, the second all 6
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).double()
    CE = nn.CrossEntropyLoss()
    op = cls(model, CE, [(x[:6], y[:6]), (x[6:], y[6:])])
    assert rel(op.to_dense(), exact(model, CE, [(x, y)])) < 1e-10
