"""Entry point ``pyg`` of relax-plugins: relaxes declared layers and PyG's ViSNet layers.

The hooks keep no state: what a layer cannot tell (ViSNet's lmax) is read from the model being
relaxed (``root``) or from ``adapter_options={"pyg": {"visnet_lmax": ...}}``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from relax_plugins import AdapterOption, hookimpl

from .builtins import builtin_spec
from .spec import declared_spec
from .term import PygRelaxation


@hookimpl
def relax_make_term(module: nn.Module, name: str, options: dict[str, Any], root: nn.Module) -> PygRelaxation | None:
    spec = declared_spec(module) or builtin_spec(module, options, name, root)
    if spec is None:
        return None
    return PygRelaxation(spec.resolve(module), rank=options.get("rank"), init_std=options.get("init_std", 0.0))


@hookimpl
def relax_adapter_options() -> dict[str, AdapterOption]:
    """The options of ``relax(model, adapter_options={"pyg": {...}})``."""
    return {"visnet_lmax": AdapterOption(int, None, "lmax (1 or 2) of ViSNet layers relaxed without their ViSNet")}


@hookimpl
def relax_adapter_info() -> dict[str, str]:
    return {
        "description": "torch-geometric: E(3)-equivariant layers declared with relax_pyg.declare(), PyG ViSNet",
        "layers": "declared classes (EGNN-style, ...), ViS_MP, ViS_MP_Vertex, GatedEquivariantBlock",
    }
