"""projected_state_dict(merge=True) and RelaxedTraining.export() copy state, not modules (issue 12d):
they work on escnn's SO(3) layers, which copy.deepcopy cannot copy."""

from __future__ import annotations

import copy

import pytest
import torch
from relax_toy.layers import SO2Gate, SO2Linear
from torch import nn

import relax_plugins as rp
from relax_plugins.copying import module_copy


def _randomise(model: nn.Module, std: float = 0.5, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in rp.relaxed_modules(model):
            for p in layer.term.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * std)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_module_copy_is_independent_and_keeps_aliasing():
    shared = nn.Linear(3, 3)
    model = nn.Sequential(shared, nn.BatchNorm1d(3), shared)
    model[1].register_buffer("tmp", torch.ones(2), persistent=False)
    out = module_copy(model)
    assert [type(m) for m in out.modules()] == [type(m) for m in model.modules()]
    assert out[0] is out[2] and out[0] is not model[0]  # shared module stays shared, once
    assert set(out.state_dict()) == set(model.state_dict())
    for (k, a), b in zip(model.state_dict().items(), out.state_dict().values()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), k
    assert out[1].tmp is not model[1].tmp and "tmp" not in out.state_dict()
    with torch.no_grad():
        out[0].weight.add_(1.0)
    assert not torch.equal(out[0].weight, model[0].weight)
    # hooks registered on the copy do not reach the original
    out[1].register_forward_hook(lambda *a: None)
    assert not model[1]._forward_hooks
    x = torch.randn(4, 3)
    model.eval()
    out.eval()
    assert out[1].training is False and model(x).shape == out(x).shape


def test_export_and_merged_state_on_toy_model():
    torch.manual_seed(0)
    model = nn.Sequential(SO2Linear(2, 3), SO2Gate(), SO2Linear(3, 2)).double()
    keys = set(model.state_dict())
    rp.relax(model)
    _randomise(model)
    rp.set_theta(model, 0.7)
    x = torch.randn(5, 4, dtype=torch.float64)
    model(x)
    before = _state(model)
    merged = rp.projected_state_dict(model, merge=True)
    assert all(torch.equal(before[k], v) for k, v in _state(model).items())  # the model is untouched
    run = rp.RelaxedTraining(model, "constant", total=2)
    exported = run.export(merge=True)
    assert set(exported.state_dict()) == keys and type(exported[0]) is SO2Linear
    assert all(torch.equal(merged[k], v) for k, v in exported.state_dict().items())
    y = exported(x).detach().clone()
    with torch.no_grad():  # training the relaxed model further does not change the export
        for p in model.parameters():
            p.add_(0.1)
    assert torch.equal(exported(x), y)
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(0.1)
    rp.project(model, merge=True)
    assert all(torch.allclose(merged[k], v, atol=1e-12) for k, v in model.state_dict().items())


def test_escnn_so3_export_and_merged_state_without_deepcopy(monkeypatch):
    pytest.importorskip("escnn")
    import numpy as np
    from escnn import gspaces
    from escnn import nn as enn

    gs = gspaces.rot3dOnR3(maximum_frequency=1)
    t_in = enn.FieldType(gs, [gs.trivial_repr, gs.irrep(1)])
    t_out = enn.FieldType(gs, [gs.irrep(1), gs.trivial_repr])
    model = enn.SequentialModule(enn.R3Conv(t_in, t_out, 3, padding=1)).double()
    keys = set(model.state_dict())
    # copy.deepcopy of such a model fails (GroupElement hashing in escnn; whether it does depends on
    # escnn's caches, so it is not asserted here): nothing below may call it
    def no_deepcopy(*args, **kwargs):
        raise AssertionError("copy.deepcopy called")

    monkeypatch.setattr(copy, "deepcopy", no_deepcopy)
    rp.relax(model)
    _randomise(model, std=0.2)
    rp.set_theta(model, 0.5)
    g = torch.Generator().manual_seed(1)
    x = enn.GeometricTensor(torch.randn(1, t_in.size, 5, 5, 5, generator=g, dtype=torch.float64), t_in)
    model(x)
    before = _state(model)
    merged = rp.projected_state_dict(model, merge=True)
    assert all(torch.equal(before[k], v) for k, v in _state(model).items())
    assert set(merged) == keys
    assert not torch.equal(merged["0.weights"], before["0.base.weights"])  # θ·P(K) was merged

    run = rp.RelaxedTraining(model, "constant", total=2)
    exported = run.export(merge=True)
    assert type(exported[0]) is enn.R3Conv and set(exported.state_dict()) == keys
    assert all(torch.equal(merged[k], v) for k, v in exported.state_dict().items())
    elem = gs.fibergroup.element(np.array([0.0, 0.0, np.pi / 2]), "EV")  # 90° about z: exact on the grid
    exported.eval()
    with torch.no_grad():
        y, y_rot = exported(x), exported(x.transform(elem))
        err = float((y.transform(elem).tensor - y_rot.tensor).norm() / y.tensor.norm())
    assert err < 1e-10
    # the export is independent of the relaxed model, which keeps training
    y0 = y.tensor.clone()
    with torch.no_grad():
        model[0].base.weights.add_(0.3)
        assert torch.equal(exported(x).tensor, y0)
    assert isinstance(model[0], rp.RelaxedModule)
