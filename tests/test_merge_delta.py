"""Merge by delta (issue 13, items 1 and 3): terms declare what they can do, return the change to
their base layer's parameters, and the core adds it, rolls it back, and builds projected state dicts
without copying a module."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from relax_toy.layers import CNLinear, SO2Linear
from relax_toy.plugin import SO2Relaxation
from torch import nn

import relax_plugins as rp
import relax_plugins.copying
from relax_plugins.term import CAPABILITIES, LinearRelaxation, RelaxationTerm

warnings.filterwarnings("ignore", message=".*py3nj.*")


def so2_model() -> nn.Module:
    return nn.Sequential(SO2Linear(3, 4), nn.Tanh(), SO2Linear(4, 2), CNLinear(1, 1, n=2)).double()


def randomise(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in rp.relaxed_modules(model):
            for p in layer.term.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))


def _escnn_model(eval_mode: bool) -> tuple[nn.Module, object]:
    pytest.importorskip("escnn")
    from escnn import gspaces
    from escnn import nn as enn

    gs = gspaces.rot2dOnR2(4)
    t = enn.FieldType(gs, [gs.regular_repr])
    model = enn.SequentialModule(enn.R2Conv(t, t, 3, padding=1), enn.ReLU(t), enn.R2Conv(t, t, 3, padding=1))
    if eval_mode:
        model.eval()
    return model, t(torch.randn(2, 4, 9, 9))


def _no_copies(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a module was copied")

    monkeypatch.setattr(copy, "deepcopy", refuse)
    monkeypatch.setattr(relax_plugins.copying, "module_copy", refuse)
    monkeypatch.setattr(nn.Module, "__deepcopy__", refuse, raising=False)


# -- declarations -------------------------------------------------------------------------------
def test_defaults_and_declarations():
    assert CAPABILITIES == ("can_merge", "batched_penalty", "subsampled_penalty")
    assert (RelaxationTerm.can_merge, RelaxationTerm.batched_penalty, RelaxationTerm.subsampled_penalty) == (
        False, False, False)
    assert RelaxationTerm.default_penalty_samples is None
    assert (LinearRelaxation.can_merge, LinearRelaxation.batched_penalty, LinearRelaxation.subsampled_penalty) == (
        False, True, True)
    assert SO2Relaxation.can_merge and SO2Relaxation.batched_penalty
    term = rp.relax(nn.Sequential(SO2Linear(1, 1)))[0].term
    assert term.capabilities == frozenset(CAPABILITIES)
    term.can_merge = False
    assert term.capabilities == frozenset({"batched_penalty", "subsampled_penalty"})


def test_supports_subgroup_is_no_longer_a_capability():
    # a subgroup is each adapter's own option (adapter_options={"toy": {"subgroup": 2}}), read by the adapter
    assert not hasattr(RelaxationTerm, "supports_subgroup") and "supports_subgroup" not in CAPABILITIES
    with pytest.warns(DeprecationWarning, match="supports_subgroup"):
        class Old(LinearRelaxation):
            supports_subgroup = True
    assert "supports_subgroup" not in Old(rp.Symmetry(2, 2, lie_in=torch.zeros(1, 2, 2),
                                                      lie_out=torch.zeros(1, 2, 2))).capabilities


def test_overriding_penalty_terms_without_a_declaration_is_not_batched():
    class Custom(LinearRelaxation):
        def penalty_terms(self):
            return super().penalty_terms()

    class Declared(Custom):
        batched_penalty = True

    assert not Custom.batched_penalty and Declared.batched_penalty
    sym = rp.Symmetry(2, 2, lie_in=torch.tensor([[[0.0, -1.0], [1.0, 0.0]]]),
                      lie_out=torch.tensor([[[0.0, -1.0], [1.0, 0.0]]]))
    custom, declared = Custom(sym), Declared(sym)
    for term in (custom, declared):
        term.record(torch.randn(10, 2), torch.randn(10, 2))
    assert custom.batchable_penalty() is None and declared.batchable_penalty() is not None


def test_old_merge_methods_warn_at_definition():
    with pytest.warns(DeprecationWarning, match="merge_delta"):
        class Old(LinearRelaxation):
            def merge_dense(self, base, delta):
                return True
    assert not Old.can_merge


def test_first_party_terms_answer_as_they_declare():
    """A term that declares can_merge=False answers None; one that declares True answers a dict."""
    model = rp.relax(so2_model())
    randomise(model)
    rp.set_theta(model, 0.5)
    for _, layer in rp.relaxed_modules(model):
        assert isinstance(layer.term.merge_delta(layer.base, layer.theta), dict)
        layer.term.can_merge = False
        assert layer.term.merge_delta(layer.base, layer.theta) is None
    o3 = pytest.importorskip("e3nn.o3")
    tp = o3.FullyConnectedTensorProduct("1x0e + 1x1o", "1x0e", "1x0e + 1x1o")
    ext = o3.Linear("1x0e + 1x1o", "1x0e + 1x1o", internal_weights=False, shared_weights=False)
    lin = o3.Linear("1x0e + 1x1o", "1x0e + 1x1o")
    for layer, mergeable in ((tp, False), (ext, False), (lin, True)):
        term = rp.relax(nn.Sequential(layer), adapters=["e3nn"])[0].term
        assert term.can_merge is mergeable
        answer = term.merge_delta(layer, torch.tensor(1.0))
        assert (answer is None) is (not mergeable)


def test_report_mergeable_is_the_declaration():
    o3 = pytest.importorskip("e3nn.o3")
    tp = o3.FullyConnectedTensorProduct("1x0e + 1x1o", "1x0e", "1x0e + 1x1o")
    model = rp.relax(nn.Sequential(tp, o3.Linear("1x0e + 1x1o", "1x0e")), adapters=["e3nn"])
    randomise(model)
    rp.set_theta(model, 0.5)
    model[1](model[0](torch.randn(8, 4), torch.randn(8, 1)))
    report = rp.projection_report(model)
    assert report["0"]["mergeable"] == 0.0 and report["1"]["mergeable"] == 1.0
    assert all("merges" not in row for row in report.values())
    # nothing merged for the TP: projecting removes all of θ·W·x1
    assert report["0"]["rel_output_error"] == pytest.approx(report["0"]["relax_ratio"])


# -- the core adds the delta --------------------------------------------------------------------
def test_merge_adds_exactly_the_delta():
    model = rp.relax(so2_model())
    randomise(model)
    rp.set_theta(model, 0.7)
    layers = dict(rp.relaxed_modules(model))
    deltas = {n: l.term.merge_delta(l.base, l.theta) for n, l in layers.items()}
    before = {n: {k: v.clone() for k, v in l.base.state_dict().items()} for n, l in layers.items()}
    projected = rp.project(copy.deepcopy(model), merge=True)
    for n, delta in deltas.items():
        got = projected.get_submodule(n).state_dict()
        assert set(delta) <= set(got)
        for k, v in got.items():
            expected = before[n][k] + delta[k].to(v.dtype) if k in delta else before[n][k]
            assert torch.equal(v, expected), (n, k)


def test_zero_delta_is_an_empty_dict():
    model = rp.relax(so2_model())
    layer = model[0]
    assert layer.term.merge_delta(layer.base, layer.theta) == {}  # W = 0 (and θ = 0)


def test_projected_state_dict_copies_no_module(monkeypatch):
    model = rp.relax(so2_model())
    randomise(model)
    rp.set_theta(model, 0.4)
    expected = rp.project(copy.deepcopy(model), merge=True).state_dict()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _no_copies(monkeypatch)
    state = rp.projected_state_dict(model, merge=True)
    assert list(state) == list(expected) and all(torch.equal(state[k], expected[k]) for k in expected)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("eval_mode", [False, True], ids=["train", "eval"])
def test_escnn_projected_state_dict_copies_nothing_and_keeps_the_filter_cache(monkeypatch, eval_mode):
    model, x = _escnn_model(eval_mode)
    relaxed = rp.relax(model, adapters=["escnn"])
    randomise(relaxed, seed=1)
    rp.set_theta(relaxed, 0.3)
    with monkeypatch.context() as m:
        _no_copies(m)
        state = {k: v.clone() for k, v in rp.projected_state_dict(relaxed, merge=True).items()}
    with torch.no_grad():
        expected_out = relaxed(x).tensor  # cannot deepcopy SO(3) layers in general, but this one is fine
    plain_state = {k: v.clone() for k, v in relaxed.state_dict().items()}
    projected = rp.project(relaxed, merge=True)
    got = projected.state_dict()
    assert list(state) == list(got)
    for k in got:
        assert torch.allclose(state[k], got[k], rtol=1e-5, atol=1e-6), k
    if eval_mode:  # the cached filter is part of the state and follows the merged weights
        assert any(k.endswith("filter") for k in state)
        fresh, _ = _escnn_model(True)
        fresh.load_state_dict(state)
        with torch.no_grad():
            out = fresh(x).tensor
        assert (out - projected(x).tensor).abs().max() < 1e-4
    assert plain_state  # the relaxed model's own state was readable throughout
    assert expected_out.shape == projected(x).tensor.shape


# -- rollback --------------------------------------------------------------------------------------
def test_failure_after_adding_rolls_back_bit_for_bit(monkeypatch):
    model = rp.relax(so2_model())
    randomise(model)
    rp.set_theta(model, 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    objects = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    calls = []

    def fail_on_second(self, base):
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                base.a.fill_(float("nan"))  # a corrupt cache rebuild: caught by the NaN check

    monkeypatch.setattr(SO2Relaxation, "after_merge", fail_on_second)
    with pytest.raises(rp.NonFiniteError, match="non-finite"):
        rp.project(model, merge=True)
    assert len(calls) == 2
    after = model.state_dict(keep_vars=True)
    assert all(after[k] is objects[k] for k in objects)  # the same tensors...
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # ...bit-identical
    assert all(isinstance(model[i], rp.RelaxedModule) for i in (0, 2, 3))


def test_escnn_rollback_restores_the_replaced_filter_cache(monkeypatch):
    from relax_escnn.conv import ConvRelaxation

    model, x = _escnn_model(True)
    relaxed = rp.relax(model, adapters=["escnn"])
    randomise(relaxed, seed=2)
    rp.set_theta(relaxed, 0.5)
    before = {k: v.clone() for k, v in relaxed.state_dict().items()}
    objects = dict(relaxed.state_dict(keep_vars=True))
    with torch.no_grad():
        out = relaxed(x).tensor
    original, calls = ConvRelaxation.after_merge, []

    def then_fail(self, base):
        original(self, base)  # replaces base.filter by a new buffer
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("cache rebuild failed")

    monkeypatch.setattr(ConvRelaxation, "after_merge", then_fail)
    with pytest.raises(rp.AdapterError, match="cache rebuild failed"):
        rp.project(relaxed, merge=True)
    after = dict(relaxed.state_dict(keep_vars=True))
    assert list(after) == list(objects) and all(after[k] is objects[k] for k in objects)
    assert all(torch.equal(v, before[k]) for k, v in relaxed.state_dict().items())
    with torch.no_grad():
        assert torch.equal(relaxed(x).tensor, out)


def test_a_failing_delta_changes_nothing(monkeypatch):
    model = rp.relax(so2_model())
    randomise(model)
    rp.set_theta(model, 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def second_fails(self, base, delta):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("no delta for you")
        return {"a": torch.ones_like(base.a), "b": torch.ones_like(base.b)}

    monkeypatch.setattr(SO2Relaxation, "dense_delta", second_fails)
    with pytest.raises(rp.AdapterError, match="no delta for you"):
        rp.project(model, merge=True)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_escnn_eval_mode_layers_conform():
    """The conformance kit on escnn layers in eval mode, whose cached filter/matrix is in the state."""
    pytest.importorskip("escnn")
    from escnn import group, gspaces
    from escnn import nn as enn

    from relax_plugins.testing import check_adapter

    gs = gspaces.rot2dOnR2(4)
    t = enn.FieldType(gs, [gs.regular_repr])
    conv = enn.R2Conv(t, t, 3, padding=1).double().eval()  # the cache built in the checked dtype
    report = check_adapter("escnn", conv, t(torch.randn(2, 4, 7, 7)), tolerances={"projected_equivariant": 1e-6})
    assert report.ok and report.merged == {"layer": True}
    g0 = gspaces.no_base_space(group.so2_group(3))
    a = enn.FieldType(g0, [g0.irrep(1)] * 2 + [g0.trivial_repr])
    lin = enn.Linear(a, a).double().eval()
    report = check_adapter("escnn", lin, a(torch.randn(32, a.size)))
    assert report.ok and report.merged == {"layer": True}


class _TiedParameter(nn.Module):
    """Two different layers holding one parameter (weight tying without a shared module)."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = SO2Linear(2, 2), SO2Linear(2, 2)
        self.l2.a = self.l1.a

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)))


@pytest.mark.parametrize("include", [None, ["l1"]], ids=["both-relaxed", "one-relaxed"])
def test_merge_never_writes_a_weight_tied_to_another_module(include):
    # adding θ·P(W) to a parameter another module holds would change that module too (and two layers
    # would add twice): such a layer is dropped with a warning, in project and projected_state_dict alike
    torch.manual_seed(0)
    model = rp.relax(_TiedParameter(), include=include)
    with torch.no_grad():
        for _, layer in rp.relaxed_modules(model):
            layer.term.weight.normal_()
    rp.set_theta(model, 0.5)
    shared_before = model.l1.base.a.detach().clone()
    with pytest.warns(UserWarning, match="shares"):
        state = rp.projected_state_dict(model, merge=True)
    with pytest.warns(UserWarning, match="shares"):
        rp.project(model, merge=True)
    assert torch.equal(model.l1.a, shared_before) and model.l1.a is model.l2.a
    projected = model.state_dict()
    assert list(state) == list(projected) and all(torch.equal(state[k], projected[k]) for k in state)


def test_a_parametrization_added_after_relax_drops_the_layer_at_merge():
    # as when it existed at relax() time: the weight is computed from others, a delta cannot be added
    torch.manual_seed(0)
    model = rp.relax(nn.Sequential(SO2Linear(2, 2), SO2Linear(2, 2)), init_std=0.1)
    rp.set_theta(model, 0.5)
    torch.nn.utils.parametrize.register_parametrization(model[0].base, "a", _Scale())
    with pytest.warns(UserWarning, match="computes its weights from others"):
        state = rp.projected_state_dict(model, merge=True)
    with pytest.warns(UserWarning, match="computes its weights from others"):
        rp.project(model, merge=True)
    assert list(state) == list(model.state_dict())


class _Scale(nn.Module):
    def forward(self, w):
        return 2.0 * w
