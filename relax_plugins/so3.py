"""The so(3) generators in e3nn's real basis: the l = 1 basis and dρ_l for every degree l, in float64."""

from __future__ import annotations

from functools import cache

import torch
from torch import Tensor

__all__ = ["so3_basis", "so3_generators"]


def so3_basis(dtype: torch.dtype = torch.float64) -> Tensor:
    """The so(3) basis on (x, y, z): rotations about x, y, z, (A_k)_ij = −ε_kij, shape (3, 3, 3).

    Example:
        >>> A = so3_basis()
        >>> bool(torch.equal(A[0] @ A[1] - A[1] @ A[0], A[2])), A[2].tolist()[0]
        (True, [0.0, -1.0, 0.0])
    """
    A = torch.zeros(3, 3, 3, dtype=dtype)
    for k, i, j in ((0, 2, 1), (1, 0, 2), (2, 1, 0)):
        A[k, i, j], A[k, j, i] = 1.0, -1.0
    return A


@cache
def _so3_generators64(l: int) -> Tensor:
    if l == 0:
        return torch.zeros(3, 1, 1, dtype=torch.float64)
    if l == 1:
        return so3_basis()  # exact integers
    # e3nn's construction (o3.so3_generators, e3nn >= 0.5), restated without e3nn: the su(2)
    # generators of spin l in the complex |l, m⟩ basis, taken to e3nn's real basis
    m = torch.arange(-l, l, dtype=torch.float64)
    raising = torch.diag(-torch.sqrt(l * (l + 1) - m * (m + 1)), diagonal=-1)
    m = torch.arange(-l + 1, l + 1, dtype=torch.float64)
    lowering = torch.diag(torch.sqrt(l * (l + 1) - m * (m - 1)), diagonal=1)
    m = torch.arange(-l, l + 1, dtype=torch.float64)
    X = torch.stack([0.5 * (raising + lowering) + 0j, torch.diag(1j * m), -0.5j * (raising - lowering)])
    q = torch.zeros(2 * l + 1, 2 * l + 1, dtype=torch.complex128)
    s = 1 / 2**0.5
    for mm in range(-l, 0):
        q[l + mm, l - mm], q[l + mm, l + mm] = s, -1j * s
    q[l, l] = 1
    for mm in range(1, l + 1):
        q[l + mm, l + mm], q[l + mm, l - mm] = (-1) ** mm * s, 1j * (-1) ** mm * s
    q = (-1j) ** l * q  # e3nn's phase, which makes its Clebsch-Gordan coefficients real
    return (q.conj().T @ X @ q).real.contiguous()


def so3_generators(l: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """dρ_l(A_x), dρ_l(A_y), dρ_l(A_z) on the degree-l irrep in e3nn's real basis, (3, 2l+1, 2l+1).

    Torch only: e3nn's closed form (equal to ``e3nn.o3.so3_generators(l)`` bit for bit for l ≥ 2;
    l = 1 is :func:`so3_basis`, exact). Cached in float64; a fresh copy is returned.

    Example:
        >>> X = so3_generators(2)
        >>> bool(torch.allclose(X[0] @ X[1] - X[1] @ X[0], X[2], atol=1e-12))
        True
    """
    if l < 0:
        raise ValueError(f"l must be >= 0, got {l}")
    return _so3_generators64(int(l)).to(dtype).clone()
