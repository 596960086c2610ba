"""RelaxedTraining driven by a learned θ policy (dual ascent, learned modulation): the same numbers as
the policy's own hand-written loop, resumable, and refused when built on another model."""

from __future__ import annotations

import pytest
import torch
from relax_toy.layers import SO2Gate, SO2Linear
from torch import nn

import relax_plugins as rp


def make_model() -> nn.Module:
    torch.manual_seed(3)
    return rp.relax(nn.Sequential(SO2Linear(3, 6), SO2Gate(), SO2Linear(6, 2)))


def batches(n: int, size: int = 16):
    g = torch.Generator().manual_seed(11)
    return [(torch.randn(size, 6, generator=g), torch.randn(size, 4, generator=g)) for _ in range(n)]


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


def helper_loop(model, run, opt, data) -> None:
    for x, y in data:
        run.advance()
        loss = run.loss((model(x) - y).square().mean())
        opt.zero_grad()
        loss.backward()
        opt.step()
        run.step()


@pytest.mark.parametrize("kind", sorted(POLICIES))
def test_policy_through_relaxed_training_matches_its_own_loop(kind):
    data = batches(6)
    ref = hand_loop(kind, data)
    model = make_model()
    run = rp.RelaxedTraining(model, POLICIES[kind](model))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    helper_loop(model, run, opt, data)
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
    helper_loop(model, run, opt, data)
    assert run.done

    model2 = make_model()
    run2 = rp.RelaxedTraining(model2, POLICIES[kind](model2), total=8)
    opt2 = torch.optim.Adam(model2.parameters(), lr=1e-2)
    helper_loop(model2, run2, opt2, data[:3])
    saved = {"model": model2.state_dict(), "opt": opt2.state_dict(), "run": run2.state_dict()}
    model3 = make_model()
    run3 = rp.RelaxedTraining(model3, POLICIES[kind](model3), total=8)
    opt3 = torch.optim.Adam(model3.parameters(), lr=1e-2)
    model3.load_state_dict(saved["model"])
    opt3.load_state_dict(saved["opt"])
    run3.load_state_dict(saved["run"])
    helper_loop(model3, run3, opt3, data[3:])
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
    helper_loop(model, run, opt, batches(3))
    out = run.finish()
    assert out is model and [type(m) for m in model] == [SO2Linear, SO2Gate, SO2Linear]
    assert not any(isinstance(m, rp.RelaxedModule) for m in model.modules())


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
