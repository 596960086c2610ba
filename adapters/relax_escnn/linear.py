"""Relaxation of ``escnn.nn.Linear`` (a pointwise layer on the fibre of ``GSpace0D`` field types).

W is a dense matrix on the fibre; the penalty is the core's data-dependent Lie derivative (SO(2),
O(2), SO(3), O(3): generators from :func:`relax_escnn.groups.lie_generators`) plus the discrete
defect (finite groups, flips, inversion), all in escnn's own representation bases. P(W) is the least
squares solution onto escnn's own basis of the layer, merged into ``weights``.

This module imports escnn.
"""

from __future__ import annotations

from typing import Any

from escnn.nn import GeometricTensor
from torch import Tensor, nn

from relax_plugins import LinearRelaxation
from relax_plugins.term import first_arg_name

from .basis import BasisProjector, eval_cache_delta, refresh_eval_cache
from .groups import fibre_symmetry

__all__ = ["EscnnLinearRelaxation"]


class EscnnLinearRelaxation(LinearRelaxation):
    """Dense (or low-rank) W on the fibre of an ``escnn.nn.Linear``; GeometricTensor in and out.

    Args:
        linear: the escnn ``nn.Linear`` layer.
        rank: low-rank W (see :class:`relax_plugins.LinearRelaxation`).
        init_std: std of a random initial W.

    Example:
        >>> import torch
        >>> from escnn import group, gspaces, nn
        >>> gs = gspaces.no_base_space(group.so2_group(3))
        >>> t_in = nn.FieldType(gs, [gs.irrep(1)] * 2)
        >>> t_out = nn.FieldType(gs, [gs.irrep(1), gs.trivial_repr])
        >>> term = EscnnLinearRelaxation(nn.Linear(t_in, t_out))
        >>> term.symmetry.num_lie, term.symmetry.dim_in, term.symmetry.dim_out
        (1, 4, 3)
    """

    can_merge = True  # least squares onto escnn's basis: coefficients add to ``weights``

    def __init__(self, linear: nn.Module, rank: int | None = None, init_std: float = 0.0) -> None:
        super().__init__(fibre_symmetry(linear.in_type, linear.out_type), rank=rank, init_std=init_std)
        self.projector = BasisProjector(linear.basisexpansion, linear.out_type.size, linear.in_type.size)
        self.arg_name = first_arg_name(linear, "input")  # escnn's own layers: Linear(input=...)

    def take_input(self, args: tuple, kwargs: dict) -> Tensor:
        return (args[0] if args else kwargs[getattr(self, "arg_name", "input")]).tensor

    def output_tensor(self, out: Any) -> Tensor:
        return out.tensor

    def replace_output(self, out: Any, new: Tensor) -> Any:
        return GeometricTensor(new, out.type, out.coords)

    def project_dense(self, W: Tensor) -> Tensor:
        """Least squares of W onto escnn's basis of the layer (exactly its intertwiners)."""
        # the solve is float64; the expansion runs in the dtype of escnn's basis buffers
        ref = next((b for b in self.projector.expansion.buffers() if b.is_floating_point()), None)
        w = self.projector.coefficients(W.detach().double().unsqueeze(-1))
        P = self.projector.expand(w.to(ref.dtype if ref is not None else W.dtype))
        return P.reshape(W.shape).to(W.dtype)

    def dense_delta(self, base: nn.Module, delta: Tensor) -> dict[str, Tensor]:
        """escnn ``weights`` of ``delta`` (least squares, float64), and in eval mode the change of
        the cached ``matrix`` (linear in the weights) so that a projected state_dict stays consistent."""
        w = self.projector.coefficients(delta.double().unsqueeze(-1))
        return {"weights": w, **eval_cache_delta(base, "matrix", w, lambda dw: self.projector.expand(dw))}

    def after_merge(self, base: nn.Module) -> None:
        refresh_eval_cache(base, "matrix")
