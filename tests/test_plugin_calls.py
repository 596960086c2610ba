"""Hooks are called through the plugin manager (spies, hookwrappers and call monitoring see them),
``adapters=[...]`` restricts them, and ``adapter_options`` are namespaced per adapter and validated
against what each adapter declares (``relax_adapter_options``), before anything changes."""

from __future__ import annotations

import warnings

import pytest
import torch
from relax_toy.layers import SO2Linear
from torch import nn

import relax_plugins as rp
from relax_plugins.plugins import declared_options


@pytest.fixture(autouse=True)
def fresh_plugin_manager():
    rp.reset_plugin_manager()
    yield
    rp.reset_plugin_manager()


class Spy:
    """Answers nothing, records every call it gets (with the options it was given)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    @rp.hookimpl(tryfirst=True)
    def relax_make_term(self, module, name, options):
        self.calls.append(("relax_make_term", name, dict(options)))
        options.get("spy_level"), options.get("spy_tag")  # read: the core checks that given options are
        return None

    @rp.hookimpl
    def relax_observe(self, root, options):
        self.calls.append(("relax_observe", type(root).__name__, dict(options)))
        return {"spy_seen": True, "probe_notes": ["spy: looked"]}

    @rp.hookimpl
    def relax_wrapper_class(self, module):
        self.calls.append(("relax_wrapper_class", type(module).__name__, None))
        return None

    @rp.hookimpl
    def relax_adapter_options(self):
        return {"spy_level": rp.AdapterOption(int, 1, "how closely to look"),
                "spy_tag": rp.AdapterOption(lambda v: _tag(v), "x", "a tag, lower-case letters")}


def _tag(value):
    if not isinstance(value, str):
        raise TypeError(f"a tag must be a string, got {type(value).__name__}")
    if not value.isalpha() or not value.islower():
        raise ValueError(f"a tag must be lower-case letters, got {value!r}")


class Wrapper:
    """A new-style hookwrapper around relax_make_term: sees every adapter's call and its result."""

    def __init__(self) -> None:
        self.results: list[tuple[str, str | None]] = []

    @rp.hookimpl(wrapper=True)
    def relax_make_term(self, name):
        term = yield
        self.results.append((name, None if term is None else type(term).__name__))
        return term


def _model() -> nn.Module:
    return nn.Sequential(SO2Linear(1, 2), nn.ReLU(), SO2Linear(2, 1))


def test_spy_plugin_registered_through_the_pm_sees_the_calls():
    spy = Spy()
    rp.register_adapter(spy, name="spy")
    model = rp.relax(_model(), adapter_options={"spy": {"spy_level": 3}})
    assert [layer.adapter for _, layer in rp.relaxed_modules(model)] == ["toy", "toy"]
    made = [c for c in spy.calls if c[0] == "relax_make_term"]
    assert [c[1] for c in made] == ["", "0", "1", "2"]  # outermost first, every module (tryfirst)
    # its own options only: rank, init_std, its declared defaults and the user's values
    assert made[0][2] == {"rank": None, "init_std": 0.0, "spy_level": 3, "spy_tag": "x"}
    # the wrapper class is asked of the adapter that made the term, not of the spy
    assert not [c for c in spy.calls if c[0] == "relax_wrapper_class"]


def test_calls_go_through_the_plugin_manager_monitoring():
    pm = rp.get_plugin_manager()
    seen: list[tuple[str, list[str]]] = []
    undo = pm.add_hookcall_monitoring(lambda hook, impls, kwargs: seen.append((hook, [i.plugin_name for i in impls])),
                                      lambda outcome, hook, impls, kwargs: None)
    try:
        rp.relax(nn.Sequential(SO2Linear(1, 1)), adapters=["toy"])
    finally:
        undo()
    hooks = {h for h, _ in seen}
    assert {"relax_adapter_options", "relax_make_term", "relax_wrapper_class"} <= hooks
    assert all(impls == ["toy"] for h, impls in seen if h == "relax_make_term")


def test_hookwrapper_sees_every_adapters_call():
    wrapper = Wrapper()
    rp.register_adapter(wrapper, name="wrapper")
    rp.relax(_model())
    assert ("0", "SO2Relaxation") in wrapper.results and ("1", None) in wrapper.results


def test_observe_goes_to_each_adapter_and_its_result_to_its_own_options():
    spy = Spy()
    rp.register_adapter(spy, name="spy")
    rp.relax(_model(), example_inputs=torch.randn(3, 2))
    observed = [c for c in spy.calls if c[0] == "relax_observe"]
    assert len(observed) == 1 and observed[0][1] == "Sequential"
    made = [c[2] for c in spy.calls if c[0] == "relax_make_term"]
    assert all(o["spy_seen"] is True for o in made)  # what relax_observe returned, in its own options
    assert "probe_notes" not in made[0]


def test_subset_restriction_excludes_other_adapters():
    spy = Spy()
    rp.register_adapter(spy, name="spy")
    model = rp.relax(_model(), adapters=["toy"], example_inputs=torch.randn(3, 2))
    assert spy.calls == []
    assert [layer.adapter for _, layer in rp.relaxed_modules(model)] == ["toy", "toy"]
    with pytest.raises(ValueError, match="leaves out"):
        rp.relax(_model(), adapters=["toy"], adapter_options={"spy": {"spy_level": 2}})


def test_failing_adapter_is_named():
    class Failing:
        @rp.hookimpl(tryfirst=True)
        def relax_make_term(self, module):
            if isinstance(module, SO2Linear):
                raise RuntimeError("cannot relax this one")

        @rp.hookimpl
        def relax_observe(self, root):
            raise RuntimeError("probe broke")

    rp.register_adapter(Failing(), name="failing")
    with pytest.raises(rp.AdapterError,
                       match=r"layer '0' \(SO2Linear\) in adapter 'failing' \(relax_make_term\).*cannot relax"):
        rp.relax(_model())
    with pytest.raises(rp.AdapterError, match=r"adapter 'failing'.*probe broke"):
        rp.relax(_model(), example_inputs=torch.randn(3, 2))


def test_namespaced_options_are_validated_before_anything_changes():
    rp.register_adapter(Spy(), name="spy")
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(rp.UnknownAdapterError, match=r"\['spyy'\].*loaded adapters: \[.*'spy'.*'toy'"):
        rp.relax(model, adapter_options={"spyy": {"spy_level": 2}})
    with pytest.raises(ValueError, match=r"'vn' has no option 'vn_grup'.*vn_group.*vn_names"):
        rp.relax(model, adapter_options={"vn": {"vn_grup": 1}})
    with pytest.raises(TypeError, match=r"spy\.spy_level must be int, got bool"):
        rp.relax(model, adapter_options={"spy": {"spy_level": True}})
    with pytest.raises(TypeError, match=r"vn\.vn_names must be list or tuple, got str"):
        rp.relax(model, adapter_options={"vn": {"vn_names": "map"}})
    with pytest.raises(TypeError, match=r"spy\.spy_tag: a tag must be a string"):
        rp.relax(model, adapter_options={"spy": {"spy_tag": 3}})
    with pytest.raises(ValueError, match=r"spy\.spy_tag: a tag must be lower-case"):
        rp.relax(model, adapter_options={"spy": {"spy_tag": "ABC"}})
    with pytest.raises(TypeError, match=r"adapter_options\['spy'\] must be a dict"):
        rp.relax(model, adapter_options={"spy": 3})
    with pytest.raises(ValueError, match="mixes adapter names"):
        rp.relax(model, adapter_options={"spy": {"spy_level": 2}, "vn_group": "O(3)"})
    with pytest.raises(ValueError, match=r"must not set \['rank'\]"):
        rp.relax(model, adapter_options={"toy": {"rank": 2}})
    assert not list(rp.relaxed_modules(model))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # an option for an adapter whose layers the model does not hold is refused, as before
    with pytest.raises(ValueError, match=r"\{'vn': \['vn_group'\]\} were not read"):
        rp.relax(model, adapter_options={"vn": {"vn_group": "O(3)"}})
    # a value of the declared type (None where the default is None) is accepted
    rp.relax(model, adapter_options={"toy": {"subgroup": None}, "spy": {"spy_level": 2}})


def test_flat_form_is_deprecated_but_works_where_unambiguous():
    model = nn.Sequential(SO2Linear(2, 2))
    with pytest.warns(DeprecationWarning, match=r"flat adapter_options.*\{'toy': \{'subgroup': \.\.\.\}\}"):
        rp.relax(model, adapters=["toy"], adapter_options={"subgroup": 2})
    assert model[0].term.subgroup is not None
    # 'subgroup' belongs to several adapters in use: name the adapter
    with pytest.raises(ValueError, match=r"several adapters \['e3nn', 'escnn', 'mace', 'toy'\]"):
        rp.relax(nn.Sequential(SO2Linear(2, 2)), adapter_options={"subgroup": 2})
    with pytest.raises(ValueError, match="'vn_grup' is neither a loaded adapter nor an option"):
        rp.relax(nn.Sequential(SO2Linear(2, 2)), adapter_options={"vn_grup": 2})
    with pytest.raises(TypeError, match=r"vn\.vn_group must be str"):
        rp.relax(nn.Sequential(SO2Linear(2, 2)), adapter_options={"vn_group": 3})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the namespaced form warns about nothing
        rp.relax(nn.Sequential(SO2Linear(2, 2)), adapter_options={"toy": {"subgroup": 2}})


def test_declarations_are_listed_and_checked():
    assert "vn_names" in declared_options("vn")
    infos = {a.name: a for a in rp.list_adapters()}
    assert infos["toy"].options == ("subgroup",)

    class BadDeclaration:
        @rp.hookimpl
        def relax_adapter_options(self):
            return {"rank": rp.AdapterOption(int, None, "clashes")}

    rp.register_adapter(BadDeclaration(), name="bad_declaration")
    with pytest.raises(rp.PluginLoadError, match="'bad_declaration'.*'rank'"):
        rp.relax(_model())


@pytest.mark.parametrize("declared,err,match", [
    ({"bd_n": rp.AdapterOption(int, "abc", "a count")}, rp.PluginLoadError, r"'bd'.*default of option 'bd_n'"),
    ({"bd_v": rp.AdapterOption(lambda v: {}[v], "x", "a broken validator")}, rp.AdapterError,
     r"bd\.bd_v: the adapter's validator raised KeyError"),
], ids=["default-of-wrong-type", "validator-raises-keyerror"])
def test_an_adapters_own_option_bugs_are_named(declared, err, match):
    # defaults are checked against their type when declared; a validator's unexpected error names its
    # adapter and option (a bare KeyError would not say whose it is)
    class Declares:
        @rp.hookimpl
        def relax_adapter_options(self):
            return declared

    rp.register_adapter(Declares(), name="bd")
    model = _model()
    with pytest.raises(err, match=match):
        rp.relax(model, adapter_options={"bd": {k: "y" for k in declared}} if "bd_v" in declared else None)
    assert not list(rp.relaxed_modules(model))


class Raising:
    """One hook raising RuntimeError('boom'); relaxes SO2Linear itself so that its wrapper class is asked."""

    def __init__(self, hook: str) -> None:
        self.hook = hook

    @rp.hookimpl(tryfirst=True)
    def relax_make_term(self, module, options):
        from relax_toy import plugin as toy

        return toy.relax_make_term(module=module, options=options) if isinstance(module, SO2Linear) else None

    @rp.hookimpl
    def relax_adapter_options(self):
        self._maybe_raise("relax_adapter_options")
        return None

    @rp.hookimpl
    def relax_adapter_info(self):
        self._maybe_raise("relax_adapter_info")
        return {"description": "raises in one hook", "layers": "SO2Linear"}

    @rp.hookimpl
    def relax_wrapper_class(self, module):
        self._maybe_raise("relax_wrapper_class")
        return None

    def _maybe_raise(self, hook: str) -> None:
        if hook == self.hook:
            raise RuntimeError("boom")


def _raises_naming(error, hook, call):
    with pytest.raises(error, match=rf"adapter 'raising'.*{hook}.*RuntimeError: boom") as info:
        call()
    assert isinstance(info.value.__cause__, RuntimeError) and str(info.value.__cause__) == "boom"


@pytest.mark.parametrize("hook", ["relax_adapter_options", "relax_adapter_info"])
def test_declaration_hook_that_raises_is_a_load_error_naming_adapter_and_hook(hook):
    rp.register_adapter(Raising(hook), name="raising")
    _raises_naming(rp.PluginLoadError, hook, rp.list_adapters)  # one broken adapter is named, not anonymous
    if hook == "relax_adapter_options":
        model = _model()
        _raises_naming(rp.PluginLoadError, hook, lambda: rp.relax(model))
        assert not list(rp.relaxed_modules(model))
        _raises_naming(rp.PluginLoadError, hook, lambda: declared_options("raising"))


def test_wrapper_class_hook_that_raises_is_an_adapter_error_and_changes_nothing():
    rp.register_adapter(Raising("relax_wrapper_class"), name="raising")
    model = _model()
    _raises_naming(rp.AdapterError, "relax_wrapper_class", lambda: rp.relax(model))
    assert not list(rp.relaxed_modules(model))
    assert [type(m).__name__ for m in model] == ["SO2Linear", "ReLU", "SO2Linear"]


class Careless:
    """relax_observe without probe_forward: runs the model in train mode, draws random numbers,
    switches modes and writes into a parameter."""

    def __init__(self, notes=("careless: looked",)) -> None:
        self.notes = notes

    @rp.hookimpl
    def relax_observe(self, root, example_inputs):
        import random

        import numpy as np

        args, kwargs = example_inputs
        root(*args, **kwargs)  # BatchNorm updates its running statistics, dropout draws from the RNG
        torch.rand(3), random.random(), np.random.rand()
        root.eval()
        with torch.no_grad():
            root[1].weight.add_(1.0)
        return {"probe_notes": self.notes}


def test_core_restores_the_model_and_rngs_whatever_observe_does():
    import random

    import numpy as np

    rp.register_adapter(Careless(), name="careless")
    model = nn.Sequential(SO2Linear(1, 1), nn.BatchNorm1d(2), nn.Dropout(0.5)).train()
    x = torch.randn(8, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    untouched = model[1].bias
    version = untouched._version
    rng, py_rng, np_rng = torch.get_rng_state(), random.getstate(), np.random.get_state()
    # without vn: its own probe (probe.preserved_state) writes every tensor back
    rp.relax(model, example_inputs=x, include=["0"], adapters=["careless", "toy"])
    assert isinstance(model[0], rp.RelaxedModule)
    assert all(m.training for m in model.modules())
    bn = model[1]
    assert torch.equal(bn.running_mean, before["1.running_mean"]) and int(bn.num_batches_tracked) == 0
    assert torch.equal(bn.weight, before["1.weight"]) and bn.bias is untouched
    assert untouched._version == version  # unchanged tensors are not written back
    assert torch.equal(torch.get_rng_state(), rng) and random.getstate() == py_rng
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), np_rng))


@pytest.mark.parametrize("notes", ["abc", ["ok", 3], None])
def test_observe_notes_must_be_a_list_of_strings(notes):
    rp.register_adapter(Careless(notes), name="careless")
    model = nn.Sequential(SO2Linear(1, 1), nn.BatchNorm1d(2))
    with pytest.raises(rp.AdapterError,
                       match=r"adapter 'careless', relax_observe.*'probe_notes' as a list or tuple of strings"):
        rp.relax(model, example_inputs=torch.randn(8, 2), adapters=["careless", "toy"])
    assert not list(rp.relaxed_modules(model))
