"""O(3) irreps fibres: irreps, blocks and :class:`Fibre` (generators, parity and block-by-block application)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .so3 import so3_generators

__all__ = ["LAYOUTS", "Irrep", "Block", "Fibre", "parse_irreps"]

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
