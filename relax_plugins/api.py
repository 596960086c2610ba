"""User-facing functions: relax, set_theta, penalty, project, projection_report."""

from __future__ import annotations

import contextlib
import fnmatch
import random
import sys
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ._checks import check_bool, check_choice, check_int, check_mapping, check_module, check_patterns, check_real
from .errors import (
    AdapterError,
    AlreadyRelaxedError,
    NonFiniteError,
    NothingToRelaxError,
    NotRelaxedError,
    RelaxError,
    UnknownAdapterError,
)
from .options import resolve_adapter_options
from .plugins import AdapterCalls, AdapterFailure, adapter_names
from .probe import normalize_example_inputs
from .term import LinearRelaxation, PenaltyTerms, RelaxationTerm, moment_penalties
from .wrapper import RelaxedModule, _floating_tensors

__all__ = [
    "relax",
    "project",
    "set_theta",
    "get_theta",
    "penalty",
    "relaxed_modules",
    "projection_report",
    "projected_state_dict",
    "preserved_state",
    "PENALTY_FORMS",
]

PENALTY_FORMS = ("sqrt", "mean", "paper")


def relaxed_modules(model: nn.Module) -> Iterator[tuple[str, RelaxedModule]]:
    """(qualified name, wrapper) for every relaxed layer of ``model``.

    Example:
        >>> import torch, relax_plugins as rp
        >>> from relax_toy.layers import SO2Linear
        >>> m = rp.relax(torch.nn.Sequential(SO2Linear(1, 1), SO2Linear(1, 1)))
        >>> [n for n, _ in rp.relaxed_modules(m)]
        ['0', '1']
    """
    for name, mod in model.named_modules():
        if isinstance(mod, RelaxedModule):
            yield name, mod


def relaxation_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that relaxation added (every W, and θ where a policy made it learnable), each
    once: give them their own optimiser parameter group (e.g. their own learning rate).

    Example:
        >>> import torch, relax_plugins as rp
        >>> from relax_toy.layers import SO2Linear
        >>> m = rp.relax(torch.nn.Sequential(SO2Linear(2, 2)))
        >>> extra = {id(p) for p in rp.relaxation_parameters(m)}
        >>> groups = [{"params": [p for p in m.parameters() if id(p) not in extra]},
        ...           {"params": rp.relaxation_parameters(m), "lr": 1e-4}]
        >>> opt = torch.optim.Adam(groups, lr=1e-3)
        >>> sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in m.parameters())
        True
    """
    seen: dict[int, nn.Parameter] = {}
    for _, layer in relaxed_modules(model):
        extra = list(layer.term.parameters())
        if isinstance(layer.theta, nn.Parameter):
            extra.append(layer.theta)
        for p in extra:
            seen.setdefault(id(p), p)
    return list(seen.values())


def _matches(name: str, patterns: Iterable[str] | None) -> bool:
    return patterns is not None and any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _module_placement(module: nn.Module, name: str) -> tuple[torch.dtype, torch.device] | None:
    tensors = _floating_tensors(module)
    if not tensors:
        return None
    kinds = {(t.dtype, t.device) for t in tensors}
    if len(kinds) > 1:
        raise AdapterError(
            f"layer {name or '<root>'!r} ({type(module).__name__}) mixes dtypes/devices {sorted(map(str, kinds))}; "
            "move it to one dtype and device before relax()"
        )
    return next(iter(kinds))


def relax(
    model: nn.Module,
    *,
    adapters: Iterable[str] | None = None,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    rank: int | None = None,
    init_std: float = 0.0,
    penalty_samples: int | None = None,
    adapter_options: dict[str, Any] | None = None,
    example_inputs: Any = None,
) -> nn.Module:
    """Relax every recognised equivariant layer of ``model`` in place and return ``model``.

    Each recognised layer is replaced by a :class:`RelaxedModule` holding it; θ starts at 0 and W
    at 0 (or a low-rank W = B·A with B = 0), so outputs are unchanged. All targets are validated
    and their terms built before anything is changed: an error leaves the model untouched.

    If the root module itself is a recognised layer it cannot be replaced in place: the wrapper is
    returned instead (keep the return value).

    Args:
        model: any ``nn.Module``.
        adapters: restrict to these adapter names (see :func:`list_adapters`); one name or a list.
        include: only relax layers whose qualified name matches one of these fnmatch patterns (one
            pattern as a string, or a list of patterns).
        exclude: skip layers whose qualified name matches one of these patterns (string or list).
        rank: low-rank W of this rank, an int >= 1 (None: dense W).
        init_std: std of a random initial dense W, a finite number >= 0 (0 keeps outputs unchanged).
        penalty_samples: compute pointwise layers' penalties on at most this many recorded samples
            (an evenly strided, rescaled subset: an estimate of the full sums); an int >= 1, None uses all.
        adapter_options: options of the adapters, per adapter name: ``{"vn": {"vn_names": [...]},
            "e3nn": {"subgroup": "SO(3)"}}`` (see each adapter's ``relax_adapter_options`` hook, or
            ``relax_plugins.plugins.declared_options(name)``). Validated before anything changes: an
            unknown adapter, an undeclared key or a value of the wrong type is an error, and every option
            given must be read by its adapter on this model. ``rank``/``init_std`` are arguments of their
            own. The flat form of earlier releases (``{"vn_names": [...]}``) is deprecated
            (``DeprecationWarning``; removed in the next release) and accepted only where each key
            belongs to exactly one adapter in use.
        example_inputs: inputs of one forward call (a tensor, a tuple of positional arguments, a
            dict of keyword arguments, or ``{"args": ..., "kwargs": ...}``). Adapters that
            recognise layers by what they do observe the model on them before anything is changed
            (the ``vn`` adapter finds vector-neuron channel maps however they are written). The
            probe runs in eval mode without gradients and leaves the model's modes, parameters,
            buffers and the random number generators exactly as they were.

    A layer object used at several places (tied weights) gets one wrapper, installed at every use: the
    relaxation is tied too (its penalty sees the inputs of the last use that ran).

    Returns:
        ``model`` itself (or the wrapper if the root was relaxed).

    Raises:
        AlreadyRelaxedError: ``model`` already holds relaxed layers.
        UnknownAdapterError: a name in ``adapters`` or ``adapter_options`` is not loaded.
        NothingToRelaxError: no layer was recognised.
        AdapterError: an adapter failed on a layer, on the probe forward, or returned something invalid
            (nothing was changed).
        TypeError, ValueError: an argument of the wrong type or out of range (checked before anything
            else; ``example_inputs`` not one of the accepted forms), an unknown, mistyped or unread adapter
            option, or a tied layer selected at only some of its uses.

    Example:
        >>> import torch, relax_plugins as rp
        >>> from relax_toy.layers import SO2Linear
        >>> model = torch.nn.Sequential(SO2Linear(2, 2), torch.nn.Identity())
        >>> rp.relax(model) is model
        True
    """
    check_module(model, "model")
    include, exclude = check_patterns(include, "include"), check_patterns(exclude, "exclude")
    names = check_patterns(adapters, "adapters")
    rank = check_int(rank, "rank", minimum=1, none_ok=True)
    init_std = check_real(init_std, "init_std", minimum=0.0)
    penalty_samples = check_int(penalty_samples, "penalty_samples", minimum=1, none_ok=True)
    given = check_mapping(adapter_options, "adapter_options")
    if any(True for _ in relaxed_modules(model)):
        raise AlreadyRelaxedError("model already holds relaxed layers; project() it first or relax a fresh copy")
    allowed = None
    if names is not None:
        allowed = set(names)
        unknown = allowed - set(adapter_names())
        if unknown:
            raise UnknownAdapterError(f"unknown adapter(s) {sorted(unknown)}; loaded adapters: {adapter_names()}")
    calls = AdapterCalls(allowed)
    declared = calls.declared()
    user = resolve_adapter_options(given, declared, adapter_names(), stacklevel=2)
    # each adapter sees its own options: rank, init_std, its declared defaults and the user's values
    options = {
        adapter: _TrackedOptions({"rank": rank, "init_std": init_std,
                                  **{k: o.default for k, o in declared[adapter].items()}, **user.get(adapter, {})})
        for adapter in calls.adapters
    }
    notes: list[str] = []
    if example_inputs is not None:
        call = normalize_example_inputs(example_inputs)
        try:
            notes = calls.observe(model, call, options)
        except AdapterFailure as failure:
            raise AdapterError(
                f"relax() could not observe the model on example_inputs (adapter {failure.adapter!r}): "
                f"{type(failure.exc).__name__}: {failure.exc}. The model was not changed."
            ) from failure.exc

    # every place a module object is used (a module used twice has tied weights: relax all uses or none)
    uses: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        uses.setdefault(id(module), []).append(name)
    targets: list[tuple[list[str], nn.Module, str, RelaxationTerm]] = []
    target_of: dict[int, int] = {}

    def visit(name: str, module: nn.Module) -> None:
        if _matches(name, exclude):
            return
        wanted = include is None or _matches(name, include)
        if wanted and id(module) in target_of:  # another use of a layer already chosen
            targets[target_of[id(module)]][0].append(name)
            return
        if wanted:
            try:
                found = calls.make_term(module, name, model, options)
            except AdapterFailure as failure:
                raise AdapterError(
                    f"relax() failed on layer {name or '<root>'!r} ({type(module).__name__}) in adapter "
                    f"{failure.adapter!r}: {type(failure.exc).__name__}: {failure.exc}. The model was not changed."
                ) from failure.exc
            if found is not None:
                adapter, term = found
                _check_term(term, module, name, adapter, [t for _, _, _, t in targets])
                if isinstance(term, LinearRelaxation):
                    term.penalty_samples = penalty_samples
                placement = _module_placement(module, name)
                if placement is not None:
                    term = term.to(dtype=placement[0], device=placement[1])
                target_of[id(module)] = len(targets)
                targets.append(([name], module, adapter, term))
                return
        for child_name, child in module._modules.items():  # not named_children(): it skips repeated uses
            if child is not None:
                visit(f"{name}.{child_name}" if name else child_name, child)

    visit("", model)
    if not targets:
        raise NothingToRelaxError(
            f"no layer of {type(model).__name__} is recognised by the loaded adapters {adapter_names()}"
            + ("" if include is None else f" (include={include})")
            + "".join(f"\n  - {n}" for n in notes)
            + "\nTo help: "
            + ("" if example_inputs is not None else
               "pass example_inputs=(...) so that adapters can observe the layers at work (vector neurons "
               "are then found however their channel maps are written); ")
            + "name the layers (include=[...], adapter_options={'vn': {'vn_names': [...]}}) or declare their classes "
            "(relax_pyg.declare); see each adapter's documentation (relax_plugins.list_adapters())."
        )
    for used_at, module, _, _ in targets:
        missed = [n for n in uses[id(module)] if n not in used_at]
        if missed:
            raise ValueError(
                f"layer {used_at[0] or '<root>'!r} ({type(module).__name__}) is the same object as {missed} "
                "(tied weights), but include/exclude (or an enclosing relaxed layer) select only some of its "
                "uses: relax all of them or none. The model was not changed."
            )
    if penalty_samples is not None and not any(isinstance(t, LinearRelaxation) for *_, t in targets):
        raise ValueError("penalty_samples applies to pointwise layers (LinearRelaxation terms) and none of the "
                         "recognised layers is one. The model was not changed.")
    unread = {a: sorted(set(values) - options[a].read) for a, values in user.items() if set(values) - options[a].read}
    if unread:
        raise ValueError(
            f"adapter_options {unread} were not read by their adapter on this model (meant for layers the model "
            "does not hold). The model was not changed."
        )

    wrappers = []
    for used_at, module, adapter, term in targets:
        cls = calls.wrapper_class(module, adapter) or RelaxedModule
        if not (isinstance(cls, type) and issubclass(cls, RelaxedModule)):
            raise AdapterError(
                f"adapter {adapter!r} returned wrapper class {cls!r} for layer {used_at[0] or '<root>'!r}, "
                "not a RelaxedModule subclass. The model was not changed."
            )
        wrappers.append(cls(module, term, adapter))
    if targets[0][0] == [""]:
        return wrappers[0]
    done: list[tuple[str, nn.Module]] = []
    try:
        for (used_at, module, _, _), wrapper in zip(targets, wrappers):
            for name in used_at:
                model.set_submodule(name, wrapper)
                done.append((name, module))
    except BaseException:  # KeyboardInterrupt too: never leave a half-relaxed model
        for name, module in reversed(done):
            model.set_submodule(name, module)
        raise
    return model


class _TrackedOptions(dict):
    """The options passed to adapters; remembers which keys an adapter read."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.read: set[str] = set()

    def __getitem__(self, key: Any) -> Any:
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key: Any, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)

    def __contains__(self, key: object) -> bool:
        self.read.add(key)  # type: ignore[arg-type]
        return super().__contains__(key)


def _check_term(term: Any, module: nn.Module, name: str, adapter: str, others: list[RelaxationTerm]) -> None:
    """An adapter's term is validated before it touches the model."""
    where = f"adapter {adapter!r} on layer {name or '<root>'!r} ({type(module).__name__})"
    if not isinstance(term, RelaxationTerm):
        raise AdapterError(f"{where} returned {type(term).__name__}, not a RelaxationTerm. The model was not changed.")
    if any(term is t for t in others):
        raise AdapterError(f"{where} returned a term already used for another layer. The model was not changed.")
    own = {id(t) for t in (*module.parameters(), *module.buffers())}
    if term is module or any(id(t) in own for t in (*term.parameters(), *term.buffers())):
        raise AdapterError(f"{where} returned a term that holds the layer's own tensors. The model was not changed.")
    for pname, p in term.named_parameters():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise NonFiniteError(f"{where} returned a term whose {pname!r} is not finite. The model was not changed.")


def _require_relaxed(model: nn.Module, what: str) -> list[tuple[str, RelaxedModule]]:
    check_module(model, "model")
    found = list(relaxed_modules(model))
    if not found:
        raise NotRelaxedError(f"{what}: the model holds no relaxed layer (call relax_plugins.relax(model) first)")
    return found


def _check_theta(value: Any, name: str = "θ") -> float:
    return check_real(value, name, minimum=0.0)


def set_theta(model: nn.Module, value: float | dict[str, float]) -> None:
    """Set θ of every relaxed layer (a number), or per layer (a dict name → θ).

    θ must be a finite real number >= 0 (not a bool or a string); all values are checked before any
    layer changes.

    Example:
        >>> import torch, relax_plugins as rp
        >>> from relax_toy.layers import SO2Linear
        >>> m = rp.relax(torch.nn.Sequential(SO2Linear(1, 1)))
        >>> rp.set_theta(m, 0.5); rp.get_theta(m)
        {'0': 0.5}
    """
    layers = _require_relaxed(model, "set_theta")
    if isinstance(value, dict):
        names = {n for n, _ in layers}
        unknown = set(value) - names
        if unknown:
            raise KeyError(f"no relaxed layer named {sorted(unknown, key=repr)}; relaxed layers: {sorted(names)}")
        checked = {k: _check_theta(v, f"θ of layer {k!r}") for k, v in value.items()}
        with torch.no_grad():
            for name, layer in layers:
                if name in checked:
                    layer.theta.fill_(checked[name])
        return
    v = _check_theta(value)
    with torch.no_grad():
        for _, layer in layers:
            layer.theta.fill_(v)


def get_theta(model: nn.Module) -> dict[str, float]:
    """θ of every relaxed layer, by qualified name.

    Example:
        >>> import torch, relax_plugins as rp
        >>> from relax_toy.layers import SO2Linear
        >>> rp.get_theta(rp.relax(torch.nn.Sequential(SO2Linear(1, 1))))
        {'0': 0.0}
    """
    return {n: float(m.theta) for n, m in _require_relaxed(model, "get_theta")}


def check_penalty_args(lie: Any, norm: Any, form: Any, eps: Any) -> tuple[float, float, str, float]:
    """Validate :func:`penalty`'s settings (also used up front by the training helpers)."""
    form = check_choice(form, "form", PENALTY_FORMS)
    lie, norm = check_real(lie, "lie"), check_real(norm, "norm")
    # √ has an infinite derivative at 0 and W = 0 at the start: ε = 0 would give NaN gradients
    eps = check_real(eps, "eps", positive=form != "mean")
    return lie, norm, form, eps


def penalty(
    model: nn.Module,
    lie: float = 1e-2,
    norm: float = 1e-2,
    *,
    form: str = "sqrt",
    eps: float = 1e-12,
) -> Tensor:
    """Regulariser of the relaxation terms, from the inputs of the last forward pass.

    With per-layer sums over samples (points / nodes / pixels) LD_l (squared Lie derivative plus
    squared discrete-generator defect) and N_l (||W x||²) on n_l samples:

    * ``form="sqrt"`` (default, batch-size independent):
      lie·√(Σ_l LD_l/n_l + ε) + norm·√(Σ_l N_l/n_l + ε)
    * ``form="mean"``: lie·Σ_l LD_l/n_l + norm·Σ_l N_l/n_l (squared, no roots)
    * ``form="paper"``: lie·√(Σ_l LD_l + ε) + norm·√(Σ_l N_l + ε), the authors' code (sums, so its
      strength grows with the batch size).

    Inputs are detached: the penalty trains W only. ``lie``, ``norm`` are finite numbers >= 0; ``eps``
    must be > 0 for the root forms (√ has an infinite slope at 0, where W starts). A layer that saw
    no samples (an empty batch) contributes 0.

    Raises:
        NonFiniteError: the penalty came out NaN/inf; the message names the layer and whether its
            recorded input, its relaxation weights or the penalty computation is at fault.

    Example:
        >>> import torch, relax_plugins as rp
        >>> from relax_toy.layers import SO2Linear
        >>> m = rp.relax(torch.nn.Sequential(SO2Linear(2, 2)))
        >>> _ = m(torch.randn(8, 4))
        >>> float(rp.penalty(m).detach()) < 1e-5   # W = 0 at the start
        True
    """
    lie, norm, form, eps = check_penalty_args(lie, norm, form, eps)
    layers = _require_relaxed(model, "penalty")
    per_layer = _all_penalty_terms(layers)
    lie_total: Tensor | float = 0.0
    norm_total: Tensor | float = 0.0
    for _, t in per_layer:
        scale = 1.0 if form == "paper" else 1.0 / max(t.samples, 1)
        lie_total = lie_total + t.lie * scale
        norm_total = norm_total + t.norm * scale
    if form == "mean":
        out = lie * lie_total + norm * norm_total
    else:
        out = lie * torch.sqrt(lie_total + eps) + norm * torch.sqrt(norm_total + eps)
    out = torch.as_tensor(out)
    if not bool(torch.isfinite(out.detach()).all()):  # one check per call; diagnose only on failure
        _raise_non_finite(layers, per_layer)
    return out


def _raise_non_finite(layers: list[tuple[str, RelaxedModule]], per_layer: list[tuple[str, PenaltyTerms]]) -> None:
    by_name = dict(layers)
    for name, t in per_layer:
        values = [torch.as_tensor(v).detach() for v in (t.lie, t.norm)]
        if all(bool(torch.isfinite(v).all()) for v in values):
            continue
        layer = by_name[name]
        where = f"layer {name or '<root>'!r} ({type(layer.base).__name__}, adapter {layer.adapter!r})"
        bad_w = [n for n, p in layer.term.named_parameters() if not bool(torch.isfinite(p.detach()).all())]
        if bad_w:
            raise NonFiniteError(f"penalty of {where} is not finite: its relaxation weights {bad_w} hold NaN/inf "
                                 "(a diverged optimiser step?)")
        bad_x = [k for k, v in layer.term.recorded_state().items()
                 if isinstance(v, Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad_x:
            raise NonFiniteError(f"penalty of {where} is not finite: the input recorded in the last forward pass "
                                 "holds NaN/inf (from the model's own computation, upstream of this layer)")
        raise NonFiniteError(f"penalty of {where} came out non-finite (lie={float(values[0]):g}, "
                             f"norm={float(values[1]):g}) from finite inputs and weights: overflow in the "
                             "adapter's penalty (try float32/float64 instead of half precision)")
    raise NonFiniteError("the penalty is not finite although every layer's terms are (overflow in the sum; "
                         "lower lie/norm or use float64)")


def _check_penalty_terms(t: Any, name: str, layer: RelaxedModule) -> PenaltyTerms:
    """An adapter's penalty_terms() value, validated before it reaches the loss."""
    where = f"penalty_terms() of layer {name or '<root>'!r} (adapter {layer.adapter!r})"
    if not isinstance(t, tuple) or len(t) != 3:
        raise AdapterError(f"{where} returned {type(t).__name__}, not PenaltyTerms(lie, norm, samples)")
    lie, norm, samples = t
    for what, v in (("lie", lie), ("norm", norm)):
        if not (isinstance(v, Tensor) and v.numel() == 1 and v.is_floating_point()):
            raise AdapterError(f"{where}: {what} must be a one-element floating tensor, got {type(v).__name__}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
        raise AdapterError(f"{where}: samples must be an int >= 0, got {samples!r}")
    return t if isinstance(t, PenaltyTerms) else PenaltyTerms(lie, norm, samples)


def _all_penalty_terms(layers: list[tuple[str, RelaxedModule]]) -> list[tuple[str, PenaltyTerms]]:
    """Every layer's PenaltyTerms; layers of equal shapes on the default path are batched."""
    groups: dict[tuple, list[tuple[str, LinearRelaxation]]] = {}
    out: list[tuple[str, PenaltyTerms]] = []
    for name, layer in layers:
        term = layer.term
        recorded = term.recorded_state()
        if recorded and not any(isinstance(v, Tensor) for v in recorded.values()):
            raise RelaxError(f"penalty: layer {name or '<root>'!r} ({type(layer.base).__name__}) has not run a "
                             "forward pass yet: run the model on a batch before penalty()")
        key = term.batchable_penalty() if isinstance(term, LinearRelaxation) else None
        if key is None:
            out.append((name, _check_penalty_terms(term.penalty_terms(), name, layer)))
        else:
            groups.setdefault(key, []).append((name, term))
    for group in groups.values():
        terms = [t for _, t in group]
        out.extend(zip([n for n, _ in group], moment_penalties(terms, [t.penalty_input() for t in terms])))
    return out


def projection_report(model: nn.Module) -> dict[str, dict[str, float]]:
    """Per relaxed layer: θ, ||W||, ||W − P(W)||/||W||, ``mergeable`` (1.0 when ``project(merge=True)``
    folds θ·P(W) into the layer, from the term's ``can_merge`` declaration) and, from the last forward
    pass, θ||W x||/||f_θ(x)||, θ||(W − P(W)) x||/||f_θ(x)|| and the mean Lie/discrete defect.

    Reads the model only: its parameters, buffers, train/eval modes and the RNG are left as they were.

    Example:
        >>> import torch, relax_plugins as rp
        >>> from relax_toy.layers import SO2Linear
        >>> m = rp.relax(torch.nn.Sequential(SO2Linear(1, 1)))
        >>> _ = m(torch.randn(4, 2))
        >>> sorted(rp.projection_report(m)["0"])[:4]
        ['lie_defect', 'mergeable', 'rel_output_error', 'rel_weight_error']
    """
    layers = _require_relaxed(model, "projection_report")
    out: dict[str, dict[str, float]] = {}
    with preserved_state(model):
        for name, layer in layers:
            row = layer.term.projection_error(layer.theta)
            if not isinstance(row, dict) or not all(isinstance(k, str) for k in row):
                raise AdapterError(f"projection_error() of layer {name or '<root>'!r} (adapter {layer.adapter!r}) "
                                   f"returned {type(row).__name__}, not a dict with string keys")
            # one source for "mergeable": the term's declaration, which is what project(merge=True) does
            out[name] = {**row, "mergeable": float(bool(layer.term.can_merge))}
    return out


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Run diagnostics on ``model`` and leave it as it was: parameter and buffer values (BatchNorm
    statistics), every module's train/eval mode, the torch/NumPy/Python RNGs and what the relaxation
    terms recorded from the user's last forward pass are restored on exit, errors included.

    Example:
        >>> import torch
        >>> bn = torch.nn.BatchNorm1d(2)
        >>> with preserved_state(bn):
        ...     _ = bn(torch.randn(4, 2))
        >>> bn.running_mean.tolist()
        [0.0, 0.0]
    """
    tensors = []
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for key, t in store.items():
                if t is not None:
                    tensors.append((store, key, t, t.detach().clone()))
    modes = [(m, m.training) for m in model.modules()]
    recorded = [(t, t.recorded_state()) for t in model.modules() if isinstance(t, RelaxationTerm)]
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    py_rng = random.getstate()
    np_mod = sys.modules.get("numpy")
    np_rng = np_mod.random.get_state() if np_mod is not None else None
    try:
        yield
    finally:
        with torch.no_grad():
            for store, key, t, saved in tensors:
                store[key] = t
                if not torch.equal(t.detach(), saved):
                    t.detach().copy_(saved)
        for m, mode in modes:
            m.training = mode
        for term, state in recorded:
            term.__dict__.update(state)
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        random.setstate(py_rng)
        if np_rng is not None:
            np_mod.random.set_state(np_rng)


def project(model: nn.Module, merge: bool = False) -> nn.Module:
    """Turn a relaxed model back into the original, exactly equivariant architecture, in place.

    Every :class:`RelaxedModule` is replaced by the layer it wraps, so the result has the
    original classes and state_dict keys and no inference overhead.

    Args:
        model: a relaxed model.
        merge: if True, fold θ·P(W) (the equivariant part of the relaxation) into the base layer's
            weights where the adapter says the layer can hold it; layers that cannot are dropped
            with a warning. If False, the relaxation is dropped (the paper's projection) and the
            base weights stay bit-identical.

    Returns:
        ``model`` (or the base layer if the root itself was the relaxed layer).

    Raises:
        NotRelaxedError: ``model`` holds no relaxed layer.

    Example:
        >>> import torch, relax_plugins as rp
        >>> from relax_toy.layers import SO2Linear
        >>> m = rp.relax(torch.nn.Sequential(SO2Linear(1, 1)))
        >>> type(rp.project(m)[0]).__name__
        'SO2Linear'
    """
    merge = check_bool(merge, "merge")
    layers = _require_relaxed(model, "project")
    if merge:
        # every delta is computed (and validated) before anything is written
        deltas = [(name, layer, merge_deltas(name, layer)) for name, layer in layers]
        _apply_deltas(deltas)
        dropped = [name or "<root>" for name, _, d in deltas if d is None]
        if dropped:
            warnings.warn(
                f"project(merge=True): {len(dropped)} layer(s) cannot hold θ·P(W) and were dropped: {dropped}",
                stacklevel=2,
            )
    if layers[0][0] == "":
        return layers[0][1].base
    # every use of a wrapper (a tied layer is installed at several places)
    uses = [(n, m) for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, RelaxedModule)]
    done: list[tuple[str, RelaxedModule]] = []
    try:
        for name, layer in uses:
            model.set_submodule(name, layer.base)
            done.append((name, layer))
    except BaseException:
        for name, layer in reversed(done):
            model.set_submodule(name, layer)
        raise
    return model


def merge_deltas(name: str, layer: RelaxedModule) -> dict[str, Tensor] | None:
    """The validated delta of one relaxed layer: ``{key of layer.base.state_dict(): tensor to add}``
    (cast to that entry's dtype and device), or None when its term does not declare ``can_merge``.

    Reads the model only. Raises ``NonFiniteError`` for a non-finite θ, relaxation weight or delta
    and ``AdapterError`` for a delta that breaks the contract of
    :meth:`relax_plugins.RelaxationTerm.merge_delta`.
    """
    _check_mergeable(name, layer)
    term = layer.term
    if not term.can_merge:
        return None
    where = f"layer {name or '<root>'!r} (adapter {layer.adapter!r})"
    try:
        with torch.no_grad():
            delta = term.merge_delta(layer.base, layer.theta)
    except Exception as exc:
        raise AdapterError(f"merge_delta() failed on {where}: {exc}. The model was not changed.") from exc
    if delta is None:
        raise AdapterError(f"merge_delta() of {where} returned None although its term declares can_merge "
                           "(declare can_merge = False instead). The model was not changed.")
    if not isinstance(delta, dict):
        raise AdapterError(f"merge_delta() of {where} returned {type(delta).__name__}, not a dict "
                           "{name: tensor to add} or None. The model was not changed.")
    state = layer.base.state_dict(keep_vars=True)
    out: dict[str, Tensor] = {}
    for key, d in delta.items():
        target = state.get(key) if isinstance(key, str) else None
        if target is None:
            raise AdapterError(f"merge_delta() of {where} names {key!r}, which is not an entry of the base layer's "
                               f"state_dict ({sorted(state)}). The model was not changed.")
        if not isinstance(d, Tensor) or not target.is_floating_point() or tuple(d.shape) != tuple(target.shape):
            got = f"shape {tuple(d.shape)}" if isinstance(d, Tensor) else type(d).__name__
            raise AdapterError(f"merge_delta() of {where}: the delta of {key!r} must be a tensor of shape "
                               f"{tuple(target.shape)} for a floating entry, got {got}. The model was not changed.")
        d = d.detach().to(device=target.device, dtype=target.dtype)
        if not bool(torch.isfinite(d).all()) or not bool(torch.isfinite(target.detach() + d).all()):
            raise NonFiniteError(f"merge into {where} would make {key!r} non-finite. The model was not changed.")
        out[key] = d
    return out


def _apply_deltas(deltas: list[tuple[str, RelaxedModule, dict[str, Tensor] | None]]) -> None:
    """Add every layer's delta into its base layer in place; on any failure (an exception from an
    ``after_merge``, a non-finite result, an interrupt) restore every touched tensor bit for bit.

    Only the delta's targets are saved (cloned), and the tensor references of each base layer's
    parameter and buffer dicts (so that caches ``after_merge`` replaced are put back)."""
    saved: list[tuple[Tensor, Tensor]] = []
    stores: list[tuple[dict, dict]] = []
    modes: list[tuple[nn.Module, bool]] = []
    try:
        with torch.no_grad():
            for name, layer, delta in deltas:
                if not delta:
                    continue
                for m in layer.base.modules():
                    stores.extend((st, dict(st)) for st in (m._parameters, m._buffers))
                    modes.append((m, m.training))
                state = layer.base.state_dict(keep_vars=True)
                for key, d in delta.items():
                    target = state[key].detach()
                    saved.append((target, target.clone()))
                    target.add_(d)
                try:
                    layer.term.after_merge(layer.base)
                except Exception as exc:
                    raise AdapterError(f"after_merge() failed on layer {name or '<root>'!r} (adapter "
                                       f"{layer.adapter!r}): {exc}. The model was not changed.") from exc
                bad = [k for k, v in layer.base.state_dict().items()
                       if v.is_floating_point() and not bool(torch.isfinite(v).all())]
                if bad:
                    raise NonFiniteError(f"merge into layer {name or '<root>'!r} (adapter {layer.adapter!r}) made "
                                         f"{bad} non-finite. The model was not changed.")
    except BaseException:
        with torch.no_grad():
            for store, refs in reversed(stores):
                store.clear()
                store.update(refs)
            for target, copy in reversed(saved):
                target.copy_(copy)
        for m, mode in modes:
            m.training = mode
        raise


def _check_mergeable(name: str, layer: RelaxedModule) -> None:
    """θ and the relaxation weights must be finite before anything is folded into the base layer."""
    where = f"layer {name or '<root>'!r} (adapter {layer.adapter!r})"
    if not bool(torch.isfinite(layer.theta.detach()).all()):
        raise NonFiniteError(f"θ of {where} is {float(layer.theta):g}: cannot merge. The model was not changed.")
    bad = [n for n, p in layer.term.named_parameters() if p.is_floating_point() and not bool(torch.isfinite(p).all())]
    if bad:
        raise NonFiniteError(f"relaxation weights {bad} of {where} hold NaN/inf: cannot merge (project(merge=False) "
                             "drops them). The model was not changed.")


def projected_state_dict(model: nn.Module, merge: bool = False) -> dict[str, Tensor]:
    """The state_dict that ``project(model, merge)`` would have, without changing ``model``.

    Keys are those of the original architecture, so the result loads into a model that was never
    relaxed. Nothing is copied but what changes: with ``merge``, each entry a term's
    :meth:`~relax_plugins.RelaxationTerm.merge_delta` names is a new tensor, the model's value plus
    the delta (no module is copied or modified); every other returned tensor is the model's own (as
    with ``state_dict()``).

    Example:
        >>> import torch, relax_plugins as rp
        >>> from relax_toy.layers import SO2Linear
        >>> m = rp.relax(torch.nn.Sequential(SO2Linear(1, 1)))
        >>> list(rp.projected_state_dict(m))
        ['0.a', '0.b']
    """
    merge = check_bool(merge, "merge")
    layers = _require_relaxed(model, "projected_state_dict")
    state = model.state_dict()
    bases: dict[int, dict[str, Tensor]] = {}
    for name, layer in layers:
        base_state = layer.base.state_dict()
        delta = merge_deltas(name, layer) if merge else None
        if delta:
            with torch.no_grad():
                base_state.update({k: base_state[k] + d for k, d in delta.items()})
        bases[id(layer)] = base_state
    # every use of a wrapper (a tied layer is installed at several places)
    replaced: dict[str, dict[str, Tensor]] = {}
    for name, layer in model.named_modules(remove_duplicate=False):
        if isinstance(layer, RelaxedModule):
            prefix = f"{name}." if name else ""
            replaced[prefix] = {prefix + k: v for k, v in bases[id(layer)].items()}
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        owner = next((p for p in replaced if key.startswith(p)), None)
        if owner is None:
            out[key] = value
        elif key.startswith(owner + "base."):
            new_key = owner + key[len(owner) + len("base."):]
            out[new_key] = replaced[owner][new_key]
    return out
