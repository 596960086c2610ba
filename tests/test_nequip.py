"""An unmodified NequIP (``nequip==0.19.1``, e3nn 0.6) through relax → train → project, in float64.

NequIP is built from e3nn layers, so the ``e3nn`` adapter relaxes it without any NequIP-specific
code: per interaction block ``linear_1``, the per-edge ``tp_scatter.tp`` (weights from the radial
MLP) and ``linear_2``, and the self-connection ``sc`` (a ``FullyConnectedTensorProduct`` with the type
embedding). Not relaxed: the parameter-free products inside the ``Gate`` nonlinearities (by design,
``adapter_options={"e3nn": {"e3nn_relax_gates": True}}`` includes them), the scalar MLPs (type embedding,
radial MLPs, readout: maps of invariants, any weight is already equivariant), per-type scale/shift.

The molecules are built by hand (rattled H/C/O templates, every ordered pair an edge, all within
``r_max``), targets from a Morse pair potential; no data, no network. Skipped where nequip is not
importable (the main venv of the Makefile installs it).
"""

from __future__ import annotations

import copy
import math
import os
import random

import pytest

pytest.importorskip("nequip")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from nequip.data import AtomicDataDict as D  # noqa: E402
from relax_e3nn import random_o3  # noqa: E402
from torch import nn  # noqa: E402

import relax_plugins as rp  # noqa: E402

TYPES = ["H", "C", "O"]
R_MAX = 4.0
# rough geometries (Å) of small H/C/O molecules: (type indices, positions)
TEMPLATES = [
    ([2, 0, 0], [[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]]),  # H2O
    ([1, 0, 0, 0, 0], [[0, 0, 0], [0.63, 0.63, 0.63], [-0.63, -0.63, 0.63], [-0.63, 0.63, -0.63],
                       [0.63, -0.63, -0.63]]),  # CH4
    ([1, 2, 2], [[0.0, 0.0, 0.0], [1.16, 0.0, 0.0], [-1.16, 0.0, 0.0]]),  # CO2
    ([1, 2, 0, 0], [[0.0, 0.0, 0.0], [1.21, 0.0, 0.0], [-0.55, 0.94, 0.0], [-0.55, -0.94, 0.0]]),  # H2CO
    ([1, 1, 0, 0], [[0.0, 0.0, 0.0], [1.20, 0.0, 0.0], [-1.06, 0.0, 0.0], [2.26, 0.0, 0.0]]),  # C2H2
    ([1, 2, 0, 0, 0, 0], [[0, 0, 0], [1.43, 0, 0], [-0.36, 1.03, 0], [-0.36, -0.51, 0.89], [-0.36, -0.51, -0.89],
                          [1.75, 0.9, 0.0]]),  # CH3OH
]


# ---------------------------------------------------------------------------------------------
# NequIP's global state: set_global_state() (required before building a model) seeds every RNG,
# sets torch's default dtype to float64, e3nn's code-generation flags, TorchScript's fusion strategy,
# a few torch._dynamo flags and environment variables, process-wide. The fixture restores them.


class _SavedGlobals:
    def __init__(self) -> None:
        import e3nn

        self.e3nn = e3nn
        self.dtype = torch.get_default_dtype()
        self.torch_rng = torch.random.get_rng_state()
        self.py_rng = random.getstate()
        self.np_rng = np.random.get_state()
        self.environ = dict(os.environ)
        self.e3nn_opts = e3nn.get_optimization_defaults()
        dyn = torch._dynamo.config
        self.dynamo = (dyn.capture_dynamic_output_shape_ops, dyn.capture_scalar_outputs)
        self.sharing = torch.multiprocessing.get_sharing_strategy()
        self.fusion = torch.jit.set_fusion_strategy([("STATIC", 2), ("DYNAMIC", 10)])
        torch.jit.set_fusion_strategy(self.fusion)

    def restore(self) -> None:
        torch.set_default_dtype(self.dtype)
        torch.random.set_rng_state(self.torch_rng)
        random.setstate(self.py_rng)
        np.random.set_state(self.np_rng)
        os.environ.clear()
        os.environ.update(self.environ)
        self.e3nn.set_optimization_defaults(**self.e3nn_opts)
        torch._dynamo.config.capture_dynamic_output_shape_ops, torch._dynamo.config.capture_scalar_outputs = self.dynamo
        torch.multiprocessing.set_sharing_strategy(self.sharing)
        torch.jit.set_fusion_strategy(self.fusion)


def make_nequip(seed: int = 0) -> nn.Module:
    """A small float64 NequIP: 2 interaction blocks, l_max 2 with parity (4x0e+4x0o+4x1o+4x1e+4x2e+4x2o)."""
    from nequip.model import NequIPGNNModel
    from nequip.utils.global_state import set_global_state

    saved = _SavedGlobals()
    try:
        set_global_state()
        return NequIPGNNModel(
            seed=seed,
            model_dtype="float64",
            type_names=TYPES,
            r_max=R_MAX,
            num_layers=2,
            l_max=2,
            parity=True,
            num_features=4,
            radial_mlp_width=8,
            avg_num_neighbors=4.0,
            per_type_energy_shifts={"H": -0.5, "C": -3.0, "O": -4.0},
            per_type_energy_scales={"H": 1.0, "C": 1.0, "O": 1.0},
        )
    finally:
        saved.restore()


def morse(pos: torch.Tensor, d: float = 1.0, a: float = 1.5, r0: float = 1.2) -> torch.Tensor:
    """Σ_{i<j} d·((1 − e^{−a(r−r0)})² − 1): the toy targets' energy."""
    r = torch.pdist(pos)
    return (d * ((1 - torch.exp(-a * (r - r0))) ** 2 - 1)).sum()


def make_molecules(n: int, seed: int = 0, sigma: float = 0.05) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    mols = []
    for k in range(n):
        types, pos = TEMPLATES[k % len(TEMPLATES)]
        pos = torch.tensor(pos, dtype=torch.float64)
        pos = pos + sigma * torch.randn(pos.shape, generator=g, dtype=torch.float64)
        assert float(torch.pdist(pos).max()) < R_MAX  # every pair is within the cutoff: a complete graph
        p = pos.clone().requires_grad_(True)
        energy = morse(p)
        (grad,) = torch.autograd.grad(energy, p)
        mols.append({"types": torch.tensor(types), "pos": pos, "energy": energy.detach(), "forces": -grad})
    return mols


def to_batch(mols: list[dict], positions: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """NequIP's batched AtomicDataDict: every ordered pair of atoms of a molecule is an edge."""
    pos, types, edges, batch = [], [], [], []
    offset = 0
    for k, m in enumerate(mols):
        n = len(m["types"])
        i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        keep = i != j
        edges.append(torch.stack([i[keep], j[keep]]) + offset)
        pos.append(m["pos"] if positions is None else positions[k])
        types.append(m["types"])
        batch.append(torch.full((n,), k))
        offset += n
    return {
        D.POSITIONS_KEY: torch.cat(pos),
        D.ATOM_TYPE_KEY: torch.cat(types),
        D.EDGE_INDEX_KEY: torch.cat(edges, dim=1),
        D.BATCH_KEY: torch.cat(batch),
        D.NUM_NODES_KEY: torch.tensor([len(m["types"]) for m in mols]),
    }


def predict(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    out = model(dict(batch))
    return out[D.TOTAL_ENERGY_KEY].reshape(-1), out[D.FORCE_KEY]


def rigid_motion_errors(model: nn.Module, mols: list[dict], n: int = 3, seed: int = 0) -> dict[str, float]:
    """Relative energy and force errors under ``n`` random O(3) elements (rotations and improper) plus translations."""
    g = torch.Generator().manual_seed(seed)
    batch = to_batch(mols)
    e, f = (t.detach() for t in predict(model, batch))
    err = {"energy": 0.0, "forces": 0.0}
    for R in random_o3(n, generator=g):
        R = R.to(torch.float64)
        moved = [m["pos"] @ R.T + torch.randn(3, generator=g, dtype=torch.float64) for m in mols]
        e2, f2 = (t.detach() for t in predict(model, to_batch(mols, moved)))
        err["energy"] = max(err["energy"], float((e2 - e).abs().max() / e.abs().max()))
        err["forces"] = max(err["forces"], float((f2 - f @ R.T).norm() / f.norm()))
    return err


def train(model: nn.Module, mols: list[dict], steps: int, batch_size: int = 3, lr: float = 1e-2) -> list[float]:
    """Adam on per-atom energy + force MSE + the relaxation penalty; θ triangular, ending at exactly 0."""
    schedule = rp.schedules.Triangular(total=steps)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for step in range(steps):
        rp.set_theta(model, schedule(step))
        chunk = [mols[(step * batch_size + k) % len(mols)] for k in range(batch_size)]
        batch = to_batch(chunk)
        e, f = predict(model, batch)
        natoms = batch[D.NUM_NODES_KEY].to(e.dtype)
        e_ref = torch.stack([m["energy"] for m in chunk])
        f_ref = torch.cat([m["forces"] for m in chunk])
        loss = ((e - e_ref) / natoms).pow(2).mean() + (f - f_ref).pow(2).mean()
        loss = loss + rp.penalty(model, lie=1e-2, norm=1e-2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def _classes(model: nn.Module) -> dict[str, str]:
    # by name: torch.fx makes one GraphModule class per instance (and per deepcopy)
    return {n: f"{type(m).__module__}.{type(m).__qualname__}" for n, m in model.named_modules()}


@pytest.fixture(scope="module")
def nequip_setup():
    return make_nequip(seed=0), make_molecules(6, seed=0)


EXPECTED = [
    f"model.func.layer{i}_convnet.conv.{name}"
    for i in (0, 1)
    for name in ("linear_1", "tp_scatter.tp", "linear_2") + (("sc",) if i else ())
]


def test_building_nequip_leaves_global_state_alone():
    dtype, state = torch.get_default_dtype(), torch.random.get_rng_state()
    make_nequip(seed=1)
    assert torch.get_default_dtype() == dtype and torch.equal(torch.random.get_rng_state(), state)


def test_nequip_round_trip(nequip_setup):
    base, mols = nequip_setup
    original = copy.deepcopy(base)
    keys = list(original.state_dict())
    classes = _classes(original)
    batch = to_batch(mols[:3])
    e_ref, f_ref = (t.detach() for t in predict(original, batch))
    errs0 = rigid_motion_errors(original, mols[:3])
    assert errs0["energy"] <= 1e-12 and errs0["forces"] <= 1e-12, errs0  # NequIP itself, as built here

    model = rp.relax(copy.deepcopy(base))
    relaxed = dict(rp.relaxed_modules(model))
    assert sorted(relaxed) == sorted(EXPECTED) and {layer.adapter for layer in relaxed.values()} == {"e3nn"}
    assert not any("equivariant_nonlin" in name for name in relaxed)  # Gate products: not relaxed by default
    rp.set_theta(model, 1.0)
    e, f = predict(model, batch)
    assert torch.equal(e.detach(), e_ref) and torch.allclose(f.detach(), f_ref, rtol=0, atol=1e-14)  # W = 0

    losses = train(model, mols, steps=6)
    assert all(math.isfinite(v) for v in losses)
    assert all(float(layer.term.dense().detach().norm()) > 0 for layer in relaxed.values())  # every W learned
    rp.set_theta(model, 1.0)
    predict(model, batch)
    assert float(rp.penalty(model).detach()) > 0
    assert rigid_motion_errors(model, mols[:3], n=2)["energy"] > 1e-8  # relaxed at θ = 1: not invariant
    rp.set_theta(model, 0.0)
    e_theta0 = predict(model, batch)[0].detach()
    rp.set_theta(model, 1.0)

    # at θ = 1, merge=True folds θ·P(W) of the o3.Linears into their weights; the TPs cannot hold it: dropped, warned
    with pytest.warns(UserWarning, match="tp_scatter"):
        merged = rp.project(copy.deepcopy(model), merge=True)
    dropped = rp.project(model)
    for how, p in (("merge", merged), ("drop", dropped)):
        assert list(p.state_dict()) == keys, how
        assert _classes(p) == classes, how
        assert not any(isinstance(m, rp.RelaxedModule) for m in p.modules()), how
        errs = rigid_motion_errors(p, mols, n=3, seed=3)
        assert errs["energy"] <= 1e-10 and errs["forces"] <= 1e-10, (how, errs)
    assert not torch.allclose(predict(merged, batch)[0].detach(), predict(dropped, batch)[0].detach())
    # merge=False keeps the base weights as trained: the relaxed model at θ = 0
    assert torch.allclose(predict(dropped, batch)[0].detach(), e_theta0, rtol=0, atol=1e-12)


def test_nequip_gates_on_request(nequip_setup):
    base, mols = nequip_setup
    keys = list(base.state_dict())
    model = rp.relax(copy.deepcopy(base), adapter_options={"e3nn": {"e3nn_relax_gates": True}})
    gates = [n for n, _ in rp.relaxed_modules(model) if "equivariant_nonlin" in n]
    assert gates == ["model.func.layer0_convnet.equivariant_nonlin.mul"]  # the last block's gate acts on scalars only
    train(model, mols, steps=3)
    rp.set_theta(model, 0.5)
    assert rigid_motion_errors(model, mols[:3], n=2)["energy"] > 1e-8
    with pytest.warns(UserWarning, match="dropped"):
        projected = rp.project(model, merge=True)
    assert list(projected.state_dict()) == keys
    errs = rigid_motion_errors(projected, mols[:3], n=2, seed=5)
    assert errs["energy"] <= 1e-10 and errs["forces"] <= 1e-10, errs
