"""Cheaper penalties with the same expectation (issue 14 item 2): ``penalty_every=k`` and generator
sampling (``term.penalty_generators = m``)."""

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


@pytest.mark.parametrize("bad, error", [(0, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError)])
def test_penalty_every_rejects_non_positive_integers(bad, error):
    with pytest.raises(error, match="penalty_every"):
        rp.RelaxedTraining(relaxed_model(), "constant", total=4, penalty_every=bad)


# -- generator sampling ------------------------------------------------------------------------


def sampled_layer(rank: int | None):
    from relax_plugins import LinearRelaxation, Symmetry

    g = torch.Generator().manual_seed(1)
    anti = [torch.randn(d, d, generator=g, dtype=torch.float64) for d in (5, 4) for _ in range(3)]
    lie_in = torch.stack([a - a.T for a in anti[:3]])
    lie_out = torch.stack([a - a.T for a in anti[3:]])
    sym = Symmetry(5, 4, lie_in=lie_in, lie_out=lie_out, group_in=torch.randn(1, 5, 5, generator=g).double(),
                   group_out=torch.randn(1, 4, 4, generator=g).double())
    term = LinearRelaxation(sym, rank=rank).double()
    with torch.no_grad():
        for p in term.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    x = torch.randn(30, 5, generator=g, dtype=torch.float64)
    term.record(x, x)
    return term


@pytest.mark.parametrize("rank", [None, 2], ids=["dense", "low-rank"])
def test_generator_sampling_is_unbiased(rank, monkeypatch):
    import itertools

    from relax_plugins.term import moment_penalties

    term = sampled_layer(rank)
    exact = term.penalty_terms()
    term.penalty_generators = 2  # of K = 4 (three Lie generators, one finite)
    inputs = [term.penalty_input()]
    # the expectation, exactly: the mean over all C(4, 2) equally likely subsets
    subsets = [torch.tensor(c) for c in itertools.combinations(range(4), 2)]
    it = iter(subsets)
    monkeypatch.setattr(term, "sample_generators", lambda count: next(it))
    values = [moment_penalties([term], inputs)[0] for _ in subsets]
    assert torch.allclose(torch.stack([v.lie for v in values]).mean(), exact.lie, rtol=1e-12)
    assert all(torch.equal(v.norm, exact.norm) for v in values)  # the norm term is not sampled
    assert len({round(float(v.lie.detach()), 8) for v in values}) > 1  # single draws do differ
    monkeypatch.undo()
    # the draws themselves: uniform (the empirical mean converges), from the term's own stream
    state = torch.get_rng_state()
    draws = torch.stack([term.penalty_terms().lie.detach() for _ in range(3000)])
    assert torch.equal(torch.get_rng_state(), state)
    assert abs(float(draws.mean() / exact.lie.detach()) - 1) < 0.03
