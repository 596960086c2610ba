"""Entry point ``e3nn`` of relax-plugins: relaxes ``o3.Linear`` and every ``o3.TensorProduct``.

Layers are recognised with ``isinstance`` (so subclasses and user subclasses count), inside any
container: ``torch.nn.Sequential``, e3nn ``Gate`` blocks, PyG ``MessagePassing`` modules or custom
modules with their own forward signatures (the wrapper forwards every argument unchanged). Irreps
are read from the layers (``irreps_in``/``irreps_out``, ``irreps_in1``), never restated.

e3nn is not imported here: a model cannot hold e3nn layers unless e3nn was imported already.
"""

from __future__ import annotations

import sys
import weakref
from typing import Any

from torch import nn

from relax_plugins import RelaxationTerm, hookimpl

# Parameter-free tensor products inside e3nn ``nn.Gate`` (its gate multiplication) are part of the
# nonlinearity, not a layer: relax() visits a Gate before its children, so they are noted here.
_GATE_PARTS: weakref.WeakSet[nn.Module] = weakref.WeakSet()


@hookimpl
def relax_make_term(module: nn.Module, name: str, options: dict[str, Any]) -> RelaxationTerm | None:
    """A term for ``o3.Linear`` / ``o3.TensorProduct`` layers, None for anything else.

    Adapter options (``relax(model, adapter_options={...})``): ``e3nn_tensor_products`` (default
    True) — set False to relax only the ``o3.Linear`` layers; ``e3nn_relax_gates`` (default False)
    — also relax the parameter-free tensor product inside ``e3nn.nn.Gate``.

    Example:
        >>> import torch, e3nn.o3 as o3, relax_plugins as rp
        >>> model = torch.nn.Sequential(o3.Linear("2x1o", "2x1o"))
        >>> type(rp.relax(model, adapters=["e3nn"])[0].term).__name__
        'E3nnLinearRelaxation'
    """
    if sys.modules.get("e3nn") is None:
        return None
    from e3nn import o3

    kw = {"rank": options.get("rank"), "init_std": float(options.get("init_std", 0.0))}
    e3nn_nn = sys.modules.get("e3nn.nn")
    if e3nn_nn is not None and isinstance(module, e3nn_nn.Gate):
        _GATE_PARTS.update(m for m in module.modules() if m is not module)
        return None
    if isinstance(module, o3.Linear):
        from .terms import E3nnLinearRelaxation

        return E3nnLinearRelaxation(module, **kw)
    if isinstance(module, o3.TensorProduct) and options.get("e3nn_tensor_products", True):
        if module in _GATE_PARTS and not options.get("e3nn_relax_gates", False):
            return None
        from .terms import E3nnTensorProductRelaxation

        return E3nnTensorProductRelaxation(module, **kw)
    return None


@hookimpl
def relax_adapter_info() -> dict[str, str]:
    """Description shown by ``relax_plugins.list_adapters()``."""
    return {
        "description": "e3nn (O(3) irreps): dense W on the fibre, so(3) + inversion penalties, "
        "closed-form projection; o3.Linear merges exactly, tensor products (W on x1) are dropped",
        "layers": "o3.Linear, o3.TensorProduct and subclasses (FullyConnected, Elementwise, Full, TensorSquare, ...)",
    }
