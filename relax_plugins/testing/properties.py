"""The properties the conformance kit certifies, their default tolerances and the report it returns."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = ["PROPERTIES", "LOWER_BOUNDS", "BOOLEANS", "default_tolerance", "ConformanceReport"]

#: every property the kit measures, in the order it checks them, with what the number is
PROPERTIES: dict[str, str] = {
    "outputs_after_relax": "max relative output change right after relax() (θ = 0, W as initialised)",
    "outputs_theta_zero": "max relative output change at θ = 0 with a random W",
    "outputs_w_zero": "max relative output change at θ > 0 with W = 0",
    "penalty_on_image": "√(penalty of W := P(W) / penalty of W) for a random W (must vanish)",
    "penalty_off_image": "√(penalty / ||W x||²) for W := W − P(W) ≠ 0 (a lower bound: must be positive)",
    "penalty_definite": "√(λ_min / λ_max) of the penalty's Hessian on range(I − P): no direction off P's image "
    "is free (a lower bound: must be positive)",
    "projection_complete": "||P(G) − G|| / ||G|| for G an intertwiner of the term's generators (core null space)",
    "projection_idempotent": "||P(P(W)) − P(W)|| / ||P(W)||",
    "projection_orthogonal": "|⟨W − P(W), P(V)⟩| / (||W − P(W)||·||P(V)||)",
    "projected_equivariant": "max over generators of ||ρ_out·M − M·ρ_in|| / (||M||·||ρ||), M = P(W)",
    "projected_output": "relative error of f_θ(x) − f(x) against θ·P(W)·x with W := P(W) (layout-free)",
    "merge_declared": "1 if merge_delta() answered against the term's can_merge declaration (a dict exactly "
    "when it declares can_merge, else None) or changed the base layer",
    "merge": "relative output error of project(merge=True) against the relaxed layer with W := P(W) "
    "(W := 0 where the term cannot merge)",
    "merge_warning": "1 if project(merge=True) did not warn exactly when some term cannot merge",
    "projected_state_dict": "max relative difference of projected_state_dict(merge=True) and the projected state",
    "project_classes": "1 if the projected layer's module classes differ from the original's",
    "project_state_dict_keys": "1 if the projected layer's state_dict keys differ from the original's",
    "project_drop": "max relative output change of project(merge=False) against the original layer",
}


#: properties whose tolerance is a lower bound (measured must exceed it)
LOWER_BOUNDS = frozenset({"penalty_off_image", "penalty_definite"})


#: properties measured as 0 (holds) or 1 (fails)
BOOLEANS = frozenset({"merge_declared", "merge_warning", "project_classes", "project_state_dict_keys"})


def default_tolerance(dtype: torch.dtype) -> float:
    """Tolerance on the kit's relative errors: 1e-10 for float64, 1e-4 for float32 (1e-2 below).

    Example:
        >>> default_tolerance(torch.float64), default_tolerance(torch.float32)
        (1e-10, 0.0001)
    """
    if dtype == torch.float64:
        return 1e-10
    if dtype == torch.float32:
        return 1e-4
    return 1e-2


@dataclass
class ConformanceReport:
    """What :func:`check_adapter` measured.

    Attributes:
        adapter: the adapter's registered name.
        layer: the class name of the checked layer.
        relaxed: qualified names of the relaxed layers in the kit's container: ``"layer"`` for the
            checked layer itself, ``"layer.<name>"`` for a sublayer.
        errors: property → measured value, worst over the relaxed layers (see :data:`PROPERTIES`).
        tolerances: property → bound (an upper bound, except for :data:`LOWER_BOUNDS`).
        per_layer: relaxed layer name → property → measured value, for the per-term properties.
        skipped: property → why it was not measured.
        merged: relaxed layer name → whether its term merges into the base layer (its ``can_merge``).
        failures: one line per failed property (empty when the adapter conforms).
    """

    adapter: str
    layer: str
    relaxed: list[str] = field(default_factory=list)
    errors: dict[str, float] = field(default_factory=dict)
    tolerances: dict[str, float] = field(default_factory=dict)
    per_layer: dict[str, dict[str, float]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    merged: dict[str, bool] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every measured property is within its tolerance."""
        return not self.failures

    def __str__(self) -> str:
        head = f"check_adapter({self.adapter!r}) on {self.layer}: relaxed {self.relaxed or ['']}"
        lines = [head + (" — conforms" if self.ok else f" — {len(self.failures)} failure(s)")]
        for prop in PROPERTIES:
            if prop in self.errors:
                bound = self.tolerances[prop]
                sign = ">=" if prop in LOWER_BOUNDS else "<="
                mark = "ok" if _within(prop, self.errors[prop], bound) else "FAIL"
                lines.append(f"  {prop:<24} {self.errors[prop]:10.3e}  (needs {sign} {bound:.1e})  {mark}")
            elif prop in self.skipped:
                lines.append(f"  {prop:<24} skipped: {self.skipped[prop]}")
        return "\n".join(lines)


def _within(prop: str, value: float, bound: float) -> bool:
    if math.isnan(value):
        return False
    return value >= bound if prop in LOWER_BOUNDS else value <= bound
