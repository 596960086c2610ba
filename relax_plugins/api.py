"""User-facing functions: relax, set_theta, penalty, project, projection_report.

A facade: the functions live in :mod:`.relaxing` (relax), :mod:`.relaxed` (finding relaxed layers, θ),
:mod:`.penalties` (penalty) and :mod:`.projection` (project, projected_state_dict, projection_report);
every name is importable from here as before.
"""

from __future__ import annotations

from .penalties import (  # noqa: F401
    PENALTY_FORMS,
    _all_penalty_terms,
    _check_penalty_terms,
    _raise_non_finite,
    check_penalty_args,
    layers_penalty,
    penalty,
)
from .projection import (  # noqa: F401
    _apply_deltas,
    _check_mergeable,
    merge_deltas,
    preserved_state,
    project,
    projected_state_dict,
    projection_report,
)
from .relaxed import (  # noqa: F401
    _check_theta,
    _require_relaxed,
    get_theta,
    relaxation_parameters,
    relaxed_modules,
    set_theta,
)
from .relaxing import _check_term, _matches, _module_placement, _TrackedOptions, relax  # noqa: F401

__all__ = [  # sorted (ruff RUF022)
    "PENALTY_FORMS",
    "get_theta",
    "penalty",
    "preserved_state",
    "project",
    "projected_state_dict",
    "projection_report",
    "relax",
    "relaxed_modules",
    "set_theta",
]
