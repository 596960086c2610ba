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

The fibres live in :mod:`.fibres`, the generators in :mod:`.so3`, the projection in :mod:`.schur`;
every name is importable from here.
"""

from __future__ import annotations

from .fibres import LAYOUTS, Block, Fibre, GeneratorFn, Irrep, parse_irreps  # noqa: F401
from .schur import FibreGenerators, SchurProjection
from .so3 import _so3_generators64, so3_basis, so3_generators  # noqa: F401

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
