"""dyndiag.quantities against independent computations (float64, small models).

References are plain loops over examples with ``backward()`` on deep copies, explicit
Jacobians (``torch.autograd.functional.jacobian``), dense Hessians from tests/exact.py
and a hand-rolled Adam recursion — never the code under test.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import dyndiag as dd
import dyndiag.quantities as q
from dyndiag.curvature.preconditioned import PreconditionedOperator
from exact import exact_hessian
from snapshots import assert_same, snapshot
from models import KeywordModel, TiedFrozen, batchnorm_mlp, classification_data, dropout_mlp, image_data, small_cnn, tanh_mlp

CE = nn.CrossEntropyLoss()
F64 = torch.float64


def rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


# -- independent per-example references ------------------------------------------------
def loop_gradients(model, batches, params_of=None):
    """(N, dim) per-example gradients by a plain backward loop, every module in eval mode."""
    ref = copy.deepcopy(model).eval()
    chosen = params_of(ref) if params_of else [p for p in ref.parameters() if p.requires_grad]
    rows = []
    for x, y in batches:
        for i in range(x.shape[0]):
            grads = torch.autograd.grad(CE(ref(x[i : i + 1]), y[i : i + 1]), chosen)
            rows.append(flat(grads))
    return torch.stack(rows)


def unequal_batches(n=17, seed=0):
    x, y = classification_data(n=n, seed=seed)
    return [(x[:7], y[:7]), (x[7:12], y[7:12]), (x[12:], y[12:])], (x, y)


MODELS = {
    "tanh_mlp": lambda: tanh_mlp(),
    "batchnorm_train": lambda: batchnorm_mlp(train=True),
    "dropout_train": lambda: dropout_mlp(),
}


# -- GraNd -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
def test_grand_matches_a_per_example_backward_loop(name):
    model = MODELS[name]()
    batches, _ = unequal_batches()
    want = loop_gradients(model, batches).norm(dim=1)
    before = snapshot(model)
    scores = [q.grand_scores(model, CE, batches, chunk_size=c, progress=False) for c in (1, 3, 64)]
    assert_same(before, snapshot(model))
    assert model.training  # train mode kept, though examples were evaluated in eval mode
    for s in scores:
        assert s.shape == (17,) and s.dtype == F64
        assert rel(s, want) < 1e-12  # order preserved, chunking irrelevant
    assert torch.allclose(scores[0], scores[1], rtol=1e-13, atol=0) and torch.allclose(scores[0], scores[2], rtol=1e-13, atol=0)


def test_grand_on_a_cnn_and_with_a_parameter_subset():
    model = small_cnn()
    x, y = image_data(n=9)
    last = lambda m: [m[4].weight, m[4].bias]
    want = loop_gradients(model, [(x, y)], params_of=last).norm(dim=1)
    got = q.grand_scores(model, CE, (x, y), params=last(model), chunk_size=4, progress=False)
    assert rel(got, want) < 1e-12


def test_grand_last_layer_identity_with_el2n():
    """papers.md: ||grad_(W,b) l|| = EL2N * sqrt(||h||^2 + 1) for the last linear layer."""
    model = tanh_mlp()
    x, y = classification_data(n=20)
    grand = q.grand_scores(model, CE, (x, y), params=[model[2].weight, model[2].bias], progress=False)
    el2n = q.el2n_scores(model, (x, y), progress=False)
    with torch.no_grad():
        h = torch.tanh(model[0](x))
        p = torch.softmax(model(x), dim=1)
    manual_el2n = (p - nn.functional.one_hot(y, 4).double()).norm(dim=1)
    assert rel(el2n, manual_el2n) < 1e-14
    assert rel(grand, el2n * torch.sqrt(h.pow(2).sum(1) + 1)) < 1e-12
    # ...and it does not hold for the full-parameter GraNd.
    full = q.grand_scores(model, CE, (x, y), progress=False)
    assert rel(full, el2n * torch.sqrt(h.pow(2).sum(1) + 1)) > 1e-3


def test_grand_with_tied_and_frozen_parameters():
    model = TiedFrozen(d=6)
    x, y = classification_data(n=8)
    y = y % 3
    want = loop_gradients(model, [(x, y)]).norm(dim=1)
    assert rel(q.grand_scores(model, CE, (x, y), progress=False), want) < 1e-12
    # A frozen parameter may be named explicitly.
    frozen = lambda m: [m.frozen.weight]
    ref = copy.deepcopy(model).eval()
    ref.frozen.weight.requires_grad_(True)
    want = loop_gradients(ref, [(x, y)], params_of=frozen).norm(dim=1)
    assert rel(q.grand_scores(model, CE, (x, y), params=frozen(model), progress=False), want) < 1e-12
    assert not model.frozen.weight.requires_grad


def test_vectorised_one_forward_per_chunk_not_per_example():
    model = tanh_mlp()
    calls = []
    model.register_forward_hook(lambda m, i, o: calls.append(1))
    batches, _ = unequal_batches()  # batches of 7, 5, 5
    q.grand_scores(model, CE, batches, chunk_size=4, progress=False)
    assert len(calls) == 2 + 2 + 2  # ceil(7/4) + ceil(5/4) + ceil(5/4)


def test_grand_with_closure_and_dict_batches():
    model = KeywordModel()
    x, y = classification_data(n=10)
    batches = [{"features": x[:6], "labels": y[:6]}, {"features": x[6:], "labels": y[6:]}]
    got = q.grand_scores(
        model, None, batches, closure=lambda m, b: CE(m(features=b["features"]), b["labels"]), progress=False
    )
    assert rel(got, loop_gradients(model.net, [(x, y)]).norm(dim=1)) < 1e-12


def test_indices_give_dataset_order_and_drop_padding():
    model = tanh_mlp()
    x, y = classification_data(n=9)
    want = q.grand_scores(model, CE, (x, y), progress=False)
    # A DistributedSampler-like order: interleaved, padded by repeating the first indices.
    order = torch.tensor([0, 2, 4, 6, 8, 1, 3, 5, 7, 0])
    got = q.grand_scores(model, CE, (x[order], y[order]), indices=order, progress=False)
    assert torch.allclose(got, want, rtol=1e-13, atol=0)
    el2n = q.el2n_scores(model, (x[order], y[order]), indices=order.tolist(), progress=False)
    assert torch.allclose(el2n, q.el2n_scores(model, (x, y), progress=False), rtol=1e-13, atol=0)
    with pytest.raises(ValueError, match="indices"):
        q.grand_scores(model, CE, (x, y), indices=[0, 1], progress=False)
    with pytest.raises(TypeError, match="indices"):
        q.grand_scores(model, CE, (x, y), indices=torch.zeros(9), progress=False)


# -- EL2N ------------------------------------------------------------------------------
def test_el2n_evaluates_in_eval_mode_and_accepts_soft_targets_and_forward():
    model = nn.Sequential(batchnorm_mlp(train=True), nn.Dropout(0.4)).train()
    batches, (x, y) = unequal_batches()
    with torch.no_grad():
        p = torch.softmax(copy.deepcopy(model).eval()(x), dim=1)
    want = (p - nn.functional.one_hot(y, 4).double()).norm(dim=1)
    before = snapshot(model)
    got = q.el2n_scores(model, batches, chunk_size=3, progress=False)
    assert_same(before, snapshot(model))
    assert rel(got, want) < 1e-13
    soft = torch.full((17, 4), 0.25, dtype=F64)
    assert rel(q.el2n_scores(model, (x, soft), progress=False), (p - soft).norm(dim=1)) < 1e-13
    dict_batches = [{"x": x[:9], "labels": y[:9]}, {"x": x[9:], "labels": y[9:]}]
    got = q.el2n_scores(model, dict_batches, forward=lambda m, b: m(b["x"]), progress=False)
    assert rel(got, want) < 1e-13


# -- coherence and GSNR -------------------------------------------------------------------
def test_coherence_matches_explicit_per_example_gradients():
    model = batchnorm_mlp(train=True)
    batches, _ = unequal_batches()
    G = loop_gradients(model, batches)
    want = float(G.sum(0).pow(2).sum() / G.pow(2).sum())
    got = q.gradient_coherence(model, CE, batches, chunk_size=4, progress=False)
    assert abs(got - want) < 1e-11 * want
    assert 0 < got < 17


def test_coherence_of_identical_examples_is_m():
    model = tanh_mlp()
    x, y = classification_data(n=1)
    m = 13
    got = q.gradient_coherence(model, CE, (x.expand(m, -1).clone(), y.expand(m).clone()), chunk_size=5, progress=False)
    assert abs(got - m) < 1e-10


def test_coherence_of_cancelling_gradients_is_zero():
    # Linear model, MSE: g_i = 2 (w.x - t_i) x; residuals +1 and -1 cancel exactly.
    torch.manual_seed(0)
    model = nn.Linear(4, 1, bias=False).double()
    x = torch.randn(1, 4, dtype=F64).expand(2, -1).clone()
    with torch.no_grad():
        out = model(x)
    t = out + torch.tensor([[1.0], [-1.0]], dtype=F64)
    got = q.gradient_coherence(model, nn.MSELoss(), (x, t), progress=False)
    assert abs(got) < 1e-14
    orthogonal = q.gradient_coherence(model, nn.MSELoss(), (torch.eye(4, dtype=F64), torch.ones(4, 1, dtype=F64)), progress=False)
    # g_i = 2 (w_i - 1) e_i: orthogonal gradients have coherence exactly 1.
    assert abs(orthogonal - 1) < 1e-13


def test_gsnr_matches_explicit_mean_and_variance():
    model = tanh_mlp()
    batches, _ = unequal_batches()
    G = loop_gradients(model, batches)
    mean, var = G.mean(0), G.var(0, unbiased=False)
    want = mean.pow(2) / var
    got = q.gradient_snr(model, CE, batches, chunk_size=3, progress=False)
    names = [n for n, _ in model.named_parameters()]
    assert list(got) == names
    assert all(got[n].shape == p.shape for n, p in model.named_parameters())
    assert rel(flat(got.values()), want) < 1e-10
    summary = q.gradient_snr(model, CE, batches, reduction="mean", progress=False)
    assert list(summary) == names + [""]
    assert abs(float(summary[""]) - float(want.mean())) < 1e-10 * float(want.mean())
    assert abs(float(summary["2.bias"]) - float(want[-4:].mean())) < 1e-10 * float(want[-4:].mean())


def test_coherence_and_snr_from_one_pass_equal_the_two_functions():
    from dyndiag.quantities.per_example import coherence_and_snr

    model = batchnorm_mlp(train=True)
    batches, _ = unequal_batches()
    coherence, snr = coherence_and_snr(model, CE, batches, reduction="mean", chunk_size=4, progress=False)
    assert abs(coherence - q.gradient_coherence(model, CE, batches, progress=False)) < 1e-12 * coherence
    alone = q.gradient_snr(model, CE, batches, reduction="mean", progress=False)
    assert list(snr) == list(alone)
    assert all(abs(float(snr[k]) - float(alone[k])) <= 1e-12 * abs(float(alone[k])) for k in alone)


def test_gsnr_of_identical_examples_is_huge_and_needs_two_examples():
    model = tanh_mlp()
    x, y = classification_data(n=1)
    same = q.gradient_snr(model, CE, (x.expand(3, -1).clone(), y.expand(3).clone()), progress=False)
    g = flat(loop_gradients(model, [(x, y)]))
    snr = flat(same.values())
    assert (snr[g != 0] > 1e20).all()  # zero variance up to rounding
    with pytest.raises(ValueError, match="at least 2 examples"):
        q.gradient_snr(model, CE, (x, y), progress=False)
    with pytest.raises(ValueError, match="reduction"):
        q.gradient_snr(model, CE, (x, y), reduction="sum")


# -- layer rotation -------------------------------------------------------------------
def test_layer_rotation_reference_forms_agree_and_match_by_hand():
    model, ref = tanh_mlp(seed=0), tanh_mlp(seed=1)
    by_hand = {
        n: 1 - float(flat([p]).detach() @ flat([r]).detach() / (p.detach().norm() * r.detach().norm()))
        for (n, p), r in zip(model.named_parameters(), ref.parameters())
    }
    forms = [ref, ref.state_dict(), [p.detach().clone() for p in ref.parameters()]]
    results = [q.layer_rotation(model, f) for f in forms]
    for res in results:
        assert list(res) == list(by_hand)
        assert all(abs(res[n] - by_hand[n]) < 1e-14 for n in by_hand)
    before = [p.detach().clone() for p in model.parameters()]
    assert q.layer_rotation(model, model) == {n: 0.0 for n in by_hand}
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # the reference is only read


@pytest.mark.parametrize("dtype,angle,tol", [(F64, 0.7, 1e-12), (F64, 1e-6, 1e-8), (torch.float32, 1e-3, 1e-2)])
def test_layer_rotation_of_a_rotated_and_rescaled_copy(dtype, angle, tol):
    model = tanh_mlp().to(dtype)
    g = torch.Generator().manual_seed(3)
    rotated = {}
    for n, p in model.named_parameters():
        w = p.detach().double().reshape(-1)
        u = torch.randn(w.shape, generator=g, dtype=F64)
        u = u - (u @ w) / (w @ w) * w  # orthogonal to w
        u = u / u.norm() * w.norm()
        rotated[n] = (3.0 * (math.cos(angle) * w + math.sin(angle) * u)).reshape(p.shape).to(dtype)
    res = q.layer_rotation(model, rotated)
    want = 2 * math.sin(angle / 2) ** 2  # = 1 - cos(angle), without its cancellation
    assert all(abs(v - want) <= tol * want for v in res.values()), res


@pytest.mark.parametrize("n", [10, 1000, 100_000])
def test_rotation_meter_in_float32_stays_within_its_documented_floor_of_float64(n):
    from dyndiag.quantities.rotation import RotationMeter

    g = torch.Generator().manual_seed(n)
    for angle in (1e-7, 1e-5, 1e-3, 1e-1, 2.0):
        for scale in (1.0, 0.5, 3.0):
            w0 = torch.randn(n, generator=g, dtype=F64) * 0.05 + 0.01
            u = torch.randn(n, generator=g, dtype=F64)
            u = u - (u @ w0) / (w0 @ w0) * w0
            w = scale * (math.cos(angle) * w0 + math.sin(angle) * u / u.norm() * w0.norm())
            w32, w0_32 = w.float(), w0.float()  # the same float32 numbers, judged in both dtypes
            (exact,) = RotationMeter([w32.double()], [w0_32.double()], dtype=F64)()
            (got,) = RotationMeter([w32], [w0_32])()
            assert got.dtype == torch.float32
            r = float(exact)
            assert abs(float(got) - r) <= 1e-12 + 2e-7 * math.sqrt(r) + 1e-5 * r, (angle, scale, float(got), r)


def test_layer_rotation_bad_references():
    model = tanh_mlp()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="2.bias"):
        q.layer_rotation(model, {k: v for k, v in sd.items() if k != "2.bias"})
    with pytest.raises(ValueError, match="0.weight"):
        q.layer_rotation(model, {**sd, "0.weight": torch.zeros(3, 3, dtype=F64)})
    with pytest.raises(ValueError, match="reference"):
        q.layer_rotation(model, list(model.parameters())[:2])
    with pytest.raises(TypeError, match="reference"):
        q.layer_rotation(model, 3)
    with pytest.raises(TypeError, match="model"):
        q.layer_rotation("model", model)
    zero = {**sd, "2.bias": torch.zeros(4, dtype=F64)}
    assert q.layer_rotation(model, zero)["2.bias"] == 1.0  # cosine similarity 0 with a zero vector
    with torch.no_grad():
        model[2].bias.zero_()
    assert q.layer_rotation(model, zero)["2.bias"] == 0.0  # unmoved zeros
    assert q.layer_rotation(model, sd)["2.bias"] == 1.0


# -- Softmax Collapse ------------------------------------------------------------------
def test_softmax_collapse_depends_on_the_dtype_and_is_never_upcast():
    z = torch.tensor([[20.0, 0.0, 0.0, 0.0], [0.1, 0.2, 0.3, 0.0]])
    assert q.softmax_collapse(z.float()) == 0.5  # exp(-20) vanishes next to 1 in float32 ...
    assert q.softmax_collapse(z.double()) == 0.0  # ... but not in float64
    # Each gap collapses in its own dtype and would not after an upcast to float32.
    for dtype, gap in ((torch.float16, 9.0), (torch.bfloat16, 6.0)):
        row = torch.tensor([[gap, 0.0]], dtype=dtype)
        assert q.softmax_collapse(row) == 1.0, dtype
        assert q.softmax_collapse(row.float()) == 0.0, dtype
    small = torch.randn(64, 10, generator=torch.Generator().manual_seed(0))
    for dtype in (torch.float16, torch.bfloat16, torch.float32, F64):
        assert q.softmax_collapse(small.to(dtype)) == 0.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, F64])
def test_collapsed_rows_are_exactly_the_rows_with_zero_cross_entropy(dtype):
    gaps = torch.linspace(0, 45, 181)
    logits = torch.stack([gaps, torch.zeros_like(gaps), -gaps / 3], dim=1).to(dtype)
    ce = nn.functional.cross_entropy(logits, torch.zeros(181, dtype=torch.long), reduction="none")
    collapsed = torch.tensor([q.softmax_collapse(logits[i : i + 1]) == 1.0 for i in range(181)])
    assert torch.equal(collapsed, ce == 0)
    assert 0 < collapsed.sum() < 181 or dtype == F64
    assert q.softmax_collapse(logits) == pytest.approx(collapsed.double().mean().item(), abs=0)


def test_softmax_collapse_bad_input():
    with pytest.raises(TypeError, match="logits"):
        q.softmax_collapse([[1.0, 2.0]])
    with pytest.raises(ValueError, match="logits"):
        q.softmax_collapse(torch.zeros(3))
    with pytest.raises(TypeError, match="logits"):
        q.softmax_collapse(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="logits"):
        q.softmax_collapse(torch.zeros(0, 3))


# -- gradient / weight cosine ------------------------------------------------------------
def test_gradient_weight_cosine_matches_autograd_and_detects_pure_scaling():
    model = nn.Sequential(batchnorm_mlp(train=True), nn.Dropout(0.3)).train()
    batches, (x, y) = unequal_batches()
    ref = copy.deepcopy(model)
    ref[1].eval()  # dropout off; BatchNorm keeps train mode (batch statistics, per batch)
    params = list(ref.parameters())
    loss = sum(len(xb) * CE(ref(xb), yb) for xb, yb in batches) / 17
    g = flat(torch.autograd.grad(loss, params))
    theta = flat([p.detach() for p in params])
    want = float(g @ theta / (g.norm() * theta.norm()))
    before = snapshot(model)
    assert abs(q.gradient_weight_cosine(model, CE, batches) - want) < 1e-12
    assert_same(before, snapshot(model))
    # A correctly classified example whose loss falls by scaling W: -g points along W.
    lin = nn.Linear(2, 2, bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
    cos = q.gradient_weight_cosine(lin, CE, (torch.tensor([[1.0, 0.0]], dtype=F64), torch.tensor([0])))
    assert abs(cos + 1) < 1e-14


# -- directional and preconditioned sharpness ---------------------------------------------
def _problem():
    model = tanh_mlp()
    batch = classification_data()
    return model, batch


def test_directional_sharpness_is_the_rayleigh_quotient():
    model, batch = _problem()
    H = exact_hessian(model, CE, [batch])
    op = dd.HessianOperator(model, CE, batch)
    d = torch.randn(op.dim, dtype=F64, generator=torch.Generator().manual_seed(2))
    want = float(d @ H @ d / (d @ d))
    assert abs(q.directional_sharpness(op, d) - want) < 1e-12 * abs(want)
    assert abs(q.directional_sharpness(op, 1e-9 * d) - want) < 1e-12 * abs(want)
    e = torch.linalg.eigh(H).eigenvectors[:, -1]
    assert abs(q.directional_sharpness(op, e) - float(torch.linalg.eigvalsh(H)[-1])) < 1e-10
    with pytest.raises(ValueError, match="direction"):
        q.directional_sharpness(op, torch.zeros(op.dim, dtype=F64))
    with pytest.raises(ValueError, match="direction"):
        q.directional_sharpness(op, d[:-1])
    with pytest.raises(TypeError, match="direction"):
        q.directional_sharpness(op, d.float())
    with pytest.raises(TypeError, match="op"):
        q.directional_sharpness("H", d)


def _adam_run(model, batch, opt, steps, coupled_wd=0.0):
    """Take ``steps`` optimizer steps, hand-rolling v, max v and t from the gradients seen."""
    b2 = opt.param_groups[0]["betas"][1]
    params = [p for p in model.parameters()]
    v = torch.zeros(sum(p.numel() for p in params), dtype=F64)
    vmax = torch.zeros_like(v)
    for _ in range(steps):
        opt.zero_grad()
        CE(model(batch[0]), batch[1]).backward()
        g = flat([p.grad for p in params]) + coupled_wd * flat([p.detach() for p in params])
        v = b2 * v + (1 - b2) * g * g
        vmax = torch.maximum(vmax, v)
        opt.step()
    opt.zero_grad(set_to_none=True)
    return v, vmax, steps


def _dense_preconditioned_top(H, v, t, b1, b2, eps, wd=0.0, block=None):
    P = (1 - b1**t) * (torch.sqrt(v / (1 - b2**t)) + eps)
    M = (H + wd * torch.eye(len(H), dtype=F64)) / torch.sqrt(P)[:, None] / torch.sqrt(P)[None, :]
    if block is not None:
        M = M[block][:, block]
    return float(torch.linalg.eigvalsh(M)[-1])


CONFIGS = {
    "adam": dict(cls=torch.optim.Adam, kw={}, wd=0.0, ams=False),
    "amsgrad": dict(cls=torch.optim.Adam, kw=dict(amsgrad=True), wd=0.0, ams=True),
    "adam_coupled_wd": dict(cls=torch.optim.Adam, kw=dict(weight_decay=0.3), wd=0.3, ams=False),
    "adamw": dict(cls=torch.optim.AdamW, kw=dict(weight_decay=0.3), wd=0.0, ams=False),
    "adam_decoupled_flag": dict(cls=torch.optim.Adam, kw=dict(weight_decay=0.3, decoupled_weight_decay=True), wd=0.0, ams=False),
    "amsgrad_adamw": dict(cls=torch.optim.AdamW, kw=dict(amsgrad=True, weight_decay=0.1), wd=0.0, ams=True),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_preconditioned_sharpness_after_steps_matches_a_hand_rolled_adam(name):
    cfg = CONFIGS[name]
    model, batch = _problem()
    b1, b2, eps = 0.8, 0.95, 1e-6
    opt = cfg["cls"](model.parameters(), lr=0.05, betas=(b1, b2), eps=eps, **cfg["kw"])
    v, vmax, t = _adam_run(model, batch, opt, steps=3, coupled_wd=cfg["wd"])
    H = exact_hessian(model, CE, [batch])
    want = _dense_preconditioned_top(H, vmax if cfg["ams"] else v, t, b1, b2, eps, wd=cfg["wd"])
    op = dd.HessianOperator(model, CE, batch)
    before = snapshot(model, opt)
    got = q.preconditioned_sharpness(op, opt, tol=1e-12)
    assert_same(before, snapshot(model, opt))
    assert abs(got - want) < 1e-8 * abs(want), (got, want)

    # With the current gradient: the preconditioner of the coming step (t + 1, updated v).
    g = flat(torch.autograd.grad(CE(model(batch[0]), batch[1]), list(model.parameters())))
    g_eff = g + cfg["wd"] * flat([p.detach() for p in model.parameters()])
    v_next = b2 * v + (1 - b2) * g_eff**2
    if cfg["ams"]:
        v_next = torch.maximum(vmax, v_next)
    want_next = _dense_preconditioned_top(H, v_next, t + 1, b1, b2, eps, wd=cfg["wd"])
    got_next = q.preconditioned_sharpness(op, opt, gradient=g, tol=1e-12)
    assert abs(got_next - want_next) < 1e-8 * abs(want_next)
    # ...which is what the optimizer's state says after that step (at the old H).
    for p, gp in zip(model.parameters(), torch.split(g, [p.numel() for p in model.parameters()])):
        p.grad = gp.reshape(p.shape).clone()
    theta = [p.detach().clone() for p in model.parameters()]
    opt.step()
    op_old = dd.HessianOperator(model, CE, batch, at=theta)
    assert abs(q.preconditioned_sharpness(op_old, opt, tol=1e-12) - got_next) < 1e-8 * abs(got_next)


def test_preconditioned_sharpness_at_step_zero_needs_the_gradient():
    model, batch = _problem()
    b1, b2, eps = 0.9, 0.999, 1e-8
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    op = dd.HessianOperator(model, CE, batch)
    with pytest.raises(ValueError, match="pass gradient="):
        q.preconditioned_sharpness(op, opt)
    g = flat(torch.autograd.grad(CE(model(batch[0]), batch[1]), list(model.parameters())))
    H = exact_hessian(model, CE, [batch])
    want = _dense_preconditioned_top(H, (1 - b2) * g * g, 1, b1, b2, eps)
    before = snapshot(model, opt)
    got = q.preconditioned_sharpness(op, opt, gradient=g, tol=1e-12)
    assert_same(before, snapshot(model, opt))
    assert not opt.state
    assert abs(got - want) < 1e-8 * abs(want)


def test_preconditioned_sharpness_with_param_groups():
    model, batch = _problem()
    opt = torch.optim.Adam(
        [
            {"params": list(model[0].parameters()), "eps": 1e-3, "betas": (0.5, 0.9)},
            {"params": list(model[2].parameters()), "eps": 1e-6, "weight_decay": 0.2},
        ],
        lr=0.01,
    )
    op = dd.HessianOperator(model, CE, batch)
    g = flat(torch.autograd.grad(CE(model(batch[0]), batch[1]), list(model.parameters())))
    n0 = sum(p.numel() for p in model[0].parameters())
    theta = flat([p.detach() for p in model.parameters()])
    wd = torch.cat([torch.zeros(n0, dtype=F64), torch.full((op.dim - n0,), 0.2, dtype=F64)])
    g_eff = g + wd * theta
    b1 = torch.cat([torch.full((n0,), 0.5, dtype=F64), torch.full((op.dim - n0,), 0.9, dtype=F64)])
    b2 = torch.cat([torch.full((n0,), 0.9, dtype=F64), torch.full((op.dim - n0,), 0.999, dtype=F64)])
    eps = torch.cat([torch.full((n0,), 1e-3, dtype=F64), torch.full((op.dim - n0,), 1e-6, dtype=F64)])
    v = (1 - b2) * g_eff**2
    P = (1 - b1) * (torch.sqrt(v / (1 - b2)) + eps)
    M = (exact_hessian(model, CE, [batch]) + torch.diag(wd)) / torch.sqrt(P)[:, None] / torch.sqrt(P)[None, :]
    assert abs(q.preconditioned_sharpness(op, opt, gradient=g, tol=1e-12) - float(torch.linalg.eigvalsh(M)[-1])) < 1e-8 * float(torch.linalg.eigvalsh(M)[-1])
    block = float(torch.linalg.eigvalsh(M[n0:, n0:])[-1])
    assert abs(q.preconditioned_sharpness(op, opt, gradient=g, group=1, tol=1e-12) - block) < 1e-8 * block
    with pytest.raises(ValueError, match="group"):
        q.preconditioned_sharpness(op, opt, gradient=g, group=2)


def test_preconditioned_sharpness_bad_input():
    model, batch = _problem()
    op = dd.HessianOperator(model, CE, batch)
    g = torch.ones(op.dim, dtype=F64)
    with pytest.raises(TypeError, match="SGD"):
        q.preconditioned_sharpness(op, torch.optim.SGD(model.parameters(), lr=0.1), gradient=g)
    with pytest.raises(ValueError, match="0.weight"):
        q.preconditioned_sharpness(op, torch.optim.Adam(model[2].parameters()), gradient=g)
    with pytest.raises(TypeError, match="op.params"):
        q.preconditioned_sharpness(dd.MatrixOperator(torch.eye(3, dtype=F64)), torch.optim.Adam(model.parameters()))
    with pytest.raises(ValueError, match="gradient"):
        q.preconditioned_sharpness(op, torch.optim.Adam(model.parameters()), gradient=g[:3])


def test_preconditioned_operator_is_dense_scaling():
    A = torch.randn(6, 6, dtype=F64, generator=torch.Generator().manual_seed(0))
    A = A + A.T
    d = torch.rand(6, dtype=F64, generator=torch.Generator().manual_seed(1)) + 0.1
    inner = dd.MatrixOperator(A)
    for shift in (0.0, 0.7, torch.linspace(0, 1, 6, dtype=F64)):
        S = torch.diag(shift) if isinstance(shift, torch.Tensor) else shift * torch.eye(6, dtype=F64)
        want = (A + S) / d.sqrt()[:, None] / d.sqrt()[None, :]
        op = PreconditionedOperator(inner, d, shift)
        assert rel(op.to_dense(), want) < 1e-14
        assert rel(op.matvec(torch.ones(6, dtype=F64)), want @ torch.ones(6, dtype=F64)) < 1e-14
    assert inner.num_matvecs == 3 * 7
    with pytest.raises(ValueError, match="diag"):
        PreconditionedOperator(inner, -d)
    with pytest.raises(ValueError, match="diag"):
        PreconditionedOperator(inner, d[:3])
    with pytest.raises(TypeError, match="shift"):
        PreconditionedOperator(inner, d, shift="1")


# -- stability thresholds ---------------------------------------------------------------
def _params():
    return [nn.Parameter(torch.zeros(2, dtype=F64))]


@pytest.mark.parametrize(
    "make,want",
    [
        (lambda p: torch.optim.SGD(p, lr=0.1), 2 / 0.1),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), 3.8 / 0.1),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True), 3.8 / (2.8 * 0.1)),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.5), 3.8 / (0.5 * 0.1)),
        (lambda p: torch.optim.SGD(p, lr=0.1, dampening=0.5), 2 / 0.1),  # no momentum: no dampening
        (lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=0.5), 2 / 0.1 - 0.5),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.5, weight_decay=0.5), 3 / 0.1 - 0.5),
        (lambda p: torch.optim.SGD(p, lr=torch.tensor(0.1)), 2 / 0.1),
        (lambda p: torch.optim.Adam(p, lr=1e-3), 38 / 1e-3),
        (lambda p: torch.optim.Adam(p, lr=1e-3, betas=(0.5, 0.9), weight_decay=0.1), 3 / (0.5 * 1e-3)),
        (lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.1), 38 / 1e-3),
        (lambda p: torch.optim.Adam(p, lr=torch.tensor(1e-3), foreach=False), 38 / 1e-3),
    ],
)
def test_stability_threshold_formulas(make, want):
    opt = make(_params())
    assert abs(q.stability_threshold(opt) - want) < 1e-6 * want


@pytest.mark.parametrize(
    "kw",
    [dict(), dict(momentum=0.9), dict(momentum=0.6, nesterov=True), dict(momentum=0.7, dampening=0.4),
     dict(weight_decay=0.8), dict(momentum=0.5, weight_decay=0.3)],
)
def test_sgd_threshold_separates_stable_from_unstable_quadratics(kw):
    """Independent of the formulas: run torch's SGD on f = lam/2 theta^2 just below and above."""
    lr = 0.1
    threshold = q.stability_threshold(torch.optim.SGD(_params(), lr=lr, **kw))
    curvature = threshold * torch.tensor([0.95, 1.05], dtype=F64)  # independent coordinates
    theta = nn.Parameter(torch.ones(2, dtype=F64))
    opt = torch.optim.SGD([theta], lr=lr, **kw)
    for _ in range(1500):
        theta.grad = curvature * theta.detach()  # gradient of sum(curvature * theta^2) / 2
        opt.step()
    stable, unstable = theta.detach().abs().tolist()
    assert stable < 1e-3 and unstable > 1e3, (kw, stable, unstable)


def test_stability_threshold_param_groups_and_bad_input():
    a, b = _params(), _params()
    opt = torch.optim.SGD([{"params": a}, {"params": b, "lr": 0.5}], lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="lr.*group="):
        q.stability_threshold(opt)
    assert abs(q.stability_threshold(opt, group=1) - 3.8 / 0.5) < 1e-12
    assert abs(q.stability_threshold(opt, group=0) - 3.8 / 0.1) < 1e-12
    with pytest.raises(ValueError, match="group"):
        q.stability_threshold(opt, group=2)
    with pytest.raises(TypeError, match="group"):
        q.stability_threshold(opt, group="1")
    wd = torch.optim.SGD([{"params": a}, {"params": b, "weight_decay": 0.1}], lr=0.1)
    with pytest.raises(ValueError, match="weight_decay"):
        q.stability_threshold(wd)
    # Adam: weight decay is not relevant to the threshold, lr is.
    adam = torch.optim.AdamW([{"params": a}, {"params": b, "weight_decay": 0.0}], lr=0.1)
    assert abs(q.stability_threshold(adam) - 38 / 0.1) < 1e-9
    with pytest.raises(TypeError, match="RMSprop"):
        q.stability_threshold(torch.optim.RMSprop(_params()))
    assert q.stability_threshold(torch.optim.SGD(_params(), lr=0.0)) == math.inf
    hyper = lambda: [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    groups = copy.deepcopy(hyper())
    q.stability_threshold(opt, group=0)
    assert hyper() == groups


# -- subspace overlap -------------------------------------------------------------------
def test_subspace_overlap_against_exact_eigenvectors():
    model, batch = _problem()
    H = exact_hessian(model, CE, [batch])
    evals, evecs = torch.linalg.eigh(H)
    top = evecs[:, -3:]
    op = dd.HessianOperator(model, CE, batch)
    assert abs(q.subspace_overlap(op, evecs[:, -1], 3, tol=1e-10) - 1) < 1e-8
    assert abs(q.subspace_overlap(op, 5 * evecs[:, -2], 3, tol=1e-10) - 1) < 1e-8
    v = torch.randn(op.dim, dtype=F64, generator=torch.Generator().manual_seed(4))
    orth = v - top @ (top.T @ v)
    assert q.subspace_overlap(op, orth, 3, tol=1e-10) < 1e-8
    want = float((top.T @ v).pow(2).sum() / v.pow(2).sum())
    assert abs(q.subspace_overlap(op, v, 3, tol=1e-10) - want) < 1e-8
    with pytest.raises(ValueError, match="k"):
        q.subspace_overlap(op, v, op.dim)
    with pytest.raises(ValueError, match="vector"):
        q.subspace_overlap(op, torch.zeros_like(v), 2)
    with pytest.raises(TypeError, match="k"):
        q.subspace_overlap(op, v, 2.0)


# -- safe step radius ---------------------------------------------------------------------
def _jacobian_radius(model, x, v, at=None):
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    names = [n for n, p in ref.named_parameters() if p.requires_grad]
    values = at or [p.detach() for n, p in ref.named_parameters() if p.requires_grad]
    shapes = [p.shape for p in values]

    def logits(theta):
        parts = torch.split(theta, [math.prod(s) for s in shapes])
        return torch.func.functional_call(ref, {n: t.reshape(s) for n, t, s in zip(names, parts, shapes)}, (x,))

    J = torch.autograd.functional.jacobian(logits, flat(values))  # (n, C, dim)
    a = J @ v
    spread = a.max(1).values - a.min(1).values
    return math.pi / spread  # per sample


def test_safe_step_radius_matches_explicit_jacobians():
    model = tanh_mlp()
    x, y = classification_data(n=11)
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=F64, generator=torch.Generator().manual_seed(5))
    per_sample = _jacobian_radius(model, x, v)
    before = snapshot(model)
    got = q.safe_step_radius(model, [(x[:4], y[:4]), (x[4:], y[4:])], v)
    assert_same(before, snapshot(model))
    assert abs(got - float(per_sample.min())) < 1e-12 * got
    assert float(per_sample.max()) > 1.5 * got  # the minimum over samples matters
    assert abs(q.safe_step_radius(model, (x, y), 2 * v) - got / 2) < 1e-12 * got  # units of ||v||
    assert q.safe_step_radius(model, (x, y), torch.zeros_like(v)) == math.inf
    # The radius of one sample alone is its own.
    i = int(per_sample.argmax())
    assert abs(q.safe_step_radius(model, (x[i : i + 1], y[i : i + 1]), v) - float(per_sample[i])) < 1e-12 * got


def test_safe_step_radius_batchnorm_train_mode_dropout_off_and_at():
    model = nn.Sequential(batchnorm_mlp(train=True), nn.Dropout(0.5)).train()
    x, y = classification_data(n=10)
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=F64, generator=torch.Generator().manual_seed(6))
    before = snapshot(model)
    got = q.safe_step_radius(model, (x, y), v)
    assert_same(before, snapshot(model))
    assert abs(got - float(_jacobian_radius(model, x, v).min())) < 1e-10 * got
    at = [p.detach() + 0.1 for p in model.parameters()]
    got_at = q.safe_step_radius(model, (x, y), v, at=at)
    assert abs(got_at - float(_jacobian_radius(model, x, v, at=at).min())) < 1e-10 * got_at
    assert abs(got_at - got) > 1e-6 * got
    assert_same(before, snapshot(model))
    with pytest.raises(ValueError, match="direction"):
        q.safe_step_radius(model, (x, y), v[:-1])
    with pytest.raises(TypeError, match="direction"):
        q.safe_step_radius(model, (x, y), v.float())
    with pytest.raises(ValueError, match="at"):
        q.safe_step_radius(model, (x, y), v, at=at[:2])


# -- side effects and bad input across the per-example functions -----------------------------
def test_no_side_effects_with_live_grads_frozen_parameters_and_train_mode():
    model = nn.Sequential(batchnorm_mlp(train=True), nn.Dropout(0.3)).train()
    x, y = classification_data()
    CE(model(x), y).backward()
    model[0][3].bias.requires_grad_(False)
    batches = [(x[:10], y[:10]), (x[10:], y[10:])]
    before = snapshot(model)
    q.grand_scores(model, CE, batches, progress=False)
    q.el2n_scores(model, batches, progress=False)
    q.gradient_coherence(model, CE, batches, progress=False)
    q.gradient_snr(model, CE, batches, progress=False)
    q.gradient_weight_cosine(model, CE, batches)
    q.layer_rotation(model, copy.deepcopy(model))
    q.safe_step_radius(model, batches, torch.ones(sum(p.numel() for p in model.parameters() if p.requires_grad), dtype=F64))
    assert_same(before, snapshot(model))


def test_per_example_bad_input_names_the_argument():
    model = tanh_mlp()
    batch = classification_data(n=5)
    with pytest.raises(TypeError, match="model"):
        q.grand_scores("model", CE, batch)
    with pytest.raises(ValueError, match="loss_fn"):
        q.grand_scores(model, None, batch)
    with pytest.raises(ValueError, match="chunk_size"):
        q.grand_scores(model, CE, batch, chunk_size=0)
    with pytest.raises(TypeError, match="chunk_size"):
        q.gradient_coherence(model, CE, batch, chunk_size=2.0)
    with pytest.raises(ValueError, match="params"):
        q.gradient_snr(model, CE, batch, params=[nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match="data"):
        q.grand_scores(model, CE, None)
    with pytest.raises(ValueError, match="targets"):
        q.el2n_scores(model, (batch[0], batch[1] + 10))
    with pytest.raises(ValueError, match="logits"):
        q.el2n_scores(nn.Sequential(model, nn.Flatten(0)), batch)
    with pytest.raises(TypeError, match="progress"):
        q.el2n_scores(model, batch, progress="yes")
    with pytest.raises(ValueError, match="no examples"):
        q.gradient_coherence(model, CE, [])


def test_quantities_exports_resolve():
    import types

    for name in q.__all__:
        value = getattr(q, name)
        assert callable(value) and not isinstance(value, types.ModuleType), name


def test_results_are_the_same_under_no_grad_and_reproducible():
    model = tanh_mlp()
    batch = classification_data(n=6)
    v = torch.ones(sum(p.numel() for p in model.parameters()), dtype=F64)
    op = dd.HessianOperator(model, CE, batch)
    plain = (
        q.grand_scores(model, CE, batch, progress=False),
        q.safe_step_radius(model, batch, v),
        q.gradient_weight_cosine(model, CE, batch),
        q.subspace_overlap(op, v, 3, seed=1),
    )
    with torch.no_grad():
        again = (
            q.grand_scores(model, CE, batch, progress=False),
            q.safe_step_radius(model, batch, v),
            q.gradient_weight_cosine(model, CE, batch),
            q.subspace_overlap(op, v, 3, seed=1),
        )
    assert torch.equal(plain[0], again[0]) and plain[1:] == again[1:]
