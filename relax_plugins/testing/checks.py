"""The conformance checks of one adapter on one layer (run by :func:`relax_plugins.testing.check_adapter`)."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from ..api import project, projected_state_dict, relax, relaxed_modules, set_theta
from ..copying import model_copy
from ..probe import normalize_example_inputs
from ..symmetry import MAX_GENERIC_NULLSPACE, GenericProjector
from ..term import LinearRelaxation
from ..wrapper import RelaxedModule
from .measure import (
    _classes,
    _clone_call,
    _generator_defect,
    _Holder,
    _lie_part,
    _map_tensors,
    _norm,
    _rel,
    _rel_outputs,
    _run,
    _set,
    _weight,
)
from .properties import BOOLEANS, LOWER_BOUNDS, PROPERTIES, ConformanceReport, _within

#: the largest W (entries) whose penalty Hessian the kit builds (one Hessian-vector product a direction)
MAX_DEFINITE_CHECK = 1024


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
        return model_copy(self.layer).to(self.dtype)

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
        self.check_penalty_definite(n, term, w, W)
        if isinstance(term, LinearRelaxation):
            sym = term.symmetry
            if sym.num_lie and sym.dim_in * sym.dim_out > MAX_GENERIC_NULLSPACE:
                self.skip("projection_complete", f"layer {n!r}: too large for the core's dense null space")
            else:
                G = GenericProjector(sym)(W.double()).to(W.dtype)
                _set(w, G)
                t = term.penalty_terms()
                lie_g, norm_g = float(t.lie), float(t.norm)
                if norm_g > 0 and math.sqrt(max(lie_g, 0.0) / norm_g) >= math.sqrt(self.tol):
                    # the term penalises intertwiners outside its own span (an o3.Linear with fewer
                    # instructions than the group allows): P need not fix them, penalty_definite
                    # checks that nothing unpenalised lies off P's image
                    self.skip("projection_complete", f"layer {n!r}: the term's span is narrower than its "
                              "generators' intertwiners, and its penalty covers the rest")
                else:
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

    def check_penalty_definite(self, n: str, term: Any, w: Tensor, W: Tensor) -> None:
        """The penalty vanishes on no direction off P's image (one random R = W − P(W) can miss a
        null direction: a penalty built from some of the generators only, a path the projection
        drops). The Lie part is a quadratic form in W; its Hessian restricted to range(I − P), from
        Hessian-vector products, must be positive definite: √(λ_min / λ_max) is the measure."""
        D = w.numel()
        x = term.__dict__.get("_x")
        if D > MAX_DEFINITE_CHECK:
            self.skip("penalty_definite", f"layer {n!r}: W has {D} entries (> {MAX_DEFINITE_CHECK})")
            return
        if isinstance(x, Tensor) and x.dim() == 2 and int(torch.linalg.matrix_rank(x.double())) < x.shape[1]:
            # then W·x = 0 on some directions whatever W is: the example inputs cannot tell
            self.skip("penalty_definite", f"layer {n!r}: the example inputs do not span the layer's input fibre")
            return
        eye = torch.eye(D, dtype=torch.float64)
        P = torch.stack([term.project_dense(e.reshape(w.shape).to(w.dtype)).reshape(-1).double() for e in eye])
        vals, vecs = torch.linalg.eigh(eye - (P + P.T) / 2)
        Q = vecs[:, vals > 0.5]  # range(I − P) (P is checked orthogonal and idempotent separately)
        if Q.shape[1] == 0:
            return
        _set(w, W)  # the Hessian of a quadratic form is the same everywhere: a generic point
        with torch.enable_grad():
            lie = term.penalty_terms().lie
            if not lie.requires_grad:
                self.skip("penalty_definite", f"layer {n!r}: its penalty is not differentiable in W")
                return
            (g,) = torch.autograd.grad(lie, w, create_graph=True)
            HQ = torch.stack([torch.autograd.grad(g, w, q.reshape(w.shape).to(w.dtype), retain_graph=True)[0]
                              .reshape(-1).double() for q in Q.T], dim=1)
        eig = torch.linalg.eigvalsh((Q.T @ HQ + (Q.T @ HQ).T) / 2)
        top = float(eig[-1])
        self.measure("penalty_definite", math.sqrt(max(float(eig[0]), 0.0) / top) if top > 0 else 0.0, n)

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
