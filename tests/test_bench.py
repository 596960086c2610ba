"""Benchmarks, run with `make bench` (pytest -m slow); kept out of the default test run."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_overhead_benchmark_runs(tmp_path):
    from examples.bench import overhead

    results = overhead.main(["--steps", "3", "--out", str(tmp_path)])
    assert (tmp_path / "overhead.json").exists() and (tmp_path / "overhead.png").exists()
    for r in results:
        assert r["inference_identical_outputs"] and r["projected_classes_match"] and r["projected_keys_match"]
