"""The contract of a relaxation term: :class:`RelaxationTerm`, its declared capabilities and penalty subsampling.

:class:`RelaxationTerm` is the interface every adapter implements (the hook ``relax_make_term``
returns one); :class:`relax_plugins.linear.LinearRelaxation` implements it for pointwise layers.
What a term can do is declared in :data:`CAPABILITIES`, never inferred from the methods it overrides.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

from .moments import PenaltyTerms

__all__ = ["RelaxationTerm", "CAPABILITIES", "PenaltyTerms"]


#: the capabilities a term declares as boolean class attributes (see :class:`RelaxationTerm`)
CAPABILITIES = ("can_merge", "batched_penalty", "subsampled_penalty")


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
      default ``penalty_terms``; a term declaring it provides LinearRelaxation's ``batchable_penalty``,
      ``penalty_input``, ``factors``, ``dense``, ``sample_generators`` and ``symmetry``). A subclass
      that overrides ``penalty_terms`` without declaring ``batched_penalty`` in its own class body
      gets False.
    * :attr:`subsampled_penalty`: ``penalty_terms`` estimates its sums over samples on the rows
      :meth:`sample_rows` picks, so it honours :attr:`penalty_samples`. ``relax()`` sets
      ``penalty_samples`` on such terms only: the user's ``relax(..., penalty_samples=m)``, else the
      term's :attr:`default_penalty_samples`.

    What ``forward`` records for the penalties lives in the attributes named by ``_recorded_attrs``
    (extend it in subclasses): scratch, not state, so ``torch.save(model)`` and ``copy.deepcopy`` never
    carry a batch of activations along.
    """

    #: ``merge_delta`` can fold θ·P(W) into the base layer (False: project(merge=True) drops W)
    can_merge: bool = False
    #: the penalty can be batched with other layers' by :func:`moment_penalties`
    batched_penalty: bool = False
    #: the penalty is estimated on the rows :meth:`sample_rows` picks (``penalty_samples``)
    subsampled_penalty: bool = False
    #: ``penalty_samples`` of a term whose user does not pass ``relax(..., penalty_samples=m)`` (None: all)
    default_penalty_samples: int | None = None

    _recorded_attrs: tuple[str, ...] = ("_x", "_y", "_y_norm")

    def __init__(self) -> None:
        super().__init__()
        #: at most this many recorded samples per penalty (None: all); set by relax() where declared
        self.penalty_samples: int | None = self.default_penalty_samples

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
        if "supports_subgroup" in cls.__dict__:
            warnings.warn(
                f"{cls.__qualname__} declares supports_subgroup, which nothing reads any more: a subgroup is "
                "the adapter's own option (adapter_options={'<adapter>': {'subgroup': ...}}); remove it",
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

    def recorded_input(self, dtype: torch.dtype) -> Tensor:
        """The input the last forward pass recorded (``_x``), in ``dtype`` (W's): a forward under
        torch.autocast records bfloat16/float16 inputs, and penalties and reports, also computed
        outside autocast, read them in W's dtype.

        Raises:
            RuntimeError: no forward pass has been recorded yet.
        """
        x = self.__dict__.get("_x")
        if x is None:
            raise RuntimeError("no forward pass recorded yet: run the model on a batch before penalty()")
        return x.to(dtype) if x.is_floating_point() and x.dtype != dtype else x

    def remember(self, name: str, value: Any) -> None:
        """Store what a forward pass records (``_x``, ``_y``, a batch shape) as a plain attribute.

        Call it from ``forward`` instead of ``self._x = ...``: nn.Module.__setattr__ checks its
        parameter, module and buffer registries on every assignment, which costs more than the
        rest of a small relaxed layer's bookkeeping.
        """
        self.__dict__[name] = value

    def recorded_state(self) -> dict[str, Any]:
        """What the last forward pass recorded (the ``_recorded_attrs``), e.g. to restore it later."""
        return {k: self.__dict__[k] for k in self._recorded_attrs if k in self.__dict__}

    def sample_rows(self, x: Tensor) -> Tensor:
        """The rows of ``x`` (samples on the first axis) the penalty is computed on.

        All of them, or with ``penalty_samples = m`` and n > m rows every ⌈n/m⌉-th row (a view):
        at most m rows spread over all n, which are ordered (batch, points, ...). Sums over samples
        of the returned k rows, times n/k, estimate the sums over all n.

        Example:
            >>> import torch
            >>> term = RelaxationTerm()
            >>> term.penalty_samples = 4
            >>> term.sample_rows(torch.arange(10.0)[:, None]).flatten().tolist()
            [0.0, 3.0, 6.0, 9.0]
        """
        n, m = x.shape[0], self.penalty_samples
        if m is None or n <= m:
            return x
        return x[:: -(-n // m)]

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
