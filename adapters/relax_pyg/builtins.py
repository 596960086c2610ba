"""Declarations of PyG's built-in equivariant layers (no user declaration needed).

* ``ViS_MP`` / ``ViS_MP_Vertex`` (ViSNet's message-passing layers), ``forward(x, vec, edge_index,
  r_ij, f_ij, d_ij) -> (dx, dvec, df_ij)``: W acts on the node scalars ``x`` (H x 0e) and vectors
  ``vec`` and adds to ``dx`` and ``dvec``; the edge features ``df_ij`` are not relaxed (W is a
  node-level map).
* ``GatedEquivariantBlock`` (ViSNet's output head), ``forward(x, v) -> (x, v)``.

ViSNet's ``vec`` has shape (N, 3, H) for lmax = 1 and (N, 8, H) for lmax = 2: H copies of 1o
(+ 2e), component-major, i.e. the e3nn irreps "Hx1o(+Hx2e)" in the ``ir_mul`` layout. The layers
themselves do not store lmax: it is read from the enclosing ``ViSNetBlock`` / ``ViSNet`` when
relax() walks the model (outermost first), or from ``adapter_options={"visnet_lmax": 1 | 2}``.
ViSNet uses dot products and spherical harmonics only (no cross products), so it is
O(3)-equivariant and the inversion is a generator of the relaxation's symmetry.
"""

from __future__ import annotations

import sys
import weakref
from typing import Any

from torch import nn

from .irreps import Field
from .spec import LayerSpec

__all__ = ["builtin_spec", "remember_context", "visnet_vec_field"]

# layer -> lmax, filled while relax() visits a ViSNet / ViSNetBlock before its children
_LMAX: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()


def visnet_vec_field(channels: int, lmax: int) -> Field:
    """The field of ViSNet's (N, (lmax+1)²−1, channels) vector features.

    Example:
        >>> visnet_vec_field(4, 2)
        Field(irreps='4x1o+4x2e', layout='ir_mul')
    """
    if lmax not in (1, 2):
        raise ValueError(f"ViSNet supports lmax 1 or 2, got {lmax}")
    return Field(f"{channels}x1o" + (f"+{channels}x2e" if lmax == 2 else ""), layout="ir_mul")


def _visnet() -> Any:
    return sys.modules.get("torch_geometric.nn.models.visnet")


def remember_context(module: nn.Module) -> None:
    """Record lmax for the ViSNet layers inside ``module`` (a ViSNet or ViSNetBlock)."""
    vis = _visnet()
    if vis is None:
        return
    if isinstance(module, vis.ViSNetBlock):
        for layer in module.vis_mp_layers:
            _LMAX[layer] = int(module.lmax)
    elif isinstance(module, vis.ViSNet):
        lmax = int(module.representation_model.lmax)
        remember_context(module.representation_model)
        for block in getattr(module.output_model, "output_network", []):
            _LMAX[block] = lmax


def _lmax(module: nn.Module, options: dict[str, Any]) -> int:
    if options.get("visnet_lmax") is not None:
        return int(options["visnet_lmax"])
    if module in _LMAX:
        return _LMAX[module]
    raise ValueError(
        f"cannot tell the lmax of this {type(module).__name__} (its vectors are (N, 3, H) for lmax 1, (N, 8, H) "
        "for lmax 2): relax the enclosing ViSNet / ViSNetBlock, or pass adapter_options={'visnet_lmax': 1 or 2}"
    )


def builtin_spec(module: nn.Module, options: dict[str, Any]) -> LayerSpec | None:
    """The :class:`LayerSpec` of a PyG built-in equivariant layer, or None."""
    vis = _visnet()
    if vis is None:
        return None
    if isinstance(module, vis.ViS_MP):
        h, lmax = int(module.hidden_channels), _lmax(module, options)
        vec = visnet_vec_field(h, lmax)
        return LayerSpec({"x": f"{h}x0e", "vec": vec}, (f"{h}x0e", vec, None), group="O(3)")
    if isinstance(module, vis.GatedEquivariantBlock):
        h_in, h_out, lmax = int(module.vec1_proj.in_features), int(module.out_channels), _lmax(module, options)
        return LayerSpec(
            {"x": f"{h_in}x0e", "v": visnet_vec_field(h_in, lmax)},
            (f"{h_out}x0e", visnet_vec_field(h_out, lmax)),
            group="O(3)",
        )
    return None
