"""Relaxation term for MACE's ``SymmetricContraction`` (imports e3nn and mace; loaded lazily).

``SymmetricContraction(x, y)`` reads node features ``x`` of shape (N, channels, Σ(2l+1)) — every
channel carries one copy of the *coupling irreps* ``o3.Irreps([ir for mul, ir in irreps_in])``, the
layout made by MACE's ``reshape_irreps`` — and one-hot element attributes ``y`` (N, num_elements); it
returns (N, irreps_out.dim) in e3nn's layout. The relaxation adds θ·W·vec(x) with a dense
W: (irreps_out.dim, channels·Σ(2l+1)), i.e. it treats the flattened input as the irreps
``channels × coupling irreps`` (channel-major), and reuses the e3nn adapter's machinery: so(3)
generators and inversion of both fibres for the penalty, the closed-form Schur-block projection
(each block between copies of the same irrep → tr(block)/(2l+1)·I) for P(W).

It is **never merged**: the contraction's weights multiply products of x whose degree is set by the
correlation order and by the element attribute y, so no choice of them equals the linear map
θ·P(W)·x. ``project(model, merge=True)`` drops the term with a warning, like ``merge=False``.
"""

from __future__ import annotations

from typing import Any

from e3nn import o3
from mace.modules.symmetric_contraction import SymmetricContraction
from relax_e3nn.terms import E3nnRelaxation
from torch import Tensor, nn

__all__ = ["MaceSymmetricContractionRelaxation", "contraction_input_irreps"]


def contraction_input_irreps(module: nn.Module) -> tuple[o3.Irreps, int, int]:
    """The irreps of a ``SymmetricContraction``'s flattened input, its number of channels and the
    dimension Σ(2l+1) of the coupling irreps.

    Raises:
        ValueError: the irreps_in entries do not all have the same multiplicity (MACE requires it).

    Example:
        >>> from mace.modules.symmetric_contraction import SymmetricContraction
        >>> sc = SymmetricContraction("2x0e + 2x1o", "2x0e", correlation=2, num_elements=3)
        >>> contraction_input_irreps(sc)
        (1x0e+1x1o+1x0e+1x1o, 2, 4)
    """
    irreps_in = o3.Irreps(module.irreps_in)
    muls = {mul for mul, _ in irreps_in}
    if len(muls) != 1:
        raise ValueError(f"SymmetricContraction with unequal multiplicities {irreps_in} is not supported")
    channels = muls.pop()
    coupling = [ir for _, ir in irreps_in]
    fibre = o3.Irreps([(1, ir) for _ in range(channels) for ir in coupling])
    return fibre, channels, sum(ir.dim for ir in coupling)


class MaceSymmetricContractionRelaxation(E3nnRelaxation):
    """Relaxation of a MACE ``SymmetricContraction``: f_θ(x, y) = SC(x, y) + θ·W·vec(x).

    W reads the node features x (N, channels, Σ(2l+1)), never the element attributes y, and writes
    the output irreps. The penalty (so(3) Lie derivative + inversion defect, Σ_n ||W x_n||²) and
    P(W) (orthogonal projection onto Hom_O(3)(channels × coupling irreps, irreps_out)) are the e3nn
    adapter's. Not mergeable (see the module docstring).

    Args:
        module: the ``SymmetricContraction`` (only read).
        rank: low-rank W. init_std: std of a random initial W. subgroup: as for the e3nn adapter.

    Example:
        >>> import torch
        >>> from mace.modules.symmetric_contraction import SymmetricContraction
        >>> sc = SymmetricContraction("2x0e + 2x1o", "2x0e + 2x1o", correlation=2, num_elements=3)
        >>> term = MaceSymmetricContractionRelaxation(sc)
        >>> term.dense().shape, term.paths()[:3]
        (torch.Size([8, 8]), [(0, 0), (1, 1), (2, 0)])
    """

    def __init__(self, module: nn.Module, rank: int | None = None, init_std: float = 0.0,
                 subgroup: str | nn.Module | None = None) -> None:
        fibre, self.channels, self.coupling_dim = contraction_input_irreps(module)
        irreps_out = o3.Irreps(module.irreps_out)
        if any(mul != self.channels for mul, _ in irreps_out):
            raise ValueError(
                f"SymmetricContraction irreps_out {irreps_out} must have {self.channels} channels per irrep"
            )
        super().__init__(fibre, irreps_out, "x", rank=rank, init_std=init_std, subgroup=subgroup)
        if type(module) is SymmetricContraction:
            # mace's own contraction never updates x in place: the core need not clone x before it runs
            # (read by relax_plugins.term.may_modify_inputs where the core has it; unused otherwise)
            self.pure_bases = (SymmetricContraction,)

    def take_input(self, args: tuple, kwargs: dict) -> Tensor:
        x = args[0] if args else kwargs[self.arg_name]
        if x.dim() != 3 or tuple(x.shape[1:]) != (self.channels, self.coupling_dim):
            raise ValueError(
                f"SymmetricContraction input must be (N, {self.channels}, {self.coupling_dim}), got {tuple(x.shape)}"
            )
        self.remember("_batch_shape", (x.shape[0],))
        return x.reshape(x.shape[0], -1)  # channel-major, as contraction_input_irreps lays it out

    def forward(self, base: nn.Module, theta: Tensor, *args: Any, **kwargs: Any) -> Any:
        self.take_input(args, kwargs)  # a clear error before the contraction's own einsum fails obscurely
        return super().forward(base, theta, *args, **kwargs)

    # declared, not inherited by accident: project(merge=True) drops the term with a warning, and
    # projection_report says mergeable = 0 and counts all of θ·W·x as the output change
    can_merge = False

    def extra_repr(self) -> str:
        return f"{self.channels}x({self.coupling_dim}) -> {self.irreps_out}" + (
            "" if self.rank is None else f", rank={self.rank}"
        )
