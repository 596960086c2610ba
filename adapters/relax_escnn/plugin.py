"""Entry point ``escnn`` of relax-plugins: relaxes escnn's ``R2Conv``, ``R3Conv``,
``R2ConvTransposed``, ``R3ConvTransposed`` and ``Linear``.

escnn is not imported here: a model cannot hold escnn layers unless escnn was already imported,
so the hooks check ``sys.modules`` and import the escnn-dependent modules only then.

Adapter options (``relax(model, adapter_options={"escnn": {...}})``, see :func:`relax_adapter_options`):

* ``escnn_penalty``: ``"residual"`` (default), ``"defect"`` or ``"both"`` for convolutions
  (see :class:`relax_escnn.conv.ConvRelaxation`);
* ``escnn_activation_norm``: ``"kernel"`` (default) or ``"exact"`` for convolutions;
* ``subgroup``: keep convolutions exactly equivariant to this subgroup (an escnn subgroup id, as
  ``FieldType.restrict`` takes it: ``4`` for C8 → C4, ``(None, 4)`` for D4 → C4).
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

from torch import nn

from relax_plugins import AdapterOption, RelaxationTerm, hookimpl


def _escnn_loaded() -> bool:
    return sys.modules.get("escnn") is not None and sys.modules.get("escnn.nn") is not None


@hookimpl
def relax_make_term(module: nn.Module, options: dict[str, Any]) -> RelaxationTerm | None:
    """A term for escnn convolutions and linear layers, None for anything else."""
    if not _escnn_loaded():
        return None
    import escnn.nn as enn
    from escnn.nn.modules.conv.rd_convolution import _RdConv
    from escnn.nn.modules.conv.rd_transposed_convolution import _RdConvTransposed

    init_std = float(options.get("init_std", 0.0) or 0.0)
    if isinstance(module, (_RdConv, _RdConvTransposed)):
        from .conv import ConvRelaxation

        if options.get("rank") is not None:
            # said, not silently dropped: a user asking for a cheap low-rank W gets a full kernel here
            warnings.warn(f"relax_escnn: rank={options['rank']} is ignored for {type(module).__name__} "
                          "(a convolution's relaxation is always a full kernel K); it applies to escnn Linear "
                          "layers only", UserWarning, stacklevel=2)
        return ConvRelaxation(
            module,
            penalty=options.get("escnn_penalty", "residual"),
            activation_norm=options.get("escnn_activation_norm", "kernel"),
            init_std=init_std,
            subgroup=options.get("subgroup"),
        )
    if isinstance(module, enn.Linear):
        from .linear import EscnnLinearRelaxation

        return EscnnLinearRelaxation(module, rank=options.get("rank"), init_std=init_std)
    return None


@hookimpl
def relax_wrapper_class(module: nn.Module) -> type | None:
    """escnn layers are wrapped in an ``EquivariantModule`` subclass (``SequentialModule`` checks)."""
    if not _escnn_loaded():
        return None
    from escnn.nn import EquivariantModule

    if not isinstance(module, EquivariantModule):
        return None
    from .wrapper import relaxed_equivariant_class

    return relaxed_equivariant_class()


@hookimpl
def relax_adapter_options() -> dict[str, AdapterOption]:
    """The options of ``relax(model, adapter_options={"escnn": {...}})`` (see the module docstring)."""
    return {
        "escnn_penalty": AdapterOption(str, "residual", 'convolution penalty: "residual", "defect" or "both"'),
        "escnn_activation_norm": AdapterOption(str, "kernel", 'norm penalty of convolutions: "kernel" or "exact"'),
        "subgroup": AdapterOption(object, None, "escnn subgroup id (FieldType.restrict) kept exact: 4, (None, 4)"),
    }


@hookimpl
def relax_adapter_info() -> dict[str, str]:
    return {
        "description": "escnn steerable CNNs (finite and continuous groups on R2/R3; GeometricTensor in/out)",
        "layers": "R2Conv, R3Conv, R2ConvTransposed, R3ConvTransposed, Linear",
    }
