"""MACE relax → train → project round trip on ase's molecules with EMT energies and forces.

    make mace-demo                                     # builds .venv-mace first, ≈ 1 min
    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 .venv-mace/bin/python -m examples.mace.run --steps 40

Runs in the ``.venv-mace`` environment of the Makefile: mace-torch 0.3.16 pins e3nn 0.4.4, and its
e3nn loads constants with ``torch.load``, which torch >= 2.6 refuses unless
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``. Everything is offline:

* data: small H/C/N/O molecules from ase's bundled G2 geometries (``ase.build.molecule``), each sample
  a copy with Gaussian position noise (σ = 0.05 Å); energies and forces from ase's EMT calculator
  (crude for H/C/N/O, but cheap, smooth and exactly E(3)-invariant/equivariant);
* model: a small ``mace.modules.MACE`` (2 interactions, 8x0e+8x1o hidden, max_ell 2, correlation 3),
  float64, E0s fitted per element by least squares;
* ``relax_plugins.relax(model)`` relaxes every ``o3.Linear`` and tensor product (adapter ``e3nn``)
  and every ``SymmetricContraction`` (adapter ``mace``), all found by entry point; θ is
  triangular per step; loss = energy-per-atom MSE + force MSE + penalty;
* ``project(model)`` returns the plain MACE (original classes and state_dict keys), whose energies are
  O(3)- and translation-invariant and forces equivariant again; errors are printed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ase import Atoms
from ase.build import molecule
from ase.calculators.emt import EMT
from e3nn import o3
from mace import data, modules, tools
from mace.tools import torch_geometric
from relax_e3nn import random_o3
from torch import Tensor, nn

import relax_plugins as rp

MOLECULES = ("CH4", "NH3", "H2O", "C2H2", "C2H4", "C2H6", "HCN", "CH3OH", "H3CNH2", "HCOOH", "CH3CHO", "CH3CH2OH")
Z_TABLE = (1, 6, 7, 8)
R_MAX = 4.0


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """MACE and e3nn build their buffers (U matrices, Clebsch–Gordan) in the default dtype."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def make_molecules(n: int, seed: int = 0, noise: float = 0.05) -> list[Atoms]:
    """``n`` rattled copies of :data:`MOLECULES` with EMT energies and forces in ``atoms.info``/``arrays``."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        atoms = molecule(MOLECULES[i % len(MOLECULES)])
        atoms.positions += rng.normal(scale=noise, size=atoms.positions.shape)
        atoms.calc = EMT()
        atoms.info["emt_energy"] = float(atoms.get_potential_energy())
        atoms.arrays["emt_forces"] = atoms.get_forces().copy()
        atoms.calc = None
        out.append(atoms)
    return out


def fit_e0s(mols: Sequence[Atoms]) -> np.ndarray:
    """Per-element reference energies (least squares of the energies on the element counts)."""
    counts = np.array([[np.sum(a.numbers == z) for z in Z_TABLE] for a in mols], dtype=float)
    energies = np.array([a.info["emt_energy"] for a in mols])
    return np.linalg.lstsq(counts, energies, rcond=None)[0]


def to_batch(mols: Sequence[Atoms], dtype: torch.dtype = torch.float64) -> dict[str, Tensor]:
    """One MACE input dict (mace's own ``AtomicData`` and collation) for ``mols``."""
    z_table = tools.AtomicNumberTable(list(Z_TABLE))
    items = []
    with default_dtype(dtype):
        for a in mols:
            config = data.Configuration(
                atomic_numbers=a.numbers.copy(),
                positions=a.positions.copy(),
                properties={"energy": a.info.get("emt_energy"), "forces": a.arrays.get("emt_forces")},
                property_weights={"energy": 1.0, "forces": 1.0},
                pbc=(False, False, False),
            )
            items.append(data.AtomicData.from_config(config, z_table=z_table, cutoff=R_MAX))
        loader = torch_geometric.dataloader.DataLoader(items, batch_size=len(items), shuffle=False)
        return next(iter(loader)).to_dict()


def make_mace(e0s: np.ndarray | None = None, seed: int = 0, dtype: torch.dtype = torch.float64,
              correlation: int = 3, channels: int = 8) -> nn.Module:
    """A small MACE (2 interactions, ``channels``x0e + ``channels``x1o hidden, max_ell 2) built in ``dtype``."""
    torch.manual_seed(seed)
    with default_dtype(dtype):
        return modules.MACE(
            r_max=R_MAX, num_bessel=6, num_polynomial_cutoff=5, max_ell=2,
            interaction_cls=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
            interaction_cls_first=modules.interaction_classes["RealAgnosticInteractionBlock"],
            num_interactions=2, num_elements=len(Z_TABLE), hidden_irreps=o3.Irreps(f"{channels}x0e + {channels}x1o"),
            MLP_irreps=o3.Irreps(f"{channels}x0e"), gate=torch.nn.functional.silu,
            atomic_energies=np.zeros(len(Z_TABLE)) if e0s is None else np.asarray(e0s, dtype=float),
            avg_num_neighbors=6.0, atomic_numbers=list(Z_TABLE), correlation=correlation, radial_MLP=[16, 16],
        )


def predict(model: nn.Module, batch: dict[str, Tensor], training: bool = False) -> tuple[Tensor, Tensor]:
    """(energies per molecule, forces per atom)."""
    batch = {k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()}  # MACE sets requires_grad
    out = model(batch, training=training, compute_force=True)
    return out["energy"], out["forces"]


def loss_fn(model: nn.Module, batch: dict[str, Tensor], training: bool = True) -> Tensor:
    """Energy-per-atom MSE + force MSE."""
    energy, forces = predict(model, batch, training=training)
    n_atoms = (batch["ptr"][1:] - batch["ptr"][:-1]).to(energy.dtype)
    return ((energy - batch["energy"]) / n_atoms).square().mean() + (forces - batch["forces"]).square().mean()


def rigid_motion_errors(model: nn.Module, mols: Sequence[Atoms], n: int = 4, seed: int = 0,
                        parity: bool = True) -> dict[str, float]:
    """Largest relative errors of E(g·x) = E(x) and F(g·x) = R F(x) over ``n`` random O(3) elements
    (SO(3) if not ``parity``) combined with random translations, in float64."""
    gen = torch.Generator().manual_seed(seed)
    e0, f0 = (t.detach() for t in predict(model, to_batch(mols)))
    worst = {"energy": 0.0, "forces": 0.0}
    for R in random_o3(n, parity=parity, generator=gen):
        t = torch.randn(3, generator=gen, dtype=torch.float64) * 3
        moved = [a.copy() for a in mols]
        for a, b in zip(moved, mols):
            a.positions = b.positions @ R.numpy().T + t.numpy()
        e, f = (t.detach() for t in predict(model, to_batch(moved)))
        worst["energy"] = max(worst["energy"], float((e - e0).norm() / e0.norm()))
        worst["forces"] = max(worst["forces"], float((f - f0 @ R.T).norm() / f0.norm()))
    return worst


def train(model: nn.Module, mols: Sequence[Atoms], steps: int = 40, batch_size: int = 8, lr: float = 5e-3,
          lie: float = 1e-2, norm: float = 1e-2, seed: int = 0) -> list[float]:
    """Adam on energies and forces of a relaxed model, θ triangular over ``steps`` (0 → 1 → 0)."""
    # penalty_every=1: as its recorded results ran (before every4 became the default)
    run = rp.RelaxedTraining(model, "triangular", total=steps, lie=lie, norm=norm, penalty_every=1)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = np.random.default_rng(seed)
    batches = [to_batch(mols[i:i + batch_size]) for i in range(0, len(mols), batch_size)]
    losses = []
    for _ in range(steps):
        run.advance()
        batch = batches[int(gen.integers(len(batches)))]
        loss = run.loss(loss_fn(model, batch))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--train", type=int, default=48)
    p.add_argument("--test", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write results.json here")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    train_mols = make_molecules(args.train, seed=args.seed)
    test_mols = make_molecules(args.test, seed=args.seed + 1)
    model = make_mace(fit_e0s(train_mols), seed=args.seed)
    keys = list(model.state_dict())
    rp.relax(model)
    relaxed = {n: m.adapter for n, m in rp.relaxed_modules(model)}
    losses = train(model, train_mols, steps=args.steps, seed=args.seed)
    test_batch = to_batch(test_mols)
    relaxed_test = float(loss_fn(model, test_batch, training=False))
    report = rp.projection_report(model)
    _ = predict(model, test_batch)  # record inputs for the penalty
    pen = float(rp.penalty(model).detach())
    model = rp.project(model)  # drops W everywhere (the paper's projection)
    result = {
        "relaxed_layers": {a: sum(v == a for v in relaxed.values()) for a in sorted(set(relaxed.values()))},
        "first_loss": losses[0], "last_loss": losses[-1],
        "test_loss_relaxed": relaxed_test,
        "test_loss_projected": float(loss_fn(model, test_batch, training=False)),
        "penalty": pen,
        "symmetric_contraction_weight_norm": {n: r["weight_norm"] for n, r in report.items() if "symmetric" in n},
        "keys_restored": list(model.state_dict()) == keys,
        "rigid_motion_errors_projected": rigid_motion_errors(model, test_mols[:6]),
        "seconds": time.perf_counter() - t0,
    }
    print(json.dumps(result, indent=1))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
