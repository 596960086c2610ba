"""LearnedModulation (after RECM, arXiv 2602.02853): θ_i follows the non-equivariant share of its layer.

Thresholds come from seeded runs of the toy below (Adam lr 1e-2, rate 0.05, 150 full-batch steps),
seeds 0-4: symmetric teacher, final θ ≤ 0.0005 in both layers (the pure decay 0.95^150) and f ≤ 0.026
all along; fixed-direction target, final θ of the output layer 0.63-0.66 (f 0.62-0.67) while the input
layer drops to ≤ 0.003.
"""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
from relax_toy.layers import SO2Gate, SO2Linear, rotation_2d
from torch import nn

import relax_plugins as rp

STEPS, RATE = 150, 0.05


def model_and_data(symmetric: bool, seed: int = 0):
    torch.manual_seed(seed)
    model = rp.relax(nn.Sequential(SO2Linear(2, 4), SO2Gate(), SO2Linear(4, 1)).double())
    x = torch.randn(256, 4, dtype=torch.float64)
    if symmetric:  # an SO(2)-equivariant teacher: the input-target distribution is symmetric
        y = SO2Linear(2, 1).double()(x).detach()
    else:  # a target that no SO(2)-equivariant map produces: a fixed direction
        y = torch.zeros(256, 2, dtype=torch.float64)
        y[:, 0] = x[:, 0] + x[:, 1] ** 2
    return model, x, y


def train(model, x, y, mod, steps=STEPS, opt=None):
    opt = opt or torch.optim.Adam(model.parameters(), lr=1e-2)
    history = []
    for _ in range(steps):
        loss = (model(x) - y).square().mean() + rp.penalty(model) + mod.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        mod.step()
        history.append((mod.gammas(), mod.violations()))
    return history


def test_theta_stays_a_buffer_and_starts_at_theta_max():
    model, x, y = model_and_data(symmetric=True)
    n_params = len(list(model.parameters()))
    mod = rp.LearnedModulation(model, theta_max=0.7, rate=RATE)
    assert len(list(model.parameters())) == n_params and "0.theta" in dict(model.named_buffers())
    assert rp.get_theta(model) == pytest.approx({"0": 0.7, "2": 0.7})
    assert float(mod.penalty()) == 0.0


@pytest.mark.parametrize("seed", [0, 1])
def test_symmetric_target_returns_every_layer_to_exact_equivariance(seed):
    model, x, y = model_and_data(symmetric=True, seed=seed)
    mod = rp.LearnedModulation(model, rate=RATE)
    history = train(model, x, y, mod)
    assert min(history[0][0].values()) > 0.9
    assert max(f for _, shares in history for f in shares.values()) < 0.05
    assert max(history[-1][0].values()) < 2 * 0.95**STEPS  # ≈ the pure decay (1 − α)^t: nothing kept
    assert rp.get_theta(model) == pytest.approx(history[-1][0], abs=1e-7)  # buffers follow θ_i


@pytest.mark.parametrize("seed", [0, 1])
def test_symmetry_breaking_target_keeps_the_layer_that_breaks_it_relaxed(seed):
    model, x, y = model_and_data(symmetric=False, seed=seed)
    mod = rp.LearnedModulation(model, rate=RATE)
    history = train(model, x, y, mod)
    thetas, shares = history[-1]
    assert thetas["2"] > 0.4 and shares["2"] > 0.4  # measured 0.63-0.66
    assert thetas["0"] < 0.05  # the input layer is not needed to break the symmetry here
    assert all(0.0 <= t <= 1.0 for g, _ in history for t in g.values())


def test_finish_then_project_is_exactly_equivariant():
    model, x, y = model_and_data(symmetric=False)
    mod = rp.LearnedModulation(model, rate=RATE)
    train(model, x, y, mod)
    with pytest.warns(UserWarning, match=r"> 1% of theta_max in \['2'\]"):
        mod.finish()
    assert rp.get_theta(model) == {"0": 0.0, "2": 0.0}
    with torch.no_grad():
        before = model(x)
        projected = rp.project(model)
        after = projected(x)
    assert torch.equal(before, after)  # θ = 0: projecting drops nothing that was in use
    assert rotation_error(projected, x) < 1e-12
    assert all(type(m).__name__ != "RelaxedModule" for m in projected.modules())


def rotation_error(model, x, angle=0.7):
    with torch.no_grad():
        out = model(x)
        rotated = model(x @ rotation_2d(angle, 2, torch.float64).T)
    return float((rotated - out @ rotation_2d(angle, 1, torch.float64).T).abs().max())


def test_finish_inexact_keeps_the_learned_theta():
    model, x, y = model_and_data(symmetric=False)
    mod = rp.LearnedModulation(model, rate=RATE)
    train(model, x, y, mod, steps=60)
    thetas = mod.gammas()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mod.finish(exact=False)
    assert rp.get_theta(model) == pytest.approx(thetas, abs=1e-7) and thetas["2"] > 0.1
    assert rotation_error(model, x) > 1e-2  # only approximately equivariant: not for project()


def test_state_dict_round_trip_resumes_bit_identically():
    model, x, y = model_and_data(symmetric=False)
    mod = rp.LearnedModulation(model, rate=RATE, every=3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train(model, x, y, mod, steps=20, opt=opt)  # 20 = 3·6 + 2: resumes between two measurements
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), mod.state_dict()))
    assert json.loads(json.dumps(saved[2])) == saved[2]  # plain floats
    reference = train(model, x, y, mod, steps=20, opt=opt)

    model2, _, _ = model_and_data(symmetric=False, seed=5)
    mod2 = rp.LearnedModulation(model2, rate=RATE, every=3)  # θ = θ_max until the state is loaded
    opt2 = torch.optim.Adam(model2.parameters(), lr=1e-2)
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    mod2.load_state_dict(saved[2])
    assert rp.get_theta(model2) == pytest.approx(saved[2]["thetas"], abs=1e-7)
    resumed = train(model2, x, y, mod2, steps=20, opt=opt2)
    assert resumed == reference
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))


def test_bad_arguments_raise():
    model, x, _ = model_and_data(symmetric=True)
    for kwargs, name in (({"theta_max": 0.0}, "theta_max"), ({"theta_max": math.inf}, "theta_max"),
                         ({"rate": 0.0}, "rate"), ({"rate": 1.5}, "rate"), ({"rate": math.nan}, "rate"),
                         ({"every": 0}, "every")):
        with pytest.raises(ValueError, match=name):
            rp.LearnedModulation(model, **kwargs)
    for kwargs, name in (({"every": 1.5}, "every"), ({"every": True}, "every"), ({"theta_max": "1"}, "theta_max")):
        with pytest.raises(TypeError, match=name):
            rp.LearnedModulation(model, **kwargs)
    with pytest.raises(rp.NotRelaxedError):
        rp.LearnedModulation(nn.Sequential(SO2Linear(1, 1)))
    mod = rp.LearnedModulation(model)
    with pytest.raises(RuntimeError, match="run the model"):
        mod.step()
    before = mod.state_dict()
    with pytest.raises(ValueError, match="layers"):
        mod.load_state_dict({"thetas": {"0": 0.1}, "shares": {"0": 0.0}, "count": 0})
    with pytest.raises(ValueError, match="not a LearnedModulation state"):
        mod.load_state_dict({"lambdas": {}, "slacks": {}})  # a DualAscentTheta state
    assert mod.state_dict() == before
    rp.DualAscentTheta(model)
    with pytest.raises(ValueError, match="already learnable"):
        rp.LearnedModulation(model)

    class Opaque(rp.RelaxationTerm):
        def forward(self, base, theta, *args, **kwargs):
            return base(*args, **kwargs)

    with pytest.raises(TypeError, match="LinearRelaxation"):
        rp.LearnedModulation(nn.Sequential(rp.RelaxedModule(SO2Linear(1, 1), Opaque())))


def test_load_state_dict_validates_everything_before_changing_anything():
    model = model_and_data(symmetric=True)[0]
    mod = rp.LearnedModulation(model, theta_max=0.5)
    before, thetas = mod.state_dict(), rp.get_theta(model)
    bad_values = (
        ("thetas", math.nan, ValueError, "finite"), ("thetas", math.inf, ValueError, "finite"),
        ("thetas", -0.1, ValueError, ">= 0"), ("thetas", 0.6, ValueError, "theta_max"),
        ("thetas", "abc", TypeError, "real number"), ("thetas", None, TypeError, "real number"),
        ("thetas", True, TypeError, "real number"), ("shares", math.nan, ValueError, "finite"),
        ("shares", -0.5, ValueError, ">= 0"), ("shares", 1.5, ValueError, "share"),
        ("shares", "abc", TypeError, "real number"),
    )
    for key, value, error, match in bad_values:
        state = mod.state_dict()
        state["thetas"]["0"] = 0.25  # a valid value ahead of the bad one must not be applied either
        state[key]["2"] = value
        with pytest.raises(error, match=match):
            mod.load_state_dict(state)
        assert mod.state_dict() == before and rp.get_theta(model) == thetas, (key, value)
    for count, error in ((-1, ValueError), (1.5, TypeError), ("3", TypeError)):
        with pytest.raises(error, match="count"):
            mod.load_state_dict({**mod.state_dict(), "thetas": {"0": 0.25, "2": 0.25}, "count": count})
    with pytest.raises(ValueError, match="layers"):
        mod.load_state_dict({**mod.state_dict(), "shares": [0.0, 0.0]})
    assert mod.state_dict() == before and rp.get_theta(model) == thetas
    good = {"thetas": {"0": 0.25, "2": 0.5}, "shares": {"0": 0.0, "2": 1.0}, "count": 7}
    mod.load_state_dict(good)
    assert mod.state_dict() == good and rp.get_theta(model) == {"0": 0.25, "2": 0.5}


def test_step_on_nonfinite_weights_raises_and_keeps_theta():
    """A NaN/inf W (say after a NaN loss) must not pass min(1, θ·sqrt(nan)) = 1 and drive θ to θ_max."""
    model, x, y = model_and_data(symmetric=True)
    mod = rp.LearnedModulation(model, rate=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    train(model, x, y, mod, steps=4, opt=opt)
    before, thetas = mod.state_dict(), rp.get_theta(model)
    assert max(before["thetas"].values()) < 0.1
    loss = (model(x) - y).square().mean() * math.nan  # a NaN loss: the optimiser step makes W NaN
    opt.zero_grad()
    loss.backward()
    opt.step()
    with pytest.raises(rp.NonFiniteError, match=r"\['0', '2'\].*NaN/inf"):
        mod.step()
    assert mod.state_dict() == before and rp.get_theta(model) == thetas

    model, x, y = model_and_data(symmetric=True)
    mod = rp.LearnedModulation(model)
    model(x)
    with torch.no_grad():
        model[2].term.weight.fill_(math.inf)  # only the output layer: the message names it alone
    with pytest.raises(rp.NonFiniteError, match=r"layer\(s\) \['2'\]"):
        mod.step()
    assert mod.state_dict() == {"thetas": {"0": 1.0, "2": 1.0}, "shares": {"0": 0.0, "2": 0.0}, "count": 0}
