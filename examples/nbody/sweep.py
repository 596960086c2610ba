"""Sensitivity of relaxed training on N-body to its settings (issue 15, item 3), one factor at a time.

Every point is a full :mod:`examples.nbody.run` comparison (same data, seeds, batches and rotations)
written to its own folder, so the sweep resumes where it stopped (finished runs are kept, a running
one continues from its checkpoint) and ``--report-only`` rebuilds the table and figure::

    python -m examples.nbody.sweep                  # every point, 3 seeds, 2 points side by side
    python -m examples.nbody.sweep --points peak_theta=0.1,n_train=300
    python -m examples.nbody.sweep --report-only    # docs/evidence/nbody_sweep.{json,png,md}

``--workers k`` trains k points at once, each in its own process on one thread, its runs one after the
other (largest points first): a point of one arm has 3 runs, which 2 workers inside it would leave
half idle at the end.

The base is the ``cpu`` preset (16x0e + 8x1o, 4 layers, Adam 3e-3 with cosine decay) at ``--steps``
steps (1000, the short end of the issue's 1000–3000); each point changes one setting of the ``relaxed``
arm (triangular θ):
θ peak, λ_LD, λ_N, where the peak sits, W's initial scale, W's own learning rate and how often the
penalty is computed (``penalty_every = k``: k-fold on every k-th step, the cheap option). The data-size
axis trains ``standard``, ``relaxed`` and ``dual`` on 300 / 1000 / 3000 trajectories.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from .run import main as run_main
from .run import paired_to_standard

# factor → values; the first value of each list that equals the base setting is the shared baseline
AXES: dict[str, list[Any]] = {
    "peak_theta": [0.1, 0.3, 1.0],
    "lambda_lie": [1e-3, 1e-2, 1e-1],
    "lambda_norm": [1e-3, 1e-2, 1e-1],
    "peak_at": [0.1, 0.25, 0.5],
    "init_std": [0.0, 1e-3, 1e-2],
    "w_lr": [3e-4, 3e-3, 1e-2],
    "n_train": [300, 1000, 3000],
    "penalty_every": [1, 4, 8],
}
BASE = {"peak_theta": 1.0, "lambda_lie": 1e-2, "lambda_norm": 1e-2, "peak_at": 0.5, "init_std": 0.0, "w_lr": 3e-3,
        "n_train": 3000, "penalty_every": 1}
OUT = Path("docs/evidence/nbody_sweep")


def points() -> dict[str, tuple[dict[str, Any], str]]:
    """Point name → (settings that differ from the base, arms). The base point is ``base``.

    Example:
        >>> p = points()
        >>> p["base"], p["peak_theta=0.1"]
        (({}, 'standard,relaxed,dual'), ({'peak_theta': 0.1}, 'relaxed'))
        >>> len(p)
        17
    """
    out: dict[str, tuple[dict[str, Any], str]] = {"base": ({}, "standard,relaxed,dual")}
    for axis, values in AXES.items():
        for v in values:
            if v != BASE[axis]:
                out[f"{axis}={v:g}"] = ({axis: v}, "standard,relaxed,dual" if axis == "n_train" else "relaxed")
    return out


def _argv(name: str, settings: dict[str, Any], arms: str, a: argparse.Namespace, workers: int = 1) -> list[str]:
    argv = ["--preset", "cpu", "--steps", str(a.steps), "--seeds", str(a.seeds), "--workers", str(workers),
            "--arms", arms, "--timing-steps", "0", "--checkpoint-every", "250", "--out", str(a.out / name)]
    argv += shlex.split(a.run_args)
    for k, v in settings.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return argv


def load_point(folder: Path, steps: int) -> list[dict[str, Any]]:
    """The finished runs of one point (``folder/runs/*.json``) trained for ``steps`` steps; runs of
    another length are left out (they belong to another sweep).

    Example:
        >>> import tempfile
        >>> load_point(Path(tempfile.mkdtemp()), 1000)
        []
    """
    runs = [json.loads(path.read_text()) for path in sorted((folder / "runs").glob("*.json"))]
    return [r for r in runs if r.get("run_config", {}).get("steps") == steps]


def report(results: dict[str, list[dict[str, Any]]], out: Path, seeds: int = 3, steps: int | None = None) -> str:
    """The sweep as a Markdown table, written with ``nbody_sweep.json`` / ``.md`` / ``.png`` beside ``out``.

    ``results`` maps a point to its finished runs (:func:`load_point`); ``steps`` is recorded in the JSON.
    Every row is one (point, arm): test MSE of the best-validation projected model per seed, mean ±
    std, the paired ratio to ``standard`` trained on the same data size (the ``base`` point, or the
    point itself on the data-size axis) over the seeds both have, the seeds on which the arm is
    better, and the largest equivariance error; then the points and runs still missing.

    Example:
        >>> import tempfile
        >>> run = lambda arm, s, m: {"arm": arm, "seed": s, "test_mse": m, "equivariance_error": 1e-16}
        >>> base = [run("standard", 0, 1.0), run("relaxed", 0, 0.5)]
        >>> md = report({"base": base}, Path(tempfile.mkdtemp()) / "sweep", seeds=1)
        >>> md.splitlines()[3]
        '| base | relaxed | 1 | 0.50000 | 0.50000 ± 0.00000 | 0.500 | 1 of 1 | 1.0e-16 |'
    """
    rows = ["| point | arm | seeds | test MSE per seed | mean ± std | × standard (paired) | seeds better | "
            "equivariance error (max) |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    record: dict[str, Any] = {"steps": steps, "points": {}, "missing": []}
    for name, (settings, arms) in points().items():
        if name not in results:
            record["missing"].append(name)
            continue
        ref = {r["seed"]: r["test_mse"] for r in results.get(name if "n_train" in settings else "base", [])
               if r["arm"] == "standard"}
        for arm in arms.split(","):
            rs = sorted((r for r in results[name] if r["arm"] == arm), key=lambda r: r["seed"])
            if len(rs) < seeds:
                record["missing"] += [f"{name}/{arm}/seed{s}" for s in range(seeds)
                                      if s not in {r["seed"] for r in rs}]
            if not rs:
                continue
            mse = [r["test_mse"] for r in rs]
            std = statistics.stdev(mse) if len(mse) > 1 else 0.0
            eq = max(r["equivariance_error"] for r in rs)
            paired = paired_to_standard({r["seed"]: r["test_mse"] for r in rs}, ref) if arm != "standard" else None
            ratio, better, compared = paired or (float("nan"), 0, 0)
            rows.append(f"| {name} | {arm} | {len(rs)} | {' · '.join(f'{m:.5f}' for m in mse)} | "
                        f"{statistics.fmean(mse):.5f} ± {std:.5f} | "
                        + ("– | – |" if arm == "standard" else f"{ratio:.3f} | {better} of {compared} |")
                        + f" {eq:.1e} |")
            record["points"].setdefault(name, {})[arm] = {
                "settings": settings, "seeds": [r["seed"] for r in rs], "test_mse": mse,
                "ratio_to_standard": ratio, "seeds_better_than_standard": better, "equivariance_error_max": eq}
    if record["missing"]:
        rows += ["", f"missing: {', '.join(record['missing'])}"]
    table = "\n".join(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    (out.parent / "nbody_sweep.json").write_text(json.dumps(record, indent=1))
    (out.parent / "nbody_sweep.md").write_text(table + "\n")
    _plot(record["points"], out.parent / "nbody_sweep.png")
    return table


def _plot(record: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, len(AXES), figsize=(3.0 * len(AXES), 3.2), sharey=True)
    for ax, (axis, values) in zip(axes, AXES.items()):
        for arm in ("relaxed", "dual"):
            xs, ys = [], []
            for v in values:
                name = "base" if v == BASE[axis] else f"{axis}={v:g}"
                r = record.get(name, {}).get(arm)
                if r and r["ratio_to_standard"] == r["ratio_to_standard"]:
                    xs.append(v)
                    ys.append(r["ratio_to_standard"])
            if xs:
                ax.plot(xs, ys, marker="o", label=arm)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        if axis == "peak_at":
            ax.set_xscale("linear")
        elif min(values) > 0:
            ax.set_xscale("log")
        else:  # W's initial scale starts at 0
            ax.set_xscale("symlog", linthresh=min(v for v in values if v > 0))
        ax.set_xlabel(axis)
    axes[0].set_ylabel("test MSE / standard (seed means)")
    labelled = next((hl for hl in (ax.get_legend_handles_labels() for ax in axes) if hl[0]), None)
    if labelled is not None:
        axes[0].legend(*labelled, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--points", default=None, help="comma-separated point names (default: all)")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--run-args", default="", help="more options of examples.nbody.run for every point, e.g. "
                   "'--n-valid 100 --cache-dir /tmp/c' (a different value starts a different sweep)")
    p.add_argument("--report-only", action="store_true")
    a = p.parse_args(argv)
    if a.workers < 1:
        p.error("--workers must be >= 1")
    chosen = points()
    if a.points:
        names = [n.strip() for n in a.points.split(",") if n.strip()]
        unknown = sorted(set(names) - set(chosen))
        if unknown:
            p.error(f"unknown points {unknown}; choose from {sorted(chosen)}")
        chosen = {n: chosen[n] for n in names}
    if not a.report_only:
        if a.workers == 1 or len(chosen) == 1:
            for name, (settings, arms) in chosen.items():
                run_main(_argv(name, settings, arms, a, workers=a.workers))
        else:
            import multiprocessing as mp

            # largest points first, so that the last ones to finish are short
            order = sorted(chosen, key=lambda n: -len(chosen[n][1].split(",")))
            with ProcessPoolExecutor(max_workers=a.workers, mp_context=mp.get_context("spawn")) as pool:
                futures = [pool.submit(run_main, _argv(n, *chosen[n], a)) for n in order]
                for f in as_completed(futures):
                    f.result()
    # the table reads every point's finished runs (also those of earlier, partial invocations)
    results = {name: runs for name in points() if (runs := load_point(a.out / name, a.steps))}
    table = report(results, a.out, a.seeds, a.steps) if results else "no finished point yet"
    sys.stdout.write(table + "\n")
    return table


if __name__ == "__main__":
    main()
