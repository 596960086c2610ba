"""Tests of the rotated point-cloud benchmark: data generator, VN models, and a smoke run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import relax_plugins as rp
from examples.pointcloud import data as D
from examples.pointcloud.models import VNDGCNN, VNPointNet, build_model


def test_dataset_is_seeded_balanced_and_split_disjoint():
    a = D.make_dataset((2, 1, 1), seed=3, n_points=64)
    b = D.make_dataset((2, 1, 1), seed=3, n_points=64)
    c = D.make_dataset((2, 1, 1), seed=4, n_points=64)
    assert len(D.CLASSES) >= 10
    for s in ("train", "val", "test"):
        assert torch.equal(a[s][0], b[s][0]) and torch.equal(a[s][1], b[s][1])
        assert not torch.equal(a[s][0], c[s][0])
    assert a["train"][0].shape == (2 * len(D.CLASSES), 3, 64)
    assert torch.equal(a["train"][1].bincount(), torch.full((len(D.CLASSES),), 2))
    assert not torch.equal(a["val"][0], a["test"][0])
    # the first sample does not depend on how many are requested
    assert torch.equal(D.make_split("train", 1, seed=3, n_points=64)[0], a["train"][0][: len(D.CLASSES)])


@pytest.mark.parametrize("name", list(D.CLASSES))
def test_samples_centred_normalised_and_rotation_invariant_statistics(name):
    p = D.sample_shape(name, np.random.default_rng(0), n_points=300, noise=0.0)
    assert p.shape == (300, 3)
    assert np.abs(p.mean(0)).max() < 1e-12
    assert np.isclose(np.linalg.norm(p, axis=1).max(), 1.0)
    x, _ = D.make_split("test", 1, seed=0, n_points=300)
    # a proper rotation keeps norms: the rotated cloud has the same radii as some unrotated sample
    assert torch.allclose(x.norm(dim=1).max(dim=1).values, torch.ones(len(D.CLASSES)), atol=0.1)


def test_sampling_is_uniform_by_area():
    rng = np.random.default_rng(1)
    p = D.box(1, 2, 3)(rng, 60000)  # faces at x = ±0.5 (area 6), y = ±1 (area 3), z = ±1.5 (area 2)
    on = [np.isclose(np.abs(p[:, i]), h).mean() for i, h in enumerate((0.5, 1.0, 1.5))]
    assert np.allclose(on, np.array([12, 6, 4]) / 22, atol=0.01)
    q = D.cylinder(0.5, 2.0)(rng, 60000)  # side 2π·0.5·2 = 2π, caps 2·π/4
    assert abs(np.isclose(np.abs(q[:, 2]), 1.0).mean() - (np.pi / 2) / (2 * np.pi + np.pi / 2)) < 0.01
    t = D.torus(1.0, 0.5)(rng, 60000)  # outer half (ρ > R) holds (π R + 2 r)/(2 π R) of the area
    rho = np.hypot(t[:, 0], t[:, 1])
    assert abs((rho > 1.0).mean() - (np.pi + 1.0) / (2 * np.pi)) < 0.01


def test_rotations_are_haar_proper_and_z_mode():
    rng = np.random.default_rng(2)
    Rs = np.stack([D.random_rotation(rng) for _ in range(2000)])
    assert np.allclose(Rs @ Rs.transpose(0, 2, 1), np.eye(3), atol=1e-12)
    assert np.allclose(np.linalg.det(Rs), 1.0)
    assert np.abs(Rs.mean(0)).max() < 0.05  # Haar: E[R] = 0
    Rz = D.random_rotation(rng, z_only=True)
    assert np.allclose(Rz @ np.array([0, 0, 1.0]), [0, 0, 1.0])
    xz, _ = D.make_split("train", 1, seed=0, n_points=50, rotation="z")
    xs, _ = D.make_split("train", 1, seed=0, n_points=50, rotation="so3")
    # z mode rotates about z only: the z coordinates of the centred shape survive
    raw = D.sample_shape(list(D.CLASSES)[1], np.random.default_rng([0, 0, 1]), 50)
    assert np.allclose(xz[1, 2].numpy(), raw[:, 2], atol=1e-5)
    assert not np.allclose(xs[1, 2].numpy(), raw[:, 2], atol=1e-3)


@pytest.mark.parametrize("cls", [VNPointNet, VNDGCNN])
def test_models_invariant_and_relaxed_projected_back(cls):
    torch.manual_seed(0)
    widths = (4, 4, 8, 8) if cls is VNPointNet else (4, 4, 8)
    model = cls(5, k=4, widths=widths).double().eval()
    x = torch.randn(3, 3, 32, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))
    q = q * torch.sign(torch.det(q))
    out = model(x)
    assert (model(q @ x) - out).norm() / out.norm() < 1e-10
    relaxed = rp.relax(model, init_std=0.3)
    rp.set_theta(relaxed, 1.0)
    r = relaxed(x)
    assert (relaxed(q @ x) - r).norm() / r.norm() > 1e-3
    back = rp.project(relaxed, merge=True)
    assert type(back) is cls
    y = back(x)
    assert (back(q @ x) - y).norm() / y.norm() < 1e-10
    with pytest.raises(ValueError):
        build_model("resnet", 3)


def test_quick_benchmark_run_writes_results(tmp_path):
    from examples.pointcloud import run

    result = run.main(["--quick", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "pointcloud_pointnet_quick.json").read_text())
    assert (tmp_path / "pointcloud_pointnet_quick.png").stat().st_size > 0
    assert set(data["summary"]) == set(run.DEFAULT_ARMS)
    for arm, s in result["summary"].items():
        assert s["equiv_err_max"] < 1e-10, arm  # every selected model is the projected one
        assert 0.0 <= s["test_acc"][0] <= 1.0
    runs = {r["arm"]: r for r in result["runs"]}
    assert runs["relaxed"]["relaxed_mid_equiv_err"] > 1e-6  # θ > 0 mid-run: not equivariant
    assert runs["relaxed"]["n_params_exported"] == runs["standard"]["n_params_exported"]
    assert result["timing"]["relaxed"]["ratio_min"] > 0
    # finished runs are kept: the same command again trains nothing and reports the same numbers;
    # another setting is a different run
    files = sorted((tmp_path / "runs").glob("*.json"))
    assert len(files) == len(run.DEFAULT_ARMS)
    mtimes = [f.stat().st_mtime_ns for f in files]
    again = run.main(["--quick", "--out", str(tmp_path), "--timing-steps", "0"])
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    assert again["summary"] == result["summary"]
    run.main(["--quick", "--out", str(tmp_path), "--timing-steps", "0", "--arms", "standard", "--lr", "1e-3"])
    assert len(list((tmp_path / "runs").glob("*.json"))) == len(run.DEFAULT_ARMS) + 1
    # --report-only trains nothing: finished runs are summarised, missing ones listed
    report = run.main(["--quick", "--out", str(tmp_path), "--report-only"])
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    assert report["summary"] == result["summary"] and report["runs_remaining"] == []
    partial = run.main(["--quick", "--out", str(tmp_path), "--report-only", "--arms", "standard,dual"])
    assert list(partial["summary"]) == ["standard"] and partial["runs_remaining"] == ["dual/seed0"]
    with pytest.raises(SystemExit, match="no finished runs"):
        run.main(["--quick", "--out", str(tmp_path / "empty"), "--report-only"])


def test_timing_only_mode(tmp_path):
    from examples.pointcloud import run

    result = run.main(["--quick", "--timing-only", "--model", "dgcnn", "--out", str(tmp_path)])
    t = result["timing"]
    assert t["standard"]["ratio_min"] == 1.0 and t["relaxed"]["ratio_min"] > 0
    assert t["relaxed"]["params"] > t["standard"]["params"]
    assert list(tmp_path.glob("timing_dgcnn_*.json"))


def test_dual_and_lowrank_arms_run_end_to_end(tmp_path):
    from examples.pointcloud import run

    tiny = ["--steps", "2", "--seeds", "1", "--eval-every", "1", "--per-class", "1,1,1", "--points", "40",
            "--widths", "4,4,8,8", "--k", "4", "--batch", "8", "--timing-steps", "0", "--equiv-samples", "4",
            "--workers", "1"]  # --quick without its fixed step count
    result = run.main([*tiny, "--arms", "standard,dual,lowrank,drop", "--out", str(tmp_path)])
    assert list(result["summary"]) == ["standard", "dual", "lowrank", "drop"]
    runs = {r["arm"]: r for r in result["runs"]}
    for arm, r in runs.items():
        assert r["steps"] == 2 and r["equiv_err"] < 1e-10, arm  # exported models are the projected ones
    assert runs["drop"]["projection"] == "drop" and runs["lowrank"]["projection"] == "merge"
    dual = runs["dual"]["dual"]
    assert set(dual["gammas"]) == set(dual["duals"]) and len(dual["gammas"]) > 0
    assert all(v > 0 for v in dual["duals"].values())  # γ ≈ 1 > 0: dual ascent raised every λ_i
    assert runs["dual"]["n_params_trained"] == runs["drop"]["n_params_trained"] + len(dual["gammas"])
    assert runs["standard"]["n_params_trained"] < runs["lowrank"]["n_params_trained"] < runs["drop"]["n_params_trained"]
    assert "duals_mean" in result["summary"]["dual"]


@pytest.mark.parametrize("rank", [None, 2])
def test_torch_compile_relaxed_vn_pointnet_matches_eager(rank):
    """Compiled (aot_autograd, which replays the views of what forward records) = eager: outputs,
    the penalty on the inputs recorded inside the compiled forward, and gradients reaching W. A
    data-dependent branch on θ broke the graph there and made the replay of a recorded view fail."""
    torch.manual_seed(0)
    model = rp.relax(VNPointNet(5, k=4, widths=(4, 4, 8, 8)), rank=rank).eval()
    rp.set_theta(model, 0.5)
    with torch.no_grad():
        for p in rp.relaxation_parameters(model):
            p.normal_(0, 0.1)
    x = torch.randn(3, 3, 32)
    eager, pen_eager = model(x), rp.penalty(model)
    compiled = torch.compile(model, backend="aot_eager")
    out = compiled(x)
    pen = rp.penalty(model)
    assert torch.allclose(out, eager, atol=1e-5)
    assert torch.allclose(pen, pen_eager, rtol=1e-5)
    (out.square().mean() + pen).backward()
    assert all(p.grad is not None for p in rp.relaxation_parameters(model))


def test_explicit_options_win_over_the_presets(capsys):
    from examples.pointcloud.run import parse_args

    a = parse_args(["--evidence", "--out", "/tmp/elsewhere", "--steps", "50", "--arms", "standard"])
    assert (a.out, a.steps, a.arms, a.seeds) == ("/tmp/elsewhere", 50, ["standard"], 5)
    a = parse_args(["--quick", "--steps", "50", "--seeds", "3", "--batch", "4"])
    assert (a.steps, a.seeds, a.batch, a.points) == (50, 3, 4, 40)
    assert parse_args(["--evidence"]).out == "docs/evidence/pointcloud"
    for bad in (["--steps", "0"], ["--batch", "0"], ["--eval-every", "0"], ["--timing-steps", "-1"]):
        with pytest.raises(SystemExit):
            parse_args(bad)
