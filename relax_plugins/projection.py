"""Projecting a relaxed model back (dropping or merging the relaxation); how far it is from equivariant."""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import Tensor, nn

from ._checks import check_bool
from .errors import AdapterError, NonFiniteError
from .probe import kept_state
from .relaxed import _require_relaxed
from .wrapper import RelaxedModule

__all__ = ["project", "projected_state_dict", "projection_report", "merge_deltas", "preserved_state"]


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


def preserved_state(model: nn.Module) -> contextlib.AbstractContextManager:
    """Run diagnostics on ``model`` and leave it as it was (:func:`relax_plugins.probe.kept_state`):
    parameter and buffer values (BatchNorm statistics, swapped for copies inside), every module's
    train/eval mode, the torch/NumPy/Python RNGs, the terms' own generators and what the relaxation
    terms recorded from the user's last forward pass are restored on exit, errors included.

    Example:
        >>> import torch
        >>> bn = torch.nn.BatchNorm1d(2)
        >>> with preserved_state(bn):
        ...     _ = bn(torch.randn(4, 2))
        >>> bn.running_mean.tolist()
        [0.0, 0.0]
    """
    return kept_state(model)


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
        owners = tensor_owners(model)
        deltas = [(name, layer, merge_deltas(name, layer, owners)) for name, layer in layers]
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


def tensor_owners(model: nn.Module) -> dict[int, list[nn.Module]]:
    """For every parameter and buffer of ``model`` (keyed by the memory it covers, so one tensor
    object and two objects over the same memory alike): the modules holding it. A tensor held by
    modules in two places is tied."""
    owners: dict[int, list[nn.Module]] = {}
    for module in model.modules():
        for t in (*module._parameters.values(), *module._buffers.values()):
            if t is None:
                continue
            holders = owners.setdefault(_storage_key(t), [])
            if not any(h is module for h in holders):
                holders.append(module)
    return owners


def _storage_key(t: Tensor) -> int:
    # two tensor objects over the same memory (nn.Parameter(a.weight.data)) are tied as well; views
    # of other regions of one buffer are not (adding to one leaves the other alone)
    try:
        ptr = t.data_ptr()
    except (RuntimeError, NotImplementedError):
        return id(t)
    return hash((ptr, tuple(t.shape), tuple(t.stride()))) if ptr else id(t)  # empty / meta: identity only


def merge_deltas(name: str, layer: RelaxedModule,
                 owners: dict[int, list[nn.Module]] | None = None) -> dict[str, Tensor] | None:
    """The validated delta of one relaxed layer: ``{key of layer.base.state_dict(): tensor to add}``
    (cast to that entry's dtype and device), or None when its term does not declare ``can_merge``,
    or when (``owners``: :func:`tensor_owners` of the model) a tensor it would change is also held by
    a module outside the layer (a weight tied between two layers): adding the delta would change
    that module too, so the layer is dropped instead, with a warning.

    Reads the model only. Raises ``NonFiniteError`` for a non-finite θ, relaxation weight or delta
    and ``AdapterError`` for a delta that breaks the contract of
    :meth:`relax_plugins.RelaxationTerm.merge_delta`.
    """
    _check_mergeable(name, layer)
    term = layer.term
    if not term.can_merge:
        return None
    if _reparametrized(layer.base):  # parametrized after relax() (relax() itself marks it unmergeable)
        warnings.warn(f"merge: layer {name or '<root>'!r} computes its weights from others (torch.nn.utils."
                      "parametrize, weight_norm, spectral_norm): θ·P(W) cannot be added there, so this layer's "
                      "relaxation is dropped, not folded", stacklevel=3)
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
    if owners is not None:
        inside = set(map(id, layer.base.modules()))
        shared = sorted(k for k in out if any(id(m) not in inside for m in owners.get(_storage_key(state[k]), ())))
        if shared:
            warnings.warn(f"merge: layer {name or '<root>'!r} shares {shared} with modules outside it (a tied weight): "
                          "adding θ·P(W) would change them too, so this layer's relaxation is dropped, not folded",
                          stacklevel=3)
            return None
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


def _reparametrized(module: nn.Module) -> bool:
    """Whether a tensor of ``module`` is computed from others on every forward (``torch.nn.utils.parametrize``,
    ``parametrizations.weight_norm``/``spectral_norm``, the old hook-based ``weight_norm``/``spectral_norm``):
    a delta cannot be added to it, so θ·P(W) cannot be merged there."""
    from torch.nn.utils import parametrize
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    return any(parametrize.is_parametrized(m) or any(isinstance(h, (WeightNorm, SpectralNorm))
                                                      for h in m._forward_pre_hooks.values())
               for m in module.modules())


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
    owners = tensor_owners(model) if merge else None
    for name, layer in layers:
        base_state = layer.base.state_dict()
        delta = merge_deltas(name, layer, owners) if merge else None
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
