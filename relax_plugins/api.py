"""User-facing functions: relax, set_theta, penalty, project, projection_report."""

from __future__ import annotations

import fnmatch
import math
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from .copying import module_copy
from .errors import (
    AdapterError,
    AlreadyRelaxedError,
    NothingToRelaxError,
    NotRelaxedError,
    UnknownAdapterError,
)
from .plugins import adapter_names, find_term, observe, wrapper_class_for
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
        adapters: restrict to these adapter names (see :func:`list_adapters`).
        include: only relax layers whose qualified name matches one of these fnmatch patterns.
        exclude: skip layers whose qualified name matches one of these patterns.
        rank: low-rank W of this rank (None: dense W).
        init_std: std of a random initial dense W (0 keeps outputs unchanged).
        penalty_samples: compute pointwise layers' penalties on at most this many recorded samples
            (an evenly strided, rescaled subset: an estimate of the full sums); None uses all.
        adapter_options: extra options passed to every adapter's ``relax_make_term``.
        example_inputs: inputs of one forward call (a tensor, a tuple of positional arguments, a
            dict of keyword arguments, or ``{"args": ..., "kwargs": ...}``). Adapters that
            recognise layers by what they do observe the model on them before anything is changed
            (the ``vn`` adapter finds vector-neuron channel maps however they are written). The
            probe runs in eval mode without gradients and leaves the model's modes, parameters,
            buffers and the random number generators exactly as they were.

    Returns:
        ``model`` itself (or the wrapper if the root was relaxed).

    Raises:
        AlreadyRelaxedError: ``model`` already holds relaxed layers.
        UnknownAdapterError: a name in ``adapters`` is not loaded.
        NothingToRelaxError: no layer was recognised.
        AdapterError: an adapter failed on a layer or on the probe forward (nothing was changed).
        TypeError: ``example_inputs`` is not one of the accepted forms.

    Example:
        >>> import torch, relax_plugins as rp
        >>> from relax_toy.layers import SO2Linear
        >>> model = torch.nn.Sequential(SO2Linear(2, 2), torch.nn.Identity())
        >>> rp.relax(model) is model
        True
    """
    if any(True for _ in relaxed_modules(model)):
        raise AlreadyRelaxedError("model already holds relaxed layers; project() it first or relax a fresh copy")
    if not math.isfinite(init_std) or init_std < 0:
        raise ValueError(f"init_std must be finite and >= 0, got {init_std}")
    allowed = None
    if adapters is not None:
        allowed = set([adapters] if isinstance(adapters, str) else adapters)
        unknown = allowed - set(adapter_names())
        if unknown:
            raise UnknownAdapterError(f"unknown adapter(s) {sorted(unknown)}; loaded adapters: {adapter_names()}")
    if penalty_samples is not None and int(penalty_samples) < 1:
        raise ValueError(f"penalty_samples must be >= 1, got {penalty_samples}")
    include, exclude = (None if p is None else list(p) for p in (include, exclude))
    options = {"rank": rank, "init_std": float(init_std), **(adapter_options or {})}
    if example_inputs is not None:
        call = normalize_example_inputs(example_inputs)
        try:
            observe(model, call, options, allowed)
        except Exception as exc:
            raise AdapterError(
                f"relax() could not observe the model on example_inputs: {type(exc).__name__}: {exc}. "
                "The model was not changed."
            ) from exc

    targets: list[tuple[str, nn.Module, str, RelaxationTerm]] = []

    def visit(name: str, module: nn.Module) -> None:
        if _matches(name, exclude):
            return
        wanted = include is None or _matches(name, include)
        if wanted:
            try:
                found = find_term(module, name, options, allowed, root=model)
            except Exception as exc:
                raise AdapterError(
                    f"relax() failed on layer {name or '<root>'!r} ({type(module).__name__}): "
                    f"{type(exc).__name__}: {exc}. The model was not changed."
                ) from exc
            if found is not None:
                adapter, term = found
                if isinstance(term, LinearRelaxation):
                    term.penalty_samples = None if penalty_samples is None else int(penalty_samples)
                placement = _module_placement(module, name)
                if placement is not None:
                    term = term.to(dtype=placement[0], device=placement[1])
                targets.append((name, module, adapter, term))
                return
        for child_name, child in module.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child)

    visit("", model)
    if not targets:
        notes = options.get("probe_notes") or []
        raise NothingToRelaxError(
            f"no layer of {type(model).__name__} is recognised by the loaded adapters {adapter_names()}"
            + ("" if include is None else f" (include={include})")
            + "".join(f"\n  - {n}" for n in notes)
            + "\nTo help: "
            + ("" if example_inputs is not None else
               "pass example_inputs=(...) so that adapters can observe the layers at work (vector neurons "
               "are then found however their channel maps are written); ")
            + "name the layers (include=[...], adapter_options={'vn_names': [...]}) or declare their classes "
            "(relax_pyg.declare); see each adapter's documentation (relax_plugins.list_adapters())."
        )

    wrappers = []
    for name, module, adapter, term in targets:
        cls = wrapper_class_for(module, adapter) or RelaxedModule
        if not issubclass(cls, RelaxedModule):
            raise AdapterError(f"adapter {adapter!r} returned wrapper class {cls!r}, not a RelaxedModule subclass")
        wrappers.append((name, cls(module, term, adapter)))
    if wrappers[0][0] == "":
        return wrappers[0][1]
    done: list[tuple[str, nn.Module]] = []
    try:
        for (name, module, _, _), (_, wrapper) in zip(targets, wrappers):
            model.set_submodule(name, wrapper)
            done.append((name, module))
    except Exception:
        for name, module in reversed(done):
            model.set_submodule(name, module)
        raise
    return model


def _require_relaxed(model: nn.Module, what: str) -> list[tuple[str, RelaxedModule]]:
    found = list(relaxed_modules(model))
    if not found:
        raise NotRelaxedError(f"{what}: the model holds no relaxed layer (call relax_plugins.relax(model) first)")
    return found


def _check_theta(value: float) -> float:
    v = float(value)
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"θ must be a finite number >= 0, got {value!r}")
    return v


def set_theta(model: nn.Module, value: float | dict[str, float]) -> None:
    """Set θ of every relaxed layer (a number), or per layer (a dict name → θ).

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
            raise KeyError(f"no relaxed layer named {sorted(unknown)}; relaxed layers: {sorted(names)}")
        checked = {k: _check_theta(v) for k, v in value.items()}
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

    Inputs are detached: the penalty trains W only.

    Example:
        >>> import torch, relax_plugins as rp
        >>> from relax_toy.layers import SO2Linear
        >>> m = rp.relax(torch.nn.Sequential(SO2Linear(2, 2)))
        >>> _ = m(torch.randn(8, 4))
        >>> float(rp.penalty(m).detach()) < 1e-5   # W = 0 at the start
        True
    """
    if form not in PENALTY_FORMS:
        raise ValueError(f"form must be one of {PENALTY_FORMS}, got {form!r}")
    for v, n in ((lie, "lie"), (norm, "norm"), (eps, "eps")):
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"{n} must be finite and >= 0, got {v}")
    layers = _require_relaxed(model, "penalty")
    lie_total: Tensor | float = 0.0
    norm_total: Tensor | float = 0.0
    for t in _all_penalty_terms([layer.term for _, layer in layers]):
        scale = 1.0 if form == "paper" else 1.0 / max(t.samples, 1)
        lie_total = lie_total + t.lie * scale
        norm_total = norm_total + t.norm * scale
    if form == "mean":
        return lie * lie_total + norm * norm_total
    return lie * torch.sqrt(lie_total + eps) + norm * torch.sqrt(norm_total + eps)


def _all_penalty_terms(terms: list[RelaxationTerm]) -> list[PenaltyTerms]:
    """Every layer's PenaltyTerms; layers of equal shapes on the default path are batched."""
    groups: dict[tuple, list[LinearRelaxation]] = {}
    out: list[PenaltyTerms] = []
    for term in terms:
        key = term.batchable_penalty() if isinstance(term, LinearRelaxation) else None
        if key is None:
            out.append(term.penalty_terms())
        else:
            groups.setdefault(key, []).append(term)
    for group in groups.values():
        out.extend(moment_penalties(group, [t.penalty_input() for t in group]))
    return out


def projection_report(model: nn.Module) -> dict[str, dict[str, float]]:
    """Per relaxed layer: θ, ||W||, ||W − P(W)||/||W|| and, from the last forward pass,
    θ||W x||/||f_θ(x)||, θ||(W − P(W)) x||/||f_θ(x)|| and the mean Lie/discrete defect.

    Example:
        >>> import torch, relax_plugins as rp
        >>> from relax_toy.layers import SO2Linear
        >>> m = rp.relax(torch.nn.Sequential(SO2Linear(1, 1)))
        >>> _ = m(torch.randn(4, 2))
        >>> sorted(rp.projection_report(m)["0"])[:4]
        ['lie_defect', 'merges', 'rel_output_error', 'rel_weight_error']
    """
    return {n: m.term.projection_error(m.theta) for n, m in _require_relaxed(model, "projection_report")}


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
    layers = _require_relaxed(model, "project")
    if merge:
        dropped = []
        # merges write into base weights: keep copies so that a failure changes nothing
        saved = [{k: v.clone() for k, v in layer.base.state_dict().items()} for _, layer in layers]
        for name, layer in layers:
            try:
                ok = layer.term.merge(layer.base, layer.theta)
            except Exception as exc:
                for (_, done_layer), state in zip(layers, saved):
                    done_layer.base.load_state_dict(state)
                raise AdapterError(
                    f"merge failed on layer {name or '<root>'!r} (adapter {layer.adapter!r}): {exc}. "
                    "The model was not changed."
                ) from exc
            if not ok:
                dropped.append(name or "<root>")
        if dropped:
            warnings.warn(
                f"project(merge=True): {len(dropped)} layer(s) cannot hold θ·P(W) and were dropped: {dropped}",
                stacklevel=2,
            )
    if layers[0][0] == "":
        return layers[0][1].base
    for name, layer in layers:
        model.set_submodule(name, layer.base)
    return model


def projected_state_dict(model: nn.Module, merge: bool = False) -> dict[str, Tensor]:
    """The state_dict that ``project(model, merge)`` would have, without changing ``model``.

    Keys are those of the original architecture, so the result loads into a model that was never
    relaxed. No module is deep-copied (escnn's SO(3) layers cannot be): with ``merge``, θ·P(W) is
    merged into a state copy of each relaxed base layer (:func:`relax_plugins.copying.module_copy`:
    new parameter and buffer tensors, shared configuration); without it nothing is copied and the
    returned tensors are the model's own (as with ``state_dict()``).

    Example:
        >>> import torch, relax_plugins as rp
        >>> from relax_toy.layers import SO2Linear
        >>> m = rp.relax(torch.nn.Sequential(SO2Linear(1, 1)))
        >>> list(rp.projected_state_dict(m))
        ['0.a', '0.b']
    """
    layers = _require_relaxed(model, "projected_state_dict")
    state = model.state_dict()
    replaced: dict[str, dict[str, Tensor]] = {}
    for name, layer in layers:
        prefix = f"{name}." if name else ""
        base = layer.base
        if merge:
            base = module_copy(base)
            with torch.no_grad():
                if not layer.term.merge(base, layer.theta):
                    base = layer.base
        replaced[prefix] = {prefix + k: v for k, v in base.state_dict().items()}
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        owner = next((p for p in replaced if key.startswith(p)), None)
        if owner is None:
            out[key] = value
        elif key.startswith(owner + "base."):
            new_key = owner + key[len(owner) + len("base."):]
            out[new_key] = replaced[owner][new_key]
    return out
