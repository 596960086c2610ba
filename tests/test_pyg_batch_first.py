"""torch-geometric adapter, batch-first ``[B, N, ...]`` layouts (egnn-pytorch style, issue 12c), and
layers that update their inputs in place (official EGNN's E_GCL_vel, issue 12b)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("torch_geometric")

import relax_pyg  # noqa: E402
from geometry import random_orthogonal  # noqa: E402
from relax_toy.layers import SO2Linear  # noqa: E402

import relax_plugins as rp  # noqa: E402
from examples.egnn.batch_first import BatchFirstEGNN, BatchFirstEGNNLayer  # noqa: E402

DT = torch.float64


def _data(b: int = 3, n: int = 6, f: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, f, generator=g, dtype=DT), torch.randn(b, n, 3, generator=g, dtype=DT) * 2


def _relaxed(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = BatchFirstEGNN(in_dim=2, dim=8, depth=2).double()
    rp.relax(model, adapters=["pyg"], init_std=0.3)
    rp.set_theta(model, 0.8)
    return model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).norm() / b.norm().clamp_min(1e-30)).detach())


def test_batch_first_relaxed_is_permutation_and_translation_equivariant_not_rotation():
    model = _relaxed()
    assert [n for n, _ in rp.relaxed_modules(model)] == ["layers.0", "layers.1"]
    assert model.layers[0].term.weight.shape == (8 + 3, 8 + 3)  # per node: 8 scalars + a position
    feats, coors = _data()
    h, x = model(feats, coors)
    perm = torch.randperm(coors.shape[1], generator=torch.Generator().manual_seed(3))
    hp, xp = model(feats[:, perm], coors[:, perm])
    assert _rel(hp, h[:, perm]) < 1e-12 and _rel(xp, x[:, perm]) < 1e-12
    shift = torch.randn(coors.shape[0], 1, 3, dtype=DT) * 5  # a different translation per graph
    ht, xt = model(feats, coors + shift)
    assert _rel(ht, h) < 1e-12 and _rel(xt, x + shift) < 1e-12
    Q = random_orthogonal(1.0, torch.Generator().manual_seed(4), DT)
    hr, xr = model(feats, coors @ Q.T)
    assert _rel(xr, x @ Q.T) > 1e-3 and _rel(hr, h) > 1e-3  # the relaxation really breaks rotations


def test_batch_first_graphs_are_independent_and_mask_excludes_padding():
    model = _relaxed(1)
    feats, coors = _data(b=2, n=5, seed=2)
    h, x = model(feats, coors)
    for i in range(2):  # a row alone gives what it gives in the batch
        hi, xi = model(feats[i:i + 1], coors[i:i + 1])
        assert _rel(hi, h[i:i + 1]) < 1e-12 and _rel(xi, x[i:i + 1]) < 1e-12
    # two padding nodes with garbage values: the real nodes' outputs do not change
    pad_f, pad_c = torch.randn(2, 2, 2, dtype=DT) * 7, torch.randn(2, 2, 3, dtype=DT) * 9
    mask = torch.cat([torch.ones(2, 5, dtype=torch.bool), torch.zeros(2, 2, dtype=torch.bool)], dim=1)
    hm, xm = model(torch.cat([feats, pad_f], 1), torch.cat([coors, pad_c], 1), mask)
    assert _rel(hm[:, :5], h) < 1e-12 and _rel(xm[:, :5], x) < 1e-12


def test_batch_first_train_then_project_is_e3_equivariant_with_original_keys():
    torch.manual_seed(5)
    base = BatchFirstEGNN(in_dim=2, dim=8, depth=2).double()
    keys = list(base.state_dict())
    model = rp.relax(base, adapters=["pyg"])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    rp.set_theta(model, 1.0)
    feats, coors = _data()
    target = torch.randn_like(coors)
    for _ in range(3):
        _, x = model(feats, coors)
        loss = (x - target).square().mean() + rp.penalty(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(float(m.term.weight.detach().abs().max()) > 0 for _, m in rp.relaxed_modules(model))
    out = rp.project(model)
    assert all(type(m) is BatchFirstEGNNLayer for m in out.layers) and list(out.state_dict()) == keys
    h, x = out(feats, coors)
    for det in (1.0, -1.0):
        Q = random_orthogonal(det, torch.Generator().manual_seed(6), DT)
        t = torch.randn(1, 1, 3, dtype=DT)
        hq, xq = out(feats, coors @ Q.T + t)
        assert _rel(hq, h) < 1e-10 and _rel(xq, x @ Q.T + t) < 1e-10


def test_batch_first_declaration_errors():
    class L(nn.Module):
        def forward(self, h, pos, batch=None, mask=None):
            return h, pos

    with pytest.raises(ValueError, match="node_axes"):
        relax_pyg.declare(L, {"h": "1x0e"}, ("1x0e", None), node_axes=3)
    with pytest.raises(ValueError, match="batch"):
        relax_pyg.declare(L, {"h": "1x0e", "pos": "pos"}, ("1x0e", "pos"), node_axes=2, batch="batch")
    with pytest.raises(ValueError, match="mask"):
        relax_pyg.declare(L, {"h": "1x0e"}, ("1x0e", None), mask="mask")
    relax_pyg.undeclare(L)


# -- in-place updates of the inputs (issue 12b) ------------------------------------------------


class InplaceEGCLVel(nn.Module):
    """Like the official EGNN's ``E_GCL_vel``: updates ``coord`` in place and returns it."""

    def __init__(self, hidden: int = 4) -> None:
        super().__init__()
        self.hidden = hidden
        self.phi_x = nn.Sequential(nn.Linear(2 * hidden + 1, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        self.phi_v = nn.Linear(hidden, 1)

    def forward(self, h, coord, vel, edge_index):
        row, col = edge_index
        diff = coord[row] - coord[col]
        m = self.phi_x(torch.cat([h[row], h[col], diff.square().sum(-1, keepdim=True)], -1))
        agg = torch.zeros_like(coord).index_add_(0, row, diff * m)
        coord += agg / 3.0  # in place, as E_GCL_vel does
        coord += self.phi_v(h) * vel
        return h + 1.0, coord


class InplaceScale(nn.Module):
    """One vector input, scaled in place and returned (the relaxation's clone path)."""

    def forward(self, vec):
        vec.mul_(2.0)
        return vec


def test_pyg_inplace_coordinate_update_does_not_leak_into_w():
    relax_pyg.declare(InplaceEGCLVel, {"h": "4x0e", "coord": "pos", "vel": "1x1o"}, ("4x0e", "pos"))
    try:
        torch.manual_seed(0)
        layer = InplaceEGCLVel().double()
        ref_layer = InplaceEGCLVel().double()
        ref_layer.load_state_dict(layer.state_dict())
        model = rp.relax(nn.ModuleList([layer]), adapters=["pyg"], init_std=0.5)
        rp.set_theta(model, 0.7)
        h, coord, vel = torch.randn(4, 4, dtype=DT), torch.randn(4, 3, dtype=DT), torch.randn(4, 3, dtype=DT)
        edges = relax_pyg.fully_connected_edge_index(torch.zeros(4, dtype=torch.long))
        x0 = torch.cat([h, coord - coord.mean(0), vel], -1)  # what W must see: the inputs before the layer
        W = model[0].term.weight.detach()
        ref_h, ref_c = ref_layer(h.clone(), coord.clone(), vel, edges)
        delta = 0.7 * x0 @ W.T
        c_in = coord.clone()
        out_h, out_c = model[0](h, c_in, vel, edges)
        assert torch.allclose(out_h, ref_h + delta[:, :4], atol=1e-12)
        assert torch.allclose(out_c, ref_c + delta[:, 4:], atol=1e-12)
        assert torch.allclose(c_in, ref_c, atol=1e-12)  # the layer's own side effect is kept
    finally:
        relax_pyg.undeclare(InplaceEGCLVel)

    relax_pyg.declare(InplaceScale, {"vec": "2x1o"}, "2x1o")
    try:
        model = rp.relax(nn.ModuleList([InplaceScale()]), adapters=["pyg"], init_std=0.5).double()
        rp.set_theta(model, 1.0)
        v = torch.randn(5, 2, 3, dtype=DT)
        v0 = v.clone()
        out = model[0](v)
        W = model[0].term.weight.detach()
        assert torch.allclose(out, 2 * v0 + (v0.reshape(5, 6) @ W.T).reshape(5, 2, 3), atol=1e-12)
    finally:
        relax_pyg.undeclare(InplaceScale)


class InplaceSO2(SO2Linear):
    """An SO2Linear that also rescales its input in place (a subclass: no longer known pure)."""

    def forward(self, x):
        y = super().forward(x)
        x.add_(x)
        return y


def test_toy_inplace_input_update_does_not_leak_into_w():
    torch.manual_seed(0)
    layer = InplaceSO2(2, 3).double()
    model = rp.relax(nn.Sequential(layer), init_std=0.5)
    rp.set_theta(model, 0.6)
    x = torch.randn(7, 4, dtype=DT)
    x0 = x.clone()
    out = model(x)
    ref = SO2Linear.forward(layer, x0) + 0.6 * x0 @ model[0].term.weight.detach().T
    assert torch.allclose(out, ref, atol=1e-12)
    assert torch.allclose(x, 2 * x0)  # the side effect itself is unchanged
    out.square().sum().backward()  # autograd sees the pre-update values, no version error
    # the recorded penalty input is the pre-update x too
    assert torch.allclose(model[0].term._x, x0)
