"""Entry point ``toy`` of relax-plugins: relaxes :mod:`relax_toy.layers`."""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn

from relax_plugins import LinearRelaxation, Symmetry, hookimpl


class SO2Relaxation(LinearRelaxation):
    """Dense W on the 2·c_in → 2·c_out fibre; P(W) from the generic null-space projection."""

    def merge_dense(self, base: nn.Module, delta: Tensor) -> bool:
        B = delta.reshape(base.c_out, 2, base.c_in, 2).permute(0, 2, 1, 3)
        with torch.no_grad():
            base.a += ((B[..., 0, 0] + B[..., 1, 1]) / 2).to(base.a.dtype)
            base.b += ((B[..., 1, 0] - B[..., 0, 1]) / 2).to(base.b.dtype)
        return True


class CNRelaxation(LinearRelaxation):
    """Dense W on the regular fibres; P(W) is the Reynolds average over C_N (generic fallback)."""

    def merge_dense(self, base: nn.Module, delta: Tensor) -> bool:
        n = base.n
        B = delta.reshape(base.c_out, n, base.c_in, n).permute(0, 2, 1, 3)
        k = torch.arange(n)
        # circulant block: w[m] = mean_k B[(k + m) mod n, k]
        w = torch.stack([B[:, :, (k + m) % n, k].mean(-1) for m in range(n)], dim=-1)
        with torch.no_grad():
            base.weight += w.to(base.weight.dtype)
        return True


@hookimpl
def relax_make_term(module: nn.Module, options: dict) -> LinearRelaxation | None:
    layers = sys.modules.get("relax_toy.layers")
    if layers is None:
        return None
    kw = {"rank": options.get("rank"), "init_std": options.get("init_std", 0.0)}
    if isinstance(module, layers.SO2Linear):
        sym = Symmetry(
            2 * module.c_in, 2 * module.c_out,
            lie_in=layers.so2_generator(module.c_in)[None], lie_out=layers.so2_generator(module.c_out)[None],
            name="SO(2)",
        )
        return SO2Relaxation(sym, **kw)
    if isinstance(module, layers.CNLinear):
        n = module.n
        sym = Symmetry(
            n * module.c_in, n * module.c_out,
            group_in=layers.cyclic_shift(n, module.c_in)[None], group_out=layers.cyclic_shift(n, module.c_out)[None],
            name=f"C{n}",
        )
        return CNRelaxation(sym, **kw)
    return None


@hookimpl
def relax_adapter_info() -> dict[str, str]:
    return {"description": "pure-torch SO(2) and C_N layers (tests, examples)", "layers": "SO2Linear, CNLinear"}
