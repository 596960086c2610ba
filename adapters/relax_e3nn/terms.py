"""Relaxation terms for e3nn layers (imports e3nn; loaded lazily by the plugin).

* :class:`E3nnLinearRelaxation` — ``o3.Linear``: W on the input fibre ``irreps_in → irreps_out``;
  P(W) in closed form onto the Linear's own paths; ``project(model, merge=True)`` adds θ·P(W)
  into ``Linear.weight`` exactly (biases untouched: W has none).
* :class:`E3nnTensorProductRelaxation` — ``o3.TensorProduct`` and every subclass
  (``FullyConnectedTensorProduct``, ``ElementwiseTensorProduct``, ``FullTensorProduct``,
  ``TensorSquare``, ...), with shared or external (per-sample) weights: W acts on the **first**
  input x1 only, ``irreps_in1 → irreps_out``, so f_θ(x1, x2) = tp(x1, x2) + θ·W·x1. P(W) is the
  projection onto all O(3) intertwiners ``irreps_in1 → irreps_out``. It is **not merged**:
  a tensor product is bilinear, and θ·P(W)·x1 does not depend on x2, so the TP's weights can
  represent it only if x2 carries a constant scalar, which the layer cannot know. With
  ``merge=True`` the core therefore drops these terms (with a warning), exactly like ``merge=False``.
"""

from __future__ import annotations

from typing import Any

import torch
from e3nn import o3
from torch import Tensor, nn

from relax_plugins import LinearRelaxation, PenaltyTerms
from relax_plugins.irreps import SchurProjection
from relax_plugins.symmetry import OneGeneratorProjector
from relax_plugins.term import first_arg_name, may_modify_inputs

from .irreps import irrep_pairs, irreps_fibre, irreps_projection, irreps_symmetry

__all__ = ["E3nnRelaxation", "E3nnLinearRelaxation", "E3nnTensorProductRelaxation"]


SO2_AXES = {"SO(2)": 2, "SO(2)_x": 0, "SO(2)_y": 1, "SO(2)_z": 2}


class E3nnRelaxation(LinearRelaxation):
    """Dense W between two irreps fibres with e3nn's O(3) generators (shared code of the terms).

    Args:
        irreps_in: irreps of the fibre W reads.
        irreps_out: irreps of the layer output.
        arg_name: name of the forward argument W reads, when it is passed by keyword.
        rank: low-rank W (see :class:`relax_plugins.LinearRelaxation`).
        init_std: std of a random initial dense W.
        subgroup: ``"SO(3)"`` relaxes O(3) only to SO(3): W stays rotation-equivariant (it may mix
            irreps of equal l and opposite parity) while the penalty and the final projection
            still enforce parity. ``"SO(2)_x"``, ``"SO(2)_y"``, ``"SO(2)_z"`` (``"SO(2)"`` = z) keep
            only the rotations about that axis. Or any module computing P_H(W).

    Example:
        >>> term = E3nnRelaxation("1x0e + 1x1o", "1x1o")
        >>> term.dense().shape, term.symmetry.num_group
        (torch.Size([3, 4]), 1)
    """

    def __init__(
        self,
        irreps_in: o3.Irreps | str,
        irreps_out: o3.Irreps | str,
        arg_name: str = "x",
        rank: int | None = None,
        init_std: float = 0.0,
        subgroup: str | nn.Module | None = None,
    ) -> None:
        self.irreps_in, self.irreps_out = o3.Irreps(irreps_in), o3.Irreps(irreps_out)
        sym = irreps_symmetry(self.irreps_in, self.irreps_out)
        if subgroup == "SO(3)":
            subgroup = SO3Projector(self.irreps_in, self.irreps_out)
        elif isinstance(subgroup, str) and subgroup in SO2_AXES:
            axis = SO2_AXES[subgroup]  # e3nn's generators are rotations about x, y, z
            subgroup = OneGeneratorProjector(sym.lie_in[axis], sym.lie_out[axis])
        super().__init__(sym, rank=rank, init_std=init_std, subgroup=subgroup)
        self._schur: SchurProjection | None = None  # P(W) along paths(), built on first use
        self.arg_name = arg_name
        self._batch_shape: tuple[int, ...] = ()

    # -- layout -----------------------------------------------------------------------------------
    def take_input(self, args: tuple, kwargs: dict) -> Tensor:
        x = args[0] if args else kwargs[self.arg_name]
        if x.shape[-1] != self.symmetry.dim_in:  # plain ints in the hot path (torch.compile cannot guard Irreps)
            raise ValueError(f"expected a last axis of {self.irreps_in.dim} ({self.irreps_in}), got {tuple(x.shape)}")
        self.remember("_batch_shape", tuple(x.shape[:-1]))
        return x

    def from_fibre(self, delta: Tensor, out: Tensor) -> Tensor:
        # W·x has the batch shape of the input it reads; broadcasting against the layer output
        # covers two-input layers whose output batch shape is the broadcast of both inputs
        return delta.reshape(self._batch_shape + (self.symmetry.dim_out,))

    def forward(self, base: nn.Module, theta: Tensor, *args: Any, **kwargs: Any) -> Any:
        """f(x) + θ·W·x, as :meth:`relax_plugins.LinearRelaxation.forward`, with the product and
        the sum fused (``apply_weight(..., add_to=)``) when the output has the input's batch shape."""
        x = self.to_fibre(self.take_input(args, kwargs))
        if may_modify_inputs(base, self.pure_bases):
            x = x.clone()  # read before the base layer runs: an in-place update must not reach W·x
        out = base(*args, **kwargs)
        self.remember("_x", x.detach())
        if tuple(out.shape[:-1]) == self._batch_shape:
            result = self.apply_weight(x, theta, add_to=out.reshape(-1, out.shape[-1])).reshape(out.shape)
        else:
            result = out + self.from_fibre(self.apply_weight(x, theta), out)
        self.remember("_y", result.detach())
        return result

    # penalties: the core's default (second-moment form, batched across layers of equal shapes by
    # relax_plugins.penalty) computes exactly Σ_n ||W A x − A W x||² over the three so(3) generators
    # and the inversion, and Σ_n ||W x||², at O(d³) per layer

    # -- projection -------------------------------------------------------------------------------
    def paths(self) -> list[tuple[int, int]]:
        """(i_in, i_out) irreps entries that P(W) may connect."""
        return irrep_pairs(self.irreps_in, self.irreps_out)

    def schur(self) -> SchurProjection:
        """The closed-form projection onto the intertwiners along :meth:`paths` (cached)."""
        if self._schur is None:
            self._schur = irreps_projection(self.irreps_in, self.irreps_out, self.paths())
        return self._schur

    def project_dense(self, W: Tensor) -> Tensor:
        """Closed-form orthogonal projection onto the intertwiners along :meth:`paths`, in float64
        (returned in W's dtype; like :func:`relax_e3nn.project_irreps_dense`)."""
        return self.schur()(W.detach().double()).to(W.dtype)

    def extra_repr(self) -> str:
        return f"{self.irreps_in} -> {self.irreps_out}" + ("" if self.rank is None else f", rank={self.rank}")


class E3nnLinearRelaxation(E3nnRelaxation):
    """Relaxation of an ``o3.Linear``: W: ``irreps_in → irreps_out`` on the fibre.

    P(W) is the orthogonal projection onto the Linear's own span (its instructions; for the default
    instructions this is the whole O(3) intertwiner space): each path block becomes
    tr(block)/(2l+1)·I. The Linear's weight → dense map sends ``weight_view[u, v]`` to
    ``path_weight·weight_view[u, v]·I`` in block (v, u), with mutually orthogonal columns, so this
    closed form *is* the least-squares solution, and the merge ``weight_view += c.T / path_weight``
    reproduces θ·P(W) exactly. Biases are not touched (W has no bias).

    Args:
        linear: the ``o3.Linear`` (only read, never changed here).
        rank: low-rank W.
        init_std: std of a random initial dense W.

    Raises:
        ValueError: the Linear uses the ``f_in``/``f_out`` batched-feature form, which the
            fibre layout does not cover.

    Example:
        >>> lin = o3.Linear("2x0e + 1x1o", "1x0e + 1x1o")
        >>> E3nnLinearRelaxation(lin).paths()
        [(0, 0), (1, 1)]
    """

    can_merge = True  # per instance: False for a Linear whose weights come from outside

    def __init__(self, linear: nn.Module, rank: int | None = None, init_std: float = 0.0,
                 subgroup: str | nn.Module | None = None) -> None:
        if getattr(linear, "internal_weights", False) and linear.weight.dim() > 1:
            raise ValueError("o3.Linear with f_in/f_out (batched feature channels) is not supported")
        super().__init__(linear.irreps_in, linear.irreps_out, first_arg_name(linear), rank=rank, init_std=init_std,
                         subgroup=subgroup)
        # per-sample weights come from outside: nothing in the layer can hold θ·P(W)
        self.can_merge = bool(getattr(linear, "internal_weights", False)) and linear.weight_numel > 0
        self._paths = [
            (ins.i_in, ins.i_out)
            for ins in linear.instructions
            if ins.i_in >= 0 and 0 not in ins.path_shape and self.irreps_in[ins.i_in].dim > 0
        ]

        # O(3) intertwiners the Linear has no path for: the generators' penalty cannot see them, yet
        # P(W) (and so project()) drops them; penalised by their own norm on the samples instead
        self._missing = [pair for pair in irrep_pairs(self.irreps_in, self.irreps_out) if pair not in self._paths]
        if self._missing:
            self.batched_penalty = False  # the extra sum is this term's own: penalty_terms() is called

    def paths(self) -> list[tuple[int, int]]:
        return list(dict.fromkeys(self._paths))

    def penalty_terms(self) -> PenaltyTerms:
        """The core's Lie and norm sums, plus Σ_n ||D x_n||² in the Lie part for an ``o3.Linear``
        with fewer instructions than O(3) allows: D is W's component on the intertwiners between
        irreps the Linear does not connect (equivariant, so the generators miss it, but not in the
        Linear's span, so ``project()`` drops it). The penalty then vanishes exactly on P's image."""
        terms = super().penalty_terms()
        if not getattr(self, "_missing", None):
            return terms
        x, n = self.penalty_input()
        W = self.dense()
        D = torch.zeros_like(W)
        ins, outs = self.irreps_in.slices(), self.irreps_out.slices()
        for i, j in self._missing:
            (mul_in, ir), (mul_out, _) = self.irreps_in[i], self.irreps_out[j]
            d = ir.dim
            block = W[outs[j], ins[i]].reshape(mul_out, d, mul_in, d)
            c = torch.einsum("aibi->ab", block) / d  # the block's projection onto c ⊗ I
            D[outs[j], ins[i]] = torch.einsum("ab,ij->aibj", c, torch.eye(d, dtype=W.dtype, device=W.device)).reshape(
                mul_out * d, mul_in * d)
        extra = (x.to(W.dtype) @ D.T).square().sum()
        return PenaltyTerms(terms.lie + extra, terms.norm, terms.samples)

    def from_fibre(self, delta: Tensor, out: Tensor) -> Tensor:
        if tuple(out.shape[:-1]) != self._batch_shape:
            # only an f_in/f_out Linear with external weights gets here (the others are refused)
            raise ValueError(f"o3.Linear output batch shape {tuple(out.shape[:-1])} differs from its input's "
                             f"{self._batch_shape}: f_in/f_out Linears are not supported")
        return super().from_fibre(delta, out)

    def dense_delta(self, base: nn.Module, delta: Tensor) -> dict[str, Tensor]:
        """The change to ``base.weight`` that adds the intertwiner ``delta`` (float64)."""
        coeffs = self.schur().block_coefficients(delta.double())
        out = torch.zeros(base.weight.shape, dtype=torch.float64, device=delta.device)
        done: set[tuple[int, int]] = set()
        # offsets walked by hand: e3nn 0.6's weight_views() also steps over bias instructions
        # (i_in = -1), whose entries live in ``bias``, and runs past the end of ``weight``
        offset = 0
        for ins in base.instructions:
            if ins.i_in < 0:
                continue
            size = ins.path_shape[0] * ins.path_shape[1]
            view = out.narrow(-1, offset, size).view(ins.path_shape)
            offset += size
            key = (ins.i_in, ins.i_out)
            if key in done or key not in coeffs:
                continue  # a repeated instruction: the first one already carries the block
            done.add(key)
            view += (coeffs[key].T / ins.path_weight).to(base.weight.dtype)
        return {"weight": out}


class E3nnTensorProductRelaxation(E3nnRelaxation):
    """Relaxation of an ``o3.TensorProduct`` (any subclass): W acts on the first input x1.

    f_θ(x1, x2[, weight]) = tp(x1, x2[, weight]) + θ·W·x1 with W: ``irreps_in1 → irreps_out``.
    Works with shared weights and with external per-sample weights (``shared_weights=False``, the
    weights passed to forward positionally or as ``weight=``): the weights are left to the base
    layer. x1 may be passed positionally or by keyword. P(W) projects onto all O(3) intertwiners
    ``irreps_in1 → irreps_out``; it is never merged (see the module docstring), so
    :meth:`projection_error` reports the whole θ·W·x1 as the output change.

    Args:
        tp: the tensor product (only read).
        rank: low-rank W.
        init_std: std of a random initial dense W.

    Example:
        >>> tp = o3.FullyConnectedTensorProduct("1x1o", "1x0e + 1x1o", "1x0e + 1x1o")
        >>> E3nnTensorProductRelaxation(tp).dense().shape
        torch.Size([4, 3])
    """

    def __init__(self, tp: nn.Module, rank: int | None = None, init_std: float = 0.0,
                 subgroup: str | nn.Module | None = None) -> None:
        super().__init__(tp.irreps_in1, tp.irreps_out, first_arg_name(tp), rank=rank, init_std=init_std,
                         subgroup=subgroup)

    can_merge = False  # bilinear: W·x1 is not a tensor product of x1 and x2 (see the module docstring)


class SO3Projector(nn.Module):
    """Differentiable orthogonal projection onto the SO(3) intertwiners ``irreps_in → irreps_out``:
    every block between copies of irreps of equal l (either parity) becomes tr(block)/(2l+1)·I.

    Used to relax an O(3) layer only to its subgroup SO(3) (``subgroup="SO(3)"``).

    Example:
        >>> P = SO3Projector("1x1o", "1x1e")
        >>> W = torch.randn(3, 3, dtype=torch.float64)
        >>> bool(torch.allclose(P(W), torch.eye(3, dtype=torch.float64) * W.trace() / 3))
        True
    """

    def __init__(self, irreps_in: o3.Irreps | str, irreps_out: o3.Irreps | str) -> None:
        super().__init__()
        self.schur = SchurProjection(irreps_fibre(irreps_in), irreps_fibre(irreps_out), parity=False)

    def forward(self, W: Tensor) -> Tensor:
        return self.schur(W)
