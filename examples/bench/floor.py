"""What relaxation costs before any library code: the SEGNN-like e3nn model of the overhead
benchmark, relaxed by hand (a forward hook per tensor product adding θ·x Wᵀ in one ``addmm``, or
θ·(x Aᵀ) Bᵀ for rank r; no bookkeeping, no penalty), against the library's relaxed model without
and with its penalty (``penalty_every=4``).

The hand-written arms are the floor of the method itself on the machine: W's products on every
edge and node row, their backward, and Adam on W. What the library adds on top of that floor is its
own overhead; what the floor already costs no library can remove.

    python -m examples.bench.floor [--steps 30] [--threads 1]

Times: medians over ``--steps`` rounds, each round one cycle of 4 optimiser steps of every arm back to
back; × standard: median of the per-round ratios, quartiles in brackets (as
:mod:`examples.bench.overhead`). Writes ``docs/evidence/overhead/floor.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

import relax_plugins as rp
from examples.bench.overhead import CYCLE, _quartiles, _segnn, timed_cycle


def hand_relaxed(base: nn.Module, names: list[str], rank: int | None, theta: float) -> nn.Module:
    """A copy of ``base`` whose modules ``names`` (e3nn tensor products) return tp(x1, x2) + θ·W·x1,
    W dense or B·A, written as plainly as PyTorch allows (the W live in ``model.hand_w``)."""
    model = copy.deepcopy(base)
    weights = nn.ParameterList()
    th = torch.tensor(theta)
    for name in names:
        tp = model.get_submodule(name)
        d_in, d_out = tp.irreps_in1.dim, tp.irreps_out.dim
        if rank is None:
            W = nn.Parameter(torch.zeros(d_out, d_in))
            weights.append(W)

            def hook(m, args, out, W=W):
                x = args[0].reshape(-1, args[0].shape[-1])
                return torch.addmm(out.reshape(-1, out.shape[-1]), x, (th * W).T).reshape(out.shape)
        else:
            A = nn.Parameter(torch.randn(rank, d_in) / d_in ** 0.5)
            B = nn.Parameter(torch.zeros(d_out, rank))
            weights.extend([A, B])

            def hook(m, args, out, A=A, B=B):
                x = args[0].reshape(-1, args[0].shape[-1])
                return torch.addmm(out.reshape(-1, out.shape[-1]), x @ A.T, (th * B).T).reshape(out.shape)
        tp.register_forward_hook(hook)
    model.hand_w = weights
    return model


def measure(steps: int, rank: int = 4) -> dict:
    spec = _segnn()
    torch.manual_seed(0)
    base = spec.build()
    inputs, target = spec.batch(torch.device("cpu"))
    names = [n for n, m in rp.relax(copy.deepcopy(base)).named_modules() if isinstance(m, rp.RelaxedModule)]
    arms: dict[str, nn.Module] = {"standard": base,
                                  "by hand, dense W": hand_relaxed(base, names, None, 0.5),
                                  f"by hand, rank {rank}": hand_relaxed(base, names, rank, 0.5)}
    runs: dict[str, rp.RelaxedTraining] = {}
    for label, r, every in (("library, dense W, no penalty", None, 0), (f"library, rank {rank}, no penalty", rank, 0),
                            ("library, dense W, penalty every 4", None, 4),
                            (f"library, rank {rank}, penalty every 4", rank, 4)):
        model = rp.relax(copy.deepcopy(base), rank=r)
        rp.set_theta(model, 0.5)
        arms[label] = model
        if every:
            runs[label] = rp.RelaxedTraining(model, "constant", total=CYCLE * (steps + 2), penalty_every=every)
    opts = {k: torch.optim.Adam(m.parameters(), lr=1e-4) for k, m in arms.items()}
    times: dict[str, list[float]] = {k: [] for k in arms}

    def cycle(label: str) -> float:
        return timed_cycle(arms[label], opts[label], spec, inputs, target, runs.get(label))

    for label in arms:
        cycle(label)
    for _ in tqdm(range(steps), desc="floor", leave=False):
        for label in arms:
            times[label].append(cycle(label))
    result = {"model": spec.name, "steps": steps, "arms": {}}
    for label, ts in times.items():
        paired = sorted(t / s for t, s in zip(ts, times["standard"]))
        result["arms"][label] = {"step_ms": 1e3 * statistics.median(ts), "step_ratio": statistics.median(paired),
                                 "step_ratio_quartiles": _quartiles(paired)}
    return result


def markdown_table(result: dict, args: argparse.Namespace) -> str:
    lines = [f"`python -m examples.bench.floor --steps {args.steps} --threads {args.threads}` ({result['model']}; "
             f"cpu; {args.steps} rounds of {CYCLE} steps of every arm; × standard: median of the per-round ratios, "
             "quartiles in brackets)", "", "| arm | step ms | × standard |", "| --- | --- | --- |"]
    for arm, row in result["arms"].items():
        lo, hi = row["step_ratio_quartiles"]
        spread = "" if arm == "standard" else f" ({lo:.2f}–{hi:.2f})"
        lines.append(f"| {arm} | {row['step_ms']:.1f} | {row['step_ratio']:.2f}{spread} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30, help="timed rounds (one cycle of 4 steps per arm each)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="docs/evidence/overhead")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = measure(args.steps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "floor.json").write_text(json.dumps(result, indent=2))
    table = markdown_table(result, args)
    (out / "floor.md").write_text(table)
    print(table)
    return result


if __name__ == "__main__":
    main()
