"""Relaxation terms: the unconstrained part θ·W·x that an adapter attaches to one layer.

:class:`RelaxationTerm` is the interface every adapter implements (the hook
``relax_make_term`` returns one). :class:`LinearRelaxation` implements it for every *pointwise*
layer, i.e. a layer whose relaxation is a dense matrix on the feature fibre of each sample /
point / node; adapters subclass it and override only the layout methods (``take_input``,
``to_fibre``, ``from_fibre``), the projection (``project_dense``) and the merge (``merge``).
Convolutional adapters implement :class:`RelaxationTerm` directly.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .symmetry import GenericProjector, Symmetry, group_defect, lie_defect

__all__ = ["RelaxationTerm", "LinearRelaxation", "PenaltyTerms", "moment_penalties", "may_modify_inputs"]

#: top-level packages whose layers never update their inputs in place (checked by exact class module)
PURE_LIBRARIES = frozenset({"torch", "e3nn", "escnn"})


def may_modify_inputs(base: nn.Module, pure: tuple[type, ...] = ()) -> bool:
    """Whether ``base`` might update its input tensors in place (``x.add_(...)``, ``coord += ...``).

    A relaxation reads its input x *before* the base layer runs, so that W acts on x and not on what
    an in-place update left in it (the official EGNN's ``E_GCL_vel`` does ``coord += ...``). When the
    term's view of x shares memory with the argument, it must then be cloned, which this decides:
    False for the exact classes in ``pure`` and for layers defined in :data:`PURE_LIBRARIES` (torch,
    e3nn, escnn), True for everything else (user code, including subclasses of library layers, whose
    ``forward`` may do anything).

    Example:
        >>> import torch
        >>> may_modify_inputs(torch.nn.Linear(2, 2))
        False
        >>> class Mine(torch.nn.Linear):
        ...     pass
        >>> may_modify_inputs(Mine(2, 2)), may_modify_inputs(Mine(2, 2), pure=(Mine,))
        (True, False)
    """
    cls = type(base)
    if cls in pure:
        return False
    return cls.__module__.split(".", 1)[0] not in PURE_LIBRARIES


class PenaltyTerms(tuple):
    """(lie, norm, samples): per-layer *sums over samples* of the squared Lie/discrete defect and of
    ||W x||², and the number of samples they were summed over."""

    __slots__ = ()

    def __new__(cls, lie: Tensor, norm: Tensor, samples: int):
        return super().__new__(cls, (lie, norm, samples))

    @property
    def lie(self) -> Tensor:
        return self[0]

    @property
    def norm(self) -> Tensor:
        return self[1]

    @property
    def samples(self) -> int:
        return self[2]


class RelaxationTerm(nn.Module):
    """Interface of the non-equivariant part of one relaxed layer.

    Subclasses hold the learnable relaxation parameters and implement:

    * ``forward(base, theta, *args, **kwargs)``: the relaxed layer's output
      f(x) + θ·W(x); must record whatever the penalties need (detached inputs) on ``self``.
    * ``penalty_terms()``: :class:`PenaltyTerms` for the last forward pass.
    * ``project_()``/``merge(base, theta)``: fold θ·P(W) into the base layer where it can hold
      it, returning True, or return False if the base layer cannot represent it.
    * ``projection_error(theta)``: a dict describing how much the projection changes the layer.

    What ``forward`` records for the penalties lives in the attributes named by ``_recorded_attrs``
    (extend it in subclasses): scratch, not state, so ``torch.save(model)`` and ``copy.deepcopy`` never
    carry a batch of activations along.
    """

    _recorded_attrs: tuple[str, ...] = ("_x", "_y", "_y_norm")

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        for key in self._recorded_attrs:
            if key in state:
                state[key] = None
        return state

    def recorded_state(self) -> dict[str, Any]:
        """What the last forward pass recorded (the ``_recorded_attrs``), e.g. to restore it later."""
        return {k: self.__dict__[k] for k in self._recorded_attrs if k in self.__dict__}

    def forward(self, base: nn.Module, theta: Tensor, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover
        raise NotImplementedError

    def penalty_terms(self) -> PenaltyTerms:  # pragma: no cover
        raise NotImplementedError

    def merge(self, base: nn.Module, theta: Tensor) -> bool:
        """Add θ·P(W) into ``base``'s own parameters; return False if it cannot hold it."""
        return False

    def projection_error(self, theta: Tensor) -> dict[str, float]:
        return {}


class LinearRelaxation(RelaxationTerm):
    """A dense (or low-rank) matrix W on the fibre: f_θ(x) = f(x) + θ·W·x.

    Args:
        symmetry: generators on the input and output fibres of the layer.
        rank: if given, W = B·A with A (rank, d_in) random and B (d_out, rank) zero (LoRA-style),
            so relax() still does not change outputs but W can learn.
        init_std: standard deviation of a random initial W (full rank only); 0 keeps outputs.
        subgroup: relax only to a subgroup H of the layer's group: the H-generators as a
            :class:`Symmetry` (projected generically) or any module mapping a dense W to P_H(W).
            W = P_H(V) stays exactly H-equivariant while the penalties and the final projection
            still refer to the whole group.

    Example:
        >>> import torch
        >>> J = torch.tensor([[0., -1.], [1., 0.]])
        >>> term = LinearRelaxation(Symmetry(2, 2, lie_in=J[None], lie_out=J[None]))
        >>> term.dense().abs().sum().item()
        0.0
    """

    def __init__(
        self,
        symmetry: Symmetry,
        rank: int | None = None,
        init_std: float = 0.0,
        subgroup: Symmetry | nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.symmetry = symmetry
        self._projector: GenericProjector | None = None
        # relaxing to a subgroup H < G: W is kept H-equivariant by parametrising it as P_H(V)
        if isinstance(subgroup, Symmetry):
            subgroup = GenericProjector(subgroup)
        self.subgroup = subgroup
        d_in, d_out = symmetry.dim_in, symmetry.dim_out
        self.rank = rank
        if rank is None:
            # zeros without drawing: relax() must not shift the user's global random stream
            init = torch.randn(d_out, d_in) * init_std if init_std > 0 else torch.zeros(d_out, d_in)
            self.weight = nn.Parameter(init)
        else:
            if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
                raise ValueError(f"rank must be an int >= 1 or None, got {rank!r}")
            self.lora_a = nn.Parameter(torch.randn(rank, d_in) / math.sqrt(d_in))
            self.lora_b = nn.Parameter(torch.zeros(d_out, rank))
        self._x: Tensor | None = None
        self._y: Tensor | None = None
        self.penalty_samples: int | None = None  # set by relax(..., penalty_samples=m)
        #: exact base classes known not to update their inputs in place (see :func:`may_modify_inputs`)
        self.pure_bases: tuple[type, ...] = ()

    # -- layout: override in adapters ---------------------------------------------------------
    def take_input(self, args: tuple, kwargs: dict) -> Tensor:
        """The tensor W acts on, in the layer's layout (default: first positional argument)."""
        return args[0]

    def to_fibre(self, x: Tensor) -> Tensor:
        """Layer layout → (n, d_in) (default: fibre on the last axis)."""
        return x.reshape(-1, self.symmetry.dim_in)

    def from_fibre(self, delta: Tensor, out: Tensor) -> Tensor:
        """(n, d_out) → the layout of the layer output ``out``."""
        return delta.reshape(out.shape)

    def output_tensor(self, out: Any) -> Tensor:
        """The tensor of the layer's output that W adds to (default: the output itself)."""
        return out

    def replace_output(self, out: Any, new: Tensor) -> Any:
        return new

    # -- maths ---------------------------------------------------------------------------------
    def dense(self) -> Tensor:
        """W as a dense (d_out, d_in) matrix."""
        W = self.weight if self.rank is None else self.lora_b @ self.lora_a
        return W if self.subgroup is None else self.subgroup(W)

    def apply_weight(self, v: Tensor) -> Tensor:
        """W applied to the last axis of ``v``."""
        if self.subgroup is not None:
            return v @ self.dense().T
        if self.rank is None:
            return v @ self.weight.T
        return (v @ self.lora_a.T) @ self.lora_b.T

    def forward(self, base: nn.Module, theta: Tensor, *args: Any, **kwargs: Any) -> Any:
        # x is read before the base layer runs: an in-place update of the argument (x.add_(...))
        # must not leak into W·x, so a view of it is cloned unless the layer is known to be pure
        x = self.to_fibre(self.take_input(args, kwargs))
        if may_modify_inputs(base, self.pure_bases):
            x = x.clone()
        out = base(*args, **kwargs)
        wx = self.apply_weight(x)
        y = self.output_tensor(out)
        result = y + theta.to(wx.dtype) * self.from_fibre(wx, y)
        self.record(x, result)
        return self.replace_output(out, result)

    def record(self, x: Tensor, y: Tensor) -> None:
        """Keep what penalties and reports need from a forward pass: the fibre input ``x`` (n, d_in)
        and the relaxed output ``y``, both detached. Call it from an overridden ``forward``."""
        self._x = x.detach()
        self._y = y.detach()

    def _recorded(self) -> Tensor:
        if self._x is None:
            raise RuntimeError("no forward pass recorded yet: run the model on a batch before penalty()")
        return self._x

    def penalty_input(self) -> tuple[Tensor, int]:
        """The recorded fibre inputs the penalty is computed on, and how many samples they stand for.

        With ``penalty_samples = m`` (``relax(model, penalty_samples=m)``) and n > m recorded rows,
        an evenly strided subset of m rows scaled by √(n/m): the penalty's sums over samples are
        quadratic in x, so they then estimate the sums over all n rows at a fraction of the cost.
        """
        x = self._recorded()
        n, m = x.shape[0], self.penalty_samples
        if m is None or n <= m:
            return x, n
        idx = torch.linspace(0, n - 1, m, device=x.device).round().long()
        return x[idx] * math.sqrt(n / m), n

    def penalty_terms(self) -> PenaltyTerms:
        x, n = self.penalty_input()
        if x.shape[0] > self.symmetry.dim_in:
            return self._penalty_from_moments(x, n)
        return self._penalty_from_samples(x, n)

    def _penalty_from_samples(self, x: Tensor, n: int | None = None) -> PenaltyTerms:
        # on the detached input: reusing the forward's W·x would push the penalty's gradient into
        # the layers upstream
        wx = self.apply_weight(x)
        sym = self.symmetry
        lie = lie_defect(self.apply_weight, x, sym, wx).sum() + group_defect(self.apply_weight, x, sym, wx).sum()
        return PenaltyTerms(lie, wx.square().sum(), x.shape[0] if n is None else n)

    def _penalty_from_moments(self, x: Tensor, n: int | None = None) -> PenaltyTerms:
        """Same sums through the second moment S = Σ x xᵀ: Σ_n ||C x_n||² = tr(C S Cᵀ).

        Costs O(d³) per generator instead of O(n·d²): far cheaper when there are more samples
        (points, nodes, edges) than fibre dimensions, which is the usual case.
        """
        return moment_penalties([self], [(x, x.shape[0] if n is None else n)])[0]

    def batchable_penalty(self) -> tuple | None:
        """A key under which :func:`moment_penalties` may compute this layer's penalty together
        with other layers' (same shapes), or None. Only for terms that keep the default
        ``penalty_terms`` and whose recorded samples outnumber the fibre dimensions."""
        if type(self).penalty_terms is not LinearRelaxation.penalty_terms or self._x is None:
            return None
        n = self._x.shape[0] if self.penalty_samples is None else min(self._x.shape[0], self.penalty_samples)
        if n <= self.symmetry.dim_in:
            return None
        sym = self.symmetry
        return (sym.dim_in, sym.dim_out, sym.num_lie + sym.num_group, self._x.dtype, self._x.device)

    # -- projection ------------------------------------------------------------------------
    def project_dense(self, W: Tensor) -> Tensor:
        """Orthogonal projection of a dense W onto the intertwiners of the layer's group.

        Adapters override this with closed forms; the default is :class:`GenericProjector`
        (Reynolds average over a finite group, or the generators' null space for small layers).
        """
        if self._projector is None:
            # a cache, not a submodule: building it (e.g. in a report) must not change the module tree
            object.__setattr__(self, "_projector", GenericProjector(self.symmetry))
        return self._projector(W)

    def projected(self) -> Tensor:
        """P(W), dense."""
        with torch.no_grad():
            return self.project_dense(self.dense().detach())

    def merge_dense(self, base: nn.Module, delta: Tensor) -> bool:
        """Add the dense intertwiner ``delta`` (d_out, d_in) into ``base``; adapters override."""
        return False

    def can_merge(self) -> bool:
        """Whether ``merge`` can fold θ·P(W) into the base layer (default: merge_dense is overridden)."""
        return type(self).merge_dense is not LinearRelaxation.merge_dense

    def merge(self, base: nn.Module, theta: Tensor) -> bool:
        with torch.no_grad():
            delta = theta.to(torch.float64) * self.projected().double()
            if not bool(delta.abs().max() > 0):
                return True
            return self.merge_dense(base, delta)

    def projection_error(self, theta: Tensor) -> dict[str, float]:
        with torch.no_grad():
            W = self.dense().detach()
            P = self.project_dense(W)
            th = float(theta)
            out = {
                "theta": th,
                "weight_norm": float(W.norm()),
                "rel_weight_error": float((W - P).norm() / W.norm().clamp_min(1e-30)),
            }
            out["merges"] = float(self.can_merge())
            if self._x is not None and self._y is not None:
                x = self._x
                y_norm = self._y.norm().clamp_min(1e-30)
                out["relax_ratio"] = float(th * (x @ W.T).norm() / y_norm)
                # what project(merge=True) changes: θ(W − P(W))x, or all of θWx where nothing merges
                kept = (W - P) if self.can_merge() else W
                out["rel_output_error"] = float(th * (x @ kept.T).norm() / y_norm)
                t = self.penalty_terms()
                out["lie_defect"] = float(t.lie / max(t.samples, 1))
            return out

    def extra_repr(self) -> str:
        s = self.symmetry
        return f"{s.dim_in} -> {s.dim_out}" + ("" if self.rank is None else f", rank={self.rank}")


def moment_penalties(terms: list[LinearRelaxation], inputs: list[tuple[Tensor, int]]) -> list[PenaltyTerms]:
    """Penalties of several layers with equal shapes in one batched computation.

    With S_l = Σ x xᵀ over layer l's samples and C_lk = W_l ρ_in(A_k) − ρ_out(A_k) W_l:
    Σ_n ||C_lk x_n||² = ⟨C_lk S_l, C_lk⟩ and Σ_n ||W_l x_n||² = ⟨W_l S_l, W_l⟩. Batching the layers
    turns some ten autograd operations per layer into ten for the whole group, which is what the
    penalty costs on models with many small layers.
    """
    W = torch.stack([t.dense() for t in terms])  # (L, d_out, d_in)
    L, d_out, d_in = W.shape
    gens = [t.symmetry.stacked(W.dtype) for t in terms]
    k = gens[0][0].shape[0]
    # generators laid out for plain (un-broadcast) bmm: broadcasting small batched matmuls was 5x slower
    G_in = torch.stack([g[0] for g in gens]).permute(0, 2, 1, 3).reshape(L, d_in, k * d_in)
    G_out = torch.stack([g[1] for g in gens]).reshape(L, k * d_out, d_out)
    with torch.no_grad():
        S = torch.stack([x.T @ x for x, _ in inputs])  # (L, d_in, d_in): detached, trains W only
    WG = (W @ G_in).reshape(L, d_out, k, d_in).transpose(1, 2).reshape(L, k * d_out, d_in)
    C = WG - G_out @ W  # (L, k·d_out, d_in): the blocks W ρ_in(A_k) − ρ_out(A_k) W
    lie = ((C @ S) * C).sum(dim=(1, 2)).clamp_min(0.0)
    norm = ((W @ S) * W).sum(dim=(1, 2)).clamp_min(0.0)
    return [PenaltyTerms(lie[i], norm[i], n) for i, (_, n) in enumerate(inputs)]
