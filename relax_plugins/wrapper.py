"""The one wrapper class: a relaxed layer = the user's layer + an adapter's relaxation term."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .term import PenaltyTerms, RelaxationTerm

__all__ = ["RelaxedModule"]


class RelaxedModule(nn.Module):
    """Wraps ``base`` so that it computes f(x) + θ·W(x); θ is a per-layer buffer.

    Attribute look-ups that the wrapper does not know fall through to the base layer, so user
    code reading ``layer.irreps_out`` or ``layer.in_type`` keeps working.

    Args:
        base: the user's equivariant layer (kept as is, under ``.base``).
        term: the adapter's :class:`RelaxationTerm` (under ``.term``).
        adapter: name of the adapter that built ``term``.

    Example:
        >>> import torch
        >>> from relax_toy.layers import SO2Linear
        >>> import relax_plugins as rp
        >>> layer = rp.relax(torch.nn.Sequential(SO2Linear(2, 3)))[0]
        >>> isinstance(layer, rp.RelaxedModule), layer.theta.item()
        (True, 0.0)
    """

    def __init__(self, base: nn.Module, term: RelaxationTerm, adapter: str = "") -> None:
        super().__init__()
        self.base = base
        self.term = term
        self.adapter = adapter
        # in the mode of the layer it replaces: relaxing an eval() model must not put train-mode modules in it
        self.training = base.training
        term.train(base.training)
        ref = next(iter(_floating_tensors(base)), None)
        self.register_buffer(
            "theta",
            torch.zeros((), dtype=ref.dtype if ref is not None else torch.get_default_dtype(),
                        device=ref.device if ref is not None else None),
        )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # the registries directly: each nn.Module attribute fall-back (through this class's __getattr__)
        # costs more than a small layer's whole relaxation bookkeeping
        modules = self._modules
        theta = self._buffers.get("theta")
        if theta is None:  # a learnable θ (DualAscentTheta) is a parameter
            theta = self.theta
        return modules["term"](modules["base"], theta, *args, **kwargs)

    def penalty_terms(self) -> PenaltyTerms:
        return self.term.penalty_terms()

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            # via __dict__: during unpickling _modules may not exist yet, and self._modules would recurse
            base = self.__dict__.get("_modules", {}).get("base")
            if base is None:
                raise
            return getattr(base, name)

    def extra_repr(self) -> str:
        return f"adapter={self.adapter!r}, theta={float(self.theta):g}"


def _floating_tensors(module: nn.Module) -> list[Tensor]:
    return [t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]
