"""Irreps strings, fibre layouts and O(3) generators, without importing e3nn.

A *field* is one node-level tensor of a layer (node axis first). Flattening every axis after the
node axis gives the field's fibre; :class:`Field` says how that fibre transforms:

* ``irreps`` in e3nn notation (``"16x0e + 4x1o"``, ``"1o+2e"``) or ``"pos"`` (a position: 1o under
  rotations and inversion, and shifted by translations);
* ``layout``: ``"mul_ir"`` (e3nn's default, channel-major: a ``(N, C, 3)`` tensor of C vectors is
  ``"Cx1o"``) or ``"ir_mul"`` (component-major: ViSNet's ``(N, 3, C)`` or ``(N, 8, C)`` are
  ``"Cx1o"`` and ``"Cx1o+Cx2e"``).

Bases: l = 1 is plain (x, y, z); l = 2 is the real basis of e3nn's and PyG ViSNet's spherical
harmonics (√3·xz, √3·xy, y² − (x² + z²)/2, √3·yz, √3/2·(z² − x²)). Lie-algebra generators are the
rotations about x, y, z, (A_k)_ij = −ε_kij, in that order for every l, so that input and output
generators of a layer are paired. The irreps, generators, parity and projection are the core's
(:mod:`relax_plugins.irreps`, torch only, every l); :func:`_harmonics` states the basis for tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from relax_plugins.irreps import LAYOUTS, Fibre, Irrep, parse_irreps, so3_basis, so3_generators

__all__ = ["Irrep", "parse_irreps", "Field", "so3_basis", "irrep_generators", "field_generators", "field_parity"]


@dataclass(frozen=True)
class Field:
    """How one node-level tensor (node axis first) transforms.

    Args:
        irreps: e3nn irreps string, or ``"pos"`` for positions.
        layout: ``"mul_ir"`` (channel-major, e3nn) or ``"ir_mul"`` (component-major, ViSNet).

    Example:
        >>> Field("4x1o").dim, Field("pos").dim, Field("2x1o+2x2e", "ir_mul").dim
        (12, 3, 16)
    """

    irreps: str
    layout: str = "mul_ir"

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        self.blocks  # noqa: B018  (validate the irreps string eagerly, at declaration time)

    @property
    def is_pos(self) -> bool:
        return self.irreps.strip() == "pos"

    @property
    def blocks(self) -> tuple[tuple[int, Irrep], ...]:
        return ((1, Irrep(1, -1)),) if self.is_pos else parse_irreps(self.irreps)

    @property
    def dim(self) -> int:
        return sum(mul * ir.dim for mul, ir in self.blocks)

    @property
    def fibre(self) -> Fibre:
        """The field's fibre as a core :class:`~relax_plugins.irreps.Fibre` (blocks in its layout)."""
        return Fibre([(mul, ir.l, ir.p) for mul, ir in self.blocks], self.layout)

    def index_table(self) -> list[tuple[int, int, int, int]]:
        """For each flat fibre index: (l, p, channel, m), channel numbering the irrep copies of
        this field in order. Used by the closed-form projection."""
        rows: list[tuple[int, int, int, int]] = []
        chan = 0
        for mul, ir in self.blocks:
            if self.layout == "mul_ir":
                rows += [(ir.l, ir.p, chan + c, m) for c in range(mul) for m in range(ir.dim)]
            else:
                rows += [(ir.l, ir.p, chan + c, m) for m in range(ir.dim) for c in range(mul)]
            chan += mul
        return rows


def _harmonics(l: int, v: Tensor) -> Tensor:
    """Real homogeneous polynomials of degree l spanning the l-irrep, in the documented basis."""
    x, y, z = v.unbind(-1)
    if l == 0:
        return torch.ones_like(x)[..., None]
    if l == 1:
        return v
    if l == 2:
        s3 = math.sqrt(3.0)
        return torch.stack(
            [s3 * x * z, s3 * x * y, y * y - 0.5 * (x * x + z * z), s3 * y * z, s3 / 2 * (z * z - x * x)], -1
        )
    from e3nn import o3  # tests only: e3nn's harmonics fix the basis of l > 2

    return o3.spherical_harmonics(l, v, normalize=False)


def irrep_generators(l: int, dtype: torch.dtype | None = None) -> Tensor:
    """dρ_l(A_x), dρ_l(A_y), dρ_l(A_z) on the l-irrep, shape (3, 2l+1, 2l+1)
    (:func:`relax_plugins.irreps.so3_generators` in ``dtype``, default the default dtype).

    Example:
        >>> X = irrep_generators(2)
        >>> bool(torch.allclose(X[0] @ X[1] - X[1] @ X[0], X[2], atol=1e-6))
        True
    """
    return so3_generators(l, dtype or torch.get_default_dtype())


def field_generators(field: Field, dtype: torch.dtype | None = None) -> Tensor:
    """Lie-algebra generators on a field's flat fibre, shape (3, dim, dim) (dense: for tests and
    small layers; the relaxation term applies them block by block).

    Example:
        >>> field_generators(Field("2x0e+1x1o")).shape
        torch.Size([3, 5, 5])
    """
    return field.fibre.lie_matrices().to(dtype or torch.get_default_dtype())


def field_parity(field: Field, dtype: torch.dtype | None = None) -> Tensor:
    """The action of the inversion −I on a field's fibre: diag(p) per irrep copy, shape (dim, dim).

    Example:
        >>> field_parity(Field("1x0e+1x1o")).diagonal().tolist()
        [1.0, -1.0, -1.0, -1.0]
    """
    return torch.diag(field.fibre.parity(dtype))
