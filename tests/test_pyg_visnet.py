"""PyG ViSNet through the pyg adapter (no declaration): vec fields (N, 3|8, H) = Hx1o(+Hx2e) in
the ir_mul layout, lmax read from the enclosing ViSNet, O(3) with parity."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("torch_geometric")

from geometry import random_orthogonal  # noqa: E402

import relax_plugins as rp  # noqa: E402
from examples.visnet.model import make_visnet  # noqa: E402


def _molecules(dtype, sizes=(4, 6)):
    batch = torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(sizes)])
    z = torch.randint(1, 10, (batch.shape[0],))
    pos = torch.randn(batch.shape[0], 3, dtype=dtype) * 1.2
    return z, pos, batch


def _visnet(dtype, lmax):
    torch.manual_seed(lmax)
    return make_visnet(hidden_channels=8, num_heads=2, num_layers=2, num_rbf=6, lmax=lmax, cutoff=5.0).to(dtype)


@torch.no_grad()
def _invariance_errors(model, z, pos, batch):
    """Energy changes under a rotation, a reflection and a translation, relative to |energy|."""
    gen = torch.Generator().manual_seed(5)
    e = model(z, pos, batch)[0]
    errs = {}
    for name, det in (("rotation", 1.0), ("reflection", -1.0)):
        Q = random_orthogonal(det, gen, pos.dtype)
        errs[name] = float((model(z, pos @ Q.T, batch)[0] - e).norm() / e.norm())
    errs["translation"] = float((model(z, pos + 2.5, batch)[0] - e).norm() / e.norm())
    return errs


def _randomise_w(model, std=0.3, project=False):
    with torch.no_grad():
        for _, layer in rp.relaxed_modules(model):
            layer.term.weight.normal_(0.0, std)
            if project:
                layer.term.weight.copy_(layer.term.projected())


@pytest.mark.parametrize("lmax", [1, 2])
def test_visnet_layers_found_without_declaration(lmax):
    model = rp.relax(_visnet(torch.float32, lmax), adapters=["pyg"])
    names = [n for n, _ in rp.relaxed_modules(model)]
    assert names == [
        "representation_model.vis_mp_layers.0", "representation_model.vis_mp_layers.1",
        "output_model.output_network.0", "output_model.output_network.1",
    ]
    d = 8 * (1 + 3 if lmax == 1 else 1 + 8)  # H x (0e + 1o [+ 2e])
    assert model.representation_model.vis_mp_layers[0].term.weight.shape == (d, d)


@pytest.mark.parametrize("lmax", [1, 2])
def test_visnet_relaxed_breaks_then_projection_restores_invariance(lmax, dtype):
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    data = _molecules(dtype)
    base = _visnet(dtype, lmax)
    ref = base(*data)[0]
    model = rp.relax(copy.deepcopy(base), adapters=["pyg"])
    assert torch.equal(model(*data)[0], ref)  # W = 0
    _randomise_w(model)
    rp.set_theta(model, 1.0)
    errs = _invariance_errors(model, *data)
    assert errs["rotation"] > 1e-3 and errs["reflection"] > 1e-3, errs
    assert errs["translation"] < tol, errs  # ViSNet's layers see no positions: W cannot break translations
    projected = rp.project(model)
    assert type(projected.representation_model.vis_mp_layers[0]).__name__ == "ViS_MP"
    assert torch.equal(projected(*data)[0], ref)
    assert max(_invariance_errors(projected, *data).values()) < tol


@pytest.mark.parametrize("lmax", [1, 2])
def test_visnet_equivariant_w_keeps_invariance(lmax):
    """θ = 1 with W = P(W) ≠ 0 keeps ViSNet O(3)-invariant: the generators (1o + 2e, component-major,
    with parity) are those of ViSNet's own features."""
    data = _molecules(torch.float64)
    model = rp.relax(_visnet(torch.float64, lmax), adapters=["pyg"])
    _randomise_w(model, project=True)
    rp.set_theta(model, 1.0)
    assert not torch.allclose(model(*data)[0], rp.project(copy.deepcopy(model))(*data)[0])
    errs = _invariance_errors(model, *data)
    assert max(errs.values()) < 1e-10, errs


def test_visnet_batching_and_penalty():
    data = _molecules(torch.float64, sizes=(5, 3, 4))
    model = rp.relax(_visnet(torch.float64, 2), adapters=["pyg"])
    _randomise_w(model)
    rp.set_theta(model, 1.0)
    z, pos, batch = data
    e = model(z, pos, batch)[0]
    start = 0
    for i, n in enumerate((5, 3, 4)):
        sl = slice(start, start + n)
        single = model(z[sl], pos[sl], torch.zeros(n, dtype=torch.long))[0]
        assert torch.allclose(e[i], single[0], atol=1e-10)
        start += n
    model(*data)
    pen = rp.penalty(model)
    assert float(pen.detach()) > 0
    pen.backward()
    assert all(layer.term.weight.grad is not None for _, layer in rp.relaxed_modules(model))


def test_vis_mp_alone_needs_lmax():
    model = _visnet(torch.float32, 2)
    pattern = ["representation_model.vis_mp_layers.*"]
    # include= selects the layers alone: lmax is still read from the enclosing ViSNetBlock of the model
    selected = rp.relax(copy.deepcopy(model), adapters=["pyg"], include=pattern)
    assert len(list(rp.relaxed_modules(selected))) == 2
    # a layer relaxed on its own cannot tell its lmax, even right after its ViSNet was relaxed (the
    # adapter keeps no state between relax() calls)
    rp.project(rp.relax(model, adapters=["pyg"]))
    with pytest.raises(rp.AdapterError, match="visnet_lmax"):
        rp.relax(model.representation_model.vis_mp_layers[0], adapters=["pyg"])
    relaxed = rp.relax(model, adapters=["pyg"], include=pattern, adapter_options={"pyg": {"visnet_lmax": 2}})
    assert len(list(rp.relaxed_modules(relaxed))) == 2
    relaxed(*_molecules(torch.float32))


def test_visnet_lmax_option_contradicting_the_model_is_refused():
    """adapter_options visnet_lmax that contradicts the enclosing ViSNet's lmax: an error at relax()
    (model unchanged), not a shape error at the first forward; a consistent one is accepted."""
    model = _visnet(torch.float32, 2)
    keys = list(model.state_dict())
    with pytest.raises(rp.AdapterError, match="contradicts the lmax=2"):
        rp.relax(model, adapter_options={"pyg": {"visnet_lmax": 1}})
    assert list(model.state_dict()) == keys and not list(rp.relaxed_modules(model))
    rp.relax(model, adapter_options={"pyg": {"visnet_lmax": 2}})
    z, pos, batch = _molecules(torch.float32)
    assert model(z, pos, batch)[0].shape == (2, 1)
