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
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from .symmetry import GenericProjector, Symmetry, group_defect, lie_defect

__all__ = [
    "RelaxationTerm",
    "LinearRelaxation",
    "CAPABILITIES",
    "PenaltyTerms",
    "moment_penalties",
    "may_modify_inputs",
    "low_rank_apply",
    "low_rank_moments",
]

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


class _LowRankApply(torch.autograd.Function):
    """θ·(x Aᵀ) Bᵀ [+ x (I_blocks ⊗ M)ᵀ], saving only x and the factors for backward.

    x Aᵀ (n × r) is not kept: backward takes the parameter gradients from G = gᵀ x, so a low-rank W
    saves no more activations than a dense one (which keeps x and W).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, A: Tensor, B: Tensor, theta: Tensor | None, M: Tensor | None,
                blocks: int) -> Tensor:
        xa = x @ A.T
        out = xa @ B.T
        dt = out.dtype  # under autocast, the dtype the products ran in
        if theta is not None:
            out = theta.to(dt) * out
        if M is not None:
            n = x.shape[0]
            base = (x.reshape(n * blocks, -1) @ M.T).reshape(n, -1)
            out = base.to(dt) + out
        ctx.save_for_backward(x, A, B, theta, M)
        ctx.blocks, ctx.dt = blocks, dt
        return out

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        # one GEMM for the parameter gradients, G = gᵀ x (d_out × d_in, the dense backward's cost),
        # then the factors' gradients from G: fewer passes over the n-sized tensors than the skinny
        # r-wide GEMMs (which are memory-bound), and x Aᵀ is never needed
        x, A, B, theta, M = ctx.saved_tensors
        need_x, need_a, need_b, need_t, need_m, _ = ctx.needs_input_grad
        dt, blocks = ctx.dt, ctx.blocks
        g, x, A, B = g.to(dt), x.to(dt), A.to(dt), B.to(dt)
        th = None if theta is None else theta.to(dt)
        gx = ga = gb = gt = gm = None
        if need_a or need_b or need_t or need_m:
            G = g.T @ x
            if need_a or need_b:
                GT = G if th is None else th * G
                ga = B.T @ GT if need_a else None
                gb = GT @ A.T if need_b else None
            if need_t:
                gt = ((G @ A.T) * B).sum()  # ⟨G, B A⟩ without forming B A
            if need_m:
                c_out, c_in = M.shape
                gm = G.reshape(blocks, c_out, blocks, c_in).diagonal(dim1=0, dim2=2).sum(-1)
        if need_x:
            gx = (g @ B) @ A if th is None else th * ((g @ B) @ A)
            if M is not None:
                n = x.shape[0]
                gx = gx + (g.reshape(n * blocks, -1) @ M.to(dt)).reshape(x.shape)
        return gx, ga, gb, gt, gm, None


def low_rank_apply(
    x: Tensor, A: Tensor, B: Tensor, theta: Tensor | None = None, M: Tensor | None = None, blocks: int = 1
) -> Tensor:
    """θ·(B·A) applied to the last axis of ``x`` through the factors, plus an optional block-diagonal
    base map: ``x (I_blocks ⊗ M)ᵀ + θ (x Aᵀ) Bᵀ``.

    Never forms B·A, and saves only ``x`` and the factors for backward (``x Aᵀ`` is recomputed), so
    a rank-r W costs O(n·r·(d_in + d_out)) time and no activation memory beyond its input.

    Args:
        x: (..., d_in) inputs.
        A: (r, d_in) right factor.
        B: (d_out, r) left factor.
        theta: optional scalar factor θ (gets a gradient if it requires one).
        M: optional (c_out, c_in) base map applied to each of ``blocks`` consecutive chunks of x's
            last axis (d_in = blocks·c_in, d_out = blocks·c_out).
        blocks: number of chunks M acts on.

    Returns:
        (..., d_out) tensor.

    Example:
        >>> import torch
        >>> x, A, B = torch.randn(5, 3), torch.randn(2, 3), torch.randn(4, 2)
        >>> bool(torch.allclose(low_rank_apply(x, A, B), x @ (B @ A).T, atol=1e-6))
        True
    """
    lead = x.shape[:-1]
    out = _LowRankApply.apply(x.reshape(-1, x.shape[-1]), A, B, theta, M, blocks)
    return out.reshape(*lead, out.shape[-1])


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


#: the capabilities a term declares as boolean class attributes (see :class:`RelaxationTerm`)
CAPABILITIES = ("can_merge", "batched_penalty", "supports_subgroup")


class RelaxationTerm(nn.Module):
    """Interface of the non-equivariant part of one relaxed layer.

    Subclasses hold the learnable relaxation parameters and implement:

    * ``forward(base, theta, *args, **kwargs)``: the relaxed layer's output
      f(x) + θ·W(x); must record whatever the penalties need (detached inputs) on ``self``.
    * ``penalty_terms()``: :class:`PenaltyTerms` for the last forward pass.
    * ``merge_delta(base, theta)`` (with ``can_merge = True``): the change θ·P(W) makes to the base
      layer's own parameters/buffers, as ``{name in base.state_dict(): tensor to add}``; the core
      adds it (``project(merge=True)``) or adds it to a copy of the state
      (``projected_state_dict(merge=True)``), never the term.
    * ``projection_error(theta)``: a dict describing how much the projection changes the layer.

    Capabilities are declared as class attributes (an instance may override one in ``__init__``
    when it depends on the wrapped layer, e.g. an ``o3.Linear`` with external weights cannot merge),
    and read by the core, :func:`relax_plugins.projection_report` (its ``mergeable`` column) and
    :func:`relax_plugins.testing.check_adapter`:

    * :attr:`can_merge`: ``merge_delta`` returns a delta (a dict) for this layer; when False the
      core never calls it and ``project(merge=True)`` drops W with a warning.
    * :attr:`batched_penalty`: the penalty may be computed by the core's batched moment path
      together with other layers of equal shapes (:class:`LinearRelaxation` terms that keep the
      default ``penalty_terms``). A subclass that overrides ``penalty_terms`` without declaring
      ``batched_penalty`` in its own class body gets False.
    * :attr:`supports_subgroup`: the term can relax only to a subgroup H of the layer's group.

    What ``forward`` records for the penalties lives in the attributes named by ``_recorded_attrs``
    (extend it in subclasses): scratch, not state, so ``torch.save(model)`` and ``copy.deepcopy`` never
    carry a batch of activations along.
    """

    #: ``merge_delta`` can fold θ·P(W) into the base layer (False: project(merge=True) drops W)
    can_merge: bool = False
    #: the penalty can be batched with other layers' by :func:`moment_penalties`
    batched_penalty: bool = False
    #: the term can be relaxed to a subgroup of the layer's group only
    supports_subgroup: bool = False

    _recorded_attrs: tuple[str, ...] = ("_x", "_y", "_y_norm")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # a custom penalty cannot go through the batched default path unless the class says so
        if "penalty_terms" in cls.__dict__ and "batched_penalty" not in cls.__dict__:
            cls.batched_penalty = False
        stale = [m for m in ("merge", "merge_dense") if m in cls.__dict__]
        if stale:
            warnings.warn(
                f"{cls.__qualname__} defines {stale}: merging is now by delta and these are never called; "
                "implement merge_delta(base, theta) (or LinearRelaxation.dense_delta(base, delta)) returning "
                "{parameter name: tensor to add}, and declare can_merge = True",
                DeprecationWarning,
                stacklevel=2,
            )

    @property
    def capabilities(self) -> frozenset[str]:
        """The declared capabilities (:data:`CAPABILITIES`) that hold for this term."""
        return frozenset(c for c in CAPABILITIES if getattr(self, c))

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

    def merge_delta(self, base: nn.Module, theta: Tensor) -> dict[str, Tensor] | None:
        """What merging θ·P(W) adds to ``base``: ``{name: delta}`` with ``name`` a key of
        ``base.state_dict()`` and ``delta`` a tensor of that entry's shape (any float dtype: the core
        casts it to the entry's dtype and device, then adds). Only read ``base`` here, never change
        it. An empty dict merges nothing (θ·P(W) = 0); None means the layer cannot hold it, which
        only a term with ``can_merge = False`` may answer (the default)."""
        return None

    def after_merge(self, base: nn.Module) -> None:
        """Called by ``project(merge=True)`` after the core added this term's delta to ``base``:
        rebuild caches derived from the merged parameters (escnn's eval-mode filter). Assign new
        tensors to cached buffers rather than writing into them (the core puts the old ones back on
        a later failure, as it restores the delta's targets bit for bit), and include the cache's
        change in ``merge_delta`` too, so that ``projected_state_dict`` agrees. Default: nothing."""

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

    batched_penalty: bool = True
    supports_subgroup: bool = True

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

    def apply_weight(self, v: Tensor) -> Tensor:
        """W applied to the last axis of ``v``."""
        if self.subgroup is not None:
            return v @ self.dense().T
        if self.rank is None:
            return v @ self.weight.T
        return low_rank_apply(v, self.lora_a, self.lora_b)

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
        with other layers' (same shapes), or None. Only for terms that declare ``batched_penalty``
        and whose recorded samples outnumber the fibre dimensions."""
        if not self.batched_penalty or self._x is None:
            return None
        n = self._x.shape[0] if self.penalty_samples is None else min(self._x.shape[0], self.penalty_samples)
        if n <= self.symmetry.dim_in:
            return None
        sym = self.symmetry
        key = (sym.dim_in, sym.dim_out, sym.num_lie + sym.num_group, self._x.dtype, self._x.device)
        # low-rank layers are computed through their factors, so they group by rank
        key = key if self.factors() is None else (*key, self.rank)
        return key if self.penalty_generators is None else (*key, "generators", self.penalty_generators)

    def sample_generators(self, count: int) -> Tensor | None:
        """Indices of the ``penalty_generators = m`` generators (of ``count``) used this step, drawn
        uniformly without replacement from the term's own random stream (seeded 0; the global one
        is left alone), or None to use all of them."""
        m = self.penalty_generators
        if m is None or m >= count:
            return None
        if self._generator_rng is None:
            self._generator_rng = torch.Generator().manual_seed(0)
        return torch.randperm(count, generator=self._generator_rng)[:m]

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
                x = self._x
                y_norm = self._y.norm().clamp_min(1e-30)
                out["relax_ratio"] = float(th * (x @ W.T).norm() / y_norm)
                # what project(merge=True) changes: θ(W − P(W))x, or all of θWx where nothing merges
                kept = (W - P) if self.can_merge else W
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
    penalty costs on models with many small layers. Low-rank layers (W = B·A, same rank) are computed
    through their factors (:func:`low_rank_moments`), never forming B·A.

    With ``term.penalty_generators = m`` (equal in the group) each call uses m of the K generators,
    drawn uniformly without replacement, and scales the Lie sum by K/m: an unbiased estimate of the
    exact sum (each generator is drawn with probability m/K), so ``form="mean"`` stays unbiased while
    the square roots of ``"sqrt"``/``"paper"`` make those slightly biased low (Jensen).
    """
    factored = [t.factors() for t in terms]
    if all(f is not None for f in factored) and len({f[0].shape[0] for f in factored}) == 1:
        A = torch.stack([f[0] for f in factored])  # (L, r, d_in)
        B = torch.stack([f[1] for f in factored])  # (L, d_out, r)
        with torch.no_grad():
            S = torch.stack([x.T @ x for x, _ in inputs])
        G_in, G_out, scale = _stacked_generators(terms, A.dtype)
        lie, norm = low_rank_moments(A, B, G_in, G_out, S)
        if scale != 1.0:
            lie = lie * scale
        return [PenaltyTerms(lie[i], norm[i], n) for i, (_, n) in enumerate(inputs)]
    W = torch.stack([t.dense() for t in terms])  # (L, d_out, d_in)
    L, d_out, d_in = W.shape
    G_in, G_out, scale = _stacked_generators(terms, W.dtype)
    k = G_in.shape[1]
    # generators laid out for plain (un-broadcast) bmm: broadcasting small batched matmuls was 5x slower
    G_in = G_in.permute(0, 2, 1, 3).reshape(L, d_in, k * d_in)
    G_out = G_out.reshape(L, k * d_out, d_out)
    with torch.no_grad():
        S = torch.stack([x.T @ x for x, _ in inputs])  # (L, d_in, d_in): detached, trains W only
    WG = (W @ G_in).reshape(L, d_out, k, d_in).transpose(1, 2).reshape(L, k * d_out, d_in)
    C = WG - G_out @ W  # (L, k·d_out, d_in): the blocks W ρ_in(A_k) − ρ_out(A_k) W
    lie = ((C @ S) * C).sum(dim=(1, 2)).clamp_min(0.0)
    if scale != 1.0:
        lie = lie * scale
    norm = ((W @ S) * W).sum(dim=(1, 2)).clamp_min(0.0)
    return [PenaltyTerms(lie[i], norm[i], n) for i, (_, n) in enumerate(inputs)]


def _stacked_generators(terms: list[LinearRelaxation], dtype: torch.dtype) -> tuple[Tensor, Tensor, float]:
    """(L, K, d_in, d_in) and (L, K, d_out, d_out): every layer's generators (Lie, then finite), or
    the m drawn this step (``penalty_generators``), and the factor K/m that makes their sum unbiased."""
    gens = [t.symmetry.stacked(dtype) for t in terms]
    G_in, G_out = torch.stack([g[0] for g in gens]), torch.stack([g[1] for g in gens])
    idx = terms[0].sample_generators(G_in.shape[1])
    if idx is None:
        return G_in, G_out, 1.0
    idx = idx.to(G_in.device)
    return G_in[:, idx], G_out[:, idx], G_in.shape[1] / idx.numel()


def low_rank_moments(A: Tensor, B: Tensor, G_in: Tensor, G_out: Tensor, S: Tensor) -> tuple[Tensor, Tensor]:
    """Σ_k ⟨C_k S, C_k⟩ and ⟨W S, W⟩ for W = B·A through the factors, for L layers at once.

    C_k = W G_k^in − G_k^out W = U_k V_k with U_k = [B, −G_k^out B] (d_out × 2r) and
    V_k = [A G_k^in; A] (2r × d_in), so ⟨C_k S, C_k⟩ = tr(U_k V_k S V_kᵀ U_kᵀ) = ⟨U_kᵀ U_k, V_k S V_kᵀ⟩,
    2r × 2r matrices; likewise ⟨W S, W⟩ = ⟨BᵀB, A S Aᵀ⟩. Costs O(K·r·(d_in² + d_out²)) instead of
    the O(K·d_in·d_out·(d_in + d_out)) of the dense C_k.

    Args:
        A: (L, r, d_in). B: (L, d_out, r). G_in: (L, K, d_in, d_in). G_out: (L, K, d_out, d_out).
        S: (L, d_in, d_in) second moments Σ x xᵀ.

    Returns:
        (lie, norm), each of shape (L,).

    Example:
        >>> import torch
        >>> A, B = torch.randn(1, 2, 3, dtype=torch.float64), torch.randn(1, 4, 2, dtype=torch.float64)
        >>> G_in, G_out = torch.randn(1, 2, 3, 3).double(), torch.randn(1, 2, 4, 4).double()
        >>> x = torch.randn(10, 3, dtype=torch.float64)
        >>> W = B[0] @ A[0]
        >>> exact = sum(((x @ (W @ gi - go @ W).T) ** 2).sum() for gi, go in zip(G_in[0], G_out[0]))
        >>> lie, norm = low_rank_moments(A, B, G_in, G_out, (x.T @ x)[None])
        >>> bool(torch.allclose(lie[0], exact)), bool(torch.allclose(norm[0], (x @ W.T).square().sum()))
        (True, True)
    """
    L, r, d_in = A.shape
    d_out, K = B.shape[1], G_in.shape[1]
    # V_k stacked over k: (L, K·2r, d_in); plain bmm everywhere (broadcast batched matmuls are slow)
    AG = (A @ G_in.permute(0, 2, 1, 3).reshape(L, d_in, K * d_in)).reshape(L, r, K, d_in).transpose(1, 2)
    V = torch.cat([AG, A[:, None].expand(L, K, r, d_in)], dim=2).reshape(L, K * 2 * r, d_in)
    VSV = (V @ S).reshape(L * K, 2 * r, d_in) @ V.reshape(L * K, 2 * r, d_in).transpose(1, 2)
    GB = (G_out.reshape(L, K * d_out, d_out) @ B).reshape(L, K, d_out, r)
    U = torch.cat([B[:, None].expand(L, K, d_out, r), -GB], dim=3).reshape(L * K, d_out, 2 * r)
    UU = U.transpose(1, 2) @ U
    lie = (UU * VSV).reshape(L, -1).sum(1).clamp_min(0.0)
    norm = ((B.transpose(1, 2) @ B) * ((A @ S) @ A.transpose(1, 2))).sum(dim=(1, 2)).clamp_min(0.0)
    return lie, norm
