"""Up-front validation of public arguments: one message naming the argument and what it expects.

Wrong types raise :class:`TypeError`, wrong values :class:`ValueError`. Nothing is coerced: a bool
is not an int, a float is not an int, a string is not a number.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = [
    "check_module", "check_int", "check_real", "check_bool", "check_choice", "check_patterns", "check_mapping",
]


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def check_module(value: Any, name: str = "model") -> nn.Module:
    """``value`` if it is an ``nn.Module``, else TypeError."""
    if not isinstance(value, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {_describe(value)}")
    return value


def check_int(value: Any, name: str, *, minimum: int | None = None, none_ok: bool = False) -> int | None:
    """An integer (not a bool, not a float) ≥ ``minimum``; None passes when ``none_ok``."""
    if value is None and none_ok:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        expected = "an int" + (" or None" if none_ok else "")
        raise TypeError(f"{name} must be {expected}, got {_describe(value)}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_real(
    value: Any, name: str, *, minimum: float | None = 0.0, positive: bool = False, none_ok: bool = False
) -> float | None:
    """A finite real number (int, float, NumPy scalar or one-element floating tensor; never a bool or a
    string) ≥ ``minimum`` (> ``minimum`` when ``positive``); None passes when ``none_ok``."""
    if value is None and none_ok:
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must be a real number, got a tensor of shape {tuple(value.shape)} "
                            f"and dtype {value.dtype}")
        value = value.detach().reshape(()).item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {_describe(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None and (value <= minimum if positive else value < minimum):
        raise ValueError(f"{name} must be {'>' if positive else '>='} {minimum:g}, got {value:g}")
    return value


def check_bool(value: Any, name: str) -> bool:
    """A bool (``True``/``False``, NumPy bools too); anything else, even 0/1 or "no", is a TypeError."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {_describe(value)}")


def check_choice(value: Any, name: str, choices: Iterable[str]) -> str:
    """One of the strings ``choices``."""
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {_describe(value)}")
    return value


def check_patterns(value: Any, name: str) -> list[str] | None:
    """None, one string (a single name/pattern: never split into characters) or an iterable of strings."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, (bytes, Mapping)) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be a string or a list of strings, got {_describe(value)}")
    items = list(value)
    bad = [v for v in items if not isinstance(v, str)]
    if bad:
        raise TypeError(f"{name} must hold strings only, got {_describe(bad[0])}")
    return items


def check_mapping(value: Any, name: str, *, none_ok: bool = True) -> dict[str, Any]:
    """A mapping with string keys (None → {} when ``none_ok``)."""
    if value is None and none_ok:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a dict with string keys, got {_describe(value)}")
    bad = [k for k in value if not isinstance(k, str)]
    if bad:
        raise TypeError(f"{name} keys must be strings, got {_describe(bad[0])}")
    return dict(value)
