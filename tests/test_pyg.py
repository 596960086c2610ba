"""torch-geometric adapter: irreps and generators, closed-form projection, declared EGNN layers
(relaxation breaks rotations only, projection restores E(3) equivariance, batching)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("torch_geometric")

import relax_pyg  # noqa: E402
from geometry import random_orthogonal  # noqa: E402
from relax_pyg.irreps import Field, _harmonics, field_generators, irrep_generators, parse_irreps  # noqa: E402
from relax_pyg.spec import LayerSpec  # noqa: E402
from relax_pyg.term import PygRelaxation  # noqa: E402
from shared_layers import VecLayer  # noqa: E402

import relax_plugins as rp  # noqa: E402
from examples.egnn.model import EGNN, EGNNLayer  # noqa: E402
from relax_plugins.symmetry import intertwiner_basis, lie_defect  # noqa: E402


# ---------------------------------------------------------------------------------------------
# irreps, generators
# ---------------------------------------------------------------------------------------------
def test_parse_irreps_and_errors():
    assert [(m, str(i)) for m, i in parse_irreps(" 3x0o + 1e ")] == [(3, "0o"), (1, "1e")]
    for bad in ("", "3x", "1q", "x1o", "2x1o+"):
        with pytest.raises(ValueError):
            parse_irreps(bad)
    with pytest.raises(ValueError):
        Field("1o", layout="mul_xyz")


@pytest.mark.parametrize("l", [1, 2, 3])
def test_generators_integrate_to_the_harmonics_rotation(l):
    """exp(t·X_k) Y(v) = Y(exp(t·A_k) v): the generators are those of the documented basis."""
    A = irrep_generators(1, torch.float64)
    X = irrep_generators(l, torch.float64)
    v = torch.randn(6, 3, dtype=torch.float64)
    for k in range(3):
        R = torch.linalg.matrix_exp(0.7 * A[k])
        lhs = _harmonics(l, v) @ torch.linalg.matrix_exp(0.7 * X[k]).T
        rhs = _harmonics(l, v @ R.T)
        assert torch.allclose(lhs, rhs, atol=1e-10)


def test_l2_basis_is_visnets():
    from torch_geometric.nn.models.visnet import Sphere

    v = torch.randn(7, 3, dtype=torch.float64)
    assert torch.allclose(Sphere(lmax=2)(v), torch.cat([v, _harmonics(2, v)], -1), atol=1e-12)


_irrep = st.sampled_from(["0e", "0o", "1o", "1e", "2e", "2o"])
_fields = st.builds(
    lambda terms, layout: Field("+".join(f"{m}x{ir}" for m, ir in terms), layout),
    st.lists(st.tuples(st.integers(1, 2), _irrep), min_size=1, max_size=3),
    st.sampled_from(["mul_ir", "ir_mul"]),
)


@given(f=_fields)
def test_field_generators_satisfy_so3_relations(f):
    X = field_generators(f, torch.float64)
    for a, b, c in ((0, 1, 2), (1, 2, 0), (2, 0, 1)):
        assert torch.allclose(X[a] @ X[b] - X[b] @ X[a], X[c], atol=1e-10)
    assert torch.allclose(X + X.transpose(1, 2), torch.zeros_like(X))


class _Id(torch.nn.Module):
    def forward(self, a, b=None):
        return a


def _term(fin: list[Field], fout: Field, group: str) -> PygRelaxation:
    inputs = dict(zip(["a", "b"], fin))
    return PygRelaxation(LayerSpec(inputs, fout, group=group).resolve(_Id()))


@given(fa=_fields, fb=_fields, fo=_fields, group=st.sampled_from(["O(3)", "SO(3)"]), seed=st.integers(0, 2**16))
def test_closed_form_projection_equals_dense_nullspace(fa, fb, fo, group, seed):
    torch.manual_seed(seed)
    term = _term([fa, fb], fo, group).double()
    W = torch.randn(term.symmetry.dim_out, term.symmetry.dim_in, dtype=torch.float64)
    Q = intertwiner_basis(term.symmetry)
    ref = (Q @ (Q.T @ W.reshape(-1))).reshape(W.shape)
    P = term.project_dense(W)
    assert torch.allclose(P, ref, atol=1e-9)
    assert torch.allclose(term.project_dense(P), P, atol=1e-12)  # idempotent
    x = torch.randn(4, W.shape[1], dtype=torch.float64)
    assert float(lie_defect(P, x, term.symmetry).max()) < 1e-18


# ---------------------------------------------------------------------------------------------
# EGNN (a declared MessagePassing layer)
# ---------------------------------------------------------------------------------------------


def _graphs(dtype, sizes=(5, 5, 5)):
    batch = torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(sizes)])
    edges = relax_pyg.fully_connected_edge_index(batch)
    n = batch.shape[0]
    loc, vel = torch.randn(n, 3, dtype=dtype), torch.randn(n, 3, dtype=dtype)
    charges = torch.randint(0, 2, (n, 1)).to(dtype) * 2 - 1
    return loc, vel, charges, edges, batch


@torch.no_grad()
def _equivariance_errors(model, loc, vel, charges, edges, batch, seed=1):
    """Relative errors of f(Q x + t) vs Q f(x) + t for a rotation, a reflection and a translation."""
    gen = torch.Generator().manual_seed(seed)
    out = model(loc, vel, charges, edges, batch)
    scale = out.norm()
    errs = {}
    for name, det in (("rotation", 1.0), ("reflection", -1.0)):
        Q = random_orthogonal(det, gen, loc.dtype)
        errs[name] = float((model(loc @ Q.T, vel @ Q.T, charges, edges, batch) - out @ Q.T).norm() / scale)
    t = torch.randn(int(batch.max()) + 1, 3, generator=gen, dtype=loc.dtype)[batch] * 3
    errs["translation"] = float((model(loc + t, vel, charges, edges, batch) - (out + t)).norm() / scale)
    return errs


def _tol(dtype):
    return 1e-12 if dtype == torch.float64 else 1e-5


def test_egnn_relax_keeps_outputs_then_breaks_rotations_only(dtype):
    data = _graphs(dtype)
    base = EGNN(hidden=8, layers=2).to(dtype)
    ref = base(*data)
    model = rp.relax(copy.deepcopy(base), adapters=["pyg"], init_std=0.3)
    assert [n for n, _ in rp.relaxed_modules(model)] == ["layers.0", "layers.1"]
    assert torch.equal(model(*data), ref)  # θ = 0: the function is unchanged
    rp.set_theta(model, 1.0)
    assert not torch.allclose(model(*data), ref)
    errs = _equivariance_errors(model, *data)
    assert errs["rotation"] > 1e-3 and errs["reflection"] > 1e-3
    assert errs["translation"] < 100 * _tol(dtype)  # positions enter W relative to the centroid


def test_egnn_equivariant_part_of_w_keeps_equivariance(dtype):
    """θ·P(W) with θ = 1 must leave the relaxed model E(3)-equivariant: checks generators, parity
    and the per-graph centring end to end."""
    data = _graphs(dtype)
    model = rp.relax(EGNN(hidden=8, layers=2).to(dtype), adapters=["pyg"], init_std=0.3)
    rp.set_theta(model, 1.0)
    with torch.no_grad():
        for _, layer in rp.relaxed_modules(model):
            layer.term.weight.copy_(layer.term.projected())
    assert not torch.allclose(model(*data), rp.project(copy.deepcopy(model))(*data))
    errs = _equivariance_errors(model, *data)
    assert max(errs.values()) < 100 * _tol(dtype), errs


def test_egnn_project_restores_original_and_equivariance(dtype):
    data = _graphs(dtype)
    base = EGNN(hidden=8, layers=2).to(dtype)
    keys = list(base.state_dict())
    model = rp.relax(copy.deepcopy(base), adapters=["pyg"])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    rp.set_theta(model, 1.0)
    target = torch.randn_like(data[0])
    for _ in range(3):
        loss = (model(*data) - target).square().mean() + rp.penalty(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(float(m.term.weight.detach().abs().max()) > 0 for _, m in rp.relaxed_modules(model))
    assert _equivariance_errors(model, *data)["rotation"] > 1e-4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # EGNNLayer cannot hold θ·P(W): dropped with a warning
        projected = rp.project(model, merge=True)
    assert all(type(m) is EGNNLayer for m in projected.layers)
    assert list(projected.state_dict()) == keys
    fresh = EGNN(hidden=8, layers=2).to(dtype)
    fresh.load_state_dict(projected.state_dict())  # loadable by code that never saw relax_plugins
    errs = _equivariance_errors(fresh, *data)
    assert max(errs.values()) < 100 * _tol(dtype), errs


def test_batched_graphs_match_single_graphs():
    """Relaxed (θ = 1, random W): a batch of graphs of different sizes gives, per graph, exactly
    what each graph gives alone — the centroid is per graph, never over the whole batch."""
    dtype = torch.float64
    loc, vel, charges, edges, batch = _graphs(dtype, sizes=(4, 6, 5))
    model = rp.relax(EGNN(hidden=8, layers=2).double(), adapters=["pyg"], init_std=0.3)
    rp.set_theta(model, 1.0)
    out = model(loc, vel, charges, edges, batch)
    start = 0
    for n in (4, 6, 5):
        sl = slice(start, start + n)
        b1 = torch.zeros(n, dtype=torch.long)
        single = model(loc[sl], vel[sl], charges[sl], relax_pyg.fully_connected_edge_index(b1), b1)
        assert torch.allclose(out[sl], single, atol=1e-12)
        start += n


def test_empty_graphs_in_a_batch():
    """Batch.from_data_list with empty graphs gives graph ids past the node count ([0, 0, 5]
    for 3 nodes): the relaxed layer runs and centres each graph on its own centroid."""
    from torch_geometric.data import Batch, Data

    torch.manual_seed(0)
    sizes = (2, 0, 0, 0, 0, 1)
    graphs = [Data(pos=torch.randn(n, 3, dtype=torch.float64), vel=torch.randn(n, 3, dtype=torch.float64),
                   q=torch.ones(n, 1, dtype=torch.float64), num_nodes=n,
                   edge_index=relax_pyg.fully_connected_edge_index(torch.zeros(n, dtype=torch.long)))
              for n in sizes]
    b = Batch.from_data_list(graphs)
    assert int(b.batch.max()) >= b.num_nodes
    model = rp.relax(EGNN(hidden=4, layers=2).double(), adapters=["pyg"], init_std=0.3)
    rp.set_theta(model, 1.0)
    out = model(b.pos, b.vel, b.q, b.edge_index, b.batch)
    singles = [model(g.pos, g.vel, g.q, g.edge_index, torch.zeros(g.num_nodes, dtype=torch.long))
               for g in graphs if g.num_nodes]
    assert torch.allclose(out, torch.cat(singles), atol=1e-12)
    assert torch.isfinite(rp.penalty(model))


def test_penalty_zero_on_intertwiners_and_trains_w_only():
    data = _graphs(torch.float64)
    model = rp.relax(EGNN(hidden=4, layers=1).double(), adapters=["pyg"], init_std=0.3)
    rp.set_theta(model, 1.0)
    model(*data)
    term = model.layers[0].term
    assert float(term.penalty_terms().lie.detach()) > 1e-3
    pen = rp.penalty(model, lie=1.0, norm=0.0)
    grads = torch.autograd.grad(pen, [p for p in model.parameters()], allow_unused=True)
    named = dict(zip([n for n, _ in model.named_parameters()], grads))
    assert named["layers.0.term.weight"] is not None and float(named["layers.0.term.weight"].abs().max()) > 0
    assert all(g is None or float(g.abs().max()) == 0 for n, g in named.items() if "term" not in n)
    with torch.no_grad():
        term.weight.copy_(term.projected())
    model(*data)
    assert float(term.penalty_terms().lie.detach()) < 1e-20
    assert float(term.penalty_terms().norm.detach()) > 0


def test_projection_of_position_block_is_trace_over_three():
    """Hom(1o, 1o) = span{I}: the pos → pos block projects to tr(W)/3 · I."""
    term = rp.relax(torch.nn.Sequential(EGNNLayer(2)), adapters=["pyg"])[0].term.double()
    W = torch.randn(term.symmetry.dim_out, term.symmetry.dim_in, dtype=torch.float64)
    P = term.project_dense(W)
    blk = slice(2, 5)  # layout: [h (2) | pos (3) | vel (3)] -> [h (2) | pos (3)]
    assert torch.allclose(P[blk, blk], torch.eye(3, dtype=torch.float64) * W[blk, blk].trace() / 3)
    assert torch.allclose(P[blk, 5:8], torch.eye(3, dtype=torch.float64) * W[blk, 5:8].trace() / 3)
    assert float(P[:2, 2:].abs().max()) == 0 and float(P[2:, :2].abs().max()) == 0
    assert torch.allclose(P[:2, :2], W[:2, :2])


# ---------------------------------------------------------------------------------------------
# declarations
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def declared_vec_layer():
    relax_pyg.declare(
        VecLayer, inputs={"vec": "2x1o", "pos": "pos"}, outputs="2x1o", edge_index="edge_index", pos_center="edges"
    )
    yield VecLayer
    relax_pyg.undeclare(VecLayer)


def test_keyword_args_edge_centring_and_batching(declared_vec_layer, dtype):
    batch = torch.tensor([0, 0, 0, 1, 1])
    edges = relax_pyg.fully_connected_edge_index(batch)
    vec, pos = torch.randn(5, 2, 3, dtype=dtype), torch.randn(5, 3, dtype=dtype)
    model = rp.relax(torch.nn.Sequential(VecLayer().to(dtype)), init_std=0.5)[0]
    rp.set_theta(model, 1.0)
    out = model(vec, pos, edge_index=edges)
    shifted = model(vec, pos + torch.tensor([1.0, -2.0, 3.0], dtype=dtype), edge_index=edges)
    assert torch.allclose(out, shifted, atol=_tol(dtype) * 100)  # relative positions only
    e1 = relax_pyg.fully_connected_edge_index(batch[:3])
    assert torch.allclose(out[:3], model(vec[:3], pos[:3], edge_index=e1), atol=_tol(dtype) * 100)
    Q = random_orthogonal(1.0, torch.Generator().manual_seed(3), dtype)
    rot = model(vec @ Q.T, pos @ Q.T, edge_index=edges)
    assert float((rot - out @ Q.T).detach().norm() / out.detach().norm()) > 1e-3


def test_declaration_errors(declared_vec_layer):
    class Bad(torch.nn.Module):
        def forward(self, h):
            return h

    relax_pyg.declare(Bad, inputs={"x": "2x0e"}, outputs="2x0e")
    try:
        with pytest.raises(rp.AdapterError, match="no argument"):
            rp.relax(torch.nn.Sequential(Bad()), adapters=["pyg"])
    finally:
        relax_pyg.undeclare(Bad)
    with pytest.raises(ValueError):
        relax_pyg.declare(Bad, inputs={"h": "2x0e"}, outputs="2x0e", group="E(3)")
    with pytest.raises(TypeError):
        relax_pyg.declare(lambda x: x, inputs={"h": "2x0e"}, outputs="2x0e")
    model = rp.relax(torch.nn.Sequential(VecLayer(c=3)))[0]  # declared as 2x1o, has 3 channels
    with pytest.raises(ValueError, match="dimension"):
        model(torch.randn(4, 3, 3), torch.randn(4, 3), edge_index=torch.zeros(2, 1, dtype=torch.long))


def test_misdeclared_outputs_and_mixed_node_counts_are_named():
    """A tuple-returning layer declared with one output field, and a declared input of another row
    count (edge features next to node features): errors that say so, not torch's."""

    class Pair(torch.nn.Module):
        def forward(self, h, pos):
            return h, pos

    relax_pyg.declare(Pair, inputs={"h": "2x0e"}, outputs="2x0e")
    try:
        layer = rp.relax(torch.nn.Sequential(Pair()), adapters=["pyg"])[0]
        with pytest.raises(ValueError, match="output 0 of Pair is a tuple"):
            layer(torch.randn(4, 2), torch.randn(4, 3))
        rp.project(layer)
        relax_pyg.declare(Pair, inputs={"h": "2x0e", "pos": "pos"}, outputs=("2x0e", "pos"))
        layer = rp.relax(torch.nn.Sequential(Pair()), adapters=["pyg"])[0]
        with pytest.raises(ValueError, match="different node counts"):
            layer(torch.randn(4, 2), torch.randn(6, 3))
    finally:
        relax_pyg.undeclare(Pair)


def test_class_attribute_declaration_and_merge_hook():
    calls = []

    def merge(layer, delta, term):
        calls.append(delta.shape)
        return {"scale": delta.trace() / 3}  # what to add; the core adds it

    class Scaled(torch.nn.Module):
        __relax_pyg__ = LayerSpec({"v": "1o"}, "1o", merge=merge)

        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.tensor(1.0, dtype=torch.float64))

        def forward(self, v):
            return self.scale * v

    model = rp.relax(torch.nn.Sequential(Scaled()), adapters=["pyg"], init_std=0.5)
    rp.set_theta(model, 0.5)
    v = torch.randn(6, 3, dtype=torch.float64)
    term = model[0].term
    with torch.no_grad():
        term.weight.copy_(term.projected())  # an intertwiner: the merge is exact
    before = model(v)
    merged = rp.project(model, merge=True)
    assert calls == [torch.Size([3, 3])]
    assert torch.allclose(merged(v), before, atol=1e-12)


def test_relaxation_survives_torch_compile():
    """The relaxation lives in the module tree, not in PyG's message hooks (which compiled
    propagate skips), so a compiled relaxed model still computes f + θ·W·x."""
    data = _graphs(torch.float32)
    model = rp.relax(EGNN(hidden=8, layers=2), adapters=["pyg"], init_std=0.3)
    rp.set_theta(model, 1.0)
    eager = model(*data)
    base = rp.project(copy.deepcopy(model))(*data)
    compiled = torch.compile(model, backend="aot_eager")
    out = compiled(*data)
    assert torch.allclose(out, eager, atol=1e-5)
    assert not torch.allclose(out, base, atol=1e-3)


def test_low_rank_relaxation_starts_silent_and_learns():
    data = _graphs(torch.float64)
    base = EGNN(hidden=8, layers=1).double()
    ref = base(*data)
    model = rp.relax(copy.deepcopy(base), adapters=["pyg"], rank=2)
    term = model.layers[0].term
    assert term.dense().shape == (8 + 3, 8 + 3 + 3) and float(term.dense().detach().abs().max()) == 0
    rp.set_theta(model, 1.0)
    assert torch.equal(model(*data), ref)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = (model(*data) - torch.randn_like(ref)).square().mean()
    loss.backward()
    opt.step()
    assert float(term.dense().detach().abs().max()) > 0
    assert not torch.allclose(model(*data), ref)


@given(fa=_fields, fo=_fields, group=st.sampled_from(["O(3)", "SO(3)"]), seed=st.integers(0, 2**16))
def test_structured_penalty_equals_dense_generators(fa, fo, group, seed):
    """The adapter's penalty (per-irrep generators, only W's columns on non-scalar inputs) must
    give the numbers of the core's dense lie_defect / group_defect."""
    _check_penalty(fa, fo, group, seed)


def _check_penalty(fa, fo, group, seed):
    from relax_plugins.symmetry import group_defect

    torch.manual_seed(seed)
    term = _term([fa, Field("pos")], fo, group).double()
    with torch.no_grad():
        term.weight.normal_()
    if seed % 2:  # also the low-rank form
        term = PygRelaxation(term.spec, rank=2).double()
        with torch.no_grad():
            term.lora_b.normal_()
    x = torch.randn(5, term.symmetry.dim_in, dtype=torch.float64)
    term._x = x
    got = term.penalty_terms()
    W = term.dense().detach()
    ref = lie_defect(W, x, term.symmetry).sum() + group_defect(W, x, term.symmetry).sum()
    assert torch.allclose(got.lie, ref, rtol=1e-10, atol=1e-12)
    assert torch.allclose(got.norm, (x @ W.T).square().sum())


@given(fa=_fields, fo=_fields, group=st.sampled_from(["O(3)", "SO(3)"]), seed=st.integers(0, 2**16),
       rows=st.integers(1, 40))
def test_moment_and_structured_penalties_agree(fa, fo, group, seed, rows):
    """Narrow layers with more samples than input dimensions take the core's second-moment form;
    it must give the numbers of the structured per-node form (and both the dense generators')."""
    torch.manual_seed(seed)
    term = _term([fa, Field("pos")], fo, group).double()
    with torch.no_grad():
        term.weight.normal_()
    x = torch.randn(rows, term.symmetry.dim_in, dtype=torch.float64)
    term._x = x
    moment = term.penalty_terms()
    assert (term.batchable_penalty() is not None) == (rows > term.symmetry.dim_in)
    term.moment_max_dim = 0  # force the structured form
    assert term.batchable_penalty() is None
    structured = term.penalty_terms()
    assert torch.allclose(moment.lie, structured.lie, rtol=1e-10, atol=1e-10)
    assert torch.allclose(moment.norm, structured.norm, rtol=1e-10, atol=1e-10)
    assert moment.samples == structured.samples == rows


def test_egnn_layers_share_one_batched_penalty_and_wide_layers_stay_structured():
    from relax_plugins.penalties import _all_penalty_terms

    data = _graphs(torch.float64)
    model = rp.relax(EGNN(hidden=8, layers=2).double(), adapters=["pyg"], init_std=0.1)
    rp.set_theta(model, 1.0)
    model(*data)
    keys = {layer.term.batchable_penalty() for _, layer in rp.relaxed_modules(model)}
    assert len(keys) == 1 and None not in keys
    exact = _all_penalty_terms(list(rp.relaxed_modules(model)))
    for (_, layer), (_, t) in zip(rp.relaxed_modules(model), exact):
        layer.term.moment_max_dim = 0
        ref = layer.term.penalty_terms()
        assert float(ref.lie.detach()) > 0 and torch.allclose(t.lie, ref.lie, rtol=1e-10)
        assert torch.allclose(t.norm, ref.norm, rtol=1e-10)


def test_graph_sizes_cache_follows_the_batch_vector_and_its_in_place_changes():
    """Centring reuses the graph sizes of the last batch vector seen (every layer of a model centres on
    the same one), and recomputes them for another vector or after an in-place change of this one."""
    from relax_pyg import term as pyg_term
    from relax_pyg.term import center_positions

    pos = torch.randn(6, 3, dtype=torch.float64)

    def centred_by_hand(b):
        out = pos.clone()
        for g in b.unique():
            out[b == g] -= pos[b == g].mean(0)
        return out

    batch = torch.tensor([0, 0, 0, 1, 1, 2])
    first = center_positions(pos, batch)
    assert torch.allclose(first, centred_by_hand(batch))
    assert pyg_term._SIZES["last"][0] is batch
    assert torch.equal(center_positions(pos, batch), first)  # from the cache
    batch[3:] = 1  # in place: version bump, sizes recomputed
    assert torch.allclose(center_positions(pos, batch), centred_by_hand(batch))
    other = torch.tensor([0, 1, 1, 1, 1, 1])
    assert torch.allclose(center_positions(pos, other), centred_by_hand(other))
    with torch.inference_mode():  # inference tensors have no version counter: never cached
        inf_batch = torch.tensor([0, 0, 1, 1, 1, 1])
        assert torch.allclose(center_positions(pos, inf_batch), centred_by_hand(inf_batch))
    assert pyg_term._SIZES["last"][0] is other
