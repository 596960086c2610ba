"""Generators of an escnn field type's representation: finite-group generators and Lie-algebra
generators derived from escnn's own representations.

escnn has no Lie-algebra API (``Group.generators`` exists for finite groups only), so the Lie
generators dρ(A) are computed as the real matrix logarithm of ρ(exp tA) divided by t, for a small t
with t · (largest frequency) < π so that the principal logarithm is the right branch. Because
ρ(exp tA) is taken from escnn's own representation, the result is automatically in escnn's irrep
bases (its SO(3) frequency-1 irrep is in (y, z, x) order, not xyz), whatever the field type.

This module imports escnn; :mod:`relax_escnn.plugin` imports it only once escnn is loaded.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch
from escnn.group import Group, GroupElement
from escnn.nn import FieldType
from torch import Tensor

from relax_plugins import Symmetry

__all__ = ["lie_elements", "finite_elements", "lie_generators", "group_generators", "fibre_symmetry", "group_name"]


def _max_frequency(ftype: FieldType) -> int:
    """Largest irrep frequency in ``ftype`` (bounds the eigen-angles of ρ(exp tA) = t · freq)."""
    top = 1
    for rep in ftype.representations:
        for irr in rep.irreps:
            freq = irr[-1] if isinstance(irr, tuple) else 1
            if isinstance(freq, (int, np.integer)):
                top = max(top, int(freq))
    return top


def lie_elements(group: Group, t: float) -> list[GroupElement]:
    """Elements exp(t·A_k) for a basis A_k of the Lie algebra of ``group`` (empty if finite).

    SO(2)/O(2): one rotation by t. SO(3)/O(3): rotations by t about the x, y and z axes (in that
    order, matching ``e3nn.o3.so3_generators`` up to escnn's basis change).

    Example:
        >>> from escnn import group
        >>> len(lie_elements(group.so3_group(), 0.1)), len(lie_elements(group.cyclic_group(4), 0.1))
        (3, 0)
    """
    if not group.continuous:
        return []
    name = type(group).__name__
    if name == "SO2":
        return [group.element(t)]
    if name == "O2":
        return [group.element((0, t))]
    if name in ("SO3", "O3"):
        out = []
        for axis in range(3):
            v = np.zeros(3)
            v[axis] = t
            out.append(group.element(v, "EV") if name == "SO3" else group.element((0, v), "EV"))
        return out
    raise NotImplementedError(f"no Lie-algebra basis known for escnn group {group.name}")


def finite_elements(group: Group) -> list[GroupElement]:
    """Generators of the discrete part of ``group``: all generators of a finite group, the flip of
    O(2) and the inversion of O(3); empty for SO(2), SO(3).

    Example:
        >>> from escnn import group
        >>> len(finite_elements(group.dihedral_group(4))), len(finite_elements(group.o2_group()))
        (2, 1)
    """
    if not group.continuous:
        return list(group.generators)
    name = type(group).__name__
    if name == "O2":
        return [group.element((1, 0.0))]
    if name == "O3":
        return [group.element((1, np.zeros(3)), "EV")]
    if name in ("SO2", "SO3"):
        return []
    raise NotImplementedError(f"no discrete generators known for escnn group {group.name}")


def lie_generators(ftype: FieldType, t: float | None = None) -> Tensor:
    """dρ(A_k) on the fibre of ``ftype``, shape (k, size, size), float64; k = 0 for finite groups.

    Args:
        ftype: an escnn field type.
        t: step of the logarithm; default 0.5 / (largest frequency), safely below the branch cut.

    Example:
        >>> from escnn import gspaces, nn
        >>> gs = gspaces.rot2dOnR2(-1)
        >>> L = lie_generators(nn.FieldType(gs, [gs.irrep(1)]))
        >>> L.shape, bool(torch.allclose(L[0], -L[0].T))
        (torch.Size([1, 2, 2]), True)
    """
    group = ftype.fibergroup
    if t is None:
        t = 0.5 / _max_frequency(ftype)
    mats = []
    for g in lie_elements(group, t):
        R = np.asarray(ftype.representation(g), dtype=np.float64)
        # principal real logarithm: exact while every eigen-angle t·freq stays below π
        L = scipy.linalg.logm(R)
        mats.append(np.real(L) / t)
    if not mats:
        return torch.zeros(0, ftype.size, ftype.size, dtype=torch.float64)
    return torch.from_numpy(np.ascontiguousarray(np.stack(mats)))


def group_generators(ftype: FieldType) -> Tensor:
    """ρ(g_j) on the fibre of ``ftype`` for the discrete generators, shape (m, size, size), float64.

    Example:
        >>> from escnn import gspaces, nn
        >>> gs = gspaces.rot2dOnR2(8)
        >>> group_generators(nn.FieldType(gs, [gs.regular_repr])).shape
        torch.Size([1, 8, 8])
    """
    mats = [np.asarray(ftype.representation(g), dtype=np.float64) for g in finite_elements(ftype.fibergroup)]
    if not mats:
        return torch.zeros(0, ftype.size, ftype.size, dtype=torch.float64)
    # escnn's matrices can be Fortran-ordered; the core's constraint_matrix needs C-contiguous ones
    return torch.from_numpy(np.ascontiguousarray(np.stack(mats)))


def group_name(ftype: FieldType) -> str:
    """escnn's name of the fibre group (e.g. ``"C8"``, ``"SO(2)"``)."""
    return str(ftype.fibergroup.name)


def fibre_symmetry(in_type: FieldType, out_type: FieldType) -> Symmetry:
    """A :class:`relax_plugins.Symmetry` for a map between the fibres of two field types.

    Example:
        >>> from escnn import gspaces, nn
        >>> gs = gspaces.flipRot2dOnR2(4)
        >>> sym = fibre_symmetry(nn.FieldType(gs, [gs.regular_repr]), nn.FieldType(gs, [gs.trivial_repr]))
        >>> sym.dim_in, sym.dim_out, sym.num_lie, sym.num_group
        (8, 1, 0, 2)
    """
    if in_type.fibergroup != out_type.fibergroup:
        raise ValueError("input and output field types act with different groups")
    return Symmetry(
        in_type.size, out_type.size,
        lie_in=lie_generators(in_type), lie_out=lie_generators(out_type),
        group_in=group_generators(in_type), group_out=group_generators(out_type),
        name=group_name(in_type),
    )
