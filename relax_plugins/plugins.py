"""Adapter discovery: a lazily created pluggy manager fed from the ``relax_plugins.adapters``
entry-point group (set ``RELAX_PLUGINS_DISABLE_AUTOLOAD=1`` to skip entry points; the variable is a
boolean: ``1``/``true``/``yes``/``on`` skip them, ``0``/``false``/``no``/``off`` or empty load them).

An adapter's hook that raises is reported with the adapter named, chained from the original
exception: ``PluginLoadError`` (naming the hook too) for the declarations read when adapters are
listed or options resolved (``relax_adapter_info``, ``relax_adapter_options``), ``AdapterError`` for
the hooks of a relax() call (``relax_wrapper_class`` here; ``relax_observe`` and ``relax_make_term``
raise :class:`AdapterFailure`, which relax() turns into an ``AdapterError`` naming the layer).
"""

from __future__ import annotations

import importlib.metadata as md
import os
import reprlib
from dataclasses import dataclass
from typing import Any

import pluggy

from . import hookspecs
from .errors import AdapterError, PluginLoadError, UnknownAdapterError
from .options import AdapterOption, check_declaration
from .probe import kept_state

__all__ = [
    "AdapterCalls",
    "AdapterInfo",
    "DISABLE_AUTOLOAD_ENV",
    "declared_options",
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
    options: tuple[str, ...] = ()  # the adapter_options keys it declares (see declared_options)


_TRUE_SPELLINGS = frozenset({"1", "true", "yes", "on"})
_FALSE_SPELLINGS = frozenset({"", "0", "false", "no", "off"})


def _autoload_disabled() -> bool:
    """Whether ``RELAX_PLUGINS_DISABLE_AUTOLOAD`` asks to skip entry points, read as a boolean.

    Returns:
        True for ``1``/``true``/``yes``/``on``, False for ``0``/``false``/``no``/``off``, an empty
        value or an unset variable (case and surrounding spaces ignored).

    Raises:
        ValueError: any other value; guessing could load adapters the user meant to skip (or the
            reverse), so a typo is refused rather than read either way.
    """
    raw = os.environ.get(DISABLE_AUTOLOAD_ENV, "")
    value = raw.strip().lower()
    if value in _TRUE_SPELLINGS:
        return True
    if value in _FALSE_SPELLINGS:
        return False
    raise ValueError(
        f"{DISABLE_AUTOLOAD_ENV}={raw!r} is not a boolean: set it to 1, true, yes or on to skip the "
        "relax_plugins.adapters entry points, or to 0, false, no, off (or leave it empty or unset) to load them"
    )


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


def _only(pm: pluggy.PluginManager, hook: str, keep: set[str]) -> pluggy.HookCaller:
    """``pm.hook.<hook>`` restricted to the plugins named in ``keep`` (``pm.subset_hook_caller``)."""
    return pm.subset_hook_caller(hook, [p for n, p in pm.list_name_plugin() if p is not None and n not in keep])


def _answer(results: Any) -> Any:
    """The value of a non-firstresult hook called for one plugin: its result, or None."""
    return results[0] if results else None


def _declaration(hook: str, name: str) -> Any:
    """What ``hook()`` (a declaration hook without arguments) of adapter ``name`` alone returns.

    Raises:
        PluginLoadError: the hook raised; the message names the adapter, its distribution and the
            hook, so that one broken adapter is found rather than breaking every listing anonymously.
    """
    try:
        return _answer(_only(get_plugin_manager(), hook, {name})())
    except Exception as exc:
        dist = _distributions.get(name, "?").strip("()")
        raise PluginLoadError(
            f"adapter {name!r} ({dist}): {hook}() raised {type(exc).__name__}: {exc}. "
            f"Fix the adapter, unregister it (relax_plugins.unregister_adapter({name!r})) or uninstall its "
            "distribution."
        ) from exc


def adapter_info(name: str) -> dict[str, str]:
    """``relax_adapter_info()`` of one adapter, validated.

    Raises:
        PluginLoadError: the hook raised or returned something other than a dict of strings.
    """
    info = _declaration("relax_adapter_info", name) or {}
    if not isinstance(info, dict) or not all(isinstance(info.get(k, ""), str) for k in ("description", "layers")):
        raise PluginLoadError(f"adapter {name!r}: relax_adapter_info() must return a dict of strings "
                              f"{{'description': ..., 'layers': ...}}, got {info!r}")
    return info


def declared_options(name: str) -> dict[str, AdapterOption]:
    """The options one adapter declares (hook ``relax_adapter_options``), validated.

    Raises:
        UnknownAdapterError: no adapter is loaded under ``name``.
        PluginLoadError: the hook raised or returned an invalid declaration (naming the adapter).

    Example:
        >>> sorted(declared_options("toy")) if "toy" in adapter_names() else ["subgroup"]
        ['subgroup']
    """
    pm = get_plugin_manager()
    if not pm.has_plugin(name):
        raise UnknownAdapterError(f"no adapter named {name!r}; loaded: {adapter_names()}")
    # asked of one plugin (a subset caller): the answer must be attributed to the adapter that gave it
    declared = _declaration("relax_adapter_options", name)
    try:
        return check_declaration(name, declared)
    except (TypeError, ValueError) as exc:
        raise PluginLoadError(str(exc)) from exc


def list_adapters() -> list[AdapterInfo]:
    """Every loaded adapter with the distribution that provides it.

    Raises:
        PluginLoadError: an adapter failed to load, or its ``relax_adapter_info`` or
            ``relax_adapter_options`` raised or returned something invalid; the message names it
            (a broken adapter is an error, as when it fails to import, not a silently odd row).

    Example:
        >>> names = [a.name for a in list_adapters()]
        >>> "toy" in names or names == []   # [] when RELAX_PLUGINS_DISABLE_AUTOLOAD is set
        True
    """
    out = []
    for name in adapter_names():
        info = adapter_info(name)
        dist = _distributions.get(name, "?")
        out.append(AdapterInfo(name, dist, info.get("description", ""), info.get("layers", ""),
                               tuple(sorted(declared_options(name)))))
    return out


class AdapterFailure(Exception):
    """An adapter's hook raised: carries the adapter's name and the hook for the core's message."""

    def __init__(self, adapter: str, hook: str, exc: BaseException) -> None:
        super().__init__(f"adapter {adapter!r} ({hook}): {type(exc).__name__}: {exc}")
        self.adapter, self.hook, self.exc = adapter, hook, exc


class AdapterCalls:
    """The hooks of one relax() call, called through the plugin manager and restricted to the
    adapters in use (``pm.subset_hook_caller`` when ``adapters=[...]`` names some).

    ``relax_make_term`` and ``relax_observe`` are not called once for all adapters: each adapter
    receives its *own* options (its namespace of ``adapter_options``, its declared defaults and what
    its own ``relax_observe`` returned), and the core must know which adapter answered (the
    wrapper's ``adapter``, its ``relax_wrapper_class``, the messages naming the adapter that failed or
    returned something invalid). So the adapters are taken in pluggy's call order
    (``get_hookimpls()``, last first, ``tryfirst``/``trylast`` respected) and each is called through a
    subset hook caller holding that adapter and every hookwrapper in use: pluggy still does the
    calling (argument selection, wrappers, tracing and ``add_hookcall_monitoring``).
    """

    def __init__(self, allowed: set[str] | None = None) -> None:
        self.pm = get_plugin_manager()
        names = adapter_names()
        self.adapters = names if allowed is None else [n for n in names if n in allowed]
        self._callers: dict[tuple[str, str], pluggy.HookCaller] = {}
        self._order: dict[str, list[str]] = {}

    def subset(self, hook: str) -> pluggy.HookCaller:
        """``pm.hook.<hook>`` restricted to the adapters in use."""
        return _only(self.pm, hook, set(self.adapters))

    def order(self, hook: str) -> list[str]:
        """The adapters in use that implement ``hook``, in pluggy call order (wrappers excluded)."""
        if hook not in self._order:
            impls = self.subset(hook).get_hookimpls()
            self._order[hook] = [i.plugin_name for i in reversed(impls) if not (i.hookwrapper or i.wrapper)]
        return self._order[hook]

    def one(self, hook: str, adapter: str) -> pluggy.HookCaller:
        """``hook`` for ``adapter`` alone (plus the hookwrappers of the adapters in use)."""
        key = (hook, adapter)
        if key not in self._callers:
            wrappers = {i.plugin_name for i in self.subset(hook).get_hookimpls() if i.hookwrapper or i.wrapper}
            self._callers[key] = _only(self.pm, hook, {adapter} | wrappers)
        return self._callers[key]

    def declared(self) -> dict[str, dict[str, AdapterOption]]:
        return {name: declared_options(name) for name in self.adapters}

    def observe(self, root: Any, example_inputs: tuple[tuple, dict], options: dict[str, dict[str, Any]]) -> list[str]:
        """Let every adapter in use observe the model; merge what each returns into its own options.

        Each adapter's call runs inside :func:`relax_plugins.probe.kept_state`: whatever the
        adapter does (``root(...)`` in train mode instead of ``probe_forward``, ``root.eval()``, drawing
        random numbers), the parameters and buffers, every module's train/eval mode and the torch,
        ``random`` and NumPy RNGs are as before once it returns or raises (only tensors that changed
        are written back, so version counters of the others are not bumped).

        Returns:
            The ``probe_notes`` lines.

        Raises:
            AdapterFailure: an adapter raised, returned something other than a dict or None, or
                ``probe_notes`` other than a list or tuple of strings.
        """
        notes: list[str] = []
        for adapter in self.order("relax_observe"):
            try:
                # the core guarantees the probe changes nothing: adapters need not all use probe_forward
                with kept_state(root):
                    extra = _answer(self.one("relax_observe", adapter)(
                        root=root, example_inputs=example_inputs, options=options[adapter]))
            except Exception as exc:
                raise AdapterFailure(adapter, "relax_observe", exc) from exc
            if not extra:
                continue
            if not isinstance(extra, dict):
                raise AdapterFailure(adapter, "relax_observe", TypeError(
                    f"relax_observe() must return a dict or None, got {type(extra).__name__}"))
            extra = dict(extra)
            lines = extra.pop("probe_notes", ())
            # a bare string would be split into one-character notes
            if not isinstance(lines, (list, tuple)) or not all(isinstance(line, str) for line in lines):
                raise AdapterFailure(adapter, "relax_observe", TypeError(
                    "relax_observe() must return 'probe_notes' as a list or tuple of strings, got "
                    f"{type(lines).__name__} {reprlib.repr(lines)}"))
            notes.extend(lines)
            dict.update(options[adapter], extra)
        return notes

    def make_term(
        self, module: Any, name: str, root: Any, options: dict[str, dict[str, Any]]
    ) -> tuple[str, Any] | None:
        """The first adapter (pluggy call order) with a term for ``module``: (adapter name, term)."""
        for adapter in self.order("relax_make_term"):
            try:
                term = self.one("relax_make_term", adapter)(
                    module=module, name=name, options=options[adapter], root=root)
            except Exception as exc:
                raise AdapterFailure(adapter, "relax_make_term", exc) from exc
            if term is not None:
                return adapter, term
        return None

    def wrapper_class(self, module: Any, adapter: str) -> type | None:
        """``relax_wrapper_class`` of the adapter that relaxed ``module`` (firstresult).

        Raises:
            AdapterError: the hook raised (the message names the adapter and the hook). Asked while
                relax() builds the wrappers, before any layer is replaced: the model is unchanged.
        """
        try:
            return self.one("relax_wrapper_class", adapter)(module=module)
        except Exception as exc:
            raise AdapterError(
                f"adapter {adapter!r} failed in relax_wrapper_class for a {type(module).__name__} layer: "
                f"{type(exc).__name__}: {exc}. The model was not changed."
            ) from exc
