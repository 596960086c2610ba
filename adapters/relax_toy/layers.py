"""Small exactly-equivariant layers in plain torch.

Feature layout: channel-major flat fibres, ``[..., channels * m]`` with ``m`` = 2 (SO(2) vectors)
or ``m`` = N (regular representation of C_N).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["SO2Linear", "SO2Gate", "CNLinear", "rotation_2d", "so2_generator", "cyclic_shift"]


def so2_generator(channels: int, dtype: torch.dtype | None = None) -> Tensor:
    """dρ(A) of SO(2) on ``channels`` copies of the 2D vector representation."""
    J = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=dtype or torch.get_default_dtype())
    return torch.block_diag(*([J] * channels))


def rotation_2d(angle: float, channels: int, dtype: torch.dtype | None = None) -> Tensor:
    """ρ(angle) on ``channels`` copies of the 2D vector representation."""
    c, s = math.cos(angle), math.sin(angle)
    R = torch.tensor([[c, -s], [s, c]], dtype=dtype or torch.get_default_dtype())
    return torch.block_diag(*([R] * channels))


def cyclic_shift(n: int, channels: int, dtype: torch.dtype | None = None) -> Tensor:
    """ρ(generator) of C_n on ``channels`` copies of the regular representation: (Sx)_k = x_{k-1}."""
    S = torch.roll(torch.eye(n, dtype=dtype or torch.get_default_dtype()), 1, dims=0)
    return torch.block_diag(*([S] * channels))


class SO2Linear(nn.Module):
    """SO(2)-equivariant linear map between channels of 2D vectors: y_o = Σ_i (a_oi + b_oi J) x_i.

    Example:
        >>> layer = SO2Linear(3, 2)
        >>> layer(torch.randn(5, 6)).shape
        torch.Size([5, 4])
    """

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.c_in, self.c_out = c_in, c_out
        self.a = nn.Parameter(torch.randn(c_out, c_in) / math.sqrt(c_in))
        self.b = nn.Parameter(torch.randn(c_out, c_in) / math.sqrt(c_in))

    def forward(self, x: Tensor) -> Tensor:
        v = x.unflatten(-1, (self.c_in, 2))
        jv = torch.stack((-v[..., 1], v[..., 0]), dim=-1)
        y = torch.einsum("oi,...ij->...oj", self.a, v) + torch.einsum("oi,...ij->...oj", self.b, jv)
        return y.flatten(-2)


class SO2Gate(nn.Module):
    """Norm nonlinearity on 2D vectors: v ↦ v·sigmoid(|v| − 1)."""

    def forward(self, x: Tensor) -> Tensor:
        v = x.unflatten(-1, (-1, 2))
        return (v * torch.sigmoid(v.norm(dim=-1, keepdim=True) - 1.0)).flatten(-2)


class CNLinear(nn.Module):
    """C_N-equivariant linear map on regular representations: circulant blocks.

    Example:
        >>> CNLinear(2, 3, n=4)(torch.randn(7, 8)).shape
        torch.Size([7, 12])
    """

    def __init__(self, c_in: int, c_out: int, n: int = 4) -> None:
        super().__init__()
        self.c_in, self.c_out, self.n = c_in, c_out, n
        self.weight = nn.Parameter(torch.randn(c_out, c_in, n) / math.sqrt(c_in * n))

    def dense(self) -> Tensor:
        n = self.n
        idx = (torch.arange(n)[:, None] - torch.arange(n)[None, :]) % n  # M[k, l] = w[(k - l) mod n]
        return self.weight[:, :, idx].permute(0, 2, 1, 3).reshape(self.c_out * n, self.c_in * n)

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.dense().T
