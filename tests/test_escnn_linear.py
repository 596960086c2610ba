"""escnn adapter: Lie-algebra generators from escnn's representations and escnn.nn.Linear."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import relax_plugins as rp
from relax_plugins.symmetry import group_defect, intertwiner_basis, lie_defect

warnings.filterwarnings("ignore", message=".*py3nj.*")
pytest.importorskip("escnn")
from escnn import group, gspaces  # noqa: E402
from escnn import nn as enn  # noqa: E402
from relax_escnn.groups import fibre_symmetry, lie_elements, lie_generators  # noqa: E402


def make_group(name: str):
    # enough irreps instantiated for escnn's Clebsch–Gordan decompositions of the types below
    return {"SO2": lambda: group.so2_group(6), "O2": lambda: group.o2_group(6),
            "SO3": lambda: group.so3_group(4), "O3": lambda: group.o3_group(4),
            "C6": lambda: group.cyclic_group(6), "D3": lambda: group.dihedral_group(3)}[name]()


def types(name: str):
    G = make_group(name)
    gs = gspaces.no_base_space(G)
    irr = G.irreps()
    a, b = gs.irrep(*irr[1].id), gs.irrep(*irr[2].id)
    t_in = enn.FieldType(gs, [a, gs.trivial_repr, b, a])
    t_out = enn.FieldType(gs, [b, a, gs.trivial_repr])
    return G, t_in, t_out


@pytest.mark.parametrize("name", ["SO2", "O2", "SO3", "O3"])
def test_lie_generators_reproduce_escnn_representation(name):
    G, t_in, _ = types(name)
    L = lie_generators(t_in)
    assert L.shape[0] == (1 if name in ("SO2", "O2") else 3)
    # also far beyond the step used for the logarithm: exp(t·dρ(A)) = ρ(exp(tA)) for the whole group
    for t in (0.05, 0.9, 2.5):
        for k, g in enumerate(lie_elements(G, t)):
            R = torch.from_numpy(np.asarray(t_in.representation(g), dtype=np.float64))
            assert torch.allclose(torch.linalg.matrix_exp(t * L[k]), R, atol=1e-10)


def test_so3_frequency_one_irrep_is_yzx_ordered():
    G = make_group("SO3")
    gs = gspaces.no_base_space(G)
    std = lie_generators(enn.FieldType(gs, [G.standard_representation()]))
    xyz = torch.zeros(3, 3, 3, dtype=torch.float64)
    for k, (i, j) in enumerate(((2, 1), (0, 2), (1, 0))):  # rotations about x, y, z
        xyz[k, i, j], xyz[k, j, i] = 1.0, -1.0
    assert torch.allclose(std, xyz, atol=1e-10)
    irr1 = lie_generators(enn.FieldType(gs, [gs.irrep(1)]))
    P = torch.tensor([[0.0, 1, 0], [0, 0, 1], [1, 0, 0]], dtype=torch.float64)  # (x, y, z) → (y, z, x)
    assert torch.allclose(irr1, P @ xyz @ P.T, atol=1e-10)


@pytest.mark.parametrize("name", ["SO2", "O2", "SO3", "O3", "C6", "D3"])
def test_escnn_linear_is_intertwiner_and_projection_matches_null_space(name):
    G, t_in, t_out = types(name)
    lin = enn.Linear(t_in, t_out).double()
    sym = fibre_symmetry(t_in, t_out).double()
    M = lin.expand_parameters()[0].detach()
    x = torch.randn(7, t_in.size, dtype=torch.float64)
    assert float(lie_defect(M, x, sym).max() + group_defect(M, x, sym).max()) < 1e-20 + 1e-10 * float(M.norm()) ** 2
    model = enn.SequentialModule(lin)
    rp.relax(model)
    term = model[0].term
    W = torch.randn(t_out.size, t_in.size, dtype=torch.float64)
    Q = intertwiner_basis(sym)
    assert Q.shape[1] == lin.weights.numel()  # escnn's basis spans exactly the intertwiners
    ref = (Q @ (Q.T @ W.reshape(-1))).reshape(W.shape)
    assert torch.allclose(term.project_dense(W), ref, atol=1e-6)
    assert float(lie_defect(W, x, sym).sum() + group_defect(W, x, sym).sum()) > 1e-3


@settings(max_examples=10)
@given(name=st.sampled_from(["SO2", "O3", "D3"]), theta=st.floats(0.05, 1.0))
def test_relaxed_linear_penalty_merge_and_types(name, theta):
    torch.manual_seed(0)
    G, t_in, t_out = types(name)
    model = enn.SequentialModule(enn.Linear(t_in, t_out)).double()
    x = enn.GeometricTensor(torch.randn(5, t_in.size, dtype=torch.float64), t_in)
    y0 = model(x).tensor.detach()
    rp.relax(model)
    assert torch.equal(model(x).tensor, y0)
    term = model[0].term
    with torch.no_grad():
        term.weight.normal_()
    rp.set_theta(model, theta)
    y = model(x)
    assert isinstance(y, enn.GeometricTensor) and y.type == t_out
    assert float(rp.penalty(model, lie=1.0, norm=0.0, form="mean").detach()) > 1e-3
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref[0].term.weight.copy_(ref[0].term.projected())
        y_ref = ref(x).tensor
    # the projected W has no Lie/discrete defect
    assert float(ref[0].penalty_terms().lie) < 1e-16 * max(1.0, float(ref[0].term.weight.norm()) ** 2) + 1e-18
    rp.project(model, merge=True)
    assert type(model[0]) is enn.Linear
    with torch.no_grad():
        assert torch.allclose(model(x).tensor, y_ref, atol=1e-10)
        model.eval()
        assert torch.allclose(model(x).tensor, y_ref, atol=1e-10)
        assert isinstance(model.export(), torch.nn.Sequential)
