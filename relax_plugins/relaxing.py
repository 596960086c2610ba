"""relax(): find the layers adapters recognise, build and validate their terms, then wrap them."""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ._checks import check_int, check_mapping, check_module, check_patterns, check_real
from .contract import RelaxationTerm
from .errors import AdapterError, AlreadyRelaxedError, NonFiniteError, NothingToRelaxError, UnknownAdapterError
from .options import resolve_adapter_options
from .plugins import AdapterCalls, AdapterFailure, adapter_names
from .probe import normalize_example_inputs
from .projection import _reparametrized
from .relaxed import relaxed_modules
from .wrapper import RelaxedModule, _floating_tensors

__all__ = ["relax"]


def _matches(name: str, patterns: Iterable[str] | None) -> bool:
    return patterns is not None and any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _module_placement(module: nn.Module, name: str) -> tuple[torch.dtype, torch.device] | None:
    tensors = _floating_tensors(module)
    if not tensors:
        return None
    if any(t.device.type == "meta" for t in tensors):
        # the term's generators are computed constants, not loadable state: on meta they would have no
        # data, and to_empty() could not give it back
        raise ValueError(
            f"layer {name or '<root>'!r} ({type(module).__name__}) is on the meta device: materialise the model "
            "first (model.to_empty(device=...), then load its weights) and relax() it then. The model was not "
            "changed."
        )
    kinds = {(t.dtype, t.device) for t in tensors}
    if len(kinds) > 1:
        raise AdapterError(
            f"layer {name or '<root>'!r} ({type(module).__name__}) mixes dtypes/devices {sorted(map(str, kinds))}; "
            "move it to one dtype and device before relax()"
        )
    return next(iter(kinds))


#: wrappers that registered the parameters for gradient synchronisation (or sharded them) when they
#: were built: a W added inside them afterwards would train on each replica on its own
_DISTRIBUTED_WRAPPERS = ("DistributedDataParallel", "FullyShardedDataParallel", "FSDPModule")


def _check_not_distributed(model: nn.Module) -> None:
    for name, module in model.named_modules():
        kinds = {c.__name__ for c in type(module).__mro__}
        wrapper = next((k for k in _DISTRIBUTED_WRAPPERS if k in kinds), None)
        where = f"at {name!r}" if name else "as the root"
        if wrapper is not None:
            raise ValueError(
                f"the model holds a {wrapper} {where}: it registered (or sharded) its parameters when it was "
                "built, so a relaxation weight added now would not be synchronised across processes. Relax the "
                f"plain model first, then wrap it: model = rp.relax(model); model = {wrapper}(model, ...). "
                "The model was not changed."
            )
        if isinstance(module, nn.DataParallel) and len(module.device_ids or ()) > 1:
            raise ValueError(
                f"the model holds a DataParallel over {len(module.device_ids)} devices {where}: its replicas "
                "would record the inputs the penalty needs, and the model would never see them. Use "
                "DistributedDataParallel (relax first, then wrap), or relax and train on one device. "
                "The model was not changed."
            )


def relax(
    model: nn.Module,
    *,
    adapters: Iterable[str] | None = None,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    rank: int | None = None,
    init_std: float = 0.0,
    penalty_samples: int | str | None = None,
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
        include: only relax layers whose qualified name matches one of these fnmatch patterns, or
            that lie inside a module whose name matches (one pattern as a string, or a list of
            patterns); a pattern that matches no module is an error (a typo).
        exclude: skip layers whose qualified name matches one of these patterns, and everything inside
            them (string or list); a pattern that matches nothing warns.
        rank: low-rank W of this rank, an int >= 1 (None: dense W).
        init_std: std of the entries of a random initial W (dense, or B·A with a random B when ``rank``
            is given), a finite number >= 0 (0 keeps outputs unchanged).
        penalty_samples: compute the penalties of layers whose terms declare ``subsampled_penalty``
            (pointwise layers) on at most this many recorded samples each (an evenly strided subset,
            rescaled: an estimate of the full sums; see :meth:`RelaxationTerm.sample_rows`); an int >= 1.
            None keeps each term's own ``default_penalty_samples`` (all samples, except 256 fibres for
            vector-neuron layers); ``"all"``: every recorded sample in every layer (exact penalties).
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

    Whatever error ends a call leaves the model, and the random number generators that low-rank
    factors are drawn from, as they were before it.

    Returns:
        ``model`` itself (or the wrapper if the root was relaxed).

    Raises:
        AlreadyRelaxedError: ``model`` already holds relaxed layers.
        ValueError: ``model`` is (or holds) a DistributedDataParallel / FSDP wrapper, or a DataParallel
            over several devices: relax the plain model, then wrap it.
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
    # terms draw their initial factors before the last checks can fail: a failed call must leave the
    # random streams as it found them, as it leaves the model
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        # under torch.inference_mode the new W and θ would be inference tensors, which training cannot update
        with torch.inference_mode(False):
            return _relax(model, adapters, include, exclude, rank, init_std, penalty_samples, adapter_options,
                          example_inputs)
    except BaseException:
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        raise


def _relax(model: nn.Module, adapters: Any, include: Any, exclude: Any, rank: Any, init_std: Any,
           penalty_samples: Any, adapter_options: Any, example_inputs: Any) -> nn.Module:
    include, exclude = check_patterns(include, "include"), check_patterns(exclude, "exclude")
    names = check_patterns(adapters, "adapters")
    rank = check_int(rank, "rank", minimum=1, none_ok=True)
    init_std = check_real(init_std, "init_std", minimum=0.0)
    exact = isinstance(penalty_samples, str) and penalty_samples == "all"
    if isinstance(penalty_samples, str) and not exact:
        raise ValueError(f"penalty_samples must be an int >= 1, None or 'all', got {penalty_samples!r}")
    penalty_samples = None if exact else check_int(penalty_samples, "penalty_samples", minimum=1, none_ok=True)
    given = check_mapping(adapter_options, "adapter_options")
    _check_not_distributed(model)
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
            # the observation runs without gradients: a forward that differentiates (forces) fails there
            hint = ("" if "grad" not in str(failure.exc) else
                    " example_inputs run without gradients: for a model that differentiates inside its forward "
                    "(forces by autograd, e.g. MACE), pass inputs that turn it off, e.g. "
                    "example_inputs={'args': (batch,), 'kwargs': {'compute_force': False}}.")
            raise AdapterError(
                f"relax() could not observe the model on example_inputs (adapter {failure.adapter!r}, "
                "relax_observe): "
                f"{type(failure.exc).__name__}: {failure.exc}.{hint} The model was not changed."
            ) from failure.exc

    # every place a module object is used (a module used twice has tied weights: relax all uses or none)
    uses: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        uses.setdefault(id(module), []).append(name)
    targets: list[tuple[list[str], nn.Module, str, RelaxationTerm]] = []
    target_of: dict[int, int] = {}

    def visit(name: str, module: nn.Module, included: bool = False) -> None:
        if _matches(name, exclude):
            return
        # an included module brings everything inside it, as an excluded one takes it out
        wanted = include is None or included or _matches(name, include)
        if wanted and id(module) in target_of:  # another use of a layer already chosen
            targets[target_of[id(module)]][0].append(name)
            return
        if wanted:
            try:
                found = calls.make_term(module, name, model, options)
            except AdapterFailure as failure:
                raise AdapterError(
                    f"relax() failed on layer {name or '<root>'!r} ({type(module).__name__}) in adapter "
                    f"{failure.adapter!r} (relax_make_term): {type(failure.exc).__name__}: {failure.exc}. "
                    "The model was not changed."
                ) from failure.exc
            if found is not None:
                adapter, term = found
                _check_term(term, module, name, adapter, [t for _, _, _, t in targets])
                if term.can_merge and _reparametrized(module):
                    # W's delta is for the plain tensors; a parametrized one is computed from others
                    term.can_merge = False
                if term.subsampled_penalty:
                    default = None if exact else term.default_penalty_samples
                    term.penalty_samples = default if penalty_samples is None else penalty_samples
                placement = _module_placement(module, name)
                if placement is not None:
                    term = term.to(dtype=placement[0], device=placement[1])
                target_of[id(module)] = len(targets)
                targets.append(([name], module, adapter, term))
                return
        for child_name, child in module._modules.items():  # not named_children(): it skips repeated uses
            if child is not None:
                visit(f"{name}.{child_name}" if name else child_name, child, wanted and include is not None)

    visit("", model)
    # patterns checked against every module name (also those inside a layer that was taken whole)
    names = [n for names_of in uses.values() for n in names_of]
    unmatched = [p for p in (include or ()) if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched:  # most likely a typo: relaxing the rest silently would hide it
        raise ValueError(f"include patterns {unmatched} match no module of {type(model).__name__} (names are "
                         "qualified, as model.named_modules() gives them). The model was not changed.")
    unmatched = [p for p in (exclude or ()) if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched:
        warnings.warn(f"exclude patterns {unmatched} match no module of {type(model).__name__}", stacklevel=3)
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
    wide = [f"{used_at[0] or '<root>'} ({t.symmetry.dim_in} -> {t.symmetry.dim_out})" for used_at, _, _, t in targets
            if getattr(t, "rank", None) is not None and hasattr(t, "symmetry")
            and t.rank * (t.symmetry.dim_in + t.symmetry.dim_out) >= t.symmetry.dim_in * t.symmetry.dim_out]
    if wide:
        warnings.warn(f"rank={rank} gives layers {wide} at least as many relaxation parameters as a dense W "
                      "(rank·(d_in + d_out) >= d_in·d_out): a lower rank, or rank=None, is cheaper there",
                      stacklevel=3)
    if (penalty_samples is not None or exact) and not any(t.subsampled_penalty for *_, t in targets):
        raise ValueError("penalty_samples applies to layers whose terms declare subsampled_penalty (pointwise "
                         "layers: LinearRelaxation terms) and none of the recognised layers has one. The model "
                         "was not changed.")
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
    if term.subsampled_penalty:
        try:
            check_int(term.default_penalty_samples, "default_penalty_samples", minimum=1, none_ok=True)
        except (TypeError, ValueError) as exc:
            raise AdapterError(f"{where} returned a term whose {exc}. The model was not changed.") from exc
    for pname, p in term.named_parameters():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise NonFiniteError(f"{where} returned a term whose {pname!r} is not finite. The model was not changed.")
