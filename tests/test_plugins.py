"""Adapter discovery: entry points (a fake distribution and the installed example package), class
plugins, the autoload switch, and errors that name the broken plugin."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from relax_toy.layers import SO2Linear
from relax_toy.plugin import SO2Relaxation
from torch import nn

import relax_plugins as rp


@pytest.fixture(autouse=True)
def fresh_plugin_manager():
    rp.reset_plugin_manager()
    yield
    rp.reset_plugin_manager()


def make_distribution(root: Path, dist: str, version: str, module: str, source: str, ep_name: str) -> None:
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[{rp.ENTRY_POINT_GROUP}]\n{ep_name} = {module}\n")
    (root / f"{module}.py").write_text(textwrap.dedent(source))


FAKE_PLUGIN = """
    import relax_plugins as rp
    from relax_toy.layers import SO2Linear
    from relax_toy import plugin as toy

    CALLS = []

    @rp.hookimpl(tryfirst=True)
    def relax_make_term(module, name, options):
        if isinstance(module, SO2Linear):
            CALLS.append(name)
            return toy.relax_make_term(module=module, options=options)
        return None

    @rp.hookimpl
    def relax_adapter_info():
        return {"description": "a fake adapter", "layers": "SO2Linear"}
"""


def test_adapter_from_fake_distribution_is_discovered_and_used(tmp_path, monkeypatch):
    make_distribution(tmp_path, "fake-relax-adapter", "0.3", "fake_relax_plugin", FAKE_PLUGIN, "fake")
    monkeypatch.syspath_prepend(str(tmp_path))
    infos = {a.name: a for a in rp.list_adapters()}
    assert infos["fake"].distribution == "fake-relax-adapter 0.3"
    assert infos["fake"].description == "a fake adapter"
    model = rp.relax(nn.Sequential(SO2Linear(1, 2)))
    assert model[0].adapter == "fake"  # tryfirst beats the first-party toy adapter
    import fake_relax_plugin

    assert fake_relax_plugin.CALLS == ["0"]


def test_broken_entry_point_error_names_plugin_and_distribution(tmp_path, monkeypatch):
    make_distribution(tmp_path, "broken-adapter", "1.2", "broken_relax_plugin",
                      "import this_module_does_not_exist\n", "broken")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(rp.PluginLoadError, match=r"'broken'.*broken-adapter 1\.2.*this_module_does_not_exist"):
        rp.list_adapters()


def test_plugin_with_unknown_hook_is_refused_by_check_pending(tmp_path, monkeypatch):
    source = """
        import relax_plugins as rp

        @rp.hookimpl
        def relax_make_trem(module):   # typo: not a hook
            return None
    """
    make_distribution(tmp_path, "typo-adapter", "0.1", "typo_relax_plugin", source, "typo")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(rp.PluginLoadError, match="relax_make_trem"):
        rp.get_plugin_manager()


def test_env_var_disables_autoload(monkeypatch):
    monkeypatch.setenv(rp.DISABLE_AUTOLOAD_ENV, "1")
    assert rp.list_adapters() == []
    with pytest.raises(rp.NothingToRelaxError):
        rp.relax(nn.Sequential(SO2Linear(1, 1)))
    from relax_toy import plugin

    rp.register_adapter(plugin, name="toy")
    assert isinstance(rp.relax(nn.Sequential(SO2Linear(1, 1)))[0], rp.RelaxedModule)


def test_first_party_adapters_come_from_entry_points():
    infos = {a.name: a for a in rp.list_adapters()}
    for name in ("toy", "e3nn", "escnn", "vn", "pyg"):
        assert infos[name].distribution.startswith("relax-plugins "), infos.get(name)


class ClassPlugin:
    """An adapter written as a class; relaxes only layers whose name starts with 'keep'."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    @rp.hookimpl(tryfirst=True)
    def relax_make_term(self, module, name, options):
        if isinstance(module, SO2Linear):
            self.seen.append(name)
            if name.startswith("keep"):
                return SO2Relaxation(
                    rp.Symmetry(2 * module.c_in, 2 * module.c_out,
                                lie_in=torch.zeros(1, 2 * module.c_in, 2 * module.c_in),
                                lie_out=torch.zeros(1, 2 * module.c_out, 2 * module.c_out)),
                )
        return None


def test_class_plugin_registration_and_dispatch_order():
    plugin = ClassPlugin()
    assert rp.register_adapter(plugin, name="classy") == "classy"
    model = nn.Module()
    model.keep = SO2Linear(1, 1)
    model.other = SO2Linear(1, 1)
    rp.relax(model)
    assert model.keep.adapter == "classy" and model.other.adapter == "toy"
    assert sorted(plugin.seen) == ["keep", "other"]
    # restricting adapters by name
    model2 = nn.Module()
    model2.keep = SO2Linear(1, 1)
    rp.relax(model2, adapters=["toy"])
    assert model2.keep.adapter == "toy"
    rp.unregister_adapter("classy")
    assert "classy" not in [a.name for a in rp.list_adapters()]
    with pytest.raises(rp.UnknownAdapterError):
        rp.unregister_adapter("classy")


def test_registering_twice_or_bad_plugin_is_a_clear_error():
    class Bad:
        @rp.hookimpl
        def relax_make_term(self, module, name, options, unknown_argument):
            return None

    with pytest.raises(rp.PluginLoadError, match="could not be registered"):
        rp.register_adapter(Bad(), name="bad")
    rp.register_adapter(ClassPlugin(), name="twice")
    with pytest.raises(rp.PluginLoadError):
        rp.register_adapter(ClassPlugin(), name="twice")


def test_installed_third_party_example_package():
    """examples/third_party_adapter is pip-installed by `make test`: found by its entry point."""
    infos = {a.name: a for a in rp.list_adapters()}
    assert infos["setlinear"].distribution == "relax-plugins-setlinear 0.1.0"
    from setlinear_adapter import SetLinear

    model = nn.Sequential(SetLinear(2, 3), nn.ReLU(), SetLinear(3, 1)).double()
    x = torch.randn(6, 2, 5, dtype=torch.float64)
    before = model(x)
    with pytest.raises(rp.AdapterError, match="set size"):
        rp.relax(model)
    rp.relax(model, adapter_options={"setlinear": {"set_size": 5}})
    rp.set_theta(model, 1.0)
    assert torch.equal(model(x), before)
    with torch.no_grad():
        for _, layer in rp.relaxed_modules(model):
            layer.term.weight.normal_()
    perm = torch.randperm(5)
    relaxed_err = (model(x[..., perm]) - model(x)[..., perm]).abs().max()
    assert relaxed_err > 1e-3
    rp.project(model, merge=True)
    assert (model(x[..., perm]) - model(x)[..., perm]).abs().max() < 1e-12
    assert [type(m).__name__ for m in model] == ["SetLinear", "ReLU", "SetLinear"]


def test_setlinear_closed_form_matches_generic_projection():
    from setlinear_adapter import SetLinear
    from setlinear_adapter.plugin import SetRelaxation

    term = SetRelaxation(SetLinear(2, 2), n=4).double()
    W = torch.randn(8, 8, dtype=torch.float64)
    generic = rp.LinearRelaxation.project_dense(term, W)  # Reynolds average over S_4
    assert torch.allclose(term.project_dense(W), generic, atol=1e-12)


@pytest.mark.parametrize(("value", "disabled"), [
    ("1", True), ("true", True), ("YES", True), (" on ", True),
    ("0", False), ("false", False), ("No", False), ("off", False), ("OFF", False), ("", False),
])
def test_autoload_env_var_is_read_as_a_boolean(monkeypatch, value, disabled):
    monkeypatch.setenv(rp.DISABLE_AUTOLOAD_ENV, value)
    names = [a.name for a in rp.list_adapters()]
    assert (names == []) is disabled and ("toy" in names) is not disabled


@pytest.mark.parametrize("value", ["maybe", "2", "disable", "nope"])
def test_autoload_env_var_that_is_not_a_boolean_is_refused(monkeypatch, value):
    monkeypatch.setenv(rp.DISABLE_AUTOLOAD_ENV, value)
    with pytest.raises(ValueError, match=rf"RELAX_PLUGINS_DISABLE_AUTOLOAD='{value}' is not a boolean.*1, true"):
        rp.list_adapters()


@pytest.mark.parametrize("bad, error", [(1, ValueError), (0, ValueError), ("5", TypeError), (True, TypeError)])
def test_setlinear_set_size_is_validated_and_a_wrong_size_is_caught_at_forward(bad, error):
    from setlinear_adapter import SetLinear

    model = nn.Sequential(SetLinear(2, 3))
    with pytest.raises(error, match="set_size"):
        rp.relax(model, adapter_options={"setlinear": {"set_size": bad}})
    assert not any(True for _ in rp.relaxed_modules(model))
    rp.relax(model, adapter_options={"setlinear": {"set_size": 4}})
    with pytest.raises(ValueError, match="4 set elements"):
        model(torch.randn(6, 2, 5))  # a 5-element set against set_size=4 would scramble the fibres


@pytest.mark.parametrize("bad, error", [(-3, ValueError), (0, ValueError), (2.0, TypeError), (True, TypeError)])
def test_toy_subgroup_order_is_validated(bad, error):
    from relax_toy.layers import SO2Linear

    with pytest.raises(error, match="subgroup"):
        rp.relax(nn.Sequential(SO2Linear(1, 1)), adapter_options={"toy": {"subgroup": bad}})
