"""Pointwise layers: :class:`LinearRelaxation`, a dense (or low-rank) matrix W on the feature fibre.

A pointwise layer's relaxation is a matrix on the fibre of each sample / point / node; adapters
subclass :class:`LinearRelaxation` and override only the layout methods (``take_input``,
``to_fibre``, ``from_fibre``), the projection (``project_dense``) and the merge (``dense_delta``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .contract import RelaxationTerm
from .inplace import may_modify_inputs
from .lowrank import low_rank_apply
from .moments import PenaltyTerms, moment_penalties
from .symmetry import GenericProjector, Symmetry, group_defect, lie_defect

__all__ = ["LinearRelaxation"]


class LinearRelaxation(RelaxationTerm):
    """A dense (or low-rank) matrix W on the fibre: f_θ(x) = f(x) + θ·W·x.

    Args:
        symmetry: generators on the input and output fibres of the layer.
        rank: if given, W = B·A with A (rank, d_in) random and B (d_out, rank) zero (LoRA-style),
            so relax() still does not change outputs but W can learn.
        init_std: standard deviation of the entries of a random initial W (dense, or B·A with a
            random B when ``rank`` is given); 0 keeps outputs.
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

    batched_penalty: bool = True
    subsampled_penalty: bool = True

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
            # B = 0 keeps the outputs (LoRA); with init_std, W = B·A gets entries of that std:
            # Var(W_ij) = rank · Var(B) / d_in
            std_b = init_std * math.sqrt(d_in / rank)
            self.lora_b = nn.Parameter(torch.randn(d_out, rank) * std_b if init_std > 0 else torch.zeros(d_out, rank))
        self._x: Tensor | None = None
        self._y: Tensor | None = None
        #: m: estimate the Lie/discrete defect from m generators drawn per step (see moment_penalties)
        self.penalty_generators: int | None = None
        self._generator_rng: torch.Generator | None = None
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

    def apply_weight(self, v: Tensor, theta: Tensor | None = None, add_to: Tensor | None = None) -> Tensor:
        """W (or θ·W) applied to the last axis of ``v`` (``add_to`` + that, in one product).

        θ scales the (d_out, d_in) matrix, not the (n, d_out) product: one small multiplication
        instead of a pass over the activations, forward and backward; ``add_to`` (the layer's own
        output, (..., d_out) as ``v``'s result) saves another.
        """
        if self.subgroup is not None or self.rank is None:
            W = self.dense() if self.subgroup is not None else self.weight
            tw = W if theta is None else theta.to(W.dtype) * W
            if add_to is None:
                return v @ tw.T
            flat = torch.addmm(add_to.reshape(-1, tw.shape[0]), v.reshape(-1, tw.shape[1]), tw.T)
            return flat.reshape(add_to.shape)
        return low_rank_apply(v, self.lora_a, self.lora_b, theta, add_to=add_to)

    def forward(self, base: nn.Module, theta: Tensor, *args: Any, **kwargs: Any) -> Any:
        # x is read before the base layer runs: an in-place update of the argument (x.add_(...))
        # must not leak into W·x, so a view of it is cloned unless the layer is known to be pure
        x = self.to_fibre(self.take_input(args, kwargs))
        if may_modify_inputs(base, self.pure_bases):
            x = x.clone()
        out = base(*args, **kwargs)
        y = self.output_tensor(out)
        result = y + self.from_fibre(self.apply_weight(x, theta), y)  # from_fibre is a layout map: linear
        self.record(x, result)
        return self.replace_output(out, result)

    def record(self, x: Tensor, y: Tensor) -> None:
        """Keep what penalties and reports need from a forward pass: the fibre input ``x`` (n, d_in)
        and the relaxed output ``y``, both detached. Call it from an overridden ``forward``."""
        self.remember("_x", x.detach())
        self.remember("_y", y.detach())

    def _recorded(self) -> Tensor:
        return self.recorded_input(self._weight_dtype())

    def _weight_dtype(self) -> torch.dtype:
        return (self.weight if self.rank is None else self.lora_a).dtype

    def penalty_input(self) -> tuple[Tensor, int]:
        """The recorded fibre inputs the penalty is computed on, and how many samples they stand for.

        With ``penalty_samples = m`` (``relax(model, penalty_samples=m)``) and n > m recorded rows,
        the k ≤ m rows :meth:`sample_rows` picks, scaled by √(n/k): the penalty's sums over samples
        are quadratic in x, so they then estimate the sums over all n rows at a fraction of the cost.
        """
        x = self._recorded()
        rows = self.sample_rows(x)
        n, k = x.shape[0], rows.shape[0]
        return (x, n) if k == n else (rows * math.sqrt(n / k), n)

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
        with other layers' (same shapes), or None. Only for terms that declare ``batched_penalty``
        and whose recorded samples outnumber the fibre dimensions."""
        if not self.batched_penalty or self._x is None:
            return None
        if self.sample_rows(self._x).shape[0] <= self.symmetry.dim_in:
            return None
        sym = self.symmetry
        key = (sym.dim_in, sym.dim_out, sym.num_lie + sym.num_group, self._weight_dtype(), self._x.device)
        # low-rank layers are computed through their factors, so they group by rank
        key = key if self.factors() is None else (*key, self.rank)
        return key if self.penalty_generators is None else (*key, "generators", self.penalty_generators)

    def sample_generators(self, count: int) -> Tensor | None:
        """Indices of the ``penalty_generators = m`` generators (of ``count``) used this step, drawn
        uniformly without replacement from the term's own random stream (seeded 0; the global one
        is left alone), or None to use all of them."""
        m = self.penalty_generators
        if m is None:
            return None
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:  # set by hand on the term: checked where read
            raise ValueError(f"penalty_generators must be an int >= 1 or None, got {m!r}")
        if m >= count:
            return None
        if self._generator_rng is None:
            self._generator_rng = torch.Generator().manual_seed(0)
        return torch.randperm(count, generator=self._generator_rng)[:m]

    def random_state(self) -> Tensor | None:
        """State of the term's own random stream (``penalty_generators`` draws), or None before its
        first draw: saved by :meth:`relax_plugins.RelaxedTraining.state_dict` for bit-identical resumes."""
        return None if self._generator_rng is None else self._generator_rng.get_state()

    def set_random_state(self, state: Tensor) -> None:
        """Restore :meth:`random_state`."""
        if self._generator_rng is None:
            self._generator_rng = torch.Generator()
        self._generator_rng.set_state(state)

    def factors(self) -> tuple[Tensor, Tensor] | None:
        """(A, B) with W = B·A for a low-rank W without subgroup parametrisation, else None."""
        if self.rank is None or self.subgroup is not None:
            return None
        return self.lora_a, self.lora_b

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

    def dense_delta(self, base: nn.Module, delta: Tensor) -> dict[str, Tensor] | None:
        """The change to ``base``'s parameters that adds the dense intertwiner ``delta`` (d_out, d_in,
        float64) to the layer's map: ``{name: tensor to add}``; adapters whose terms declare
        ``can_merge = True`` override it (see :meth:`RelaxationTerm.merge_delta`)."""
        return None

    def merge_delta(self, base: nn.Module, theta: Tensor) -> dict[str, Tensor] | None:
        """θ·P(W) in float64, turned into parameter deltas by :meth:`dense_delta` (an empty dict
        when θ·P(W) = 0: nothing to add)."""
        if not self.can_merge:
            return None
        with torch.no_grad():
            delta = theta.to(torch.float64) * self.projected().double()
            if not bool(delta.abs().max() > 0):
                return {}
            return self.dense_delta(base, delta)

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
            if self._x is not None and self._y is not None:
                x = self._recorded()
                y_norm = self._y.norm().clamp_min(1e-30)
                out["relax_ratio"] = float(th * (x @ W.T).norm() / y_norm)
                # what project(merge=True) changes: θ(W − P(W))x, or all of θWx where nothing merges
                kept = (W - P) if self.can_merge else W
                out["rel_output_error"] = float(th * (x @ kept.T).norm() / y_norm)
                # the exact defect over all generators: a report neither estimates nor draws from the
                # stream that penalty_generators samples with
                sampled, self.penalty_generators = self.penalty_generators, None
                try:
                    t = self.penalty_terms()
                finally:
                    self.penalty_generators = sampled
                out["lie_defect"] = float(t.lie / max(t.samples, 1))
            return out

    def extra_repr(self) -> str:
        s = self.symmetry
        return f"{s.dim_in} -> {s.dim_out}" + ("" if self.rank is None else f", rank={self.rank}")
