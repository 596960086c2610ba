"""Relaxing to a subgroup H < G: W stays exactly H-equivariant; projection returns to G."""

from __future__ import annotations

import math

import pytest
import torch
from relax_toy.layers import CNLinear, SO2Linear, cyclic_shift, rotation_2d
from torch import nn

import relax_plugins as rp


def train_a_bit(model, x, steps=20):
    opt = torch.optim.SGD([p for n, p in model.named_parameters() if ".term." in n], lr=0.1)
    for _ in range(steps):
        loss = (model(x) - x.flip(-1)[..., : model(x).shape[-1]]).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


@torch.no_grad()
def error(model, g_in, g_out, x):
    return float((model(x @ g_in.T) - model(x) @ g_out.T).abs().max())


def test_so2_relaxed_to_c2(dtype):
    # on 2D vectors Hom_C4 = Hom_SO(2) (aI + bJ); C2 (rotation by π = −I) is a proper relaxation
    model = rp.relax(nn.Sequential(SO2Linear(2, 2)).to(dtype), adapter_options={"toy": {"subgroup": 2}})
    rp.set_theta(model, 1.0)
    x = torch.randn(64, 4, dtype=dtype)
    train_a_bit(model, x)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    half = rotation_2d(math.pi, 2, dtype)
    assert error(model, half, half, x) < tol  # H = C2 kept exactly
    generic = rotation_2d(0.3, 2, dtype)
    assert error(model, generic, generic, x) > 1e-3  # but not G = SO(2)
    model(x)
    assert float(rp.penalty(model, norm=0.0).detach()) > 0  # the penalty still refers to G
    rp.project(model, merge=True)
    assert error(model, generic, generic, x) < tol


def test_c4_relaxed_to_c2():
    model = rp.relax(nn.Sequential(CNLinear(2, 2, n=4)).double(), adapter_options={"toy": {"subgroup": 2}})
    rp.set_theta(model, 1.0)
    x = torch.randn(64, 8, dtype=torch.float64)
    train_a_bit(model, x)
    s, s2 = cyclic_shift(4, 2, torch.float64), torch.linalg.matrix_power(cyclic_shift(4, 2, torch.float64), 2)
    assert error(model, s2, s2, x) < 1e-12 and error(model, s, s, x) > 1e-3
    W = model[0].term.dense().detach()
    assert torch.allclose(model[0].term.subgroup(W), W, atol=1e-12)  # W ∈ Hom_H
    with pytest.raises(rp.AdapterError, match="not a subgroup"):
        rp.relax(nn.Sequential(CNLinear(1, 1, n=4)), adapter_options={"toy": {"subgroup": 3}})


def test_e3nn_o3_relaxed_to_so3():
    from e3nn import o3
    from relax_e3nn.irreps import D_from_matrix64

    lin = o3.Linear("2x0e + 1x0o + 2x1o + 1x1e", "1x0e + 1x0o + 2x1o + 1x1e").double()
    model = rp.relax(nn.Sequential(lin), adapters=["e3nn"], adapter_options={"e3nn": {"subgroup": "SO(3)"}})
    rp.set_theta(model, 1.0)
    with torch.no_grad():
        model[0].term.weight.normal_()
    x = torch.randn(32, lin.irreps_in.dim, dtype=torch.float64)
    R = o3.rand_matrix(dtype=torch.float64)
    D_in, D_out = (D_from_matrix64(i, R).to(torch.float64) for i in (lin.irreps_in, lin.irreps_out))
    P_in, P_out = (D_from_matrix64(i, -torch.eye(3, dtype=torch.float64)) for i in (lin.irreps_in, lin.irreps_out))
    with torch.no_grad():
        assert (model(x @ D_in.T) - model(x) @ D_out.T).abs().max() < 1e-12  # SO(3) kept exactly
        assert (model(x @ P_in.T) - model(x) @ P_out.T).abs().max() > 1e-3  # parity relaxed
    model(x)
    assert float(rp.penalty(model, norm=0.0).detach()) > 0
    rp.project(model, merge=True)
    with torch.no_grad():
        assert (model(x @ P_in.T) - model(x) @ P_out.T).abs().max() < 1e-12
    with pytest.raises(rp.AdapterError, match="subgroup"):
        rp.relax(nn.Sequential(o3.Linear("1x0e", "1x0e")), adapter_options={"e3nn": {"subgroup": "SO(5)"}})


def test_escnn_c8_relaxed_to_c4():
    from escnn import gspaces
    from escnn import nn as enn

    gs = gspaces.rot2dOnR2(8)
    t_in, t_out = enn.FieldType(gs, [gs.regular_repr]), enn.FieldType(gs, [gs.regular_repr] * 2)
    results = {}
    for sub in (None, 4):
        torch.manual_seed(0)
        conv = enn.R2Conv(t_in, t_out, 5, padding=2)
        options = {} if sub is None else {"escnn": {"subgroup": sub}}
        model = rp.relax(enn.SequentialModule(conv), adapters=["escnn"], adapter_options=options)
        rp.set_theta(model, 1.0)
        with torch.no_grad():
            model[0].term.weight.normal_()
        x = enn.GeometricTensor(torch.randn(2, t_in.size, 15, 15), t_in)
        quarter = gs.fibergroup.element(2)  # rotation by π/2: exact on the pixel grid
        with torch.no_grad():
            y_rot = model(x.transform(quarter)).tensor
            rot_y = model(x).transform(quarter).tensor
        results[sub] = float((y_rot - rot_y).abs().max() / rot_y.abs().max())
        term = model[0].term
        assert float(term.residual().square().sum()) > 1e-3  # K is not C8-equivariant either way
    assert results[4] < 1e-5 < 1e-2 < results[None]  # C4 kept exactly (float32 basis) only with the subgroup


def test_escnn_d4_relaxed_to_c4():
    from escnn import gspaces
    from escnn import nn as enn

    gs = gspaces.flipRot2dOnR2(4)
    t = enn.FieldType(gs, [gs.regular_repr])
    errors = {}
    for sub in (None, (None, 4)):
        torch.manual_seed(0)
        options = {} if sub is None else {"escnn": {"subgroup": sub}}
        model = rp.relax(enn.SequentialModule(enn.R2Conv(t, t, 3, padding=1)), adapters=["escnn"],
                         adapter_options=options)
        rp.set_theta(model, 1.0)
        with torch.no_grad():
            model[0].term.weight.normal_()
        x = enn.GeometricTensor(torch.randn(2, t.size, 9, 9), t)
        with torch.no_grad():
            for name, g in (("rot", gs.fibergroup.element((0, 1))), ("flip", gs.fibergroup.element((1, 0)))):
                y = model(x.transform(g)).tensor
                ref = model(x).transform(g).tensor
                errors[(sub is None, name)] = float((y - ref).abs().max() / ref.abs().max())
    assert errors[(False, "rot")] < 1e-5 < 1e-2 < errors[(False, "flip")]  # C4 kept, the flip relaxed
    assert errors[(True, "rot")] > 1e-2


@pytest.mark.parametrize("axis", ["x", "z"])
def test_e3nn_so3_relaxed_to_so2_about_an_axis(axis):
    from e3nn import o3
    from relax_e3nn.irreps import D_from_matrix64

    lin = o3.Linear("2x0e + 2x1o + 1x2e", "1x0e + 2x1o + 1x2e").double()
    model = rp.relax(nn.Sequential(lin), adapters=["e3nn"], adapter_options={"e3nn": {"subgroup": f"SO(2)_{axis}"}})
    rp.set_theta(model, 1.0)
    with torch.no_grad():
        model[0].term.weight.normal_()
    x = torch.randn(32, lin.irreps_in.dim, dtype=torch.float64)
    angle = torch.tensor(0.7, dtype=torch.float64)
    about = {"x": o3.matrix_x, "z": o3.matrix_z}[axis](angle)
    generic = o3.rand_matrix(dtype=torch.float64)

    def err(R):
        D_in, D_out = (D_from_matrix64(i, R).to(torch.float64) for i in (lin.irreps_in, lin.irreps_out))
        with torch.no_grad():
            return float((model(x @ D_in.T) - model(x) @ D_out.T).abs().max())

    assert err(about) < 1e-12 and err(generic) > 1e-3
    rp.project(model, merge=True)
    assert err(generic) < 1e-12
