"""ViSNet relax → train → project round trip on generated molecules.

    python -m examples.visnet.run                 # ≈ 1–3 min on one core
    python -m examples.visnet.run --steps 60      # smoke run

Data (needs ``ase`` for its bundled G2 geometries): the G2 molecules with at least 3 atoms, each
sample a copy with Gaussian position noise (σ = 0.1 Å), a random rotation and a random translation;
the target is a screened-Coulomb energy E = Σ_{i<j} Z_i Z_j exp(−r_ij) / r_ij (exactly
E(3)-invariant), standardised with the training mean and std. Samples are split at random (the
same molecule can appear in several splits, with different distortions).

Model: PyG's ``ViSNet`` (lmax 2, so vectors are 1o + 2e per channel) with the pure-torch radius
graph of :mod:`examples.visnet.model`. Both arms train the same steps from the same seed; the relaxed
arm relaxes every ViS_MP layer and the output blocks through the ``pyg`` adapter (no declaration),
with θ triangular per step (exactly 0 at the last step). Checkpoints are evaluated as projected
models; the chosen one is loaded into a freshly built plain ViSNet (original keys) and its test MAE
and invariance errors (float64 copy: rotation, reflection, translation) are reported.

Writes ``results/visnet_roundtrip/results.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

import relax_plugins as rp
from examples.egnn.run import random_rotation
from examples.visnet.model import make_visnet

ARMS = ("standard", "relaxed")


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--samples", type=int, nargs=3, default=(2000, 300, 500), metavar=("TRAIN", "VALID", "TEST"))
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--out", type=Path, default=Path("results/visnet_roundtrip"))
    return p.parse_args(argv)


MODEL_KW = dict(lmax=2, hidden_channels=32, num_heads=4, num_layers=3, num_rbf=16, cutoff=5.0)


def g2_molecules(min_atoms: int = 3) -> list[tuple[Tensor, Tensor]]:
    """(atomic numbers, positions in Å) of ase's bundled G2 molecules."""
    try:
        from ase.collections import g2
    except ImportError as exc:  # pragma: no cover - optional dependency of the example
        raise SystemExit("this example needs ase (pip install ase): it reads ase's bundled G2 geometries") from exc
    return [
        (torch.as_tensor(a.numbers, dtype=torch.long), torch.as_tensor(a.positions, dtype=torch.float64))
        for a in g2
        if len(a) >= min_atoms
    ]


def screened_coulomb(z: Tensor, pos: Tensor) -> float:
    """Σ_{i<j} Z_i Z_j exp(−r_ij) / r_ij."""
    r = torch.cdist(pos, pos)
    zz = z[:, None].double() * z[None, :].double()
    iu = torch.triu_indices(len(z), len(z), 1)
    return float((zz * torch.exp(-r) / r)[iu[0], iu[1]].sum())


def make_split(mols: list[tuple[Tensor, Tensor]], n: int, gen: torch.Generator) -> list[dict[str, Any]]:
    out = []
    for _ in range(n):
        z, pos = mols[int(torch.randint(len(mols), (1,), generator=gen))]
        p = pos + 0.1 * torch.randn(pos.shape, generator=gen, dtype=torch.float64)
        e = screened_coulomb(z, p)  # invariant: computed before the random rigid motion
        p = (p - p.mean(0)) @ random_rotation(gen).T + torch.randn(3, generator=gen, dtype=torch.float64) * 2
        out.append({"z": z, "pos": p.float(), "y": e})
    return out


def collate(samples: list[dict[str, Any]]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    z = torch.cat([s["z"] for s in samples])
    pos = torch.cat([s["pos"] for s in samples])
    batch = torch.cat([torch.full((len(s["z"]),), i, dtype=torch.long) for i, s in enumerate(samples)])
    y = torch.tensor([s["y"] for s in samples], dtype=torch.float32)
    return z, pos, batch, y


@torch.no_grad()
def mae(model: torch.nn.Module, data: list[dict[str, Any]], mean: float, std: float) -> float:
    """Mean absolute error in the target's own units."""
    model.eval()
    err, n = 0.0, 0
    for start in range(0, len(data), 100):
        z, pos, batch, y = collate(data[start:start + 100])
        pred = model(z, pos, batch)[0].squeeze(-1) * std + mean
        err += float((pred - y).abs().sum())
        n += len(y)
    model.train()
    return err / n


@torch.no_grad()
def invariance_errors(model: torch.nn.Module, data: list[dict[str, Any]], seed: int = 0) -> dict[str, float]:
    """|E(g·x) − E(x)| / |E(x)| (norms over 50 molecules) of a float64 copy."""
    m = copy.deepcopy(model).double().eval()
    gen = torch.Generator().manual_seed(seed)
    z, pos, batch, _ = collate(data[:50])
    pos = pos.double()
    e = m(z, pos, batch)[0]
    errs = {}
    for name, det in (("rotation", 1.0), ("reflection", -1.0)):
        Q = random_rotation(gen, det)
        errs[name] = float((m(z, pos @ Q.T, batch)[0] - e).norm() / e.norm())
    errs["translation"] = float((m(z, pos + torch.tensor([3.0, -1.0, 2.0], dtype=torch.float64), batch)[0] - e).norm()
                                / e.norm())
    return errs


def train_one(arm: str, seed: int, args: argparse.Namespace, splits: dict[str, list], norm: tuple[float, float]):
    mean, std = norm
    torch.manual_seed(seed)
    model = make_visnet(**MODEL_KW)
    keys = list(model.state_dict())
    run = None
    if arm == "relaxed":
        rp.relax(model, adapters=["pyg"])
        # penalty_every=1: as its recorded results ran (before every4 became the default)
        run = rp.RelaxedTraining(model, rp.schedules.Triangular(total=args.steps), penalty_every=1)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    lr_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    gen = torch.Generator().manual_seed(100 + seed)
    train = splits["train"]
    best = (math.inf, -1, None)
    times, mid = [], None
    for step in tqdm(range(args.steps), desc=f"{arm} seed {seed}", leave=False, mininterval=2.0):
        t0 = time.perf_counter()
        theta = run.advance() if run is not None else 0.0
        idx = torch.randint(len(train), (args.batch,), generator=gen).tolist()
        z, pos, batch, y = collate([train[i] for i in idx])
        loss = (model(z, pos, batch)[0].squeeze(-1) - (y - mean) / std).square().mean()
        total = run.loss(loss) if run is not None else loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        lr_sched.step()
        times.append(time.perf_counter() - t0)
        if run is not None and step == args.steps // 2:
            mid = {"theta": theta, "invariance_error_relaxed": invariance_errors(model, splits["valid"])}
        if (step + 1) % args.eval_every == 0 or step == args.steps - 1:
            cand = run.export() if run is not None else copy.deepcopy(model)
            val = mae(cand, splits["valid"], mean, std)
            if val < best[0]:
                best = (val, step + 1, cand.state_dict())
    report = None
    if run is not None:
        report = {k: {m: v for m, v in r.items() if m in ("theta", "rel_weight_error", "relax_ratio")}
                  for k, r in run.report().items()}
        run.finish()
    plain = make_visnet(**MODEL_KW)  # a model built without relax-plugins
    assert list(best[2]) == keys
    plain.load_state_dict(best[2])
    t = sorted(times[5:] or times)
    return {
        "arm": arm, "seed": seed, "best_step": best[1], "valid_mae": best[0],
        "test_mae": mae(plain, splits["test"], mean, std),
        "invariance_error_projected": invariance_errors(plain, splits["test"]),
        "mid_training": mid, "projection_report_at_end": report, "median_step_s": t[len(t) // 2],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse(argv)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    mols = g2_molecules()
    gen = torch.Generator().manual_seed(2024)
    splits = {name: make_split(mols, n, gen) for name, n in zip(("train", "valid", "test"), args.samples)}
    ys = torch.tensor([s["y"] for s in splits["train"]])
    norm = (float(ys.mean()), float(ys.std()))
    t0 = time.perf_counter()
    runs = [train_one(arm, seed, args, splits, norm) for seed in range(args.seeds) for arm in ARMS]
    results = {
        "config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "model": MODEL_KW},
        "n_molecules": len(mols), "target_mean": norm[0], "target_std": norm[1],
        "wall_s": time.perf_counter() - t0, "runs": runs,
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    for r in runs:
        tqdm.write(f"{r['arm']:9s} seed {r['seed']}: test MAE {r['test_mae']:.4f} (target std {norm[1]:.2f}), "
                   f"invariance error after projection {max(r['invariance_error_projected'].values()):.1e}, "
                   f"{r['median_step_s'] * 1e3:.0f} ms/step")
    tqdm.write(f"wrote {args.out / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
