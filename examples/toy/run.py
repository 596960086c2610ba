"""Toy demo on the pure-torch SO(2) adapter: standard vs relaxed training of a small equivariant
network on a teacher-student task, same seeds and steps; prints θ, the penalty and the equivariance
error before and after projection.

    python -m examples.toy.run [--steps 400] [--seeds 2]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from relax_toy.layers import SO2Gate, SO2Linear, rotation_2d
from torch import nn
from tqdm import tqdm

import relax_plugins as rp
from examples.args import positive_int


def make_model(width: int = 8) -> nn.Module:
    return nn.Sequential(SO2Linear(4, width), SO2Gate(), SO2Linear(width, width), SO2Gate(), SO2Linear(width, 2))


@torch.no_grad()
def equivariance_error(model: nn.Module, x: torch.Tensor) -> float:
    errs = []
    for angle in (0.4, 1.3, 2.9):
        y_rot = model(x @ rotation_2d(angle, 4, x.dtype).T)
        errs.append(float((y_rot - model(x) @ rotation_2d(angle, 2, x.dtype).T).norm() / y_rot.norm()))
    return max(errs)


def train(relaxed: bool, seed: int, steps: int, data: dict, log: list) -> dict:
    torch.manual_seed(seed)
    model = make_model().double()
    if relaxed:
        rp.relax(model)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    # the shipped default recipe (the paper's triangular θ and λ's), chosen by docs/evidence.md
    run = rp.RelaxedTraining(model, total=steps) if relaxed else None
    best = (float("inf"), None)
    t0 = time.perf_counter()
    for step in tqdm(range(steps), desc=f"{'relaxed' if relaxed else 'standard'} seed {seed}", leave=False):
        if run is not None:
            run.advance()
        idx = torch.randint(0, data["x_train"].shape[0], (64,))
        loss = (model(data["x_train"][idx]) - data["y_train"][idx]).square().mean()
        pen = run.penalty() if run is not None else torch.zeros(())
        opt.zero_grad()
        (loss + pen).backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            with torch.no_grad():
                val = float((model(data["x_val"]) - data["y_val"]).square().mean())
            if relaxed and step == steps // 2:
                log.append((seed, run.theta, float(pen.detach()), equivariance_error(model, data["x_val"])))
            # θ = 0 only at the last step, so only that checkpoint is exactly equivariant after projection
            if not relaxed or step == steps - 1:
                if val < best[0]:
                    best = (val, copy.deepcopy(model))
    seconds = time.perf_counter() - t0
    model = best[1]
    if relaxed:
        model = rp.project(model, merge=True)
    with torch.no_grad():
        test = float((model(data["x_test"]) - data["y_test"]).square().mean())
    return {"test_mse": test, "equivariance_error": equivariance_error(model, data["x_test"]), "seconds": seconds}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=positive_int, default=400)
    ap.add_argument("--seeds", type=positive_int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(1234)
    teacher = make_model(16).double()
    for p in teacher.parameters():
        p.data = 0.5 * torch.randn(p.shape, generator=g, dtype=torch.float64)
    data = {}
    for split, n in (("train", 512), ("val", 256), ("test", 512)):
        x = torch.randn(n, 8, generator=g, dtype=torch.float64)
        with torch.no_grad():
            data[f"x_{split}"], data[f"y_{split}"] = x, teacher(x)
    log: list = []
    results = {arm: [train(arm == "relaxed", s, args.steps, data, log) for s in range(args.seeds)]
               for arm in ("standard", "relaxed")}
    print(f"Toy SO(2) teacher-student, {args.steps} steps, {args.seeds} seeds, θ: Triangular(total={args.steps})")
    for seed, theta, pen, err in log:
        print(f"  relaxed seed {seed} mid-training: θ={theta:.3f}  penalty={pen:.2e}  equivariance error={err:.2e}")
    print(f"{'arm':10s} {'test MSE (mean ± std)':>24s} {'equiv. error (projected)':>26s} {'time/run s':>11s}")
    for arm, runs in results.items():
        mse = torch.tensor([r["test_mse"] for r in runs])
        std = float(mse.std()) if len(runs) > 1 else 0.0
        print(f"{arm:10s} {float(mse.mean()):13.4e} ± {std:8.2e} {max(r['equivariance_error'] for r in runs):26.2e}"
              f" {sum(r['seconds'] for r in runs) / len(runs):11.2f}")
    return results


if __name__ == "__main__":
    main()
