"""Overhead of relaxation: training-step time, parameters and activation memory of relaxed vs standard
models (full-rank and low-rank W), the penalty's own cost (forward + backward of
``RelaxedTraining.penalty`` on the last batch), and inference of the projected model vs the original —
measured side by side in one process, steps interleaved round-robin, medians.

    python -m examples.bench.overhead [--steps 15] [--device cpu|cuda] [--models segnn,egnn,...]
    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 .venv-mace/bin/python -m examples.bench.overhead --models mace

Arms: standard; relaxed with dense W and with rank-4 W, each with the penalty on every step and with
``RelaxedTraining(penalty_every=4)``. Times are medians over ``--steps`` cycles of 4 optimiser steps
each (so an every-4 arm pays its penalty once per cycle, as in a long run). Writes
``docs/evidence/overhead/overhead.{json,md,png}``; prints the table.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

import relax_plugins as rp
from relax_plugins.diagnostics import saved_tensor_bytes


@dataclass
class Spec:
    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[torch.device], tuple[tuple, Tensor]]
    loss: Callable[[Tensor, Tensor], Tensor]
    rank: int | None  # of the low-rank arms (None: the model has none)


def _segnn() -> Spec:
    from examples.nbody.model import SEGNN

    def batch(device):
        g = torch.Generator().manual_seed(0)
        loc, vel = torch.randn(100, 5, 3, generator=g), torch.randn(100, 5, 3, generator=g)
        q = torch.randint(0, 2, (100, 5, 1), generator=g).float() * 2 - 1
        return (loc.to(device), vel.to(device), q.to(device)), torch.randn(100, 5, 3, generator=g).to(device)

    return Spec("e3nn SEGNN-like (N-body, batch 100)", SEGNN, batch, lambda o, y: (o - y).square().mean(), rank=4)


def _c8() -> Spec:
    from examples.rotmnist.model import C8Net

    def batch(device):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(32, 1, 29, 29, generator=g)
        return (x.to(device),), torch.randint(0, 10, (32,), generator=g).to(device)

    # no low-rank arms: escnn convolutions are always relaxed with a full kernel (rank is ignored, warned)
    return Spec("escnn C8 CNN (29x29, batch 32)", C8Net, batch, nn.functional.cross_entropy, rank=None)


def _vndgcnn() -> Spec:
    from examples.pointcloud.models import VNDGCNN

    def batch(device):
        g = torch.Generator().manual_seed(0)
        return (torch.randn(8, 3, 300, generator=g).to(device),), torch.randint(0, 10, (8,), generator=g).to(device)

    return Spec("VN-DGCNN (300 points, k 20, batch 8)", lambda: VNDGCNN(10, k=20), batch,
                nn.functional.cross_entropy, rank=4)


def _egnn() -> Spec:
    from examples.egnn.model import EGNN, nbody_graph

    def batch(device):
        g = torch.Generator().manual_seed(0)
        graph, edges = nbody_graph(100, device=device)
        n = graph.shape[0]
        loc, vel = torch.randn(n, 3, generator=g), torch.randn(n, 3, generator=g)
        q = torch.randint(0, 2, (n, 1), generator=g).float() * 2 - 1
        inputs = (loc.to(device), vel.to(device), q.to(device), edges, graph)
        return inputs, torch.randn(n, 3, generator=g).to(device)

    return Spec("EGNN, torch-geometric (N-body, batch 100)", EGNN, batch, lambda o, y: (o - y).square().mean(),
                rank=4)


def _vnpointnet() -> Spec:
    from examples.pointcloud.models import VNPointNet

    def batch(device):
        g = torch.Generator().manual_seed(0)
        return (torch.randn(16, 3, 300, generator=g).to(device),), torch.randint(0, 16, (16,), generator=g).to(device)

    return Spec("VN-PointNet (300 points, k 10, batch 16)",
                lambda: VNPointNet(16, k=10, widths=(8, 12, 24, 64)), batch,
                nn.functional.cross_entropy, rank=4)


class _MaceEnergy(nn.Module):
    """MACE trained on energies (forces need autograd inside forward, which inference under
    ``no_grad`` cannot give): ``forward(batch)`` → energies per molecule."""

    def __init__(self, mace: nn.Module) -> None:
        super().__init__()
        self.mace = mace

    def forward(self, batch: dict) -> Tensor:
        batch = {k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()}  # MACE writes into it
        return self.mace(batch, training=self.training, compute_force=False)["energy"]


def _mace() -> Spec:
    from examples.mace.run import make_mace, make_molecules, to_batch

    def batch(device):
        mols = make_molecules(16, seed=0)
        data = {k: v.to(device) if torch.is_tensor(v) else v for k, v in to_batch(mols, torch.float32).items()}
        return (data,), data["energy"]

    return Spec("MACE (2 interactions, 8x0e+8x1o, 16 molecules)",
                lambda: _MaceEnergy(make_mace(dtype=torch.float32)), batch,
                lambda o, y: (o - y).square().mean(), rank=4)


SPECS = {"segnn": _segnn, "egnn": _egnn, "vnpointnet": _vnpointnet, "vndgcnn": _vndgcnn, "c8": _c8, "mace": _mace}


def available_models() -> list[str]:
    """The models whose libraries are installed here (MACE lives in its own environment, .venv-mace,
    where the others' need not be)."""
    import importlib.util

    needs = {"segnn": "e3nn", "egnn": "torch_geometric", "vnpointnet": "relax_vn", "vndgcnn": "relax_vn",
             "c8": "escnn", "mace": "mace"}
    return [m for m in SPECS if importlib.util.find_spec(needs[m]) is not None]


def saved_activation_bytes(model: nn.Module, inputs: tuple, target: Tensor, loss_fn, relaxed: bool) -> int:
    """Bytes of the tensors autograd saves for backward in one step: the training memory that grows with
    the batch (a CPU stand-in for peak GPU memory)."""
    holder: dict[str, Tensor] = {}

    def step() -> None:
        loss = loss_fn(model(*inputs), target)
        holder["loss"] = loss + rp.penalty(model) if relaxed else loss

    total = saved_tensor_bytes(step)
    holder["loss"].backward()
    model.zero_grad(set_to_none=True)
    return total


def _quartiles(values: list[float]) -> tuple[float, float]:
    """Lower and upper quartiles (for the spread of the paired ratios).

    Example:
        >>> _quartiles([1.0, 2.0, 3.0, 4.0, 5.0])
        (2.0, 4.0)
    """
    q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return q[0], q[2]


#: steps per timed cycle: a multiple of every arm's ``penalty_every``, so that each cycle holds the
#: same share of penalty steps as a long run does
CYCLE = 4


def timed_cycle(model: nn.Module, opt: torch.optim.Optimizer, spec: Spec, inputs: tuple, target: Tensor,
                run: rp.RelaxedTraining | None = None, device: torch.device | None = None) -> float:
    """Seconds per optimiser step (forward, loss, penalty when ``run`` is given, backward, Adam),
    averaged over one cycle of :data:`CYCLE` steps."""
    cuda = device is not None and device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(CYCLE):
        loss = spec.loss(model(*inputs), target)
        if run is not None:
            loss = loss + run.penalty()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / CYCLE


def measure(spec: Spec, steps: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    base = spec.build().to(device)
    arms = {"standard": base}
    every: dict[str, int] = {"standard": 0}
    twin: dict[str, str] = {}  # an every-k arm → the every-step arm with the same W (its penalty timing)
    settings = [("relaxed", None, 1), ("relaxed, penalty every 4", None, 4)]
    if spec.rank is not None:
        settings[1:1] = [(f"relaxed rank {spec.rank}", spec.rank, 1)]
        settings.append((f"relaxed rank {spec.rank}, penalty every 4", spec.rank, 4))
    for label, rank, k in settings:
        model = rp.relax(copy.deepcopy(base), rank=rank)
        rp.set_theta(model, 0.5)
        arms[label], every[label] = model, k
        twin[label] = "relaxed" if rank is None else f"relaxed rank {spec.rank}"
    runs = {k: rp.RelaxedTraining(m, "constant", total=CYCLE * (steps + 2), penalty_every=every[k])
            for k, m in arms.items() if every[k]}
    inputs, target = spec.batch(device)
    opts = {k: torch.optim.Adam(m.parameters(), lr=1e-4) for k, m in arms.items()}
    times: dict[str, list[float]] = {k: [] for k in arms}

    def cycle(label: str) -> float:
        return timed_cycle(arms[label], opts[label], spec, inputs, target, runs.get(label), device)

    for label in arms:  # warm-up: caches, escnn basis expansion, allocator
        cycle(label)
    for _ in tqdm(range(steps), desc=spec.name, leave=False):
        for label in arms:  # interleaved so that host noise hits every arm alike
            times[label].append(cycle(label))
    # the penalty alone (forward + backward, on the inputs recorded by the last step, as the training
    # loop computes it: through RelaxedTraining), interleaved
    pen_times: dict[str, list[float]] = {k: [] for k in arms if every[k] == 1}
    for _ in range(steps):
        for label in pen_times:
            model = arms[label]
            t0 = time.perf_counter()
            runs[label].penalty().backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            pen_times[label].append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
    result = {"model": spec.name, "steps": steps, "arms": {}}
    n_base = sum(p.numel() for p in base.parameters())
    for label, model in arms.items():
        result["arms"][label] = {
            "step_ms": 1e3 * statistics.median(times[label]),
            "params": sum(p.numel() for p in model.parameters()),
            "saved_bytes": saved_activation_bytes(model, inputs, target, spec.loss, label != "standard"),
            # per step: the penalty's own cost, amortised over k steps with penalty_every = k
            "penalty_ms": (1e3 * statistics.median(pen_times[twin[label]]) / every[label]
                           if every[label] else 0.0),
            "penalty_every": every[label],
        }
    std = result["arms"]["standard"]
    for label, row in result["arms"].items():
        # each round ran every arm once, back to back: the ratio within a round cancels the machine's
        # slow phases (another tenant, frequency changes), which a ratio of two medians does not
        paired = sorted(t / s for t, s in zip(times[label], times["standard"]))
        row["step_ratio"] = statistics.median(paired)
        row["step_ratio_quartiles"] = _quartiles(paired)
        row["step_ratio_of_medians"] = row["step_ms"] / std["step_ms"]
        row["param_ratio"] = row["params"] / n_base
        row["saved_ratio"] = row["saved_bytes"] / std["saved_bytes"]

    # inference: project the relaxed model (merge) and time it against the original architecture
    projected = rp.project(arms["relaxed"], merge=True)
    original = copy.deepcopy(base)  # the never-relaxed architecture, given the projected weights
    original.load_state_dict(projected.state_dict())
    with torch.no_grad():  # escnn's eval() caches filters; with autograd on they break deepcopy
        projected.eval()
        original.eval()
    infer = {"projected": [], "original": []}
    with torch.no_grad():
        for _ in range(max(steps, 5)):
            for label, model in (("projected", projected), ("original", original)):
                t0 = time.perf_counter()
                model(*inputs)
                infer[label].append(time.perf_counter() - t0)
        same = torch.equal(projected(*inputs), original(*inputs))
    result["inference_ratio"] = statistics.median(infer["projected"]) / statistics.median(infer["original"])
    result["inference_identical_outputs"] = bool(same)
    # e3nn's code-generated submodules (torch.fx GraphModules) get a new class on every deepcopy
    def classes(model: nn.Module) -> list[str]:
        return [type(m).__name__ for m in model.modules() if not isinstance(m, torch.fx.GraphModule)]

    result["projected_classes_match"] = classes(projected) == classes(base)
    result["projected_keys_match"] = list(projected.state_dict()) == list(base.state_dict())
    if device.type == "cuda":
        result["device"] = torch.cuda.get_device_name(device)
    return result


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.5))
    for ax, key, title in zip(axes, ("step_ratio", "param_ratio", "saved_ratio"),
                              ("training step time / standard", "parameters / standard",
                               "saved activations / standard")):
        labels, vals = [], []
        for r in results:
            for arm, row in r["arms"].items():
                if arm != "standard":
                    labels.append(f"{r['model'].split(' (')[0]}\n{arm}")
                    vals.append(row[key])
        ax.barh(range(len(vals)), vals)
        ax.axvline(1.0, color="k", lw=0.8)
        ax.axvline(1.15, color="r", lw=0.8, ls="--")
        ax.set_yticks(range(len(vals)), labels, fontsize=7)
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown_table(results: list[dict], args: argparse.Namespace) -> str:
    """The README's table: one row per model and arm."""
    models = f" --models {args.models}" if args.models else ""
    lines = [f"`python -m examples.bench.overhead --steps {args.steps} --threads {args.threads}{models}` "
             f"({args.device}; {args.steps} rounds, each one cycle of {CYCLE} steps of every arm; step ms: "
             "median cycle; × standard: median of the per-round ratios, quartiles in brackets)", "",
             "| model | arm | step ms | × standard | penalty ms/step | params × | saved act. × |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        for i, (arm, row) in enumerate(r["arms"].items()):
            name = r["model"] if i == 0 else ""
            lo, hi = row["step_ratio_quartiles"]
            spread = "" if arm == "standard" else f" ({lo:.2f}–{hi:.2f})"
            lines.append(f"| {name} | {arm} | {row['step_ms']:.1f} | {row['step_ratio']:.2f}{spread} | "
                         f"{row['penalty_ms']:.1f} | {row['param_ratio']:.2f} | {row['saved_ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=15, help="timed cycles of 4 steps per arm")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", default=None, help=f"comma-separated from {','.join(SPECS)} (default: all installed)")
    ap.add_argument("--out", default="docs/evidence/overhead")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    names = args.models.split(",") if args.models else available_models()
    results = [measure(SPECS[name](), args.steps, device) for name in names]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "overhead.json").write_text(json.dumps(results, indent=2))
    plot(results, out / "overhead.png")
    (out / "overhead.md").write_text(markdown_table(results, args))
    print(f"{'model':40s} {'arm':34s} {'step ms':>9s} {'ratio':>6s} {'params':>8s} {'ratio':>6s} {'saved act.':>7s} "
          f"{'saved MB':>9s} {'penalty ms':>10s}")
    for r in results:
        for arm, row in r["arms"].items():
            print(f"{r['model']:40s} {arm:34s} {row['step_ms']:9.1f} {row['step_ratio']:6.2f} {row['params']:8d} "
                  f"{row['param_ratio']:6.2f} {row['saved_ratio']:7.2f} {row['saved_bytes'] / 1e6:9.2f} "
                  f"{row['penalty_ms']:10.2f}")
        print(f"{'':40s} inference projected/original: {r['inference_ratio']:.2f}, identical outputs: "
              f"{r['inference_identical_outputs']}, original classes: {r['projected_classes_match']}, "
              f"keys: {r['projected_keys_match']}")
    print(f"wrote {out / 'overhead.json'} and {out / 'overhead.png'}")
    return results


if __name__ == "__main__":
    main()
