"""Entry point ``toy`` of relax-plugins: relaxes :mod:`relax_toy.layers`."""

from __future__ import annotations

import math
import sys

import torch
from torch import Tensor, nn

from relax_plugins import AdapterOption, LinearRelaxation, Symmetry, hookimpl


class SO2Relaxation(LinearRelaxation):
    """Dense W on the 2·c_in → 2·c_out fibre; P(W) from the generic null-space projection."""

    can_merge = True

    def dense_delta(self, base: nn.Module, delta: Tensor) -> dict[str, Tensor]:
        B = delta.reshape(base.c_out, 2, base.c_in, 2).permute(0, 2, 1, 3)
        return {"a": (B[..., 0, 0] + B[..., 1, 1]) / 2, "b": (B[..., 1, 0] - B[..., 0, 1]) / 2}


class CNRelaxation(LinearRelaxation):
    """Dense W on the regular fibres; P(W) is the Reynolds average over C_N (generic fallback)."""

    can_merge = True

    def dense_delta(self, base: nn.Module, delta: Tensor) -> dict[str, Tensor]:
        n = base.n
        B = delta.reshape(base.c_out, n, base.c_in, n).permute(0, 2, 1, 3)
        k = torch.arange(n)
        # circulant block: w[m] = mean_k B[(k + m) mod n, k]
        return {"weight": torch.stack([B[:, :, (k + m) % n, k].mean(-1) for m in range(n)], dim=-1)}


@hookimpl
def relax_make_term(module: nn.Module, options: dict) -> LinearRelaxation | None:
    layers = sys.modules.get("relax_toy.layers")
    if layers is None:
        return None
    kw = {"rank": options.get("rank"), "init_std": options.get("init_std", 0.0)}
    # subgroup=k relaxes only to the cyclic subgroup C_k (SO(2) ⊃ C_k; C_n ⊃ C_k for k | n)
    k = options.get("subgroup")
    if isinstance(module, layers.SO2Linear):
        ci, co = module.c_in, module.c_out
        sym = Symmetry(2 * ci, 2 * co, lie_in=layers.so2_generator(ci)[None], lie_out=layers.so2_generator(co)[None],
                       name="SO(2)")
        sub = None
        if k is not None:
            angle = 2 * math.pi / int(k)
            sub = Symmetry(2 * ci, 2 * co, group_in=layers.rotation_2d(angle, ci)[None],
                           group_out=layers.rotation_2d(angle, co)[None], name=f"C{k}")
        term = SO2Relaxation(sym, subgroup=sub, **kw)
        term.pure_bases = (layers.SO2Linear,)  # subclasses may update inputs in place: cloned
        return term
    if isinstance(module, layers.CNLinear):
        n, ci, co = module.n, module.c_in, module.c_out
        sym = Symmetry(n * ci, n * co, group_in=layers.cyclic_shift(n, ci)[None],
                       group_out=layers.cyclic_shift(n, co)[None], name=f"C{n}")
        sub = None
        if k is not None:
            if n % int(k):
                raise ValueError(f"C{k} is not a subgroup of C{n}")
            step = n // int(k)
            sub = Symmetry(n * ci, n * co, group_in=torch.linalg.matrix_power(layers.cyclic_shift(n, ci), step)[None],
                           group_out=torch.linalg.matrix_power(layers.cyclic_shift(n, co), step)[None], name=f"C{k}")
        term = CNRelaxation(sym, subgroup=sub, **kw)
        term.pure_bases = (layers.CNLinear,)
        return term
    return None


@hookimpl
def relax_adapter_options() -> dict[str, AdapterOption]:
    """The options of ``relax(model, adapter_options={"toy": {...}})``."""
    return {"subgroup": AdapterOption(_order, None, "k >= 1: relax only down to the cyclic subgroup C_k")}


def _order(value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"subgroup must be an int k >= 1 (the order of a cyclic group C_k), got "
                        f"{type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"subgroup must be an int k >= 1 (the order of a cyclic group C_k), got {value!r}")


@hookimpl
def relax_adapter_info() -> dict[str, str]:
    return {"description": "pure-torch SO(2) and C_N layers (tests, examples)", "layers": "SO2Linear, CNLinear"}
