"""Standard vs relaxed training of a SEGNN-style e3nn model (or, ``--model egnn``, the torch-geometric
EGNN of :mod:`examples.egnn`) on charged 5-body N-body data.

One command trains every arm on the same data, from the same initial weights, with the same
batches and rotations and the same number of optimiser steps, for several seeds::

    python -m examples.nbody.run              # CPU-sized default (3 seeds x 5 arms)
    python -m examples.nbody.run --ablation   # all 10 arms below (3 seeds; docs/ablation.md)
    python -m examples.nbody.run --quick      # smoke-sized comparison (make demo)
    python -m examples.nbody.run --preset gpu --device cuda   # the 1000-epoch protocol

Arms (``--arms``):

* ``standard``: the equivariant model, no relaxation;
* ``relaxed``: the paper's defaults — every tensor product relaxed (W on its first input),
  triangular θ (per optimiser step, 0 → 1 → exactly 0), λ_LD = λ_N = 0.01;
* ``no_lie``: as ``relaxed`` without the Lie-derivative penalty;
* ``constant``: θ = 1 until the last step (then 0);
* ``linear_decay``: θ = 1 for the first half, then linearly to 0 (the paper's text).

Ablation arms (``--ablation`` selects all ten):

* ``no_norm``: as ``relaxed`` with λ_N = 0;
* ``dual``: θ learned per layer by :class:`relax_plugins.DualAscentTheta` (γ_i from ``--dual-init``,
  dual step ``--dual-lr``) instead of a schedule; the final duals λ_i are recorded per layer as the
  symmetry-breaking diagnostic; ``dual.finish()`` sets θ = 0 before projection;
* ``dual_resilient``: as ``dual`` with a learned slack (``--slack-cost``, ``--slack-lr``); it ends
  with θ > 0, i.e. an only *approximately* equivariant model, whose test MSE and equivariance error
  *without* projection are recorded as well (``unprojected``);
* ``drop``: as ``relaxed`` but projected with ``merge=False`` (for this model, whose relaxed layers
  are all tensor products that cannot hold θ·P(W), merging already drops: expect ``relaxed`` exactly);
* ``lowrank``: as ``relaxed`` with a rank-``--lowrank-rank`` W (``relax(model, rank=4)``).

Evidence arms (``--preset paper``): ``standard``, ``relaxed``, ``dual``, ``matched`` (dual's θ trace
replayed as a schedule), ``recm`` (learned modulation) and ``every4``: as ``relaxed`` with the penalty
computed 4-fold on every 4th step (``RelaxedTraining(penalty_every=4)``, the cheap option).

Model selection: every ``--eval-every`` steps the *projected* model (``projected_state_dict``, what
``project()`` would export) is scored on the validation split; the best one is tested. Reported:
test MSE mean ± std over seeds, equivariance error of each projected model (random O(3) element and
translation, float64), median step times and the relaxed/standard step-time ratio, measured both
during training and in an interleaved micro-benchmark in one process. Writes ``results.json`` and
``results.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import signal
import statistics
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from examples.args import nonnegative_int, positive_int

ARMS = ("standard", "relaxed", "no_lie", "constant", "linear_decay")
ABLATION_ARMS = ARMS + ("no_norm", "dual", "dual_resilient", "drop", "lowrank")
# the paper-length evidence (issue 15): `matched` replays the same seed's dual θ trajectory as a fixed
# schedule, the control that separates the dual mechanism from an early decay of θ
# `every4` is `relaxed` with the penalty computed 4-fold on every 4th step (RelaxedTraining(penalty_every=4))
EVIDENCE_ARMS = ("standard", "dual", "relaxed", "matched", "recm", "every4")
ALL_ARMS = ABLATION_ARMS + ("matched", "recm", "every4")

PRESETS: dict[str, dict[str, Any]] = {
    # ≈ 10-15 min on 2 free cores (two arms side by side, one thread each)
    "cpu": dict(n_train=3000, n_valid=500, n_test=2000, steps=1000, batch=100, lr=3e-3, hidden="16x0e + 8x1o",
                layers=4, eval_every=100, seeds=3, workers=2),
    # make demo: ≲ 4 min on 2 cores
    "quick": dict(n_train=500, n_valid=200, n_test=500, steps=300, batch=50, lr=3e-3, hidden="8x0e + 4x1o",
                  layers=3, eval_every=50, seeds=1, workers=2, timing_steps=8),
    # the published protocol: 3000 trajectories, 1000 epochs of batch 100, Adam lr 5e-4, no lr schedule (GPU)
    "gpu": dict(n_train=3000, n_valid=2000, n_test=2000, steps=30000, batch=100, lr=5e-4, hidden="64x0e + 32x1o",
                layers=4, eval_every=300, seeds=3, workers=1, lr_schedule="none", arms=EVIDENCE_ARMS,
                checkpoint_every=1000, timing_steps=0),
    # the published protocol's length and optimiser on CPU, with the CPU-sized model (≈ 30 min/run/core);
    # resumable: every finished run writes its JSON, a running one checkpoints every `checkpoint_every` steps
    "paper": dict(n_train=3000, n_valid=1000, n_test=2000, steps=30000, batch=100, lr=5e-4, hidden="16x0e + 8x1o",
                  layers=4, eval_every=500, seeds=3, workers=2, lr_schedule="none", arms=EVIDENCE_ARMS,
                  checkpoint_every=500, out="docs/evidence/nbody_paper", timing_steps=0,
                  evidence="docs/evidence/nbody_paper_length.json"),
}


@dataclass
class Config:
    """Everything one run depends on (written into the JSON)."""

    n_train: int = 3000
    n_valid: int = 500
    n_test: int = 2000
    steps: int = 1000
    batch: int = 100
    lr: float = 3e-3
    weight_decay: float = 1e-12
    hidden: str = "16x0e + 8x1o"
    layers: int = 4
    eval_every: int = 100
    checkpoint_every: int = 0  # 0: no mid-run checkpoints (short presets)
    lr_schedule: str = "cosine"  # "cosine" (to 0 over the run) or "none" (the published protocol)
    theta_trace_every: int = 50  # steps between recorded mean θ values (what `matched` replays)
    recm: dict[str, Any] | None = None  # keyword arguments of relax_plugins.LearnedModulation (arm `recm`)
    seeds: int = 3
    workers: int = 2
    arms: tuple[str, ...] = ARMS
    lambda_lie: float = 1e-2
    lambda_norm: float = 1e-2
    penalty_form: str = "sqrt"
    # compute the penalty on every k-th step only, k-fold (RelaxedTraining(penalty_every=k)): the cheap option
    penalty_every: int = 1
    peak_theta: float = 1.0
    peak_at: float = 0.5  # where the triangular schedule peaks (fraction of training)
    init_std: float = 0.0  # std of a random initial W (0: W starts at 0)
    w_lr: float | None = None  # learning rate of W and learned θ (their own Adam group); None: lr
    rank: int | None = None
    merge: bool = True
    lowrank_rank: int = 4
    dual_init: float = 1.0
    dual_lr: float = 2e-5
    slack_cost: float = 1e-2
    slack_lr: float = 1.0
    rotate: bool = True
    device: str = "cpu"
    threads: int = 1
    timing_steps: int = 20
    data_seed: int = 43
    cache_dir: str | None = None
    out: str = "results/nbody"
    evidence: str | None = None  # also write the evidence record (see `evidence_record`) to this path
    preset: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)
    # "segnn" (e3nn, relaxed by the e3nn adapter) or "egnn" (examples.egnn.model.EGNNSystems, relaxed by
    # the pyg adapter, ``egnn_hidden`` channels; ``hidden`` is then unused)
    model: str = "segnn"
    egnn_hidden: int = 64


def arm_spec(arm: str, cfg: Config) -> dict[str, Any]:
    """Relaxation settings of an arm.

    Args:
        arm: a name from :data:`ABLATION_ARMS`.
        cfg: the run's configuration (penalty weights, ranks, projection default).

    Returns:
        ``schedule`` (θ schedule name, ``"learned"`` for the dual arms, None = not relaxed), ``lie``
        and ``norm`` (penalty weights), ``merge`` (projection), ``rank`` (of W, None = dense) and
        ``dual`` (None, ``"plain"`` or ``"resilient"``) and ``penalty_every`` (the penalty k-fold on
        every k-th step).

    Raises:
        ValueError: unknown arm.

    Example:
        >>> arm_spec("no_lie", Config())["lie"]
        0.0
        >>> arm_spec("drop", Config())["merge"], arm_spec("lowrank", Config())["rank"]
        (False, 4)
    """
    base: dict[str, Any] = dict(schedule="triangular", lie=cfg.lambda_lie, norm=cfg.lambda_norm, merge=cfg.merge,
                                rank=cfg.rank, dual=None, penalty_every=cfg.penalty_every)
    specs = {
        "standard": dict(base, schedule=None, lie=0.0, norm=0.0, rank=None),
        "relaxed": base,
        "no_lie": dict(base, lie=0.0),
        "constant": dict(base, schedule="constant"),
        "linear_decay": dict(base, schedule="linear_decay"),
        "no_norm": dict(base, norm=0.0),
        "dual": dict(base, schedule="learned", dual="plain"),
        "dual_resilient": dict(base, schedule="learned", dual="resilient"),
        "drop": dict(base, merge=False),
        "lowrank": dict(base, rank=cfg.lowrank_rank),
        "matched": dict(base, schedule="matched"),
        "recm": dict(base, schedule="learned", dual="recm"),
        "every4": dict(base, penalty_every=4),
    }
    if arm not in specs:
        raise ValueError(f"unknown arm {arm!r}; choose from {ALL_ARMS}")
    return specs[arm]


def arm_label(arm: str, cfg: Config) -> str:
    """Short description of an arm for the tables: θ, and what differs from ``relaxed``.

    Example:
        >>> arm_label("drop", Config())
        'triangular, drop'
    """
    spec = arm_spec(arm, cfg)
    if spec["schedule"] is None:
        return "–"
    policy = {"plain": "learned (dual)", "resilient": "learned (dual, resilient)", "recm": "learned (RECM)"}
    parts = [policy[spec["dual"]] if spec["dual"] else
             ("dual's mean θ (same seed)" if spec["schedule"] == "matched" else spec["schedule"])]
    if spec["lie"] != cfg.lambda_lie:
        parts.append(f"λ_LD={spec['lie']:g}")
    if spec["norm"] != cfg.lambda_norm:
        parts.append(f"λ_N={spec['norm']:g}")
    if spec["rank"] is not None:
        parts.append(f"rank {spec['rank']}")
    if spec["penalty_every"] != 1:
        parts.append(f"penalty every {spec['penalty_every']}")
    if not spec["merge"]:
        parts.append("drop")
    return ", ".join(parts)


# ------------------------------------------------------------------------------------------------
# data, model, metrics


def load_splits(cfg: Config, device: torch.device) -> dict[str, dict[str, torch.Tensor]]:
    """Train/valid/test tensors on ``device`` (simulated and cached on first use)."""
    from .data import load_nbody

    sizes = {"train": cfg.n_train, "valid": cfg.n_valid, "test": cfg.n_test}
    return {s: {k: v.to(device) for k, v in load_nbody(s, n=n, seed=cfg.data_seed, cache_dir=cfg.cache_dir).items()}
            for s, n in sizes.items()}


def build_model(cfg: Config, seed: int, device: torch.device) -> torch.nn.Module:
    """The configured model (``cfg.model``) with seed ``seed``'s initial weights."""
    torch.manual_seed(seed)
    if cfg.model == "egnn":
        from examples.egnn.model import EGNNSystems

        return EGNNSystems(hidden=cfg.egnn_hidden, layers=cfg.layers).to(device)
    if cfg.model != "segnn":
        raise ValueError(f"model must be 'segnn' or 'egnn', got {cfg.model!r}")
    from .model import SEGNN

    return SEGNN(cfg.hidden, layers=cfg.layers).to(device)


def adapters_of(cfg: Config) -> list[str]:
    """The adapter that relaxes the configured model.

    Example:
        >>> adapters_of(Config()), adapters_of(Config(model="egnn"))
        (['e3nn'], ['pyg'])
    """
    return ["pyg"] if cfg.model == "egnn" else ["e3nn"]


@torch.no_grad()
def evaluate(model: torch.nn.Module, split: dict[str, torch.Tensor], batch: int = 250) -> float:
    """MSE over particles and coordinates."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, split["loc"].shape[0], batch):
        sl = slice(i, i + batch)
        pred = model(split["loc"][sl], split["vel"][sl], split["charges"][sl])
        total += float((pred - split["target_loc"][sl]).square().sum())
        count += pred.numel()
    model.train()
    return total / count


@torch.no_grad()
def e3_equivariance_error(model: torch.nn.Module, split: dict[str, torch.Tensor], n_systems: int = 16,
                          n_transforms: int = 4, seed: int = 0, parity: bool = True) -> float:
    """max over random g = (Q ∈ O(3), t) of ||f(Qx + t, Qv, q) − (Q f(x, v, q) + t)|| / ||f(x, v, q)||,
    computed on a float64 copy of ``model`` (so rounding does not hide a small violation)."""
    from relax_e3nn import random_o3

    m = copy.deepcopy(model).double().eval()
    gen = torch.Generator().manual_seed(seed)
    loc, vel, q = (split[k][:n_systems].double() for k in ("loc", "vel", "charges"))
    ref = m(loc, vel, q)
    worst = 0.0
    for Q in random_o3(n_transforms, parity=parity, generator=gen).to(loc.device):
        t = torch.randn(3, dtype=torch.float64, generator=gen).to(loc.device)
        out = m(loc @ Q.T + t, vel @ Q.T, q)
        worst = max(worst, float((out - (ref @ Q.T + t)).norm() / ref.norm()))
    return worst


def random_rotation(gen: torch.Generator, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A Haar-random rotation (SO(3)) from ``gen``; the paper rotates every training batch."""
    q = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64)).Q
    q = q * torch.sign(torch.linalg.det(q))
    return q.to(dtype=dtype, device=device)


# ------------------------------------------------------------------------------------------------
# one training run


def _penalty_parts(model: torch.nn.Module) -> tuple[float, float]:
    """Σ_layers (mean squared Lie + inversion defect), Σ_layers mean ||W x||² of the last batch."""
    import relax_plugins as rp

    lie = norm = 0.0
    with torch.no_grad():
        for _, layer in rp.relaxed_modules(model):
            t = layer.penalty_terms()
            lie += float(t.lie) / max(t.samples, 1)
            norm += float(t.norm) / max(t.samples, 1)
    return lie, norm


def _theta_policy(model: torch.nn.Module, kind: str, cfg: Config) -> Any:
    """The learned-θ policy of an arm (built before the optimiser: its γ_i are parameters)."""
    import relax_plugins as rp

    if kind == "recm":
        # rate ≈ 6/steps: a layer whose relaxation stays unused decays to θ_max·e⁻⁶ by the end
        kwargs = {"theta_max": cfg.peak_theta, "rate": 6.0 / cfg.steps, "every": 10} | (cfg.recm or {})
        return rp.LearnedModulation(model, **kwargs)
    return rp.DualAscentTheta(model, init=cfg.dual_init, dual_lr=cfg.dual_lr, resilient=kind == "resilient",
                              slack_cost=cfg.slack_cost, slack_lr=cfg.slack_lr)


def matched_schedule(cfg: Config, seed: int) -> Any:
    """θ(step) replaying the mean γ trace of the same seed's finished ``dual`` run (linear between the
    recorded points, 0 after its last point and exactly 0 at the last step).

    Raises:
        FileNotFoundError: the dual run of this seed has not finished yet.
    """
    dual = json.loads(_run_path(Path(cfg.out), "dual", seed).read_text())
    trace = dual["theta_trace"]
    every = dual["theta_trace_every"]

    def theta(step: int) -> float:
        if step >= cfg.steps - 1:
            return 0.0
        k, frac = divmod(step, every)
        if k + 1 >= len(trace):
            return float(trace[-1]) if k < len(trace) else 0.0
        return float(trace[k] + (trace[k + 1] - trace[k]) * frac / every)

    return theta


def _run_config(config: dict[str, Any]) -> dict[str, Any]:
    """The part of a configuration that one run's numbers depend on (not which other runs exist, nor
    where they are written), with defaults for fields that older files lack."""
    skip = ("workers", "arms", "seeds", "timing_steps", "extra", "out", "cache_dir", "preset", "evidence")
    fields = Config.__dataclass_fields__
    return {k: config.get(k, f.default) for k, f in fields.items() if k not in skip}


def _ckpt_path(cfg: Config, arm: str, seed: int) -> Path:
    return Path(cfg.out) / "ckpt" / f"{arm}_seed{seed}.pt"


class RunFileError(ValueError):
    """A file of the output directory cannot be used (cut short, or from another configuration)."""


def _read_checkpoint(path: Path, device: Any = "cpu") -> dict[str, Any]:
    try:
        saved = torch.load(path, map_location=device, weights_only=False)  # our own file
        saved["state"]["step"]
    except Exception as exc:
        raise RunFileError(f"{path} cannot be read ({type(exc).__name__}: {exc}): it was cut short or is not a "
                           "checkpoint of this runner; delete it to start that run afresh") from None
    return saved


def _read_run(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RunFileError(f"{path} cannot be read ({type(exc).__name__}: {exc}); delete it to train that run "
                           "again") from None


def _write_atomic(text: str, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # a kill mid-write leaves no half-written file


def _checkpoint_step(cfg: Config, arm: str, seed: int) -> int:
    """The step an unfinished run resumes from (0 without a checkpoint)."""
    path = _ckpt_path(cfg, arm, seed)
    if cfg.checkpoint_every <= 0 or not path.exists():
        return 0
    return int(_read_checkpoint(path)["state"]["step"])


def _save_atomic(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a kill mid-write leaves the previous checkpoint intact


def train_one(cfg: Config, arm: str, seed: int, progress: Any = None) -> dict[str, Any]:
    """Train one (arm, seed) and return its metrics (see the module docstring).

    With ``cfg.checkpoint_every > 0`` the run saves its whole state (model, optimiser, lr schedule,
    θ policy, batch generator and data order, history, best checkpoint) every that many steps to
    ``OUT/ckpt/<arm>_seed<seed>.pt`` and, when started again, continues from it: the resumed run
    computes exactly what an uninterrupted one would.

    Args:
        cfg: the run's configuration.
        arm: a name from :data:`ALL_ARMS`.
        seed: initial weights; batches and rotations use their own generator seeded from it.
        progress: anything with ``put(n)`` (a queue), told about every optimiser step.

    Returns:
        A JSON-serialisable record: test MSE of the best projected checkpoint, its equivariance
        error, step times, the validation history, ``theta_trace`` (mean θ every
        ``cfg.theta_trace_every`` steps) and, for the learned-θ arms, ``dual`` (final per-layer
        λ_i, γ_i and slacks) and, for ``dual_resilient``, ``unprojected`` (test MSE and equivariance
        error of the final model before projection, θ > 0: only approximately equivariant).
    """
    import warnings

    import relax_plugins as rp

    torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    data = load_splits(cfg, device)
    spec = arm_spec(arm, cfg)
    model = build_model(cfg, seed, device)
    plain = build_model(cfg, seed, device)  # receives the projected weights for evaluation
    relaxed = spec["schedule"] is not None
    policy: Any = None
    sched: Any = None
    if relaxed:
        rp.relax(model, adapters=adapters_of(cfg), rank=spec["rank"], init_std=cfg.init_std)
        if spec["dual"]:
            policy = _theta_policy(model, spec["dual"], cfg)
        elif spec["schedule"] == "matched":
            sched = matched_schedule(cfg, seed)
        elif spec["schedule"] == "triangular":
            sched = rp.schedules.Triangular(total=cfg.steps, peak=cfg.peak_theta, peak_at=cfg.peak_at)
        else:
            sched = rp.schedules.as_schedule(spec["schedule"], total=cfg.steps, peak=cfg.peak_theta)
    params: Any = model.parameters()
    if relaxed and cfg.w_lr is not None:
        extra = {id(p) for p in rp.relaxation_parameters(model)}
        params = [{"params": [p for p in model.parameters() if id(p) not in extra]},
                  {"params": rp.relaxation_parameters(model), "lr": cfg.w_lr}]
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    n_trained = sum(p.numel() for p in model.parameters())
    if isinstance(cfg.penalty_every, bool) or not isinstance(cfg.penalty_every, int) or cfg.penalty_every < 1:
        raise ValueError(f"penalty_every must be an int >= 1, got {cfg.penalty_every!r}")
    if cfg.lr_schedule not in ("cosine", "none"):
        raise ValueError(f"lr_schedule must be 'cosine' or 'none', got {cfg.lr_schedule!r}")
    lr_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps) if cfg.lr_schedule == "cosine" \
        else None
    # batches and rotations come from their own generator: identical across arms for a seed
    gen = torch.Generator().manual_seed(10_000 + seed)
    n = data["train"]["loc"].shape[0]
    st: dict[str, Any] = {"step": 0, "order": torch.randperm(n, generator=gen), "pos": 0, "history": [],
                          "step_times": [], "theta_trace": [], "best": {"val": math.inf, "step": -1, "state": None}}
    ckpt = _ckpt_path(cfg, arm, seed)
    if cfg.checkpoint_every > 0 and ckpt.exists():
        saved = _read_checkpoint(ckpt, device)
        if _run_config(saved["config"]) != _run_config(asdict(cfg)):
            raise RunFileError(f"{ckpt} was written with another configuration; delete it to start afresh")
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        if lr_sched is not None:
            lr_sched.load_state_dict(saved["lr_sched"])
        if policy is not None:
            policy.load_state_dict(saved["policy"])
        gen.set_state(saved["gen"])
        torch.set_rng_state(saved["torch_rng"])
        st = saved["state"]
    tr = data["train"]
    history, best = st["history"], st["best"]

    def current_theta() -> float:
        if not relaxed:
            return 0.0
        return statistics.fmean(policy.gammas().values()) if policy is not None else theta

    def evaluate_checkpoint(step: int) -> None:
        state = rp.projected_state_dict(model, merge=spec["merge"]) if relaxed else model.state_dict()
        plain.load_state_dict(state)
        val = evaluate(plain, data["valid"])
        rec: dict[str, Any] = {"step": step, "theta": current_theta(), "val_mse": val}
        if relaxed:
            rec["lie_penalty"], rec["norm_penalty"] = _penalty_parts(model)
            rec["relaxed_equiv_error"] = e3_equivariance_error(model, data["valid"], n_systems=8, n_transforms=2)
        if isinstance(policy, rp.DualAscentTheta):
            rec["gammas"], rec["duals"] = policy.gammas(), policy.duals()
        elif policy is not None:
            rec["gammas"], rec["violations"] = policy.gammas(), policy.violations()
        history.append(rec)
        if val < best["val"]:
            best.update(val=val, step=step, state={k: v.detach().clone() for k, v in state.items()})

    def save_checkpoint() -> None:
        _save_atomic({"config": asdict(cfg), "model": model.state_dict(), "opt": opt.state_dict(),
                      "lr_sched": lr_sched.state_dict() if lr_sched is not None else None,
                      "policy": policy.state_dict() if policy is not None else None,
                      "gen": gen.get_state(), "torch_rng": torch.get_rng_state(), "state": st}, ckpt)

    theta = 0.0
    for step in range(st["step"], cfg.steps):
        if sched is not None:
            theta = sched(step)
            rp.set_theta(model, theta)
        if step % cfg.theta_trace_every == 0:
            st["theta_trace"].append(current_theta())
        if st["pos"] + cfg.batch > n:
            st["order"], st["pos"] = torch.randperm(n, generator=gen), 0
        idx = st["order"][st["pos"]:st["pos"] + cfg.batch].to(device)
        st["pos"] += cfg.batch
        loc, vel, q, tgt = tr["loc"][idx], tr["vel"][idx], tr["charges"][idx], tr["target_loc"][idx]
        if cfg.rotate:
            R = random_rotation(gen, loc.dtype, device)
            loc, vel, tgt = loc @ R.T, vel @ R.T, tgt @ R.T
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = (model(loc, vel, q) - tgt).square().mean()
        if relaxed and (spec["lie"] > 0 or spec["norm"] > 0) and step % spec["penalty_every"] == 0:
            # as RelaxedTraining(penalty_every=k): k-fold on steps 0, k, 2k, ... (by step, so a resumed run agrees)
            pen = rp.penalty(model, lie=spec["lie"], norm=spec["norm"], form=cfg.penalty_form)
            loss = loss + (pen if spec["penalty_every"] == 1 else spec["penalty_every"] * pen)
        if policy is not None:
            loss = loss + policy.penalty()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if policy is not None:
            policy.step()
        if lr_sched is not None:
            lr_sched.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        st["step_times"].append(time.perf_counter() - t0)
        st["step"] = step + 1
        if (step + 1) % cfg.eval_every == 0 or step == cfg.steps - 1:
            evaluate_checkpoint(step + 1)
        if cfg.checkpoint_every > 0 and (step + 1) % cfg.checkpoint_every == 0 and step < cfg.steps - 1:
            save_checkpoint()
        if progress is not None:
            progress.put(1)

    step_times = st["step_times"]
    final_val = history[-1]["val_mse"]
    plain.load_state_dict(best["state"])
    exported = plain
    extra: dict[str, Any] = {}
    if relaxed:
        if policy is not None:
            extra["dual"] = {"gammas": policy.gammas(), "duals": getattr(policy, "duals", dict)(),
                             "slacks": dict(getattr(policy, "slacks", {}))}
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                policy.finish()  # θ → fixed buffers: 0 (plain) or the learned γ (resilient)
            extra["dual"]["finish_warned"] = bool(caught)
            if spec["dual"] == "resilient":
                # the resilient model keeps θ > 0: score it as it is, before any projection
                extra["unprojected"] = {"test_mse": evaluate(model, data["test"]),
                                        "equivariance_error": e3_equivariance_error(model, data["test"]),
                                        "theta_mean": statistics.fmean(rp.get_theta(model).values())}
        # the exported model of the last step must be the original architecture
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*cannot hold.*")
            final_model = rp.project(model, merge=spec["merge"])
        assert type(final_model) is type(plain)
    return {
        "arm": arm,
        "seed": seed,
        "test_mse": evaluate(exported, data["test"]),
        "best_val_mse": best["val"],
        "best_step": best["step"],
        "final_val_mse": final_val,
        "equivariance_error": e3_equivariance_error(exported, data["test"]),
        "median_step_s": statistics.median(step_times[min(5, len(step_times) - 1):]),
        "n_params": sum(p.numel() for p in exported.parameters()),
        "n_params_trained": n_trained,
        "history": history,
        "theta_trace": st["theta_trace"],
        "theta_trace_every": cfg.theta_trace_every,
        **extra,
    }


def _worker(cfg: Config, arm: str, seed: int, queue: Any) -> dict[str, Any]:
    os.environ.setdefault("OMP_NUM_THREADS", str(cfg.threads))
    return train_one(cfg, arm, seed, queue)


# ------------------------------------------------------------------------------------------------
# step-time micro-benchmark


def step_time_ratio(cfg: Config, steps: int) -> dict[str, float]:
    """Median forward+backward+optimiser step of the standard and the relaxed model (penalty
    included), interleaved step by step in one process on the same batches."""
    import relax_plugins as rp

    torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    from .data import load_nbody

    tr = {k: v.to(device) for k, v in load_nbody("train", n=min(cfg.n_train, 500), seed=cfg.data_seed,
                                                  cache_dir=cfg.cache_dir).items()}
    std = build_model(cfg, 0, device)
    rel = rp.relax(copy.deepcopy(std), adapters=adapters_of(cfg), rank=cfg.rank)
    rp.set_theta(rel, 0.5)
    models = {"standard": std, "relaxed": rel}
    opts = {k: torch.optim.Adam(m.parameters(), lr=1e-4) for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    gen = torch.Generator().manual_seed(0)
    for i in range(steps + 3):
        idx = torch.randint(0, tr["loc"].shape[0], (cfg.batch,), generator=gen).to(device)
        for k, m in models.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            loss = (m(tr["loc"][idx], tr["vel"][idx], tr["charges"][idx]) - tr["target_loc"][idx]).square().mean()
            if k == "relaxed":
                loss = loss + rp.penalty(m, lie=cfg.lambda_lie, norm=cfg.lambda_norm, form=cfg.penalty_form)
            opts[k].zero_grad(set_to_none=True)
            loss.backward()
            opts[k].step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 3:  # warm-up steps excluded
                times[k].append(time.perf_counter() - t0)
    s, r = statistics.median(times["standard"]), statistics.median(times["relaxed"])
    return {"standard_s": s, "relaxed_s": r, "ratio": r / s, "steps": steps}


def inference_check(cfg: Config) -> dict[str, float]:
    """After ``project()`` the model is the original class with the original state_dict keys, and
    its outputs equal those of a fresh model loaded from the exported state_dict (float64)."""
    import relax_plugins as rp

    from .data import load_nbody

    device = torch.device(cfg.device)
    d = {k: v[:8].double().to(device) for k, v in load_nbody("valid", n=8, seed=cfg.data_seed,
                                                             cache_dir=cfg.cache_dir).items()}
    ref = build_model(cfg, 1, device).double()
    rel = rp.relax(copy.deepcopy(ref), adapters=adapters_of(cfg), init_std=1e-2)
    rp.set_theta(rel, 0.0)  # end of the schedule
    exported = rp.project(rel, merge=False)
    fresh = build_model(cfg, 2, device).double()
    fresh.load_state_dict(exported.state_dict())
    with torch.no_grad():
        a = ref(d["loc"], d["vel"], d["charges"])
        b = exported(d["loc"], d["vel"], d["charges"])
        c = fresh(d["loc"], d["vel"], d["charges"])
    return {
        "same_class": float(type(exported) is type(ref)),
        "same_keys": float(list(exported.state_dict()) == list(ref.state_dict())),
        "max_abs_diff_vs_original": float((a - b).abs().max()),
        "max_abs_diff_vs_reloaded": float((b - c).abs().max()),
    }


# ------------------------------------------------------------------------------------------------
# reporting


def _mean_dicts(ds: list[dict[str, float]]) -> dict[str, float]:
    """Key-wise mean of dicts with the same keys."""
    return {k: statistics.fmean(d[k] for d in ds) for k in ds[0]}


def summarise(runs: list[dict[str, Any]], arms: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Mean/std over seeds of each arm's metrics.

    Example:
        >>> s = summarise([{"arm": "a", "test_mse": 1.0, "equivariance_error": 0.0, "median_step_s": 1.0,
        ...                 "best_val_mse": 1.0, "history": []}], ("a",))
        >>> s["a"]["test_mse_mean"], s["a"]["n"]
        (1.0, 1)
    """
    out = {}
    for arm in arms:
        rs = [r for r in runs if r["arm"] == arm]
        if not rs:
            continue
        mse = [r["test_mse"] for r in rs]
        rec: dict[str, Any] = {
            "n": len(rs),
            "test_mse_mean": statistics.fmean(mse),
            "test_mse_std": statistics.stdev(mse) if len(mse) > 1 else 0.0,
            "best_val_mse_mean": statistics.fmean(r["best_val_mse"] for r in rs),
            "best_steps": [r.get("best_step") for r in rs],
            "equivariance_error_max": max(r["equivariance_error"] for r in rs),
            "median_step_s": statistics.median(r["median_step_s"] for r in rs),
        }
        if rs[0].get("n_params_trained") is not None:
            rec["n_params_trained"] = rs[0]["n_params_trained"]
        lies = [h.get("lie_penalty") for r in rs for h in r["history"] if "lie_penalty" in h]
        if lies:
            rec["lie_penalty_max"] = max(lies)
            rec["lie_penalty_final"] = statistics.fmean(r["history"][-1]["lie_penalty"] for r in rs)
            rec["norm_penalty_max"] = max(h["norm_penalty"] for r in rs for h in r["history"])
            rec["relaxed_equiv_error_max"] = max(h["relaxed_equiv_error"] for r in rs for h in r["history"])
        if all(r.get("dual", {}).get("duals") for r in rs):  # recm runs keep θ_i there, without duals
            rec["duals_mean"] = _mean_dicts([r["dual"]["duals"] for r in rs])
            rec["gammas_final_mean"] = _mean_dicts([r["dual"]["gammas"] for r in rs])
            rec["slacks_mean"] = _mean_dicts([r["dual"]["slacks"] for r in rs])
        if all("unprojected" in r for r in rs):
            u = [r["unprojected"]["test_mse"] for r in rs]
            rec["unprojected_test_mse_mean"] = statistics.fmean(u)
            rec["unprojected_test_mse_std"] = statistics.stdev(u) if len(u) > 1 else 0.0
            rec["unprojected_equivariance_error_max"] = max(r["unprojected"]["equivariance_error"] for r in rs)
            rec["unprojected_theta_mean"] = statistics.fmean(r["unprojected"]["theta_mean"] for r in rs)
        out[arm] = rec
    return out


def format_table(summary: dict[str, dict[str, Any]], cfg: Config, timing: dict[str, float] | None) -> str:
    """A plain-text comparison table (arms × metrics)."""
    # per-run step times are ratios only when the runs shared one load (an interleaved timing phase
    # measures that); resumed or paused runs across sessions are not comparable
    std_step = summary.get("standard", {}).get("median_step_s") if cfg.timing_steps else None
    head = (f"{'arm':<15} {'θ / variant':<30} {'test MSE (mean ± std)':<24} {'equiv. err':>10} "
            f"{'max relaxed err':>15} {'Lie pen max/final':>19} {'norm pen max':>12} {'step ms':>8} {'ratio':>6}")
    lines = [head, "-" * len(head)]
    for arm, s in summary.items():
        lie = f"{s['lie_penalty_max']:.2e}/{s['lie_penalty_final']:.1e}" if "lie_penalty_max" in s else "-"
        norm = f"{s['norm_penalty_max']:.2e}" if "norm_penalty_max" in s else "-"
        rerr = f"{s['relaxed_equiv_error_max']:.2e}" if "relaxed_equiv_error_max" in s else "-"
        ratio = f"{s['median_step_s'] / std_step:.2f}" if std_step else "-"
        lines.append(
            f"{arm:<15} {arm_label(arm, cfg):<30} {s['test_mse_mean']:.5f} ± {s['test_mse_std']:.5f} (n={s['n']}) "
            f"{s['equivariance_error_max']:>10.1e} {rerr:>15} {lie:>19} {norm:>12} "
            f"{1000 * s['median_step_s']:>8.1f} {ratio:>6}"
        )
    for arm, s in summary.items():
        if "unprojected_test_mse_mean" in s:
            lines.append(f"{arm} WITHOUT projection (θ mean {s['unprojected_theta_mean']:.3g} > 0, only approximately "
                         f"equivariant): test MSE {s['unprojected_test_mse_mean']:.5f} ± "
                         f"{s['unprojected_test_mse_std']:.5f}, equivariance error "
                         f"{s['unprojected_equivariance_error_max']:.1e}")
        if "duals_mean" in s:
            d = s["duals_mean"]
            top = sorted(d, key=d.get, reverse=True)[:3]
            lines.append(f"{arm} final duals λ_i (seed mean): min {min(d.values()):.2e}, max {max(d.values()):.2e}; "
                         f"largest: " + ", ".join(f"{k} {d[k]:.2e}" for k in top))
    if timing:
        lines.append(f"interleaved step time: standard {1000 * timing['standard_s']:.1f} ms, relaxed "
                     f"{1000 * timing['relaxed_s']:.1f} ms, ratio {timing['ratio']:.3f} ({timing['steps']} steps)")
    lines.append(f"λ_LD = {cfg.lambda_lie}, λ_N = {cfg.lambda_norm} (form {cfg.penalty_form!r}); θ per optimiser step, "
                 f"peak {cfg.peak_theta}, exactly 0 at step {cfg.steps}; projection merge={cfg.merge}; dual: "
                 f"init {cfg.dual_init}, dual_lr {cfg.dual_lr}, slack cost {cfg.slack_cost}, slack lr {cfg.slack_lr}")
    return "\n".join(lines)


def _git_commit() -> str:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def paired_to_standard(mse: dict[int, float], standard: dict[int, float]) -> tuple[float, int, int] | None:
    """Seed-paired comparison of an arm's test MSE (seed → MSE) with ``standard``'s: (mean MSE / mean
    standard MSE over the seeds both have, seeds on which the arm is better, seeds compared), or None
    when they share no seed.

    Example:
        >>> paired_to_standard({0: 0.5, 1: 3.0, 2: 9.0}, {0: 1.0, 1: 2.0})
        (1.1666666666666667, 1, 2)
        >>> paired_to_standard({2: 1.0}, {0: 1.0}) is None
        True
    """
    common = sorted(set(mse) & set(standard))
    if not common:
        return None
    ratio = statistics.fmean(mse[s] for s in common) / statistics.fmean(standard[s] for s in common)
    return ratio, sum(mse[s] < standard[s] for s in common), len(common)


def evidence_record(result: dict[str, Any], missing: list[str]) -> dict[str, Any]:
    """The evidence file of a comparison: the protocol, per-arm per-seed numbers of the projected models,
    and the recipe a user should take — the relaxation arm with the lowest mean *validation* MSE once
    every arm has at least 3 seeds and no run is ``missing`` (None before that; the choice is never
    made on the test set).

    Example:
        >>> runs = [{"arm": a, "seed": s, "test_mse": m, "best_val_mse": m, "best_step": 1,
        ...          "equivariance_error": 1e-16} for a, m in (("standard", 1.0), ("dual", 0.5)) for s in range(3)]
        >>> rec = evidence_record({"config": {"steps": 9}, "runs": runs}, missing=[])
        >>> rec["arms"]["dual"]["ratio_to_standard"], rec["arms"]["dual"]["seeds_better_than_standard"]
        (0.5, 3)
        >>> rec["default_recipe"], evidence_record({"config": {}, "runs": runs}, ["x/seed3"])["default_recipe"]
        ('dual', None)
    """
    cfg = result["config"]
    protocol = {k: cfg.get(k) for k in ("steps", "batch", "lr", "lr_schedule", "weight_decay", "hidden", "layers",
                                        "rotate", "eval_every", "lambda_lie", "lambda_norm", "penalty_form",
                                        "dual_init", "dual_lr", "recm", "device")}
    protocol |= {"train": cfg.get("n_train"), "valid": cfg.get("n_valid"), "test": cfg.get("n_test"),
                 "commit": _git_commit(), "selection": "best validation MSE of the projected model, tested"}
    arms: dict[str, Any] = {}
    by_arm: dict[str, list[dict[str, Any]]] = {}
    for r in sorted(result["runs"], key=lambda r: r["seed"]):
        by_arm.setdefault(r["arm"], []).append(r)
    std = {r["seed"]: r["test_mse"] for r in by_arm.get("standard", [])}
    for arm, rs in by_arm.items():
        mse = [r["test_mse"] for r in rs]
        rec: dict[str, Any] = {
            "seeds": [r["seed"] for r in rs], "test_mse": mse,
            "test_mse_mean": statistics.fmean(mse), "test_mse_std": statistics.stdev(mse) if len(mse) > 1 else 0.0,
            "best_val_mse": [r["best_val_mse"] for r in rs], "best_step": [r["best_step"] for r in rs],
            "equivariance_error": [r["equivariance_error"] for r in rs],
        }
        paired = paired_to_standard({r["seed"]: r["test_mse"] for r in rs}, std) if arm != "standard" else None
        if paired is not None:
            rec["ratio_to_standard"], rec["seeds_better_than_standard"], _ = paired
        arms[arm] = rec
    # chosen on validation MSE once every arm has its 3 seeds (an arm still running may yet win)
    complete = {a: rs for a, rs in by_arm.items() if len(rs) >= 3}
    candidates = [a for a in complete if a != "standard"]
    default = (min(candidates, key=lambda a: statistics.fmean(r["best_val_mse"] for r in complete[a]))
               if candidates and "standard" in complete and not missing else None)
    return {"protocol": protocol, "arms": arms, "default_recipe": default, "runs_remaining": missing}


def evidence_markdown(record: dict[str, Any]) -> str:
    """An evidence record (:func:`evidence_record`) as a Markdown table: every seed's test MSE of the
    best-validation projected model, mean ± std, the paired ratio to ``standard`` and the seeds it
    beat, the best step and the largest equivariance error; then what is missing or in progress.

    Example:
        >>> runs = [{"arm": a, "seed": s, "test_mse": m, "best_val_mse": m, "best_step": 1,
        ...          "equivariance_error": 1e-16} for a, m in (("standard", 1.0), ("dual", 0.5)) for s in range(3)]
        >>> md = evidence_markdown(evidence_record({"config": {"steps": 9}, "runs": runs}, missing=[]))
        >>> md.splitlines()[3]
        '| dual | 3 | 0.50000 · 0.50000 · 0.50000 | 0.50000 ± 0.00000 | 0.500 | 3 of 3 | 1 · 1 · 1 | 1.0e-16 |'
    """
    lines = ["| arm | seeds | test MSE per seed | mean ± std | × standard (paired) | seeds better than standard | "
             "best step | equivariance error (max) |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for arm, a in record["arms"].items():
        ratio = f"{a['ratio_to_standard']:.3f}" if "ratio_to_standard" in a else "–"
        better = (f"{a['seeds_better_than_standard']} of {len(a['seeds'])}"
                  if "seeds_better_than_standard" in a else "–")
        lines.append(f"| {arm} | {len(a['seeds'])} | {' · '.join(f'{m:.5f}' for m in a['test_mse'])} | "
                     f"{a['test_mse_mean']:.5f} ± {a['test_mse_std']:.5f} | {ratio} | {better} | "
                     f"{' · '.join(f'{b:,}' for b in a['best_step'])} | {max(a['equivariance_error']):.1e} |")
    lines.append("")
    lines.append(f"default recipe: {record['default_recipe'] or 'not chosen (every arm needs 3 seeds)'}")
    if record.get("runs_remaining"):
        lines.append(f"runs remaining: {', '.join(record['runs_remaining'])}")
    for run, st in record.get("runs_in_progress", {}).items():
        lines.append(f"in progress: {run} at step {st['step']:,} of {st['of']:,}")
    return "\n".join(lines)


def _config_of(result: dict[str, Any]) -> Config:
    return Config(**{k: v for k, v in result["config"].items() if k in Config.__dataclass_fields__ and k != "arms"})


def markdown_table(result: dict[str, Any]) -> str:
    """The summary of a ``results.json`` as a Markdown table (for docs/e3nn.md, docs/ablation.md).

    Example:
        >>> r = {"summary": {"standard": {"n": 1, "test_mse_mean": 0.01, "test_mse_std": 0.0,
        ...      "equivariance_error_max": 1e-16, "median_step_s": 0.05}}, "config": {}}
        >>> markdown_table(r).splitlines()[2].startswith("| standard")
        True
    """
    cfg = _config_of(result)
    summary = result["summary"]
    std_step = summary.get("standard", {}).get("median_step_s") if cfg.timing_steps else None  # see format_table
    lines = ["| arm | θ / variant | test MSE (mean ± std) | seeds | equivariance error (projected) | "
             "max equivariance error while relaxed | Lie penalty max / final | step time | vs standard |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for arm, s in summary.items():
        lie = (f"{s['lie_penalty_max']:.2e} / {s['lie_penalty_final']:.1e}" if "lie_penalty_max" in s else "–")
        rerr = f"{s['relaxed_equiv_error_max']:.1e}" if "relaxed_equiv_error_max" in s else "–"
        ratio = f"{s['median_step_s'] / std_step:.2f}×" if std_step else "–"
        lines.append(f"| {arm} | {arm_label(arm, cfg)} | {s['test_mse_mean']:.5f} ± "
                     f"{s['test_mse_std']:.5f} | {s['n']} | {s['equivariance_error_max']:.1e} | {rerr} | {lie} | "
                     f"{1000 * s['median_step_s']:.1f} ms | {ratio} |")
    return "\n".join(lines)


def markdown_duals(result: dict[str, Any]) -> str:
    """Per-layer final duals λ_i and γ_i (seed means) of the dual arms as a Markdown table.

    Example:
        >>> markdown_duals({"summary": {"standard": {}}})
        ''
    """
    arms = [a for a, s in result["summary"].items() if "duals_mean" in s]
    if not arms:
        return ""
    layers = list(result["summary"][arms[0]]["duals_mean"])
    head = "| layer | " + " | ".join(f"{a}: λ_i | {a}: γ_i (before finish)" for a in arms) + " |"
    lines = [head, "|" + " --- |" * (1 + 2 * len(arms))]
    for layer in layers:
        cells = []
        for a in arms:
            s = result["summary"][a]
            cells += [f"{s['duals_mean'][layer]:.2e}", f"{s['gammas_final_mean'][layer]:.3f}"]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(runs: list[dict[str, Any]], cfg: Config, path: Path) -> Path | None:
    """Validation MSE of the projected model per arm (seed mean), θ per arm (schedules; mean learned
    γ for the dual arms) and the final per-layer duals λ_i of the dual arms."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # matplotlib is an optional extra
        return None

    duals = [a for a in cfg.arms if any(r["arm"] == a and "dual" in r for r in runs)]
    ncol = 3 if duals else 2
    fig, axes = plt.subplots(1, ncol, figsize=(5.2 * ncol, 4.2))
    ax1, ax2 = axes[0], axes[1]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, arm in enumerate(cfg.arms):
        rs = [r for r in runs if r["arm"] == arm]
        if not rs:
            continue
        spec = arm_spec(arm, cfg)
        dashed = arm in ("no_lie", "no_norm", "drop")
        # drop/lowrank can coincide with relaxed/standard: thin broken lines on top of thick ones
        style = {"color": colours[k % len(colours)], "linewidth": 2.5 if arm in ("standard", "relaxed") else 1.5,
                 "linestyle": ":" if spec["dual"] else ("-." if arm == "lowrank" else ("--" if dashed else "-"))}
        steps = [h["step"] for h in rs[0]["history"]]
        vals = [statistics.fmean(r["history"][i]["val_mse"] for r in rs) for i in range(len(steps))]
        ax1.plot(steps, vals, label=arm, **style)
        if spec["schedule"] and arm not in ("drop", "lowrank", "no_norm", "no_lie") and "theta_trace" in rs[0]:
            every = rs[0]["theta_trace_every"]
            trace = [statistics.fmean(r["theta_trace"][i] for r in rs) for i in range(len(rs[0]["theta_trace"]))]
            label = f"{arm} (mean γ)" if spec["dual"] else arm
            ax2.plot([i * every for i in range(len(trace))], trace, label=label, **style)
    ax1.set_yscale("log")
    ax1.set_xlabel("optimiser step")
    ax1.set_ylabel("val. MSE, projected model (seed mean)")
    ax1.legend(fontsize=7)
    ax2.set_xlabel("optimiser step")
    ax2.set_ylabel("θ")
    ax2.legend(fontsize=7)
    if duals:
        ax3 = axes[2]
        width = 0.8 / len(duals)
        for j, arm in enumerate(duals):
            rs = [r for r in runs if r["arm"] == arm and "dual" in r]
            mean = _mean_dicts([r["dual"]["duals"] for r in rs])
            xs = [i + j * width for i in range(len(mean))]
            ax3.bar(xs, list(mean.values()), width=width, label=arm,
                    color=colours[cfg.arms.index(arm) % len(colours)])
        ax3.set_xticks([i + 0.4 - width / 2 for i in range(len(mean))])
        ax3.set_xticklabels([n.removesuffix(".tp") for n in mean], rotation=90, fontsize=6)
        ax3.set_ylabel("final dual λ_i (seed mean)")
        ax3.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------
# command line


def parse_args(argv: list[str] | None = None) -> Config:
    """The configuration from the command line (a preset, then explicit options).

    Example:
        >>> parse_args(["--ablation", "--seeds", "2"]).arms == ABLATION_ARMS
        True
    """
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the small `make demo` configuration")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="cpu (default), quick, paper (30,000 steps, resumable) or gpu")
    for name, typ in (("n-train", int), ("n-valid", int), ("n-test", int), ("steps", int), ("batch", int),
                      ("lr", float), ("hidden", str), ("layers", int), ("eval-every", int), ("seeds", int),
                      ("workers", int), ("lambda-lie", float), ("lambda-norm", float), ("peak-theta", float),
                      ("rank", int), ("threads", int), ("timing-steps", int), ("data-seed", int), ("cache-dir", str),
                      ("out", str), ("weight-decay", float), ("lowrank-rank", int), ("dual-init", float),
                      ("dual-lr", float), ("slack-cost", float), ("slack-lr", float),
                      ("checkpoint-every", int), ("theta-trace-every", int), ("peak-at", float),
                      ("init-std", float), ("w-lr", float), ("penalty-every", int),
                      ("evidence", str), ("egnn-hidden", int)):
        key = name.replace("-", "_")  # a count of zero or less trains nothing, or divides by it
        typ = positive_int if key in POSITIVE_ARGS else nonnegative_int if key in NONNEGATIVE_ARGS else typ
        p.add_argument(f"--{name}", type=typ, default=None)
    p.add_argument("--arms", default=None, help=f"comma-separated subset of {','.join(ALL_ARMS)}")
    p.add_argument("--ablation", action="store_true",
                   help=f"all arms ({','.join(ABLATION_ARMS)}); --arms still overrides")
    p.add_argument("--report-only", action="store_true",
                   help="no training: rebuild results.json/png from the per-run files in OUT/runs/")
    p.add_argument("--penalty-form", choices=["sqrt", "mean", "paper"], default=None)
    p.add_argument("--model", choices=["segnn", "egnn"], default=None,
                   help="segnn (default; e3nn) or egnn (torch-geometric, --egnn-hidden channels)")
    p.add_argument("--lr-schedule", choices=["cosine", "none"], default=None)
    p.add_argument("--device", default=None, help="cpu (default) or cuda")
    p.add_argument("--no-merge", action="store_true",
                   help="project by dropping W (default: merge θ·P(W) where the layer can hold it)")
    p.add_argument("--no-rotate", action="store_true", help="do not rotate training batches")
    a = p.parse_args(argv)
    preset = "quick" if a.quick else (a.preset or "cpu")
    values: dict[str, Any] = {**PRESETS[preset], "preset": preset}
    if a.ablation:
        values["arms"] = ABLATION_ARMS
    if a.report_only:
        values["extra"] = {"report_only": True}
    for k, v in vars(a).items():
        if v is not None and k in Config.__dataclass_fields__:
            values[k] = v
    if a.arms is not None:
        values["arms"] = tuple(s.strip() for s in a.arms.split(",") if s.strip())
        if not values["arms"]:
            p.error("--arms names no arm")
        for arm in values["arms"]:
            try:
                arm_spec(arm, Config())
            except ValueError as exc:
                p.error(str(exc))
    if values["batch"] > values["n_train"]:
        p.error(f"--batch {values['batch']} is larger than the training set (--n-train {values['n_train']})")
    if a.no_merge:
        values["merge"] = False
    if a.no_rotate:
        values["rotate"] = False
    return Config(**values)


#: count arguments that must be at least 1, and at least 0
POSITIVE_ARGS = ("n_train", "steps", "batch", "layers", "eval_every", "seeds", "workers", "rank", "threads",
                 "lowrank_rank", "theta_trace_every", "penalty_every", "egnn_hidden")
NONNEGATIVE_ARGS = ("n_valid", "n_test", "timing_steps", "checkpoint_every", "data_seed")


def _run_path(out: Path, arm: str, seed: int) -> Path:
    return out / "runs" / f"{arm}_seed{seed}.json"


def _ready(job: tuple[str, int], done: set[tuple[str, int]]) -> bool:
    """``matched`` replays the same seed's dual run: it waits for it."""
    arm, seed = job
    return arm != "matched" or ("dual", seed) in done


def _train_jobs(cfg: Config, todo: list[tuple[str, int]], keep: Any, done: set[tuple[str, int]]) -> None:
    """Run the (arm, seed) jobs on ``cfg.workers`` processes, each as soon as what it needs exists."""
    from tqdm import tqdm

    todo = list(todo)
    if any(a == "matched" and ("dual", s) not in done and ("dual", s) not in todo for a, s in todo):
        raise ValueError("the matched arm replays the dual arm of the same seed: include 'dual' in --arms")
    desc = f"nbody {cfg.preset}: {len(todo)} runs"
    resumed = sum(_checkpoint_step(cfg, *job) for job in todo)
    with tqdm(total=len(todo) * cfg.steps, initial=resumed, desc=desc, unit="step") as bar:
        if cfg.workers <= 1:
            class _Bar:
                def put(self, n: int) -> None:
                    bar.update(n)

            while todo:
                job = next(j for j in todo if _ready(j, done))
                todo.remove(job)
                keep(train_one(cfg, *job, _Bar()))
                done.add(job)
            return
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        # SIGTERM (a session's end, `kill`) must stop the workers too: unhandled, it killed this
        # process alone and the workers trained on, unsupervised, writing the checkpoints a restart reads
        main_thread = threading.current_thread() is threading.main_thread()  # signals are set there only
        previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if main_thread else None
        try:
            from multiprocessing.managers import SyncManager

            manager = SyncManager(ctx=ctx)
            manager.start(initializer=_die_with_parent)  # the queue's server process: it goes with us too
            with manager:
                queue = manager.Queue()
                pool = ProcessPoolExecutor(max_workers=cfg.workers, mp_context=ctx, initializer=_die_with_parent)
                try:
                    pending: dict[Any, tuple[str, int]] = {}
                    while todo or pending:
                        while len(pending) < cfg.workers and any(_ready(j, done) for j in todo):
                            job = next(j for j in todo if _ready(j, done))
                            todo.remove(job)
                            pending[pool.submit(_worker, cfg, *job, queue)] = job
                        while not queue.empty():
                            bar.update(queue.get())
                        for f in [f for f in pending if f.done()]:
                            keep(f.result())
                            done.add(pending.pop(f))
                        time.sleep(0.2)
                    while not queue.empty():
                        bar.update(queue.get())
                except BaseException:
                    _stop_pool(pool)
                    raise
                pool.shutdown()
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _stop_pool(pool: ProcessPoolExecutor) -> None:
    """Stop the workers now (their last checkpoints stay: a restart continues from them)."""
    processes = list(getattr(pool, "_processes", {}).values())  # the executor offers no kill
    for proc in processes:
        proc.terminate()
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in processes:
        proc.join(timeout=10)


def _die_with_parent() -> None:
    """Worker initialiser: on Linux, the kernel sends SIGTERM to the worker when the runner dies, even
    by SIGKILL (which no handler sees)."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train every (arm, seed), then write ``results.json``, ``results.png`` and print the table.

    Every finished run is also written to ``OUT/runs/<arm>_seed<seed>.json`` at once and is not run
    again when the command is repeated (delete the file to redo it); an interrupted run continues from
    its checkpoint (``checkpoint_every``). ``--report-only`` rebuilds the tables from the files.
    """
    cfg = parse_args(argv)
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    jobs = [(arm, seed) for seed in range(cfg.seeds) for arm in cfg.arms]
    runs: list[dict[str, Any]] = []

    run_config = _run_config(asdict(cfg))

    def keep(r: dict[str, Any]) -> None:
        record = {**r, "run_config": run_config}
        runs.append(record)  # as a resumed directory reads it back: results.json is the same either way
        _write_atomic(json.dumps(record, indent=1), _run_path(out, r["arm"], r["seed"]))

    done = {(a, s) for a, s in jobs if _run_path(out, a, s).exists()}
    for a, s in done:
        stored = _read_run(_run_path(out, a, s)).get("run_config", {})
        if _run_config(stored) != json.loads(json.dumps(run_config)):
            raise RunFileError(f"{_run_path(out, a, s)} was trained with another configuration: delete it or "
                               "choose another --out")
    if cfg.extra.get("report_only") or done:
        runs = [_read_run(_run_path(out, a, s)) for a, s in jobs if (a, s) in done]
    todo = [] if cfg.extra.get("report_only") else [j for j in jobs if j not in done]
    if cfg.extra.get("report_only"):
        missing = [f"{a}/{s}" for a, s in jobs if (a, s) not in done]
        if missing:
            sys.stdout.write(f"report only: missing runs {missing}\n")
        timing = None
    else:
        if done:
            sys.stdout.write(f"{len(done)} finished runs found in {out / 'runs'}; {len(todo)} to do\n")
        load_splits(cfg, torch.device("cpu"))  # simulate + cache once, before the workers start
        _train_jobs(cfg, todo, keep, done)
        timing = step_time_ratio(cfg, cfg.timing_steps) if cfg.timing_steps > 0 and "standard" in cfg.arms else None
    runs.sort(key=lambda r: (cfg.arms.index(r["arm"]), r["seed"]))
    inference = inference_check(cfg)
    summary = summarise(runs, cfg.arms)
    result = {
        "config": asdict(cfg),
        "summary": summary,
        "step_time_interleaved": timing,
        "inference_after_project": inference,
        "wall_time_s": time.perf_counter() - t_start,
        "runs": runs,
        "torch": torch.__version__,
    }
    (out / "results.json").write_text(json.dumps(result, indent=1))
    png = plot(runs, cfg, out / "results.png")
    if cfg.evidence:
        missing = [f"{a}/seed{s}" for a, s in jobs if (a, s) not in done]
        evidence = Path(cfg.evidence)
        evidence.parent.mkdir(parents=True, exist_ok=True)
        record = evidence_record(result, missing)
        steps = {(a, s): _checkpoint_step(cfg, a, s) for a, s in jobs if (a, s) not in done}  # one load per file
        record["runs_in_progress"] = {f"{a}/seed{s}": {"step": k, "of": cfg.steps} for (a, s), k in steps.items() if k}
        evidence.write_text(json.dumps(record, indent=1))
        evidence.with_suffix(".md").write_text(evidence_markdown(record) + "\n")
        if png:
            evidence.with_suffix(".png").write_bytes(png.read_bytes())
    table = format_table(summary, cfg, timing)
    sys.stdout.write(table + "\n")
    sys.stdout.write(f"inference after project(): {inference}\n")
    sys.stdout.write(f"wall time {result['wall_time_s']:.0f} s; wrote {out / 'results.json'}"
                     + (f" and {png}" if png else "") + "\n")
    return result


if __name__ == "__main__":
    try:
        main()
    except RunFileError as exc:  # the user's files, not a bug: one line, no traceback
        sys.exit(f"nbody run: {exc}")
