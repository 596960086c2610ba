"""What the conformance kit measures with: a holder module, tensor plumbing, relative errors and the term's W."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..term import LinearRelaxation, RelaxationTerm


class _Holder(nn.Module):
    """The container the checked layer is relaxed in (relax() replaces children in place)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.layer(*args, **kwargs)


# -- tensors in, tensors out -------------------------------------------------------------------------
def _map_tensors(obj: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """``fn`` applied to every tensor in nested tuples/lists/dicts and tensor wrappers (``.tensor``)."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        items = [_map_tensors(o, fn) for o in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    if isinstance(obj, list):
        return [_map_tensors(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    inner = getattr(obj, "tensor", None)
    if isinstance(inner, Tensor) and callable(getattr(obj, "to", None)):
        # a tensor wrapper such as escnn's GeometricTensor: cast through its own .to()
        return obj.to(fn(inner).dtype) if inner.is_floating_point() else obj
    return obj


def _flat_outputs(obj: Any) -> list[Tensor]:
    """The floating-point tensors of a layer output, in order, detached."""
    if isinstance(obj, Tensor):
        return [obj.detach()] if obj.is_floating_point() else []
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _flat_outputs(o)]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _flat_outputs(v)]
    inner = getattr(obj, "tensor", None)
    return _flat_outputs(inner) if isinstance(inner, Tensor) else []


def _clone_call(call: tuple[tuple, dict]) -> tuple[tuple, dict]:
    # fresh tensors per call: layers that update their inputs in place must not leak between calls
    return _map_tensors(call, lambda t: t.clone())


def _run(module: nn.Module, call: tuple[tuple, dict]) -> list[Tensor]:
    args, kwargs = _clone_call(call)
    return _flat_outputs(module(*args, **kwargs))


def _classes(module: nn.Module) -> list[str]:
    # by name: torch.fx GraphModules (e3nn's compiled code) get a fresh class per instance
    return [f"{type(m).__module__}.{type(m).__qualname__}" for m in module.modules()]


def _norm(t: Tensor) -> float:
    return float(t.double().norm())


def _rel(a: Tensor, b: Tensor) -> float:
    if a.shape != b.shape:
        return math.inf
    scale = _norm(b)
    diff = _norm(a - b)
    return diff / scale if scale > 0 else diff


def _rel_outputs(a: list[Tensor], b: list[Tensor]) -> float:
    # the layer's outputs as the user's code gets them: a changed dtype (or device) is a changed output
    if len(a) != len(b) or any(x.dtype != y.dtype or x.device != y.device for x, y in zip(a, b)):
        return math.inf
    return max((_rel(x, y) for x, y in zip(a, b)), default=0.0)


# -- the term's parameterisation --------------------------------------------------------------------
def _weight(term: RelaxationTerm, where: str) -> Tensor:
    """The tensor holding W (dense for LinearRelaxation), with a clear error for unsupported terms."""
    if isinstance(term, LinearRelaxation) and (term.rank is not None or term.subgroup is not None):
        raise TypeError(f"{where}: check_adapter needs a dense, full-group W (the term has rank={term.rank}, "
                        f"subgroup={type(term.subgroup).__name__ if term.subgroup is not None else None})")
    w = getattr(term, "weight", None)
    if not isinstance(w, Tensor):
        raise TypeError(f"{where}: {type(term).__name__} keeps no tensor `weight`; check_adapter needs the "
                        "relaxation parameter as `term.weight` (see relax_plugins.testing)")
    if not callable(getattr(term, "project_dense", None)):
        raise TypeError(f"{where}: {type(term).__name__} has no project_dense(W); check_adapter needs it "
                        "(see relax_plugins.testing)")
    return w


def _set(w: Tensor, value: Tensor) -> None:
    with torch.no_grad():
        w.copy_(value)


def _lie_part(term: RelaxationTerm) -> float:
    return float(term.penalty_terms().lie)


def _generator_defect(term: RelaxationTerm, M: Tensor) -> float | None:
    """max over the adapter's generators of ||ρ_out·M − M·ρ_in|| / (||M||·||ρ||); None if unknown."""
    scale = _norm(M)
    if isinstance(term, LinearRelaxation):
        sym = term.symmetry
        Md = M.double()
        worst = 0.0
        pairs = list(zip(sym.lie_in, sym.lie_out)) + list(zip(sym.group_in, sym.group_out))
        for g_in, g_out in pairs:
            g_in, g_out = g_in.to(Md), g_out.to(Md)
            size = max(float(torch.linalg.matrix_norm(g_in, 2)), float(torch.linalg.matrix_norm(g_out, 2)), 1e-30)
            worst = max(worst, _norm(g_out @ Md - Md @ g_in) / (max(scale, 1e-300) * size))
        return worst
    fn = getattr(term, "generator_defect", None)
    if not callable(fn):
        return None
    return math.sqrt(max(float(fn(M)), 0.0)) / max(scale, 1e-300)
