"""The vector-neuron relaxation terms: the SO(3)/O(3) generators of a VN fibre and the dense/low-rank terms."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from relax_plugins import LinearRelaxation, PenaltyTerms, Symmetry
from relax_plugins._checks import check_int
from relax_plugins.irreps import Fibre, SchurProjection, so3_basis
from relax_plugins.symmetry import KronGenerators
from relax_plugins.term import has_call_hooks, low_rank_apply, may_modify_inputs

__all__ = ["DEFAULT_PENALTY_SAMPLES", "DEFAULT_PENALTY_ROWS", "VNLinearRelaxation", "vn_symmetry"]

_GROUPS = ("SO(3)", "O(3)")


#: fibres per layer and step that the penalties are estimated on (None: all); see VNLinearRelaxation
DEFAULT_PENALTY_SAMPLES = 256
#: the name of earlier releases (deprecated, like the option ``vn_penalty_rows``)
DEFAULT_PENALTY_ROWS = DEFAULT_PENALTY_SAMPLES


def _mirror(dtype: torch.dtype | None = None) -> Tensor:
    # inversion -I commutes with every linear map and would add nothing: use a mirror
    return torch.diag(torch.tensor([-1.0, 1.0, 1.0], dtype=dtype or torch.get_default_dtype()))[None]


def vn_symmetry(c_in: int, c_out: int, group: str = "SO(3)") -> Symmetry:
    """Generators on the xyz-major VN fibres (index ``j·C + c``): ``A ⊗ I_C``.

    Args:
        c_in: input channels of the Linear.
        c_out: output channels.
        group: "SO(3)" (three Lie generators) or "O(3)" (plus the mirror diag(-1, 1, 1)).

    Example:
        >>> sym = vn_symmetry(2, 3, "O(3)")
        >>> tuple(sym.lie_in.shape), tuple(sym.group_out.shape)
        ((3, 6, 6), (1, 9, 9))
    """
    if group not in _GROUPS:
        raise ValueError(f"vn_group must be one of {_GROUPS}, got {group!r}")
    # kept as 3x3 factors: the dense (3, 3C, 3C) matrices are only built if something asks for them
    # (this adapter's penalty and projection never do; at VN-DGCNN widths they would take ~100 MB a layer)
    L = so3_basis(torch.float64)
    ki, ko = KronGenerators(L, c_in), KronGenerators(L, c_out)
    gi = go = None
    if group == "O(3)":
        P = _mirror(torch.float64)[:1]
        gi, go = KronGenerators(P, c_in), KronGenerators(P, c_out)
    return Symmetry(3 * c_in, 3 * c_out, lie_in=ki, lie_out=ko, group_in=gi, group_out=go, name=group)


class VNLinearRelaxation(LinearRelaxation):
    """Dense W on the xyz-major VN fibre of a channel ``nn.Linear``: f(x) + θ·W·x.

    W is a dense ``(3·C_out) × (3·C_in)`` map, so it mixes xyz components across channels (a map
    acting on channels only would already be equivariant and leave nothing to relax).

    Speed: with a dense W and θ ≠ 0 the layer runs as one GEMM with ``I_3 ⊗ M + θ·W`` (the base Linear's
    FLOPs times 3) instead of the base GEMM plus a second one; with a low-rank W = B·A it runs as one
    autograd node computing (I_3 ⊗ M)x + θ·B(Ax) at the base FLOPs plus O(r) per fibre, saving only x
    for backward; at θ = 0 it calls the base Linear unchanged. The penalties are estimated on at most
    ``penalty_samples`` evenly strided fibres of the recorded input (the core's
    :meth:`~relax_plugins.RelaxationTerm.sample_rows`; sums rescaled to all fibres, so every penalty
    form keeps its meaning), either directly or through the Gram matrix G = Σ x xᵀ as Σ_k tr(L_k
    G L_kᵀ) with L_k = W A_k − A_k W, whichever takes fewer FLOPs: on all B·N fibres the Gram matrix
    alone would cost more than the layer whenever 3·C_in > C_out. A low-rank W's penalties go through
    its factors (cost O(r), B·A never formed); its forward does too on wide layers
    (:func:`~relax_plugins.lowrank.use_factors`), narrow ones use I ⊗ M + θ·B·A as one dense map.

    Args:
        c_in: input channels of the Linear.
        c_out: output channels.
        group: "SO(3)" or "O(3)".
        rank: low-rank W (see :class:`relax_plugins.LinearRelaxation`).
        init_std: std of a random initial dense W.
        penalty_samples: this term's default number of fibres the penalties are estimated on per step
            (None: all of them); ``relax(model, penalty_samples=m)`` overrides it.
        axes: xyz axis of the Linear's input per input rank, as observed by a probe
            (:func:`relax_vn.probe.probe_vn`); None: the ``x.transpose(1, -1)`` rule (axis 1 for
            rank 3, axis 2 otherwise).

    Example:
        >>> import torch
        >>> term = VNLinearRelaxation(2, 3)
        >>> out = term(torch.nn.Linear(2, 3, bias=False), torch.tensor(0.5), torch.randn(4, 7, 3, 2))
        >>> tuple(out.shape)
        (4, 7, 3, 3)
    """

    can_merge = True  # θ·P(W) = I_3 ⊗ M: M adds to the channel Linear's weight
    batched_penalty = False  # its own penalty_terms (sampled rows, Gram or direct)
    # all B·N fibres would make the Gram matrix alone cost more than the layer (see above)
    default_penalty_samples = DEFAULT_PENALTY_SAMPLES

    def __init__(
        self,
        c_in: int,
        c_out: int,
        group: str = "SO(3)",
        rank: int | None = None,
        init_std: float = 0.0,
        penalty_samples: int | None = DEFAULT_PENALTY_SAMPLES,
        axes: dict[int, int] | None = None,
    ) -> None:
        super().__init__(vn_symmetry(c_in, c_out, group), rank=rank, init_std=init_std)
        self.axes = None if axes is None else {int(k): int(v) for k, v in axes.items()}
        penalty_samples = check_int(penalty_samples, "penalty_samples", minimum=1, none_ok=True)
        # an instance default: what relax() keeps unless the user passes penalty_samples
        self.default_penalty_samples = self.penalty_samples = penalty_samples
        self.c_in, self.c_out, self.group = int(c_in), int(c_out), group
        # xyz-major fibres j·C + c: C copies of the vector irrep in the component-major layout
        self._fibre_in, self._fibre_out = Fibre([(self.c_in, 1, -1)], "ir_mul"), Fibre([(self.c_out, 1, -1)], "ir_mul")
        self._schur = SchurProjection(self._fibre_in, self._fibre_out)
        self.register_buffer("gens3", so3_basis(torch.get_default_dtype()), persistent=False)
        self.register_buffer(
            "mirror3", _mirror() if group == "O(3)" else torch.zeros(0, 3, 3), persistent=False
        )

    def __setstate__(self, state: dict[str, Any]) -> None:
        # pickled before VN layers used penalty_samples: their own penalty_rows was what counted
        if "penalty_rows" in state:
            state["default_penalty_samples"] = state["penalty_samples"] = state.pop("penalty_rows")
        super().__setstate__(state)

    # -- layout --------------------------------------------------------------------------------
    def xyz_axis(self, ndim: int) -> int:
        """Axis of xyz in the Linear's input: as observed by the probe for this rank, else the
        ``x.transpose(1, -1)`` rule for ``[B, C, 3, *S]`` (axis 1 for rank 3, axis 2 otherwise)."""
        if self.axes is not None:
            if ndim not in self.axes:
                raise ValueError(
                    f"relax_vn: this VN channel Linear was observed with inputs of rank {sorted(self.axes)} "
                    f"(xyz axes {self.axes}), now it gets rank {ndim}"
                )
            return self.axes[ndim]
        return 1 if ndim == 3 else 2

    def _check(self, x: Tensor, channels: int) -> int:
        a = self.xyz_axis(x.dim())
        if x.dim() < 2 or x.shape[a] != 3 or x.shape[-1] != channels:
            rule = "as observed by the probe" if self.axes is not None else (
                f"x.transpose(1, -1) of [B, C={channels}, 3, *S], i.e.")
            raise ValueError(
                f"relax_vn: a VN channel Linear expects, {rule} channels last and xyz on axis {a}; "
                f"got shape {tuple(x.shape)}"
            )
        return a

    def to_fibre(self, x: Tensor) -> Tensor:
        a = self._check(x, self.c_in)
        return x.movedim(a, -2).reshape(-1, 3 * self.c_in)

    def from_fibre(self, delta: Tensor, out: Tensor) -> Tensor:
        a = self.xyz_axis(out.dim())
        shape = out.movedim(a, -2).shape
        return delta.reshape(shape).movedim(-2, a)

    # -- forward ---------------------------------------------------------------------------------
    def _blocks_eye(self, M: Tensor) -> Tensor:
        return torch.kron(torch.eye(3, dtype=M.dtype, device=M.device), M)

    @staticmethod
    def _exactly_base(theta: Tensor) -> bool:
        """θ = 0: run the base layer alone (relax() and θ = 0 must not change outputs). Never while
        torch.compile traces: the data-dependent branch broke the graph, and aot_autograd then failed
        to replay the recorded input's view; compiled code is not bit-exact anyway, and θ·W·x = 0."""
        return not torch.compiler.is_compiling() and not bool(theta != 0)

    def forward(self, base: nn.Module, theta: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        x = self.take_input(args, kwargs)
        xf = self.to_fibre(x)
        self.remember("_x", xf.detach())
        # the base map computed here, in one product with W: only for torch's own Linear.forward
        # (a subclass may compute something else) and when no hook waits on the layer's call
        fusable = (not kwargs and len(args) == 1 and isinstance(base, nn.Linear) and base.bias is None
                   and type(base).forward is nn.Linear.forward and not has_call_hooks(base))
        factors = self.factors()
        if self._exactly_base(theta):
            # exactly the base layer: relax() and θ = 0 must not change outputs
            out = base(*args, **kwargs)
        elif fusable and (self.rank is None or factors is not None):
            if factors is None:
                full = self._blocks_eye(base.weight) + theta.to(base.weight.dtype) * self.weight
                yf = xf @ full.T
            else:
                # (I_3 ⊗ M) x + θ B (A x): on wide layers one autograd node on the fibres (the base map
                # at its own FLOPs, B·A never formed, only x saved); narrow ones as one dense map
                yf = low_rank_apply(xf, factors[0], factors[1], theta, M=base.weight, blocks=3)
            a = self.xyz_axis(x.dim())
            shape = list(x.movedim(a, -2).shape)
            shape[-1] = self.c_out
            out = yf.reshape(shape).movedim(-2, a)
        else:
            if may_modify_inputs(base):
                xf = xf.clone()  # read before the base layer runs (in-place updates must not reach W·x)
            out = base(*args, **kwargs)
            out = out + self.from_fibre(self.apply_weight(xf, theta), out)
        self.remember("_y", out.detach())
        return out

    # -- penalties -------------------------------------------------------------------------------
    def _left(self, A: Tensor, W: Tensor) -> Tensor:
        """(A ⊗ I_Cout) W for any (3·C_out, cols) W, using the block structure (no dense generator product)."""
        return self._fibre_out.apply(lambda l: A, W.T).T

    def _right(self, W: Tensor, A: Tensor) -> Tensor:
        """W (A ⊗ I_Cin) for any (rows, 3·C_in) W."""
        return self._fibre_in.apply(lambda l: A, W, transpose=True)

    def _left_rows(self, A: Tensor, y: Tensor) -> Tensor:
        """(A ⊗ I_Cout) applied to each row of y, (n, 3·C_out)."""
        return self._fibre_out.apply(lambda l: A, y)

    @staticmethod
    def _use_gram(n: int, d_in: int, d_out: int, k: int) -> bool:
        # same value two ways; pick the cheaper: a Gram matrix costs n·d_in² once plus
        # (k+1)·d_out·d_in², applying W to every generator image costs (k+1)·n·d_in·d_out
        return n * d_in + (k + 1) * d_out * d_in < (k + 1) * n * d_out

    @staticmethod
    def _use_gram_low_rank(n: int, d_in: int, d_out: int, k: int, r: int) -> bool:
        # W = B·A: the Gram route costs n·d_in² + O(k·r·d_in²) and saves only r- and d_in-sized
        # matrices for backward; the sample route costs 2r·(d_in + d_out) per fibre and generator but
        # saves (k, n, d_out) defects, so it is taken only for few fibres
        return n > d_in

    def _low_rank_penalty(self, x: Tensor, A: Tensor, B: Tensor, gens: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        """Σ_k Σ_n ||L_k x_n||² and Σ_n ||W x_n||² for W = B·A through the factors.

        L_k = W (A_k ⊗ I) − (A_k ⊗ I) W = U_k V_k with U_k = [B, −(A_k ⊗ I) B] and
        V_k = [A (A_k ⊗ I); A], both of inner dimension 2r: either Σ_n ||U_k (V_k x_n)||² or,
        through the Gram matrix G, ⟨U_kᵀ U_k, V_k G V_kᵀ⟩, whichever is cheaper.
        """
        n, d_in, d_out, r = x.shape[0], A.shape[1], B.shape[0], A.shape[0]
        A, B = A.to(x.dtype), B.to(x.dtype)
        V = torch.stack([torch.cat([self._right(A, g), A]) for g in gens])  # (k, 2r, d_in)
        U = torch.stack([torch.cat([B, -self._left(g, B)], dim=1) for g in gens])  # (k, d_out, 2r)
        if self._use_gram_low_rank(n, d_in, d_out, len(gens), r):
            G = x.T @ x
            lie = ((U.transpose(1, 2) @ U) * (V @ G @ V.transpose(1, 2))).sum()
            norm = ((B.T @ B) * (A @ G @ A.T)).sum()
        else:
            xv = (x @ V.reshape(-1, d_in).T).reshape(n, len(gens), 2 * r).transpose(0, 1)  # (k, n, 2r)
            lie = (xv @ U.transpose(1, 2)).square().sum()
            norm = ((x @ A.T) @ B.T).square().sum()
        return lie, norm

    def penalty_terms(self) -> PenaltyTerms:
        x_all = self._recorded()
        x = self.sample_rows(x_all)
        gens = (*self.gens3, *self.mirror3)
        factors = self.factors()
        # sampled rows stand for all of them; an empty batch has no samples: 0, not 0/0
        scale = x_all.shape[0] / x.shape[0] if x.shape[0] else 0.0
        if factors is not None:
            lie, norm = self._low_rank_penalty(x, factors[0], factors[1], gens)
            return PenaltyTerms(lie.clamp_min(0) * scale, norm.clamp_min(0) * scale, x_all.shape[0])
        W = self.dense()
        n, d_in, d_out = x.shape[0], W.shape[1], W.shape[0]
        if self._use_gram(n, d_in, d_out, len(gens)):
            G = x.T @ x
            lie = W.new_zeros(())
            for A in gens:
                L = self._right(W, A) - self._left(A, W)
                lie = lie + ((L @ G) * L).sum()
            norm = ((W @ G) * W).sum()
        else:
            wx = x @ W.T
            lie = W.new_zeros(())
            for A in gens:
                wax = self._right(x, A.T) @ W.T  # rows: (A ⊗ I) x = x (A ⊗ I)ᵀ
                lie = lie + (wax - self._left_rows(A, wx)).square().sum()
            norm = wx.square().sum()
        # tr(L G Lᵀ) ≥ 0 exactly; rounding can make a ~0 value slightly negative, and the core takes √
        return PenaltyTerms(lie.clamp_min(0) * scale, norm.clamp_min(0) * scale, x_all.shape[0])

    # -- projection ------------------------------------------------------------------------------
    def block_trace(self, W: Tensor) -> Tensor:
        """M = (1/3) Σ_j W_jj: the coefficient of the projection I_3 ⊗ M."""
        return self._schur.coefficients(W)[0]

    def project_dense(self, W: Tensor) -> Tensor:
        """Orthogonal projection onto {I_3 ⊗ M}: exact closed form (same for SO(3) and O(3)).

        Example:
            >>> import torch
            >>> term = VNLinearRelaxation(2, 2)
            >>> P = term.project_dense(torch.randn(6, 6, dtype=torch.float64))
            >>> bool(torch.allclose(term.project_dense(P), P))
            True
        """
        return self._schur(W)

    def dense_delta(self, base: nn.Module, delta: Tensor) -> dict[str, Tensor]:
        if not isinstance(base, nn.Linear) or tuple(base.weight.shape) != (self.c_out, self.c_in):
            raise TypeError(f"relax_vn: expected the channel nn.Linear({self.c_in}, {self.c_out}) this term was "
                            f"built for, got {type(base).__name__}")
        return {"weight": self.block_trace(delta)}

    def extra_repr(self) -> str:
        return f"VN {self.group}: {self.c_in} -> {self.c_out} channels" + (
            "" if self.rank is None else f", rank={self.rank}"
        )
