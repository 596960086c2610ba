"""The N-body sensitivity sweep (examples/nbody/sweep.py): its points, its paired report, resuming
from the files, and a tiny end-to-end sweep on two worker processes."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("e3nn")

from examples.nbody import sweep  # noqa: E402


def _run(arm: str, seed: int, mse: float, steps: int = 1000) -> dict:
    return {"arm": arm, "seed": seed, "test_mse": mse, "equivariance_error": 1e-16,
            "run_config": {"steps": steps}}


def test_every_point_changes_one_setting_of_the_base():
    pts = sweep.points()
    assert pts["base"] == ({}, "standard,relaxed,dual")
    for name, (settings, arms) in pts.items():
        if name == "base":
            continue
        ((axis, value),) = settings.items()
        assert value != sweep.BASE[axis] and value in sweep.AXES[axis]
        assert name == f"{axis}={value:g}"
        # only the data-size axis needs its own standard (and dual) runs
        assert arms == ("standard,relaxed,dual" if axis == "n_train" else "relaxed")
    assert len(pts) == 1 + sum(len(v) - 1 for v in sweep.AXES.values())


def test_report_pairs_seeds_with_the_standard_of_the_same_data_size(tmp_path):
    results = {
        "base": [_run("standard", s, m) for s, m in enumerate((1.0, 2.0, 3.0))]
        + [_run("relaxed", s, m) for s, m in enumerate((0.5, 2.5, 1.5))],
        # seed 2 missing: the ratio is over seeds 0 and 1 only, against base's standard
        "peak_theta=0.1": [_run("relaxed", 0, 2.0), _run("relaxed", 1, 1.0)],
        # the data-size axis is compared with its own standard
        "n_train=300": [_run("standard", 0, 10.0), _run("relaxed", 0, 5.0), _run("dual", 0, 20.0)],
    }
    table = sweep.report(results, tmp_path / "sweep", seeds=3)
    record = json.loads((tmp_path / "nbody_sweep.json").read_text())
    assert (tmp_path / "nbody_sweep.md").read_text() == table + "\n"
    base = record["points"]["base"]["relaxed"]
    assert base["ratio_to_standard"] == pytest.approx(4.5 / 6.0)
    assert base["seeds_better_than_standard"] == 2
    low = record["points"]["peak_theta=0.1"]["relaxed"]
    assert low["ratio_to_standard"] == pytest.approx(3.0 / 3.0) and low["seeds_better_than_standard"] == 1
    assert record["points"]["n_train=300"]["relaxed"]["ratio_to_standard"] == pytest.approx(0.5)
    assert record["points"]["n_train=300"]["dual"]["seeds_better_than_standard"] == 0
    assert math.isnan(record["points"]["base"]["standard"]["ratio_to_standard"])
    missing = set(record["missing"])
    assert "peak_theta=0.1/relaxed/seed2" in missing and "n_train=300/dual/seed1" in missing
    assert "lambda_lie=0.001" in missing and "base/relaxed/seed0" not in missing
    assert "| peak_theta=0.1 | relaxed | 2 | 2.00000 · 1.00000 | 1.50000 ± 0.70711 | 1.000 | 1 of 2 |" in table


def test_load_point_keeps_only_runs_of_the_sweep_length(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "relaxed_seed0.json").write_text(json.dumps(_run("relaxed", 0, 1.0, steps=1000)))
    (tmp_path / "runs" / "relaxed_seed1.json").write_text(json.dumps(_run("relaxed", 1, 1.0, steps=2000)))
    assert [r["seed"] for r in sweep.load_point(tmp_path, 1000)] == [0]
    assert [r["seed"] for r in sweep.load_point(tmp_path, 2000)] == [1]


def test_unknown_point_and_bad_workers_are_refused(tmp_path):
    with pytest.raises(SystemExit):
        sweep.main(["--points", "peak_theta=7", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        sweep.main(["--workers", "0", "--out", str(tmp_path)])


def test_tiny_sweep_on_two_workers_then_report_only(tmp_path):
    tiny = (f"--n-train 40 --n-valid 8 --n-test 8 --batch 10 --hidden 2x0e+1x1o --layers 1 --eval-every 2 "
            f"--cache-dir {tmp_path / 'cache'}")
    # two one-run points, one per worker process
    args = ["--steps", "2", "--seeds", "1", "--workers", "2", "--out", str(tmp_path / "sweep"), "--run-args", tiny]
    table = sweep.main(args + ["--points", "peak_theta=0.1,peak_theta=0.3"])
    record = json.loads((tmp_path / "nbody_sweep.json").read_text())
    assert (tmp_path / "nbody_sweep.md").read_text() == table + "\n"
    assert set(record["points"]) == {"peak_theta=0.1", "peak_theta=0.3"} and record["steps"] == 2
    for name in record["points"]:
        run = json.loads((tmp_path / "sweep" / name / "runs" / "relaxed_seed0.json").read_text())
        assert run["run_config"]["peak_theta"] == float(name.split("=")[1]) and run["run_config"]["n_train"] == 40
        assert record["points"][name]["relaxed"]["equivariance_error_max"] < 1e-5
        # compared with base's standard, which has not run: no ratio yet, and base is listed as missing
        assert math.isnan(record["points"][name]["relaxed"]["ratio_to_standard"])
    assert "base" in record["missing"]
    # nothing trains again: the table is rebuilt from the files
    assert sweep.main(args + ["--report-only"]) == table
