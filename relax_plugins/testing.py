"""The adapter conformance kit: :func:`check_adapter` certifies that an adapter relaxes a layer correctly.

An adapter is correct when, for every layer it handles, its relaxation term

1. leaves the layer's outputs unchanged right after ``relax`` (θ = 0), at θ = 0 whatever W is, and
   at θ > 0 while W = 0 (``outputs_after_relax``, ``outputs_theta_zero``, ``outputs_w_zero``);
2. has a penalty that vanishes on the image of its projection and is positive off it
   (``penalty_on_image``, ``penalty_off_image``), and, where the core can compute the
   intertwiner space of the term's :class:`~relax_plugins.Symmetry` (small layers), a projection
   whose image holds every intertwiner (``projection_complete``);
3. projects idempotently and orthogonally: P(P(W)) = P(W), ⟨W − P(W), P(V)⟩ = 0
   (``projection_idempotent``, ``projection_orthogonal``);
4. projects onto maps that commute with the adapter's own generators, dρ_out(A)·M = M·dρ_in(A) and
   ρ_out(g)·M = M·ρ_in(g) (``projected_equivariant``), and computes f(x) + θ·P(W)·x with W := P(W)
   (``projected_output``);
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
every layer: 1e-10 for float64, 1e-4 for float32. ``penalty_off_image`` is a lower bound
(√(penalty / ||W x||²) of a W with W − P(W) ≠ 0 must exceed √tol).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .api import project, projected_state_dict, relax, relaxed_modules, set_theta
from .copying import module_copy
from .plugins import adapter_names, get_plugin_manager, register_adapter, unregister_adapter
from .probe import normalize_example_inputs
from .symmetry import MAX_GENERIC_NULLSPACE, GenericProjector
from .term import LinearRelaxation, RelaxationTerm
from .wrapper import RelaxedModule

__all__ = ["check_adapter", "ConformanceReport", "PROPERTIES", "default_tolerance"]

#: every property the kit measures, in the order it checks them, with what the number is
PROPERTIES: dict[str, str] = {
    "outputs_after_relax": "max relative output change right after relax() (θ = 0, W as initialised)",
    "outputs_theta_zero": "max relative output change at θ = 0 with a random W",
    "outputs_w_zero": "max relative output change at θ > 0 with W = 0",
    "penalty_on_image": "√(penalty of W := P(W) / penalty of W) for a random W (must vanish)",
    "penalty_off_image": "√(penalty / ||W x||²) for W := W − P(W) ≠ 0 (a lower bound: must be positive)",
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
LOWER_BOUNDS = frozenset({"penalty_off_image"})

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


class _Holder(nn.Module):
    """The container the checked layer is relaxed in (relax() replaces children in place)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.layer(*args, **kwargs)


# -- tensors in, tensors out -------------------------------------------------------------------------
def _map_tensors(obj: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """``fn`` applied to every tensor in nested tuples/lists/dicts and tensor wrappers (``.tensor``)."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        items = [_map_tensors(o, fn) for o in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    if isinstance(obj, list):
        return [_map_tensors(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    inner = getattr(obj, "tensor", None)
    if isinstance(inner, Tensor) and callable(getattr(obj, "to", None)):
        # a tensor wrapper such as escnn's GeometricTensor: cast through its own .to()
        return obj.to(fn(inner).dtype) if inner.is_floating_point() else obj
    return obj


def _flat_outputs(obj: Any) -> list[Tensor]:
    """The floating-point tensors of a layer output, in order, detached."""
    if isinstance(obj, Tensor):
        return [obj.detach()] if obj.is_floating_point() else []
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _flat_outputs(o)]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _flat_outputs(v)]
    inner = getattr(obj, "tensor", None)
    return _flat_outputs(inner) if isinstance(inner, Tensor) else []


def _clone_call(call: tuple[tuple, dict]) -> tuple[tuple, dict]:
    # fresh tensors per call: layers that update their inputs in place must not leak between calls
    return _map_tensors(call, lambda t: t.clone())


def _run(module: nn.Module, call: tuple[tuple, dict]) -> list[Tensor]:
    args, kwargs = _clone_call(call)
    return _flat_outputs(module(*args, **kwargs))


def _classes(module: nn.Module) -> list[str]:
    # by name: torch.fx GraphModules (e3nn's compiled code) get a fresh class per instance
    return [f"{type(m).__module__}.{type(m).__qualname__}" for m in module.modules()]


def _norm(t: Tensor) -> float:
    return float(t.double().norm())


def _rel(a: Tensor, b: Tensor) -> float:
    if a.shape != b.shape:
        return math.inf
    scale = _norm(b)
    diff = _norm(a - b)
    return diff / scale if scale > 0 else diff


def _rel_outputs(a: list[Tensor], b: list[Tensor]) -> float:
    if len(a) != len(b):
        return math.inf
    return max((_rel(x, y) for x, y in zip(a, b)), default=0.0)


# -- the term's parameterisation --------------------------------------------------------------------
def _weight(term: RelaxationTerm, where: str) -> Tensor:
    """The tensor holding W (dense for LinearRelaxation), with a clear error for unsupported terms."""
    if isinstance(term, LinearRelaxation) and (term.rank is not None or term.subgroup is not None):
        raise TypeError(f"{where}: check_adapter needs a dense, full-group W (the term has rank={term.rank}, "
                        f"subgroup={type(term.subgroup).__name__ if term.subgroup is not None else None})")
    w = getattr(term, "weight", None)
    if not isinstance(w, Tensor):
        raise TypeError(f"{where}: {type(term).__name__} keeps no tensor `weight`; check_adapter needs the "
                        "relaxation parameter as `term.weight` (see relax_plugins.testing)")
    if not callable(getattr(term, "project_dense", None)):
        raise TypeError(f"{where}: {type(term).__name__} has no project_dense(W); check_adapter needs it "
                        "(see relax_plugins.testing)")
    return w


def _set(w: Tensor, value: Tensor) -> None:
    with torch.no_grad():
        w.copy_(value)


def _lie_part(term: RelaxationTerm) -> float:
    return float(term.penalty_terms().lie)


def _generator_defect(term: RelaxationTerm, M: Tensor) -> float | None:
    """max over the adapter's generators of ||ρ_out·M − M·ρ_in|| / (||M||·||ρ||); None if unknown."""
    scale = _norm(M)
    if isinstance(term, LinearRelaxation):
        sym = term.symmetry
        Md = M.double()
        worst = 0.0
        pairs = list(zip(sym.lie_in, sym.lie_out)) + list(zip(sym.group_in, sym.group_out))
        for g_in, g_out in pairs:
            g_in, g_out = g_in.to(Md), g_out.to(Md)
            size = max(float(torch.linalg.matrix_norm(g_in, 2)), float(torch.linalg.matrix_norm(g_out, 2)), 1e-30)
            worst = max(worst, _norm(g_out @ Md - Md @ g_in) / (max(scale, 1e-300) * size))
        return worst
    fn = getattr(term, "generator_defect", None)
    if not callable(fn):
        return None
    return math.sqrt(max(float(fn(M)), 0.0)) / max(scale, 1e-300)


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


class _Check:
    def __init__(self, name: str, layer: nn.Module, example_inputs: Any, dtype: torch.dtype, tol: float,
                 theta: float, gen: torch.Generator, adapter_options: dict[str, Any] | None, observe: bool,
                 overrides: dict[str, float]) -> None:
        self.name, self.layer, self.dtype, self.tol, self.theta, self.gen = name, layer, dtype, tol, theta, gen
        options = dict(adapter_options or {})
        if list(options) == [name] and isinstance(options[name], dict):
            options = dict(options[name])
        self.options = {name: options} if options else {}
        self.overrides = overrides
        self.observe = observe
        if not isinstance(example_inputs, (Tensor, tuple, list, dict)):
            example_inputs = (example_inputs,)  # one positional argument of another type (GeometricTensor)
        self.call = _map_tensors(
            normalize_example_inputs(example_inputs),
            lambda t: t.to(dtype) if t.is_floating_point() else t,
        )
        self.report = ConformanceReport(adapter=name, layer=type(layer).__name__)

    # -- bookkeeping ------------------------------------------------------------------------
    def measure(self, prop: str, value: float, layer: str | None = None, bound: float | None = None) -> None:
        r = self.report
        if bound is None and prop in self.overrides:
            bound = float(self.overrides[prop])
        if bound is None:
            bound = 0.5 if prop in BOOLEANS else (math.sqrt(self.tol) if prop in LOWER_BOUNDS else self.tol)
        r.tolerances[prop] = bound
        if layer is not None:
            r.per_layer.setdefault(layer, {})[prop] = value
        old = r.errors.get(prop)
        worse = old is None or math.isnan(value) or (value < old if prop in LOWER_BOUNDS else value > old)
        if worse:
            r.errors[prop] = value
        if not _within(prop, value, bound):
            where = "" if layer is None else f" [layer {layer or '<root>'!r}]"
            rel = ">=" if prop in LOWER_BOUNDS else "<="
            r.failures.append(
                f"{prop}{where}: measured {value:.3e}, needs {rel} {bound:.1e} ({PROPERTIES[prop]})"
            )

    def skip(self, prop: str, why: str) -> None:
        self.report.skipped.setdefault(prop, why)

    def copy_layer(self) -> nn.Module:
        try:
            copied = copy.deepcopy(self.layer)
        except Exception:
            # escnn's SO(3) layers cannot be deep-copied; their state can (e3nn's compiled
            # fx modules are the opposite: a state copy shares code objects that forward needs)
            copied = module_copy(self.layer)
        return copied.to(self.dtype)

    def relaxed_holder(self) -> _Holder:
        holder = _Holder(self.copy_layer())
        kw: dict[str, Any] = {"adapters": [self.name], "adapter_options": self.options}
        if self.observe:
            args, kwargs = self.call
            kw["example_inputs"] = {"args": args, "kwargs": kwargs}
        relax(holder, **kw)
        return holder

    def random_like(self, w: Tensor) -> Tensor:
        return torch.randn(w.shape, generator=self.gen, dtype=torch.float64).to(w.device, w.dtype)

    # -- the checks ---------------------------------------------------------------------------
    def run(self) -> ConformanceReport:
        original = self.copy_layer()
        with torch.no_grad():
            self.reference = _run(original, self.call)
        self.keys = list(original.state_dict())
        self.classes = _classes(original)
        holder = self.relaxed_holder()
        self.layers = list(relaxed_modules(holder))
        self.report.relaxed = [n for n, _ in self.layers]
        self.weights = {n: _weight(m.term, f"layer {n or '<root>'!r}") for n, m in self.layers}
        with torch.no_grad():
            self.check_outputs(holder)
            for n, wrapper in self.layers:
                self.check_term(n, wrapper)
            self.check_merge(holder)
            self.check_drop()
        return self.report

    def check_outputs(self, holder: _Holder) -> None:
        """Property 1; also records each relaxed layer's own inputs for the per-term checks."""
        self.inputs: dict[str, tuple[tuple, dict]] = {}
        hooks = []
        for n, wrapper in self.layers:
            def grab(_mod: nn.Module, args: tuple, kwargs: dict, n: str = n) -> None:
                self.inputs.setdefault(n, _clone_call((args, kwargs)))
            hooks.append(wrapper.register_forward_pre_hook(grab, with_kwargs=True))
        try:
            self.measure("outputs_after_relax", _rel_outputs(_run(holder, self.call), self.reference))
        finally:
            for h in hooks:
                h.remove()
        for w in self.weights.values():
            _set(w, self.random_like(w))
        self.measure("outputs_theta_zero", _rel_outputs(_run(holder, self.call), self.reference))
        for w in self.weights.values():
            _set(w, torch.zeros_like(w))
        set_theta(holder, self.theta)
        self.measure("outputs_w_zero", _rel_outputs(_run(holder, self.call), self.reference))

    def check_term(self, n: str, wrapper: RelaxedModule) -> None:
        """Properties 2–4 for one relaxed layer (θ > 0; its last forward recorded the penalty inputs)."""
        term, w = wrapper.term, self.weights[n]
        P = term.project_dense
        W, V = self.random_like(w), self.random_like(w)
        PW, PV = P(W), P(V)
        R = W - PW
        # 2. the penalty: zero on the image, positive off it
        _set(w, W)
        lie_w = _lie_part(term)
        _set(w, PW)
        lie_img = _lie_part(term)
        _set(w, R)
        terms = term.penalty_terms()
        lie_r, norm_r = float(terms.lie), float(terms.norm)
        self.measure("penalty_on_image", math.sqrt(max(lie_img, 0.0) / lie_w) if lie_w > 0 else
                     (0.0 if lie_img == 0 else math.inf), n)
        self.measure("penalty_off_image", math.sqrt(max(lie_r, 0.0) / norm_r) if norm_r > 0 else 0.0, n)
        if isinstance(term, LinearRelaxation):
            sym = term.symmetry
            if sym.num_lie and sym.dim_in * sym.dim_out > MAX_GENERIC_NULLSPACE:
                self.skip("projection_complete", f"layer {n!r}: too large for the core's dense null space")
            else:
                G = GenericProjector(sym)(W.double()).to(W.dtype)
                self.measure("projection_complete", _rel(P(G), G), n)
        else:
            self.skip("projection_complete", f"layer {n!r}: {type(term).__name__} is not a LinearRelaxation")
        # 3. idempotent and orthogonal
        self.measure("projection_idempotent", _rel(P(PW), PW), n)
        denom = _norm(R) * _norm(PV)
        inner = abs(float((R.double() * PV.double()).sum()))
        self.measure("projection_orthogonal", inner / denom if denom > 0 else 0.0, n)
        # 4. the image commutes with the generators, and the relaxed layer computes f + θ·P(W)·x
        defect = _generator_defect(term, PW)
        if defect is None:
            self.skip("projected_equivariant", f"layer {n!r}: {type(term).__name__} exposes no generators "
                      "(LinearRelaxation.symmetry or generator_defect(W))")
        else:
            self.measure("projected_equivariant", defect, n)
        if isinstance(term, LinearRelaxation):
            _set(w, PW)
            args, kwargs = _clone_call(self.inputs[n])
            x = term.to_fibre(term.take_input(args, kwargs)).detach()
            relaxed = _run(wrapper, self.inputs[n])
            base = _run(wrapper.base, self.inputs[n])
            self.measure("projected_output", self._sorted_error(relaxed, base, self.theta * (x @ PW.T)), n)
        else:
            self.skip("projected_output", f"layer {n!r}: {type(term).__name__} is not a LinearRelaxation "
                      "(its relaxed output is checked through merge)")
        _set(w, torch.zeros_like(w))

    @staticmethod
    def _sorted_error(relaxed: list[Tensor], base: list[Tensor], expected: Tensor) -> float:
        """Compare f_θ(x) − f(x) with θ·P(W)·x whatever the term's output layout: layouts are
        reshapes and permutations of the fibre, so the sorted values must agree (outputs the term
        does not touch contribute zeros)."""
        if len(relaxed) != len(base) or any(a.shape != b.shape for a, b in zip(relaxed, base)):
            return math.inf
        delta = torch.cat([(a - b).reshape(-1) for a, b in zip(relaxed, base)]).double()
        exp = expected.reshape(-1).double()
        if exp.numel() > delta.numel():
            return math.inf
        exp = torch.cat([exp, exp.new_zeros(delta.numel() - exp.numel())])
        return _rel(delta.sort().values, exp.sort().values)

    def check_merge(self, holder: _Holder) -> None:
        """Properties 5 and 6 on the relaxed holder (consumed: it is projected)."""
        Ws = {n: self.random_like(w) for n, w in self.weights.items()}
        for n, w in self.weights.items():
            _set(w, Ws[n])
        merges = {n: bool(wrapper.term.can_merge) for n, wrapper in self.layers}
        for n, wrapper in self.layers:
            before = {k: v.detach().clone() for k, v in wrapper.base.state_dict().items()}
            try:
                delta = wrapper.term.merge_delta(wrapper.base, wrapper.theta)
            except Exception as exc:  # an adapter bug: reported, not raised
                self.report.failures.append(f"merge [layer {n!r}]: merge_delta raised {type(exc).__name__}: {exc}")
                return
            after = wrapper.base.state_dict()
            touched = list(after) != list(before) or any(not torch.equal(after[k], v) for k, v in before.items())
            agrees = isinstance(delta, dict) if merges[n] else delta is None
            self.measure("merge_declared", float(touched or not agrees), n)
        self.report.merged = merges
        for n, wrapper in self.layers:
            w = self.weights[n]
            _set(w, wrapper.term.project_dense(Ws[n]) if merges[n] else torch.zeros_like(w))
        expected = _run(holder, self.call)
        for n, w in self.weights.items():
            _set(w, Ws[n])
        state = {k: v.detach().clone() for k, v in projected_state_dict(holder, merge=True).items()}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            projected = project(holder, merge=True)
        warned = any("cannot hold" in str(c.message) for c in caught)
        # read before any forward: a forward in train mode updates buffers (BatchNorm statistics)
        got = {k: v.detach().clone() for k, v in projected.state_dict().items()}
        self.measure("merge", _rel_outputs(_run(projected, self.call), expected))
        self.measure("merge_warning", float(warned != (not all(merges.values()))))
        if list(got) != list(state):
            self.measure("projected_state_dict", math.inf)
        else:
            self.measure("projected_state_dict", max(
                (_rel(state[k], got[k]) for k in got if got[k].is_floating_point()), default=0.0))
        inner = projected.layer
        self.measure("project_classes", float(_classes(inner) != self.classes))
        self.measure("project_state_dict_keys", float(list(inner.state_dict()) != self.keys))

    def check_drop(self) -> None:
        """project(merge=False) on a fresh relaxed copy with a random W at θ > 0: the original outputs."""
        holder = self.relaxed_holder()
        for _, wrapper in relaxed_modules(holder):
            w = _weight(wrapper.term, "project_drop")
            _set(w, self.random_like(w))
        set_theta(holder, self.theta)
        self.measure("project_drop", _rel_outputs(_run(project(holder), self.call), self.reference))
