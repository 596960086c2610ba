"""Cheaper penalties with the same expectation (issue 14 item 2): ``penalty_every=k``."""

from __future__ import annotations

import pytest
import torch
from relax_toy.layers import SO2Linear
from torch import nn

import relax_plugins as rp


def relaxed_model() -> nn.Module:
    model = rp.relax(nn.Sequential(SO2Linear(3, 4), SO2Linear(4, 2)).double())
    with torch.no_grad():
        for _, layer in rp.relaxed_modules(model):
            layer.term.weight.normal_()
    rp.set_theta(model, 0.5)
    return model


def test_penalty_every_default_is_the_exact_penalty():
    model = relaxed_model()
    run = rp.RelaxedTraining(model, "constant", total=4)
    model(torch.randn(16, 6, dtype=torch.float64))
    for _ in range(3):
        assert torch.equal(run.penalty(), rp.penalty(model))


@pytest.mark.parametrize("form", ["sqrt", "mean", "paper"])
def test_penalty_every_k_is_k_times_on_every_kth_call_and_graph_free_zero_otherwise(form):
    k = 3
    model = relaxed_model()
    run = rp.RelaxedTraining(model, "constant", total=4, form=form, penalty_every=k)
    x = torch.randn(16, 6, dtype=torch.float64)
    values = []
    for call in range(3 * k):
        out = model(x)
        pen = run.penalty()
        exact = rp.penalty(model, form=form)
        if call % k == 0:
            assert torch.equal(pen, k * exact)
            assert pen.requires_grad
        else:
            assert float(pen) == 0.0 and pen.grad_fn is None and not pen.requires_grad
            assert pen.dtype == exact.dtype and pen.device == exact.device
        (out.square().mean() + pen).backward()  # a training step works on both kinds of call
        values.append(pen.detach())
    # the mean over calls is the exact penalty (constant inputs: exact equality up to rounding)
    assert torch.allclose(torch.stack(values).mean(), exact.detach(), rtol=1e-12)


def test_penalty_every_phase_survives_state_dict_round_trip():
    model = relaxed_model()
    model(torch.randn(8, 6, dtype=torch.float64))
    run = rp.RelaxedTraining(model, "constant", total=4, penalty_every=4)
    for _ in range(5):
        run.penalty()
    resumed = rp.RelaxedTraining(model, "constant", total=4, penalty_every=4)
    resumed.load_state_dict(run.state_dict())
    assert [float(resumed.penalty().detach()) > 0 for _ in range(4)] == [False, False, False, True]


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_penalty_every_rejects_non_positive_integers(bad):
    with pytest.raises(ValueError, match="penalty_every"):
        rp.RelaxedTraining(relaxed_model(), "constant", total=4, penalty_every=bad)
