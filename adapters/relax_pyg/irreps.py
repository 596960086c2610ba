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
generators of a layer are paired. Degrees l ≥ 3 need e3nn (its spherical harmonics fix the basis).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor

__all__ = ["Irrep", "parse_irreps", "Field", "so3_basis", "irrep_generators", "field_generators", "field_parity"]

_TERM = re.compile(r"^\s*(?:(\d+)\s*x\s*)?(\d+)\s*([eo])\s*$")
LAYOUTS = ("mul_ir", "ir_mul")


@dataclass(frozen=True)
class Irrep:
    """An O(3) irrep: degree ``l`` and parity ``p`` (+1 even, −1 odd)."""

    l: int
    p: int

    @property
    def dim(self) -> int:
        return 2 * self.l + 1

    def __str__(self) -> str:
        return f"{self.l}{'e' if self.p == 1 else 'o'}"


def parse_irreps(text: str) -> tuple[tuple[int, Irrep], ...]:
    """Parse an e3nn irreps string into ``((mul, Irrep), ...)``.

    Args:
        text: e.g. ``"16x0e + 4x1o"``; a term without multiplicity has multiplicity 1.

    Returns:
        The (multiplicity, irrep) blocks in order (zero multiplicities are kept out).

    Raises:
        ValueError: the string is not an irreps string.

    Example:
        >>> [(m, str(ir)) for m, ir in parse_irreps("16x0e+1o+2x2e")]
        [(16, '0e'), (1, '1o'), (2, '2e')]
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"expected an irreps string such as '16x0e+4x1o', got {text!r}")
    blocks = []
    for term in text.split("+"):
        m = _TERM.match(term)
        if m is None:
            raise ValueError(f"cannot parse irreps term {term.strip()!r} of {text!r} (expected e.g. '16x0e', '1o')")
        mul = 1 if m.group(1) is None else int(m.group(1))
        if mul:
            blocks.append((mul, Irrep(int(m.group(2)), 1 if m.group(3) == "e" else -1)))
    return tuple(blocks)


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


def so3_basis(dtype: torch.dtype = torch.float64) -> Tensor:
    """The so(3) basis on (x, y, z): rotations about x, y, z, (A_k)_ij = −ε_kij.

    Example:
        >>> A = so3_basis()
        >>> bool(torch.allclose(A[0] @ A[1] - A[1] @ A[0], A[2]))
        True
    """
    A = torch.zeros(3, 3, 3, dtype=dtype)
    for k, i, j in ((0, 2, 1), (1, 0, 2), (2, 1, 0)):
        A[k, i, j], A[k, j, i] = 1.0, -1.0
    return A


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
    try:
        from e3nn import o3
    except ImportError as exc:  # pragma: no cover - e3nn is installed in the dev venv
        raise NotImplementedError(f"irreps of degree l={l} > 2 need e3nn to fix their basis") from exc
    return o3.spherical_harmonics(l, v, normalize=False)


@cache
def _irrep_generators_f64(l: int) -> Tensor:
    if l == 0:
        return torch.zeros(3, 1, 1, dtype=torch.float64)
    if l == 1:
        return so3_basis()
    # X_k Y(v) = d/dt Y(exp(t A_k) v) = J_Y(v) A_k v for all v; Y's components are independent
    # polynomials, so a least-squares fit on enough random points is exact (to rounding).
    gen = torch.Generator().manual_seed(l)
    v = torch.randn(8 * (2 * l + 1), 3, generator=gen, dtype=torch.float64)
    Y = _harmonics(l, v)
    J = torch.func.vmap(torch.func.jacrev(lambda u: _harmonics(l, u)))(v)  # (n, 2l+1, 3)
    out = []
    for A in so3_basis():
        rhs = torch.einsum("nij,jk,nk->ni", J, A, v)
        out.append(torch.linalg.lstsq(Y, rhs).solution.T)
    return torch.stack(out)


def irrep_generators(l: int, dtype: torch.dtype | None = None) -> Tensor:
    """dρ_l(A_x), dρ_l(A_y), dρ_l(A_z) on the l-irrep, shape (3, 2l+1, 2l+1).

    Example:
        >>> X = irrep_generators(2)
        >>> bool(torch.allclose(X[0] @ X[1] - X[1] @ X[0], X[2], atol=1e-10))
        True
    """
    return _irrep_generators_f64(int(l)).to(dtype or torch.get_default_dtype()).clone()


def field_generators(field: Field, dtype: torch.dtype | None = None) -> Tensor:
    """Lie-algebra generators on a field's flat fibre, shape (3, dim, dim).

    Example:
        >>> field_generators(Field("2x0e+1x1o")).shape
        torch.Size([3, 5, 5])
    """
    dtype = dtype or torch.get_default_dtype()
    mats = []
    for k in range(3):
        blocks = []
        for mul, ir in field.blocks:
            X = irrep_generators(ir.l, torch.float64)[k]
            I = torch.eye(mul, dtype=torch.float64)
            blocks.append(torch.kron(I, X) if field.layout == "mul_ir" else torch.kron(X, I))
        mats.append(torch.block_diag(*blocks))
    return torch.stack(mats).to(dtype)


def field_parity(field: Field, dtype: torch.dtype | None = None) -> Tensor:
    """The action of the inversion −I on a field's fibre: diag(p) per irrep copy, shape (dim, dim).

    Example:
        >>> field_parity(Field("1x0e+1x1o")).diagonal().tolist()
        [1.0, -1.0, -1.0, -1.0]
    """
    signs = [float(p) for _, p, _, _ in field.index_table()]
    return torch.diag(torch.tensor(signs, dtype=dtype or torch.get_default_dtype()))
