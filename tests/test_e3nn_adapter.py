"""The e3nn adapter: generators, penalties, closed-form projection, merge, unmodified e3nn models."""

from __future__ import annotations

import copy
import warnings

import pytest

e3nn = pytest.importorskip("e3nn")

import torch  # noqa: E402
from e3nn import o3  # noqa: E402
from e3nn.nn import FullyConnectedNet, Gate  # noqa: E402
from e3nn.util.test import assert_equivariant  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from relax_e3nn import (  # noqa: E402
    E3nnLinearRelaxation,
    E3nnRelaxation,
    E3nnTensorProductRelaxation,
    IrrepsAction,
    equivariance_error,
    irreps_symmetry,
    project_irreps_dense,
    so3_generators64,
)
from relax_e3nn.irreps import _SO3_BASIS  # noqa: E402
from relax_e3nn.irreps import _float64_default as float64_default  # noqa: E402
from torch import nn  # noqa: E402

import relax_plugins as rp  # noqa: E402
from relax_plugins.symmetry import constraint_matrix, intertwiner_basis, lie_defect  # noqa: E402

TOL = {torch.float32: 1e-4, torch.float64: 1e-10}


def irreps_strategy(max_entries: int = 4, max_mul: int = 3, max_l: int = 2) -> st.SearchStrategy[o3.Irreps]:
    entry = st.tuples(st.integers(1, max_mul), st.integers(0, max_l), st.sampled_from([1, -1]))
    return st.lists(entry, min_size=1, max_size=max_entries).map(
        lambda es: o3.Irreps([(m, (l, p)) for m, l, p in es])
    )


def null_dim(M: torch.Tensor, tol: float = 1e-9) -> int:
    s = torch.linalg.svdvals(M)
    return M.shape[1] - int((s > tol * max(float(s.max()), 1.0)).sum())


def dense_of(fn, d_in: int, dtype=torch.float64) -> torch.Tensor:
    """Dense matrix (column convention) of a linear map acting on rows."""
    eye = torch.eye(d_in, dtype=dtype)
    return (fn(eye) - fn(torch.zeros(1, d_in, dtype=dtype))).T


def randomise(model: nn.Module, std: float = 1.0) -> None:
    with torch.no_grad():
        for _, layer in rp.relaxed_modules(model):
            for p in layer.term.parameters():
                p.normal_(0.0, std)


class GatedNet(nn.Module):
    """An unmodified-e3nn model with a custom forward signature: Linear → Gate → TP with the
    spherical harmonics of a position (x1 by keyword) → Linear with biases. Edge-style external
    TP weights come from a FullyConnectedNet of |pos|."""

    def __init__(self, external: bool = False) -> None:
        super().__init__()
        self.irreps_in = [o3.Irreps("2x0e + 2x1o + 1x2e"), "cartesian_points"]
        self.lin1 = o3.Linear("2x0e + 2x1o + 1x2e", "4x0e + 2x1o + 2x2e")
        self.gate = Gate("2x0e", [torch.tanh], "2x0e", [torch.sigmoid], "2x1o")
        self.sh = o3.Irreps.spherical_harmonics(2)
        self.tp = o3.FullyConnectedTensorProduct("2x0e + 2x1o", self.sh, "3x0e + 2x1o + 1x1e",
                                                 shared_weights=not external)
        self.fc = FullyConnectedNet([1, 8, self.tp.weight_numel], torch.relu) if external else None
        self.lin2 = o3.Linear("3x0e + 2x1o + 1x1e", "2x0e + 1x1o + 1x1e", biases=True)
        self.irreps_out = self.lin2.irreps_out

    def forward(self, feats: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        h = self.gate(self.lin1(feats)[..., :10])  # 4x0e + 2x1o = gate input (2 scalars, 2 gates, 2x1o)
        y = o3.spherical_harmonics(self.sh, pos, normalize=True)
        if self.fc is None:
            h = self.tp(x=h, y=y)
        else:
            h = self.tp(h, y, self.fc(pos.norm(dim=-1, keepdim=True)))
        return self.lin2(h)


def make_inputs(n: int = 6, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 2 + 6 + 5, dtype=dtype), torch.randn(n, 3, dtype=dtype)


# --------------------------------------------------------------------------------------------
# generators and the penalty null space


def test_generators_are_the_derivative_of_D_from_matrix():
    t = 1e-3
    G1 = torch.tensor(_SO3_BASIS, dtype=torch.float64)  # rotations about x, y, z
    for l in range(4):
        G = so3_generators64(l)
        assert G.dtype == torch.float64
        for k in range(3):
            # central difference; e3nn computes D_from_matrix partly in float32 (≈1e-7 errors)
            Dp = o3.Irrep(l, 1).D_from_matrix(torch.linalg.matrix_exp(t * G1[k]))
            Dm = o3.Irrep(l, 1).D_from_matrix(torch.linalg.matrix_exp(-t * G1[k]))
            assert torch.allclose((Dp - Dm) / (2 * t), G[k], atol=1e-3)


@pytest.mark.parametrize("l", range(7))
def test_generators_are_a_float64_representation_of_so3(l):
    # any e3nn version: antisymmetric, [G_x, G_y] = G_z (cyclic), exp(t·G) = D_from_angles exactly
    G = so3_generators64(l)
    assert G.shape == (3, 2 * l + 1, 2 * l + 1)
    assert torch.allclose(G, -G.transpose(1, 2), atol=1e-13)
    for a, b, c in ((0, 1, 2), (1, 2, 0), (2, 0, 1)):
        assert torch.allclose(G[a] @ G[b] - G[b] @ G[a], G[c], atol=1e-12)
    with float64_default():
        angles = torch.tensor([0.3, -1.1, 0.7], dtype=torch.float64)
        D = o3.Irrep(l, 1).D_from_angles(*angles)
        R = o3.angles_to_matrix(*angles)
    # the same element through the generators: R = exp(Σ_k t_k K_k) for the rotations K about x, y, z
    K = torch.tensor(_SO3_BASIS, dtype=torch.float64)
    t = torch.linalg.lstsq(K.reshape(3, 9).T, _logm_rotation(R).reshape(9, 1)).solution.flatten()
    assert torch.allclose(torch.linalg.matrix_exp(torch.einsum("k,kij->ij", t, G)), D, atol=1e-12)


def _logm_rotation(R: torch.Tensor) -> torch.Tensor:
    """Real logarithm of a rotation matrix (angle < π)."""
    angle = torch.arccos(((R.trace() - 1) / 2).clamp(-1, 1))
    return angle / (2 * torch.sin(angle)) * (R - R.T)


@pytest.mark.skipif(not hasattr(o3, "so3_generators"), reason="e3nn < 0.5 has no o3.so3_generators")
@pytest.mark.parametrize("l", range(9))
def test_generators_equal_e3nn_so3_generators(l):
    with float64_default():
        expected = o3.so3_generators(l)
    assert expected.dtype == torch.float64
    assert torch.allclose(so3_generators64(l), expected, rtol=0, atol=1e-14)


@given(irreps_strategy(5, 3, 3))
def test_irreps_action_matches_dense_symmetry(irreps):
    with float64_default():  # buffers built in float64, not rounded through float32
        act = IrrepsAction(irreps)
    sym = irreps_symmetry(irreps, irreps).double()
    x = torch.randn(7, irreps.dim, dtype=torch.float64)
    assert torch.allclose(act.lie(x), torch.einsum("kij,nj->kni", sym.lie_in, x), atol=1e-12)
    with float64_default():  # e3nn computes D_from_matrix in the default dtype
        inv = irreps.D_from_matrix(-torch.eye(3, dtype=torch.float64))
    # e3nn 0.4's D(-I) is a ±1 diagonal up to 1e-16 (Euler angles of I); the adapter's is exact
    assert torch.allclose(sym.group_in[0], inv, rtol=0, atol=1e-14)
    assert torch.equal(sym.group_in[0], torch.diag(act.parity)) and set(act.parity.tolist()) <= {-1.0, 1.0}


def test_parity_is_needed_for_o3():
    # the Lie derivative alone sees SO(3): 36 directions; with the inversion: weight_numel = 24
    lin = o3.Linear("4x0e + 3x1o + 2x2e + 1x1e", "3x0e + 2x1o + 2x2e + 2x1e + 1x0o")
    sym = irreps_symmetry(lin.irreps_in, lin.irreps_out)
    C = constraint_matrix(sym)
    n_lie = 3 * sym.dim_in * sym.dim_out
    assert null_dim(C[:n_lie]) == 36
    assert null_dim(C) == lin.weight_numel == 24


@given(irreps_strategy(), irreps_strategy())
def test_penalty_null_space_is_weight_numel(irreps_in, irreps_out):
    """The data-dependent penalty, as a quadratic form in vec(W), vanishes on exactly
    ``o3.Linear.weight_numel`` directions, and those are the Linear's own dense maps."""
    lin = o3.Linear(irreps_in, irreps_out).double()
    term = E3nnLinearRelaxation(lin).double()
    x = torch.randn(4 * irreps_in.dim + 8, irreps_in.dim, dtype=torch.float64)

    H = torch.func.hessian(lambda w: _penalty_with(term, w.reshape(term.weight.shape), x))(
        torch.zeros(term.weight.numel(), dtype=torch.float64)
    )
    assert null_dim(H) == lin.weight_numel
    # the Linear's dense maps are in the null space
    with torch.no_grad():
        lin.weight.normal_()
        M = dense_of(lin, irreps_in.dim)
    assert float(_penalty_with(term, M, x).detach()) < 1e-20 * max(1.0, float(M.square().sum()))


def _penalty_with(term: E3nnLinearRelaxation, W: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    saved = term.weight
    try:
        del term.weight
        term.weight = W  # a plain tensor: differentiable in W
        term._x = x
        return term.penalty_terms().lie
    finally:
        del term.weight
        term.weight = saved


def test_penalty_terms_equal_the_sample_form(dtype):
    """The Gram-form penalty equals Σ_n ||W A x_n − A W x_n||² (core lie_defect) + inversion, and
    ||Wx||² summed over samples."""
    lin = o3.Linear("2x0e + 2x1o + 1x2e + 1x1e", "1x0e + 3x1o + 1x2e + 1x0o")
    m = rp.relax(nn.Sequential(lin), adapters=["e3nn"]).to(dtype)
    randomise(m)
    x = torch.randn(32, lin.irreps_in.dim, dtype=dtype)
    m(x)
    term = m[0].term
    t = term.penalty_terms()
    W = term.weight
    P_in, P_out = term.symmetry.group_in[0].to(dtype), term.symmetry.group_out[0].to(dtype)
    ref_lie = lie_defect(W, x, term.symmetry).sum() + ((x @ P_in.T) @ W.T - (x @ W.T) @ P_out.T).square().sum()
    assert torch.allclose(t.lie, ref_lie, rtol=TOL[dtype] * 10)
    assert torch.allclose(t.norm, (x @ W.T).square().sum(), rtol=TOL[dtype] * 10)
    assert t.samples == 32
    # gradients reach W only
    (t.lie + t.norm).backward()
    assert W.grad is not None and lin.weight.grad is None


def test_lie_penalty_matches_finite_difference():
    irreps_in, irreps_out = o3.Irreps("1x0e + 2x1o + 1x2e"), o3.Irreps("2x1o + 1x2e + 1x0e")
    term = E3nnRelaxation(irreps_in, irreps_out, init_std=1.0).double()
    x = torch.randn(10, irreps_in.dim, dtype=torch.float64)
    term._x = x
    W = term.weight.detach()
    t = 1e-2  # central differences: O(t²) error; e3nn's D_from_matrix is not exact to 1e-12

    def moved(k: int, s: float) -> torch.Tensor:  # ρ_out(exp(−sA)) W ρ_in(exp(sA)) x
        R = torch.linalg.matrix_exp(s * torch.tensor(_SO3_BASIS, dtype=torch.float64)[k])
        return ((x @ irreps_in.D_from_matrix(R).T) @ W.T) @ irreps_out.D_from_matrix(R.T).T

    fd = sum(float(((moved(k, t) - moved(k, -t)) / (2 * t)).square().sum()) for k in range(3))
    Pi = irreps_in.D_from_matrix(-torch.eye(3, dtype=torch.float64))
    Po = irreps_out.D_from_matrix(-torch.eye(3, dtype=torch.float64))
    fd += float(((x @ Pi.T) @ W.T - (x @ W.T) @ Po.T).square().sum())
    assert abs(float(term.penalty_terms().lie.detach()) - fd) < 1e-3 * fd


# --------------------------------------------------------------------------------------------
# projection


@given(irreps_strategy(), irreps_strategy())
def test_projection_is_the_orthogonal_projection_onto_the_intertwiners(irreps_in, irreps_out):
    W = torch.randn(irreps_out.dim, irreps_in.dim, dtype=torch.float64)
    P = project_irreps_dense(W, irreps_in, irreps_out)
    Q = intertwiner_basis(irreps_symmetry(irreps_in, irreps_out).double())
    ref = (Q @ (Q.T @ W.reshape(-1))).reshape(W.shape)
    assert torch.allclose(P, ref, atol=1e-10)
    assert torch.allclose(project_irreps_dense(P, irreps_in, irreps_out), P, atol=1e-12)  # idempotent


def test_linear_projection_is_least_squares_onto_its_own_paths():
    # restricted instructions and "path" normalisation: the span is smaller than all intertwiners
    irreps_in, irreps_out = o3.Irreps("2x0e + 1x1o + 3x0e + 2x1o"), o3.Irreps("2x0e + 2x1o + 1x0e")
    lin = o3.Linear(irreps_in, irreps_out, instructions=[(0, 0), (3, 1), (2, 2), (0, 2)],
                    path_normalization="path").double()
    term = E3nnLinearRelaxation(lin).double()
    # weight → dense: the Jacobian of the dense map in the flat weight
    def dense_from(w):
        return dense_of(lambda v: lin(v, weight=w), irreps_in.dim).reshape(-1)

    J = torch.func.jacrev(dense_from)(torch.zeros(lin.weight_numel, dtype=torch.float64))
    G = J.T @ J
    assert torch.allclose(G, torch.diag(torch.diagonal(G)), atol=1e-12)  # mutually orthogonal columns
    W = torch.randn(irreps_out.dim, irreps_in.dim, dtype=torch.float64)
    sol = torch.linalg.lstsq(J, W.reshape(-1, 1)).solution
    assert torch.allclose(term.project_dense(W).reshape(-1), (J @ sol).reshape(-1), atol=1e-10)
    full = project_irreps_dense(W, irreps_in, irreps_out)
    assert not torch.allclose(term.project_dense(W), full, atol=1e-3)


def test_merge_equals_relaxed_model_with_projected_w(dtype):
    """merge=True == the relaxed model with W := P(W) in every o3.Linear and W := 0 in the tensor
    products (which cannot hold it and are dropped, with a warning)."""
    torch.manual_seed(1)
    model = GatedNet().to(dtype)
    lin2_bias = model.lin2.bias.detach().clone()
    m = rp.relax(model, adapters=["e3nn"])
    randomise(m)
    rp.set_theta(m, 0.7)
    feats, pos = make_inputs(dtype=dtype)
    reference = copy.deepcopy(m)
    with torch.no_grad():
        for _, layer in rp.relaxed_modules(reference):
            if isinstance(layer.term, E3nnLinearRelaxation):
                layer.term.weight.copy_(layer.term.projected())
            else:
                layer.term.weight.zero_()
        expected = reference(feats, pos)
    with pytest.warns(UserWarning, match="tp"):
        merged = rp.project(m, merge=True)
    assert type(merged.lin1) is o3.Linear and type(merged.tp) is o3.FullyConnectedTensorProduct
    with torch.no_grad():
        got = merged(feats, pos)
    assert torch.allclose(got, expected, atol=TOL[dtype] * 10, rtol=TOL[dtype] * 10)
    assert torch.equal(merged.lin2.bias, lin2_bias.to(dtype))  # W has no bias


def test_merge_with_restricted_paths_and_path_normalisation():
    lin = o3.Linear("2x0e + 1x1o + 3x0e", "2x0e + 2x1o", instructions=[(2, 0), (1, 1), (0, 0)],
                    path_normalization="path").double()
    m = rp.relax(nn.Sequential(lin), adapters=["e3nn"])
    randomise(m)
    rp.set_theta(m, 1.3)
    x = torch.randn(5, lin.irreps_in.dim, dtype=torch.float64)
    term = m[0].term
    with torch.no_grad():
        expected = lin(x) + 1.3 * x @ term.projected().T
    merged = rp.project(m, merge=True)
    assert torch.allclose(merged(x), expected, atol=1e-12)


# --------------------------------------------------------------------------------------------
# whole models


@pytest.mark.parametrize("external", [False, True], ids=["shared", "external"])
def test_relax_keeps_outputs_then_breaks_then_projects_equivariant(external):
    torch.manual_seed(2)
    with float64_default():  # e3nn computes its Clebsch-Gordan buffers in the default dtype
        model = GatedNet(external=external)
    original = copy.deepcopy(model)
    feats, pos = make_inputs()
    m = rp.relax(model, adapters=["e3nn"])
    assert sorted(n for n, _ in rp.relaxed_modules(m)) == ["lin1", "lin2", "tp"]
    rp.set_theta(m, 0.8)
    with torch.no_grad():
        assert torch.equal(m(feats, pos), original(feats, pos))  # W = 0
    randomise(m, 0.3)
    err = equivariance_error(m, [feats, pos], [model.irreps_in[0], "1x1o"], m.irreps_out)
    assert err > 1e-2  # measurably not equivariant
    rp.set_theta(m, 0.0)
    assert equivariance_error(m, [feats, pos], [model.irreps_in[0], "1x1o"], m.irreps_out) < 1e-12
    rp.set_theta(m, 0.8)
    for merge in (False, True):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # merge=True warns that the tensor product is dropped
            projected = rp.project(copy.deepcopy(m), merge=merge)
        assert list(projected.state_dict()) == list(original.state_dict())
        # e3nn's D_from_matrix is float64-accurate only under a float64 default dtype
        with float64_default():
            assert_equivariant(projected, args_in=[feats, pos], irreps_in=[model.irreps_in[0], "cartesian_points"],
                               irreps_out=[m.irreps_out], tolerance=1e-10, do_translation=False)
    dropped = rp.project(copy.deepcopy(m), merge=False)
    with torch.no_grad():
        assert torch.equal(dropped(feats, pos), original(feats, pos))  # bit-identical base weights


def test_tensor_product_forms():
    """Positional, keyword and external per-sample weights, and a broadcast first input."""
    tp = o3.FullyConnectedTensorProduct("2x0e + 1x1o", "1x0e + 1x1o", "1x0e + 2x1o", shared_weights=False).double()
    m = rp.relax(nn.ModuleDict({"tp": tp}), adapters=["e3nn"])
    layer = m["tp"]
    randomise(m)
    rp.set_theta(m, 0.5)
    x, y = torch.randn(1, 5, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64)
    w = torch.randn(4, tp.weight_numel, dtype=torch.float64)
    expected = tp(x, y, w) + 0.5 * (x @ layer.term.weight.T)
    for out in (layer(x, y, w), layer(x, y, weight=w), layer(x=x, y=y, weight=w)):
        assert out.shape == (4, 7) and torch.allclose(out, expected, atol=1e-12)
    assert layer.term.penalty_terms().samples == 1


@pytest.mark.parametrize(
    "make",
    [
        lambda: o3.ElementwiseTensorProduct("2x0e + 2x1o", "2x0e + 2x1e"),
        lambda: o3.FullTensorProduct("1x0e + 1x1o", "1x1o"),
        lambda: o3.TensorSquare("1x0e + 1x1o", filter_ir_out=["0e", "1e", "2e"]),
    ],
    ids=["elementwise", "full", "square"],
)
def test_tensor_product_subclasses_are_relaxed(make):
    tp = make().double()
    m = rp.relax(nn.Sequential(tp), adapters=["e3nn"])
    term = m[0].term
    assert isinstance(term, E3nnTensorProductRelaxation)
    assert term.symmetry.dim_in == tp.irreps_in1.dim and term.symmetry.dim_out == tp.irreps_out.dim
    randomise(m)
    rp.set_theta(m, 1.0)
    args = [torch.randn(3, tp.irreps_in1.dim, dtype=torch.float64)]
    if not isinstance(tp, o3.TensorSquare):
        args.append(torch.randn(3, tp.irreps_in2.dim, dtype=torch.float64))
    out = m(*args) if len(args) == 1 else m[0](*args)
    assert torch.allclose(out, tp(*args) + args[0] @ term.weight.T, atol=1e-12)
    assert not term.can_merge and term.merge_delta(tp, torch.tensor(1.0, dtype=torch.float64)) is None  # bilinear
    rep = rp.projection_report(m)["0"]
    assert rep["mergeable"] == 0.0 and rep["rel_output_error"] == pytest.approx(rep["relax_ratio"])


def test_low_rank_and_options():
    lin = o3.Linear("3x0e + 2x1o", "2x0e + 2x1o")
    tp = o3.FullyConnectedTensorProduct("2x0e + 2x1o", "1x0e", "2x0e")
    model = nn.Sequential(lin)
    x = torch.randn(4, lin.irreps_in.dim)
    ref = lin(x)
    m = rp.relax(model, adapters=["e3nn"], rank=2)
    rp.set_theta(m, 1.0)
    assert torch.equal(m(x), ref)  # B = 0
    m(x).sum().backward()
    assert m[0].term.lora_b.grad is not None and m[0].term.lora_b.grad.abs().sum() > 0
    only_linear = rp.relax(nn.Sequential(o3.Linear("1x0e", "1x0e"), nn.Sequential(tp)), adapters=["e3nn"],
                           adapter_options={"e3nn": {"e3nn_tensor_products": False}})
    assert [n for n, _ in rp.relaxed_modules(only_linear)] == ["0"]


def test_gates_on_request_and_empty_fibres_are_skipped():
    # a Gate's product is relaxed only on request; a Gate without gated irreps has an empty product
    # (0 paths, no input): nothing to relax there, and it must not fail (NequIP's last block is one)
    model = nn.Sequential(o3.Linear("4x0e + 2x1o", "4x0e + 2x0e + 2x1o"),
                          Gate("4x0e", [torch.tanh], "2x0e", [torch.sigmoid], "2x1o"),
                          o3.Linear("4x0e + 2x1o", "3x0e"), Gate("3x0e", [torch.tanh], "", [], ""))
    assert [n for n, _ in rp.relaxed_modules(rp.relax(copy.deepcopy(model)))] == ["0", "2"]
    relaxed = rp.relax(model, adapter_options={"e3nn": {"e3nn_relax_gates": True}})
    assert [n for n, _ in rp.relaxed_modules(relaxed)] == ["0", "1.mul", "2"]


def test_norm_nonlinearities_are_skipped_like_gates():
    # NormActivation and o3.Norm hold weightless products, part of the activation as a Gate's is
    from e3nn.nn import NormActivation

    model = nn.Sequential(o3.Linear("2x0e + 2x1o", "2x0e + 2x1o"), NormActivation("2x0e + 2x1o", torch.tanh),
                          o3.Norm("2x0e + 2x1o"), o3.Linear("4x0e", "1x0e"))
    assert [n for n, _ in rp.relaxed_modules(rp.relax(copy.deepcopy(model)))] == ["0", "3"]
    relaxed = rp.relax(model, adapter_options={"e3nn": {"e3nn_relax_gates": True}})
    assert [n for n, _ in rp.relaxed_modules(relaxed)] == ["0", "1.norm.tp", "1.scalar_multiplier", "2.tp", "3"]


def test_linear_with_fewer_instructions_penalises_what_project_drops():
    # an O(3) intertwiner between irreps the Linear does not connect: the generators' penalty is
    # blind to it, project() drops it; the term penalises it, so the kit certifies the adapter
    from relax_plugins.testing import check_adapter

    lin = o3.Linear("2x0e + 1x1o + 1x2e", "1x0e + 2x1o + 1x2e", instructions=[(0, 0), (1, 1)])
    x = lin.irreps_in.randn(40, -1)
    check_adapter("e3nn", copy.deepcopy(lin), x)
    model = rp.relax(nn.Sequential(lin))
    model(x)
    term = model[0].term
    with torch.no_grad():
        term.weight.zero_()
        term.weight[lin.irreps_out.slices()[2], lin.irreps_in.slices()[2]] = torch.eye(5)  # 2e → 2e
    assert float(term.project_dense(term.weight).abs().max()) == 0.0
    terms = term.penalty_terms()
    torch.testing.assert_close(terms.lie, terms.norm)  # all of W x is the dropped intertwiner's
    assert float(rp.penalty(model)) > 0
    with torch.no_grad():  # on P's image the penalty vanishes
        term.weight.copy_(term.project_dense(torch.randn_like(term.weight)))
    assert float(term.penalty_terms().lie) < 1e-10 * float(term.penalty_terms().norm)


def test_linear_with_f_in_is_refused():
    model = nn.Sequential(o3.Linear("1x1o", "1x1o", f_in=2, f_out=3))
    with pytest.raises(rp.AdapterError, match="f_in"):
        rp.relax(model, adapters=["e3nn"])
    assert type(model[0]) is o3.Linear


def test_equivariance_error_helper_separates():
    lin = o3.Linear("2x1o + 1x2e", "1x1o + 1x0e").double()
    x = [torch.randn(5, 11, dtype=torch.float64)]
    assert equivariance_error(lin, x, ["2x1o + 1x2e"], lin.irreps_out) < 1e-12
    W = torch.randn(4, 11, dtype=torch.float64)
    assert equivariance_error(lambda v: v @ W.T, x, ["2x1o + 1x2e"], lin.irreps_out) > 1e-2
    # an SO(3)- but not O(3)-equivariant map: the cross product of two polar vectors as a 1o
    def cross(v):
        return torch.cross(v[:, :3], v[:, 3:6], dim=-1)

    v = [torch.randn(5, 6, dtype=torch.float64)]
    assert equivariance_error(cross, v, ["2x1o"], "1x1o", parity=False) < 1e-12
    assert equivariance_error(cross, v, ["2x1o"], "1x1o", n_transforms=8) > 1e-2


def test_adapter_info_lists_e3nn():
    info = {a.name: a for a in rp.list_adapters()}
    assert "e3nn" in info and "TensorProduct" in info["e3nn"].layers


def test_tensor_product_inside_pyg_message_passing():
    """An e3nn convolution written as a PyG MessagePassing layer (per-edge TP weights from a radial
    MLP): the TP is relaxed in place and the layer is equivariant again after project()."""
    pyg = pytest.importorskip("torch_geometric")

    class Conv(pyg.nn.MessagePassing):
        def __init__(self) -> None:
            super().__init__(aggr="add")
            self.sh = o3.Irreps.spherical_harmonics(1)
            self.tp = o3.FullyConnectedTensorProduct("2x0e + 1x1o", self.sh, "2x0e + 1x1o", shared_weights=False)
            self.radial = FullyConnectedNet([1, 8, self.tp.weight_numel], torch.relu)

        def forward(self, h, pos, edge_index):
            return self.propagate(edge_index, h=h, pos=pos)

        def message(self, h_j, pos_i, pos_j):
            rel = pos_i - pos_j
            return self.tp(h_j, o3.spherical_harmonics(self.sh, rel, True), self.radial(rel.norm(dim=-1, keepdim=True)))

    with float64_default():
        conv = Conv()
    h, pos = torch.randn(5, 5, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    i, j = torch.meshgrid(torch.arange(5), torch.arange(5), indexing="ij")
    edge_index = torch.stack([i[i != j], j[i != j]])
    with torch.no_grad():
        ref = conv(h, pos, edge_index)
    m = rp.relax(conv, adapters=["e3nn"])
    assert [n for n, _ in rp.relaxed_modules(m)] == ["tp"]
    with torch.no_grad():
        assert torch.equal(m(h, pos, edge_index), ref)
    randomise(m)
    rp.set_theta(m, 1.0)

    def err(model):
        return equivariance_error(lambda a, b: model(a, b, edge_index), [h, pos], ["2x0e + 1x1o", "1x1o"],
                                  "2x0e + 1x1o")

    assert err(m) > 1e-2
    assert m.tp.term.penalty_terms().samples == edge_index.shape[1]
    assert err(rp.project(m)) < 1e-12


class _LinearThenTP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = o3.Linear("4x0e + 2x1o", "3x0e + 2x1o")
        self.tp = o3.FullyConnectedTensorProduct("3x0e + 2x1o", "1x0e + 1x1o", "2x0e + 1x1o")

    def forward(self, x: torch.Tensor, attr: torch.Tensor) -> torch.Tensor:
        return self.tp(self.lin(x), attr)


@pytest.mark.parametrize("rank", [None, 2])
def test_torch_compile_relaxed_e3nn_model_matches_eager(rank):
    """torch.compile guards the attributes forward reads: the terms read plain ints in their hot path
    (an ``Irreps`` attribute there made dynamo's guard builder fail on e3nn's ``Irrep.__len__``)."""
    torch.manual_seed(0)
    model = rp.relax(_LinearThenTP(), rank=rank)
    rp.set_theta(model, 0.5)
    with torch.no_grad():
        for p in rp.relaxation_parameters(model):
            p.normal_(0, 0.1)
    x, attr = o3.Irreps("4x0e + 2x1o").randn(6, -1), o3.Irreps("1x0e + 1x1o").randn(6, -1)
    eager, pen_eager = model(x, attr), rp.penalty(model)
    compiled = torch.compile(model, backend="aot_eager")
    out = compiled(x, attr)
    pen = rp.penalty(model)
    assert torch.allclose(out, eager, atol=1e-5)
    assert torch.allclose(pen, pen_eager, rtol=1e-5)
    (out.square().mean() + pen).backward()
    assert all(p.grad is not None for p in rp.relaxation_parameters(model))


def test_generators_first_built_inside_a_torch_func_transform():
    """A first penalty under the caller's torch.func transform (hessian of the penalty in W) builds
    the generators there: they must come out right and stay usable outside it."""
    from relax_e3nn import irreps as ir

    ir._GENERATORS64.clear()
    t = torch.tensor(1.0, dtype=torch.float64)
    grad = torch.func.grad(lambda s: (ir.so3_generators64(3) * s).sum())(t)
    outside = ir.so3_generators64(3)
    assert float(grad) == float(outside.sum())
    assert torch.allclose(outside[0] @ outside[1] - outside[1] @ outside[0], outside[2], atol=1e-12)
