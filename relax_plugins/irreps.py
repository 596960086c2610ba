"""O(3) irreps fibres, torch only: generators, parity, structured application and the Schur projection.

One description of a fibre serves every adapter with O(3) / SO(3) features (e3nn, torch-geometric,
vector neurons, MACE through e3nn):

* a :class:`Fibre` is a list of :class:`Block` s (multiplicity, degree l, parity p, layout), in
  order along the flat fibre. ``layout`` is ``"mul_ir"`` (multiplicity-major, e3nn's ``(mul, 2l+1)``:
  ``"Cx1o"`` is C consecutive xyz vectors) or ``"ir_mul"`` (component-major, ``(2l+1, mul)``: PyG
  ViSNet's ``(N, 3, C)`` and vector neurons' xyz-major ``j·C + c`` fibres);
* the so(3) generators of degree l, :func:`so3_generators`, are dρ_l of the rotations about x, y, z,
  (A_k)_ij = −ε_kij, in e3nn's real basis (l = 1 is plain (x, y, z)), in float64. An adapter may
  pass its own per-l generators (``Fibre(..., generators=fn)``), e.g. ones derived from its library;
* :meth:`Fibre.apply` / :meth:`Fibre.lie` apply per-l matrices block by block (I_mul ⊗ M or M ⊗ I_mul)
  without forming the dense (d, d) matrices, which :meth:`Fibre.lie_matrices` builds only on request
  (and :class:`FibreGenerators` hands to a :class:`~relax_plugins.Symmetry` lazily);
* :class:`SchurProjection` is the orthogonal (Frobenius) projection onto Hom_O(3) (or Hom_SO(3)):
  by Schur's lemma (every real irrep of SO(3) is of real type) each block between copies of the same
  irrep becomes tr(block)/(2l+1)·I, every other block 0.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "LAYOUTS",
    "Irrep",
    "Block",
    "Fibre",
    "FibreGenerators",
    "SchurProjection",
    "parse_irreps",
    "so3_basis",
    "so3_generators",
]

#: "mul_ir": (mul, 2l+1) per block, multiplicity-major (e3nn); "ir_mul": (2l+1, mul), component-major
LAYOUTS = ("mul_ir", "ir_mul")

_TERM = re.compile(r"^\s*(?:(\d+)\s*x\s*)?(\d+)\s*([eo])\s*$")

GeneratorFn = Callable[[int], Tensor]


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
    """Parse an e3nn irreps string into ``((mul, Irrep), ...)`` (no e3nn needed).

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


@dataclass(frozen=True)
class Block:
    """``mul`` copies of the irrep (l, p) laid out as ``layout`` (see :data:`LAYOUTS`)."""

    mul: int
    l: int
    p: int = 1
    layout: str = "mul_ir"

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.mul < 0 or self.l < 0 or self.p not in (1, -1):
            raise ValueError(f"invalid irrep block {self}")

    @property
    def dim(self) -> int:
        return self.mul * (2 * self.l + 1)

    def index(self, offset: int = 0) -> list[list[int]]:
        """Flat fibre index of (copy u, component m), as ``rows[u][m]``."""
        d = 2 * self.l + 1
        if self.layout == "mul_ir":
            return [[offset + u * d + m for m in range(d)] for u in range(self.mul)]
        return [[offset + m * self.mul + u for m in range(d)] for u in range(self.mul)]


class Fibre:
    """A flat fibre made of irrep blocks: its so(3) generators, parity, and structured maps.

    Args:
        blocks: :class:`Block` s or ``(mul, l, p[, layout])`` tuples, in fibre order. Blocks of
            multiplicity 0 are kept (they hold no entries), so that block indices match e3nn's.
        layout: the layout of tuples that do not name one.
        generators: per-l generators ``l -> (3, 2l+1, 2l+1)`` float64 (default :func:`so3_generators`).

    Example:
        >>> f = Fibre([(2, 1, -1), (1, 0, 1)])          # e3nn's "2x1o + 1x0e"
        >>> f.dim, f.parity().tolist()
        (7, [-1.0, -1.0, -1.0, -1.0, -1.0, -1.0, 1.0])
        >>> f.lie(torch.randn(4, 7)).shape
        torch.Size([3, 4, 7])
    """

    def __init__(
        self,
        blocks: Iterable[Block | Sequence[Any]],
        layout: str = "mul_ir",
        generators: GeneratorFn | None = None,
    ) -> None:
        self.blocks: tuple[Block, ...] = tuple(
            b if isinstance(b, Block) else Block(*b) if len(b) == 4 else Block(*b, layout=layout)  # type: ignore[misc]
            for b in blocks
        )
        self._generators = generators
        self._cache: dict[Any, Tensor] = {}
        offsets, start = [], 0
        for b in self.blocks:
            offsets.append(start)
            start += b.dim
        self.offsets: tuple[int, ...] = tuple(offsets)
        self.dim = start

    @classmethod
    def from_irreps(cls, irreps: str, layout: str = "mul_ir", generators: GeneratorFn | None = None) -> Fibre:
        """From an e3nn irreps string (parsed by :func:`parse_irreps`).

        Example:
            >>> Fibre.from_irreps("2x1o+2x2e", "ir_mul").dim
            16
        """
        return cls([(mul, ir.l, ir.p) for mul, ir in parse_irreps(irreps)], layout, generators)

    @staticmethod
    def cat(fibres: Sequence[Fibre]) -> Fibre:
        """The concatenation of fibres (their blocks in order; the first one's generators)."""
        gens = fibres[0]._generators if fibres else None
        return Fibre([b for f in fibres for b in f.blocks], generators=gens)

    def __repr__(self) -> str:
        return "Fibre(" + " + ".join(f"{b.mul}x{b.l}{'e' if b.p == 1 else 'o'}[{b.layout}]" for b in self.blocks) + ")"

    # -- generators ---------------------------------------------------------------------------
    def generators(self, l: int, dtype: torch.dtype = torch.float64, device: torch.device | None = None) -> Tensor:
        """The (3, 2l+1, 2l+1) generators of degree l, cached per dtype and device (do not modify)."""
        key = (l, dtype, torch.device("cpu") if device is None else torch.device(device))
        if key not in self._cache:
            base = (l, torch.float64, torch.device("cpu"))
            if base not in self._cache:
                gen = so3_generators(l) if self._generators is None else self._generators(l)
                self._cache[base] = torch.as_tensor(gen).to(torch.float64)
            self._cache[key] = self._cache[base].to(dtype=dtype, device=key[2])
        return self._cache[key]

    def parity(self, dtype: torch.dtype | None = None) -> Tensor:
        """The inversion −I on the fibre: its ±1 diagonal, shape (dim,)."""
        signs = [float(b.p) for b in self.blocks for _ in range(b.dim)]
        return torch.tensor(signs, dtype=dtype or torch.get_default_dtype()).reshape(self.dim)

    def nonscalar_index(self) -> list[int]:
        """Fibre entries of degree l > 0 (the only ones rotations move)."""
        return [i for b, o in zip(self.blocks, self.offsets) if b.l > 0 for i in range(o, o + b.dim)]

    def apply(
        self, mats: Callable[[int], Tensor | None], v: Tensor, transpose: bool = False, compact: bool = False
    ) -> Tensor:
        """The block-diagonal map ⊕_blocks (I_mul ⊗ M_l or M_l ⊗ I_mul, per layout) on the last axis of ``v``.

        Args:
            mats: ``l -> (2l+1, 2l+1)`` matrix, or None for the zero map on that degree.
            v: (..., dim) vectors; the result is ``v @ ρ(M)ᵀ`` (``v @ ρ(M)`` with ``transpose``).
            compact: leave out the entries of zero blocks instead of returning zeros there.

        Example:
            >>> f = Fibre([(2, 1, -1)], "ir_mul")
            >>> v = torch.randn(5, 6, dtype=torch.float64)
            >>> M = f.lie_matrices()[2]
            >>> bool(torch.allclose(f.apply(lambda l: f.generators(l)[2], v), v @ M.T))
            True
        """
        pieces = []
        lead = v.shape[:-1]
        for b, start in zip(self.blocks, self.offsets):
            if b.dim == 0:
                continue
            piece = v[..., start:start + b.dim]
            M = mats(b.l)
            if M is None:
                if not compact:
                    pieces.append(torch.zeros_like(piece))
                continue
            M = M.to(dtype=v.dtype, device=v.device)
            d = 2 * b.l + 1
            if b.layout == "mul_ir":
                pieces.append((piece.reshape(-1, b.mul, d) @ (M if transpose else M.T)).reshape(*lead, b.dim))
            else:
                eq = "ji,njm->nim" if transpose else "ij,njm->nim"
                pieces.append(torch.einsum(eq, M, piece.reshape(-1, d, b.mul)).reshape(*lead, b.dim))
        if not pieces:
            return v[..., :0] if compact else torch.zeros_like(v)
        return torch.cat(pieces, dim=-1) if len(pieces) > 1 else pieces[0]

    def lie(self, v: Tensor, k: int | None = None, compact: bool = False) -> Tensor:
        """dρ(A_k) applied to the last axis of ``v``: (..., dim) → (..., dim), or for ``k=None``
        all three, generator-major (3, ..., dim). Scalars (l = 0) are zero (left out if ``compact``).

        Example:
            >>> f = Fibre([(1, 0, 1), (1, 1, -1)])
            >>> f.lie(torch.tensor([[1.0, 1.0, 0.0, 0.0]]), k=2).tolist()  # about z: x ↦ y
            [[0.0, 0.0, 1.0, 0.0]]
        """
        if k is None:
            return torch.stack([self.lie(v, kk, compact) for kk in range(3)])
        return self.apply(lambda l: None if l == 0 else self.generators(l, v.dtype, v.device)[k], v, compact=compact)

    # -- lazy dense matrices ----------------------------------------------------------------------
    def lie_matrices(self) -> Tensor:
        """The generators on the whole fibre as dense (3, dim, dim) float64 matrices (built on request)."""
        out = torch.zeros(3, self.dim, self.dim, dtype=torch.float64)
        for b, start in zip(self.blocks, self.offsets):
            if b.dim == 0 or b.l == 0:
                continue
            X = self.generators(b.l)
            eye = torch.eye(b.mul, dtype=torch.float64)
            for k in range(3):
                kr = torch.kron(eye, X[k]) if b.layout == "mul_ir" else torch.kron(X[k], eye)
                out[k, start:start + b.dim, start:start + b.dim] = kr
        return out

    def parity_matrix(self) -> Tensor:
        """The inversion as a dense (dim, dim) float64 diagonal."""
        return torch.diag(self.parity(torch.float64))

    def copy_index(self, parity: bool = True) -> dict[tuple[int, int], list[tuple[int, list[list[int]]]]]:
        """Per irrep type ((l, p), or (l, 0) if not ``parity``): (block index, index rows) of its blocks."""
        out: dict[tuple[int, int], list[tuple[int, list[list[int]]]]] = {}
        for i, (b, start) in enumerate(zip(self.blocks, self.offsets)):
            if b.mul:
                out.setdefault((b.l, b.p if parity else 0), []).append((i, b.index(start)))
        return out


class FibreGenerators:
    """The generators of a :class:`Fibre` for a :class:`~relax_plugins.Symmetry`, dense only on request:
    ``kind="lie"`` (the three so(3) generators) or ``"parity"`` (the inversion).

    Example:
        >>> g = FibreGenerators(Fibre([(2, 1, -1)]), "lie")
        >>> g.count, g.dim, tuple(g.dense().shape)
        (3, 6, (3, 6, 6))
    """

    def __init__(self, fibre: Fibre, kind: str = "lie") -> None:
        if kind not in ("lie", "parity"):
            raise ValueError(f"kind must be 'lie' or 'parity', got {kind!r}")
        self.fibre, self.kind = fibre, kind
        self.device = torch.device("cpu")

    @property
    def count(self) -> int:
        return 3 if self.kind == "lie" else 1

    @property
    def dim(self) -> int:
        return self.fibre.dim

    def dense(self) -> Tensor:
        mats = self.fibre.lie_matrices() if self.kind == "lie" else self.fibre.parity_matrix()[None]
        return mats.to(self.device)

    def to(self, device: torch.device) -> FibreGenerators:
        self.device = torch.device(device)
        return self


class SchurProjection:
    """Orthogonal projection of dense (d_out, d_in) maps onto the O(3) (or SO(3)) intertwiners.

    Each block between copies of the same irrep (same l, and same parity unless ``parity=False``)
    becomes tr(block)/(2l+1)·I_{2l+1}, every other block 0, whatever the layouts of the two fibres.
    Linear and differentiable in W, computed in W's dtype (cast W to float64 for exact checks).

    Args:
        fibre_in: the fibre W reads. fibre_out: the fibre it writes.
        parity: O(3) (irreps must match in l and parity) or SO(3) (l only).
        pairs: optional (block_in, block_out) index pairs P(W) may connect (e3nn ``o3.Linear`` paths);
            default all pairs of equal irreps, i.e. the whole intertwiner space.

    Example:
        >>> P = SchurProjection(Fibre([(1, 0, 1), (1, 1, -1)]), Fibre([(1, 0, 1), (1, 1, -1)]))
        >>> P(torch.arange(16.).reshape(4, 4))[1:, 1:]
        tensor([[10.,  0.,  0.],
                [ 0., 10.,  0.],
                [ 0.,  0., 10.]])
    """

    def __init__(
        self, fibre_in: Fibre, fibre_out: Fibre, parity: bool = True, pairs: Iterable[tuple[int, int]] | None = None
    ) -> None:
        self.fibre_in, self.fibre_out = fibre_in, fibre_out
        allowed = None if pairs is None else set(pairs)
        cin, cout = fibre_in.copy_index(parity), fibre_out.copy_index(parity)
        # per irrep type: (out index (co, d), in index (ci, d), 0/1 mask (co, ci) or None, out blocks, in blocks)
        self._groups: list[tuple[list[list[int]], list[list[int]], list[list[float]] | None,
                                 list[tuple[int, int, int]], list[tuple[int, int, int]]]] = []
        for key, outs in cout.items():
            if key not in cin:
                continue
            ins = cin[key]
            o_rows = [r for _, rows in outs for r in rows]
            i_rows = [r for _, rows in ins for r in rows]
            o_spans, i_spans, start = [], [], 0
            for j, rows in outs:
                o_spans.append((j, start, len(rows)))
                start += len(rows)
            start = 0
            for i, rows in ins:
                i_spans.append((i, start, len(rows)))
                start += len(rows)
            mask = None
            if allowed is not None:
                mask = [[0.0] * len(i_rows) for _ in o_rows]
                live = False
                for j, r0, mo in o_spans:
                    for i, c0, mi in i_spans:
                        if (i, j) in allowed:
                            live = True
                            for r in range(r0, r0 + mo):
                                mask[r][c0:c0 + mi] = [1.0] * mi
                if not live:
                    continue
                if all(all(v == 1.0 for v in row) for row in mask):
                    mask = None
            self._groups.append((o_rows, i_rows, mask, o_spans, i_spans))
        self._device_cache: dict[Any, list[tuple[Tensor, Tensor, Tensor | None]]] = {}

    def _tables(self, device: torch.device, dtype: torch.dtype) -> list[tuple[Tensor, Tensor, Tensor | None]]:
        key = (str(device), dtype)
        if key not in self._device_cache:
            self._device_cache[key] = [
                (torch.tensor(o, dtype=torch.long, device=device), torch.tensor(i, dtype=torch.long, device=device),
                 None if m is None else torch.tensor(m, dtype=dtype, device=device))
                for o, i, m, _, _ in self._groups
            ]
        return self._device_cache[key]

    def coefficients(self, W: Tensor) -> list[Tensor]:
        """Per irrep type: the (out copies, in copies) matrix c with P(W)'s blocks c_vu·I."""
        out = []
        for o_idx, i_idx, mask in self._tables(W.device, W.dtype):
            d = o_idx.shape[1]
            block = W[o_idx[:, :, None, None], i_idx[None, None, :, :]]  # (co, d, ci, d)
            c = torch.einsum("amcm->ac", block) / d
            out.append(c if mask is None else c * mask)
        return out

    def block_coefficients(self, W: Tensor) -> dict[tuple[int, int], Tensor]:
        """For each connected (block_in, block_out) pair: its (mul_out, mul_in) coefficient matrix."""
        out = {}
        for c, (_, _, mask, o_spans, i_spans) in zip(self.coefficients(W), self._groups):
            for j, r0, mo in o_spans:
                for i, c0, mi in i_spans:
                    if mask is None or mask[r0][c0]:
                        out[(i, j)] = c[r0:r0 + mo, c0:c0 + mi]
        return out

    def from_coefficients(self, coefficients: Sequence[Tensor], like: Tensor) -> Tensor:
        """The dense intertwiner with the given per-type coefficients (shaped and typed as ``like``)."""
        P = torch.zeros_like(like)
        for c, (o_idx, i_idx, _) in zip(coefficients, self._tables(like.device, like.dtype)):
            for m in range(o_idx.shape[1]):
                P[o_idx[:, m][:, None], i_idx[:, m][None, :]] = c
        return P

    def __call__(self, W: Tensor) -> Tensor:
        if W.shape[-2:] != (self.fibre_out.dim, self.fibre_in.dim):
            raise ValueError(f"W must be ({self.fibre_out.dim}, {self.fibre_in.dim}), got {tuple(W.shape)}")
        return self.from_coefficients(self.coefficients(W), W)
