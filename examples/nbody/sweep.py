"""Sensitivity of relaxed training on N-body to its settings (issue 15, item 3), one factor at a time.

Every point is a full :mod:`examples.nbody.run` comparison (same data, seeds, batches and rotations)
written to its own folder, so the sweep resumes where it stopped (finished runs are kept, a running
one continues from its checkpoint) and ``--report-only`` rebuilds the table and figure::

    python -m examples.nbody.sweep                  # every point, 3 seeds, 2 runs side by side
    python -m examples.nbody.sweep --points peak_theta=0.1,n_train=300
    python -m examples.nbody.sweep --report-only    # docs/evidence/nbody_sweep.{json,png,md}

The base is the ``cpu`` preset (16x0e + 8x1o, 4 layers, Adam 3e-3 with cosine decay) at ``--steps``
steps (1000, the short end of the issue's 1000–3000); each point changes one setting of the ``relaxed``
arm (triangular θ):
θ peak, λ_LD, λ_N, where the peak sits, W's initial scale and W's own learning rate. The data-size
axis trains ``standard``, ``relaxed`` and ``dual`` on 300 / 1000 / 3000 trajectories.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .run import main as run_main

# factor → values; the first value of each list that equals the base setting is the shared baseline
AXES: dict[str, list[Any]] = {
    "peak_theta": [0.1, 0.3, 1.0],
    "lambda_lie": [1e-3, 1e-2, 1e-1],
    "lambda_norm": [1e-3, 1e-2, 1e-1],
    "peak_at": [0.1, 0.25, 0.5],
    "init_std": [0.0, 1e-3, 1e-2],
    "w_lr": [3e-4, 3e-3, 1e-2],
    "n_train": [300, 1000, 3000],
}
BASE = {"peak_theta": 1.0, "lambda_lie": 1e-2, "lambda_norm": 1e-2, "peak_at": 0.5, "init_std": 0.0, "w_lr": 3e-3,
        "n_train": 3000}
OUT = Path("docs/evidence/nbody_sweep")


def points() -> dict[str, tuple[dict[str, Any], str]]:
    """Point name → (settings that differ from the base, arms). The base point is ``base``.

    Example:
        >>> p = points()
        >>> p["base"], p["peak_theta=0.1"]
        (({}, 'standard,relaxed,dual'), ({'peak_theta': 0.1}, 'relaxed'))
        >>> len(p)
        15
    """
    out: dict[str, tuple[dict[str, Any], str]] = {"base": ({}, "standard,relaxed,dual")}
    for axis, values in AXES.items():
        for v in values:
            if v != BASE[axis]:
                out[f"{axis}={v:g}"] = ({axis: v}, "standard,relaxed,dual" if axis == "n_train" else "relaxed")
    return out


def _argv(name: str, settings: dict[str, Any], arms: str, a: argparse.Namespace) -> list[str]:
    argv = ["--preset", "cpu", "--steps", str(a.steps), "--seeds", str(a.seeds), "--workers", str(a.workers),
            "--arms", arms, "--timing-steps", "0", "--checkpoint-every", "250", "--out", str(a.out / name)]
    for k, v in settings.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return argv + (["--report-only"] if a.report_only else [])


def report(results: dict[str, dict[str, Any]], out: Path) -> str:
    """The sweep as a Markdown table (test MSE of the projected model, relative to ``standard`` of the
    same data size) and ``nbody_sweep.json`` / ``.png`` beside ``out``."""
    rows = ["| point | arm | seeds | test MSE (mean ± std) | vs standard | equivariance error |",
            "| --- | --- | --- | --- | --- | --- |"]
    record: dict[str, Any] = {}
    for name, result in results.items():
        settings = points()[name][0]
        ref_name = name if "n_train" in settings else "base"
        ref = results.get(ref_name, {}).get("summary", {}).get("standard")
        for arm, s in result["summary"].items():
            mse = [r["test_mse"] for r in result["runs"] if r["arm"] == arm]
            ratio = s["test_mse_mean"] / ref["test_mse_mean"] if ref else float("nan")
            rows.append(f"| {name} | {arm} | {s['n']} | {s['test_mse_mean']:.5f} ± {s['test_mse_std']:.5f} | "
                        f"{ratio:.3f} | {s['equivariance_error_max']:.1e} |")
            record.setdefault(name, {})[arm] = {"settings": settings, "test_mse": mse, "ratio_to_standard": ratio,
                                                "equivariance_error_max": s["equivariance_error_max"]}
    (out.parent / "nbody_sweep.json").write_text(json.dumps(record, indent=1))
    _plot(record, out.parent / "nbody_sweep.png")
    return "\n".join(rows)


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
        ax.set_xscale("log" if axis != "peak_at" else "linear")
        ax.set_xlabel(axis)
    axes[0].set_ylabel("test MSE / standard (seed means)")
    axes[0].legend(fontsize=7)
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
    p.add_argument("--report-only", action="store_true")
    a = p.parse_args(argv)
    chosen = points()
    if a.points:
        names = [n.strip() for n in a.points.split(",") if n.strip()]
        unknown = sorted(set(names) - set(chosen))
        if unknown:
            p.error(f"unknown points {unknown}; choose from {sorted(chosen)}")
        chosen = {n: chosen[n] for n in names}
    results = {}
    for name, (settings, arms) in chosen.items():
        if a.report_only and not (a.out / name / "runs").exists():
            continue
        results[name] = run_main(_argv(name, settings, arms, a))
    table = report(results, a.out) if results else "no finished point yet"
    sys.stdout.write(table + "\n")
    return table


if __name__ == "__main__":
    main()
