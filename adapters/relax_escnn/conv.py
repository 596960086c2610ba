"""Relaxation of escnn steerable convolutions (``R2Conv``, ``R3Conv`` and their transposed versions).

The relaxation term is an unconstrained kernel ``K`` of the same geometry as the layer's filter.
It is **added to the equivariant filter** and one convolution is run with the base layer's
padding, stride, dilation, groups and bias:

    f_θ(x) = (F(w) + θ·K) ⋆ x + b,

which costs almost nothing on top of the base layer (a separate convolution would double the step).

Penalties (kernel space, see :class:`ConvRelaxation` for the choice per group):

* ``"residual"`` (default, every group): ||K − P(K)||², P = least squares onto escnn's own basis.
  Its null space is exactly what :func:`relax_plugins.project` keeps, for finite and continuous
  groups alike.
* ``"defect"``: Σ_g ||ρ_out(g) K(g⁻¹·) ρ_in(g)⁻¹ − K||² over the group elements that map the
  sampling grid onto itself (90° rotations and flips contained in the group), with the fibre
  representation. Exact, but blind to violations that only the other elements (45° for C8, small
  angles for SO(2)) would see.
* ``"both"``: the sum.

This module imports escnn.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from escnn.nn import FieldType, GeometricTensor
from escnn.nn.modules.conv.rd_convolution import _RdConv
from torch import Tensor, nn

from relax_plugins import PenaltyTerms, RelaxationTerm
from relax_plugins.term import first_arg_name, has_call_hooks

from .basis import BasisProjector, eval_cache_delta, refresh_eval_cache

__all__ = ["ConvRelaxation", "grid_actions", "PENALTIES", "ACTIVATION_NORMS"]

PENALTIES = ("residual", "defect", "both")
ACTIVATION_NORMS = ("kernel", "exact")


def _is_transposed(conv: nn.Module) -> bool:
    return hasattr(conv, "output_padding")


def grid_actions(
    ftype_in: FieldType, ftype_out: FieldType, kernel_size: int, d: int
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """(ρ_out(g), ρ_in(g)⁻¹, permutation of the kernel grid) for every non-identity group element
    whose spatial action maps the kernel's sampling grid exactly onto itself.

    The spatial permutation is read from escnn itself (``GeometricTensor.transform`` of an index
    image), so it follows escnn's orientation conventions; elements whose transform is not an
    exact permutation (interpolated, e.g. 45°) are skipped. Finite groups are enumerated; for
    continuous groups the 90° rotations and flips among escnn's ``testing_elements`` are used.

    Returns:
        list of float64 tensors (out, out), (in, in) and a long tensor (k**d,) with
        ``K_g[..., p] = K[..., perm[p]]``.

    Example:
        >>> from escnn import gspaces, nn
        >>> gs = gspaces.rot2dOnR2(8)
        >>> t = nn.FieldType(gs, [gs.regular_repr])
        >>> len(grid_actions(t, t, 3, 2))   # 90°, 180°, 270°
        3
    """
    gspace = ftype_in.gspace
    group = ftype_in.fibergroup
    try:
        elements = list(group.elements) if not group.continuous else list(gspace.testing_elements)
    except (ValueError, TypeError, AttributeError):
        elements = []
    trivial = FieldType(gspace, [gspace.trivial_repr])
    idx = torch.arange(kernel_size**d, dtype=torch.float64).reshape((1, 1) + (kernel_size,) * d)
    idx_t = GeometricTensor(idx, trivial)
    out = []
    seen = set()
    for g in elements:
        if g == group.identity:
            continue
        try:
            moved = idx_t.transform(g).tensor.reshape(-1).double()
        except Exception:
            continue
        perm = torch.round(moved)
        # escnn interpolates (in float16 matrices) for off-lattice elements: keep exact permutations only
        if not torch.allclose(moved, perm, atol=1e-3) or perm.unique().numel() != perm.numel() or perm.min() < 0:
            continue
        key = tuple(int(v) for v in perm)
        rin = np.asarray(ftype_in.representation(g), dtype=np.float64)
        rout = np.asarray(ftype_out.representation(g), dtype=np.float64)
        fib = (key, rin.round(8).tobytes(), rout.round(8).tobytes())
        if fib in seen:
            continue
        seen.add(fib)
        out.append((torch.from_numpy(rout), torch.from_numpy(np.linalg.inv(rin)), perm.long()))
    return out


class ConvRelaxation(RelaxationTerm):
    """Unconstrained kernel K added to an escnn convolution's equivariant filter.

    Args:
        conv: the escnn convolution (``R2Conv``, ``R3Conv``, ``R2ConvTransposed``, ``R3ConvTransposed``).
        penalty: ``"residual"`` (default), ``"defect"`` or ``"both"`` (see the module docstring).
            Which to use for which group: ``"residual"`` is the only one that sees every violation
            for C_N with N ∤ 4, D_N with N ∤ 4, SO(2), O(2), SO(3), O(3) and the other 3D groups, and
            its null space is exactly escnn's (band-limited) basis, i.e. what ``project()`` keeps.
            ``"defect"`` is exact group theory but only for elements that map the square/cubic
            grid to itself, so it is complete only for C2, C4, D1, D2, D4 (and the
            octahedral group in 3D); it also accepts kernels escnn's band-limited basis cannot express.
        activation_norm: ``"kernel"`` (default): the activation norm Σ||K ⋆ x||² is replaced by its
            expectation for i.i.d. inputs, (#outputs)·mean(x²)·||K||², which needs no second
            convolution; ``"exact"`` runs the extra convolution K ⋆ x in ``penalty_terms()``
            (about doubles the layer's cost).
        init_std: std of a random initial K (0, the default, keeps the layer's outputs).

    ``rank`` is ignored for convolutions (K is always a full kernel).

    Penalty units: a sample is one output position (batch × output pixels/voxels). The kernel-space
    defect is counted once per sample, ``lie = samples · ||K − P(K)||²``, so the core's default
    and ``"mean"`` forms give ||K − P(K)||² per layer (batch-size independent) and the ``"paper"``
    form grows with the batch size like the authors' data-dependent sums.

    Example:
        >>> import torch
        >>> from escnn import gspaces, nn
        >>> gs = gspaces.rot2dOnR2(4)
        >>> t = nn.FieldType(gs, [gs.regular_repr])
        >>> conv = nn.R2Conv(t, t, 3, padding=1)
        >>> term = ConvRelaxation(conv)
        >>> y = term(conv, torch.tensor(1.0), t(torch.randn(2, 4, 7, 7)))
        >>> float(term.penalty_terms().lie)   # K = 0
        0.0
    """

    _recorded_attrs = ("_x", "_y_norm", "_samples")
    can_merge = True  # K's least-squares coefficients add to the conv's ``weights``

    def __init__(
        self,
        conv: _RdConv,
        penalty: str = "residual",
        activation_norm: str = "kernel",
        init_std: float = 0.0,
        subgroup: Any = None,
    ) -> None:
        super().__init__()
        if penalty not in PENALTIES:
            raise ValueError(f"penalty must be one of {PENALTIES}, got {penalty!r}")
        if activation_norm not in ACTIVATION_NORMS:
            raise ValueError(f"activation_norm must be one of {ACTIVATION_NORMS}, got {activation_norm!r}")
        if getattr(conv, "padding_mode", "zeros") != "zeros" and _is_transposed(conv):
            raise NotImplementedError("transposed escnn convolutions support zero padding only")
        self.penalty, self.activation_norm = penalty, activation_norm
        # geometry copied (not the module: a reference would register it twice in state_dict)
        self._geom = {
            "stride": conv.stride, "padding": conv.padding, "dilation": conv.dilation, "groups": conv.groups,
            "padding_mode": getattr(conv, "padding_mode", "zeros"),
            "reversed_padding": getattr(conv, "_reversed_padding_repeated_twice", None),
            "output_padding": getattr(conv, "output_padding", 0),
        }
        self.transposed = _is_transposed(conv)
        self.arg_name = first_arg_name(conv, "input")  # escnn's own layers: R2Conv(input=...)
        self.d = int(conv.d)
        self.kernel_size = int(conv.kernel_size)
        shape = tuple(conv.filter.shape) if hasattr(conv, "filter") else None
        if shape is None:  # the cache was deleted by train(): rebuild the shape from the types
            # as in torch, a grouped filter holds one group of the channel axis that is not the
            # first: (out, in / groups, k...) for a convolution, (in, out / groups, k...) transposed
            g = conv.groups
            shape = ((conv.in_type.size, conv.out_type.size // g) if self.transposed
                     else (conv.out_type.size, conv.in_type.size // g)) + (self.kernel_size,) * self.d
        # zeros when init_std == 0: do not consume the global RNG (keeps users' seeded runs identical)
        init = torch.randn(shape) * float(init_std) if init_std > 0 else torch.zeros(shape)
        self.weight = nn.Parameter(init)
        # basis layout is (out, in, S) for both; the transposed filter is (in, out, k, ...)
        rows, cols = (shape[1], shape[0]) if self.transposed else (shape[0], shape[1])
        self.projector = BasisProjector(conv.basisexpansion, rows, cols)
        # relaxing only to a subgroup H: K = P_H(V), least squares onto the basis escnn builds for the
        # same convolution between the restricted field types (e.g. C8 -> C4: subgroup=4)
        self.subgroup_projector = None
        if subgroup is not None:
            if self.transposed:
                raise NotImplementedError("subgroup relaxation is implemented for R2Conv/R3Conv only")
            shadow = type(conv)(conv.in_type.restrict(subgroup), conv.out_type.restrict(subgroup), self.kernel_size,
                                padding=conv.padding, stride=conv.stride, dilation=conv.dilation,
                                groups=conv.groups, bias=False, initialize=False)
            self.subgroup_projector = BasisProjector(shadow.basisexpansion, rows, cols)
        # the field types of the kernel's own axes: escnn builds a grouped kernel between one group of
        # the input fields and all outputs, or (transposed) all inputs and one group of the outputs
        self._grid_in, self._grid_out = conv.in_type, conv.out_type
        if conv.groups > 1 and self.transposed:
            self._grid_out = conv.out_type.index_select(list(range(len(conv.out_type) // conv.groups)))
        elif conv.groups > 1:
            self._grid_in = conv.in_type.index_select(list(range(len(conv.in_type) // conv.groups)))
        self._actions: list | None = None
        if penalty != "residual":
            self._actions = grid_actions(self._grid_in, self._grid_out, self.kernel_size, self.d)
            if not self._actions and penalty == "defect":
                raise ValueError(
                    f"no element of {conv.in_type.fibergroup.name} maps the kernel grid onto itself, so the "
                    "'defect' penalty would be blind; use escnn_penalty='residual'"
                )
        self._x: Tensor | None = None
        self._samples = 0
        self._y_norm: Tensor | None = None

    def kernel(self) -> Tensor:
        """The relaxation kernel K in torch layout: the free weight, or P_H of it for a subgroup."""
        if self.subgroup_projector is None:
            return self.weight
        return self._torch_layout(self.subgroup_projector.project(self._basis_layout(self.weight)))

    # -- layout helpers --------------------------------------------------------------------------
    def _basis_layout(self, K: Tensor) -> Tensor:
        """(out, in, S) view of a filter in torch layout."""
        if self.transposed:
            K = K.transpose(0, 1)
        return K.reshape(K.shape[0], K.shape[1], -1)

    def _torch_layout(self, Kb: Tensor) -> Tensor:
        K = Kb.reshape(Kb.shape[0], Kb.shape[1], *(self.kernel_size,) * self.d)
        return K.transpose(0, 1) if self.transposed else K

    def _conv(self, x: Tensor, filt: Tensor, bias: Tensor | None) -> Tensor:
        """The base layer's convolution (same padding, stride, dilation, groups) with ``filt``."""
        g = self._geom
        if self.transposed:
            fn = F.conv_transpose2d if self.d == 2 else F.conv_transpose3d
            return fn(x, filt, bias=bias, stride=g["stride"], padding=g["padding"],
                      output_padding=g["output_padding"], groups=g["groups"], dilation=g["dilation"])
        fn = F.conv2d if self.d == 2 else F.conv3d
        if g["padding_mode"] == "zeros":
            return fn(x, filt, bias=bias, stride=g["stride"], padding=g["padding"],
                      dilation=g["dilation"], groups=g["groups"])
        x = F.pad(x, g["reversed_padding"], g["padding_mode"])
        return fn(x, filt, bias=bias, stride=g["stride"], dilation=g["dilation"], groups=g["groups"])

    # -- forward -------------------------------------------------------------------------------
    def forward(self, base: _RdConv, theta: Tensor, *args: Any, **kwargs: Any) -> GeometricTensor:
        name = self.__dict__.get("arg_name", "input")  # terms pickled before it existed: escnn's name
        if len(args) + len(kwargs) != 1 or (kwargs and name not in kwargs):
            raise TypeError(f"escnn convolutions take one GeometricTensor ({name!r}), got {len(args)} positional "
                            f"and keyword arguments {sorted(kwargs)}")
        x = args[0] if args else kwargs[name]
        if not isinstance(x, GeometricTensor) or x.type != base.in_type:
            raise TypeError(f"expected a GeometricTensor of type {base.in_type}")
        K = self.kernel()
        if has_call_hooks(base):  # the user's hooks on the layer run only if the layer itself is called
            y = base(*args, **kwargs)
            out = y.tensor + self._conv(x.tensor, theta.to(K.dtype) * K, None)
        else:
            filt, bias = base.expand_parameters() if base.training else (base.filter, base.expanded_bias)
            # one convolution with the summed kernels (a second convolution would double the cost)
            out = self._conv(x.tensor, filt + theta.to(K.dtype) * K, bias)
        self.remember("_x", x.tensor.detach())
        self.remember("_samples", out.shape[0] * math.prod(out.shape[2:]))
        self.remember("_y_norm", out.detach().norm())
        return GeometricTensor(out, base.out_type, coords=None)

    # -- penalty -------------------------------------------------------------------------------
    def residual(self) -> Tensor:
        """K − P(K) in torch layout (differentiable in K)."""
        Kb = self._basis_layout(self.kernel())
        return self._torch_layout(Kb - self.projector.project(Kb))

    def grid_defect(self, K: Tensor | None = None) -> Tensor:
        """Σ_g ||ρ_out(g) K(g⁻¹·) ρ_in(g)⁻¹ − K||² over the grid-exact group elements, of the
        relaxation kernel (default) or of any kernel ``K`` in torch layout."""
        if self._actions is None:
            self._actions = grid_actions(self._grid_in, self._grid_out, self.kernel_size, self.d)
        Kb = self._basis_layout(self.kernel() if K is None else K)
        total = Kb.new_zeros(())
        for rout, rin_inv, perm in self._actions:
            rout, rin_inv = rout.to(Kb), rin_inv.to(Kb)
            moved = Kb[..., perm.to(Kb.device)]
            g = torch.einsum("ab,bcs,cd->ads", rout, moved, rin_inv)
            total = total + (g - Kb).square().sum()
        return total

    def kernel_defect(self) -> Tensor:
        """The kernel-space defect chosen by ``penalty`` (one value per layer)."""
        total = self.weight.new_zeros(())
        if self.penalty in ("residual", "both"):
            total = total + self.residual().square().sum()
        if self.penalty in ("defect", "both"):
            total = total + self.grid_defect()
        return total

    def _recorded(self) -> Tensor:
        return self.recorded_input(self.weight.dtype)

    def penalty_terms(self) -> PenaltyTerms:
        x = self._recorded()
        n = self._samples
        lie = n * self.kernel_defect()
        if self.activation_norm == "exact":
            norm = self._conv(x, self.kernel(), None).square().sum()
        else:
            # E||K ⋆ x||² per output position for i.i.d. inputs with second moment mean(x²); an empty
            # batch has no samples (and mean() of nothing would be NaN)
            second_moment = x.square().mean() if x.numel() else x.new_zeros(())
            norm = n * second_moment * self.kernel().square().sum()
        return PenaltyTerms(lie, norm, n)

    # -- projection ----------------------------------------------------------------------------
    def project_dense(self, K: Tensor) -> Tensor:
        """P(K): least squares of a kernel ``K`` (torch layout, the shape of ``weight``) onto escnn's
        basis of the layer, same layout (the projection :func:`relax_plugins.testing.check_adapter`
        certifies)."""
        return self._torch_layout(self.projector.project(self._basis_layout(K)))

    def generator_defect(self, K: Tensor) -> Tensor:
        """Σ_g ||ρ_out(g) K(g⁻¹·) ρ_in(g)⁻¹ − K||² of ``K`` over the group elements that map the
        sampling grid onto itself (see :func:`grid_actions`): zero for every kernel in the image of
        :meth:`project_dense` (complete for C2, C4, D1, D2, D4; a partial check for other groups)."""
        return self.grid_defect(K)

    def coefficients(self) -> Tensor:
        """Least-squares escnn ``weights`` of K, computed in float64 (shape (dim,))."""
        with torch.no_grad():
            return self.projector.coefficients(self._basis_layout(self.kernel().detach().double()))

    def merge_delta(self, base: _RdConv, theta: Tensor) -> dict[str, Tensor]:
        """θ·(escnn ``weights`` of K) (least squares, float64), and in eval mode the change of the
        cached ``filter`` (linear in the weights), so that a projected state_dict stays consistent."""
        with torch.no_grad():
            w = float(theta) * self.coefficients()
            if not bool(w.abs().max() > 0):
                return {}
            return {"weights": w, **eval_cache_delta(base, "filter", w, self._expand_torch)}

    def _expand_torch(self, w: Tensor) -> Tensor:
        """escnn's expansion of coefficients ``w`` as a filter in torch layout."""
        return self._torch_layout(self.projector.expand(w))

    def after_merge(self, base: _RdConv) -> None:
        refresh_eval_cache(base, "filter")

    def projection_error(self, theta: Tensor) -> dict[str, float]:
        with torch.no_grad():
            K = self.kernel().detach()
            R = self.residual().detach()
            th = float(theta)
            out = {
                "theta": th,
                "weight_norm": float(K.norm()),
                "rel_weight_error": float(R.norm() / K.norm().clamp_min(1e-30)),
                "kernel_defect": float(self.kernel_defect()),
            }
            if self._x is not None and self._y_norm is not None:
                y = self._y_norm.clamp_min(1e-30)
                x = self._recorded()
                out["relax_ratio"] = float(th * self._conv(x, K, None).norm() / y)
                out["rel_output_error"] = float(th * self._conv(x, R, None).norm() / y)
            return out

    def extra_repr(self) -> str:
        return f"kernel={tuple(self.weight.shape)}, penalty={self.penalty!r}, activation_norm={self.activation_norm!r}"

