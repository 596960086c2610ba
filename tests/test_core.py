"""Properties of the core engine, on the pure-torch toy adapter (no optional library needed)."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from relax_toy.layers import CNLinear, SO2Gate, SO2Linear, cyclic_shift, rotation_2d, so2_generator
from torch import nn

import relax_plugins as rp
from relax_plugins.symmetry import Symmetry, group_defect, intertwiner_basis, lie_defect


def so2_model(dtype=torch.float64) -> nn.Module:
    return nn.Sequential(SO2Linear(3, 4), SO2Gate(), SO2Linear(4, 2)).to(dtype)


def cn_model(dtype=torch.float64) -> nn.Module:
    return nn.Sequential(CNLinear(2, 3, n=4), nn.ReLU(), CNLinear(3, 2, n=4)).to(dtype)


def randomise_relaxation(model: nn.Module, std: float = 1.0) -> None:
    with torch.no_grad():
        for _, layer in rp.relaxed_modules(model):
            for p in layer.term.parameters():
                p.normal_(0.0, std)


@torch.no_grad()
def so2_equivariance_error(model: nn.Module, c_in: int, c_out: int, dtype) -> float:
    x = torch.randn(16, 2 * c_in, dtype=dtype)
    errs = []
    for angle in (0.3, 1.1, 2.5):
        Ri, Ro = rotation_2d(angle, c_in, dtype), rotation_2d(angle, c_out, dtype)
        errs.append(float((model(x @ Ri.T) - model(x) @ Ro.T).abs().max()))
    return max(errs)


@torch.no_grad()
def cn_equivariance_error(model: nn.Module, c_in: int, c_out: int, dtype) -> float:
    x = torch.randn(16, 4 * c_in, dtype=dtype)
    Si, So = cyclic_shift(4, c_in, dtype), cyclic_shift(4, c_out, dtype)
    return float((model(x @ Si.T) - model(x) @ So.T).abs().max())


# -- relax() ------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [so2_model, cn_model])
def test_relax_keeps_outputs_and_returns_root(make, dtype):
    model = make(dtype)
    x = torch.randn(8, model[0].c_in * (2 if isinstance(model[0], SO2Linear) else 4), dtype=dtype)
    before = model(x)
    assert rp.relax(model) is model
    assert [n for n, _ in rp.relaxed_modules(model)] == ["0", "2"]
    rp.set_theta(model, 1.0)
    assert torch.equal(model(x), before)
    assert model[0].term.dense().dtype == dtype


def test_relax_low_rank_keeps_outputs_and_learns():
    model = so2_model()
    x = torch.randn(8, 6, dtype=torch.float64)
    before = model(x)
    rp.relax(model, rank=2)
    rp.set_theta(model, 1.0)
    out = model(x)
    assert torch.equal(out, before)
    out.square().sum().backward()
    assert model[0].term.lora_b.grad.abs().max() > 0
    n_dense = 8 * 6 + 4 * 8
    n_low = sum(p.numel() for _, m in rp.relaxed_modules(model) for p in m.term.parameters())
    assert n_low < n_dense


def test_relaxed_model_breaks_equivariance_for_positive_theta_only():
    model = rp.relax(so2_model())
    randomise_relaxation(model)
    assert so2_equivariance_error(model, 3, 2, torch.float64) < 1e-12  # θ = 0
    rp.set_theta(model, 0.5)
    assert so2_equivariance_error(model, 3, 2, torch.float64) > 1e-2


def test_wrapper_forwards_attributes_of_base():
    model = rp.relax(so2_model())
    assert model[0].c_out == 4 and model[0].base.c_out == 4


# -- penalties ----------------------------------------------------------------------------


def _residual_jacobian(sym: Symmetry, x: torch.Tensor) -> torch.Tensor:
    """Jacobian of W ↦ stacked per-sample defects (linear in W), as a matrix over vec(W)."""

    def residual(w: torch.Tensor) -> torch.Tensor:
        W = w.reshape(sym.dim_out, sym.dim_in)
        parts = []
        for A_in, A_out in [*zip(sym.lie_in, sym.lie_out), *zip(sym.group_in, sym.group_out)]:
            parts.append((x @ A_in.T @ W.T - x @ W.T @ A_out.T).reshape(-1))
        return torch.cat(parts)

    return torch.autograd.functional.jacobian(residual, torch.zeros(sym.dim_in * sym.dim_out, dtype=x.dtype))


@given(c_in=st.integers(1, 3), c_out=st.integers(1, 3))
def test_so2_penalty_null_space_is_the_intertwiner_space(c_in, c_out):
    term = rp.relax(nn.Sequential(SO2Linear(c_in, c_out)).double())[0].term
    sym = term.symmetry
    x = torch.randn(4 * c_in + 4, 2 * c_in, dtype=torch.float64)
    J = _residual_jacobian(sym, x)
    null_dim = J.shape[1] - int(torch.linalg.matrix_rank(J))
    assert null_dim == 2 * c_in * c_out  # Hom_SO(2) = span{I, J} per channel pair
    assert intertwiner_basis(sym).shape[1] == 2 * c_in * c_out
    # and the penalty the library computes is that quadratic form
    W = torch.randn(sym.dim_out, sym.dim_in, dtype=torch.float64)
    lie = lie_defect(W, x, sym).sum()
    assert torch.allclose(lie, (J @ W.reshape(-1)).square().sum(), rtol=1e-10)


@given(c_in=st.integers(1, 3), c_out=st.integers(1, 3), n=st.sampled_from([2, 3, 4, 6]))
def test_cn_penalty_null_space_is_the_intertwiner_space(c_in, c_out, n):
    term = rp.relax(nn.Sequential(CNLinear(c_in, c_out, n=n)).double())[0].term
    sym = term.symmetry
    x = torch.randn(n * c_in + 4, n * c_in, dtype=torch.float64)
    J = _residual_jacobian(sym, x)
    assert J.shape[1] - int(torch.linalg.matrix_rank(J)) == n * c_in * c_out  # circulant blocks


def test_generator_major_penalty_vanishes_on_exact_intertwiners_and_not_elsewhere():
    """The authors' feature-major reshape does not vanish on intertwiners; ours must."""
    layer = SO2Linear(3, 2).double()
    sym = Symmetry(6, 4, lie_in=so2_generator(3)[None], lie_out=so2_generator(2)[None])
    W_eq = layer(torch.eye(6, dtype=torch.float64)).T.detach()  # the base layer's own dense matrix
    x = torch.randn(32, 6, dtype=torch.float64)
    assert lie_defect(W_eq, x, sym).abs().max() < 1e-24
    assert lie_defect(torch.randn(4, 6, dtype=torch.float64), x, sym).min() > 1e-6


def test_lie_penalty_matches_finite_difference():
    sym = Symmetry(6, 4, lie_in=so2_generator(3)[None], lie_out=so2_generator(2)[None])
    W = torch.randn(4, 6, dtype=torch.float64)
    x = torch.randn(5, 6, dtype=torch.float64)
    t = 1e-6
    fd = (x @ rotation_2d(t, 3, torch.float64).T @ W.T @ rotation_2d(-t, 2, torch.float64).T - x @ W.T) / t
    assert torch.allclose(lie_defect(W, x, sym), fd.square().sum(-1), rtol=1e-4)


def test_group_defect_matches_definition():
    sym = Symmetry(8, 4, group_in=cyclic_shift(4, 2)[None], group_out=cyclic_shift(4, 1)[None])
    W, x = torch.randn(4, 8), torch.randn(3, 8)
    g_in, g_out = cyclic_shift(4, 2), cyclic_shift(4, 1)
    expected = (x @ g_in.T @ W.T - x @ W.T @ g_out.T).square().sum(-1)
    assert torch.allclose(group_defect(W, x, sym), expected)


def test_penalty_forms_and_batch_size_independence():
    model = rp.relax(so2_model())
    randomise_relaxation(model)
    x = torch.randn(64, 6, dtype=torch.float64)
    model(x)
    p_small = rp.penalty(model)
    model(torch.cat([x] * 4))
    assert torch.allclose(rp.penalty(model), p_small)  # default: means over samples
    paper = rp.penalty(model, form="paper")
    assert torch.allclose(paper, p_small * 16, rtol=1e-6)  # sums over 256 samples: √256 = 16x the means
    sums = [m.penalty_terms() for _, m in rp.relaxed_modules(model)]
    lie = sum(t.lie for t in sums)
    norm = sum(t.norm for t in sums)
    assert torch.allclose(paper, 0.01 * torch.sqrt(lie + 1e-12) + 0.01 * torch.sqrt(norm + 1e-12))
    mean = rp.penalty(model, lie=2.0, norm=0.0, form="mean")
    assert torch.allclose(mean, 2.0 * sum(t.lie / t.samples for t in sums))


def test_penalty_trains_w_only_and_is_zero_at_init():
    model = rp.relax(so2_model())
    model(torch.randn(8, 6, dtype=torch.float64))
    assert float(rp.penalty(model).detach()) < 1e-5  # ε under the roots only
    randomise_relaxation(model)
    model(torch.randn(8, 6, dtype=torch.float64))
    rp.penalty(model).backward()
    assert model[0].term.weight.grad.abs().max() > 0
    assert model[0].base.a.grad is None


# -- projection ---------------------------------------------------------------------------


@pytest.mark.parametrize("make", [so2_model, cn_model])
def test_projection_is_idempotent_exact_and_penalty_free(make):
    model = rp.relax(make(torch.float64))
    randomise_relaxation(model)
    for _, layer in rp.relaxed_modules(model):
        term = layer.term
        P = term.project_dense(term.dense().detach())
        assert torch.allclose(term.project_dense(P), P, atol=1e-12)
        x = torch.randn(20, term.symmetry.dim_in, dtype=torch.float64)
        defect = lie_defect(P, x, term.symmetry) + group_defect(P, x, term.symmetry)
        assert defect.max() < 1e-20
        # orthogonal projection: the residual is orthogonal to the intertwiners
        Q = intertwiner_basis(term.symmetry)
        assert (Q.T @ (term.dense().detach() - P).reshape(-1)).abs().max() < 1e-10


def test_cn_reynolds_average_equals_nullspace_projection():
    term = rp.relax(nn.Sequential(CNLinear(2, 2, n=4)).double())[0].term
    W = torch.randn(8, 8, dtype=torch.float64)
    Q = intertwiner_basis(term.symmetry)
    assert torch.allclose(term.project_dense(W).reshape(-1), Q @ (Q.T @ W.reshape(-1)), atol=1e-12)


@pytest.mark.parametrize("make", [so2_model, cn_model])
def test_project_drop_restores_classes_keys_and_bit_identical_weights(make, dtype):
    model = make(dtype)
    keys = list(model.state_dict())
    classes = [type(m) for m in model.modules()]
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    rp.relax(model)
    randomise_relaxation(model)
    rp.set_theta(model, 0.7)
    assert rp.project(model) is model
    assert list(model.state_dict()) == keys
    assert [type(m) for m in model.modules()] == classes
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_merge_equals_relaxed_model_with_projected_w():
    for make, err in ((so2_model, so2_equivariance_error), (cn_model, cn_equivariance_error)):
        model = rp.relax(make(torch.float64))
        randomise_relaxation(model)
        rp.set_theta(model, 0.8)
        with torch.no_grad():
            for _, layer in rp.relaxed_modules(model):
                layer.term.weight.copy_(layer.term.projected())
        c_in = model[0].c_in
        x = torch.randn(10, c_in * (2 if make is so2_model else 4), dtype=torch.float64)
        expected = model(x)
        rp.project(model, merge=True)
        assert torch.allclose(model(x), expected, atol=1e-12)
        assert err(model, c_in, 2, torch.float64) < 1e-12


def test_projected_model_is_exactly_equivariant_after_merge(dtype):
    model = rp.relax(so2_model(dtype))
    randomise_relaxation(model)
    rp.set_theta(model, 1.0)
    assert so2_equivariance_error(model, 3, 2, dtype) > 1e-2
    rp.project(model, merge=True)
    assert so2_equivariance_error(model, 3, 2, dtype) < (1e-12 if dtype == torch.float64 else 1e-4)


def test_projection_report_fields():
    model = rp.relax(so2_model())
    randomise_relaxation(model)
    rp.set_theta(model, 0.5)
    model(torch.randn(16, 6, dtype=torch.float64))
    report = rp.projection_report(model)
    assert set(report) == {"0", "2"}
    r = report["0"]
    assert r["theta"] == 0.5 and 0 < r["rel_weight_error"] < 1 and r["lie_defect"] > 0
    term = model[0].term
    W = term.dense().detach()
    y_norm = term._y.norm()
    assert r["relax_ratio"] == pytest.approx(float(0.5 * (term._x @ W.T).norm() / y_norm))
    residual = term._x @ (W - term.project_dense(W)).T
    assert r["rel_output_error"] == pytest.approx(float(0.5 * residual.norm() / y_norm))


def test_root_layer_relax_and_project():
    layer = SO2Linear(2, 2).double()
    wrapped = rp.relax(layer)
    assert isinstance(wrapped, rp.RelaxedModule) and wrapped.base is layer
    assert rp.project(wrapped) is layer


# -- state and schedules ------------------------------------------------------------------


def test_state_dict_round_trip_of_relaxed_model():
    model = rp.relax(so2_model())
    randomise_relaxation(model)
    rp.set_theta(model, 0.3)
    state = model.state_dict()
    assert "0.theta" in state and "0.term.weight" in state and "0.base.a" in state
    other = rp.relax(so2_model())
    other.load_state_dict(state)
    x = torch.randn(4, 6, dtype=torch.float64)
    assert torch.equal(other(x), model(x)) and rp.get_theta(other) == {"0": 0.3, "2": 0.3}


@pytest.mark.parametrize("cls", [rp.schedules.Triangular, rp.schedules.LinearDecay, rp.schedules.Cosine,
                                 rp.schedules.Constant])
@given(total=st.integers(1, 500), peak=st.floats(0.0, 10.0))
def test_schedules_end_at_exactly_zero_and_stay_in_range(cls, total, peak):
    s = cls(total=total, peak=peak)
    values = [s(i) for i in range(total)]
    assert values[-1] == 0.0 and s(total + 3) == 0.0
    assert all(0.0 <= v <= peak + 1e-12 for v in values)


def test_schedule_shapes():
    assert rp.schedules.Triangular(total=101)(50) == 1.0
    assert rp.schedules.Triangular(total=101)(0) == 0.0
    ld = rp.schedules.LinearDecay(total=101)
    assert ld(0) == ld(50) == 1.0 and math.isclose(ld(75), 0.5)
    assert math.isclose(rp.schedules.Cosine(total=101)(50), 0.5)
    f = rp.schedules.as_schedule(lambda t: 2.0, total=5)
    assert [f(i) for i in range(5)] == [2.0, 2.0, 2.0, 2.0, 0.0]
    with pytest.raises(ValueError):
        rp.schedules.as_schedule("nope", total=3)
    with pytest.raises(ValueError):
        rp.schedules.Triangular(total=0)


# -- errors leave the model untouched -------------------------------------------------------


def test_errors_are_clear():
    with pytest.raises(rp.NothingToRelaxError):
        rp.relax(nn.Sequential(nn.Linear(3, 3)))
    model = rp.relax(so2_model())
    with pytest.raises(rp.AlreadyRelaxedError):
        rp.relax(model)
    with pytest.raises(rp.UnknownAdapterError, match="no_such_adapter"):
        rp.relax(so2_model(), adapters=["no_such_adapter"])
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            rp.set_theta(model, bad)
    with pytest.raises(KeyError):
        rp.set_theta(model, {"7": 1.0})
    with pytest.raises(rp.NotRelaxedError):
        rp.project(so2_model())
    with pytest.raises(rp.NotRelaxedError):
        rp.set_theta(nn.Linear(2, 2), 1.0)
    with pytest.raises(RuntimeError, match="forward"):
        rp.penalty(rp.relax(so2_model()))


@pytest.mark.parametrize("dtype, value", [(torch.float32, 1e39), (torch.float16, 1e5), (torch.bfloat16, 1e39)])
def test_theta_that_its_dtype_cannot_hold_is_refused_before_any_layer_changes(dtype, value):
    from relax_toy.layers import SO2Linear

    from relax_plugins.schedules import Triangular

    # the first layer float64 (holds the value), the second in ``dtype`` (does not)
    model = rp.relax(nn.Sequential(SO2Linear(1, 1).double(), SO2Linear(1, 1).to(dtype)))
    before = rp.get_theta(model)
    with pytest.raises(ValueError, match="does not fit.*'1'"):
        rp.set_theta(model, value)
    with pytest.raises(ValueError, match="does not fit"):
        rp.set_theta(model, {"0": 0.5, "1": value})
    assert rp.get_theta(model) == before
    rp.set_theta(model, {"0": value, "1": 0.5})  # the float64 layer holds it
    assert rp.get_theta(model)["0"] == value
    with pytest.raises(ValueError, match="largest θ"):
        rp.RelaxedTraining(model, Triangular(total=10, peak=value))


def test_mixed_dtype_layer_is_refused_and_model_untouched():
    model = so2_model()
    model[2].b.data = model[2].b.data.float()
    with pytest.raises(rp.AdapterError, match="mixes dtypes"):
        rp.relax(model)
    assert not any(True for _ in rp.relaxed_modules(model))
    assert type(model[0]) is SO2Linear


def test_failing_adapter_leaves_model_untouched():
    class Picky:
        @rp.hookimpl(tryfirst=True)
        def relax_make_term(self, module, name):
            if name == "2":
                raise RuntimeError("cannot relax this one")
            return None

    rp.register_adapter(Picky(), name="picky")
    try:
        model = so2_model()
        keys = list(model.state_dict())
        with pytest.raises(rp.AdapterError, match="'2'.*cannot relax this one"):
            rp.relax(model)
        assert list(model.state_dict()) == keys and type(model[0]) is SO2Linear
    finally:
        rp.unregister_adapter("picky")


def test_failing_merge_leaves_model_untouched():
    model = rp.relax(so2_model())
    randomise_relaxation(model)
    rp.set_theta(model, 1.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def boom(base, delta):
        raise RuntimeError("merge exploded")

    model[2].term.dense_delta = boom
    with pytest.raises(rp.AdapterError, match="merge exploded"):
        rp.project(model, merge=True)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert isinstance(model[0], rp.RelaxedModule)


def test_include_exclude_patterns():
    model = rp.relax(so2_model(), exclude=["2"])
    assert [n for n, _ in rp.relaxed_modules(model)] == ["0"]
    model = rp.relax(so2_model(), include=["2"])
    assert [n for n, _ in rp.relaxed_modules(model)] == ["2"]


def test_include_brings_a_containers_layers_and_a_pattern_matching_nothing_is_refused():
    nested = nn.Sequential(so2_model(), so2_model())
    # a container named by include brings its layers, as exclude takes them out
    assert [n for n, _ in rp.relaxed_modules(rp.relax(copy.deepcopy(nested), include=["1"]))] == ["1.0", "1.2"]
    assert [n for n, _ in rp.relaxed_modules(rp.relax(copy.deepcopy(nested), exclude=["1"]))] == ["0.0", "0.2"]
    before = copy.deepcopy(nested)
    with pytest.raises(ValueError, match=r"\['typo'\] match no module"):
        rp.relax(nested, include=["1", "typo"])
    assert repr(nested) == repr(before)  # nothing changed
    with pytest.warns(UserWarning, match=r"exclude patterns \['typo'\]"):
        rp.relax(nested, exclude=["typo"])


def test_include_pattern_matching_only_inside_a_relaxed_layer_is_not_a_typo():
    o3 = pytest.importorskip("e3nn.o3")
    model = nn.Sequential(o3.Linear("2x0e + 1x1o", "2x0e + 1x1o"))
    assert any(n.startswith("0.") for n, _ in model.named_modules())  # e3nn's compiled submodule
    rp.relax(model, include=["0", "0.*"])  # "0" is taken whole; "0.*" names its insides, not a typo
    assert [n for n, _ in rp.relaxed_modules(model)] == ["0"]


def test_a_rank_that_saves_nothing_warns():
    from relax_toy.layers import SO2Linear

    with pytest.warns(UserWarning, match=r"rank=4 .*'0 \(4 -> 4\)'"):
        rp.relax(nn.Sequential(SO2Linear(2, 2)), rank=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rp.relax(nn.Sequential(SO2Linear(16, 16)), rank=4)  # 4·64 < 32·32: cheaper, no warning


def test_per_layer_theta():
    model = rp.relax(so2_model())
    rp.set_theta(model, {"2": 0.25})
    assert rp.get_theta(model) == {"0": 0.0, "2": 0.25}


@pytest.mark.parametrize("merge", [False, True])
def test_projected_state_dict_equals_state_of_projected_model(merge):
    import copy

    model = rp.relax(so2_model())
    randomise_relaxation(model)
    rp.set_theta(model, 0.6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = rp.projected_state_dict(model, merge=merge)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # model unchanged
    expected = rp.project(copy.deepcopy(model), merge=merge).state_dict()
    assert list(state) == list(expected)
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    fresh = so2_model()
    fresh.load_state_dict(state)  # strict: the original architecture's keys


@pytest.mark.parametrize("make", [so2_model, cn_model])
def test_penalty_moment_route_equals_sample_route(make, dtype):
    model = rp.relax(make(dtype), rank=None)
    randomise_relaxation(model)
    d_in = model[0].term.symmetry.dim_in
    for n in (d_in - 1, 5 * d_in):  # both sides of the switch
        model(torch.randn(n, d_in, dtype=dtype))
        for _, layer in rp.relaxed_modules(model):
            a = layer.term._penalty_from_samples(layer.term._x)
            b = layer.term._penalty_from_moments(layer.term._x)
            tol = 1e-10 if dtype == torch.float64 else 1e-4
            assert torch.allclose(a.lie, b.lie, rtol=tol) and torch.allclose(a.norm, b.norm, rtol=tol)
            assert a.samples == b.samples == n


def test_relaxed_model_pickles_and_deepcopies(tmp_path):
    import copy
    import pickle

    model = rp.relax(so2_model())
    randomise_relaxation(model)
    rp.set_theta(model, 0.4)
    x = torch.randn(3, 6, dtype=torch.float64)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(clone(x), model(x)) and clone[0].c_in == 3
    with pytest.raises(AttributeError):
        _ = model[0].no_such_attribute


def test_generators_keep_float64_precision_through_dtype_round_trips():
    model = rp.relax(so2_model(torch.float64))
    sym = model[0].term.symmetry
    exact = sym.lie_in.clone()
    model.float().double()
    assert sym.lie_in.dtype == torch.float64 and torch.equal(sym.lie_in, exact)
    model.float()
    model(torch.randn(4, 6))
    assert rp.penalty(model).dtype == torch.float32


def test_report_for_a_layer_that_cannot_merge():
    model = rp.relax(so2_model())
    randomise_relaxation(model)
    rp.set_theta(model, 0.5)
    term = model[0].term
    term.can_merge = False  # an instance may withdraw its class's declaration
    model(torch.randn(16, 6, dtype=torch.float64))
    r = rp.projection_report(model)
    assert r["0"]["mergeable"] == 0.0 and r["0"]["rel_output_error"] == pytest.approx(r["0"]["relax_ratio"])
    t2 = model[2].term
    W = t2.dense().detach()
    expected = 0.5 * (t2._x @ (W - t2.project_dense(W)).T).norm() / t2._y.norm()
    assert r["2"]["mergeable"] == 1.0 and r["2"]["rel_output_error"] == pytest.approx(float(expected))


def test_penalty_samples_subset_estimates_the_full_sums():
    full = rp.relax(so2_model())
    randomise_relaxation(full)
    sub = rp.relax(so2_model(), penalty_samples=200)
    sub.load_state_dict(full.state_dict())
    x = torch.randn(2000, 6, dtype=torch.float64)
    full(x)
    sub(x)
    for (_, a), (_, b) in zip(rp.relaxed_modules(full), rp.relaxed_modules(sub)):
        ta, tb = a.penalty_terms(), b.penalty_terms()
        assert ta.samples == tb.samples == 2000
        assert torch.allclose(tb.lie, ta.lie, rtol=0.2) and torch.allclose(tb.norm, ta.norm, rtol=0.2)
    small = rp.relax(so2_model(), penalty_samples=5000)
    small.load_state_dict(full.state_dict())
    small(x)
    assert torch.equal(small[0].penalty_terms().lie, full[0].penalty_terms().lie)
    with pytest.raises(ValueError):
        rp.relax(so2_model(), penalty_samples=0)


def test_kron_generators_materialise_only_when_used():
    from relax_plugins.symmetry import KronGenerators

    J = torch.tensor([[0.0, -1.0], [1.0, 0.0]])
    lazy = rp.Symmetry(6, 4, lie_in=KronGenerators(J, 3), lie_out=KronGenerators(J, 2))
    dense = rp.Symmetry(6, 4, lie_in=torch.kron(J, torch.eye(3))[None], lie_out=torch.kron(J, torch.eye(2))[None])
    assert lazy.num_lie == 1 and "lie_in" not in lazy._buffers  # nothing dense yet
    lazy.double().float()
    assert torch.equal(lazy.lie_in, dense.lie_in) and "lie_in" in lazy._buffers
    assert torch.equal(lazy.lie_out, dense.lie_out)
    with pytest.raises(ValueError, match="dimension"):
        rp.Symmetry(5, 4, lie_in=KronGenerators(J, 3), lie_out=KronGenerators(J, 2))


def test_relax_does_not_consume_the_global_random_stream():
    model = so2_model()
    torch.manual_seed(5)
    rp.relax(model)
    after_relax = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(torch.rand(3), after_relax)


def test_relax_of_an_eval_model_adds_eval_mode_modules():
    model = so2_model().eval()
    rp.relax(model)
    assert not any(m.training for m in model.modules())
    model.train()
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize("how", ["parametrize", "spectral_norm", "old_weight_norm"])
def test_merge_drops_a_layer_with_reparametrized_weights(how):
    model = so2_model(torch.float32)
    if how == "parametrize":
        torch.nn.utils.parametrize.register_parametrization(model[0], "a", nn.Identity())
    elif how == "spectral_norm":
        model[0] = torch.nn.utils.parametrizations.spectral_norm(model[0], "a")
    else:
        torch.nn.utils.weight_norm(model[0], "a")
    rp.relax(model)
    randomise_relaxation(model, 0.1)
    rp.set_theta(model, 0.5)
    x = torch.randn(8, 6)
    model(x)
    report = rp.projection_report(model)
    assert report["0"]["mergeable"] == 0.0 and report["2"]["mergeable"] == 1.0
    state = rp.projected_state_dict(model, merge=True)
    assert "2.a" in state
    with pytest.warns(UserWarning, match=r"dropped: \['0'\]"):
        rp.project(model, merge=True)
    assert type(model[2]) is SO2Linear


def test_penalty_and_report_outside_autocast_after_an_autocast_forward():
    model = rp.relax(so2_model(torch.float32))
    randomise_relaxation(model, 0.1)
    rp.set_theta(model, 0.5)
    x = torch.randn(64, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
    assert model[2].term._x.dtype == torch.bfloat16  # the input autocast gave the second layer
    p = rp.penalty(model)
    assert p.dtype == torch.float32 and bool(torch.isfinite(p))
    p.backward()
    assert model[2].term.weight.grad is not None
    assert math.isfinite(rp.projection_report(model)["2"]["rel_output_error"])
