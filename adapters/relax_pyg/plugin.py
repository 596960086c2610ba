"""Entry point ``pyg`` of relax-plugins: relaxes declared layers and PyG's ViSNet layers."""

from __future__ import annotations

from typing import Any

from torch import nn

from relax_plugins import hookimpl

from .builtins import builtin_spec, remember_context
from .spec import declared_spec
from .term import PygRelaxation


@hookimpl
def relax_make_term(module: nn.Module, options: dict[str, Any]) -> PygRelaxation | None:
    # containers are visited before their children: note what the children cannot tell (lmax)
    remember_context(module)
    spec = declared_spec(module) or builtin_spec(module, options)
    if spec is None:
        return None
    return PygRelaxation(spec.resolve(module), rank=options.get("rank"), init_std=options.get("init_std", 0.0))


@hookimpl
def relax_adapter_info() -> dict[str, str]:
    return {
        "description": "torch-geometric: E(3)-equivariant layers declared with relax_pyg.declare(), PyG ViSNet",
        "layers": "declared classes (EGNN-style, ...), ViS_MP, ViS_MP_Vertex, GatedEquivariantBlock",
    }
