"""Hom_O(3) through Schur's lemma: a fibre's generators for a Symmetry, lazily, and the Schur projection."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from .fibres import Fibre

__all__ = ["FibreGenerators", "SchurProjection"]


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
