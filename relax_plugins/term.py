"""Relaxation terms: the unconstrained part θ·W·x that an adapter attaches to one layer.

:class:`RelaxationTerm` (:mod:`relax_plugins.contract`) is the interface every adapter implements
(the hook ``relax_make_term`` returns one). :class:`LinearRelaxation` (:mod:`relax_plugins.linear`)
implements it for every *pointwise* layer, i.e. a layer whose relaxation is a dense matrix on the
feature fibre of each sample / point / node; adapters subclass it and override only the layout
methods (``take_input``, ``to_fibre``, ``from_fibre``), the projection (``project_dense``) and the
merge (``dense_delta``). Convolutional adapters implement :class:`RelaxationTerm` directly.

This module gathers both with the helpers adapters use, under their historical import path.

Example:
    >>> from relax_plugins.term import LinearRelaxation, RelaxationTerm
    >>> issubclass(LinearRelaxation, RelaxationTerm)
    True
"""

from __future__ import annotations

from .contract import CAPABILITIES, RelaxationTerm
from .inplace import PURE_LIBRARIES, first_arg_name, has_call_hooks, may_modify_inputs  # noqa: F401  (re-exported)
from .linear import LinearRelaxation
from .lowrank import low_rank_apply, low_rank_moments
from .moments import PenaltyTerms, moment_penalties, under_func_transform

__all__ = [
    "RelaxationTerm",
    "LinearRelaxation",
    "CAPABILITIES",
    "PenaltyTerms",
    "moment_penalties",
    "may_modify_inputs",
    "first_arg_name",
    "has_call_hooks",
    "low_rank_apply",
    "low_rank_moments",
    "under_func_transform",
]
