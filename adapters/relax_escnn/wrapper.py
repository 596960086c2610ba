"""The escnn wrapper class and strict-safe state_dict loading.

escnn containers (``SequentialModule``) assert that every child is an ``EquivariantModule``, so a
relaxed escnn layer is wrapped in ``RelaxedEquivariantModule(RelaxedModule, EquivariantModule)``,
defined here; this module imports escnn, so the plugin imports it only once escnn is loaded.

escnn layers cache their expanded filter in buffers (``filter``/``expanded_bias`` for convolutions,
``matrix``/``expanded_bias`` for ``Linear``) that ``eval()`` creates and ``train()`` deletes, so a
state_dict saved in one mode does not load strictly in the other. The wrapper ignores these
derived keys when loading and rebuilds the cache from the loaded ``weights``;
:func:`load_state_dict` does the same for any escnn model (e.g. a projected one).

This module imports escnn.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from escnn.nn import EquivariantModule
from torch import nn

from relax_plugins import RelaxedModule

__all__ = [
    "RelaxedEquivariantModule", "relaxed_equivariant_class", "load_state_dict", "make_index_buffers_contiguous",
    "CACHE_BUFFERS",
]

# buffers that escnn derives from `weights`/`bias` in eval mode
CACHE_BUFFERS = ("filter", "expanded_bias", "matrix")


def _cached_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "expand_parameters") and hasattr(m, "weights")]


def _is_cache_key(key: str, layer_names: set[str]) -> bool:
    head, _, leaf = key.rpartition(".")
    return leaf in CACHE_BUFFERS and head in layer_names


def make_index_buffers_contiguous(model: nn.Module) -> None:
    """Replace escnn's channel-index buffers by contiguous copies (same values).

    For field types whose representations are not contiguous (e.g. [regular, trivial, regular])
    escnn stores ``in_indices_*``/``out_indices_*`` as expanded views of a meshgrid, into which
    ``load_state_dict`` refuses to copy ("more than one element of the written-to tensor refers to
    a single memory location"), even for an unmodified escnn model.

    Example:
        >>> from escnn import gspaces, nn
        >>> gs = gspaces.rot2dOnR2(4)
        >>> t = nn.FieldType(gs, [gs.regular_repr, gs.trivial_repr, gs.regular_repr])
        >>> a, b = nn.R2Conv(t, t, 3), nn.R2Conv(t, t, 3)
        >>> make_index_buffers_contiguous(b)
        >>> b.load_state_dict(a.state_dict())
        <All keys matched successfully>
    """
    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None and (name.startswith("in_indices_") or name.startswith("out_indices_")):
                module._buffers[name] = buf.clone()


def _refresh(model: nn.Module) -> None:
    """Rebuild escnn's eval-mode caches from the current weights (no-op in train mode)."""
    with torch.no_grad():
        for _, layer in _cached_layers(model):
            if not layer.training:
                layer.train(True)
                layer.train(False)


def load_state_dict(model: nn.Module, state_dict: Mapping[str, Any], strict: bool = True) -> Any:
    """``model.load_state_dict`` that works across escnn's train/eval modes.

    The cached filters (``filter``, ``expanded_bias``, ``matrix``) are derived from ``weights``: they
    are dropped from ``state_dict`` and rebuilt after loading for layers in eval mode, so strict
    loading checks only the real parameters.

    Example:
        >>> import torch
        >>> from escnn import gspaces, nn
        >>> gs = gspaces.rot2dOnR2(4)
        >>> t = nn.FieldType(gs, [gs.regular_repr])
        >>> a = nn.SequentialModule(nn.R2Conv(t, t, 3)).train()
        >>> b = nn.SequentialModule(nn.R2Conv(t, t, 3)).eval()
        >>> _ = load_state_dict(b, a.state_dict())
        >>> bool(torch.equal(b[0].filter, a[0].expand_parameters()[0]))
        True
    """
    make_index_buffers_contiguous(model)
    names = {n for n, _ in _cached_layers(model)}
    sd = {k: v for k, v in state_dict.items() if not _is_cache_key(k, names)}
    result = model.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if not _is_cache_key(k, names)]
    if strict and (missing or result.unexpected_keys):
        raise RuntimeError(f"Error(s) in loading state_dict: missing keys {missing}, "
                           f"unexpected keys {result.unexpected_keys}")
    _refresh(model)
    return type(result)(missing, result.unexpected_keys)


def _ignore_cache_keys(module: nn.Module, incompatible: Any) -> None:
    """load_state_dict post-hook of the wrapper: the cache keys are derived, not state.

    The keys are those of the whole load; this wrapper's own are under the prefix its
    ``_load_from_state_dict`` was called with just before (a module named ``base`` or
    ``database`` above it must not be mistaken for the wrapper's ``base``)."""
    own = module.__dict__.pop("_load_prefix", "") + "base."
    prefix_names = {n for n, _ in _cached_layers(module.base)}
    for keys in (incompatible.missing_keys, incompatible.unexpected_keys):
        for k in list(keys):
            if k.startswith(own) and _is_cache_key(k[len(own):], prefix_names):
                keys.remove(k)
    _refresh(module.base)


class RelaxedEquivariantModule(RelaxedModule, EquivariantModule):
    """A relaxed escnn layer: GeometricTensor in, GeometricTensor out, f(x) + θ·W(x).

    An ``EquivariantModule`` (so ``SequentialModule`` accepts it) with the base layer's
    ``in_type``/``out_type``; strict state_dict loading ignores escnn's cached filters.
    """

    def __init__(self, base: nn.Module, term: nn.Module, adapter: str = "") -> None:
        RelaxedModule.__init__(self, base, term, adapter)
        # lets strict load_state_dict work on escnn layers with non-contiguous field layouts
        make_index_buffers_contiguous(base)
        self.in_type = base.in_type
        self.out_type = base.out_type
        self.register_load_state_dict_post_hook(_ignore_cache_keys)

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any) -> None:
        self.__dict__["_load_prefix"] = prefix  # read (and dropped) by _ignore_cache_keys
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def evaluate_output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        return self.base.evaluate_output_shape(input_shape)

    def export(self) -> nn.Module:
        raise RuntimeError(
            "export() of a relaxed escnn layer: call relax_plugins.project(model) first (θ must be 0 "
            "and the relaxation folded in or dropped); the projected model exports normally"
        )


def relaxed_equivariant_class() -> type:
    """The wrapper class for escnn layers (defined when escnn is loaded; one per process).

    Example:
        >>> import relax_plugins as rp
        >>> from escnn.nn import EquivariantModule
        >>> cls = relaxed_equivariant_class()
        >>> issubclass(cls, rp.RelaxedModule) and issubclass(cls, EquivariantModule)
        True
    """
    return RelaxedEquivariantModule
