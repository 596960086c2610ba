"""A permutation-equivariant layer on sets of n elements with C channels: x is [..., C, n]."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class SetLinear(nn.Module):
    """y_o = Σ_i A_oi x_i + B_oi mean(x_i), equivariant to permuting the n set elements.

    Example:
        >>> SetLinear(2, 3)(torch.randn(4, 2, 5)).shape
        torch.Size([4, 3, 5])
    """

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.c_in, self.c_out = c_in, c_out
        self.A = nn.Parameter(torch.randn(c_out, c_in) / math.sqrt(c_in))
        self.B = nn.Parameter(torch.randn(c_out, c_in) / math.sqrt(c_in))

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(dim=-1, keepdim=True)
        return torch.einsum("oi,...in->...on", self.A, x) + torch.einsum("oi,...in->...on", self.B, mean)
