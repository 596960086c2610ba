"""escnn adapter: wrapper, projection onto escnn's basis, penalties, merge, export, state_dict."""

from __future__ import annotations

import copy
import io
import math
import subprocess
import sys
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import relax_plugins as rp

warnings.filterwarnings("ignore", message=".*py3nj.*")
escnn = pytest.importorskip("escnn")
from escnn import gspaces  # noqa: E402
from escnn import nn as enn  # noqa: E402
from relax_escnn.basis import BasisProjector  # noqa: E402
from relax_escnn.conv import ConvRelaxation, grid_actions  # noqa: E402
from relax_escnn.wrapper import RelaxedEquivariantModule, load_state_dict  # noqa: E402


# -- helpers ------------------------------------------------------------------------------------
def gspace(name: str):
    return {
        "C4": lambda: gspaces.rot2dOnR2(4),
        "C8": lambda: gspaces.rot2dOnR2(8),
        "D4": lambda: gspaces.flipRot2dOnR2(4),
        "D8": lambda: gspaces.flipRot2dOnR2(8),
        "SO2": lambda: gspaces.rot2dOnR2(-1, maximum_frequency=3),
        "O2": lambda: gspaces.flipRot2dOnR2(-1, maximum_frequency=3),
    }[name]()


def mixed_types(gs):
    """A small input type with a non-contiguous layout and a small output type."""
    G = gs.fibergroup
    if G.continuous:
        irr = [gs.irrep(*G.irreps()[1].id)]
        t_in = enn.FieldType(gs, [gs.trivial_repr] + irr + [gs.trivial_repr])
        t_out = enn.FieldType(gs, irr + [gs.trivial_repr] + irr)
    else:
        t_in = enn.FieldType(gs, [gs.regular_repr, gs.trivial_repr, gs.regular_repr])
        t_out = enn.FieldType(gs, [gs.trivial_repr, gs.regular_repr])
    return t_in, t_out


def smooth_input(t_in, n: int, size: int, dtype, seed: int = 0) -> enn.GeometricTensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, t_in.size, size // 4 + 1, size // 4 + 1, generator=g, dtype=torch.float64)
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    return enn.GeometricTensor(x.to(dtype), t_in)


def build(gs_name: str, dtype, k: int = 5):
    gs = gspace(gs_name)
    t_in, t_out = mixed_types(gs)
    model = enn.SequentialModule(enn.R2Conv(t_in, t_out, k, padding=k // 2), enn.ReLU(t_out) if False else
                                 enn.IdentityModule(t_out), enn.R2Conv(t_out, t_out, 3, padding=1))
    return model.to(dtype), t_in, t_out


def randomise(model: torch.nn.Module, scale: float = 1.0) -> None:
    """Random relaxation kernels of the base filters' scale."""
    with torch.no_grad():
        for _, layer in rp.relaxed_modules(model):
            filt = layer.base.expand_parameters()[0]
            layer.term.weight.normal_(0.0, scale * float(filt.std()))


def equiv_error(model, x: enn.GeometricTensor, g) -> float:
    """Relative error ||f(g·x) − g·f(x)|| / ||f(x)|| for grid-exact elements (GeometricTensor.transform)."""
    with torch.no_grad():
        a = model(x.transform(g)).tensor
        b = model(x).transform(g).tensor
    return float((a - b).norm() / b.norm())


def rotate(x: torch.Tensor, angle: float) -> torch.Tensor:
    c, s = math.cos(angle), math.sin(angle)
    theta = torch.tensor([[c, s, 0.0], [-s, c, 0.0]], dtype=x.dtype).expand(x.shape[0], 2, 3)
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", align_corners=False)


def invariant_error_45(model, x: enn.GeometricTensor) -> float:
    """45° error on a centre disc for trivial-only in/out types (interpolated rotation)."""
    ang = math.pi / 4
    with torch.no_grad():
        a = rotate(model(x).tensor, ang)
        b = model(enn.GeometricTensor(rotate(x.tensor, ang), x.type)).tensor
    s = a.shape[-1]
    yy, xx = torch.meshgrid(torch.arange(s) - s // 2, torch.arange(s) - s // 2, indexing="ij")
    mask = (yy**2 + xx**2) < (s // 3) ** 2
    return float((a - b)[..., mask].norm() / b[..., mask].norm())


def dense_basis(layer) -> torch.Tensor:
    """Jacobian of weights → filter (the basis matrix), float64, from escnn's own expansion."""
    be = layer.basisexpansion
    eye = torch.eye(layer.weights.numel(), dtype=layer.weights.dtype)
    return torch.stack([be(e).reshape(-1).double() for e in eye], dim=1)


# -- plugin and wrapper -------------------------------------------------------------------------
def test_plugin_import_does_not_import_escnn():
    code = "import sys, relax_escnn.plugin, relax_escnn; print('escnn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_adapter_listed():
    names = {a.name: a for a in rp.list_adapters()}
    assert "escnn" in names and "R2Conv" in names["escnn"].layers


def test_relax_keeps_outputs_and_types(dtype):
    model, t_in, t_out = build("C8", dtype)
    x = smooth_input(t_in, 2, 15, dtype)
    with torch.no_grad():
        y0 = model(x).tensor
    rp.relax(model, adapters=["escnn"])
    layers = dict(rp.relaxed_modules(model))
    assert set(layers) == {"0", "2"}  # IdentityModule is not a layer with weights
    for layer in layers.values():
        assert isinstance(layer, RelaxedEquivariantModule) and isinstance(layer, enn.EquivariantModule)
        assert layer.in_type == layer.base.in_type and layer.out_type == layer.base.out_type
        assert layer.term.weight.dtype == dtype
    rp.set_theta(model, 0.7)  # K = 0: still unchanged
    y = model(x)
    assert isinstance(y, enn.GeometricTensor) and y.type == t_out
    assert torch.equal(y.tensor, y0)
    assert model.evaluate_output_shape(x.shape) == tuple(y.shape)


def test_user_equivariant_module_and_relaxed_changes_output():
    gs = gspace("C4")
    t_in, t_out = mixed_types(gs)

    class Block(enn.EquivariantModule):
        def __init__(self):
            super().__init__()
            self.in_type, self.out_type = t_in, t_out
            self.conv = enn.R2Conv(t_in, t_out, 3, padding=1)
            self.act = enn.ReLU(t_out)

        def forward(self, x):
            return self.act(self.conv(x))

        def evaluate_output_shape(self, s):
            return self.conv.evaluate_output_shape(s)

    model = enn.SequentialModule(Block(), enn.R2Conv(t_out, t_out, 3, padding=1))
    x = smooth_input(t_in, 2, 9, torch.float32)
    y0 = model(x).tensor.detach()
    rp.relax(model)
    assert sorted(n for n, _ in rp.relaxed_modules(model)) == ["0.conv", "1"]
    randomise(model)
    rp.set_theta(model, 1.0)
    assert not torch.allclose(model(x).tensor, y0, atol=1e-3)


def test_rank_option_ignored_for_convs_with_a_warning():
    model, _, _ = build("C4", torch.float32, k=3)
    with pytest.warns(UserWarning, match="rank=2 is ignored for R2Conv"):
        rp.relax(model, rank=2)
    assert model[0].term.weight.shape == model[0].base.filter.shape


# -- projection onto escnn's basis --------------------------------------------------------------
@settings(max_examples=8)
@given(name=st.sampled_from(["C4", "C8", "D4", "SO2", "O2"]), k=st.sampled_from([3, 5]))
def test_projector_is_least_squares_onto_escnn_basis(name, k):
    gs = gspace(name)
    t_in, t_out = mixed_types(gs)
    conv = enn.R2Conv(t_in, t_out, k).double()
    proj = BasisProjector(conv.basisexpansion, t_out.size, t_in.size)
    M = dense_basis(conv)
    g = torch.Generator().manual_seed(k)
    K = torch.randn(t_out.size, t_in.size, k * k, generator=g, dtype=torch.float64)
    ref = torch.linalg.lstsq(M, K.reshape(-1, 1)).solution.reshape(-1)
    w = proj.coefficients(K)
    assert torch.allclose(w, ref, atol=1e-8, rtol=1e-6)
    P = proj.project(K)
    # idempotent, residual orthogonal to every basis column, escnn filters are fixed points
    assert torch.allclose(proj.project(P), P, atol=1e-9)
    assert float((M.T @ (K - P).reshape(-1)).abs().max()) < 1e-8 * float(K.norm())
    F = conv.basisexpansion(conv.weights).detach()
    assert torch.allclose(proj.project(F), F, atol=1e-6 * float(F.abs().max()))


def test_basis_columns_not_orthogonal():
    """Guard for the reason a real solve is needed: escnn's sampled columns are not orthonormal."""
    conv = enn.R2Conv(*mixed_types(gspace("C8")), 5).double()
    M = dense_basis(conv)
    G = M.T @ M
    assert float((G - torch.diag(torch.diagonal(G))).abs().max()) > 1e-3


# -- equivariance of relaxed and projected models -----------------------------------------------
@pytest.mark.parametrize("name", ["C8", "D4"])
def test_projected_model_exact_on_grid_elements(name):
    dtype = torch.float64
    model, t_in, _ = build(name, dtype)
    x = smooth_input(t_in, 2, 17, dtype)
    G = model[0].in_type.fibergroup
    grid_elems = [G.element(2) if name == "C8" else G.element((0, 1))]
    if name == "D4":
        grid_elems.append(G.element((1, 0)))  # a flip
    own = max(equiv_error(model, x, g) for g in grid_elems)
    rp.relax(model)
    randomise(model)
    rp.set_theta(model, 1.0)
    relaxed = max(equiv_error(model, x, g) for g in grid_elems)
    rp.project(model, merge=True)
    projected = max(equiv_error(model, x, g) for g in grid_elems)
    assert relaxed > 0.05
    # escnn samples its basis in float32: its own layers reach ~1e-7 in float64, not 1e-15
    assert projected < 1e-6 and own < 1e-6


@pytest.mark.parametrize("name", ["C8", "SO2"])
def test_projected_model_within_escnn_tolerance_off_grid(name, dtype):
    gs = gspace(name)
    t = enn.FieldType(gs, [gs.trivial_repr] * 2)
    model = enn.SequentialModule(enn.R2Conv(t, t, 7, padding=3)).to(dtype)
    x = smooth_input(t, 3, 33, dtype)
    own = invariant_error_45(model, x)
    rp.relax(model)
    randomise(model)
    rp.set_theta(model, 1.0)
    relaxed = invariant_error_45(model, x)
    rp.project(model, merge=True)
    projected = invariant_error_45(model, x)
    # escnn's own check_equivariance tolerance is 0.1 (atol and rtol)
    assert projected < 0.05 and own < 0.05
    assert relaxed > 5 * projected


def test_merge_adds_exactly_theta_times_projection(dtype):
    model, t_in, _ = build("D4", dtype)
    rp.relax(model)
    randomise(model)
    theta = 0.37
    rp.set_theta(model, theta)
    x = smooth_input(t_in, 2, 11, dtype)
    # the relaxed model with K replaced by P(K) is what project(merge=True) must reproduce
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for _, layer in rp.relaxed_modules(ref):
            Kb = layer.term._basis_layout(layer.term.weight)
            layer.term.weight.copy_(layer.term._torch_layout(layer.term.projector.project(Kb)))
        y_ref = ref(x).tensor
    rp.project(model, merge=True)
    assert all(type(m).__name__ != "RelaxedEquivariantModule" for m in model.modules())
    with torch.no_grad():
        y = model(x).tensor
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert torch.allclose(y, y_ref, atol=tol * float(y_ref.abs().max()))


def test_merge_in_eval_mode_refreshes_cached_filter():
    model, t_in, _ = build("C4", torch.float32, k=3)
    rp.relax(model)
    randomise(model)
    rp.set_theta(model, 1.0)
    with torch.no_grad():
        model.eval()
    rp.project(model, merge=True)
    for layer in (model[0], model[2]):
        assert not layer.training
        assert torch.allclose(layer.filter, layer.expand_parameters()[0])
    x = smooth_input(t_in, 1, 9, torch.float32)
    with torch.no_grad():
        y_eval = model(x).tensor
    model.train()
    with torch.no_grad():
        assert torch.allclose(model(x).tensor, y_eval, atol=1e-5)


def test_project_without_merge_is_bit_identical():
    model, _, _ = build("C8", torch.float32, k=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rp.relax(model)
    randomise(model)
    rp.set_theta(model, 1.0)
    rp.project(model)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


# -- penalties ----------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["residual", "defect", "both"])
def test_penalty_zero_on_escnn_kernels_and_positive_otherwise(mode, dtype):
    model, t_in, _ = build("D4", dtype, k=3)
    rp.relax(model, adapter_options={"escnn": {"escnn_penalty": mode}})
    x = smooth_input(t_in, 2, 9, dtype)
    rp.set_theta(model, 1.0)
    with torch.no_grad():
        for _, layer in rp.relaxed_modules(model):
            layer.term.weight.copy_(layer.base.expand_parameters()[0])  # an equivariant K
    model(x)
    scale = sum(float(layer.term.weight.detach().square().sum()) for _, layer in rp.relaxed_modules(model))
    eq = float(rp.penalty(model, lie=1.0, norm=0.0, form="mean").detach())
    assert eq < 1e-9 * scale
    randomise(model)
    model(x)
    pen = rp.penalty(model, lie=1.0, norm=0.0, form="mean")
    assert float(pen.detach()) > 1e-2 * scale
    pen.backward()
    for _, layer in rp.relaxed_modules(model):
        assert layer.term.weight.grad is not None and float(layer.term.weight.grad.abs().max()) > 0
        assert layer.base.weights.grad is None  # the penalty trains W only


def test_grid_actions_c8_and_d4():
    gs = gspace("C8")
    t = enn.FieldType(gs, [gs.regular_repr])
    assert len(grid_actions(t, t, 5, 2)) == 3  # 90°, 180°, 270°; 45° multiples are not on the grid
    gs = gspace("D4")
    t = enn.FieldType(gs, [gs.regular_repr])
    assert len(grid_actions(t, t, 5, 2)) == 7


def test_penalty_terms_units():
    model, t_in, _ = build("C8", torch.float64, k=3)
    rp.relax(model)
    randomise(model)
    x = smooth_input(t_in, 3, 9, torch.float64)
    model(x)
    layer = model[0]
    lie, norm, samples = layer.penalty_terms()
    assert samples == 3 * 9 * 9
    assert torch.allclose(lie / samples, layer.term.residual().square().sum())
    # the three reduction forms of the core all work on these sums
    for form in ("sqrt", "mean", "paper"):
        assert torch.isfinite(rp.penalty(model, form=form))


def test_exact_activation_norm_and_kernel_surrogate():
    gs = gspace("C4")
    t = enn.FieldType(gs, [gs.regular_repr] * 2)
    conv = enn.R2Conv(t, t, 3, padding=1).double()
    exact = ConvRelaxation(conv, activation_norm="exact").double()
    approx = ConvRelaxation(conv, activation_norm="kernel").double()
    with torch.no_grad():
        exact.weight.normal_()
        approx.weight.copy_(exact.weight)
    g = torch.Generator().manual_seed(1)
    x = t(torch.randn(4, t.size, 24, 24, generator=g, dtype=torch.float64))  # i.i.d. input
    exact(conv, torch.tensor(1.0, dtype=torch.float64), x)
    approx(conv, torch.tensor(1.0, dtype=torch.float64), x)
    n_exact = exact.penalty_terms().norm.detach()
    ref = torch.nn.functional.conv2d(x.tensor, exact.weight, padding=1).square().sum()
    assert torch.allclose(n_exact, ref)
    # the surrogate is the expectation for i.i.d. inputs; zero padding at the borders lowers the exact one
    ratio = float(approx.penalty_terms().norm.detach() / n_exact)
    assert 0.9 < ratio < 1.35


# -- export, state_dict, copies -------------------------------------------------------------------
def test_export_of_projected_model_and_relaxed_refuses():
    model, t_in, _ = build("C8", torch.float32, k=3)
    rp.relax(model)
    with pytest.raises(RuntimeError, match="project"):
        model[0].export()
    randomise(model)
    rp.set_theta(model, 0.5)
    rp.project(model, merge=True)
    x = smooth_input(t_in, 2, 9, torch.float32)
    with torch.no_grad():
        model.eval()
        y = model(x).tensor
        plain = model.export()
    assert isinstance(plain, torch.nn.Sequential)
    assert all(not isinstance(m, enn.EquivariantModule) for m in plain.modules())
    with torch.no_grad():
        assert torch.allclose(plain(x.tensor), y, atol=1e-5)


@pytest.mark.parametrize("src_train,dst_train", [(True, False), (False, True), (True, True), (False, False)])
def test_relaxed_state_dict_round_trip_across_modes(src_train, dst_train):
    torch.manual_seed(3)
    src, t_in, _ = build("C4", torch.float32, k=3)
    rp.relax(src)
    randomise(src)
    rp.set_theta(src, 0.5)
    torch.manual_seed(4)
    dst, _, _ = build("C4", torch.float32, k=3)
    rp.relax(dst)
    with torch.no_grad():
        src.train(src_train)
        dst.train(dst_train)
    dst.load_state_dict(src.state_dict(), strict=True)
    x = smooth_input(t_in, 2, 9, torch.float32)
    with torch.no_grad():
        src.eval()
        dst.eval()
        assert torch.allclose(dst(x).tensor, src(x).tensor, atol=1e-6)


@pytest.mark.parametrize("name", ["backbone", "base", "database"])
def test_relaxed_state_dict_across_modes_whatever_the_modules_are_called(name):
    # escnn's cache keys are recognised under the wrapper's own prefix, not at the first "base."
    # of the key: a submodule called base (or database) above the wrapper must not hide them
    def net() -> torch.nn.Module:
        root = torch.nn.Module()
        model, _, _ = build("C4", torch.float32, k=3)
        setattr(root, name, model)
        return rp.relax(root)

    src, dst = net(), net()
    randomise(getattr(src, name))
    with torch.no_grad():
        src.train()
        dst.eval()
    assert any(k.endswith(".base.filter") for k in dst.state_dict())  # eval mode: the cache is in the keys
    dst.load_state_dict(src.state_dict(), strict=True)
    src.eval()
    dst.train()
    dst.load_state_dict(src.state_dict(), strict=True)  # and the other way round
    assert "_load_prefix" not in vars(getattr(dst, name)[0])  # nothing left behind by the load


def test_load_state_dict_helper_for_plain_escnn_models():
    src, t_in, _ = build("C8", torch.float32, k=3)
    dst, _, _ = build("C8", torch.float32, k=3)
    with torch.no_grad():
        dst.eval()
    with pytest.raises(RuntimeError, match="filter"):  # escnn's own behaviour across modes
        dst.load_state_dict(src.train().state_dict(), strict=True)
    load_state_dict(dst, src.state_dict())
    x = smooth_input(t_in, 1, 9, torch.float32)
    with torch.no_grad():
        src.eval()
        assert torch.allclose(dst(x).tensor, src(x).tensor, atol=1e-6)


def test_deepcopy_and_pickle_of_relaxed_model():
    model, t_in, _ = build("C4", torch.float32, k=3)
    rp.relax(model)
    randomise(model)
    rp.set_theta(model, 0.5)
    x = smooth_input(t_in, 1, 9, torch.float32)
    with torch.no_grad():
        model.eval()
        y = model(x).tensor
    twin = copy.deepcopy(model)
    # escnn modules themselves cannot be pickled (local functions in its groups): save state_dicts
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh, _, _ = build("C4", torch.float32, k=3)
    rp.relax(fresh)
    fresh.load_state_dict(torch.load(buf), strict=True)
    with torch.no_grad():
        fresh.eval()
        assert torch.equal(twin(x).tensor, y) and torch.allclose(fresh(x).tensor, y)


# -- other layers -------------------------------------------------------------------------------
def test_transposed_conv_relax_and_project():
    gs = gspace("C4")
    t_in, t_out = mixed_types(gs)
    model = enn.SequentialModule(enn.R2ConvTransposed(t_in, t_out, 3, stride=2)).double()
    x = smooth_input(t_in, 2, 7, torch.float64)
    with torch.no_grad():
        y0 = model(x).tensor
    rp.relax(model)
    assert torch.equal(model(x).tensor, y0)
    randomise(model)
    rp.set_theta(model, 1.0)
    g = gs.fibergroup.element(1)
    assert equiv_error(model, x, g) > 0.05
    model(x)
    assert float(rp.penalty(model)) > 0
    rp.project(model, merge=True)
    assert isinstance(model[0], enn.R2ConvTransposed)
    assert equiv_error(model, x, g) < 1e-6


def test_r3conv_octahedral_relax_and_project():
    gs = gspaces.octaOnR3()
    t_in = enn.FieldType(gs, [gs.trivial_repr])
    t_out = enn.FieldType(gs, [gs.fibergroup.standard_representation, gs.trivial_repr])
    model = enn.SequentialModule(enn.R3Conv(t_in, t_out, 3, padding=1)).double()
    g = torch.Generator().manual_seed(0)
    x = enn.GeometricTensor(torch.randn(1, 1, 5, 5, 5, generator=g, dtype=torch.float64), t_in)
    rp.relax(model)
    randomise(model)
    rp.set_theta(model, 1.0)
    elem = gs.fibergroup.generators[0]
    assert equiv_error(model, x, elem) > 0.05
    rp.project(model, merge=True)
    assert equiv_error(model, x, elem) < 1e-5


@pytest.mark.parametrize("penalty", ["residual", "defect", "both"])
@pytest.mark.parametrize("train", [False, True], ids=["filter-cached", "after-train"])
@pytest.mark.parametrize("conv", ["R2Conv", "R2ConvTransposed"])
def test_grouped_conv_relax_and_project(conv, train, penalty):
    gs = gspace("C4")
    t = enn.FieldType(gs, [gs.regular_repr, gs.trivial_repr] * 2)
    model = enn.SequentialModule(getattr(enn, conv)(t, t, 3, padding=1, groups=2)).double()
    if train:
        model.train()  # escnn deletes its cached filter: the kernel's shape comes from the field types
    x = smooth_input(t, 2, 9, torch.float64)
    with torch.no_grad():
        y0 = model(x).tensor
    rp.relax(model, adapter_options={"escnn": {"escnn_penalty": penalty}})
    # torch's grouped layouts: (out, in / groups, k, k), transposed (in, out / groups, k, k)
    assert model[0].term.weight.shape == model[0].base.expand_parameters()[0].shape
    assert torch.equal(model(x).tensor, y0)
    randomise(model)
    rp.set_theta(model, 1.0)
    g = gs.fibergroup.element(1)
    assert equiv_error(model, x, g) > 0.05
    model(x)
    assert float(rp.penalty(model).detach()) > 0
    with torch.no_grad():  # the penalty vanishes on the projected kernel
        term = model[0].term
        term.weight.copy_(term._torch_layout(term.projector.project(term._basis_layout(term.weight))))
    model(x)
    assert float(rp.penalty(model, norm=0.0, form="mean").detach()) < 1e-12
    rp.project(model, merge=True)
    assert isinstance(model[0], getattr(enn, conv))
    assert equiv_error(model, x, g) < 1e-6


def test_dense_fallback_projector_matches_lstsq():
    class FakeExpansion(torch.nn.Module):
        """A linear weights → kernel map that is not a BlocksBasisExpansion."""

        def __init__(self, M):
            super().__init__()
            self.register_buffer("M", M)

        def dimension(self):
            return self.M.shape[1]

        def forward(self, w):
            return (self.M @ w).reshape(3, 2, 4)

    g = torch.Generator().manual_seed(0)
    M = torch.randn(24, 5, generator=g, dtype=torch.float64)
    proj = BasisProjector(FakeExpansion(M), 3, 2)
    K = torch.randn(3, 2, 4, generator=g, dtype=torch.float64)
    ref = torch.linalg.lstsq(M, K.reshape(-1, 1)).solution.reshape(-1)
    assert torch.allclose(proj.coefficients(K), ref, atol=1e-10)
    assert torch.allclose(proj.project(K).reshape(-1), M @ ref, atol=1e-10)


@pytest.mark.slow
def test_rotmnist_example_quick(tmp_path):
    pytest.importorskip("mnist")
    from examples.rotmnist import run

    payload = run.main(["--quick", "--out", str(tmp_path)])
    assert (tmp_path / "results.json").is_file()
    for arm in ("standard", "relaxed"):
        assert payload["summary"][arm]["rot90_rel_logit_error_max"] < 1e-4
    assert all(r["projected_classes"] for r in payload["runs"])
    assert "RelaxedEquivariantModule" not in str(payload["runs"][1]["projected_classes"])


def test_defect_penalty_refused_without_grid_symmetries():
    gs = gspaces.rot2dOnR2(3)
    t = enn.FieldType(gs, [gs.regular_repr])
    with pytest.raises(ValueError, match="residual"):
        ConvRelaxation(enn.R2Conv(t, t, 3), penalty="defect")
    with pytest.raises(rp.AdapterError):
        rp.relax(enn.SequentialModule(enn.R2Conv(t, t, 3)), adapter_options={"escnn": {"escnn_penalty": "defect"}})
    assert ConvRelaxation(enn.R2Conv(t, t, 3), penalty="residual").penalty == "residual"


def test_r3conv_so3_relax_and_project(dtype):
    import numpy as np

    gs = gspaces.rot3dOnR3(maximum_frequency=2)
    t_in = enn.FieldType(gs, [gs.trivial_repr, gs.irrep(1)])
    t_out = enn.FieldType(gs, [gs.irrep(1), gs.trivial_repr])
    model = enn.SequentialModule(enn.R3Conv(t_in, t_out, 3, padding=1)).to(dtype)
    g = torch.Generator().manual_seed(0)
    x = enn.GeometricTensor(torch.randn(1, t_in.size, 7, 7, 7, generator=g, dtype=dtype), t_in)
    elem = gs.fibergroup.element(np.array([0.0, 0.0, np.pi / 2]), "EV")  # 90° about z: on the grid
    rp.relax(model)
    randomise(model)
    rp.set_theta(model, 1.0)
    assert equiv_error(model, x, elem) > 0.05
    model(x)
    assert float(rp.penalty(model).detach()) > 0
    rp.project(model, merge=True)
    assert isinstance(model[0], enn.R3Conv)
    # The bound is escnn's own precision, not ours. Without py3nj escnn solves the SO(3) Clebsch-Gordan
    # coefficients of this basis numerically (from random group samples) and accepts a solution once
    # np.allclose(constraint @ basis, 0) holds, i.e. to 1e-8 absolute (escnn/group/_clebsh_gordan.py); the
    # basis is then sampled in float32 (the default dtype when the layer is built) before .to(float64).
    # Measured on fresh caches (26 NumPy seeds): escnn's own un-relaxed layer 4e-16 to 1.1e-15 from exact
    # equivariance, the CG solutions' equivariance residual <= 4e-15; one fresh-clone run of this machine
    # kind measured 7.2e-10 for this test. Only 1e-8 is promised, so 1e-7 leaves a decade for the sums over
    # the basis and still sits six decades below the relaxed model's error (> 0.05). float32: its epsilon
    # (1.2e-7) times the same decade margin and the ~10 summed terms per output. The escnn disk cache this
    # depends on is built by the test run itself (root conftest.py), never inherited.
    assert equiv_error(model, x, elem) < (1e-5 if dtype == torch.float32 else 1e-7)


@pytest.mark.parametrize("activation_norm", [None, "exact"])
def test_penalty_and_report_outside_autocast_after_an_autocast_forward(activation_norm):
    model, t_in, _ = build("C4", torch.float32, k=3)
    options = {} if activation_norm is None else {"escnn": {"escnn_activation_norm": activation_norm}}
    rp.relax(model, adapter_options=options)
    randomise(model, 0.1)
    rp.set_theta(model, 0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(smooth_input(t_in, 2, 9, torch.float32))
    assert model[2].term._x.dtype == torch.bfloat16
    p = rp.penalty(model)
    assert p.dtype == torch.float32 and bool(torch.isfinite(p))
    report = rp.projection_report(model)["2"]
    assert math.isfinite(report["relax_ratio"]) and math.isfinite(report["rel_output_error"])


@pytest.mark.parametrize("train", [True, False])
def test_hooks_on_a_relaxed_convolution_still_run(train):
    # the relaxed convolution normally folds θ·K into one convolution without calling the layer;
    # with hooks on the layer it calls it, so the hooks run and the output is still f(x) + θ·K * x
    torch.manual_seed(0)
    model, t_in, _ = build("C4", torch.float64, k=3)
    rp.relax(model)
    randomise(model)
    rp.set_theta(model, 0.5)
    model.train(train)
    x = smooth_input(t_in, 2, 9, torch.float64)
    layer = model[0]
    with torch.no_grad():
        expected = layer(x).tensor
    conv = layer.base
    calls = []
    handles = [conv.register_forward_pre_hook(lambda m, args: calls.append("pre")),
               conv.register_forward_hook(lambda m, args, out: calls.append("post"))]
    with torch.no_grad():
        got = layer(x).tensor
    assert calls == ["pre", "post"]
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    for h in handles:
        h.remove()
    # a hook that changes the output changes the relaxed output by the same amount
    conv.register_forward_hook(lambda m, args, out: enn.GeometricTensor(out.tensor + 1.0, out.type))
    with torch.no_grad():
        torch.testing.assert_close(layer(x).tensor, expected + 1.0, rtol=1e-10, atol=1e-12)


def test_relaxed_escnn_layers_take_their_input_by_keyword():
    from escnn import group

    gs = gspaces.rot2dOnR2(4)
    t_in, t_out = enn.FieldType(gs, [gs.trivial_repr]), enn.FieldType(gs, [gs.regular_repr])
    conv = enn.SequentialModule(enn.R2Conv(t_in, t_out, 3))
    g = gspaces.no_base_space(group.cyclic_group(4))
    t = enn.FieldType(g, [g.regular_repr])
    lin = enn.SequentialModule(enn.Linear(t, t))
    for model, x in ((conv, enn.GeometricTensor(torch.randn(2, 1, 7, 7), t_in)),
                     (lin, enn.GeometricTensor(torch.randn(3, 4), t))):
        rp.relax(model)
        randomise(model)
        rp.set_theta(model, 0.5)
        layer = model[0]
        with torch.no_grad():
            assert torch.equal(layer(input=x).tensor, layer(x).tensor)
    with pytest.raises(TypeError, match="one GeometricTensor"):
        conv[0](x=enn.GeometricTensor(torch.randn(2, 1, 7, 7), t_in))
