"""The relax-plugins adapter for :class:`setlinear_adapter.SetLinear`."""

from __future__ import annotations

import torch
from torch import Tensor, nn

import relax_plugins as rp

from .layers import SetLinear


def _perm(p: list[int]) -> Tensor:
    return torch.eye(len(p))[p]


def symmetric_group_generators(n: int, channels: int) -> Tensor:
    """A transposition and an n-cycle, acting on each channel's n set elements."""
    gens = [_perm([1, 0, *range(2, n)]), _perm([*range(1, n), 0])]
    return torch.stack([torch.block_diag(*([g] * channels)) for g in gens])


class SetRelaxation(rp.LinearRelaxation):
    """W is dense on the (C·n) fibre; the layer input [..., C, n] flattens channel-major."""

    can_merge = True  # dense_delta below folds θ·P(W) into A and B

    def __init__(self, layer: SetLinear, n: int, **kw) -> None:
        sym = rp.Symmetry(
            layer.c_in * n, layer.c_out * n,
            group_in=symmetric_group_generators(n, layer.c_in),
            group_out=symmetric_group_generators(n, layer.c_out),
            name=f"S{n}",
        )
        super().__init__(sym, **kw)
        self.n = n

    def to_fibre(self, x: Tensor) -> Tensor:
        c_in = self.symmetry.dim_in // self.n
        if tuple(x.shape[-2:]) != (c_in, self.n):  # a wrong set_size would scramble the fibres silently
            raise ValueError(f"SetLinear input must end in ({c_in} channels, {self.n} set elements) as set_size="
                             f"{self.n} declares, got shape {tuple(x.shape)}")
        return x.reshape(-1, self.symmetry.dim_in)

    def _coefficients(self, W: Tensor) -> tuple[Tensor, Tensor]:
        # per block: orthogonal projection onto span{I, 11ᵀ} via its 2x2 normal equations
        n = self.n
        blocks = W.reshape(W.shape[0] // n, n, W.shape[1] // n, n).transpose(1, 2)
        t = blocks.diagonal(dim1=-2, dim2=-1).sum(-1)
        s = blocks.sum((-2, -1))
        beta = (s - t) / (n * (n - 1))
        return t / n - beta, beta

    def project_dense(self, W: Tensor) -> Tensor:
        n = self.n
        alpha, beta = self._coefficients(W)
        eye, ones = torch.eye(n, dtype=W.dtype, device=W.device), torch.ones(n, n, dtype=W.dtype, device=W.device)
        blocks = alpha[..., None, None] * eye + beta[..., None, None] * ones
        return blocks.transpose(1, 2).reshape(W.shape)

    def dense_delta(self, base: nn.Module, delta: Tensor) -> dict[str, Tensor]:
        # what to add to the layer's own parameters; the core adds it (and can take it back)
        alpha, beta = self._coefficients(delta)
        return {"A": alpha, "B": beta * self.n}  # mean(x) = (1/n)·1ᵀx


@rp.hookimpl
def relax_adapter_options() -> dict[str, rp.AdapterOption]:
    # what users may pass as relax(model, adapter_options={"setlinear": {...}}); checked by the core
    return {"set_size": rp.AdapterOption(_set_size, None, "number n >= 2 of set elements (required)")}


def _set_size(value: object) -> None:
    # S_1 is trivial: a set of one element has nothing to permute (and no transposition)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"set_size must be an int >= 2, got {type(value).__name__} {value!r}")
    if value < 2:
        raise ValueError(f"set_size must be an int >= 2, got {value!r}")


@rp.hookimpl
def relax_make_term(module: nn.Module, options: dict) -> rp.LinearRelaxation | None:
    if not isinstance(module, SetLinear):
        return None
    n = options.get("set_size")
    if n is None:
        raise ValueError("SetLinear needs the set size: relax(model, adapter_options={'setlinear': {'set_size': n}})")
    return SetRelaxation(module, int(n), rank=options.get("rank"), init_std=options.get("init_std", 0.0))


@rp.hookimpl
def relax_adapter_info() -> dict[str, str]:
    return {"description": "example third-party adapter: DeepSets layers, group S_n", "layers": "SetLinear"}
