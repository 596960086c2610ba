"""Rotated point-cloud classification: standard vs. relaxed VN training, same data, seeds and steps.

``python -m examples.pointcloud.run`` (CPU-sized default; ``--help`` for options) writes
``results/pointcloud/pointcloud_<model>.json`` and ``.png``.

Protocol (``/work/shared/docs/benchmarks.md`` §2):

* data: :mod:`examples.pointcloud.data`, 16 classes, 300 points, SO(3)/SO(3) by default, fixed
  data seed; train / val / test = 64 / 16 / 32 samples per class;
* arms, all trained for the same number of optimiser steps on the same batches (a training seed
  fixes the initial weights and the batch order, shared by all arms):

  - ``standard``: the VN model as is;
  - ``relaxed``: ``rp.relax`` (dense W on every VN channel map, feature and direction maps),
    θ per step from ``Triangular(total=steps)`` (exactly 0 at the last step), penalty
    ``rp.penalty(form="paper", lie=0.01, norm=0.01)`` (the paper's λ);
  - ``relaxed_nolie``: the same without the Lie-derivative penalty (ablation);
  - ``relaxed_const``: θ = 1 until the last step (``Constant`` schedule), the abrupt projection (ablation);
  - ``relaxed_lowrank`` (not in the default list): W of rank ``--rank``;
  - ablation arms (``docs/ablation.md``, not in the default list), each differing from ``relaxed`` in
    one thing: ``no_norm`` (λ_N = 0); ``dual`` (no schedule: θ learned per layer by
    ``rp.DualAscentTheta(model, init=--dual-init, dual_lr=--dual-lr)``, created after ``relax`` and
    before the optimiser, ``dual.penalty()`` in the loss, ``dual.step()`` after ``optimizer.step()``,
    ``dual.finish()`` at the end); ``drop`` (selection and export with ``project(merge=False)``);
    ``lowrank`` (``rp.relax(model, rank=4)``);

* validation selection: every ``--eval-every`` steps and at the last step the model is evaluated on
  the validation split; relaxed models are evaluated **after projection** (a deep copy, ``project(
  merge=True)``, and also ``merge=False``), so the selected checkpoint is always exactly equivariant;
  the test accuracy is read at the best-validation checkpoint only;
* equivariance error of the selected (projected) model in float64:
  ||f(R x) − f(x)|| / ||f(x)|| over test clouds with random rotations R; for relaxed arms also of the
  relaxed model in the middle of training (θ at its peak) to show that it is not equivariant;
* step time: an interleaved timing phase (standard and relaxed steps alternate in one process, θ =
  0.5, ``--timing-steps`` pairs) gives the relaxed/standard ratio as the ratio of the fastest steps
  and as the median of pairwise ratios (the host is noisy; wall times of whole runs are also stored).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import relax_plugins as rp
from examples.args import nonnegative_int, positive_int
from examples.pointcloud.data import CLASSES, make_dataset, make_split
from examples.pointcloud.models import build_model

__all__ = ["ARMS", "main", "train_run", "equivariance_error", "timing_phase", "summarise", "markdown_table"]

#: arm → options (relax: whether to relax; schedule, lie, norm, rank for relaxed arms)
ARMS: dict[str, dict[str, Any]] = {
    "standard": {"relax": False},
    "relaxed": {"relax": True, "schedule": "triangular", "lie": None, "norm": None},
    "relaxed_nolie": {"relax": True, "schedule": "triangular", "lie": 0.0, "norm": None},
    "relaxed_const": {"relax": True, "schedule": "constant", "lie": None, "norm": None},
    "relaxed_lowrank": {"relax": True, "schedule": "triangular", "lie": None, "norm": None, "rank": "cli"},
    # ablation arms (docs/ablation.md): one difference from ``relaxed`` each
    "no_norm": {"relax": True, "schedule": "triangular", "lie": None, "norm": 0.0},
    "dual": {"relax": True, "schedule": "learned", "lie": None, "norm": None, "dual": True},
    "drop": {"relax": True, "schedule": "triangular", "lie": None, "norm": None, "merge": False},
    "lowrank": {"relax": True, "schedule": "triangular", "lie": None, "norm": None, "rank": 4},
}
DEFAULT_ARMS = ("standard", "relaxed", "relaxed_nolie", "relaxed_const")
ABLATION_ARMS = ("standard", "relaxed", "no_norm", "dual", "drop", "lowrank")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="pointnet", choices=["pointnet", "dgcnn"])
    p.add_argument("--arms", default=",".join(DEFAULT_ARMS), help=f"comma-separated, from {sorted(ARMS)}")
    p.add_argument("--seeds", type=positive_int, default=3)
    p.add_argument("--steps", type=positive_int, default=300)
    p.add_argument("--batch", type=positive_int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-every", type=positive_int, default=60)
    p.add_argument("--per-class", default="64,16,32", help="train,val,test samples per class")
    p.add_argument("--points", type=positive_int, default=300)
    p.add_argument("--rotation", default="so3", choices=["so3", "z"], help="so3: SO(3)/SO(3); z: z/SO(3)")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--k", type=positive_int, default=10, help="neighbours of the edge features")
    p.add_argument("--widths", default="8,12,24,64", help="VN channel widths")
    p.add_argument("--lie", type=float, default=0.01)
    p.add_argument("--norm", type=float, default=0.01)
    p.add_argument("--form", default="paper", choices=["sqrt", "mean", "paper"])
    p.add_argument("--penalty-every", type=positive_int, default=1,
                   help="penalty_every of the scheduled relaxed arms (1: as the recorded evidence ran; 4: the "
                        "library's default; the dual arm keeps 1)")
    p.add_argument("--rank", type=positive_int, default=8, help="rank of W in the relaxed_lowrank arm")
    p.add_argument("--dual-init", type=float, default=1.0, help="initial γ_i of the dual arm")
    p.add_argument("--dual-lr", type=float, default=3e-3, help="dual step η of the dual arm (see docs/ablation.md)")
    p.add_argument("--probe-pull", type=int, default=0,
                   help="only measure the task's pull |dL/dθ_i| over this many steps (relaxed, θ = 1, η = 0)")
    p.add_argument("--workers", type=positive_int, default=2, help="parallel runs (one thread each)")
    p.add_argument("--timing-steps", type=nonnegative_int, default=20, help="interleaved timing pairs (0: skip)")
    p.add_argument("--timing-only", action="store_true", help="only the interleaved timing phase, no training")
    p.add_argument("--equiv-samples", type=positive_int, default=32)
    p.add_argument("--out", default="results/pointcloud")
    p.add_argument("--quick", action="store_true", help="a tiny smoke configuration (tests, CI)")
    p.add_argument("--report-only", action="store_true",
                   help="no training: the table, JSON and PNG of the finished runs (the missing ones are listed)")
    p.add_argument("--evidence", action="store_true",
                   help="issue 15's point-cloud evidence: 5 seeds, 900 steps (3x), standard vs dual vs rank-8 W, "
                        "written to docs/evidence/pointcloud (finished runs are kept and not run again)")
    args = p.parse_args(argv)
    # the options given on the command line win over a preset's values (--out above all)
    unset = object()
    p.set_defaults(**{a.dest: unset for a in p._actions if a.dest != "help"})
    given = {k for k, v in vars(p.parse_args(argv)).items() if v is not unset}
    presets = []
    if args.evidence:
        presets.append({"seeds": max(args.seeds, 5), "steps": 900, "eval_every": 90, "timing_steps": 0,
                        "arms": "standard,dual,relaxed_lowrank", "out": "docs/evidence/pointcloud"})
    if args.quick:
        presets.append({"steps": 6, "seeds": 1, "eval_every": 3, "per_class": "1,1,1", "points": 40,
                        "widths": "4,4,8,8", "k": 4, "batch": 8, "timing_steps": 2, "equiv_samples": 4, "workers": 1})
    for preset in presets:
        for key, value in preset.items():
            if key not in given:
                setattr(args, key, value)
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown:
        p.error(f"unknown arms {unknown}; choose from {sorted(ARMS)}")
    return args


def _run_file(out_dir: Path, args: argparse.Namespace, arm: str, seed: int) -> Path:
    """Where one finished run is kept: the name carries a hash of every setting its numbers depend on."""
    import hashlib

    skip = {"arms", "seeds", "workers", "out", "timing_steps", "timing_only", "probe_pull", "quick", "evidence",
            "report_only"}
    key = json.dumps({k: v for k, v in sorted(vars(args).items()) if k not in skip}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    path = out_dir / "runs" / f"{args.model}_{arm}_seed{seed}_{digest}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    widths = tuple(int(w) for w in args.widths.split(","))
    if args.model == "dgcnn":
        widths = widths[-3:]
    return {"k": args.k, "widths": widths}


def arm_options(arm: str, args: argparse.Namespace) -> dict[str, Any]:
    """Options of an arm with the CLI defaults filled in.

    Example:
        >>> a = parse_args(["--arms", "drop,lowrank,dual,no_norm"])
        >>> arm_options("drop", a)["merge"], arm_options("lowrank", a)["rank"], arm_options("dual", a)["dual"]
        (False, 4, True)
        >>> arm_options("no_norm", a)["norm"], arm_options("relaxed", a)["merge"]
        (0.0, True)
    """
    o = dict(ARMS[arm])
    if o["relax"]:
        o["lie"] = args.lie if o["lie"] is None else o["lie"]
        o["norm"] = args.norm if o["norm"] is None else o["norm"]
        o["rank"] = args.rank if o.get("rank") == "cli" else o.get("rank")
        o.setdefault("merge", True)
        o.setdefault("dual", False)
    return o


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 64) -> float:
    """Top-1 accuracy in eval mode.

    Example:
        >>> m = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 2))
        >>> 0.0 <= accuracy(m, torch.randn(4, 3, 2), torch.tensor([0, 1, 0, 1])) <= 1.0
        True
    """
    was = model.training
    model.eval()
    correct = sum(int((model(x[i: i + batch]).argmax(-1) == y[i: i + batch]).sum()) for i in range(0, len(x), batch))
    model.train(was)
    return correct / len(x)


@torch.no_grad()
def equivariance_error(model: torch.nn.Module, x: torch.Tensor, seed: int = 0) -> float:
    """Relative change of the logits under a random rotation per cloud, in float64, eval mode.

    Example:
        >>> m = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 2))
        >>> equivariance_error(m, torch.randn(2, 3, 2)) > 0   # not invariant
        True
    """
    m = copy.deepcopy(model).double().eval()
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(len(x), 3, 3, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]
    q[torch.det(q) < 0, :, 0] *= -1  # proper rotations only
    xd = x.double()
    out, out_rot = m(xd), m(q @ xd)
    return float((out_rot - out).norm() / out.norm().clamp_min(1e-30))


def projected_copy(model: torch.nn.Module, relaxed: bool, merge: bool) -> torch.nn.Module:
    m = copy.deepcopy(model)
    return rp.project(m, merge=merge) if relaxed else m


def train_run(job: dict[str, Any]) -> dict[str, Any]:
    """One (arm, seed) training run; returns its record (picklable, for worker processes)."""
    torch.set_num_threads(1)
    args = argparse.Namespace(**job["args"])
    arm, seed = job["arm"], job["seed"]
    opts = arm_options(arm, args)
    data = make_dataset(tuple(int(v) for v in args.per_class.split(",")), seed=args.data_seed,
                        n_points=args.points, rotation=args.rotation)
    (xtr, ytr), (xva, yva), (xte, yte) = data["train"], data["val"], data["test"]
    torch.manual_seed(seed)  # same initial base weights for every arm of this seed
    model = build_model(args.model, len(CLASSES), **model_kwargs(args))
    relaxed = opts["relax"]
    dual: Any = None
    run = None
    if relaxed:
        rp.relax(model, adapters=["vn"], rank=opts["rank"])
        if opts["dual"]:
            # γ_i become parameters: after relax, before the optimiser is built
            dual = rp.DualAscentTheta(model, init=args.dual_init, dual_lr=args.dual_lr)
        run = rp.RelaxedTraining(model, dual if dual is not None else opts["schedule"], total=args.steps,
                                 lie=opts["lie"], norm=opts["norm"], form=args.form,
                                 # 1 by default: as its recorded evidence ran (before every4 was the default)
                                 penalty_every=1 if dual is not None else args.penalty_every)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    n_trained = sum(p.numel() for p in model.parameters())  # γ_i included for the dual arm
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / args.steps)))
    g = torch.Generator().manual_seed(1000 + seed)  # same batch order for every arm of this seed
    order = torch.cat([torch.randperm(len(xtr), generator=g) for _ in range(args.steps * args.batch // len(xtr) + 1)])
    # eval points: every eval_every steps and the last step
    evals = sorted({*range(args.eval_every - 1, args.steps, args.eval_every), args.steps - 1})
    variants = ("merge", "drop") if relaxed else ("plain",)
    best = {v: {"val": -1.0, "step": -1, "state": None} for v in variants}
    curves: dict[str, list] = {v: [] for v in variants}
    losses, step_times = [], []
    mid_equiv = None
    gamma_curve: list = []
    bar = tqdm(range(args.steps), desc=f"{arm} s{seed}", leave=False, disable=job.get("quiet", False))
    for i in bar:
        if run is not None:
            run.advance()
        idx = order[i * args.batch: (i + 1) * args.batch]
        t0 = time.perf_counter()
        logits = model(xtr[idx])
        loss = F.cross_entropy(logits, ytr[idx])
        total = loss + run.penalty() if run is not None else loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        if run is not None:
            run.step()
        lr_sched.step()
        step_times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
        if relaxed and i == args.steps // 2:
            mid_equiv = equivariance_error(model, xte[: args.equiv_samples], seed=seed)
        if i in evals:
            if dual is not None:
                gamma_curve.append((i + 1, dual.gammas(), dual.duals()))
            for v in variants:
                m = projected_copy(model, relaxed, merge=(v == "merge"))
                acc = accuracy(m, xva, yva)
                curves[v].append((i + 1, acc))
                if acc > best[v]["val"]:
                    best[v] = {"val": acc, "step": i + 1, "state": copy.deepcopy(m.state_dict())}
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", val=f"{curves[variants[0]][-1][1]:.3f}")
    key = ("merge" if opts["merge"] else "drop") if relaxed else "plain"
    extra: dict[str, Any] = {}
    if dual is not None:
        # the last-step model is projected like the checkpoints (θ·P(W) merged at the learned γ);
        # finish() then turns γ back into buffers with θ = 0, as in examples/nbody
        extra["dual"] = {"gammas": dual.gammas(), "duals": dual.duals(), "curve": gamma_curve,
                         "dual_lr": args.dual_lr, "init": args.dual_init}
        final = projected_copy(model, relaxed, merge=key != "drop")
        dual.finish()
    else:
        final = projected_copy(model, relaxed, merge=key != "drop")
    result = {
        "arm": arm,
        "seed": seed,
        "steps": args.steps,
        "mean_step_s": float(np.mean(step_times[2:] or step_times)),
        "median_step_s": float(np.median(step_times)),
        "final_test_acc": accuracy(final, xte, yte),
        "train_loss_last20": float(np.mean(losses[-20:])),
        "relaxed_mid_equiv_err": mid_equiv,
        "curves": curves,
        "n_params_trained": n_trained,
        "n_params_exported": sum(p.numel() for p in final.parameters()),
        **extra,
    }
    for v in variants:
        final.load_state_dict(best[v]["state"])
        result[f"{v}_best_val_acc"] = best[v]["val"]
        result[f"{v}_best_step"] = best[v]["step"]
        result[f"{v}_test_acc"] = accuracy(final, xte, yte)
        result[f"{v}_equiv_err"] = equivariance_error(final, xte[: args.equiv_samples], seed=seed + 1)
    result["projection"] = key
    result["test_acc"], result["equiv_err"] = result[f"{key}_test_acc"], result[f"{key}_equiv_err"]
    return result


def probe_pull(args: argparse.Namespace, steps: int, seed: int = 0, window: int = 10) -> dict[str, Any]:
    """The task's pull on θ: per-layer |∂L/∂θ_i| of the relaxed model at θ = 1 with η = 0 (no dual ascent).

    Same data, batches and optimiser as the ``dual`` arm of ``seed``; L is the training loss with the
    arm's penalties. Returns per layer the median |∂L/∂θ_i| of each ``window``-step window and the mean
    signed gradient (negative: the data push θ up).
    """
    torch.set_num_threads(1)
    data = make_dataset(tuple(int(v) for v in args.per_class.split(",")), seed=args.data_seed,
                        n_points=args.points, rotation=args.rotation)
    xtr, ytr = data["train"]
    torch.manual_seed(seed)
    model = rp.relax(build_model(args.model, len(CLASSES), **model_kwargs(args)), adapters=["vn"])
    dual = rp.DualAscentTheta(model, init=1.0, dual_lr=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    g = torch.Generator().manual_seed(1000 + seed)
    order = torch.cat([torch.randperm(len(xtr), generator=g) for _ in range(steps * args.batch // len(xtr) + 1)])
    grads: dict[str, list[float]] = {name: [] for name, _ in dual.layers}
    for i in tqdm(range(steps), desc="probe"):
        idx = order[i * args.batch: (i + 1) * args.batch]
        loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
        loss = loss + rp.penalty(model, lie=args.lie, norm=args.norm, form=args.form) + dual.penalty()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for name, layer in dual.layers:
            grads[name].append(float(layer.theta.grad))
        for _, layer in dual.layers:
            layer.theta.grad = None  # keep θ = 1: measure the pull, do not follow it
        opt.step()
    out = {}
    for name, gs in grads.items():
        a = np.abs(np.array(gs))
        out[name] = {"window_medians": [float(np.median(a[j: j + window])) for j in range(0, len(a), window)],
                     "mean_signed": float(np.mean(gs))}
    return out


def timing_phase(args: argparse.Namespace) -> dict[str, Any]:
    """Alternate standard and relaxed (θ = 0.5, with penalty) optimiser steps in one process."""
    torch.set_num_threads(1)
    x, y = make_split("train", max(1, -(-args.batch // len(CLASSES))), seed=args.data_seed, n_points=args.points)
    x, y = x[: args.batch], y[: args.batch]
    torch.manual_seed(0)
    std = build_model(args.model, len(CLASSES), **model_kwargs(args))
    arms = {"standard": (std, False)}
    for name, rank in (("relaxed", None), (f"relaxed_rank{args.rank}", args.rank)):
        m = rp.relax(copy.deepcopy(std), adapters=["vn"], rank=rank)
        rp.set_theta(m, 0.5)
        arms[name] = (m, True)
    opts = {n: torch.optim.Adam(m.parameters(), lr=1e-4) for n, (m, _) in arms.items()}
    times: dict[str, list[float]] = {n: [] for n in arms}
    for _ in range(args.timing_steps + 2):
        for n, (m, relaxed) in arms.items():
            t0 = time.perf_counter()
            loss = F.cross_entropy(m(x), y)
            if relaxed:
                loss = loss + rp.penalty(m, lie=args.lie, norm=args.norm, form=args.form)
            opts[n].zero_grad(set_to_none=True)
            loss.backward()
            opts[n].step()
            times[n].append(time.perf_counter() - t0)
    times = {n: t[2:] for n, t in times.items()}  # warm-up dropped
    base = times["standard"]
    out: dict[str, Any] = {"pairs": len(base), "batch": args.batch, "threads": 1}
    for n, t in times.items():
        out[n] = {
            "min_s": min(t),
            "median_s": statistics.median(t),
            "ratio_min": min(t) / min(base),
            "ratio_median_pairwise": statistics.median(a / b for a, b in zip(t, base)),
            "params": sum(p.numel() for p in arms[n][0].parameters()),
        }
    return out


def _mean_std(v: list[float]) -> tuple[float, float]:
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per arm: mean ± std (over seeds) of test accuracy, equivariance error, step time, and for each
    arm next to ``standard`` the gain over it paired by seed (mean ± std) and the seeds it won.

    Example:
        >>> r = [{"arm": "a", "seed": s, "test_acc": 0.5, "equiv_err": 1e-15, "mean_step_s": 0.1,
        ...       "final_test_acc": 0.5, "relaxed_mid_equiv_err": None} for s in (0, 1)]
        >>> summarise(r)["a"]["test_acc"]
        [0.5, 0.0]
        >>> std = [{**x, "arm": "standard", "test_acc": 0.4} for x in r]
        >>> [round(v, 6) for v in summarise(r + std)["a"]["paired_gain_vs_standard"]]
        [0.1, 0.0]
    """
    out: dict[str, Any] = {}
    for arm in dict.fromkeys(r["arm"] for r in runs):
        rs = [r for r in runs if r["arm"] == arm]
        s = {
            "seeds": len(rs),
            "test_acc": list(_mean_std([r["test_acc"] for r in rs])),
            "final_test_acc": list(_mean_std([r["final_test_acc"] for r in rs])),
            "equiv_err_max": max(r["equiv_err"] for r in rs),
            "mean_step_s": list(_mean_std([r["mean_step_s"] for r in rs])),
        }
        if "drop_test_acc" in rs[0]:
            s["drop_test_acc"] = list(_mean_std([r["drop_test_acc"] for r in rs]))
            s["drop_equiv_err_max"] = max(r["drop_equiv_err"] for r in rs)
            s["relaxed_mid_equiv_err_min"] = min(r["relaxed_mid_equiv_err"] for r in rs)
        if all("dual" in r for r in rs):
            layers = list(rs[0]["dual"]["gammas"])
            s["gammas_final_mean"] = {k: float(np.mean([r["dual"]["gammas"][k] for r in rs])) for k in layers}
            s["duals_mean"] = {k: float(np.mean([r["dual"]["duals"][k] for r in rs])) for k in layers}
        out[arm] = s
    # paired by seed (same data, initial weights and batches): the gain over standard and its spread
    base = {r["seed"]: r["test_acc"] for r in runs if r["arm"] == "standard"}
    for arm, s in out.items():
        diffs = [r["test_acc"] - base[r["seed"]] for r in runs if r["arm"] == arm and r["seed"] in base]
        if arm != "standard" and diffs:
            s["paired_gain_vs_standard"] = list(_mean_std(diffs))
            s["seeds_better_than_standard"] = sum(d > 0 for d in diffs)
    return out


def markdown_table(result: dict[str, Any]) -> str:
    """The docs/vn.md tables (accuracy per arm, timing) from a result dict or its JSON.

    Example:
        >>> r = {"summary": {"a": {"seeds": 2, "test_acc": [0.5, 0.1], "final_test_acc": [0.5, 0.1],
        ...      "equiv_err_max": 1e-15, "mean_step_s": [0.1, 0.0]}}, "timing": None}
        >>> print(markdown_table(r).splitlines()[2])
        | a | 2 | 50.0 ± 10.0 | – | – | 50.0 ± 10.0 | 1.0e-15 | – | 0.100 |
    """
    rows = [
        "| arm | seeds | test acc % (best val, projected, merge) | gain vs standard (paired, points) "
        "| test acc % (merge=False) | test acc % (last step) "
        "| equiv. err. projected (max, float64) | equiv. err. relaxed mid-run (min) | mean step s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def pm(v: list[float] | None) -> str:
        return "–" if v is None else f"{100 * v[0]:.1f} ± {100 * v[1]:.1f}"

    for arm, s in result["summary"].items():
        mid = s.get("relaxed_mid_equiv_err_min")
        gain = s.get("paired_gain_vs_standard")
        wins = "" if gain is None else f" ({s['seeds_better_than_standard']}/{s['seeds']} better)"
        gain_text = "–" if gain is None else f"{100 * gain[0]:+.1f} ± {100 * gain[1]:.1f}{wins}"
        rows.append(
            f"| {arm} | {s['seeds']} | {pm(s['test_acc'])} | {gain_text} | {pm(s.get('drop_test_acc'))} "
            f"| {pm(s['final_test_acc'])} "
            f"| {s['equiv_err_max']:.1e} | {'–' if mid is None else f'{mid:.2f}'} | {s['mean_step_s'][0]:.3f} |"
        )
    t = result.get("timing")
    if t:
        rows += ["", f"Interleaved timing, {t['pairs']} step pairs, batch {t['batch']}, 1 thread:", "",
                 "| model | params (trained) | fastest step s | median step s | ratio (fastest) "
                 "| ratio (median pairwise) |",
                 "| --- | --- | --- | --- | --- | --- |"]
        for name, v in t.items():
            if isinstance(v, dict):
                rows.append(f"| {name} | {v['params']} | {v['min_s']:.3f} | {v['median_s']:.3f} | {v['ratio_min']:.2f} "
                            f"| {v['ratio_median_pairwise']:.2f} |")
    return "\n".join(rows)


def plot(summary: dict[str, Any], runs: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    arms = list(summary)
    means = [100 * summary[k]["test_acc"][0] for k in arms]
    stds = [100 * summary[k]["test_acc"][1] for k in arms]
    a.bar(range(len(arms)), means, yerr=stds, capsize=4, color="tab:blue")
    a.set_xticks(range(len(arms)), arms, rotation=20)
    a.set_ylabel("test accuracy (%) at best val, projected")
    a.set_ylim(max(0, min(means) - 15), min(100, max(means) + 10))
    for arm in arms:
        key = runs[[r["arm"] for r in runs].index(arm)].get("projection", "plain")
        cs = [r["curves"][key] for r in runs if r["arm"] == arm]
        steps = [s for s, _ in cs[0]]
        b.plot(steps, [100 * np.mean([c[j][1] for c in cs]) for j in range(len(steps))], marker="o", label=arm)
    b.set_xlabel("step")
    b.set_ylabel("val accuracy (%), projected model")
    b.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.probe_pull > 0:
        pull = probe_pull(args, args.probe_pull)
        (out_dir / f"probe_pull_{args.model}.json").write_text(json.dumps(pull, indent=1))
        for name, v in pull.items():
            sys.stdout.write(f"{name:28s} median|dL/dθ| per window: "
                             + " ".join(f"{m:.1e}" for m in v["window_medians"]) + f"  mean {v['mean_signed']:+.1e}\n")
        return {"config": vars(args), "probe_pull": pull}
    timing = timing_phase(args) if args.timing_steps > 0 and not args.report_only else None
    if args.timing_only:
        if timing is None:
            raise SystemExit("--timing-only needs --timing-steps > 0")
        result = {"config": vars(args), "timing": timing, "summary": {}}
        stem = f"timing_{args.model}_b{args.batch}_k{args.k}"
        (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1))
        sys.stdout.write(markdown_table(result) + f"\nwrote {out_dir / (stem + '.json')}\n")
        return result
    jobs = [{"arm": a, "seed": s, "args": vars(args), "quiet": args.workers > 1}
            for s in range(args.seeds) for a in args.arms]
    # every finished run is kept under runs/, named by what its numbers depend on: a repeated
    # command runs only what is missing
    paths = {(j["arm"], j["seed"]): _run_file(out_dir, args, j["arm"], j["seed"]) for j in jobs}
    done = {k: json.loads(p.read_text()) for k, p in paths.items() if p.exists()}
    todo = [] if args.report_only else [j for j in jobs if (j["arm"], j["seed"]) not in done]

    def keep(r: dict[str, Any]) -> None:
        done[(r["arm"], r["seed"])] = r
        paths[(r["arm"], r["seed"])].write_text(json.dumps(r, indent=1))

    if args.workers > 1 and len(todo) > 1:
        with ProcessPoolExecutor(max_workers=args.workers) as ex:
            for r in tqdm(ex.map(train_run, todo), total=len(todo), desc="runs"):
                keep(r)
    else:
        for job in tqdm(todo, desc="runs"):
            keep(train_run(job))
    runs = [done[(j["arm"], j["seed"])] for j in jobs if (j["arm"], j["seed"]) in done]
    missing = [f"{j['arm']}/seed{j['seed']}" for j in jobs if (j["arm"], j["seed"]) not in done]
    if not runs:
        raise SystemExit(f"no finished runs in {out_dir / 'runs'} for these settings")
    summary = summarise(runs)
    result = {
        "benchmark": "rotated point-cloud classification (synthetic, examples.pointcloud.data)",
        "config": {k: v for k, v in vars(args).items()},
        "classes": list(CLASSES),
        "summary": summary,
        "timing": timing,
        "runs": runs,
        "runs_remaining": missing,
        "wall_s": time.perf_counter() - t_start,
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
    }
    stem = f"pointcloud_{args.model}" + ("_quick" if args.quick else "")
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out_dir / f"{stem}.md").write_text(markdown_table(result) + "\n")
    plot(summary, runs, out_dir / f"{stem}.png",
         f"VN-{args.model}, {len(CLASSES)} synthetic classes, {args.rotation}, {args.steps} steps, {args.seeds} seeds")
    lines = [f"{'arm':18s} test acc (mean ± std)   equiv err (max)   step s"]
    for arm, s in summary.items():
        lines.append(f"{arm:18s} {100 * s['test_acc'][0]:6.2f} ± {100 * s['test_acc'][1]:5.2f}        "
                     f"{s['equiv_err_max']:.1e}          {s['mean_step_s'][0]:.3f}")
    if timing:
        lines.append(f"step-time ratio relaxed/standard: {timing['relaxed']['ratio_min']:.2f} (fastest steps), "
                     f"{timing['relaxed']['ratio_median_pairwise']:.2f} (median pairwise)")
    lines += ["", markdown_table(result), ""]
    lines.append(f"wrote {out_dir / (stem + '.json')}, .md and .png in {result['wall_s']:.0f} s")
    sys.stdout.write("\n".join(lines) + "\n")
    return result


if __name__ == "__main__":
    main()
