"""How far a map is from equivariant: per-sample Lie-derivative and finite-generator defects under a Symmetry."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .symmetry import Symmetry

__all__ = ["lie_defect", "group_defect"]


def _as_apply(W: Tensor | Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    return W if callable(W) else (lambda v: v @ W.T)


def _defect(
    W: Tensor | Callable[[Tensor], Tensor], x: Tensor, g_in: Tensor, g_out: Tensor, Wx: Tensor | None
) -> Tensor:
    """Σ_k ||W g_in[k] x − g_out[k] W x||² per sample, one generator at a time (generator-major)."""
    if g_in.shape[0] == 0:
        return x.new_zeros(x.shape[0])
    apply = _as_apply(W)
    if Wx is None:
        Wx = apply(x)
    gx = torch.einsum("kij,nj->kni", g_in.to(x.dtype), x)  # (k, n, d_in)
    d = apply(gx) - torch.einsum("kij,nj->kni", g_out.to(Wx.dtype), Wx)
    return d.square().sum(dim=(0, 2))


def lie_defect(W: Tensor | Callable[[Tensor], Tensor], x: Tensor, sym: Symmetry, Wx: Tensor | None = None) -> Tensor:
    """Per-sample squared Lie derivative Σ_k ||W dρ_in(A_k) x − dρ_out(A_k) W x||².

    Computed generator-major (one generator at a time), so the null space over W is exactly the
    set of maps that commute with every generator.

    Args:
        W: (d_out, d_in) dense map, or a function applying it to the last axis.
        x: (n, d_in) detached inputs.
        sym: the layer's generators.
        Wx: optional precomputed ``x @ W.T``.

    Returns:
        (n,) tensor of squared norms.

    Example:
        >>> import torch
        >>> J = torch.tensor([[0., -1.], [1., 0.]])
        >>> sym = Symmetry(2, 2, lie_in=J[None], lie_out=J[None])
        >>> lie_defect(torch.eye(2), torch.randn(5, 2), sym).abs().max().item()
        0.0
    """
    return _defect(W, x, sym.lie_in, sym.lie_out, Wx)


def group_defect(W: Tensor | Callable[[Tensor], Tensor], x: Tensor, sym: Symmetry, Wx: Tensor | None = None) -> Tensor:
    """Per-sample squared discrete defect Σ_j ||W ρ_in(g_j) x − ρ_out(g_j) W x||².

    Example:
        >>> import torch
        >>> P = torch.tensor([[0., 1.], [1., 0.]])
        >>> sym = Symmetry(2, 2, group_in=P[None], group_out=P[None])
        >>> group_defect(torch.ones(2, 2), torch.randn(3, 2), sym).abs().max().item()
        0.0
    """
    return _defect(W, x, sym.group_in, sym.group_out, Wx)
