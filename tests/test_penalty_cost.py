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


def test_penalty_every_1_is_the_exact_penalty():
    model = relaxed_model()
    run = rp.RelaxedTraining(model, "constant", total=4, penalty_every=1)
    model(torch.randn(16, 6, dtype=torch.float64))
    for _ in range(3):
        assert torch.equal(run.penalty(), rp.penalty(model))


def test_penalty_every_default_is_4_with_a_schedule_and_1_with_a_policy():
    # 4: the evidence's every4 arm (chosen on validation); the learned policies were measured with 1
    assert rp.RelaxedTraining(relaxed_model(), "constant", total=4).penalty_every == 4 == rp.DEFAULT_PENALTY_EVERY
    model = relaxed_model()
    assert rp.RelaxedTraining(model, rp.DualAscentTheta(model, dual_lr=1e-3)).penalty_every == 1
    model = relaxed_model()
    assert rp.RelaxedTraining(model, rp.DualAscentTheta(model, dual_lr=1e-3), penalty_every=4).penalty_every == 4


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


# -- sample subsampling: penalty_samples, one mechanism for every term that declares it -------------


def test_sample_rows_are_strided_and_penalty_input_rescales_them():
    term = sampled_layer(None)  # 30 recorded rows
    x = term._x
    assert term.subsampled_penalty and term.penalty_samples is None
    assert term.sample_rows(x) is x and term.penalty_input()[0] is x
    term.penalty_samples = 8  # every ⌈30/8⌉ = 4th row: 8 rows; a view, no copy
    rows = term.sample_rows(x)
    assert torch.equal(rows, x[::4]) and rows.data_ptr() == x.data_ptr()
    scaled, n = term.penalty_input()
    assert n == 30 and torch.equal(scaled, x[::4] * (30 / 8) ** 0.5)
    term.penalty_samples = 7  # every 5th row: only 6 rows (at most m), rescaled by √(30/6)
    scaled, n = term.penalty_input()
    assert n == 30 and torch.equal(scaled, x[::5] * 5**0.5)
    # the estimate's sums are the full sums' scale (one sample per recorded row)
    full = sampled_layer(None).penalty_terms()
    sub = term.penalty_terms()
    assert sub.samples == full.samples == 30
    assert 0.2 < float((sub.norm / full.norm).detach()) < 5


class _SubsampledTerm(rp.RelaxationTerm):
    """A term outside LinearRelaxation that declares the capability (and a default of its own)."""

    subsampled_penalty = True
    default_penalty_samples = 3

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))

    def forward(self, base, theta, *args, **kwargs):
        return base(*args, **kwargs)


class _PlainTerm(_SubsampledTerm):
    subsampled_penalty = False


class _TermAdapter:
    def __init__(self, cls: type) -> None:
        self.cls = cls

    @rp.hookimpl
    def relax_make_term(self, module):
        return self.cls() if isinstance(module, SO2Linear) else None


@pytest.fixture
def term_adapter():
    names: list[str] = []

    def register(cls: type) -> str:
        names.append(rp.register_adapter(_TermAdapter(cls), name=f"terms{len(names)}"))
        return names[-1]

    yield register
    for name in names:
        rp.unregister_adapter(name)


def test_relax_sets_penalty_samples_on_every_declaring_term(term_adapter):
    name = term_adapter(_SubsampledTerm)
    model = rp.relax(nn.Sequential(SO2Linear(2, 2)), adapters=[name])
    assert model[0].term.penalty_samples == 3  # the term's declared default
    model = rp.relax(nn.Sequential(SO2Linear(2, 2)), adapters=[name], penalty_samples=11)
    assert model[0].term.penalty_samples == 11  # the user's value overrides it
    model = rp.relax(nn.Sequential(SO2Linear(2, 2)), adapters=[name], penalty_samples="all")
    assert model[0].term.penalty_samples is None  # every sample: exact penalties, defaults overridden
    for bad, error in (("most", ValueError), ("All", ValueError), (0, ValueError), (2.5, TypeError)):
        fresh = nn.Sequential(SO2Linear(2, 2))
        with pytest.raises(error, match="penalty_samples"):
            rp.relax(fresh, adapters=[name], penalty_samples=bad)
        assert type(fresh[0]) is SO2Linear


def test_penalty_samples_refused_where_no_term_declares_it(term_adapter):
    name = term_adapter(_PlainTerm)
    model = nn.Sequential(SO2Linear(2, 2))
    for value in (4, "all"):
        with pytest.raises(ValueError, match="subsampled_penalty"):
            rp.relax(model, adapters=[name], penalty_samples=value)
    assert type(model[0]) is SO2Linear  # unchanged
    assert rp.relax(model, adapters=[name])[0].term.penalty_samples == 3  # not declared: left alone


def test_a_bad_declared_default_is_an_adapter_error(term_adapter):
    class Bad(_SubsampledTerm):
        default_penalty_samples = 0

    name = term_adapter(Bad)
    model = nn.Sequential(SO2Linear(2, 2))
    with pytest.raises(rp.AdapterError, match="default_penalty_samples"):
        rp.relax(model, adapters=[name])
    assert type(model[0]) is SO2Linear


class _TwoInputs(nn.Module):
    """Two layers of equal shape (one penalty group) that see different numbers of samples."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = SO2Linear(3, 3), SO2Linear(3, 3)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.a(x).sum() + self.b(z).sum()


@pytest.mark.parametrize("form", ["sqrt", "mean", "paper"])
def test_batched_group_with_unequal_sample_counts_scales_each_layer_by_its_own(form):
    torch.manual_seed(1)
    model = rp.relax(_TwoInputs().double())
    with torch.no_grad():
        for _, layer in rp.relaxed_modules(model):
            layer.term.weight.normal_()
    model(torch.randn(16, 6, dtype=torch.float64), torch.randn(40, 6, dtype=torch.float64))
    terms = [layer.term for _, layer in rp.relaxed_modules(model)]
    assert terms[0].batchable_penalty() == terms[1].batchable_penalty() is not None  # one group
    # per layer from the samples themselves (no moments, no batching)
    exact = [t._penalty_from_samples(t._x) for t in terms]
    scale = [1.0 if form == "paper" else 1.0 / t.samples for t in exact]
    lie = sum(t.lie * s for t, s in zip(exact, scale))
    norm = sum(t.norm * s for t, s in zip(exact, scale))
    want = 2.0 * lie + 3.0 * norm if form == "mean" else 2.0 * torch.sqrt(lie + 1e-12) + 3.0 * torch.sqrt(norm + 1e-12)
    got = rp.penalty(model, lie=2.0, norm=3.0, form=form, eps=1e-12)
    assert torch.allclose(got, want, rtol=1e-10)


def test_stacked_generator_cache_gives_the_uncached_penalty_and_follows_dtype():
    from relax_plugins import moments

    model = relaxed_model()
    x = torch.randn(16, 6, dtype=torch.float64)
    model(x)
    first = rp.penalty(model)
    cached = rp.penalty(model)
    moments._STACK_CACHE.clear()
    assert torch.equal(first, cached) and torch.equal(rp.penalty(model), first)
    # float32 weights: the group is computed with float32 generators, a new cache entry
    model.float()
    model(x.float())
    got = rp.penalty(model)
    moments._STACK_CACHE.clear()
    assert got.dtype == torch.float32 and torch.equal(got, rp.penalty(model))
    assert torch.allclose(got.double(), first, rtol=1e-5)


def test_stacked_generator_cache_is_bounded():
    from relax_plugins import moments

    for _ in range(moments._STACK_CACHE_SIZE + 4):
        model = relaxed_model()  # new symmetries each time: new entries
        model(torch.randn(16, 6, dtype=torch.float64))
        rp.penalty(model)
    assert len(moments._STACK_CACHE) <= moments._STACK_CACHE_SIZE


def _moment_inputs(seed: int, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(seed)
    L, K, d_in, d_out = 3, 4, 5, 6
    W = torch.randn(L, d_out, d_in, generator=g, dtype=dtype, requires_grad=True)
    X = torch.randn(L, 40, d_in, generator=g, dtype=dtype)
    S = X.transpose(1, 2) @ X
    G_in = torch.randn(L, K, d_in, d_in, generator=g, dtype=dtype)
    G_out = torch.randn(L, K * d_out, d_out, generator=g, dtype=dtype)
    return W, S, G_in.permute(0, 2, 1, 3).reshape(L, d_in, K * d_in), G_out


@pytest.mark.parametrize("seed", [0, 1])
def test_closed_form_gradient_of_the_moment_penalty_equals_autograd(seed):
    """The dense moment penalty's hand-written backward (C S and W S reused from the forward) gives
    autograd's gradient of the same sums, and its create_graph backward is differentiable again."""
    from relax_plugins import moments

    W, S, G_in, G_out = _moment_inputs(seed)
    weights = torch.tensor([0.7, -1.3], dtype=torch.float64)

    def via(fn):
        lie, norm = fn(W, S, G_in, G_out)[:2]
        return weights[0] * lie.sum() + weights[1] * norm.sum()

    (want,) = torch.autograd.grad(via(moments._dense_moments), W)
    (got,) = torch.autograd.grad(via(moments._DenseMoments.apply), W)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda w: moments._DenseMoments.apply(w, S, G_in, G_out), (W,))
    assert torch.autograd.gradgradcheck(lambda w: moments._DenseMoments.apply(w, S, G_in, G_out), (W,))


def test_moment_penalty_takes_the_closed_form_only_where_autograd_runs(monkeypatch):
    """Under torch.func (hessian in W) and without grad the plain operations run; with grad the
    closed form does, and both give the same penalty."""
    from relax_plugins import moments

    calls = []
    real = moments._DenseMoments.apply
    monkeypatch.setattr(moments._DenseMoments, "apply", lambda *a: calls.append(1) or real(*a))
    model = relaxed_model()
    model(torch.randn(32, 6, dtype=torch.float64))
    with_grad = rp.penalty(model)
    assert calls and with_grad.requires_grad
    calls.clear()
    with torch.no_grad():
        without = rp.penalty(model)
    assert not calls and torch.allclose(without, with_grad.detach(), rtol=1e-12)


def test_closed_form_gradient_under_bf16_autocast_matches_autograd():
    """Under CPU autocast the forward's products run in bf16; the hand-written backward follows them
    (no dtype clash) and agrees with autograd's gradient to bf16 precision (8 bits of mantissa)."""
    from relax_plugins import moments

    W, S, G_in, G_out = _moment_inputs(0, torch.float32)
    grads = []
    for fn in (moments._dense_moments, moments._DenseMoments.apply):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lie, norm = fn(W, S, G_in, G_out)[:2]
        (g,) = torch.autograd.grad((lie.float().sum() + norm.float().sum()), W)
        assert g.dtype == W.dtype
        grads.append(g)
    assert torch.allclose(grads[0], grads[1], rtol=0.05, atol=0.05 * float(grads[0].abs().max()))
