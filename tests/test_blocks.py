"""Per-block spectra (blocks= on eigenvalues, trace, spectral_density, HessianSpectrum)
against the exact diagonal blocks of the float64 Hessian; block naming; params= globs."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import dyndiag as dd
from dyndiag.curvature import MatrixOperator
from dyndiag.curvature.partition import resolve_blocks
from dyndiag.data import CausalLMLoss

from exact import exact_hessian
from lm_models import tiny_gpt, token_batch
from models import image_data, small_cnn

CRITERION = CausalLMLoss()


def lm_closure(model, batch):
    return CRITERION(model(batch["input_ids"], batch["attention_mask"]), batch["labels"])


def exact_closure_hessian(model, closure, batch):
    """(dim, dim) Hessian of ``closure(model, batch)`` by double backward over the identity."""
    model = copy.deepcopy(model)
    params = [p for p in model.parameters() if p.requires_grad]
    with sdpa_kernel(SDPBackend.MATH):  # the fused CPU kernels have no double backward
        g = torch.autograd.grad(closure(model, batch), params, create_graph=True)
        flat = torch.cat([x.reshape(-1) for x in g])
        rows = [torch.cat([h.reshape(-1) for h in torch.autograd.grad(flat[i], params, retain_graph=True)])
                for i in range(flat.numel())]
    return torch.stack(rows)


@pytest.fixture(scope="module")
def gpt():
    """(model, batch, exact Hessian) of a 2-layer GPT (width 4, 428 parameters)."""
    model, batch = tiny_gpt(width=4), token_batch()
    return model, batch, exact_closure_hessian(model, lm_closure, batch)


@pytest.fixture(scope="module")
def cnn():
    model, data = small_cnn(), image_data()
    return model, data, exact_hessian(model, nn.CrossEntropyLoss(), [data])


def gpt_op(gpt):
    model, batch, _ = gpt
    return dd.HessianOperator(model, None, batch, closure=lm_closure)


def cnn_op(cnn):
    model, data, _ = cnn
    return dd.HessianOperator(model, nn.CrossEntropyLoss(), data)


def sub(H, block):
    idx = block.index.cpu()
    return H[idx][:, idx]


# -- eigenvalues ---------------------------------------------------------------------


@pytest.mark.parametrize("case, spec", [("gpt", "module"), ("gpt", "layer"), ("cnn", "module")])
def test_top_eigenvalues_per_block_match_the_exact_blocks(case, spec, gpt, cnn, request):
    fixture = {"gpt": gpt, "cnn": cnn}[case]
    op = gpt_op(fixture) if case == "gpt" else cnn_op(fixture)
    H = fixture[2]
    parts = resolve_blocks(op, spec)
    res = dd.eigenvalues(op, k=3, tol=1e-10, blocks=spec)
    assert list(res) == [b.name for b in parts]
    for block in parts:
        r = res[block.name]
        assert isinstance(r, dd.EigenResult) and r.converged
        lam = torch.linalg.eigvalsh(sub(H, block)).flip(0)[:3]
        scale = float(lam.abs().max())
        assert torch.allclose(r.values, lam, rtol=0, atol=1e-6 * scale), block.name


def test_block_eigenvalues_smallest_and_vectors(cnn):
    op = cnn_op(cnn)
    # The head's block has a repeated zero eigenvalue (softmax's shift invariance), which a
    # one-column Krylov space sees once: its smallest end is not a block-size-1 question.
    res = dd.eigenvalues(op, k=2, which="SA", tol=1e-10, return_vectors=True, blocks={"conv": "0.*"})
    (block,) = resolve_blocks(op, {"conv": "0.*"})
    Hb = sub(cnn[2], block)
    r = res["conv"]
    norm = float(torch.linalg.matrix_norm(Hb, 2))
    torch.testing.assert_close(r.values, torch.linalg.eigvalsh(Hb)[:2], rtol=0, atol=1e-6 * norm)
    assert r.vectors.shape == (block.dim, 2)
    torch.testing.assert_close(Hb @ r.vectors, r.vectors * r.values, rtol=0, atol=1e-4 * norm)


def test_a_block_no_larger_than_k_is_solved_exactly(cnn):
    op = cnn_op(cnn)
    res = dd.eigenvalues(op, k=5, blocks={"head bias": "4.bias", "conv": "0.*"})
    small = res["head bias"]
    (block,) = [b for b in resolve_blocks(op, {"head bias": "4.bias"})]
    assert small.num_matvecs == 3 and small.values.shape == (3,) and small.converged
    torch.testing.assert_close(small.values, torch.linalg.eigvalsh(sub(cnn[2], block)).flip(0), rtol=0, atol=1e-12)
    assert res["conv"].values.shape == (5,)


def test_matvec_counts_add_up_to_the_operators(gpt):
    op = gpt_op(gpt)
    res = dd.eigenvalues(op, k=2, tol=1e-8, blocks="layer")
    assert op.num_matvecs == sum(r.num_matvecs for r in res.values())


# -- one product call per step -------------------------------------------------------


class Counting(MatrixOperator):
    """A matrix operator that remembers each product call's width and carries the
    ``names``/``params`` of a model operator, so blocks= can be resolved on it."""

    def __init__(self, A, like):
        super().__init__(A)
        self.names, self.params, self.model = like.names, like.params, like.model
        self.widths = []

    def _matmat(self, V):
        self.widths.append(V.shape[1])
        return super()._matmat(V)


def test_one_product_call_per_step_with_one_column_per_block(gpt):
    like = gpt_op(gpt)
    op = Counting(gpt[2], like)
    B = len(resolve_blocks(op, "layer"))
    res = dd.eigenvalues(op, k=2, tol=1e-8, blocks="layer")
    steps = max(r.num_matvecs for r in res.values())
    assert len(op.widths) == steps  # not one call per block
    assert op.widths[0] == B and sorted(op.widths, reverse=True) == op.widths  # blocks drop out as they converge
    assert sum(op.widths) == op.num_matvecs == sum(r.num_matvecs for r in res.values())

    op.widths.clear()
    dens = dd.spectral_density(op, num_probes=3, lanczos_steps=7, blocks="layer", progress=False)
    assert op.widths == [3 * B] * 7
    assert all(d.num_matvecs == 21 for d in dens.values())

    op.widths.clear()
    dd.trace(op, num_matvecs=9, blocks="layer", block_size=3 * B)
    assert op.widths == [3 * B] * 3  # per block: 3 sketch columns, then its 3 basis columns, then 3 probes


def test_lockstep_equals_each_block_alone(gpt):
    # The same estimator, seed and settings on the exact block as its own operator.
    op = gpt_op(gpt)
    H = gpt[2]
    parts = resolve_blocks(op, "layer")
    eig = dd.eigenvalues(op, k=2, tol=1e-10, blocks="layer")
    tr = dd.trace(op, num_matvecs=30, method="hutchinson", seed=4, blocks="layer")
    dens = dd.spectral_density(op, num_probes=2, lanczos_steps=12, seed=5, blocks="layer", progress=False)
    for block in parts:
        alone = MatrixOperator(sub(H, block))
        torch.testing.assert_close(eig[block.name].values, dd.eigenvalues(alone, k=2, tol=1e-10).values,
                                   rtol=0, atol=1e-8 * float(eig[block.name].values.abs().max()))
        assert tr[block.name].value == pytest.approx(dd.trace(alone, 30, "hutchinson", seed=4).value, rel=1e-9)
        d = dd.spectral_density(alone, num_probes=2, lanczos_steps=12, seed=5, progress=False)
        np.testing.assert_allclose(dens[block.name].nodes, d.nodes, atol=1e-8 * np.abs(d.nodes).max())
        np.testing.assert_allclose(dens[block.name].weights, d.weights, atol=1e-8)


# -- trace ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["gpt", "cnn"])
def test_block_traces_exact_when_the_sketch_spans_each_block(case, gpt, cnn):
    fixture = {"gpt": gpt, "cnn": cnn}[case]
    op = gpt_op(fixture) if case == "gpt" else cnn_op(fixture)
    spec = "module"
    parts = resolve_blocks(op, spec)
    if case == "gpt":  # keep the budget small: the blocks of at most 40 coordinates
        spec = {b.name: list(b.params) for b in parts if b.dim <= 40}
        parts = resolve_blocks(op, spec)
    budget = 3 * max(b.dim for b in parts)  # Hutch++'s sketch covers every block: exact
    res = dd.trace(op, num_matvecs=budget, blocks=spec)
    assert len(parts) >= 2
    for block in parts:
        assert isinstance(res[block.name], dd.TraceResult) and res[block.name].num_matvecs == budget
        exact = float(torch.diagonal(sub(fixture[2], block)).sum())
        assert res[block.name].value == pytest.approx(exact, rel=1e-9, abs=1e-12), block.name


def test_block_traces_hutchinson_within_its_error(gpt):
    op = gpt_op(gpt)
    res = dd.trace(op, num_matvecs=40, method="hutchinson", blocks="layer")
    for block in resolve_blocks(op, "layer"):
        Hb = sub(gpt[2], block)
        sd = math.sqrt(2 * float((Hb**2).sum() - (torch.diagonal(Hb) ** 2).sum()) / 40)  # Rademacher variance
        assert abs(res[block.name].value - float(Hb.trace())) <= 4 * sd + 1e-12, block.name


# -- density -------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["gpt", "cnn"])
def test_block_densities_against_the_exact_block_spectra(case, gpt, cnn):
    fixture = {"gpt": gpt, "cnn": cnn}[case]
    op = gpt_op(fixture) if case == "gpt" else cnn_op(fixture)
    spec = "layer" if case == "gpt" else "module"
    res = dd.spectral_density(op, num_probes=6, lanczos_steps=30, blocks=spec, progress=False)
    for block in resolve_blocks(op, spec):
        d = res[block.name]
        Hb = sub(fixture[2], block)
        lam = torch.linalg.eigvalsh(Hb).numpy()
        spread = lam.max() - lam.min()
        assert isinstance(d, dd.SpectralDensity) and d.dim == block.dim
        assert d.weights.sum() == pytest.approx(1.0, abs=1e-12)
        # Nodes are Ritz values: inside the block's spectrum, its extremes found.
        assert d.nodes.min() >= lam.min() - 1e-8 * spread and d.nodes.max() <= lam.max() + 1e-8 * spread
        assert d.nodes.max() == pytest.approx(lam.max(), abs=1e-6 * spread)
        # First moment: the SLQ trace is Hutchinson's with the same probes, within its error.
        sd = math.sqrt(2 * float((Hb**2).sum() - (torch.diagonal(Hb) ** 2).sum()) / 6)
        assert abs(d.trace - float(Hb.trace())) <= 4 * sd + 1e-12, block.name
        # Second moment (tr(H^2)/d), within the same kind of error.
        m2 = float(np.dot(d.weights, d.nodes**2)) * block.dim
        H2 = Hb @ Hb
        sd2 = math.sqrt(2 * float((H2**2).sum() - (torch.diagonal(H2) ** 2).sum()) / 6)
        assert abs(m2 - float(H2.trace())) <= 4 * sd2 + 1e-12, block.name


# -- naming --------------------------------------------------------------------------


def test_layer_and_module_names(gpt, cnn):
    op = gpt_op(gpt)
    assert [b.name for b in resolve_blocks(op, "layer")] == ["wte", "wpe", "h.0", "h.1", "ln_f"]
    modules = [b.name for b in resolve_blocks(op, "module")]
    assert modules[:4] == ["wte", "wpe", "h.0.ln_1", "h.0.attn"] and modules[-1] == "ln_f" and len(modules) == 15
    # Every coordinate is in exactly one block, each block on its parameters' slices.
    for spec in ("layer", "module"):
        index = torch.cat([b.index for b in resolve_blocks(op, spec)])
        assert torch.equal(index.sort().values, torch.arange(op.dim))
    h0 = resolve_blocks(op, "layer")[2]
    assert h0.params[0] == "h.0.ln_1.weight" and h0.params[-1] == "h.0.mlp.2.bias"
    # A Sequential of mixed layers has no repeated blocks: its top-level modules.
    assert [b.name for b in resolve_blocks(cnn_op(cnn), "layer")] == ["0", "4"]


def test_layer_names_of_stages_and_wrapped_stacks():
    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Linear(3, 3)
            self.layer1 = nn.Sequential(Res(), Res())
            self.layer2 = nn.Sequential(Res(), Res())
            self.scale = nn.Parameter(torch.ones(()))
            self.fc = nn.Linear(3, 2)

    net = Net().double()
    data = (torch.zeros(4, 3, dtype=torch.float64), torch.zeros(4, 2, dtype=torch.float64))
    op = dd.HessianOperator(net, nn.MSELoss(), data)
    assert [b.name for b in resolve_blocks(op, "layer")] == [
        "scale", "stem", "layer1.0", "layer1.1", "layer2.0", "layer2.1", "fc"]  # a module's own parameters first
    assert [b.name for b in resolve_blocks(op, "module")][:3] == ["scale", "stem", "layer1.0.lin"]


def test_hf_gpt2_layers():
    transformers = pytest.importorskip("transformers")
    from lm_models import hf_gpt2

    model = hf_gpt2()
    batch = token_batch()
    op = dd.HessianOperator(model, None, batch, closure=lambda m, b: m(**b).loss)
    assert [b.name for b in resolve_blocks(op, "layer")] == [
        "transformer.wte", "transformer.wpe", "transformer.h.0", "transformer.h.1", "transformer.ln_f"]
    assert transformers is not None


def test_dict_and_callable_blocks(gpt):
    op = gpt_op(gpt)
    spec = {"mlp": ["h.*.mlp.*"], "attn": "h.*.attn.*", "h.0": "h.0.*"}  # dict order; blocks may overlap
    parts = resolve_blocks(op, spec)
    assert [b.name for b in parts] == ["mlp", "attn", "h.0"]
    assert parts[1].params == ("h.0.attn.weight", "h.0.attn.bias", "h.1.attn.weight", "h.1.attn.bias")
    res = dd.eigenvalues(op, k=2, tol=1e-10, blocks=spec)
    for block in parts:
        lam = torch.linalg.eigvalsh(sub(gpt[2], block)).flip(0)[:2]
        torch.testing.assert_close(res[block.name].values, lam, rtol=0, atol=1e-6 * float(lam.abs().max()))

    def kind(name):  # one block per parameter kind; embeddings left out
        return None if name.startswith(("wte", "wpe")) else name.rsplit(".", 1)[1]

    parts = resolve_blocks(op, kind)
    assert [b.name for b in parts] == ["weight", "bias"]
    assert sum(b.dim for b in parts) == op.dim - 44 - 32
    tr = dd.trace(op, num_matvecs=3 * max(b.dim for b in parts), blocks=kind)
    for block in parts:
        assert tr[block.name].value == pytest.approx(float(torch.diagonal(sub(gpt[2], block)).sum()), rel=1e-9)


@pytest.mark.parametrize(
    "blocks, error, match",
    [
        ("layers", ValueError, "blocks must be"),
        (3, TypeError, "blocks must be"),
        ({}, ValueError, "empty"),
        ({"a": "nothing.*"}, ValueError, "'nothing.*'"),
        ({"a": []}, ValueError, "no glob"),
        ({"": "h.*"}, TypeError, "block names"),
        ({"a": [1]}, TypeError, "globs must be strings"),
        (lambda n: 1, TypeError, "callable must return"),
        (lambda n: None, ValueError, "none of the operator's parameters"),
    ],
)
def test_bad_blocks(blocks, error, match, gpt):
    with pytest.raises(error, match=match):
        dd.eigenvalues(gpt_op(gpt), k=1, blocks=blocks)


def test_blocks_need_a_model_operator():
    op = MatrixOperator(torch.eye(3, dtype=torch.float64))
    for estimator in (dd.eigenvalues, dd.trace, dd.spectral_density):
        with pytest.raises(TypeError, match="blocks= needs an operator over named model parameters"):
            estimator(op, blocks="module")


def test_blocks_through_a_preconditioned_operator(cnn):
    op = cnn_op(cnn)
    P = dd.curvature.PreconditionedOperator(op, torch.full((op.dim,), 4.0, dtype=torch.float64))
    res = dd.eigenvalues(P, k=1, tol=1e-10, blocks="layer")
    for block in resolve_blocks(op, "layer"):
        top = float(torch.linalg.eigvalsh(sub(cnn[2], block))[-1]) / 4
        assert float(res[block.name].values[0]) == pytest.approx(top, rel=1e-6)


# -- params= globs ---------------------------------------------------------------------


def test_params_globs_select_the_block(gpt):
    model, batch, H = gpt
    op = dd.HessianOperator(model, None, batch, closure=lm_closure, params="h.*.attn.*")
    assert op.names == ["h.0.attn.weight", "h.0.attn.bias", "h.1.attn.weight", "h.1.attn.bias"]
    (block,) = resolve_blocks(gpt_op(gpt), {"attn": "h.*.attn.*"})
    torch.testing.assert_close(op.to_dense(), sub(H, block), rtol=0, atol=1e-12)
    two = dd.HessianOperator(model, None, batch, closure=lm_closure, params=["ln_f.*", "wpe.*"])
    assert two.names == ["wpe.weight", "ln_f.weight", "ln_f.bias"]  # model order


def test_params_globs_errors(gpt):
    model, batch, _ = gpt
    with pytest.raises(ValueError, match=r"params: glob 'h\.\*\.mlp\.9\.\*' matches none"):
        dd.HessianOperator(model, None, batch, closure=lm_closure, params=["h.*.attn.*", "h.*.mlp.9.*"])
    with pytest.raises(TypeError, match="params"):
        dd.HessianOperator(model, None, batch, closure=lm_closure, params=["h.*", model.wte.weight])
    frozen = tiny_gpt(width=4)
    frozen.wpe.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="'wpe.weight'"):  # globs choose among trainable parameters
        dd.HessianOperator(frozen, None, batch, closure=lm_closure, params="wpe.weight")


# -- the probe -----------------------------------------------------------------------


def test_hessian_spectrum_probe_records_per_block(tmp_path, gpt):
    model = tiny_gpt(width=4)
    batch = token_batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the model stays at the fixture's parameters
    probe = dd.probes.HessianSpectrum(k=2, tol=1e-10, trace_matvecs=9, density=True, num_probes=2,
                                      lanczos_steps=5, blocks="layer")
    with dd.Monitor(model, opt, [probe], probe_data=batch, closure=lm_closure, log_dir=str(tmp_path)):
        opt.zero_grad()
        lm_closure(model, batch).backward()
        opt.step()
    df = dd.load_records(str(tmp_path))
    names = ["wte", "wpe", "h.0", "h.1", "ln_f"]
    assert set(df.metric) == {"eigenvalue_0", "eigenvalue_1", "trace"}
    for metric in ("eigenvalue_0", "eigenvalue_1", "trace"):
        assert sorted(df[df.metric == metric].key) == sorted(names)
    op = gpt_op(gpt)
    for block in resolve_blocks(op, "layer"):
        top = float(torch.linalg.eigvalsh(sub(gpt[2], block))[-1])
        row = df[(df.metric == "eigenvalue_0") & (df.key == block.name)]
        assert float(row.value.iloc[0]) == pytest.approx(top, rel=1e-6)
        nodes = dd.load_arrays(str(tmp_path), "hessian_spectrum", "density_nodes", key=block.name)
        assert nodes[0].shape == (10,)


def test_hessian_spectrum_probe_rejects_bad_blocks():
    with pytest.raises(TypeError, match="blocks must be"):
        dd.probes.HessianSpectrum(blocks=3)
    with pytest.raises(ValueError, match="'layers'"):
        dd.probes.HessianSpectrum(blocks="layers")


# -- plot.block_spectra ------------------------------------------------------------------


def test_block_spectra_figure(gpt):
    from matplotlib.figure import Figure

    op = gpt_op(gpt)
    dens = dd.spectral_density(op, num_probes=2, lanczos_steps=10, blocks="module", progress=False)
    top = dd.eigenvalues(op, k=2, tol=1e-6, blocks="module")
    fig = dd.plot.block_spectra(dens, top)
    shown = [a for a in fig.axes if a.get_visible()]
    assert [a.get_title() for a in shown] == list(dens) and len(shown) == 15
    assert len(fig.axes) == 16  # a 4 x 4 grid, the spare panel hidden
    assert len({a.get_xlim() for a in shown}) == 1 and len({a.get_ylim() for a in shown}) == 1  # shared axes
    for a, res in zip(shown, top.values()):  # the top eigenvalues are marked on their own block's panel
        marked = sorted(line.get_xdata()[0] for line in a.lines if line.get_linestyle() == "--")
        np.testing.assert_allclose(marked, sorted(res.values.tolist()))
    # Every lowest panel of a column shows its eigenvalue axis, the short last row included.
    assert [a.get_xlabel() for a in shown].count("eigenvalue") == 4

    fig2 = Figure()
    axes = fig2.subplots(1, 3)
    some = {name: dens[name] for name in list(dens)[:3]}
    assert dd.plot.block_spectra(some, ax=axes) is fig2
    assert [a.get_title() for a in axes] == list(some)
    only_top = dd.plot.block_spectra(top, ncols=5)  # eigenvalues alone: stems
    assert len([a for a in only_top.axes if a.get_visible()]) == 15 and len(only_top.axes) == 15


def test_block_spectra_bad_input(gpt):
    from matplotlib.figure import Figure

    dens = {"a": np.array([1.0, 2.0]), "b": np.array([0.5])}
    with pytest.raises(ValueError, match="spectra"):
        dd.plot.block_spectra({})
    with pytest.raises(ValueError, match="ax must be 2"):
        dd.plot.block_spectra(dens, ax=Figure().subplots(1, 1))
    with pytest.raises(ValueError, match="ncols"):
        dd.plot.block_spectra(dens, ncols=0)
    with pytest.raises(TypeError, match="top"):
        dd.plot.block_spectra(dens, top=[1.0])


def test_products_of_a_parameter_subset_carry_no_graph(gpt):
    # The other parameters enter as constants: products are plain tensors, whichever path.
    model, batch, H = gpt
    op = dd.HessianOperator(model, None, batch, closure=lm_closure, params="h.0.*")
    V = torch.randn(op.dim, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for backend in ("vmap", "loop"):
        op.backend = backend
        assert not op.matmat(V).requires_grad
    assert not op.matvec(V[:, 0]).requires_grad
    dens = dd.spectral_density(op, num_probes=2, lanczos_steps=6, blocks="module", progress=False)
    assert list(dens) == ["h.0.ln_1", "h.0.attn", "h.0.proj", "h.0.ln_2", "h.0.mlp.0", "h.0.mlp.2"]


def test_blocks_of_the_ggn(cnn):
    from exact import exact_ggn

    model, data, _ = cnn
    G = exact_ggn(model, nn.CrossEntropyLoss(), [data])
    op = dd.GGNOperator(model, nn.CrossEntropyLoss(), data)
    res = dd.eigenvalues(op, k=2, tol=1e-10, blocks="module")
    tr = dd.trace(op, num_matvecs=90, blocks="module")
    for block in resolve_blocks(op, "module"):
        Gb = sub(G, block)
        lam = torch.linalg.eigvalsh(Gb).flip(0)[:2]
        torch.testing.assert_close(res[block.name].values, lam, rtol=0, atol=1e-6 * float(lam[0]))
        assert tr[block.name].value == pytest.approx(float(Gb.trace()), rel=1e-9)


# -- block products ----------------------------------------------------------------------


def lm_forward(model, batch):
    return model(batch["input_ids"], batch["attention_mask"])


def lm_operator(kind, model, data, **kwargs):
    if kind == "hessian":
        return dd.HessianOperator(model, None, data, closure=lm_closure, **kwargs)
    return dd.GGNOperator(model, CRITERION, data, forward=lm_forward, **kwargs)


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
@pytest.mark.parametrize("backend", ["vmap", "loop", "auto"])
def test_block_products_are_the_block_rows_of_full_products(kind, backend):
    # Several batches cut into micro-batches, blocks that overlap, a chunk narrower than a block.
    model = tiny_gpt(width=4)
    data = [token_batch(seed=1), token_batch(batch=4, seed=2)]
    op = lm_operator(kind, model, data, backend=backend, micro_batch_size=2, max_batch_vectors=2)
    parts = resolve_blocks(op, {"h.1": "h.1.*", "attn": "h.*.attn.*", "wte": "wte.*", "ln_f": "ln_f.*"})
    widths = [3, 2, 1, 4]
    g = torch.Generator().manual_seed(0)
    X = torch.zeros(op.dim, sum(widths), dtype=torch.float64)
    cols, start = [], 0
    for block, w in zip(parts, widths):
        X[block.index, start : start + w] = torch.randn(block.dim, w, dtype=torch.float64, generator=g)
        cols.append(slice(start, start + w))
        start += w
    Y = op.block_matmat(X, [(b.params, w) for b, w in zip(parts, widths)])
    assert op.num_matvecs == sum(widths)
    full = op.matmat(X)
    scale = float(full.abs().max())
    for block, c in zip(parts, cols):
        torch.testing.assert_close(Y[block.index, c], full[block.index, c], rtol=0, atol=1e-10 * scale)
        off = torch.ones(op.dim, dtype=torch.bool)
        off[block.index] = False
        assert not Y[off, c].any()  # zeros off the block's rows
    # A group's rows outside its block are not read.
    noisy = X + (X == 0) * torch.randn(X.shape, dtype=torch.float64, generator=g)
    torch.testing.assert_close(op.block_matmat(noisy, [(b.params, w) for b, w in zip(parts, widths)]), Y,
                               rtol=0, atol=1e-12 * scale)


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_a_block_product_differentiates_toward_its_own_parameters_only(kind, monkeypatch):
    model = tiny_gpt(width=4)
    op = lm_operator(kind, model, token_batch(), backend="loop")
    fired: dict[str, int] = {}

    def values():  # the operator's parameter values, each counting the gradients taken toward it
        out = [p.detach().clone().requires_grad_(True) for p in op.params]
        for name, t in zip(op.names, out):
            t.register_hook(lambda grad, name=name: fired.update({name: fired.get(name, 0) + 1}))
        return out

    monkeypatch.setattr(op, "_values", values)
    (block,) = resolve_blocks(op, {"h.1": "h.1.*"})
    X = torch.zeros(op.dim, 1, dtype=torch.float64)
    X[block.index] = 1.0
    op.block_matmat(X, [(block.params, 1)])
    first = 1 if kind == "hessian" else 0  # the Hessian's first backward reaches every parameter
    assert fired == {n: first + (n in block.params) for n in op.names if first or n in block.params}


def test_block_matmat_bad_blocks(gpt):
    op = gpt_op(gpt)
    X = torch.zeros(op.dim, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="op.names.*'nope'"):
        op.block_matmat(X, [(["nope"], 2)])
    with pytest.raises(ValueError, match="add up to 1"):
        op.block_matmat(X, [(["wpe.weight"], 1)])
    with pytest.raises(ValueError, match="widths"):
        op.block_matmat(X, [(["wpe.weight"], -1)])


def test_lockstep_multiplies_model_operators_by_block_products(gpt):
    op = gpt_op(gpt)
    calls = []
    inner = op.block_matmat
    op.block_matmat = lambda X, blocks: calls.append(len(blocks)) or inner(X, blocks)
    res = dd.eigenvalues(op, k=1, tol=1e-8, blocks="layer")
    assert len(calls) == max(r.num_matvecs for r in res.values())  # one call per step
    assert op.num_matvecs == sum(r.num_matvecs for r in res.values())
    P = dd.curvature.PreconditionedOperator(op, torch.full((op.dim,), 2.0, dtype=torch.float64), shift=0.5)
    calls.clear()
    tr = dd.trace(P, num_matvecs=96, blocks={"wpe": "wpe.*"})  # the sketch spans its 32 coordinates: exact
    (block,) = resolve_blocks(op, {"wpe": "wpe.*"})
    assert calls and tr["wpe"].value == pytest.approx((float(sub(gpt[2], block).trace()) + 0.5 * 32) / 2, rel=1e-9)


def test_block_products_of_a_reverse_mode_ggn():
    # A model op without a forward-mode derivative: the GGN's products go reverse mode.
    from exact import exact_ggn
    from models import classification_data
    from test_operators_lm import NoForwardAD

    x, y = classification_data(n=12)
    torch.manual_seed(0)
    model = NoForwardAD().double()
    op = dd.GGNOperator(model, nn.CrossEntropyLoss(), (x, y))
    G = exact_ggn(model, nn.CrossEntropyLoss(), [(x, y)])
    parts = resolve_blocks(op, "module")
    X = torch.zeros(op.dim, 2 * len(parts), dtype=torch.float64)
    for j, block in enumerate(parts):
        X[block.index, 2 * j : 2 * j + 2] = torch.randn(block.dim, 2, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="forward-mode"):
        Y = op.block_matmat(X, [(b.params, 2) for b in parts])
    for j, block in enumerate(parts):
        c = slice(2 * j, 2 * j + 2)
        torch.testing.assert_close(Y[:, c][block.index], sub(G, block) @ X[block.index, c], rtol=0, atol=1e-10)
        off = torch.ones(op.dim, dtype=torch.bool)
        off[block.index] = False
        assert not Y[off][:, c].any()  # the full product's other rows are dropped
