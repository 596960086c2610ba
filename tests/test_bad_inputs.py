"""Misuse: every bad argument, bad plugin result or bad state raises a typed error up front and
leaves the model exactly as it was (module tree, state_dict, train/eval modes)."""

from __future__ import annotations

import io
import math

import pytest
import torch
from relax_toy.layers import SO2Linear
from relax_toy.plugin import SO2Relaxation
from torch import nn

import relax_plugins as rp
from relax_plugins.schedules import FromCallable, Triangular, as_schedule


# -- helpers ------------------------------------------------------------------------------------
def plain() -> nn.Sequential:
    return nn.Sequential(SO2Linear(2, 2), nn.Tanh(), SO2Linear(2, 2))


def relaxed() -> nn.Sequential:
    return rp.relax(plain())


def ran(model: nn.Module) -> nn.Module:
    model(torch.randn(6, 4))
    return model


def snapshot(model):
    tree = [(name, type(m)) for name, m in model.named_modules(remove_duplicate=False)]
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    return tree, state, modes


def assert_intact(model, snap) -> None:
    tree, state, modes = snapshot(model)
    assert tree == snap[0], "module tree changed"
    assert state.keys() == snap[1].keys(), "state_dict keys changed"
    for k, v in state.items():
        assert torch.equal(v, snap[1][k]) or (v.isnan().all() and snap[1][k].isnan().all()), f"{k} changed"
    assert modes == snap[2], "train/eval modes changed"


def check(model, call, exc, match=None):
    """``call(model)`` raises ``exc`` and leaves ``model`` intact."""
    snap = snapshot(model)
    with pytest.raises(exc, match=match):
        call(model)
    assert_intact(model, snap)


# -- relax(): arguments ------------------------------------------------------------------------
RELAX_CASES = [
    ("adapters_int", {"adapters": 3}, TypeError, "adapters"),
    ("adapters_unknown", {"adapters": ["nope"]}, rp.UnknownAdapterError, "nope"),
    ("adapters_list_of_int", {"adapters": [1]}, TypeError, "adapters"),
    ("include_int", {"include": 3}, TypeError, "include"),
    ("include_list_of_int", {"include": [3]}, TypeError, "include"),
    ("include_dict", {"include": {"0": 1}}, TypeError, "include"),
    ("exclude_int", {"exclude": 5}, TypeError, "exclude"),
    ("rank_bool", {"rank": True}, TypeError, "rank"),
    ("rank_float", {"rank": 2.5}, TypeError, "rank"),
    ("rank_str", {"rank": "2"}, TypeError, "rank"),
    ("rank_zero", {"rank": 0}, ValueError, "rank"),
    ("rank_negative", {"rank": -3}, ValueError, "rank"),
    ("init_std_nan", {"init_std": math.nan}, ValueError, "init_std"),
    ("init_std_inf", {"init_std": math.inf}, ValueError, "init_std"),
    ("init_std_negative", {"init_std": -0.1}, ValueError, "init_std"),
    ("init_std_str", {"init_std": "0.1"}, TypeError, "init_std"),
    ("init_std_bool", {"init_std": True}, TypeError, "init_std"),
    ("penalty_samples_bool", {"penalty_samples": True}, TypeError, "penalty_samples"),
    ("penalty_samples_zero", {"penalty_samples": 0}, ValueError, "penalty_samples"),
    ("penalty_samples_float", {"penalty_samples": 2.5}, TypeError, "penalty_samples"),
    ("penalty_samples_nan", {"penalty_samples": math.nan}, TypeError, "penalty_samples"),
    ("options_list", {"adapter_options": [1]}, TypeError, "adapter_options"),
    ("options_int_key", {"adapter_options": {1: 2}}, TypeError, "adapter_options"),
    ("options_override_rank", {"adapter_options": {"rank": 2}}, ValueError, "rank"),
    ("options_override_rank_namespaced", {"adapter_options": {"toy": {"rank": 2}}}, ValueError, "rank"),
    ("options_unknown_flat_key", {"adapter_options": {"escnn_penalt": "defect"}}, ValueError, "escnn_penalt"),
    ("options_unknown_key", {"adapter_options": {"escnn": {"escnn_penalt": "defect"}}}, ValueError, "escnn_penalty"),
    ("options_unknown_adapter", {"adapter_options": {"escn": {"escnn_penalty": "defect"}}}, rp.UnknownAdapterError,
     "escn.*loaded adapters"),
    ("options_wrong_type", {"adapter_options": {"toy": {"subgroup": "2"}}}, TypeError, r"toy\.subgroup.*int"),
    ("options_not_a_dict", {"adapter_options": {"toy": 2}}, TypeError, "toy"),
    ("options_unread_key", {"adapter_options": {"e3nn": {"subgroup": "SO(3)"}}}, ValueError, "not read"),
    ("options_left_out_adapter", {"adapter_options": {"vn": {"vn_group": "O(3)"}}, "adapters": "toy"}, ValueError,
     "leaves out"),
    ("include_matches_nothing", {"include": ["encoder.*"]}, ValueError, r"include patterns.*match no module"),
    ("toy_subgroup_not_dividing", {"adapter_options": {"toy": {"subgroup": 3}}, "adapters": "toy"}, None, None),
]


@pytest.mark.parametrize("kwargs,exc,match", [c[1:] for c in RELAX_CASES if c[2] is not None],
                         ids=[c[0] for c in RELAX_CASES if c[2] is not None])
def test_relax_rejects_bad_arguments(kwargs, exc, match):
    check(plain(), lambda m: rp.relax(m, **kwargs), exc, match)


@pytest.mark.parametrize("model", ["abc", None, 3, [SO2Linear(1, 1)]], ids=["str", "none", "int", "list"])
def test_relax_rejects_non_modules(model):
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        rp.relax(model)


def test_relax_nothing_to_relax():
    check(nn.Sequential(nn.Linear(2, 2)), rp.relax, rp.NothingToRelaxError)


def test_relax_twice():
    check(relaxed(), rp.relax, rp.AlreadyRelaxedError)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")
def test_relax_refuses_a_model_already_wrapped_for_distributed_training(tmp_path):
    """DDP registers its parameters for all-reduce when built: a W added later would train per replica."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        check(nn.parallel.DistributedDataParallel(plain()), rp.relax, ValueError, "Relax the plain model first")
        nested = nn.Sequential(nn.parallel.DistributedDataParallel(plain()))
        check(nested, rp.relax, ValueError, "at '0'")
        # the right order works: relax, then wrap (W is registered and gets its gradient)
        model = nn.parallel.DistributedDataParallel(rp.relax(plain()))
        rp.set_theta(model.module, 1.0)
        model(torch.randn(6, 4)).sum().backward()
        assert all(p.grad is not None for p in rp.relaxation_parameters(model.module))
    finally:
        dist.destroy_process_group()


def test_relax_accepts_single_device_data_parallel():
    model = rp.relax(nn.DataParallel(plain()))  # no replicas on one device (or the CPU): it just calls the module
    assert [n for n, _ in rp.relaxed_modules(model)] == ["module.0", "module.2"]


def test_relax_under_inference_mode_gives_trainable_weights():
    model = plain()
    with torch.inference_mode():
        rp.relax(model)
    assert not any(t.is_inference() for t in (*model.parameters(), *model.buffers()))
    rp.set_theta(model, 1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    (model(torch.randn(6, 4)).sum() + rp.penalty(model)).backward()
    opt.step()


def test_tied_layer_selected_at_one_use_only():
    layer = SO2Linear(2, 2)
    check(nn.Sequential(layer, nn.Tanh(), layer), lambda m: rp.relax(m, exclude=["2"]), ValueError, "tied")


def test_keyboard_interrupt_during_relax_rolls_back(monkeypatch):
    model = plain()
    snap = snapshot(model)
    original, calls = nn.Module.set_submodule, []

    def interrupted(self, target, module, *args, **kwargs):
        calls.append(target)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, target, module, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "set_submodule", interrupted)
    with pytest.raises(KeyboardInterrupt):
        rp.relax(model)
    monkeypatch.undo()
    assert_intact(model, snap)


# -- relax(): what plugins return is validated before it touches the model ----------------------
class _Adapter:
    """A run-time adapter for SO2Linear whose hooks return ``term`` / ``wrapper``."""

    def __init__(self, term=None, wrapper=None, fail=False):
        self.term, self.wrapper, self.fail = term, wrapper, fail

    @rp.hookimpl
    def relax_make_term(self, module, options):
        if not isinstance(module, SO2Linear):
            return None
        if self.fail:
            raise RuntimeError("adapter bug")
        return self.term(module) if callable(self.term) else self.term

    @rp.hookimpl
    def relax_wrapper_class(self, module):
        return self.wrapper


@pytest.fixture
def bad_adapter():
    names = []

    def register(**kwargs):
        names.append(rp.register_adapter(_Adapter(**kwargs), name=f"bad{len(names)}"))
        return names[-1]

    yield register
    for n in names:
        rp.unregister_adapter(n)


def _good_term(module):
    sym = rp.Symmetry(4, 4, lie_in=torch.eye(4)[None], lie_out=torch.eye(4)[None])
    return SO2Relaxation(sym)


def _nan_term(module):
    term = _good_term(module)
    with torch.no_grad():
        term.weight.fill_(math.nan)
    return term


class _HoldsLayer(SO2Relaxation):
    pass


def _term_holding_layer(module):
    term = _HoldsLayer(rp.Symmetry(4, 4, lie_in=torch.eye(4)[None], lie_out=torch.eye(4)[None]))
    term.layer = module  # registers the user's layer (and its parameters) a second time
    return term


@pytest.mark.parametrize(
    "kwargs,exc",
    [
        ({"term": "not a term"}, rp.AdapterError),
        ({"term": nn.Linear(4, 4)}, rp.AdapterError),
        ({"term": _nan_term}, rp.NonFiniteError),
        ({"term": _term_holding_layer}, rp.AdapterError),
        ({"fail": True}, rp.AdapterError),
        ({"term": _good_term, "wrapper": int}, rp.AdapterError),
        ({"term": _good_term, "wrapper": "RelaxedModule"}, rp.AdapterError),
    ],
    ids=["str", "module", "nan_weights", "holds_layer", "raises", "wrapper_int", "wrapper_str"],
)
def test_plugin_results_are_validated(bad_adapter, kwargs, exc):
    name = bad_adapter(**kwargs)
    check(plain(), lambda m: rp.relax(m, adapters=[name]), exc)


def test_same_term_for_two_layers_is_refused(bad_adapter):
    shared = _good_term(None)
    name = bad_adapter(term=lambda module: shared)
    check(plain(), lambda m: rp.relax(m, adapters=[name]), rp.AdapterError, "already used")


# -- set_theta / get_theta ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "value,exc",
    [
        (math.nan, ValueError), (math.inf, ValueError), (-0.5, ValueError), ("0.5", TypeError), (True, TypeError),
        (None, TypeError), (torch.tensor([0.5, 0.2]), TypeError), ({"0": "x"}, TypeError),
        ({"0": 0.5, "2": math.nan}, ValueError), ({"nope": 0.5}, KeyError), ({0: 0.5}, KeyError),
    ],
    ids=["nan", "inf", "negative", "str", "bool", "none", "tensor2", "dict_str", "dict_partly_nan", "dict_unknown",
         "dict_int_key"],
)
def test_set_theta_rejects(value, exc):
    check(relaxed(), lambda m: rp.set_theta(m, value), exc)


@pytest.mark.parametrize("fn", [rp.set_theta, rp.get_theta, rp.project, rp.projection_report,
                                rp.projected_state_dict, rp.penalty])
def test_functions_need_a_relaxed_model(fn):
    args = (0.5,) if fn is rp.set_theta else ()
    check(plain(), lambda m: fn(m, *args), rp.NotRelaxedError)


@pytest.mark.parametrize("fn", [rp.set_theta, rp.penalty, rp.project, rp.projection_report, rp.get_theta])
def test_functions_reject_non_modules(fn):
    args = (0.5,) if fn is rp.set_theta else ()
    with pytest.raises(TypeError, match="model"):
        fn("model", *args)


# -- penalty -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"eps": 0.0}, ValueError, "eps"), ({"eps": -1e-9}, ValueError, "eps"), ({"lie": "a"}, TypeError, "lie"),
        ({"lie": True}, TypeError, "lie"), ({"norm": -1.0}, ValueError, "norm"),
        ({"norm": math.nan}, ValueError, "norm"),
        ({"form": "x"}, ValueError, "form"), ({"form": 1}, ValueError, "form"),
    ],
    ids=["eps0", "eps_negative", "lie_str", "lie_bool", "norm_negative", "norm_nan", "form_unknown", "form_int"],
)
def test_penalty_rejects(kwargs, exc, match):
    check(ran(relaxed()), lambda m: rp.penalty(m, **kwargs), exc, match)


def test_penalty_eps0_allowed_without_roots_and_finite_gradients_at_w0():
    model = ran(relaxed())
    rp.penalty(model, form="mean", eps=0.0).backward()
    pen = rp.penalty(ran(relaxed()))  # default eps > 0: finite gradients at W = 0
    pen.backward()


def test_penalty_before_any_forward():
    check(relaxed(), rp.penalty, rp.RelaxError, "forward")


def test_penalty_non_finite_weights_named():
    model = ran(relaxed())
    with torch.no_grad():
        model[2].term.weight.fill_(math.nan)
    check(model, rp.penalty, rp.NonFiniteError, "'2'.*relaxation weights")


def test_penalty_non_finite_input_named():
    model = relaxed()
    x = torch.randn(6, 4)
    x[0, 0] = math.inf
    model(x)
    check(model, rp.penalty, rp.NonFiniteError, "'0'.*recorded")


def test_penalty_terms_of_a_plugin_are_validated(bad_adapter):
    class BadPenalty(SO2Relaxation):
        def penalty_terms(self):
            return (1.0, 2.0)

        def batchable_penalty(self):
            return None

    name = bad_adapter(term=lambda m: BadPenalty(rp.Symmetry(4, 4, lie_in=torch.eye(4)[None],
                                                             lie_out=torch.eye(4)[None])))
    model = ran(rp.relax(plain(), adapters=[name]))
    check(model, rp.penalty, rp.AdapterError, "PenaltyTerms")


# -- project -----------------------------------------------------------------------------------
@pytest.mark.parametrize("merge", ["no", 1, None])
def test_project_merge_must_be_bool(merge):
    check(relaxed(), lambda m: rp.project(m, merge=merge), TypeError, "merge")
    check(relaxed(), lambda m: rp.projected_state_dict(m, merge=merge), TypeError, "merge")


def test_project_merge_refuses_nan_relaxation():
    model = relaxed()
    rp.set_theta(model, 0.5)
    with torch.no_grad():
        model[0].term.weight.fill_(math.nan)
    check(model, lambda m: rp.project(m, merge=True), rp.NonFiniteError, "'0'")
    check(model, lambda m: rp.projected_state_dict(m, merge=True), rp.NonFiniteError, "'0'")


@pytest.mark.parametrize("answer, match", [
    (None, "declares can_merge"), (True, "not a dict"), ({"nope": torch.zeros(1)}, "'nope'.*not an entry"),
    ({"a": torch.zeros(7)}, "shape"), ({"a": torch.full((2, 2), math.nan)}, "non-finite"),
])
def test_project_merge_delta_is_validated(monkeypatch, answer, match):
    model = relaxed()
    rp.set_theta(model, 0.5)
    with torch.no_grad():
        model[2].term.weight.normal_()
    monkeypatch.setattr(SO2Relaxation, "merge_delta", lambda self, base, theta: answer)
    exc = rp.NonFiniteError if match == "non-finite" else rp.AdapterError
    check(model, lambda m: rp.project(m, merge=True), exc, match)
    check(model, lambda m: rp.projected_state_dict(m, merge=True), exc, match)


def test_keyboard_interrupt_during_merge_rolls_back(monkeypatch):
    model = relaxed()
    rp.set_theta(model, 0.5)
    with torch.no_grad():
        for _, layer in rp.relaxed_modules(model):
            layer.term.weight.normal_()
    calls = []

    def interrupted(self, base):
        # after the core added this layer's delta (and the first layer's): everything is rolled back
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(SO2Relaxation, "after_merge", interrupted)
    check(model, lambda m: rp.project(m, merge=True), KeyboardInterrupt)
    assert len(calls) == 2


# -- schedules ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make,exc",
    [
        (lambda: Triangular(total=0), ValueError), (lambda: Triangular(total=2.5), TypeError),
        (lambda: Triangular(total=True), TypeError), (lambda: Triangular(total="5"), TypeError),
        (lambda: Triangular(total=5, peak=-1), ValueError), (lambda: Triangular(total=5, peak="1"), TypeError),
        (lambda: Triangular(total=5, peak=math.inf), ValueError), (lambda: Triangular(total=5)(-1), ValueError),
        (lambda: Triangular(total=5)(1.5), TypeError), (lambda: FromCallable(3, total=5), TypeError),
        (lambda: FromCallable(lambda t: math.nan, total=5)(0), ValueError),
        (lambda: FromCallable(lambda t: -1.0, total=5)(0), ValueError),
        (lambda: as_schedule("tri", total=3), ValueError), (lambda: as_schedule(3, total=3), TypeError),
        (lambda: as_schedule("cosine", total=0), ValueError),
    ],
    ids=["total0", "total_float", "total_bool", "total_str", "peak_negative", "peak_str", "peak_inf", "index_negative",
         "index_float", "fn_not_callable", "fn_nan", "fn_negative", "unknown_name", "spec_int", "named_total0"],
)
def test_schedules_reject(make, exc):
    with pytest.raises(exc):
        make()


# -- RelaxedTraining ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args,kwargs,exc",
    [
        (("triangular",), {}, ValueError), (("triangular", 0), {}, ValueError), (("triangular", 2.5), {}, TypeError),
        (("triangular", 3), {"lie": -1.0}, ValueError), (("triangular", 3), {"form": "x"}, ValueError),
        (("triangular", 3), {"norm": "0.1"}, TypeError), ((Triangular(4), 7), {}, ValueError),
        (("tri", 3), {}, ValueError),
    ],
    ids=["no_total", "total0", "total_float", "lie_negative", "form", "norm_str", "total_contradicts", "name"],
)
def test_relaxed_training_rejects(args, kwargs, exc):
    check(relaxed(), lambda m: rp.RelaxedTraining(m, *args, **kwargs), exc)


@pytest.mark.parametrize("loss", [1.0, torch.ones(3), torch.tensor(1)], ids=["float", "vector", "int_tensor"])
def test_relaxed_training_loss_needs_a_scalar_tensor(loss):
    model = ran(relaxed())
    run = rp.RelaxedTraining(model, "triangular", total=3)
    check(model, lambda m: run.loss(loss), TypeError, "task_loss")
    assert run.history == []


def test_relaxed_training_needs_relaxed_model():
    check(plain(), lambda m: rp.RelaxedTraining(m, "triangular", 3), rp.NotRelaxedError)


@pytest.mark.parametrize(
    "state",
    [
        {"a": 1}, {"position": 1, "history": [], "schedule": "Cosine(total=3, peak=1.0)"},
        {"position": -1, "history": [], "schedule": "Triangular(total=3, peak=1.0)"},
        {"position": 1.5, "history": [], "schedule": "Triangular(total=3, peak=1.0)"},
        {"position": 1, "history": "x", "schedule": "Triangular(total=3, peak=1.0)"}, [1, 2],
    ],
    # (a position past the schedule's end is a state advance() makes: it loads, see test_training.py)
    ids=["foreign_keys", "other_schedule", "negative", "float_position", "history_str", "list"],
)
def test_relaxed_training_load_state_dict_checks_ownership(state):
    model = relaxed()
    run = rp.RelaxedTraining(model, "triangular", total=3)
    run.advance()
    before = run.state_dict()
    check(model, lambda m: run.load_state_dict(state), (ValueError, TypeError))
    assert run.state_dict() == before


# -- DualAscentTheta ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,exc",
    [({"init": "a"}, TypeError), ({"dual_lr": -1.0}, ValueError), ({"resilient": 1}, TypeError),
     ({"augmented": math.nan}, ValueError), ({"slack_cost": True}, TypeError)],
    ids=["init_str", "dual_lr_negative", "resilient_int", "augmented_nan", "slack_cost_bool"],
)
def test_dual_rejects(kwargs, exc):
    check(relaxed(), lambda m: rp.DualAscentTheta(m, **kwargs), exc)


def test_dual_twice():
    model = relaxed()
    rp.DualAscentTheta(model)
    check(model, rp.DualAscentTheta, ValueError, "already learnable")


@pytest.mark.parametrize(
    "state",
    [{"lambdas": {"zz": 1.0}, "slacks": {"zz": 0.0}},
     {"lambdas": {"0": 1.0, "2": -1.0}, "slacks": {"0": 0.0, "2": 0.0}},
     {"lambdas": {"0": 1.0, "2": math.nan}, "slacks": {"0": 0.0, "2": 0.0}}, {"x": 1}, "state"],
    ids=["foreign_layers", "negative", "nan", "foreign_keys", "str"],
)
def test_dual_load_state_dict_checks_ownership(state):
    model = relaxed()
    dual = rp.DualAscentTheta(model)
    before = dual.state_dict()
    check(model, lambda m: dual.load_state_dict(state), (ValueError, TypeError))
    assert dual.state_dict() == before


def test_dual_step_refuses_nan_theta():
    model = relaxed()
    dual = rp.DualAscentTheta(model)
    with torch.no_grad():
        model[0].theta.fill_(math.nan)
    before = dual.state_dict()
    check(model, lambda m: dual.step(), rp.NonFiniteError, "'0'|0")
    assert dual.state_dict() == before


# -- diagnostics -------------------------------------------------------------------------------
def test_equivariance_report_rejects():
    check(plain(), lambda m: rp.equivariance_report(m, torch.randn(3, 4)), rp.NotRelaxedError)
    check(relaxed(), lambda m: rp.equivariance_report(m, torch.randn(3, 4), error_fn=3), TypeError, "error_fn")
    check(relaxed(), lambda m: rp.equivariance_report(m), TypeError, "inputs")
    check(relaxed(), lambda m: rp.equivariance_report(m, torch.randn(3, 4), merge="yes"), TypeError, "merge")
    check(relaxed(), lambda m: rp.equivariance_report(m, torch.randn(3, 4), error_fn=lambda _: math.nan),
          ValueError, "error_fn")
    with pytest.raises(TypeError, match="report"):
        rp.format_report([1, 2])
    with pytest.raises(TypeError, match="report"):
        rp.save_report({"model": {}}, "x.json")


def test_adapter_registry_rejects():
    with pytest.raises(TypeError, match="name"):
        rp.register_adapter(_Adapter(), name=3)
    with pytest.raises(TypeError, match="plugin"):
        rp.register_adapter("relax_toy.plugin")
    with pytest.raises(TypeError, match="name"):
        rp.unregister_adapter(3)
    with pytest.raises(rp.UnknownAdapterError):
        rp.unregister_adapter("never-registered")


def test_lightning_callback_rejects():
    pytest.importorskip("pytorch_lightning")
    from relax_plugins.lightning import RelaxationCallback

    for kwargs, exc in [({"per": "batch"}, ValueError), ({"schedule": "tri"}, ValueError),
                        ({"lie": -1.0}, ValueError), ({"merge": "yes"}, TypeError), ({"schedule": 3}, TypeError)]:
        with pytest.raises(exc):
            RelaxationCallback(**kwargs)


# -- the model is never changed by diagnostics -------------------------------------------------
def test_reports_leave_model_state_alone():
    torch.manual_seed(1)
    model = rp.relax(nn.Sequential(SO2Linear(2, 2), nn.BatchNorm1d(4), nn.Dropout(0.5), SO2Linear(2, 2)))
    rp.set_theta(model, 0.5)
    model.train()
    model[2].eval()  # a mixed mode must survive too
    x = torch.randn(8, 4)
    model(x)
    recorded = model[0].term._x.clone()
    batch = torch.randn(5, 4)
    snap = snapshot(model)
    rng = torch.get_rng_state()
    report = rp.equivariance_report(model, batch, error_fn=lambda m: float(m(torch.randn(3, 4)).sum()))
    rp.projection_report(model)
    assert_intact(model, snap)
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(model[0].term._x, recorded), "the user's recorded batch was replaced"
    assert set(report["layers"]) == {"0", "3"}


@pytest.mark.parametrize("tied", [False, True], ids=["unmatched-include", "tied-layer-half-selected"])
def test_failed_relax_leaves_the_random_stream_alone(tied):
    # low-rank factors are drawn while the terms are built, before the last checks can fail
    layer = SO2Linear(2, 2)
    model = nn.Sequential(layer, nn.Tanh(), layer if tied else SO2Linear(2, 2))
    torch.manual_seed(0)
    rng = torch.get_rng_state()
    with pytest.raises(ValueError, match="same object" if tied else "match no module"):
        rp.relax(model, rank=1, include=["0"] if tied else ["0", "typo"])
    assert torch.equal(torch.get_rng_state(), rng)
    assert not any(True for _ in rp.relaxed_modules(model))


# -- fixed silent-wrong cases ------------------------------------------------------------------
def test_tied_layer_is_relaxed_at_every_use_and_projected_back():
    layer = SO2Linear(2, 2)
    model = nn.Sequential(layer, nn.Tanh(), layer)
    rp.relax(model)
    assert isinstance(model[0], rp.RelaxedModule) and model[0] is model[2]
    rp.set_theta(model, 1.0)
    with torch.no_grad():
        model[0].term.weight.normal_()
    x = torch.randn(5, 4)
    expected = model[0](torch.tanh(model[0](x)))
    assert torch.allclose(model(x), expected)
    state = rp.projected_state_dict(model)
    assert set(state) == {"0.a", "0.b", "2.a", "2.b"}
    rp.project(model)
    assert model[0] is layer and model[2] is layer


def test_include_and_exclude_take_a_single_pattern_string():
    model = nn.Sequential()
    model.add_module("encoder", nn.Sequential(SO2Linear(1, 1)))
    model.add_module("decoder", nn.Sequential(SO2Linear(1, 1)))
    assert [n for n, _ in rp.relaxed_modules(rp.relax(model, include="encoder.*"))] == ["encoder.0"]
    model = rp.project(model)
    assert [n for n, _ in rp.relaxed_modules(rp.relax(model, exclude="encoder.*"))] == ["decoder.0"]


def test_saved_model_does_not_carry_the_last_batch():
    model = relaxed()
    small = io.BytesIO()
    torch.save(model, small)
    model(torch.randn(20000, 4))
    big = io.BytesIO()
    torch.save(model, big)
    assert len(big.getvalue()) < 1.2 * len(small.getvalue())
    assert model[0].term._x is not None  # the live model keeps it for penalty()


def test_relax_refuses_a_model_on_the_meta_device():
    # its terms' generators would be computed constants without data: to_empty() could not restore them
    with torch.device("meta"):
        model = plain()
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match="meta device"):
        rp.relax(model)
    assert [type(m) for m in model.modules()] == before
    model.to_empty(device="cpu")  # materialised, it relaxes
    assert isinstance(rp.relax(model)[0], rp.RelaxedModule)


def test_penalty_after_a_forward_under_vmap_names_the_transform():
    model = rp.relax(plain(), init_std=0.1)
    torch.func.vmap(model)(torch.randn(8, 1, 4))
    with pytest.raises(rp.RelaxError, match="torch.func transform"):
        rp.penalty(model)
    ran(model)  # a plain forward records usable inputs again
    assert torch.isfinite(rp.penalty(model))


@pytest.mark.parametrize("bad", [0, -1, True, 2.5, "2"])
def test_penalty_generators_set_by_hand_are_checked(bad):
    o3 = pytest.importorskip("e3nn.o3")

    model = rp.relax(nn.Sequential(o3.Linear("2x0e + 1x1o", "2x0e + 1x1o")), init_std=0.1)
    model(torch.randn(20, 5))
    model[0].term.penalty_generators = bad
    with pytest.raises(ValueError, match="penalty_generators must be an int >= 1"):
        rp.penalty(model)


class _WithPenalty(nn.Module):
    """Output and penalty from one forward: torch.func.functional_call then swaps the parameters
    for both (a penalty computed after the call would read the model's own W again)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).square().sum() + rp.penalty(self.model)


def test_penalty_inside_a_torch_func_transform_gives_autograds_gradients():
    model = rp.relax(plain(), init_std=0.1)
    rp.set_theta(model, 0.3)
    wrapped = _WithPenalty(model)
    params = {k: v.detach() for k, v in wrapped.named_parameters()}
    x = torch.randn(6, 4)
    grads = torch.func.grad(lambda p: torch.func.functional_call(wrapped, p, (x,)))(params)
    wrapped(x).backward()
    for k, p in wrapped.named_parameters():
        torch.testing.assert_close(grads[k], p.grad if p.grad is not None else torch.zeros_like(p))
    assert float(grads["model.0.term.weight"].abs().max()) > 0
    # per-sample: vmap over batches, the penalty inside the same transform
    xs = torch.randn(3, 6, 4)
    per_batch = torch.func.vmap(lambda xb: model(xb).square().sum() + rp.penalty(model))(xs)
    torch.testing.assert_close(per_batch[1], model(xs[1]).square().sum() + rp.penalty(model))
    per_sample = torch.func.vmap(torch.func.grad(lambda p, xb: torch.func.functional_call(wrapped, p, (xb,))),
                                 in_dims=(None, 0))(params, xs)
    assert per_sample["model.0.term.weight"].shape == (3, *model[0].term.weight.shape)


class _ForceModel(nn.Module):
    """Differentiates inside its forward (forces as −∂E/∂x, as MACE does with compute_force=True)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = SO2Linear(2, 2)

    def forward(self, x: torch.Tensor, compute_force: bool = True) -> torch.Tensor:
        if not compute_force:
            return self.lin(x)
        x = x.requires_grad_(True)
        energy = self.lin(x).square().sum()
        return torch.autograd.grad(energy, x, create_graph=self.training)[0]


def test_example_inputs_of_a_model_that_differentiates_in_forward_get_a_hint():
    model = _ForceModel()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(rp.AdapterError, match="without gradients.*compute_force"):
        rp.relax(model, example_inputs=(torch.randn(5, 4),))
    assert type(model.lin) is SO2Linear and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    rp.relax(model, example_inputs={"args": (torch.randn(5, 4),), "kwargs": {"compute_force": False}})
    assert isinstance(model.lin, rp.RelaxedModule)
