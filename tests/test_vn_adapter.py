"""Tests of the vector-neuron adapter (relax_vn): generators, penalties, projection, merge,
structural detection on first-party layers and on an independently written VN layer file."""

from __future__ import annotations

import importlib.util
import pickle
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from relax_vn import plugin as vnp
from relax_vn.layers import (
    VNBatchNorm,
    VNLeakyReLU,
    VNLinear,
    VNLinearLeakyReLU,
    VNMaxPool,
    VNStdFeature,
    graph_feature_cross,
    vn_mean_pool,
)
from torch import nn

import relax_plugins as rp
from relax_plugins.symmetry import group_defect, intertwiner_basis, lie_defect

FIXTURE = Path(__file__).parent / "fixtures" / "vn_layers_thirdparty.py"


def _load_fixture():
    name = "vn_layers_thirdparty_fixture"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, FIXTURE)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # inspect.getsource finds classes through sys.modules
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tp():
    return _load_fixture()


def random_rotation(seed: int, dtype=torch.float64, proper: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    if (torch.det(q) > 0) != proper:
        q[:, 0] = -q[:, 0]
    return q.to(dtype)


def rotate(R: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """R acting on axis 2 of [B, C, 3, *S]."""
    return torch.einsum("ij,bcj...->bci...", R, x)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).norm() / b.norm().clamp_min(1e-30)).detach())


def claimed(model: nn.Module) -> set[str]:
    return {n for n, _ in rp.relaxed_modules(model)}


def randomise_relaxation(model: nn.Module, std: float = 0.3, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in rp.relaxed_modules(model):
            w = layer.term.weight
            w.copy_(torch.randn(w.shape, generator=g, dtype=torch.float64).to(w.dtype) * std)


class SmallVNNet(nn.Module):
    """First-party layers, every kind, including a [B, C, 3, N, k] and a [B, C, 3] stage."""

    def __init__(self, n_out: int = 3, k: int = 4) -> None:
        super().__init__()
        self.k = k
        self.edge = VNLinearLeakyReLU(3, 6)
        self.lin = VNLinear(6, 8)
        self.act = VNLeakyReLU(8, share_nonlinearity=True)
        self.bn = VNBatchNorm(8)
        self.pool = VNMaxPool(8)
        self.glob = VNLinearLeakyReLU(8, 8)
        self.std = VNStdFeature(8)
        self.head = nn.Linear(24, n_out)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        x = vn_mean_pool(self.edge(graph_feature_cross(points, self.k)))  # [B, 6, 3, N]
        x = self.bn(self.act(self.lin(x)))
        g = self.glob(self.pool(x))  # [B, 8, 3]
        x_std, _ = self.std(g)
        return self.head(x_std.flatten(1))


# -- generators, projection, penalties --------------------------------------------------------


def test_so3_basis_is_a_lie_algebra_basis():
    L = vnp.so3_basis(torch.float64)
    for a, b, c in ((0, 1, 2), (1, 2, 0), (2, 0, 1)):
        assert torch.allclose(L[a] @ L[b] - L[b] @ L[a], L[c])
    # exp(t L_z) rotates x towards y
    R = torch.linalg.matrix_exp(0.3 * L[2])
    e_x = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    expected = torch.tensor([0.3, 0.3, 0.0], dtype=torch.float64)
    expected = torch.stack((expected[0].cos(), expected[1].sin(), expected[2]))
    assert torch.allclose(R @ e_x, expected)


@given(c_in=st.integers(1, 3), c_out=st.integers(1, 3), group=st.sampled_from(["SO(3)", "O(3)"]))
def test_intertwiner_space_is_identity_blocks(c_in, c_out, group):
    torch.manual_seed(c_in * 10 + c_out)
    term = vnp.VNLinearRelaxation(c_in, c_out, group=group).double()
    Q = intertwiner_basis(term.symmetry)
    assert Q.shape[1] == c_in * c_out  # dim Hom_G(C_in ⊗ R³, C_out ⊗ R³) = C_in·C_out
    W = torch.randn(3 * c_out, 3 * c_in, dtype=torch.float64)
    generic = (Q @ (Q.T @ W.reshape(-1))).reshape(W.shape)
    P = term.project_dense(W)
    assert torch.allclose(P, generic, atol=1e-10)
    assert torch.allclose(term.project_dense(P), P, atol=1e-12)


def test_projection_dtype_and_block_form(dtype):
    term = vnp.VNLinearRelaxation(4, 5).to(dtype)
    W = torch.randn(15, 12, dtype=dtype)
    P = term.project_dense(W)
    assert P.dtype == dtype
    M = term.block_trace(W)
    assert torch.equal(P, torch.kron(torch.eye(3, dtype=dtype), M))
    # P(W) commutes with every generator
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for Ai, Ao in zip(term.symmetry.lie_in.to(dtype), term.symmetry.lie_out.to(dtype)):
        assert (P @ Ai - Ao @ P).abs().max() < tol


@pytest.mark.parametrize("use_gram", [False, True], ids=["direct", "gram"])
@given(
    c_in=st.integers(1, 4),
    c_out=st.integers(1, 4),
    spatial=st.sampled_from([(), (5,), (4, 3)]),
    group=st.sampled_from(["SO(3)", "O(3)"]),
)
def test_closed_form_penalty_matches_core_definition(use_gram, c_in, c_out, spatial, group):
    torch.manual_seed(len(spatial) + 7 * c_in + c_out)
    term = vnp.VNLinearRelaxation(c_in, c_out, group=group, init_std=0.5, penalty_samples=None).double()
    term._use_gram = lambda *a: use_gram
    base = nn.Linear(c_in, c_out, bias=False).double()
    x = torch.randn(2, c_in, 3, *spatial, dtype=torch.float64)
    term(base, torch.tensor(0.7, dtype=torch.float64), x.transpose(1, -1))
    t = term.penalty_terms()
    xf = term._x
    W = term.dense()
    lie = lie_defect(W, xf, term.symmetry).sum() + group_defect(W, xf, term.symmetry).sum()
    assert t.samples == xf.shape[0] == 2 * max(1, int(torch.tensor(spatial).prod()) if spatial else 1)
    assert torch.allclose(t.lie, lie, rtol=1e-9, atol=1e-12)
    assert torch.allclose(t.norm, (xf @ W.T).square().sum(), rtol=1e-9)
    assert float(t.lie.detach()) > 1e-3  # a random W is not an intertwiner


def test_penalty_zero_for_intertwiner_and_matches_finite_difference(dtype):
    term = vnp.VNLinearRelaxation(3, 2).to(dtype)
    base = nn.Linear(3, 2, bias=False).to(dtype)
    M = torch.randn(2, 3, dtype=dtype)
    with torch.no_grad():
        term.weight.copy_(torch.kron(torch.eye(3, dtype=dtype), M))
    x = torch.randn(4, 3, 3, 6, dtype=dtype)
    term(base, torch.tensor(1.0, dtype=dtype), x.transpose(1, -1))
    scale = float((term._x @ term.weight.detach().T).square().sum())
    assert float(term.penalty_terms().lie.detach()) <= (1e-5 if dtype == torch.float32 else 1e-12) * scale
    # finite difference of ρ_out(exp(-tA)) W ρ_in(exp(tA)) x against the analytic Lie derivative
    W = torch.randn(6, 9, dtype=torch.float64)
    xf = torch.randn(5, 9, dtype=torch.float64)
    sym = vnp.vn_symmetry(3, 2).double()
    t = 1e-6
    for Ai, Ao in zip(sym.lie_in, sym.lie_out):
        fd = (xf @ torch.linalg.matrix_exp(t * Ai).T @ W.T @ torch.linalg.matrix_exp(-t * Ao).T - xf @ W.T) / t
        analytic = xf @ Ai.T @ W.T - xf @ W.T @ Ao.T
        assert rel_err(fd, analytic) < 1e-4


def test_penalty_subsample_is_rescaled_strided_rows(dtype):
    term = vnp.VNLinearRelaxation(3, 4, init_std=0.5, penalty_samples=40).to(dtype)
    base = nn.Linear(3, 4, bias=False).to(dtype)
    x = torch.randn(3, 3, 3, 50, dtype=dtype)  # 150 fibres, every 4th is used: 38 rows
    term(base, torch.tensor(0.5, dtype=dtype), x.transpose(1, -1))
    t = term.penalty_terms()
    rows = term._x[::4]
    W = term.dense()
    ref = lie_defect(W, rows, term.symmetry).sum() * 150 / rows.shape[0]
    assert t.samples == 150 and rows.shape[0] == 38
    assert torch.allclose(t.lie, ref, rtol=1e-4 if dtype == torch.float32 else 1e-10)
    with pytest.raises(ValueError, match="penalty_samples"):
        vnp.VNLinearRelaxation(2, 2, penalty_samples=0)



def _vn_model(**relax_kwargs) -> nn.Module:
    torch.manual_seed(1)
    model = rp.relax(nn.Sequential(VNLinearLeakyReLU(4, 8), VNLinear(8, 6)), adapters=["vn"], **relax_kwargs)
    rp.set_theta(model, 0.4)
    return model


def _former_vn_penalty(term, m: int):
    """What the former ``VNLinearRelaxation._penalty_rows`` gave for ``vn_penalty_rows = m``: the
    penalty of every ⌈n/m⌉-th recorded fibre, its sums times n/k (k rows taken)."""
    x, kept = term._x, term.penalty_samples
    rows = x[:: -(-x.shape[0] // m)]
    term._x, term.penalty_samples = rows, None
    try:
        t = term.penalty_terms()
    finally:
        term._x, term.penalty_samples = x, kept
    scale = x.shape[0] / rows.shape[0]
    return t.lie * scale, t.norm * scale, x.shape[0]


@pytest.mark.parametrize("how", ["penalty_samples", "vn_penalty_rows", "default"])
@pytest.mark.parametrize("rank", [None, 2], ids=["dense", "low-rank"])
def test_penalty_samples_gives_the_former_vn_penalty_rows_values(how, rank, dtype):
    """relax(penalty_samples=m) and the VN default (256) give, bit for bit, what vn_penalty_rows=m gave."""
    m = 256 if how == "default" else 50
    kwargs = {"rank": rank}
    if how == "penalty_samples":
        kwargs["penalty_samples"] = m
    elif how == "vn_penalty_rows":
        kwargs["adapter_options"] = {"vn": {"vn_penalty_rows": m}}
    with pytest.warns(DeprecationWarning, match="vn_penalty_rows") if how == "vn_penalty_rows" else nullcontext():
        model = _vn_model(**kwargs).to(dtype)
    with torch.no_grad():
        for _, layer in rp.relaxed_modules(model):
            for p in layer.term.parameters():
                p.normal_()
    model(torch.randn(3, 4, 3, 290, dtype=dtype))  # 870 fibres: every 4th (m = 256), every 18th (m = 50)
    for _, layer in rp.relaxed_modules(model):
        term = layer.term
        assert term.penalty_samples == m
        t = term.penalty_terms()
        lie, norm, n = _former_vn_penalty(term, m)
        assert t.samples == n == 870
        assert torch.equal(t.lie, lie) and torch.equal(t.norm, norm)


def test_user_penalty_samples_overrides_the_vn_default():
    def samples(model):
        return {layer.term.penalty_samples for _, layer in rp.relaxed_modules(model)}

    assert vnp.VNLinearRelaxation.default_penalty_samples == vnp.DEFAULT_PENALTY_SAMPLES == 256
    assert samples(_vn_model()) == {256}
    assert samples(_vn_model(penalty_samples=7)) == {7}
    assert samples(_vn_model(penalty_samples="all")) == {None}  # exact penalties on every fibre
    with pytest.warns(DeprecationWarning, match="vn_penalty_rows"):
        assert samples(_vn_model(adapter_options={"vn": {"vn_penalty_rows": None}})) == {None}  # all fibres
    with pytest.warns(DeprecationWarning, match="vn_penalty_rows"):
        # the relax() argument wins over the deprecated option
        assert samples(_vn_model(penalty_samples=7, adapter_options={"vn": {"vn_penalty_rows": 9}})) == {7}
    with pytest.raises(ValueError, match="vn_penalty_rows"):
        _vn_model(adapter_options={"vn": {"vn_penalty_rows": 0}})


def test_a_term_pickled_with_penalty_rows_keeps_its_subsample():
    term = vnp.VNLinearRelaxation(2, 3)
    state = term.__getstate__()
    # what a term pickled by the previous release holds: penalty_rows counted, penalty_samples was ignored
    state.pop("default_penalty_samples")
    state.update(penalty_rows=40, penalty_samples=None)
    old = vnp.VNLinearRelaxation.__new__(vnp.VNLinearRelaxation)
    old.__setstate__(state)
    assert old.penalty_samples == old.default_penalty_samples == 40 and not hasattr(old, "penalty_rows")
    assert pickle.loads(pickle.dumps(term)).penalty_samples == 256


# -- layer behaviour -------------------------------------------------------------------------


@pytest.mark.parametrize("spatial", [(), (7,), (5, 4)])
def test_relaxed_vnlinear_matches_reference(dtype, spatial):
    layer = VNLinear(3, 4).to(dtype)
    x = torch.randn(2, 3, 3, *spatial, dtype=dtype)
    y0 = layer(x)
    model = rp.relax(nn.Sequential(layer), adapters=["vn"])
    assert torch.equal(model(x), y0)  # θ = 0: bit-identical
    rp.set_theta(model, 0.6)
    assert torch.allclose(model(x), y0, atol=1e-6)  # W = 0: unchanged
    randomise_relaxation(model)
    W = model[0].map_to_feat.term.weight.reshape(3, 4, 3, 3)  # [j, o, i, c], xyz-major
    ref = y0 + 0.6 * torch.einsum("joic,bci...->boj...", W, x)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert rel_err(model(x), ref) < tol


@pytest.mark.parametrize("rank", [None, 2])
def test_relaxed_channel_map_still_runs_the_users_hooks_and_subclass_forward(rank):
    # the relaxed map folds W into one product with the nn.Linear's weight only for torch's own
    # Linear.forward and no hooks: otherwise it calls the layer (hooks run, a subclass's forward counts)
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2.0 * super().forward(x)

    torch.manual_seed(0)
    x = torch.randn(2, 6, 3, 5, dtype=torch.float64)
    calls = []
    for cls in (nn.Linear, Scaled):
        calls.clear()
        layer = VNLinear(6, 6).double()
        layer.map_to_feat = cls(6, 6, bias=False).double()
        model = rp.relax(nn.Sequential(layer), adapters=["vn"], rank=rank, init_std=0.2)
        rp.set_theta(model, 0.5)
        expected = model(x)
        relaxed = model[0].map_to_feat
        handle = relaxed.base.register_forward_hook(lambda m, args, out: calls.append(out.shape))
        torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)
        assert len(calls) == 1
        handle.remove()
        # the relaxed output is the layer's own output plus θ·W·x, whatever the layer computes
        delta = relaxed.term.apply_weight(relaxed.term.to_fibre(x.transpose(1, -1)), relaxed.theta)
        base_out = layer.map_to_feat.base(x.transpose(1, -1))
        ref = (base_out + relaxed.term.from_fibre(delta, base_out)).transpose(1, -1)
        torch.testing.assert_close(expected, ref, rtol=1e-10, atol=1e-12)


def test_layout_mismatch_raises():
    model = rp.relax(nn.Sequential(VNLinear(3, 4)), adapters=["vn"])
    with pytest.raises(ValueError, match="xyz on axis"):
        model[0].map_to_feat(torch.randn(2, 5, 4, 3))  # xyz axis has size 4


def test_first_party_layers_exactly_equivariant():
    torch.manual_seed(3)
    model = SmallVNNet().double().eval()
    pts = torch.randn(3, 3, 20, dtype=torch.float64)
    R = random_rotation(5)
    out, out_rot = model(pts), model(R @ pts)
    assert rel_err(out_rot, out) < 1e-10  # invariant logits
    x = torch.randn(2, 4, 3, 6, dtype=torch.float64)
    for layer in (VNLinear(4, 5), VNLeakyReLU(4), VNLinearLeakyReLU(4, 6), VNBatchNorm(4), VNMaxPool(4)):
        layer = layer.double().eval()
        for Q in (R, random_rotation(6, proper=False)):  # O(3): these layers also respect reflections
            assert rel_err(layer(rotate(Q, x)), rotate(Q, layer(x))) < 1e-10


# -- detection -------------------------------------------------------------------------------


def test_first_party_detection_claims_vn_maps_only():
    model = rp.relax(SmallVNNet())
    names = claimed(model)
    assert names == {
        "edge.map_to_feat", "edge.map_to_dir", "lin.map_to_feat", "act.map_to_dir", "pool.map_to_dir",
        "glob.map_to_feat", "glob.map_to_dir", "std.vn1.map_to_feat", "std.vn1.map_to_dir",
        "std.vn2.map_to_feat", "std.vn2.map_to_dir", "std.vn_lin",
    }
    assert all(m.adapter == "vn" for _, m in rp.relaxed_modules(model))


def test_thirdparty_file_detected_structurally(tp):
    from relax_vn import layers as ours

    assert tp.VNLinear.__name__ == ours.VNLinear.__name__ and tp.VNLinear is not ours.VNLinear
    net = tp.TinyVNNet()
    biased = tp.BiasedVectorMap(4)
    model = rp.relax(nn.ModuleDict({"net": net, "biased": biased}))
    assert claimed(model) == {
        "net.conv1.map_to_feat", "net.conv1.map_to_dir",  # map_to_dir applied in a mixin helper
        "net.lin.map_to_feat", "net.act.map_to_dir",  # torch.transpose(x, 1, -1) form
        "net.conv2.map_to_feat", "net.conv2.map_to_dir",
        "net.std.vn1.map_to_feat", "net.std.vn1.map_to_dir",
        "net.std.vn2.map_to_feat", "net.std.vn2.map_to_dir", "net.std.vn_lin",
    }  # not net.head.proj (invariant features), not biased.map_to_feat (bias)


def test_include_patterns_keep_structural_detection(tp):
    model = rp.relax(tp.TinyVNNet(), include=["*.map_to_feat", "std.vn_lin"])
    assert claimed(model) == {"conv1.map_to_feat", "lin.map_to_feat", "conv2.map_to_feat",
                              "std.vn1.map_to_feat", "std.vn2.map_to_feat", "std.vn_lin"}
    plain = nn.Sequential(nn.Linear(3, 3, bias=False))
    with pytest.raises(rp.NothingToRelaxError):
        rp.relax(plain, adapters=["vn"])


def test_name_fallback_when_parent_source_is_unavailable():
    namespace: dict = {"nn": nn}
    exec(  # a class without readable source: only the attribute names can identify VN maps
        "class Hidden(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.map_to_feat = nn.Linear(2, 3, bias=False)\n"
        "        self.mixer = nn.Linear(2, 3, bias=False)\n"
        "        self.map_to_dir = nn.Linear(2, 3, bias=True)\n"
        "    def forward(self, x):\n"
        "        return self.map_to_feat(x.transpose(1, -1)).transpose(1, -1)\n",
        namespace,
    )
    assert vnp.vn_linear_names(namespace["Hidden"]) is None
    model = rp.relax(nn.Sequential(namespace["Hidden"]()), adapters=["vn"])
    assert claimed(model) == {"0.map_to_feat"}  # not the unknown name, not the biased Linear
    model = rp.relax(nn.Sequential(namespace["Hidden"]()), adapters=["vn"],
                     adapter_options={"vn": {"vn_names": ["mixer"]}})
    assert claimed(model) == {"0.map_to_feat", "0.mixer"}


@pytest.mark.parametrize("dim", [4, 5])
def test_thirdparty_projected_exactly_equivariant_relaxed_not(tp, dim):
    torch.manual_seed(11)
    net = tp.TinyVNNet(dim=dim).double()
    spatial = {4: (16,), 5: (8, 3)}[dim]
    x = torch.randn(4, 1, 3, *spatial, dtype=torch.float64)
    R = random_rotation(dim)
    net.eval()
    model = rp.relax(net, init_std=0.0)
    randomise_relaxation(model, std=0.5)
    rp.set_theta(model, 0.5)
    assert rel_err(model(rotate(R, x)), model(x)) > 1e-3
    projected = rp.project(model, merge=True)
    assert not claimed(projected)
    assert rel_err(projected(rotate(R, x)), projected(x)) < 1e-10


@pytest.mark.parametrize("merge", [False, True])
def test_projection_restores_architecture_and_equivariance(merge):
    torch.manual_seed(2)
    net = SmallVNNet().double().eval()
    keys = set(net.state_dict())
    pts = torch.randn(3, 3, 24, dtype=torch.float64)
    model = rp.relax(net)
    randomise_relaxation(model, std=0.4)
    rp.set_theta(model, 0.8)
    R = random_rotation(7)
    assert rel_err(model(R @ pts), model(pts)) > 1e-3
    before = model.lin.map_to_feat.base.weight.clone()
    out = rp.project(model, merge=merge)
    assert set(out.state_dict()) == keys
    assert type(out.lin.map_to_feat) is nn.Linear
    # merge folds θ·P(W) (non-zero for a random W) into the weights; plain projection keeps them
    assert torch.equal(out.lin.map_to_feat.weight, before) != merge
    assert rel_err(out(R @ pts), out(pts)) < 1e-10


def test_merge_keeps_the_equivariant_part(dtype):
    layer = VNLinearLeakyReLU(3, 5).to(dtype).eval()
    x = torch.randn(4, 3, 3, 9, dtype=dtype)
    model = rp.relax(nn.Sequential(layer))
    rp.set_theta(model, 0.3)
    with torch.no_grad():
        for _, m in rp.relaxed_modules(model):
            M = torch.randn(m.term.c_out, m.term.c_in, dtype=dtype)
            m.term.weight.copy_(torch.kron(torch.eye(3, dtype=dtype), M))  # an intertwiner
    relaxed = model(x)
    projected = rp.project(model, merge=True)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert rel_err(projected(x), relaxed) < tol


def test_projection_report_and_penalty_gradients_train_w_only():
    torch.manual_seed(4)
    model = rp.relax(SmallVNNet().double(), init_std=0.1)
    rp.set_theta(model, 0.5)
    model(torch.randn(3, 3, 16, dtype=torch.float64))
    pen = rp.penalty(model, lie=1.0, norm=1.0)
    pen.backward()
    for _, m in rp.relaxed_modules(model):
        assert m.base.weight.grad is None
        assert m.term.weight.grad is not None and m.term.weight.grad.abs().sum() > 0
    report = rp.projection_report(model)
    assert set(report) == claimed(model)
    assert all(0 < r["rel_weight_error"] <= 1 and r["lie_defect"] > 0 for r in report.values())


def test_o3_option_adds_reflection_and_keeps_projection():
    torch.manual_seed(5)
    net = nn.Sequential(VNLinearLeakyReLU(2, 4), VNLinear(4, 3), VNLeakyReLU(3)).double()
    x = torch.randn(3, 2, 3, 10, dtype=torch.float64)
    model = rp.relax(net, adapter_options={"vn": {"vn_group": "O(3)"}})
    term = model[1].map_to_feat.term
    assert term.symmetry.num_group == 1 and term.symmetry.name == "O(3)"
    randomise_relaxation(model)
    rp.set_theta(model, 0.5)
    model(x)
    t = term.penalty_terms()
    ref = lie_defect(term.dense(), term._x, term.symmetry).sum() + group_defect(term.dense(), term._x,
                                                                              term.symmetry).sum()
    assert torch.allclose(t.lie, ref, rtol=1e-9)
    mirror = random_rotation(8, proper=False)
    assert rel_err(model(rotate(mirror, x)), rotate(mirror, model(x))) > 1e-3
    out = rp.project(model, merge=True)
    assert rel_err(out(rotate(mirror, x)), rotate(mirror, out(x))) < 1e-10
    with pytest.raises(rp.AdapterError):
        rp.relax(nn.Sequential(VNLinear(2, 2)), adapter_options={"vn": {"vn_group": "SE(3)"}})


@pytest.mark.parametrize("spatial", [(), (5,), (4, 3)])
def test_low_rank_relaxation(dtype, spatial):
    layer = VNLinear(4, 4).to(dtype)
    x = torch.randn(2, 4, 3, *spatial, dtype=dtype)
    y0 = layer(x)
    model = rp.relax(nn.Sequential(layer), rank=2)
    rp.set_theta(model, 1.0)
    assert torch.allclose(model(x), y0, atol=1e-6)
    term = model[0].map_to_feat.term
    with torch.no_grad():
        term.lora_b.normal_()
    assert rel_err(model(x), y0) > 1e-3
    assert rp.penalty(model) > 0
    out = rp.project(model, merge=True)
    R = random_rotation(9, dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert rel_err(out(rotate(R, x)), rotate(R, out(x))) < tol


def test_float32_training_step_runs(dtype):
    model = rp.relax(SmallVNNet().to(dtype))
    rp.set_theta(model, 1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pts = torch.randn(4, 3, 16, dtype=dtype)
    for _ in range(2):
        loss = model(pts).square().mean() + rp.penalty(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(m.term.weight.dtype == dtype for _, m in rp.relaxed_modules(model))
    assert any(m.term.weight.abs().sum() > 0 for _, m in rp.relaxed_modules(model))
