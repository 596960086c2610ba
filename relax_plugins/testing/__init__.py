"""The adapter conformance kit: :func:`check_adapter` certifies that an adapter relaxes a layer correctly.

An adapter is correct when, for every layer it handles, its relaxation term

1. leaves the layer's outputs unchanged right after ``relax`` (θ = 0), at θ = 0 whatever W is, and
   at θ > 0 while W = 0 (``outputs_after_relax``, ``outputs_theta_zero``, ``outputs_w_zero``);
2. has a penalty that vanishes on the image of its projection and is positive off it
   (``penalty_on_image``, ``penalty_off_image``) in every direction: its Hessian on range(I − P)
   is positive definite (``penalty_definite``; W of at most 1024 entries, example inputs that span
   the layer's input), and, where the core can compute the intertwiner space of the term's
   :class:`~relax_plugins.Symmetry` (small layers), a projection whose image holds every
   intertwiner the penalty does not penalise (``projection_complete``);
3. projects idempotently and orthogonally: P(P(W)) = P(W), ⟨W − P(W), P(V)⟩ = 0
   (``projection_idempotent``, ``projection_orthogonal``);
4. projects onto maps that commute with the adapter's own generators, dρ_out(A)·M = M·dρ_in(A) and
   ρ_out(g)·M = M·ρ_in(g) (``projected_equivariant``), and computes f(x) + θ·P(W)·x with W := P(W)
   (``projected_output``; compared as sorted values, since the kit does not know the output
   layout: a permuted ``from_fibre`` passes it);
5. merges as declared and exactly: ``merge_delta`` answers a delta exactly when the term declares
   ``can_merge`` and leaves the base layer alone (``merge_declared``); ``project(merge=True)`` equals
   the relaxed layer with W := P(W) at the same θ for the terms that merge, and drops the others
   with a warning (``merge``, ``merge_warning``, ``projected_state_dict``);
6. projects back to the original classes and state_dict keys (``project_classes``,
   ``project_state_dict_keys``), and ``project(merge=False)`` restores the original outputs
   (``project_drop``).

Every check runs on copies (``copy.deepcopy``, else :func:`relax_plugins.copying.module_copy`, cast to
``dtype``) of the
caller's layer, in a small wrapper container, through the public API (``relax`` with
``adapters=[name]``, ``set_theta``, ``project``, ``projected_state_dict``) and the term's own
methods. What the kit needs from a term:

* :class:`~relax_plugins.LinearRelaxation` subclasses: nothing beyond the class (the dense W is
  ``term.weight``; ``project_dense``, ``symmetry``, ``take_input``/``to_fibre``, ``penalty_terms``,
  ``can_merge`` and ``merge_delta`` are used as the core uses them). ``relax`` is called without ``rank``.
* Any other :class:`~relax_plugins.RelaxationTerm` (convolutions): the relaxation parameter as a
  tensor attribute ``weight``, ``project_dense(W)`` mapping a tensor of that shape to P(W), and
  optionally ``generator_defect(W)`` (the summed squared defect of W under the adapter's
  generators; without it ``projected_equivariant`` is skipped). ``projected_output`` and
  ``projection_complete`` are checked for LinearRelaxation terms only.

Errors are relative (normalised by the size of what is compared), so one tolerance per dtype fits
every layer: 1e-10 for float64, 1e-4 for float32. ``penalty_off_image`` and ``penalty_definite``
are lower bounds (√(penalty / ||W x||²) of a W with W − P(W) ≠ 0, and √(λ_min / λ_max) of the
penalty's Hessian on range(I − P), must exceed √tol). Outputs compare their dtype and device too.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..plugins import adapter_names, get_plugin_manager, register_adapter, unregister_adapter
from .checks import _Check
from .properties import PROPERTIES, ConformanceReport, default_tolerance

__all__ = ["check_adapter", "ConformanceReport", "PROPERTIES", "default_tolerance"]


def _resolve_adapter(adapter: Any) -> tuple[str, bool]:
    """(registered name, whether it was registered here and must be unregistered afterwards)."""
    if isinstance(adapter, str):
        if adapter not in adapter_names():
            raise ValueError(f"no adapter named {adapter!r}; loaded adapters: {adapter_names()}")
        return adapter, False
    pm = get_plugin_manager()
    if pm.is_registered(adapter):
        return pm.get_name(adapter), False
    label = getattr(adapter, "__name__", None) or type(adapter).__name__
    return register_adapter(adapter, name=f"check_adapter:{label}:{id(adapter)}"), True


# -- the kit ------------------------------------------------------------------------------------------
def check_adapter(
    adapter: Any,
    layer: nn.Module,
    example_inputs: Any,
    *,
    dtype: torch.dtype = torch.float64,
    atol: float | None = None,
    tolerances: dict[str, float] | None = None,
    theta: float = 0.5,
    seed: int = 0,
    generator: torch.Generator | None = None,
    adapter_options: dict[str, Any] | None = None,
    observe: bool = True,
    raise_on_failure: bool = True,
) -> ConformanceReport:
    """Certify that ``adapter`` relaxes ``layer`` correctly (the properties listed in :data:`PROPERTIES`).

    The caller's ``layer`` is never changed: every step works on copies cast to ``dtype``.

    Args:
        adapter: the adapter as registered (a plugin module or object with ``@hookimpl`` functions,
            registered here for the duration of the check if it is not yet) or a loaded adapter's name.
        layer: one layer the adapter handles, or a small module whose sublayers it handles (all the
            terms found inside are checked).
        example_inputs: inputs of one forward call of ``layer``: a tensor, a tuple of positional
            arguments, a dict of keyword arguments or ``{"args": ..., "kwargs": ...}``. Floating
            tensors are cast to ``dtype``. Give enough samples (rows, points, nodes) that the
            data-dependent penalty sees every direction of the fibre.
        dtype: the dtype the check runs in.
        atol: tolerance on the relative errors (default :func:`default_tolerance` of ``dtype``).
        tolerances: per-property bounds overriding ``atol`` (e.g. escnn samples its kernel bases in
            float32, so its float64 filters commute with the grid rotations to ~1e-7 only:
            ``{"projected_equivariant": 1e-6}``).
        theta: the θ > 0 used where a relaxed output is compared.
        seed: seed of the random W and V (a private generator: the global random state is untouched).
        generator: a generator to draw them from instead of ``seed``.
        adapter_options: the options of the adapter under check (e.g. ``{"set_size": 5}``), passed as
            ``relax(..., adapter_options={<its registered name>: adapter_options})``; the namespaced
            form ``{<its name>: {...}}`` is accepted too.
        observe: also pass ``example_inputs`` to ``relax`` (adapters with ``relax_observe`` see the layer at work).
        raise_on_failure: raise on failure (default); if False, return the report with ``failures`` filled.

    Returns:
        A :class:`ConformanceReport` (property → measured error).

    Raises:
        AssertionError: a property failed; the message names each failed property with the
            measured value and its tolerance.
        TypeError: the adapter's terms lack what the kit needs (see the module docstring).

    Example:
        >>> import torch
        >>> from relax_toy.layers import SO2Linear
        >>> report = check_adapter("toy", SO2Linear(2, 3), torch.randn(16, 4))
        >>> report.ok, report.relaxed, report.errors["projection_idempotent"] < 1e-10
        (True, ['layer'], True)
    """
    tol = float(default_tolerance(dtype) if atol is None else atol)
    unknown = set(tolerances or {}) - set(PROPERTIES)
    if unknown:
        raise ValueError(f"unknown properties in tolerances: {sorted(unknown)}; known: {list(PROPERTIES)}")
    if not theta > 0:
        raise ValueError(f"theta must be > 0, got {theta}")
    gen = generator if generator is not None else torch.Generator().manual_seed(int(seed))
    name, registered_here = _resolve_adapter(adapter)
    snapshot = {k: v.detach().clone() for k, v in layer.state_dict().items()}
    try:
        report = _Check(name, layer, example_inputs, dtype, tol, float(theta), gen, adapter_options, observe,
                        dict(tolerances or {})).run()
    finally:
        if registered_here:
            unregister_adapter(name)
    after = layer.state_dict()
    if list(after) != list(snapshot) or any(not torch.equal(after[k], v) for k, v in snapshot.items()):
        raise RuntimeError("check_adapter changed the caller's layer (a bug of the kit or of the adapter's term "
                           "construction, which must not modify the module)")
    if report.failures and raise_on_failure:
        raise AssertionError(
            f"adapter {name!r} fails conformance on {report.layer}:\n  " + "\n  ".join(report.failures)
            + f"\n{report}"
        )
    return report
