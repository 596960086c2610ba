"""Declarations of PyG's built-in equivariant layers (no user declaration needed).

* ``ViS_MP`` / ``ViS_MP_Vertex`` (ViSNet's message-passing layers), ``forward(x, vec, edge_index,
  r_ij, f_ij, d_ij) -> (dx, dvec, df_ij)``: W acts on the node scalars ``x`` (H x 0e) and vectors
  ``vec`` and adds to ``dx`` and ``dvec``; the edge features ``df_ij`` are not relaxed (W is a
  node-level map).
* ``GatedEquivariantBlock`` (ViSNet's output head), ``forward(x, v) -> (x, v)``.

ViSNet's ``vec`` has shape (N, 3, H) for lmax = 1 and (N, 8, H) for lmax = 2: H copies of 1o
(+ 2e), component-major, i.e. the e3nn irreps "Hx1o(+Hx2e)" in the ``ir_mul`` layout. The layers
themselves do not store lmax: it is read from the enclosing ``ViSNetBlock`` / ``ViSNet`` of the
model being relaxed (looked up from the layer's qualified name, nothing is remembered between
calls), or from ``adapter_options={"pyg": {"visnet_lmax": 1 | 2}}``.
ViSNet uses dot products and spherical harmonics only (no cross products), so it is
O(3)-equivariant and the inversion is a generator of the relaxation's symmetry.
"""

from __future__ import annotations

import sys
from typing import Any

from torch import nn

from .irreps import Field
from .spec import LayerSpec

__all__ = ["builtin_spec", "enclosing_lmax", "visnet_vec_field"]


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


def enclosing_lmax(module: nn.Module, name: str, root: nn.Module | None) -> int | None:
    """lmax of the ``ViSNetBlock`` / ``ViSNet`` that holds ``module`` (at qualified name ``name`` in
    ``root``) as one of its message-passing layers or output blocks, nearest first; None if none does."""
    vis = _visnet()
    if vis is None or root is None or not name:
        return None
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        outer = root.get_submodule(".".join(parts[:i]))
        if isinstance(outer, vis.ViSNetBlock) and any(layer is module for layer in outer.vis_mp_layers):
            return int(outer.lmax)
        if isinstance(outer, vis.ViSNet) and any(
            block is module for block in getattr(outer.output_model, "output_network", [])
        ):
            return int(outer.representation_model.lmax)
    return None


def _lmax(module: nn.Module, options: dict[str, Any], name: str, root: nn.Module | None) -> int:
    given = options.get("visnet_lmax")
    lmax = enclosing_lmax(module, name, root)
    if lmax is not None:
        # the enclosing ViSNet knows: an option that contradicts it would fail only at the first forward
        if given is not None and int(given) != lmax:
            raise ValueError(
                f"adapter_options visnet_lmax={given!r} contradicts the lmax={lmax} of the ViSNet that holds "
                f"this {type(module).__name__}: leave the option out (it is read from the model)"
            )
        return lmax
    if given is not None:
        return int(given)
    raise ValueError(
        f"cannot tell the lmax of this {type(module).__name__} (its vectors are (N, 3, H) for lmax 1, (N, 8, H) "
        "for lmax 2): relax the enclosing ViSNet / ViSNetBlock, or pass "
        "adapter_options={'pyg': {'visnet_lmax': 1 or 2}}"
    )


def builtin_spec(
    module: nn.Module, options: dict[str, Any], name: str = "", root: nn.Module | None = None
) -> LayerSpec | None:
    """The :class:`LayerSpec` of a PyG built-in equivariant layer, or None (``name``/``root``: where
    the layer sits in the model being relaxed, for its lmax)."""
    vis = _visnet()
    if vis is None:
        return None
    if isinstance(module, vis.ViS_MP):
        h, lmax = int(module.hidden_channels), _lmax(module, options, name, root)
        vec = visnet_vec_field(h, lmax)
        return LayerSpec({"x": f"{h}x0e", "vec": vec}, (f"{h}x0e", vec, None), group="O(3)")
    if isinstance(module, vis.GatedEquivariantBlock):
        h_in, h_out, lmax = int(module.vec1_proj.in_features), int(module.out_channels), _lmax(
            module, options, name, root)
        return LayerSpec(
            {"x": f"{h_in}x0e", "v": visnet_vec_field(h_in, lmax)},
            (f"{h_out}x0e", visnet_vec_field(h_out, lmax)),
            group="O(3)",
        )
    return None
