"""Group elements shared by several test modules."""

from __future__ import annotations

import torch


def random_orthogonal(det: float, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """A random 3x3 orthogonal matrix with the given determinant."""
    Q, R = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))
    Q = Q * torch.sign(torch.diagonal(R))
    if torch.det(Q) * det < 0:
        Q = Q.clone()
        Q[:, 0] = -Q[:, 0]
    return Q.to(dtype)
