"""Adapter options: what each adapter declares (hook ``relax_adapter_options``) and the validation of
``relax(model, adapter_options=...)`` against it, before anything is changed.

The options are namespaced per adapter, ``{"vn": {"vn_names": [...]}, "e3nn": {"subgroup": "SO(3)"}}``.
The flat form of earlier releases (``{"vn_names": [...]}``) still works for one release, with a
``DeprecationWarning``, where every key is declared by exactly one of the adapters in use.
"""

from __future__ import annotations

import difflib
import numbers
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from .errors import AdapterError, UnknownAdapterError

__all__ = ["AdapterOption", "RESERVED_OPTIONS", "check_declaration", "resolve_adapter_options"]

# relax() arguments of their own, present in every adapter's options
RESERVED_OPTIONS = ("rank", "init_std")


class AdapterOption(NamedTuple):
    """One option an adapter accepts (a value of its ``relax_adapter_options()`` dict).

    Args:
        type: a type or a tuple of types (checked with ``isinstance``; ``bool`` is not accepted as an
            ``int``, an ``int`` is accepted as a ``float``, ``object`` accepts anything), or a
            callable ``f(value)`` that raises ``TypeError``/``ValueError`` for a bad value.
        default: the value adapters receive when the user does not pass the option (``None``
            always passes the type check when it is the default).
        doc: one line for users (shown in errors and ``relax-plugins list``).

    Example:
        >>> AdapterOption(int, None, "set size").type
        <class 'int'>
    """

    type: type | tuple[type, ...] | Callable[[Any], Any]
    default: Any = None
    doc: str = ""


def _is_types(t: Any) -> bool:
    return isinstance(t, type) or (isinstance(t, tuple) and len(t) > 0 and all(isinstance(x, type) for x in t))


def check_declaration(adapter: str, declared: Any) -> dict[str, AdapterOption]:
    """An adapter's ``relax_adapter_options()`` value, validated: ``{key: AdapterOption}``."""
    if declared is None:
        return {}
    where = f"adapter {adapter!r}: relax_adapter_options()"
    if not isinstance(declared, Mapping):
        raise TypeError(f"{where} must return a dict {{key: AdapterOption(type, default, doc)}}, "
                        f"got {type(declared).__name__}")
    out: dict[str, AdapterOption] = {}
    for key, spec in declared.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"{where}: option names must be non-empty strings, got {key!r}")
        if key in RESERVED_OPTIONS:
            raise ValueError(f"{where} declares {key!r}, a relax() argument of its own (always in options)")
        if isinstance(spec, AdapterOption):
            opt = spec
        elif isinstance(spec, tuple) and 1 <= len(spec) <= 3:
            opt = AdapterOption(*spec)
        else:
            raise TypeError(f"{where}: option {key!r} must be an AdapterOption(type, default, doc), got {spec!r}")
        if not (_is_types(opt.type) or callable(opt.type)):
            raise TypeError(f"{where}: option {key!r} has type {opt.type!r}, not a type, tuple of types or validator")
        if not isinstance(opt.doc, str):
            raise TypeError(f"{where}: the doc of option {key!r} must be a string")
        if opt.default is not None and _is_types(opt.type):
            # an adapter that is never passed the option receives its default: it must be of the type
            try:
                _check_value(adapter, key, opt, opt.default)
            except TypeError as exc:
                raise TypeError(f"{where}: the default of option {key!r} does not fit its type ({exc})") from None
        out[key] = opt
    return out


def _type_name(t: Any) -> str:
    if isinstance(t, tuple):
        return " or ".join(_type_name(x) for x in t)
    if t is type(None):
        return "None"
    return getattr(t, "__name__", repr(t))


def _check_value(adapter: str, key: str, opt: AdapterOption, value: Any) -> None:
    label = f"adapter option {adapter}.{key}"
    if value is None and opt.default is None:
        return
    if not _is_types(opt.type):  # a validator
        try:
            opt.type(value)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{label}: {exc}") from exc
        except Exception as exc:  # a validator must reject with TypeError/ValueError: anything else is its bug
            raise AdapterError(f"{label}: the adapter's validator raised {type(exc).__name__}: {exc} (validators "
                               "reject a value with TypeError or ValueError)") from exc
        return
    types = opt.type if isinstance(opt.type, tuple) else (opt.type,)
    ok = False
    for t in types:
        if t is int:
            ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        elif t is float:
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
        else:
            ok = isinstance(value, t)
        if ok:
            break
    if not ok:
        raise TypeError(f"{label} must be {_type_name(opt.type)}, got {type(value).__name__} ({value!r})")


def _known(declared: dict[str, AdapterOption]) -> str:
    return ", ".join(sorted(declared)) or "none"


def _check_keys(adapter: str, values: Mapping[str, Any], declared: dict[str, AdapterOption]) -> None:
    for key in values:
        if not isinstance(key, str):
            raise TypeError(f"adapter_options[{adapter!r}] keys must be strings, got {key!r}")
    clash = sorted(set(values) & set(RESERVED_OPTIONS))
    if clash:
        raise ValueError(f"adapter_options must not set {clash}: pass them as relax() arguments")
    for key in values:
        if key not in declared:
            close = difflib.get_close_matches(key, list(declared), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"adapter {adapter!r} has no option {key!r}{hint}; its options: {_known(declared)}")


def resolve_adapter_options(
    given: Mapping[str, Any], declared: dict[str, dict[str, AdapterOption]], loaded: list[str], stacklevel: int = 2
) -> dict[str, dict[str, Any]]:
    """Validate ``relax(adapter_options=...)`` and return the user's values per adapter.

    ``declared`` holds the declarations of the adapters in use (all loaded ones, or those named by
    ``adapters=``); ``loaded`` every loaded adapter's name. Namespaced: every key is an adapter name
    and every value a dict. Flat (deprecated): keys are options, each declared by exactly one adapter
    in use.

    Example:
        >>> decl = {"toy": {"subgroup": AdapterOption(int, None, "C_k")}}
        >>> resolve_adapter_options({"toy": {"subgroup": 2}}, decl, ["toy"])
        {'toy': {'subgroup': 2}}
        >>> resolve_adapter_options({"toy": {"subgroup": "2"}}, decl, ["toy"])
        Traceback (most recent call last):
        ...
        TypeError: adapter option toy.subgroup must be int, got str ('2')
    """
    names = [k for k in given if k in loaded]
    # a dict under a key that is neither a loaded adapter nor an option: a misspelt adapter name
    unknown = [k for k, v in given.items() if k not in loaded and isinstance(v, Mapping)
               and not any(k in opts for opts in declared.values())]
    if unknown:
        raise UnknownAdapterError(
            f"adapter_options names unknown adapter(s) {sorted(unknown)}; loaded adapters: {loaded}"
        )
    if names:  # namespaced form: {adapter: {key: value}}
        flat_keys = [k for k in given if k not in loaded]
        if flat_keys:
            key = flat_keys[0]
            owner = next((a for a, opts in sorted(declared.items()) if key in opts), "<adapter>")
            raise ValueError(
                f"adapter_options mixes adapter names {sorted(names)} with option keys {sorted(flat_keys)}: "
                f"put every option under its adapter, e.g. {{{owner!r}: {{{key!r}: ...}}}}"
            )
        out: dict[str, dict[str, Any]] = {}
        for adapter in names:
            values = given[adapter]
            if not isinstance(values, Mapping):
                raise TypeError(f"adapter_options[{adapter!r}] must be a dict of the {adapter!r} adapter's options, "
                                f"got {type(values).__name__}")
            if adapter not in declared:
                raise ValueError(f"adapter_options for adapter {adapter!r}, which adapters=[...] leaves out "
                                 f"(adapters in use: {sorted(declared)})")
            _check_keys(adapter, values, declared[adapter])
            for key, value in values.items():
                _check_value(adapter, key, declared[adapter][key], value)
            out[adapter] = dict(values)
        return out

    # flat form (deprecated): each key must belong to exactly one adapter in use
    clash = sorted(set(given) & set(RESERVED_OPTIONS))
    if clash:
        raise ValueError(f"adapter_options must not set {clash}: pass them as relax() arguments")
    out = {}
    for key, value in given.items():
        owners = sorted(a for a, opts in declared.items() if key in opts)
        if not owners:
            known = "; ".join(f"{a}: {_known(opts)}" for a, opts in sorted(declared.items()))
            raise ValueError(
                f"adapter_options key {key!r} is neither a loaded adapter nor an option of any adapter in use "
                f"(misspelt?). Loaded adapters: {loaded}; their options: {known}"
            )
        if len(owners) > 1:
            raise ValueError(
                f"adapter option {key!r} is accepted by several adapters {owners}: name the adapter, "
                f"adapter_options={{{owners[0]!r}: {{{key!r}: ...}}}} (or restrict adapters=[...])"
            )
        _check_value(owners[0], key, declared[owners[0]][key], value)
        out.setdefault(owners[0], {})[key] = value
    if out:
        example = ", ".join(f"{a!r}: {{{', '.join(repr(k) + ': ...' for k in v)}}}" for a, v in out.items())
        warnings.warn(
            "flat adapter_options are deprecated and will be removed in the next release: name the adapter, "
            f"adapter_options={{{example}}}",
            DeprecationWarning,
            stacklevel=stacklevel + 1,
        )
    return out
