"""Entry point ``e3nn`` of relax-plugins: relaxes ``o3.Linear`` and every ``o3.TensorProduct``.

Layers are recognised with ``isinstance`` (so subclasses and user subclasses count), inside any
container: ``torch.nn.Sequential``, e3nn ``Gate`` blocks, PyG ``MessagePassing`` modules or custom
modules with their own forward signatures (the wrapper forwards every argument unchanged). Irreps
are read from the layers (``irreps_in``/``irreps_out``, ``irreps_in1``), never restated.

e3nn is not imported here: a model cannot hold e3nn layers unless e3nn was imported already.
"""

from __future__ import annotations

import sys
from typing import Any

from torch import nn

from relax_plugins import AdapterOption, RelaxationTerm, hookimpl

SUBGROUPS = ("SO(3)", "SO(2)", "SO(2)_x", "SO(2)_y", "SO(2)_z")


@hookimpl
def relax_make_term(
    module: nn.Module, name: str, options: dict[str, Any], root: nn.Module
) -> RelaxationTerm | None:
    """A term for ``o3.Linear`` / ``o3.TensorProduct`` layers, None for anything else.

    Adapter options (``relax(model, adapter_options={"e3nn": {...}})``, see :func:`relax_adapter_options`):
    ``e3nn_tensor_products`` (default True) — set False to relax only the ``o3.Linear`` layers;
    ``e3nn_relax_gates`` (default False) — also relax the parameter-free tensor products inside
    e3nn's nonlinearities (``e3nn.nn.Gate``, ``e3nn.nn.NormActivation``, ``o3.Norm``); ``subgroup``.

    Example:
        >>> import torch, e3nn.o3 as o3, relax_plugins as rp
        >>> model = torch.nn.Sequential(o3.Linear("2x1o", "2x1o"))
        >>> type(rp.relax(model, adapters=["e3nn"])[0].term).__name__
        'E3nnLinearRelaxation'
    """
    if sys.modules.get("e3nn") is None:
        return None
    from e3nn import o3

    is_linear = isinstance(module, o3.Linear)
    if not (is_linear or (isinstance(module, o3.TensorProduct) and options.get("e3nn_tensor_products", True))):
        return None
    if not is_linear and not options.get("e3nn_relax_gates", False) and _inside_gate(root, name):
        return None  # the weightless products of a Gate or a norm nonlinearity are not learnable layers
    if (module.irreps_in if is_linear else module.irreps_in1).dim == 0 or module.irreps_out.dim == 0:
        return None  # an empty fibre (e.g. the product of a Gate without gated irreps): W would have no entries
    kw = {"rank": options.get("rank"), "init_std": float(options.get("init_std", 0.0))}
    subgroup = options.get("subgroup")
    if subgroup is not None:
        if subgroup not in SUBGROUPS:
            raise ValueError(
                "e3nn adapter: subgroup must be 'SO(3)' (O(3) → SO(3)) or 'SO(2)_x'/'_y'/'_z' (rotations about "
                f"one axis; 'SO(2)' = z), got {subgroup!r}"
            )
        kw["subgroup"] = subgroup
    from .terms import E3nnLinearRelaxation, E3nnTensorProductRelaxation

    return (E3nnLinearRelaxation if is_linear else E3nnTensorProductRelaxation)(module, **kw)


def _inside_gate(root: nn.Module | None, name: str) -> bool:
    """Whether the layer ``name`` sits inside one of e3nn's nonlinearities (``Gate``,
    ``NormActivation``, ``o3.Norm``), whose weightless products are part of the activation."""
    e3nn_nn, e3nn_o3 = sys.modules.get("e3nn.nn"), sys.modules.get("e3nn.o3")
    if e3nn_nn is None or root is None or not name:
        return False
    kinds = tuple(k for k in (getattr(e3nn_nn, "Gate", None), getattr(e3nn_nn, "NormActivation", None),
                              getattr(e3nn_o3, "Norm", None)) if isinstance(k, type))
    parts = name.split(".")
    return any(isinstance(root.get_submodule(".".join(parts[:i])), kinds) for i in range(len(parts)))


@hookimpl
def relax_adapter_options() -> dict[str, AdapterOption]:
    """The options of ``relax(model, adapter_options={"e3nn": {...}})``.

    Example:
        >>> sorted(relax_adapter_options())
        ['e3nn_relax_gates', 'e3nn_tensor_products', 'subgroup']
    """
    return {
        "e3nn_tensor_products": AdapterOption(bool, True, "relax o3.TensorProduct layers too (False: o3.Linear only)"),
        "e3nn_relax_gates": AdapterOption(bool, False, "also relax the weightless tensor products inside "
                                         "e3nn.nn.Gate, e3nn.nn.NormActivation and o3.Norm"),
        "subgroup": AdapterOption(str, None, f"relax O(3) only down to this subgroup, one of {SUBGROUPS}"),
    }


@hookimpl
def relax_adapter_info() -> dict[str, str]:
    """Description shown by ``relax_plugins.list_adapters()``."""
    return {
        "description": "e3nn (O(3) irreps): dense W on the fibre, so(3) + inversion penalties, "
        "closed-form projection; o3.Linear merges exactly, tensor products (W on x1) are dropped",
        "layers": "o3.Linear, o3.TensorProduct and subclasses (FullyConnected, Elementwise, Full, TensorSquare, ...)",
    }
