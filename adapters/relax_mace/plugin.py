"""Entry point ``mace`` of relax-plugins: relaxes MACE's ``SymmetricContraction``.

The layer is recognised with ``isinstance`` against ``mace.modules.symmetric_contraction``
(subclasses count) inside any container. mace is not imported here: a model cannot hold a MACE
layer unless mace was imported already.
"""

from __future__ import annotations

import sys
from typing import Any

from torch import nn

from relax_plugins import AdapterOption, RelaxationTerm, hookimpl

SUBGROUPS = ("SO(3)", "SO(2)", "SO(2)_x", "SO(2)_y", "SO(2)_z")


@hookimpl
def relax_make_term(module: nn.Module, options: dict[str, Any]) -> RelaxationTerm | None:
    """A term for ``SymmetricContraction`` layers, None for anything else.

    Adapter options (``relax(model, adapter_options={"mace": {...}})``): ``mace_symmetric_contractions``
    (default True) — set False to leave them alone; ``subgroup`` as for the e3nn adapter
    (``"SO(3)"``, ``"SO(2)_x"``/``_y``/``_z``).
    """
    sc = sys.modules.get("mace.modules.symmetric_contraction")
    if sc is None or not isinstance(module, sc.SymmetricContraction):
        return None
    if not options.get("mace_symmetric_contractions", True):
        return None
    kw: dict[str, Any] = {"rank": options.get("rank"), "init_std": float(options.get("init_std", 0.0))}
    subgroup = options.get("subgroup")
    if subgroup is not None:
        if subgroup not in SUBGROUPS:
            raise ValueError(f"mace adapter: subgroup must be one of {SUBGROUPS}, got {subgroup!r}")
        kw["subgroup"] = subgroup
    from .terms import MaceSymmetricContractionRelaxation

    return MaceSymmetricContractionRelaxation(module, **kw)


@hookimpl
def relax_adapter_options() -> dict[str, AdapterOption]:
    """The options of ``relax(model, adapter_options={"mace": {...}})``."""
    return {
        "mace_symmetric_contractions": AdapterOption(bool, True, "relax SymmetricContraction layers (False: not)"),
        "subgroup": AdapterOption(str, None, f"relax O(3) only down to this subgroup, one of {SUBGROUPS}"),
    }


@hookimpl
def relax_adapter_info() -> dict[str, str]:
    """Description shown by ``relax_plugins.list_adapters()``."""
    return {
        "description": "MACE (mace-torch): dense W from the node features (N, channels, Σ(2l+1)) to the "
        "output irreps, so(3) + inversion penalties, closed-form projection; never merged (dropped)",
        "layers": "mace.modules.symmetric_contraction.SymmetricContraction and subclasses",
    }
