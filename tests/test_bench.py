"""Benchmarks, run with `make bench` (pytest -m slow); kept out of the default test run."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_overhead_benchmark_runs(tmp_path):
    from examples.bench import overhead

    results = overhead.main(["--steps", "2", "--out", str(tmp_path)])
    assert all((tmp_path / f"overhead.{ext}").exists() for ext in ("json", "png", "md"))
    assert len(results) == 5  # SEGNN, EGNN, VN-PointNet, VN-DGCNN, C8 CNN
    for r in results:
        assert r["inference_identical_outputs"] and r["projected_classes_match"] and r["projected_keys_match"]
        assert {row["penalty_every"] for row in r["arms"].values()} == {0, 1, 4}
        assert all(row["step_ms"] > 0 and row["saved_bytes"] > 0 for row in r["arms"].values())


def test_floor_benchmark_runs(tmp_path):
    from examples.bench import floor

    result = floor.main(["--steps", "1", "--out", str(tmp_path)])
    assert all((tmp_path / f"floor.{ext}").exists() for ext in ("json", "md"))
    assert len(result["arms"]) == 7 and all(row["step_ms"] > 0 for row in result["arms"].values())
