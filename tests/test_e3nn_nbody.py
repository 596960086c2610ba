"""The N-body example: simulator, data loader, SEGNN-style model and the benchmark driver."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("e3nn")

import torch  # noqa: E402

import relax_plugins as rp  # noqa: E402
from examples.nbody import data as nb  # noqa: E402
from examples.nbody.model import SEGNN  # noqa: E402
from examples.nbody.run import e3_equivariance_error, main  # noqa: E402


def test_initial_conditions_follow_the_protocol():
    loc, vel, q = nb.initial_conditions("train", 200)
    assert loc.shape == vel.shape == (200, 5, 3) and q.shape == (200, 5, 1)
    assert np.allclose(np.linalg.norm(vel, axis=-1), 0.5)
    assert set(np.unique(q)) == {-1.0, 1.0}
    assert abs(loc.mean()) < 0.1 and abs(loc.std() - 1.0) < 0.05
    # splits are different streams, prefixes are stable
    assert not np.allclose(nb.initial_conditions("test", 3)[0], loc[:3])
    assert np.array_equal(nb.initial_conditions("train", 3)[0], loc[:3])


def test_simulator_is_e3_equivariant_and_like_charges_repel():
    loc, vel, q = nb.initial_conditions("valid", 4)
    rng = np.random.default_rng(0)
    Q = np.linalg.qr(rng.standard_normal((3, 3)))[0] * -1.0  # an improper orthogonal matrix (likely)
    t = rng.standard_normal(3)
    a = nb.simulate(loc, vel, q, frames=(0, 5))
    b = nb.simulate(loc @ Q.T + t, vel @ Q.T, q, frames=(0, 5))
    for f in (0, 5):
        assert np.allclose(b[f][0], a[f][0] @ Q.T + t, atol=1e-8)
        assert np.allclose(b[f][1], a[f][1] @ Q.T, atol=1e-8)
    # two like charges at rest on the x axis move apart, unlike ones approach
    x0 = np.array([[[-0.5, 0, 0], [0.5, 0, 0]]])
    v0 = np.zeros_like(x0)
    like = nb.simulate(x0, v0, np.ones((1, 2, 1)), frames=(0,))[0][0]
    unlike = nb.simulate(x0, v0, np.array([[[1.0], [-1.0]]]), frames=(0,))[0][0]
    assert like[0, 1, 0] - like[0, 0, 0] > 1.0 > unlike[0, 1, 0] - unlike[0, 0, 0]


def test_load_nbody_caches_and_slices(tmp_path):
    d5 = nb.load_nbody("valid", n=5, cache_dir=tmp_path)
    assert {k: tuple(v.shape) for k, v in d5.items()} == {
        "loc": (5, 5, 3), "vel": (5, 5, 3), "charges": (5, 5, 1), "target_loc": (5, 5, 3)}
    assert all(v.dtype == torch.float32 for v in d5.values())
    files = list((tmp_path / "nbody").glob("*.npz"))
    assert len(files) == 1
    d3 = nb.load_nbody("val", n=3, cache_dir=tmp_path)  # served from the n=5 file
    assert len(list((tmp_path / "nbody").glob("*.npz"))) == 1
    assert all(torch.equal(d3[k], d5[k][:3]) for k in d5)
    with pytest.raises(ValueError):
        nb.load_nbody("training-set", n=2, cache_dir=tmp_path)


def test_sanity_figures_of_benchmarks_md():
    """benchmarks.md §1: least squares [x, v, 1] → x_T ≈ 0.075, x + v ≈ 0.113, no motion ≈ 0.27
    (full splits; simulated once in a few seconds, then read from data_cache/)."""
    tr, te = nb.load_nbody("train"), nb.load_nbody("test")

    def feats(d):
        return torch.cat([d["loc"], d["vel"], torch.ones_like(d["charges"])], -1).reshape(-1, 7).double()

    A = torch.linalg.lstsq(feats(tr), tr["target_loc"].reshape(-1, 3).double()).solution
    linear = float((feats(te) @ A - te["target_loc"].reshape(-1, 3).double()).square().mean())
    ballistic = float((te["loc"] + te["vel"] - te["target_loc"]).square().mean())
    still = float((te["loc"] - te["target_loc"]).square().mean())
    assert 0.065 < linear < 0.085
    assert 0.100 < ballistic < 0.125
    assert 0.25 < still < 0.29


def _model64() -> SEGNN:
    from relax_e3nn.irreps import _float64_default

    with _float64_default():  # e3nn's Clebsch-Gordan buffers are built in the default dtype
        return SEGNN("4x0e + 2x1o + 1x1e", layers=2)


def test_segnn_is_e3_equivariant_and_relaxed_is_not():
    torch.manual_seed(0)
    model = _model64()
    d = nb.load_nbody("valid", n=8)
    assert e3_equivariance_error(model, d, n_systems=8) < 1e-12
    # permuting the particles of a system permutes the predictions
    perm = torch.tensor([3, 1, 4, 0, 2])
    args = [d[k][:4].double() for k in ("loc", "vel", "charges")]
    with torch.no_grad():
        assert torch.allclose(model(*(a[:, perm] for a in args)), model(*args)[:, perm], atol=1e-12)
    relaxed = rp.relax(copy.deepcopy(model), adapters=["e3nn"])
    assert len(list(rp.relaxed_modules(relaxed))) == 1 + 4 * 2 + 2  # every tensor product
    with torch.no_grad():
        assert torch.equal(relaxed(*args), model(*args))
        for _, layer in rp.relaxed_modules(relaxed):
            layer.term.weight.normal_(0.0, 0.1)
    rp.set_theta(relaxed, 1.0)
    assert e3_equivariance_error(relaxed, d, n_systems=8) > 1e-3
    projected = rp.project(relaxed)
    assert type(projected) is SEGNN and e3_equivariance_error(projected, d, n_systems=8) < 1e-12


def test_benchmark_driver_smoke(tmp_path):
    out = tmp_path / "run"
    result = main(["--quick", "--steps", "4", "--eval-every", "2", "--seeds", "1", "--workers", "1",
                   "--arms", "standard,relaxed,no_lie", "--n-train", "16", "--n-valid", "8", "--n-test", "8",
                   "--batch", "8", "--hidden", "4x0e + 2x1o", "--layers", "1", "--timing-steps", "1",
                   "--out", str(out)])
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["summary"]) == {"standard", "relaxed", "no_lie"}
    for r in saved["runs"]:
        assert r["equivariance_error"] < 1e-5  # the projected, exported model
        assert [h["step"] for h in r["history"]] == [2, 4]
    relaxed = [r for r in saved["runs"] if r["arm"] == "relaxed"][0]
    assert relaxed["history"][-1]["theta"] == 0.0 and relaxed["history"][0]["theta"] > 0
    assert saved["runs"][0]["test_mse"] == pytest.approx(result["runs"][0]["test_mse"])
    assert saved["inference_after_project"]["max_abs_diff_vs_original"] == 0.0
    assert saved["step_time_interleaved"]["ratio"] > 0


def test_ablation_arm_specs_build():
    from examples.nbody.run import ABLATION_ARMS, ARMS, Config, arm_label, arm_spec, parse_args

    cfg = Config()
    specs = {arm: arm_spec(arm, cfg) for arm in ABLATION_ARMS}
    assert set(ARMS) < set(ABLATION_ARMS) and len(set(ABLATION_ARMS)) == 10
    relaxed = specs["relaxed"]
    assert relaxed == dict(schedule="triangular", lie=cfg.lambda_lie, norm=cfg.lambda_norm, merge=True, rank=None,
                           dual=None, penalty_every=1)
    # each ablation arm differs from `relaxed` in exactly what its name says
    assert specs["no_norm"] == {**relaxed, "norm": 0.0}
    assert arm_spec("every4", cfg) == {**relaxed, "penalty_every": 4}
    assert arm_label("every4", cfg) == "triangular, penalty every 4"
    assert specs["drop"] == {**relaxed, "merge": False}
    assert specs["lowrank"] == {**relaxed, "rank": 4}
    assert specs["dual"] == {**relaxed, "schedule": "learned", "dual": "plain"}
    assert specs["dual_resilient"] == {**relaxed, "schedule": "learned", "dual": "resilient"}
    assert specs["standard"]["schedule"] is None
    assert arm_spec("lowrank", Config(lowrank_rank=2))["rank"] == 2
    assert all(arm_label(arm, cfg) for arm in ABLATION_ARMS)
    assert parse_args(["--ablation"]).arms == ABLATION_ARMS
    assert parse_args([]).arms == ARMS
    assert parse_args(["--ablation", "--arms", "dual,drop"]).arms == ("dual", "drop")
    with pytest.raises(ValueError):
        arm_spec("no_such_arm", cfg)


def _tiny_config(**kw):
    from examples.nbody.run import Config

    base = dict(n_train=16, n_valid=8, n_test=8, steps=3, batch=8, hidden="4x0e + 2x1o", layers=1, eval_every=3,
                seeds=1, workers=1, timing_steps=0)
    return Config(**{**base, **kw})


_N_LAYERS = 1 + 4 * 1 + 2  # every tensor product of a 1-layer SEGNN


def test_dual_and_lowrank_arms_run_end_to_end():
    from examples.nbody.run import format_table, markdown_duals, markdown_table, summarise, train_one

    cfg = _tiny_config(arms=("dual", "lowrank"))
    runs = {arm: train_one(cfg, arm, seed=0) for arm in cfg.arms}
    d = runs["dual"]["dual"]
    assert len(d["duals"]) == len(d["gammas"]) == _N_LAYERS
    assert all(v > 0 for v in d["duals"].values())  # γ ≈ 1 > 0 pushed every λ_i up
    assert runs["dual"]["history"][-1]["duals"] == d["duals"]
    assert not d["finish_warned"] and "unprojected" not in runs["dual"]
    for r in runs.values():
        assert r["equivariance_error"] < 1e-5  # the projected, exported model
        assert r["n_params_trained"] > r["n_params"]
        assert [h["step"] for h in r["history"]] == [3]
    assert runs["lowrank"]["history"][-1]["theta"] == 0.0  # triangular schedule ends at exactly 0
    # rank-4 W has fewer parameters than the dual arm's dense W (+ one γ per layer)
    assert runs["lowrank"]["n_params_trained"] < runs["dual"]["n_params_trained"] - _N_LAYERS
    result = {"summary": summarise(list(runs.values()), cfg.arms), "config": {}}
    assert result["summary"]["dual"]["duals_mean"] == pytest.approx(d["duals"])
    assert "duals_mean" not in result["summary"]["lowrank"]
    json.dumps(result)
    assert "rank 4" in markdown_table(result) and "dual: λ_i" in markdown_duals(result)
    assert "final duals" in format_table(result["summary"], cfg, None)


def test_dual_resilient_arm_keeps_theta_and_is_scored_unprojected():
    from examples.nbody.run import train_one

    r = train_one(_tiny_config(arms=("dual_resilient",)), "dual_resilient", seed=0)
    assert r["dual"]["finish_warned"] and len(r["dual"]["slacks"]) == _N_LAYERS
    # θ > 0 after finish(): the unprojected model is only approximately equivariant, the projected one exactly
    assert r["unprojected"]["theta_mean"] > 0 and r["unprojected"]["equivariance_error"] > 1e-6
    assert r["equivariance_error"] < 1e-5


class _Interrupt(Exception):
    pass


class _StopAfter:
    """A progress sink that interrupts training after ``k`` optimiser steps (a killed run)."""

    def __init__(self, k: int) -> None:
        self.k, self.n = k, 0

    def put(self, n: int) -> None:
        self.n += n
        if self.n == self.k:
            raise _Interrupt


@pytest.mark.parametrize("arm", ["standard", "relaxed", "dual", "recm"])
def test_interrupted_run_resumes_bit_identically(tmp_path, arm):
    from examples.nbody.run import _ckpt_path, train_one

    kw = dict(steps=7, eval_every=2, checkpoint_every=2, lr_schedule="none", n_train=40)
    whole = train_one(_tiny_config(out=str(tmp_path / "a"), **kw), arm, seed=0)
    cfg = _tiny_config(out=str(tmp_path / "b"), **kw)
    with pytest.raises(_Interrupt):
        train_one(cfg, arm, seed=0, progress=_StopAfter(5))  # killed after step 5: checkpoint at step 4
    assert torch.load(_ckpt_path(cfg, arm, 0), weights_only=False)["state"]["step"] == 4
    resumed = train_one(cfg, arm, seed=0)
    for key in ("test_mse", "best_val_mse", "best_step", "history", "theta_trace", "equivariance_error"):
        assert resumed[key] == whole[key], key
    with pytest.raises(ValueError, match="another configuration"):
        train_one(_tiny_config(out=str(tmp_path / "b"), **{**kw, "lr": 1e-4}), arm, seed=0)


def test_egnn_model_trains_projects_exactly_and_resumes(tmp_path):
    """``--model egnn``: the pyg adapter relaxes the EGNN layers under the same protocol, the tested
    model is exactly E(3)-equivariant, and a killed every4 run resumes bit-identically."""
    pytest.importorskip("torch_geometric")
    from examples.nbody.run import _ckpt_path, build_model, parse_args, train_one

    assert parse_args(["--model", "egnn", "--egnn-hidden", "8"]).model == "egnn"
    kw = dict(model="egnn", egnn_hidden=8, steps=7, eval_every=2, checkpoint_every=2, lr_schedule="none",
              n_train=40)
    whole = train_one(_tiny_config(out=str(tmp_path / "a"), **kw), "every4", seed=0)
    assert whole["equivariance_error"] < 1e-12  # float64 check of the projected EGNN
    assert whole["n_params_trained"] > whole["n_params"] == sum(
        p.numel() for p in build_model(_tiny_config(**kw), 0, torch.device("cpu")).parameters())
    cfg = _tiny_config(out=str(tmp_path / "b"), **kw)
    with pytest.raises(_Interrupt):
        train_one(cfg, "every4", seed=0, progress=_StopAfter(5))
    assert torch.load(_ckpt_path(cfg, "every4", 0), weights_only=False)["state"]["step"] == 4
    resumed = train_one(cfg, "every4", seed=0)
    for key in ("test_mse", "best_val_mse", "history", "theta_trace"):
        assert resumed[key] == whole[key], key
    with pytest.raises(ValueError, match="model must be"):
        build_model(_tiny_config(model="schnet"), 0, torch.device("cpu"))


def test_matched_arm_replays_the_dual_theta_trace_and_waits_for_it(tmp_path):
    from examples.nbody.run import matched_schedule, parse_args

    out, every = tmp_path / "run", 4
    args = ["--quick", "--steps", str(2 * every + 3), "--theta-trace-every", str(every), "--eval-every", "5",
            "--seeds", "1", "--workers", "1", "--arms", "matched,dual", "--n-train", "16", "--n-valid", "8",
            "--n-test", "8", "--batch", "8", "--hidden", "4x0e + 2x1o", "--layers", "1", "--timing-steps", "0",
            "--out", str(out), "--evidence", str(tmp_path / "evidence.json")]
    result = main(args)  # `matched` listed first, run after `dual`
    evidence = json.loads((tmp_path / "evidence.json").read_text())
    assert evidence["protocol"]["steps"] == 2 * every + 3 and evidence["runs_remaining"] == []
    assert evidence["arms"]["dual"]["seeds"] == [0] and len(evidence["arms"]["matched"]["test_mse"]) == 1
    assert evidence["default_recipe"] is None  # not chosen from fewer than 3 seeds
    runs = {r["arm"]: r for r in result["runs"]}
    dual_trace, matched_trace = runs["dual"]["theta_trace"], runs["matched"]["theta_trace"]
    assert len(dual_trace) == 3 and dual_trace[0] == 1.0 and dual_trace[2] != dual_trace[0]
    assert matched_trace == pytest.approx(dual_trace, abs=1e-12)
    cfg = parse_args(args)
    theta = matched_schedule(cfg, 0)
    mid = theta(every // 2)
    assert mid == pytest.approx((dual_trace[0] + dual_trace[1]) / 2) and theta(cfg.steps - 1) == 0.0
    # a second call finds both runs finished and trains nothing
    again = main(args)
    assert [r["test_mse"] for r in again["runs"]] == [r["test_mse"] for r in result["runs"]]
    with pytest.raises(ValueError, match="another configuration"):
        main(args + ["--lr", "1e-4"])


def test_relaxed_training_defaults_are_the_evidence_default_recipe():
    """``RelaxedTraining(model, total=steps)`` is the arm that the paper-length evidence chose on
    validation (``default_recipe`` of ``docs/evidence/nbody_paper_length.json``): the same θ at every
    step, λ_LD, λ_N, penalty form and ``penalty_every``."""
    from examples.nbody.run import PRESETS, Config, arm_spec

    evidence = json.loads((Path(__file__).parents[1] / "docs/evidence/nbody_paper_length.json").read_text())
    cfg = Config(**PRESETS["paper"])
    spec = arm_spec(evidence["default_recipe"], cfg)
    assert spec["schedule"] == "triangular" and spec["dual"] is None and spec["rank"] is None
    model = rp.relax(SEGNN("4x0e + 2x1o", layers=1))
    run = rp.RelaxedTraining(model, total=cfg.steps)
    assert (run.lie, run.norm, run.form) == (spec["lie"], spec["norm"], cfg.penalty_form)
    assert run.penalty_every == spec["penalty_every"]
    arm = rp.schedules.Triangular(total=cfg.steps, peak=cfg.peak_theta, peak_at=cfg.peak_at)
    for step in (0, 1, 7_499, 15_000, 22_222, cfg.steps - 1):
        run.position = step
        assert run.advance() == arm(step)
    assert run.schedule(cfg.steps - 1) == 0.0


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--seeds", "0"], ["--arms", ","], ["--arms", "bogus"],
                                  ["--eval-every", "0"], ["--batch", "0"], ["--n-train", "50", "--batch", "100"],
                                  ["--theta-trace-every", "0"], ["--timing-steps", "-1"]])
def test_runner_refuses_arguments_that_train_nothing(argv, capsys):
    from examples.nbody.run import parse_args

    with pytest.raises(SystemExit) as info:  # argparse's one-line error, exit status 2
        parse_args(["--quick", *argv])
    assert info.value.code == 2 and "error:" in capsys.readouterr().err


def test_runner_names_a_cut_short_checkpoint_or_run_file(tmp_path):
    from examples.nbody.run import RunFileError, _checkpoint_step, parse_args

    cfg = parse_args(["--quick", "--checkpoint-every", "5", "--out", str(tmp_path)])
    path = tmp_path / "ckpt" / "relaxed_seed0.pt"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"garbage")
    with pytest.raises(RunFileError, match=r"relaxed_seed0\.pt cannot be read.*delete it"):
        _checkpoint_step(cfg, "relaxed", 0)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "relaxed_seed0.json").write_text('{"arm": "relax')
    with pytest.raises(RunFileError, match=r"relaxed_seed0\.json cannot be read"):
        main(["--quick", "--arms", "relaxed", "--seeds", "1", "--out", str(tmp_path), "--report-only"])
