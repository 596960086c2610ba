"""Step time of the relaxed vs the standard EGNN, interleaved so that host noise hits both arms alike.

    python -m examples.egnn.steptime [--rounds 5] [--steps 30] [--batch 100] [--threads 1]

Each round times ``--steps`` optimiser steps (forward, loss, penalty for the relaxed arm, backward,
Adam) of each arm in turn, on random N-body-shaped batches; prints and returns the medians over all
timed steps and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import relax_plugins as rp
from examples.egnn.model import EGNN, nbody_graph


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batch, edges = nbody_graph(args.batch)
    n = batch.shape[0]
    loc, vel, q, tgt = torch.randn(n, 3), torch.randn(n, 3), torch.randn(n, 1).sign(), torch.randn(n, 3)
    arms = {}
    for arm in ("standard", "relaxed"):
        torch.manual_seed(0)
        model = EGNN()
        if arm == "relaxed":
            rp.relax(model, adapters=["pyg"])
            rp.set_theta(model, 0.5)
        arms[arm] = (model, torch.optim.Adam(model.parameters(), lr=1e-4), [])
    for r in range(args.rounds + 1):
        for arm, (model, opt, times) in arms.items():
            for _ in range(args.steps):
                t0 = time.perf_counter()
                loss = (model(loc, vel, q, edges, batch) - tgt).square().mean()
                if arm == "relaxed":
                    loss = loss + rp.penalty(model)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if r > 0:  # round 0 warms up allocators and caches
                    times.append(time.perf_counter() - t0)
    out = {arm: statistics.median(t) for arm, (_, _, t) in arms.items()}
    out["ratio"] = out["relaxed"] / out["standard"]
    print(f"median step: standard {out['standard'] * 1e3:.1f} ms, relaxed {out['relaxed'] * 1e3:.1f} ms, "
          f"ratio {out['ratio']:.2f} (batch {args.batch}, {args.threads} thread(s))")
    return out


if __name__ == "__main__":
    main()
