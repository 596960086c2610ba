"""Training integration: resumable helper (schedules and learned θ policies), DDP (gloo, 2 processes),
torch.compile, bf16 autocast."""

from __future__ import annotations

import copy
import datetime
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from relax_toy.layers import SO2Gate, SO2Linear
from torch import nn

import relax_plugins as rp


def make_model() -> nn.Module:
    torch.manual_seed(3)
    return rp.relax(nn.Sequential(SO2Linear(3, 6), SO2Gate(), SO2Linear(6, 2)))


def batches(n: int, size: int = 16):
    g = torch.Generator().manual_seed(11)
    return [(torch.randn(size, 6, generator=g), torch.randn(size, 4, generator=g)) for _ in range(n)]


def train_steps(model, opt, run, data):
    for x, y in data:
        run.advance()
        loss = run.loss((model(x) - y).square().mean())
        opt.zero_grad()
        loss.backward()
        opt.step()
        run.step()  # a learned policy's update; nothing with a schedule


def test_resume_mid_schedule_is_bit_identical(tmp_path):
    data = batches(10)
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    run = rp.RelaxedTraining(model, "triangular", total=10)
    train_steps(model, opt, run, data)
    reference = {k: v.clone() for k, v in model.state_dict().items()}

    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    run = rp.RelaxedTraining(model, "triangular", total=10)
    train_steps(model, opt, run, data[:4])
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "relax": run.state_dict()}, path)

    ckpt = torch.load(path, weights_only=True)
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    run = rp.RelaxedTraining(model, "triangular", total=10)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    run.load_state_dict(ckpt["relax"])
    assert run.position == 4 and rp.get_theta(model)["0"] == pytest.approx(run.schedule(3), rel=1e-6)
    train_steps(model, opt, run, data[4:])
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())
    assert run.done and rp.get_theta(model)["0"] == 0.0


def test_export_is_projected_copy_and_finish_projects():
    model = make_model()
    run = rp.RelaxedTraining(model, rp.schedules.Constant(total=5))
    run.advance()
    exported = run.export(merge=True)
    assert not any(True for _ in rp.relaxed_modules(exported))
    assert isinstance(model[0], rp.RelaxedModule)
    with pytest.raises(ValueError, match="checkpoint was made with"):
        rp.RelaxedTraining(make_model(), "cosine", total=5).load_state_dict(run.state_dict())
    out = run.finish()
    assert type(out[0]) is SO2Linear


def _ddp_worker(rank: int, world: int, store: str, data, out_path: str) -> None:
    os.environ.update(GLOO_SOCKET_IFNAME="lo")
    # a file rendezvous: no TCP port that another process on the machine could take first
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    model = make_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    run = rp.RelaxedTraining(model, "triangular", total=len(data), penalty_every=1)  # as the single process
    for x, y in data:
        run.advance()  # the last step has θ = 0: W must not become an unused parameter
        xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
        loss = run.loss((ddp(xs) - ys).square().mean())
        opt.zero_grad()
        loss.backward()
        opt.step()
    if rank == 0:
        torch.save(model.state_dict(), out_path)
    dist.barrier()
    # gloo's C++ teardown sometimes aborts ("terminate called without an active exception") after all
    # work is done; the result is on disk and both ranks passed the barrier, so leave without it
    os._exit(0)


def test_ddp_two_processes_match_single_process(tmp_path):
    data = batches(4, size=16)
    out = str(tmp_path / "ddp.pt")
    ctx = mp.get_context("spawn")
    store = str(tmp_path / "rendezvous")
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, store, data, out)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    for p in procs:
        if p.is_alive():
            p.kill()
            pytest.fail("DDP worker hung")
        assert p.exitcode == 0
    ddp_state = torch.load(out, weights_only=True)

    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run = rp.RelaxedTraining(model, "triangular", total=len(data), penalty_every=1)  # two loss() calls a step
    for x, y in data:
        run.advance()
        # DDP averages the ranks' gradients: the same as the mean of the per-half losses, penalty included
        loss = sum(run.loss((model(xs) - ys).square().mean()) for xs, ys in zip(x.chunk(2), y.chunk(2))) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
    single = model.state_dict()
    for k, v in single.items():
        assert torch.allclose(v, ddp_state[k], atol=1e-6), k
    assert not torch.equal(single["0.term.weight"], make_model().state_dict()["0.term.weight"])


def test_torch_compile_relaxed_model_matches_eager():
    model = make_model()
    rp.set_theta(model, 0.5)
    with torch.no_grad():
        for _, layer in rp.relaxed_modules(model):
            layer.term.weight.normal_()
    x = torch.randn(8, 6)
    eager = model(x)
    compiled = torch.compile(model, backend="aot_eager")
    out = compiled(x)
    assert torch.allclose(out, eager, atol=1e-6)
    pen = rp.penalty(model)  # the inputs recorded inside the compiled forward
    pen.backward()
    assert model[0].term.weight.grad is not None


def test_torch_compile_of_a_whole_training_step_with_the_penalty_matches_eager():
    """Compiling the step (forward, penalty, loss) as users compile their training step: the penalty's
    generator-stack cache is bypassed while tracing (its ids cannot be guarded), the closed-form
    moment gradient is traced, and loss and gradients equal eager's."""
    model = make_model()
    rp.set_theta(model, 0.5)
    with torch.no_grad():
        for _, layer in rp.relaxed_modules(model):
            layer.term.weight.normal_()
    x = torch.randn(32, 6)  # more samples than fibre dimensions: the moment route

    def step():
        return model(x).square().mean() + rp.penalty(model)

    eager = step()
    eager.backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    got = torch.compile(step, backend="aot_eager")()
    got.backward()
    assert torch.allclose(got, eager, rtol=1e-5)
    for p, g in zip(model.parameters(), want):
        assert torch.allclose(p.grad, g, rtol=1e-4, atol=1e-6)


def test_bf16_autocast_on_cpu():
    model = make_model()
    rp.set_theta(model, 1.0)
    x = torch.randn(8, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        loss = out.float().square().mean() + rp.penalty(model).float()
    loss.backward()
    assert torch.isfinite(model[0].term.weight.grad).all()


# -- learned θ policies (dual ascent, learned modulation) through RelaxedTraining ------------------

POLICIES = {
    "dual": lambda m: rp.DualAscentTheta(m, dual_lr=1e-2),
    "modulation": lambda m: rp.LearnedModulation(m, theta_max=1.0, rate=0.2, every=2),
}


def hand_loop(kind: str, data) -> nn.Module:
    """The policy's documented loop: its penalty in the loss, its step() after optimizer.step()."""
    model = make_model()
    policy = POLICIES[kind](model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for x, y in data:
        loss = (model(x) - y).square().mean() + rp.penalty(model) + policy.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        policy.step()
    return model


@pytest.mark.parametrize("kind", sorted(POLICIES))
def test_policy_through_relaxed_training_matches_its_own_loop(kind):
    data = batches(6)
    ref = hand_loop(kind, data)
    model = make_model()
    run = rp.RelaxedTraining(model, POLICIES[kind](model))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train_steps(model, opt, run, data)
    for (name, a), b in zip(ref.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    assert run.theta == pytest.approx(sum(rp.get_theta(ref).values()) / 2)
    assert run.history and all("penalty" in h for h in run.history)


@pytest.mark.parametrize("kind", sorted(POLICIES))
def test_policy_run_resumes_bit_identically(kind):
    data = batches(8)
    model = make_model()
    run = rp.RelaxedTraining(model, POLICIES[kind](model), total=8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train_steps(model, opt, run, data)
    assert run.done

    model2 = make_model()
    run2 = rp.RelaxedTraining(model2, POLICIES[kind](model2), total=8)
    opt2 = torch.optim.Adam(model2.parameters(), lr=1e-2)
    train_steps(model2, opt2, run2, data[:3])
    saved = {"model": model2.state_dict(), "opt": opt2.state_dict(), "run": run2.state_dict()}
    model3 = make_model()
    run3 = rp.RelaxedTraining(model3, POLICIES[kind](model3), total=8)
    opt3 = torch.optim.Adam(model3.parameters(), lr=1e-2)
    model3.load_state_dict(saved["model"])
    opt3.load_state_dict(saved["opt"])
    run3.load_state_dict(saved["run"])
    train_steps(model3, opt3, run3, data[3:])
    for (name, a), b in zip(model.state_dict().items(), model3.state_dict().values()):
        assert torch.equal(a, b), name


def test_forgetting_step_with_a_policy_is_an_error_and_harmless_with_a_schedule():
    model = make_model()
    run = rp.RelaxedTraining(model, rp.DualAscentTheta(model, dual_lr=1e-2))
    run.advance()
    with pytest.raises(RuntimeError, match=r"run\.step\(\)"):
        run.advance()
    fresh = make_model()
    twice = rp.RelaxedTraining(fresh, rp.DualAscentTheta(fresh, dual_lr=1e-2))
    with pytest.raises(RuntimeError, match="once per advance"):
        twice.step()  # before any advance()
    twice.advance()
    fresh(torch.randn(4, 6))
    twice.step()
    with pytest.raises(RuntimeError, match="once per advance"):
        twice.step()
    scheduled = rp.RelaxedTraining(make_model(), "triangular", total=3)
    values = []
    for _ in range(3):
        values.append(scheduled.advance())
        scheduled.step()
    assert values == [0.0, 1.0, 0.0]


def test_finish_ends_the_policy_and_projects():
    model = make_model()
    run = rp.RelaxedTraining(model, rp.DualAscentTheta(model, dual_lr=1e-2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train_steps(model, opt, run, batches(3))
    out = run.finish()
    assert out is model and [type(m) for m in model] == [SO2Linear, SO2Gate, SO2Linear]
    assert not any(isinstance(m, rp.RelaxedModule) for m in model.modules())


@pytest.mark.parametrize("kind", ["dual", "schedule"])
def test_a_refused_finish_changes_nothing_and_a_second_finish_is_a_clear_error(kind):
    model = make_model()
    schedule = rp.DualAscentTheta(model, init=0.8) if kind == "dual" else "constant"
    run = rp.RelaxedTraining(model, schedule, total=None if kind == "dual" else 10)
    if kind == "schedule":
        run.advance()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    theta_params = [isinstance(m.theta, nn.Parameter) for _, m in rp.relaxed_modules(model)]
    with pytest.raises(TypeError, match="merge"):
        run.finish(merge="yes")
    with torch.no_grad():  # a diverged W: merge=True must refuse before θ moves
        model[0].term.weight[0, 0] = float("nan")
    with pytest.raises(rp.NonFiniteError):
        run.finish(merge=True)
    after = model.state_dict()
    assert set(after) == set(state)
    assert all(torch.equal(after[k], v) or (k == "0.term.weight") for k, v in state.items())
    assert [isinstance(m.theta, nn.Parameter) for _, m in rp.relaxed_modules(model)] == theta_params
    run.finish()
    with pytest.raises(rp.NotRelaxedError):
        run.finish()


def test_state_bookkeeping_edge_cases():
    model = make_model()
    run = rp.RelaxedTraining(model, "cosine", total=6, penalty_every=2)
    assert run.theta == 0.0  # before the first advance(): the layers' own θ, not the schedule's peak
    with pytest.raises(rp.RelaxError):
        run.penalty()  # no forward yet
    assert run.penalty_calls == 0  # a failed call does not shift the every-k cycle
    run.advance()
    run.loss(model(torch.randn(4, 6)).square().mean())
    state = run.state_dict()
    state["history"][0]["task"] = -1.0  # the returned state is a copy
    assert run.history[0]["task"] != -1.0
    policy_run = rp.RelaxedTraining(model, rp.DualAscentTheta(model, dual_lr=1e-2))
    policy_state = policy_run.state_dict()
    policy_state.update(position=2, policy={"state": policy_state["policy"]["state"], "steps": 7})
    with pytest.raises(ValueError, match="steps"):
        policy_run.load_state_dict(policy_state)


def test_callable_schedule_values_are_checked_at_construction():
    model = rp.relax(nn.Sequential(SO2Linear(1, 1).half()))
    with pytest.raises(ValueError, match="largest θ"):
        rp.RelaxedTraining(model, lambda t: 1e5, total=10)
    with pytest.raises(ValueError, match="returned"):
        rp.RelaxedTraining(model, lambda t: -1.0 if t > 0.5 else 0.5, total=10)


def test_policy_of_another_model_is_refused_before_anything_changes():
    model, other = make_model(), make_model()
    policy = rp.DualAscentTheta(other, dual_lr=1e-2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="another model"):
        rp.RelaxedTraining(model, policy)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_policy_state_is_not_loaded_into_a_schedule_run_or_the_reverse():
    model = make_model()
    run = rp.RelaxedTraining(model, rp.LearnedModulation(model, rate=0.1))
    scheduled = rp.RelaxedTraining(make_model(), "triangular", total=4)
    with pytest.raises(ValueError):
        scheduled.load_state_dict(run.state_dict())
    with pytest.raises(ValueError):
        run.load_state_dict(scheduled.state_dict())
    with pytest.raises(TypeError):
        rp.RelaxedTraining(model, rp.LearnedModulation(model), total=1.5)


# -- an optimiser that misses W ------------------------------------------------------------------
def _loop(run, model, opt, steps: int, accumulate: int = 1) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, (x, y) in enumerate(batches(steps)):
            run.advance()
            run.loss((model(x) - y).square().mean()).backward()
            if (i + 1) % accumulate == 0:
                opt.step()
                opt.zero_grad()
    return [w for w in caught if issubclass(w.category, RuntimeWarning)]


def test_optimizer_built_before_relax_is_reported_once():
    torch.manual_seed(3)
    model = nn.Sequential(SO2Linear(3, 6), SO2Gate(), SO2Linear(6, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)  # before relax(): W is not in it
    rp.relax(model)
    caught = _loop(rp.RelaxedTraining(model, total=30), model, opt, 30)
    assert len(caught) == 1 and "after relax()" in str(caught[0].message)


@pytest.mark.parametrize("built_before_dual", [True, False])
def test_optimizer_built_before_dual_ascent_is_reported(built_before_dual):
    """DualAscentTheta makes θ a parameter: an optimiser built between relax() and it trains W but never
    θ (γ stays at init). W moving must not end the watch before θ, which gets a gradient only once
    W ≠ 0, has been seen; an optimiser built after it holds both and is not warned about."""
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2) if built_before_dual else None
    run = rp.RelaxedTraining(model, rp.DualAscentTheta(model, dual_lr=1e-2))
    opt = opt or torch.optim.Adam(model.parameters(), lr=1e-2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x, y in batches(6):
            run.advance()
            opt.zero_grad()
            run.loss((model(x) - y).square().mean()).backward()
            opt.step()
            run.step()
    caught = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    if built_before_dual:
        assert len(caught) == 1 and "DualAscentTheta" in str(caught[0].message)
    else:
        assert not caught


@pytest.mark.parametrize("accumulate", [1, 3])
def test_no_warning_when_the_optimizer_holds_w(accumulate):
    """θ = 0 at the start (W gets no gradient yet) and gradient accumulation (W unchanged between
    micro-batches, with the base weights unchanged too) are not mistaken for a missing W."""
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    assert _loop(rp.RelaxedTraining(model, total=30), model, opt, 30, accumulate) == []
    assert not torch.equal(model[0].term.weight, torch.zeros_like(model[0].term.weight))


def test_no_warning_for_a_deliberately_frozen_w():
    model = make_model()
    for p in rp.relaxation_parameters(model):
        p.requires_grad_(False)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    assert _loop(rp.RelaxedTraining(model, total=30), model, opt, 30) == []


def test_penalty_follows_the_model_when_its_relaxed_layers_change():
    """RelaxedTraining finds the relaxed layers once; a layer replaced or projected afterwards is
    noticed: the penalty is then that of the model as it is, or an error when nothing is relaxed."""
    model = make_model()
    run = rp.RelaxedTraining(model, "constant", total=4, penalty_every=1)
    with torch.no_grad():
        for _, layer in rp.relaxed_modules(model):
            layer.term.weight.normal_()
    x = torch.randn(8, 6)
    model(x)
    assert torch.equal(run.penalty(), rp.penalty(model))
    model[2] = SO2Linear(6, 2)  # a relaxed layer replaced by a plain one
    model(x)
    assert [n for n, _ in rp.relaxed_modules(model)] == ["0"]
    assert torch.equal(run.penalty(), rp.penalty(model))
    rp.project(model)
    with pytest.raises(rp.NotRelaxedError):
        run.penalty()


def test_resume_with_generator_sampling_is_bit_identical():
    """penalty_generators draws from each term's own stream: RelaxedTraining's state carries it."""

    def build():
        model = make_model()
        for _, layer in rp.relaxed_modules(model):
            sym = layer.term.symmetry
            g = torch.Generator().manual_seed(int(sym.dim_in))
            sym.lie_in = torch.randn(3, sym.dim_in, sym.dim_in, dtype=torch.float64, generator=g)
            sym.lie_out = torch.randn(3, sym.dim_out, sym.dim_out, dtype=torch.float64, generator=g)
            layer.term.penalty_generators = 1
        return model

    data = batches(6)

    def run_steps(model, opt, run, part):
        values = []
        for x, y in part:
            run.advance()
            loss = run.loss((model(x) - y).square().mean())
            values.append(run.history[-1]["penalty"])
            opt.zero_grad()
            loss.backward()
            opt.step()
        return values

    model = build()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    run = rp.RelaxedTraining(model, "triangular", total=6, penalty_every=1)
    straight = run_steps(model, opt, run, data)

    model = build()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    run = rp.RelaxedTraining(model, "triangular", total=6, penalty_every=1)
    first = run_steps(model, opt, run, data[:3])
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), run.state_dict()))
    assert set(saved[2]["random_states"]) == {"0", "2"}
    model = build()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    run = rp.RelaxedTraining(model, "triangular", total=6, penalty_every=1)
    model.load_state_dict(saved[0])
    opt.load_state_dict(saved[1])
    run.load_state_dict(saved[2])
    assert first + run_steps(model, opt, run, data[3:]) == straight


def test_state_past_the_schedules_end_loads_back():
    # advance() past the end is allowed (θ stays 0 there): the state it leaves must load again
    model = rp.relax(nn.Sequential(SO2Linear(2, 2)))
    run = rp.RelaxedTraining(model, "triangular", total=2)
    for _ in range(3):
        run.advance()
    state = run.state_dict()
    other = rp.RelaxedTraining(rp.relax(nn.Sequential(SO2Linear(2, 2))), "triangular", total=2)
    other.load_state_dict(state)
    assert other.position == 3 and other.done and rp.get_theta(other.model)["0"] == 0.0


def test_triangular_peak_at_takes_numpy_and_tensor_scalars():
    import numpy as np

    ref = rp.schedules.Triangular(total=5, peak_at=0.3)
    for value in (np.float32(0.3), torch.tensor(0.3)):
        s = rp.schedules.Triangular(total=5, peak_at=value)
        assert [round(s(i), 6) for i in range(5)] == [round(ref(i), 6) for i in range(5)]
    for bad in (0.0, 1.0, float("nan"), True):
        with pytest.raises((TypeError, ValueError), match="peak_at"):
            rp.schedules.Triangular(total=5, peak_at=bad)
