"""Finding relaxed layers and their parameters; reading and setting θ."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ._checks import check_module, check_real
from .errors import NotRelaxedError
from .wrapper import RelaxedModule

__all__ = ["relaxed_modules", "relaxation_parameters", "set_theta", "get_theta"]


def relaxed_modules(model: nn.Module) -> Iterator[tuple[str, RelaxedModule]]:
    """(qualified name, wrapper) for every relaxed layer of ``model``.

    Example:
        >>> import torch, relax_plugins as rp
        >>> from relax_toy.layers import SO2Linear
        >>> m = rp.relax(torch.nn.Sequential(SO2Linear(1, 1), SO2Linear(1, 1)))
        >>> [n for n, _ in rp.relaxed_modules(m)]
        ['0', '1']
    """
    for name, mod in model.named_modules():
        if isinstance(mod, RelaxedModule):
            yield name, mod


def relaxation_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that relaxation added (every W, and θ where a policy made it learnable), each
    once: give them their own optimiser parameter group (e.g. their own learning rate).

    Example:
        >>> import torch, relax_plugins as rp
        >>> from relax_toy.layers import SO2Linear
        >>> m = rp.relax(torch.nn.Sequential(SO2Linear(2, 2)))
        >>> extra = {id(p) for p in rp.relaxation_parameters(m)}
        >>> groups = [{"params": [p for p in m.parameters() if id(p) not in extra]},
        ...           {"params": rp.relaxation_parameters(m), "lr": 1e-4}]
        >>> opt = torch.optim.Adam(groups, lr=1e-3)
        >>> sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in m.parameters())
        True
    """
    seen: dict[int, nn.Parameter] = {}
    for _, layer in relaxed_modules(model):
        extra = list(layer.term.parameters())
        if isinstance(layer.theta, nn.Parameter):
            extra.append(layer.theta)
        for p in extra:
            seen.setdefault(id(p), p)
    return list(seen.values())


def _require_relaxed(model: nn.Module, what: str) -> list[tuple[str, RelaxedModule]]:
    check_module(model, "model")
    found = list(relaxed_modules(model))
    if not found:
        raise NotRelaxedError(f"{what}: the model holds no relaxed layer (call relax_plugins.relax(model) first)")
    return found


def _require_still_relaxed(model: nn.Module, layers: list[tuple[str, RelaxedModule]], what: str) -> None:
    """NotRelaxedError unless every one of ``layers`` (found in ``model`` earlier) is still in its place:
    a policy holding them must not go on moving θ of layers that ``project()`` took out."""
    gone = []
    for name, layer in layers:
        try:
            here = model.get_submodule(name) if name else model
        except AttributeError:
            here = None
        if here is not layer:
            gone.append(name or "<root>")
    if gone:
        raise NotRelaxedError(f"{what}: layer(s) {gone} are no longer relaxed layers of the model (projected or "
                              "replaced since this object was made); make a new one for a re-relaxed model")


def _check_theta(value: Any, name: str = "θ") -> float:
    return check_real(value, name, minimum=0.0)


def check_theta_fits(value: float, layers: list[tuple[str, RelaxedModule]], name: str = "θ") -> None:
    """ValueError unless every layer's θ buffer (its dtype: float16 tops out at 65504) holds ``value``
    as a finite number: a value that overflows would silently become inf, or fail half-way."""
    for layer_name, layer in layers:
        dtype = layer.theta.dtype
        if value > torch.finfo(dtype).max:
            raise ValueError(f"{name} = {value:g} does not fit the {dtype} θ of layer {layer_name or '<root>'!r} "
                             f"(largest finite value {torch.finfo(dtype).max:g})")


def set_theta(model: nn.Module, value: float | dict[str, float]) -> None:
    """Set θ of every relaxed layer (a number), or per layer (a dict name → θ).

    θ must be a finite real number >= 0 (not a bool or a string) that each layer's θ dtype holds
    (float16: ≤ 65504); all values are checked before any layer changes.

    Example:
        >>> import torch, relax_plugins as rp
        >>> from relax_toy.layers import SO2Linear
        >>> m = rp.relax(torch.nn.Sequential(SO2Linear(1, 1)))
        >>> rp.set_theta(m, 0.5); rp.get_theta(m)
        {'0': 0.5}
    """
    layers = _require_relaxed(model, "set_theta")
    if isinstance(value, dict):
        names = {n for n, _ in layers}
        unknown = set(value) - names
        if unknown:
            raise KeyError(f"no relaxed layer named {sorted(unknown, key=repr)}; relaxed layers: {sorted(names)}")
        checked = {k: _check_theta(v, f"θ of layer {k!r}") for k, v in value.items()}
        for name, layer in layers:
            if name in checked:
                check_theta_fits(checked[name], [(name, layer)], f"θ of layer {name!r}")
        with torch.no_grad():
            for name, layer in layers:
                if name in checked:
                    layer.theta.fill_(checked[name])
        return
    v = _check_theta(value)
    check_theta_fits(v, layers)
    with torch.no_grad():
        for _, layer in layers:
            layer.theta.fill_(v)


def get_theta(model: nn.Module) -> dict[str, float]:
    """θ of every relaxed layer, by qualified name.

    Example:
        >>> import torch, relax_plugins as rp
        >>> from relax_toy.layers import SO2Linear
        >>> rp.get_theta(rp.relax(torch.nn.Sequential(SO2Linear(1, 1))))
        {'0': 0.0}
    """
    return {n: float(m.theta.detach()) for n, m in _require_relaxed(model, "get_theta")}
