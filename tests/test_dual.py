"""Dual-ascent θ: γ is learned, driven to 0; duals report symmetry breaking; resilient slack."""

from __future__ import annotations

import warnings

import pytest
import torch
from relax_toy.layers import SO2Gate, SO2Linear
from torch import nn

import relax_plugins as rp


def model_and_data(symmetric: bool):
    torch.manual_seed(0)
    model = rp.relax(nn.Sequential(SO2Linear(2, 4), SO2Gate(), SO2Linear(4, 1)).double())
    x = torch.randn(256, 4, dtype=torch.float64)
    if symmetric:
        teacher = nn.Sequential(SO2Linear(2, 1)).double()
        y = teacher(x).detach()
    else:  # a target that no SO(2)-equivariant map produces: a fixed direction
        y = torch.zeros(256, 2, dtype=torch.float64)
        y[:, 0] = x[:, 0] + x[:, 1] ** 2
    return model, x, y


def train(model, x, y, dual, steps=300):
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gammas = []
    for _ in range(steps):
        loss = (model(x) - y).square().mean() + rp.penalty(model) + dual.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        dual.step()
        gammas.append(dual.gammas())
    return gammas


def test_theta_becomes_learnable_and_is_driven_to_zero():
    model, x, y = model_and_data(symmetric=True)
    dual = rp.DualAscentTheta(model, init=1.0, dual_lr=0.5)
    assert "0.theta" in dict(model.named_parameters())
    gammas = train(model, x, y, dual)
    assert all(v >= 0 for g in gammas for v in g.values())
    assert max(gammas[-1].values()) < 0.05 < min(gammas[0].values())
    assert all(v > 0 for v in dual.duals().values())
    dual.finish()
    assert rp.get_theta(model) == {"0": 0.0, "2": 0.0}
    assert "0.theta" in dict(model.named_buffers())
    rp.project(model)


def test_duals_accumulate_the_constraint_violation():
    """λ_i = η Σ_t γ_i(t) (γ ≥ 0, so λ never decreases). ACE reads λ as a symmetry-breaking
    diagnostic; with Adam on a toy SO(2) task it did not separate symmetric from non-symmetric targets
    over 5 seeds (see the class docstring), so only the accounting is asserted here."""
    model, x, y = model_and_data(symmetric=False)
    dual = rp.DualAscentTheta(model, init=1.0, dual_lr=0.005)
    gammas = train(model, x, y, dual, steps=50)
    for name, lam in dual.duals().items():
        assert lam == pytest.approx(0.005 * sum(g[name] for g in gammas), rel=1e-9)
    lambdas = [0.0]
    dual2 = rp.DualAscentTheta(model_and_data(symmetric=False)[0], dual_lr=0.005)
    for _ in range(3):
        dual2.step()
        lambdas.append(dual2.duals()["0"])
    assert lambdas == sorted(lambdas)


def test_resilient_keeps_slack_and_warns():
    model, x, y = model_and_data(symmetric=False)
    dual = rp.DualAscentTheta(model, init=1.0, dual_lr=0.05, resilient=True, slack_cost=1.0, slack_lr=0.05)
    train(model, x, y, dual, steps=200)
    assert any(v > 0 for v in dual.slacks.values())
    with pytest.warns(UserWarning, match="approximately equivariant"):
        dual.finish()
    assert any(v > 0 for v in rp.get_theta(model).values())


def test_state_round_trip_and_errors():
    model, x, y = model_and_data(symmetric=True)
    dual = rp.DualAscentTheta(model, dual_lr=0.1)
    train(model, x, y, dual, steps=3)
    other = rp.DualAscentTheta(model_and_data(True)[0])
    other.load_state_dict(dual.state_dict())
    assert other.duals() == dual.duals()
    with pytest.raises(ValueError, match="already learnable"):
        rp.DualAscentTheta(model)
    with pytest.raises(ValueError):
        rp.DualAscentTheta(model_and_data(True)[0], dual_lr=-1.0)


@pytest.mark.parametrize("resilient", [False, True])
def test_finish_twice_raises_not_relaxed_and_changes_nothing(resilient):
    """A second finish() is an error (as RelaxedTraining.finish twice is), never a bare KeyError."""
    model = model_and_data(symmetric=False)[0]
    dual = rp.DualAscentTheta(model, init=0.5, resilient=resilient)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the resilient run's "approximately equivariant" warning
        dual.finish()
    theta = rp.get_theta(model)
    with pytest.raises(rp.NotRelaxedError, match=r"finish\(\) after finish\(\).*\['0', '2'\]"):
        dual.finish()
    for late in (dual.step, dual.penalty):  # nothing is learned any more
        with pytest.raises(rp.NotRelaxedError, match="after finish"):
            late()
    assert rp.get_theta(model) == theta and "0.theta" in dict(model.named_buffers())
    rp.project(model)

    model = model_and_data(symmetric=True)[0]
    run = rp.RelaxedTraining(model, rp.DualAscentTheta(model))
    run.finish()
    with pytest.raises(rp.NotRelaxedError):
        run.finish()


def test_policies_refuse_a_theta_the_model_dtype_cannot_hold():
    # as set_theta and RelaxedTraining do: float16 tops out at 65504, beyond it θ would be inf
    for make in (lambda m: rp.DualAscentTheta(m, init=1e5), lambda m: rp.LearnedModulation(m, theta_max=1e5)):
        model = rp.relax(nn.Sequential(SO2Linear(1, 1))).half()
        with pytest.raises(ValueError, match="does not fit"):
            make(model)
        assert not isinstance(model[0].theta, nn.Parameter) and float(model[0].theta) == 0.0


def test_policies_refuse_layers_that_project_took_out():
    x = torch.randn(8, 4)
    model = rp.relax(nn.Sequential(SO2Linear(2, 2), SO2Gate(), SO2Linear(2, 2)))
    dual = rp.DualAscentTheta(model, init=0.5)
    model(x)
    rp.project(model)
    for call in (dual.penalty, dual.step, dual.finish):
        with pytest.raises(rp.NotRelaxedError, match="no longer relaxed"):
            call()
    model = rp.relax(nn.Sequential(SO2Linear(2, 2), SO2Gate(), SO2Linear(2, 2)))
    modulation = rp.LearnedModulation(model, theta_max=0.5)
    model(x)
    rp.project(model)
    with pytest.raises(rp.NotRelaxedError, match="no longer relaxed"):
        modulation.step()
