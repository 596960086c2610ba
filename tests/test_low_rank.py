"""Low-rank W = B·A computed through its factors (issue 14 item 3): forward, penalties and norms equal
the dense computation with W = B·A to float64 precision, gradients included, and a low-rank layer
saves no more activations for backward than a dense one."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor, nn

import relax_plugins as rp
from relax_plugins import LinearRelaxation, Symmetry, lowrank
from relax_plugins.diagnostics import saved_tensor_bytes
from relax_plugins.lowrank import use_factors
from relax_plugins.symmetry import group_defect, lie_defect
from relax_plugins.term import low_rank_apply, low_rank_moments, moment_penalties

F64 = torch.float64


def random_symmetry(d_in: int = 5, d_out: int = 4, lie: int = 2, group: int = 1) -> Symmetry:
    """Arbitrary generators: the identities under test do not need a group."""

    def anti(k: int, d: int) -> Tensor:
        m = torch.randn(k, d, d, dtype=F64)
        return m - m.transpose(1, 2)

    return Symmetry(d_in, d_out, lie_in=anti(lie, d_in), lie_out=anti(lie, d_out),
                    group_in=torch.randn(group, d_in, d_in, dtype=F64),
                    group_out=torch.randn(group, d_out, d_out, dtype=F64))


def low_rank_term(sym: Symmetry, rank: int) -> LinearRelaxation:
    term = LinearRelaxation(sym, rank=rank).double()
    with torch.no_grad():
        term.lora_b.normal_()
    return term


def reference_terms(A: Tensor, B: Tensor, x: Tensor, sym: Symmetry) -> tuple[Tensor, Tensor]:
    """The definition: per-sample defects of the dense W = B·A, summed."""
    W = B @ A
    lie = lie_defect(W, x, sym).sum() + group_defect(W, x, sym).sum()
    return lie, (x @ W.T).square().sum()


def assert_close(a: Tensor, b: Tensor) -> None:
    assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), (a, b)


def assert_same_value_and_grads(got: tuple[Tensor, ...], ref: tuple[Tensor, ...], params: list[Tensor]) -> None:
    for g, r in zip(got, ref):
        assert_close(g, r)
        for pg, pr in zip(torch.autograd.grad(g, params, retain_graph=True),
                          torch.autograd.grad(r, params, retain_graph=True)):
            assert_close(pg, pr)


@pytest.mark.parametrize("with_theta", [False, True])
@pytest.mark.parametrize("blocks", [0, 1, 3])
@pytest.mark.parametrize("d_in,d_out", [(6, 9), (72, 72)], ids=["narrow", "wide"])
def test_low_rank_apply_gradcheck(with_theta, blocks, d_in, d_out, monkeypatch):
    # narrow: B·A is formed (cheaper there); wide: applied through the factors' own backward (at any
    # number of rows here: gradcheck needs few, and the path is what is under test)
    monkeypatch.setattr(lowrank, "FACTORED_MIN_WORK", 0)
    assert use_factors(d_in, d_out, 2, rows=7, fused_base=blocks > 0) == (d_in == 72)
    x = torch.randn(7, d_in, dtype=F64, requires_grad=True)
    A = torch.randn(2, d_in, dtype=F64, requires_grad=True)
    B = torch.randn(d_out, 2, dtype=F64, requires_grad=True)
    th = torch.tensor(0.7, dtype=F64, requires_grad=True) if with_theta else None
    M = None if blocks == 0 else torch.randn(d_out // blocks, d_in // blocks, dtype=F64, requires_grad=True)
    inputs = tuple(t for t in (x, A, B, th, M) if t is not None)

    def f(*ts):
        it = iter(ts)
        x_, A_, B_ = next(it), next(it), next(it)
        th_ = next(it) if with_theta else None
        M_ = next(it) if blocks else None
        return low_rank_apply(x_, A_, B_, th_, M_, max(blocks, 1))

    assert torch.autograd.gradcheck(f, inputs)
    if blocks != 1:  # differentiable twice (force training takes create_graph=True); with one 72 × 72
        # block M has 5184 entries, which make a second-order check take 15 s and add nothing here
        assert torch.autograd.gradgradcheck(f, inputs)
    # the path taken: the factors' own autograd node (B·A never formed), or a plain GEMM with B·A
    fn = f(*inputs).grad_fn
    while type(fn).__name__ in ("ViewBackward0", "ReshapeAliasBackward0", "UnsafeViewBackward0"):
        fn = fn.next_functions[0][0]
    node = type(fn).__name__
    assert (node == "_LowRankApplyBackward") == use_factors(d_in, d_out, 2, rows=7, fused_base=blocks > 0), node
    ref = (th if with_theta else 1.0) * (x @ (B @ A).T)
    if M is not None:
        ref = ref + x @ torch.kron(torch.eye(blocks, dtype=F64), M).T
    assert_close(f(*inputs), ref)
    # leading batch axes are kept
    assert low_rank_apply(torch.randn(3, 4, d_in, dtype=F64), A, B).shape == (3, 4, d_out)


@pytest.mark.parametrize("wide", [False, True], ids=["formed", "factored"])
@pytest.mark.parametrize("blocks", [0, 3])
def test_low_rank_apply_add_to_gradcheck(wide, blocks, monkeypatch):
    # add_to: the layer's own output summed in the same product; its gradient passes through unchanged
    monkeypatch.setattr(lowrank, "FACTORED_MIN_WORK", 0)
    d = 72 if wide else 6
    x = torch.randn(5, d, dtype=F64, requires_grad=True)
    A = torch.randn(2, d, dtype=F64, requires_grad=True)
    B = torch.randn(d, 2, dtype=F64, requires_grad=True)
    th = torch.tensor(0.3, dtype=F64, requires_grad=True)
    y = torch.randn(5, d, dtype=F64, requires_grad=True)
    M = torch.randn(d // 3, d // 3, dtype=F64, requires_grad=True) if blocks else None
    if blocks:
        assert torch.autograd.gradcheck(lambda *t: low_rank_apply(t[0], t[1], t[2], t[3], t[5], 3, add_to=t[4]),
                                        (x, A, B, th, y, M))
    else:
        assert torch.autograd.gradcheck(lambda *t: low_rank_apply(*t[:4], add_to=t[4]), (x, A, B, th, y))
    ref = y + th * (x @ (B @ A).T) + (0 if M is None else x @ torch.kron(torch.eye(3, dtype=F64), M).T)
    assert_close(low_rank_apply(x, A, B, th, M, 3 if blocks else 1, add_to=y), ref)


def test_low_rank_apply_under_bf16_autocast():
    x = torch.randn(16, 8, requires_grad=True)
    A, B = torch.randn(2, 8, requires_grad=True), torch.randn(8, 2, requires_grad=True)
    M = torch.randn(4, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = low_rank_apply(x, A, B, torch.tensor(0.5), M, 2)
    out.float().square().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float32 for t in (x, A, B, M))


@pytest.mark.parametrize("n", [3, 40], ids=["samples", "moments"])
def test_core_penalty_through_factors_equals_dense(n):
    sym = random_symmetry()
    term = low_rank_term(sym, rank=2)
    x = torch.randn(n, 5, dtype=F64)
    term(nn.Linear(5, 4).double(), torch.tensor(0.5, dtype=F64), x)
    A, B = term.lora_a, term.lora_b
    t = term.penalty_terms()
    assert t.samples == n
    assert_same_value_and_grads((t.lie, t.norm), reference_terms(A, B, x, sym), [A, B])
    assert float(t.lie.detach()) > 1e-3


def test_batched_moments_of_low_rank_layers_equal_dense():
    syms = [random_symmetry(6, 3, lie=3, group=0) for _ in range(3)]
    terms = [low_rank_term(s, rank=2) for s in syms]
    xs = [torch.randn(20, 6, dtype=F64) for _ in terms]
    for term, x in zip(terms, xs):
        term.record(x, x)
    keys = {t.batchable_penalty() for t in terms}
    assert len(keys) == 1 and next(iter(keys))[-1] == 2  # grouped, and by rank
    got = moment_penalties(terms, [(x, x.shape[0]) for x in xs])
    for term, x, g in zip(terms, xs, got):
        ref = reference_terms(term.lora_a, term.lora_b, x, term.symmetry)
        assert_same_value_and_grads((g.lie, g.norm), ref, [term.lora_a, term.lora_b])
    # the dense batched path gives the same numbers for W = B·A
    dense = [LinearRelaxation(s).double() for s in syms]
    with torch.no_grad():
        for d, t in zip(dense, terms):
            d.weight.copy_(t.lora_b @ t.lora_a)
    for d, g in zip(moment_penalties(dense, [(x, x.shape[0]) for x in xs]), got):
        assert_close(d.lie, g.lie)
        assert_close(d.norm, g.norm)


@pytest.mark.parametrize("shape", [(64, 64), (32, 32)], ids=["wide", "narrow"])
def test_low_rank_penalty_route_follows_its_threshold_and_equals_the_definition(shape, monkeypatch):
    """A group of rank-4 layers goes through the factors from PENALTY_FACTORED_MIN_RATIO on (64 × 64:
    ratio 8) and forms B·A below it (32 × 32: ratio 4); both give the definition's values and grads."""
    d_in, d_out = shape
    terms = [low_rank_term(random_symmetry(d_in, d_out, lie=2, group=1), rank=4) for _ in range(2)]
    xs = [torch.randn(80, d_in, dtype=F64) for _ in terms]
    calls = []
    real = lowrank.low_rank_moments
    monkeypatch.setattr("relax_plugins.moments.low_rank_moments", lambda *a: calls.append(1) or real(*a))
    got = moment_penalties(terms, [(x, x.shape[0]) for x in xs])
    assert bool(calls) == (d_in == 64) == use_factors(d_in, d_out, 4, penalty=True)
    for term, x, g in zip(terms, xs, got):
        ref = reference_terms(term.lora_a, term.lora_b, x, term.symmetry)
        assert_same_value_and_grads((g.lie, g.norm), ref, [term.lora_a, term.lora_b])


def test_low_rank_moments_never_form_the_dense_product():
    """The factored route's intermediates are r-sized on one side: no (d_out, d_in) tensor."""
    L, r, d_in, d_out, K = 2, 3, 40, 30, 2
    A = torch.randn(L, r, d_in, dtype=F64, requires_grad=True)
    B = torch.randn(L, d_out, r, dtype=F64, requires_grad=True)
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        lie, norm = low_rank_moments(A, B, torch.randn(L, K, d_in, d_in, dtype=F64),
                                     torch.randn(L, K, d_out, d_out, dtype=F64),
                                     torch.eye(d_in, dtype=F64).expand(L, d_in, d_in).contiguous())
    assert not any(s[-2:] in ((d_out, d_in), (d_in, d_out)) for s in shapes)


def test_core_forward_through_factors_equals_dense():
    sym = random_symmetry()
    term = low_rank_term(sym, rank=2)
    base = nn.Linear(5, 4).double()
    x = torch.randn(3, 7, 5, dtype=F64, requires_grad=True)
    theta = torch.tensor(0.6, dtype=F64)
    out = term(base, theta, x)
    ref = base(x) + theta * x @ (term.lora_b @ term.lora_a).T
    assert_same_value_and_grads((out.square().sum(),), (ref.square().sum(),), [x, term.lora_a, term.lora_b])


def test_relaxed_toy_model_low_rank_equals_dense():
    from relax_toy.layers import SO2Linear

    torch.manual_seed(0)
    net = nn.Sequential(SO2Linear(3, 4), SO2Linear(4, 2)).double()
    x = torch.randn(64, 6, dtype=F64)
    low = rp.relax(net, rank=2)
    dense = rp.relax(nn.Sequential(SO2Linear(3, 4), SO2Linear(4, 2)).double())
    dense.load_state_dict(low.state_dict(), strict=False)
    with torch.no_grad():
        for (_, lo), (_, de) in zip(rp.relaxed_modules(low), rp.relaxed_modules(dense)):
            lo.term.lora_b.normal_()
            de.base.load_state_dict(lo.base.state_dict())
            de.term.weight.copy_(lo.term.lora_b @ lo.term.lora_a)
    rp.set_theta(low, 0.4)
    rp.set_theta(dense, 0.4)
    assert_close(low(x), dense(x))
    for form in ("sqrt", "mean", "paper"):
        assert_close(rp.penalty(low, form=form), rp.penalty(dense, form=form))


# -- vector neurons ----------------------------------------------------------------------------


@pytest.mark.parametrize("use_gram", [False, True], ids=["samples", "gram"])
@pytest.mark.parametrize("group", ["SO(3)", "O(3)"])
def test_vn_penalty_through_factors_equals_dense(use_gram, group):
    vnp = pytest.importorskip("relax_vn.plugin")
    torch.manual_seed(3)
    term = vnp.VNLinearRelaxation(4, 3, group=group, rank=2, penalty_samples=None).double()
    term._use_gram_low_rank = lambda *a: use_gram
    with torch.no_grad():
        term.lora_b.normal_()
    x = torch.randn(2, 5, 3, 4, dtype=F64)  # [B, N, 3, C]
    term(nn.Linear(4, 3, bias=False).double(), torch.tensor(0.7, dtype=F64), x)
    t = term.penalty_terms()
    ref = reference_terms(term.lora_a, term.lora_b, term._x, term.symmetry)
    assert_same_value_and_grads((t.lie, t.norm), ref, [term.lora_a, term.lora_b])
    assert float(t.lie.detach()) > 1e-3


def test_vn_fused_low_rank_forward_equals_dense():
    vnp = pytest.importorskip("relax_vn.plugin")
    torch.manual_seed(4)
    term = vnp.VNLinearRelaxation(4, 5, rank=3).double()
    with torch.no_grad():
        term.lora_b.normal_()
    base = nn.Linear(4, 5, bias=False).double()
    x = torch.randn(2, 6, 3, 4, dtype=F64, requires_grad=True)
    theta = torch.tensor(0.3, dtype=F64, requires_grad=True)
    out = term(base, theta, x)
    W = (term.lora_b @ term.lora_a).reshape(3, 5, 3, 4)  # [j, o, i, c], xyz-major
    ref = base(x) + theta * torch.einsum("joic,bnic->bnjo", W, x)
    params = [x, theta, base.weight, term.lora_a, term.lora_b]
    assert_same_value_and_grads((out.square().sum(),), (ref.square().sum(),), params)


saved_bytes = saved_tensor_bytes


@pytest.mark.parametrize("adapter", ["core", "vn"])
def test_low_rank_saves_no_more_than_dense(adapter):
    """Bytes autograd saves for one forward + penalty: rank 4 ≤ dense up to the size of the factors
    (x Aᵀ, n-sized, is never kept)."""
    results = {}
    for rank in (None, 4):
        torch.manual_seed(0)
        if adapter == "vn":
            vnp = pytest.importorskip("relax_vn.plugin")
            base = nn.Linear(16, 16, bias=False)
            term = vnp.VNLinearRelaxation(16, 16, rank=rank)
            x = torch.randn(4, 500, 3, 16)
        else:
            base = nn.Linear(32, 32)
            term = LinearRelaxation(random_symmetry(32, 32, lie=3, group=0).float(), rank=rank)
            x = torch.randn(2000, 32)
        theta = torch.tensor(0.5)

        def step(term=term, base=base, theta=theta, x=x):
            out = term(base, theta, x)
            t = term.penalty_terms()
            return out.square().sum() + t.lie + t.norm

        results[rank] = saved_bytes(step)
        if rank is not None:  # B·A formed on narrow layers may keep the factors: parameter-sized, not n-sized
            slack = 2 * sum(p.numel() * p.element_size() for p in term.parameters())
    assert results[4] <= results[None] + slack, results


@pytest.mark.parametrize("batch", [(40,), (3, 20)])
def test_e3nn_low_rank_forward_and_penalty_equal_dense(batch):
    pytest.importorskip("e3nn")
    from e3nn import o3
    from relax_e3nn import E3nnLinearRelaxation

    torch.manual_seed(5)
    lin = o3.Linear("2x0e + 2x1o", "1x0e + 2x1o").double()
    low = E3nnLinearRelaxation(lin, rank=2).double()
    dense = E3nnLinearRelaxation(lin).double()
    with torch.no_grad():
        low.lora_b.normal_()
        dense.weight.copy_(low.lora_b @ low.lora_a)
    x = torch.randn(*batch, 8, dtype=F64)
    theta = torch.tensor(0.5, dtype=F64)
    assert_close(low(lin, theta, x), dense(lin, theta, x))
    t_low = moment_penalties([low], [(low._x, low._x.shape[0])])[0]
    t_dense = moment_penalties([dense], [(dense._x, dense._x.shape[0])])[0]
    assert_close(t_low.lie, t_dense.lie)
    assert_close(t_low.norm, t_dense.norm)
    assert_same_value_and_grads((t_low.lie, t_low.norm), reference_terms(low.lora_a, low.lora_b, low._x, low.symmetry),
                                [low.lora_a, low.lora_b])


def _factored_vs_formed(build, x: Tensor, monkeypatch) -> None:
    """The same relaxed low-rank model through the factored path and with B·A formed (forced by a
    work threshold no layer reaches): outputs and every gradient equal to float64 precision."""
    results = []
    for min_work in (lowrank.FACTORED_MIN_WORK, float("inf")):
        monkeypatch.setattr(lowrank, "FACTORED_MIN_WORK", min_work)
        torch.manual_seed(0)
        model = rp.relax(build().double(), rank=4)
        with torch.no_grad():
            for _, layer in rp.relaxed_modules(model):
                layer.term.lora_b.normal_()
        rp.set_theta(model, 0.7)
        xx = x.clone().requires_grad_()
        out = model(xx)
        fn = out.grad_fn
        seen, stack = set(), [fn]
        while stack:
            f = stack.pop()
            if f is not None and f not in seen:
                seen.add(f)
                stack.extend(n for n, _ in f.next_functions)
        factored = any(type(f).__name__ == "_LowRankApplyBackward" for f in seen)
        assert factored == (min_work != float("inf"))
        (out * torch.randn_like(out, generator=torch.Generator().manual_seed(1))).sum().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        results.append((out.detach(), xx.grad, grads))
    (o1, gx1, g1), (o2, gx2, g2) = results
    assert_close(o1, o2)
    assert_close(gx1, gx2)
    assert len(g1) == len(g2) and all(torch.allclose(a, b, rtol=1e-10, atol=1e-12) for a, b in zip(g1, g2))


def test_e3nn_layer_through_its_factors_equals_formed(monkeypatch):
    o3 = pytest.importorskip("e3nn.o3")
    irreps = o3.Irreps("16x0e + 16x1o")  # 64 wide, 300 rows: 1.2e6 multiply-adds, ratio 8
    _factored_vs_formed(lambda: nn.Sequential(o3.Linear(irreps, irreps)),
                        torch.randn(300, irreps.dim, dtype=F64), monkeypatch)


def test_vn_layer_through_its_factors_equals_formed(monkeypatch):
    layers = pytest.importorskip("relax_vn.layers")
    # 64 channels: d = 192, fused-base ratio 24; 40 points x 2 clouds = 80 rows of 192 x 192
    _factored_vs_formed(lambda: nn.Sequential(layers.VNLinear(64, 64)),
                        torch.randn(2, 64, 3, 40, dtype=F64), monkeypatch)


def test_layer_cost_benchmark_runs_on_small_shapes(capsys):
    from examples.bench import layer_cost

    rows = layer_cost.main(["--shapes", "40x8x6,30x6x8", "--rank", "2", "--repeats", "2"])
    assert [(r["rows"], r["d_in"], r["d_out"]) for r in rows] == [(40, 8, 6), (30, 6, 8)]
    for r in rows:
        assert r["base_ms"] > 0 and all(math.isfinite(v) for v in r.values())
        assert set(r) >= {"dense", "rank 2", "rank 2, no input grad", "empty node"}
    assert capsys.readouterr().out.count("\n| ") == 3  # header rule and two rows after the header


def test_low_rank_init_std_gives_w_entries_of_that_std():
    torch.manual_seed(0)
    term = LinearRelaxation(random_symmetry(64, 48, lie=1, group=0), rank=8, init_std=0.05)
    W = term.dense().detach()
    assert abs(float(W.std()) / 0.05 - 1) < 0.1  # 3072 entries: the sample std is within a few %
    assert float(LinearRelaxation(random_symmetry(64, 48, lie=1, group=0), rank=8).dense().abs().max()) == 0.0


def test_relax_with_rank_and_init_std_changes_outputs_like_dense():
    o3 = pytest.importorskip("e3nn.o3")
    x = torch.randn(10, 5)
    for rank in (None, 2):
        model = rp.relax(nn.Sequential(o3.Linear("2x0e + 1x1o", "2x0e + 1x1o")), rank=rank, init_std=0.5)
        assert float(model[0].term.dense().detach().abs().sum()) > 0
        base = copy.deepcopy(model[0].base)
        rp.set_theta(model, 1.0)
        assert not torch.allclose(model(x), base(x))
