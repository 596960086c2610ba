"""What one relaxed layer adds to a training step, layer by layer: forward + backward of y + θ·W·x on top
of a stand-in base layer y = tanh(x·M), for dense W and rank-r W, at the shapes of a model's layers.

    python -m examples.bench.layer_cost [--shapes 2000x82x48,2000x40x48,500x80x48,500x40x40] [--rank 4]

Shapes are ``rows x d_in x d_out`` (the defaults: the SEGNN-like N-body model's message and update
layers at batch 100). Columns, as medians of interleaved repetitions, in ms added to the base layer:
``dense`` and ``rank r`` (``LinearRelaxation.apply_weight(x, θ, add_to=y)``, what the adapters run),
``rank r, no input grad`` (the same with x detached in the relaxation branch: what the second
input-gradient pass and its sum cost) and ``empty node`` (a do-nothing autograd node: the fixed
price of one more node in the graph). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import Tensor

from relax_plugins import LinearRelaxation, Symmetry

DEFAULT_SHAPES = "2000x82x48,2000x40x48,500x80x48,500x40x40"


class _Identity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: Tensor) -> Tensor:  # type: ignore[override]
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:  # type: ignore[override]
        return g


def _term(d_in: int, d_out: int, rank: int | None) -> LinearRelaxation:
    # the generators do not enter W·x: zero ones of the right sizes
    sym = Symmetry(d_in, d_out, lie_in=torch.zeros(1, d_in, d_in), lie_out=torch.zeros(1, d_out, d_out))
    term = LinearRelaxation(sym, rank=rank, init_std=0.1 if rank is None else 0.0)
    if rank is not None:
        with torch.no_grad():
            term.lora_b.normal_()
    return term


def layer_cost(rows: int, d_in: int, d_out: int, rank: int = 4, repeats: int = 60) -> dict[str, float]:
    """Milliseconds added to a step by each variant (median over interleaved repetitions).

    Example:
        >>> out = layer_cost(50, 8, 8, rank=2, repeats=3)
        >>> sorted(out)
        ['base_ms', 'dense', 'empty node', 'rank 2', 'rank 2, no input grad']
    """
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(rows, d_in, generator=g, requires_grad=True)
    M = (torch.randn(d_in, d_out, generator=g) / d_in**0.5).requires_grad_()
    grad_out = torch.randn(rows, d_out, generator=g)
    theta = torch.tensor(0.5)
    dense, low = _term(d_in, d_out, None), _term(d_in, d_out, rank)

    def base() -> tuple[Tensor, Tensor]:
        x = x0 * 1.0  # a non-leaf input, as inside a model: its gradient is summed from both branches
        return x, torch.tanh(x @ M)

    arms = {
        "base": lambda: base()[1],
        "empty node": lambda: _Identity.apply(base()[1]),
        "dense": lambda: (lambda x, y: dense.apply_weight(x, theta, add_to=y))(*base()),
        f"rank {rank}": lambda: (lambda x, y: low.apply_weight(x, theta, add_to=y))(*base()),
        f"rank {rank}, no input grad": lambda: (lambda x, y: low.apply_weight(x.detach(), theta, add_to=y))(*base()),
    }
    params = [x0, M, *dense.parameters(), *low.parameters()]
    times: dict[str, list[float]] = {k: [] for k in arms}
    for i in range(repeats + 3):
        for name, fn in arms.items():
            t0 = time.perf_counter()
            fn().backward(grad_out)
            if i >= 3:  # warm-up
                times[name].append(time.perf_counter() - t0)
            for p in params:
                p.grad = None
    base_ms = 1e3 * statistics.median(times["base"])
    out = {"base_ms": base_ms}
    out.update({k: 1e3 * statistics.median(v) - base_ms for k, v in times.items() if k != "base"})
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help="rows x d_in x d_out, comma-separated")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=60)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    results = []
    r = args.rank
    print(f"| rows × d_in → d_out | base layer ms | + dense | + rank {r} | + rank {r}, no input grad | + empty node |")
    print("| --- | --- | --- | --- | --- | --- |")
    for rows, d_in, d_out in shapes:
        res = layer_cost(rows, d_in, d_out, rank=r, repeats=args.repeats)
        results.append({"rows": rows, "d_in": d_in, "d_out": d_out, **res})
        print(f"| {rows} × {d_in} → {d_out} | {res['base_ms']:.3f} | {res['dense']:.3f} | {res[f'rank {r}']:.3f} | "
              f"{res[f'rank {r}, no input grad']:.3f} | {res['empty node']:.3f} |")
    return results


if __name__ == "__main__":
    main()
