"""Adapter discovery: a lazily created pluggy manager fed from the ``relax_plugins.adapters``
entry-point group (set ``RELAX_PLUGINS_DISABLE_AUTOLOAD=1`` to skip entry points)."""

from __future__ import annotations

import importlib.metadata as md
import os
from dataclasses import dataclass
from typing import Any

import pluggy

from . import hookspecs
from .errors import PluginLoadError, UnknownAdapterError

__all__ = [
    "AdapterInfo",
    "DISABLE_AUTOLOAD_ENV",
    "get_plugin_manager",
    "register_adapter",
    "unregister_adapter",
    "list_adapters",
    "reset_plugin_manager",
]

DISABLE_AUTOLOAD_ENV = "RELAX_PLUGINS_DISABLE_AUTOLOAD"

_pm: pluggy.PluginManager | None = None
_distributions: dict[str, str] = {}


@dataclass(frozen=True)
class AdapterInfo:
    """One loaded adapter: its plugin name, the distribution that registered it and what it does."""

    name: str
    distribution: str
    description: str = ""
    layers: str = ""


def _autoload_disabled() -> bool:
    return os.environ.get(DISABLE_AUTOLOAD_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    for ep in md.entry_points(group=hookspecs.ENTRY_POINT_GROUP):
        if pm.has_plugin(ep.name) or pm.is_blocked(ep.name):
            continue
        dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist is not None else "unknown distribution"
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
        except Exception as exc:
            raise PluginLoadError(
                f"relax-plugins adapter {ep.name!r} (entry point {ep.value!r} of {dist}) failed to load: "
                f"{type(exc).__name__}: {exc}. Set {DISABLE_AUTOLOAD_ENV}=1 to skip entry points."
            ) from exc
        _distributions[ep.name] = dist


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, created (and entry points loaded) on first use.

    Example:
        >>> pm = get_plugin_manager()
        >>> pm.project_name
        'relax_plugins'
    """
    global _pm
    if _pm is None:
        pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        pm.add_hookspecs(hookspecs)
        if not _autoload_disabled():
            _load_entry_points(pm)
        try:
            pm.check_pending()
        except pluggy.PluginValidationError as exc:
            name = pm.get_name(exc.plugin)
            raise PluginLoadError(
                f"adapter plugin {name!r} ({_distributions.get(name, '?')}) implements unknown hooks: {exc}"
            ) from exc
        _pm = pm
    return _pm


def reset_plugin_manager() -> None:
    """Forget all plugins; the next use rebuilds the manager (and reloads entry points)."""
    global _pm
    _pm = None
    _distributions.clear()


def register_adapter(plugin: Any, name: str | None = None) -> str:
    """Register an adapter object (module, class or instance with ``@hookimpl`` functions).

    Example:
        >>> import relax_plugins as rp
        >>> class Nothing:
        ...     @rp.hookimpl
        ...     def relax_make_term(self, module, name, options):
        ...         return None
        >>> rp.register_adapter(Nothing(), name="nothing")
        'nothing'
        >>> rp.unregister_adapter("nothing")
    """
    if name is not None and (not isinstance(name, str) or not name):
        raise TypeError(f"name must be a non-empty string or None, got {name!r}")
    if plugin is None or isinstance(plugin, (str, bytes, int, float)):
        raise TypeError(f"plugin must be a module, class or object with @hookimpl functions, got {plugin!r}")
    pm = get_plugin_manager()
    label = name or getattr(plugin, "__name__", None) or type(plugin).__name__
    try:
        registered = pm.register(plugin, name=name)
    except (ValueError, pluggy.PluginValidationError) as exc:
        raise PluginLoadError(f"adapter {label!r} could not be registered: {exc}") from exc
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        pm.unregister(name=registered)
        raise PluginLoadError(f"adapter {label!r} implements unknown hooks: {exc}") from exc
    _distributions.setdefault(registered, "(registered at run time)")
    return registered


def unregister_adapter(name: str) -> None:
    """Remove a registered adapter by name."""
    if not isinstance(name, str):
        raise TypeError(f"name must be an adapter name (str), got {type(name).__name__}")
    pm = get_plugin_manager()
    if not pm.has_plugin(name):
        raise UnknownAdapterError(f"no adapter named {name!r}; loaded: {adapter_names()}")
    pm.unregister(name=name)
    _distributions.pop(name, None)


def adapter_names() -> list[str]:
    pm = get_plugin_manager()
    return sorted(n for n, p in pm.list_name_plugin() if p is not None and n != "relax_plugins.hookspecs")


def list_adapters() -> list[AdapterInfo]:
    """Every loaded adapter with the distribution that provides it.

    Example:
        >>> names = [a.name for a in list_adapters()]
        >>> "toy" in names or names == []   # [] when RELAX_PLUGINS_DISABLE_AUTOLOAD is set
        True
    """
    pm = get_plugin_manager()
    out = []
    for name in adapter_names():
        plugin = pm.get_plugin(name)
        info_fn = getattr(plugin, "relax_adapter_info", None)
        info = (info_fn() if callable(info_fn) else None) or {}
        if not isinstance(info, dict) or not all(isinstance(info.get(k, ""), str) for k in ("description", "layers")):
            raise PluginLoadError(f"adapter {name!r}: relax_adapter_info() must return a dict of strings "
                                  f"{{'description': ..., 'layers': ...}}, got {info!r}")
        dist = _distributions.get(name, "?")
        out.append(AdapterInfo(name, dist, info.get("description", ""), info.get("layers", "")))
    return out


def find_term(
    module: Any, name: str, options: dict[str, Any], allowed: set[str] | None, root: Any = None
) -> tuple[str, Any] | None:
    """Ask adapters (pluggy call order) for a term for ``module``; return (adapter name, term)."""
    pm = get_plugin_manager()
    for impl in reversed(pm.hook.relax_make_term.get_hookimpls()):
        if allowed is not None and impl.plugin_name not in allowed:
            continue
        kwargs = {"module": module, "name": name, "options": options, "root": root}
        term = impl.function(**{k: kwargs[k] for k in impl.argnames})
        if term is not None:
            return impl.plugin_name, term
    return None


def observe(root: Any, example_inputs: tuple[tuple, dict], options: dict[str, Any], allowed: set[str] | None) -> None:
    """Let every (allowed) adapter observe the model on the example inputs; merge what they return
    into ``options`` (``"probe_notes"`` lists are concatenated)."""
    pm = get_plugin_manager()
    for impl in reversed(pm.hook.relax_observe.get_hookimpls()):
        if allowed is not None and impl.plugin_name not in allowed:
            continue
        kwargs = {"root": root, "example_inputs": example_inputs, "options": options}
        extra = impl.function(**{k: kwargs[k] for k in impl.argnames})
        if not extra:
            continue
        notes = list(extra.pop("probe_notes", ()))
        options.update(extra)
        if notes:
            options["probe_notes"] = [*options.get("probe_notes", ()), *notes]


def wrapper_class_for(module: Any, adapter: str) -> type | None:
    pm = get_plugin_manager()
    plugin = pm.get_plugin(adapter)
    fn = getattr(plugin, "relax_wrapper_class", None)
    return fn(module=module) if callable(fn) else None
