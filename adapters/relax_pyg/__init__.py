"""relax-plugins adapter for torch-geometric.

Relaxes E(3)-equivariant message-passing layers: any layer class whose node-level inputs and
outputs are declared once with :func:`declare` (EGNN-style layers with invariant features and
positions, vector channels, ...), and PyG's ViSNet layers without any declaration. The relaxed
layer computes f(x) + θ·W·x on its declared outputs, with positions entering W relative to their
own graph, so the relaxation breaks rotation (and reflection) symmetry but not translations.

>>> import relax_pyg
>>> sorted(n for n in ("declare", "Field", "LayerSpec") if hasattr(relax_pyg, n))
['Field', 'LayerSpec', 'declare']
"""

from .graphs import fully_connected_edge_index, radius_graph_dense
from .irreps import Field, field_generators, field_parity, irrep_generators, parse_irreps, so3_basis
from .spec import LayerSpec, declare, declared_spec, undeclare
from .term import PygRelaxation, center_positions, center_rows, symmetry_for

__all__ = [
    "declare",
    "undeclare",
    "declared_spec",
    "LayerSpec",
    "Field",
    "PygRelaxation",
    "center_positions",
    "center_rows",
    "symmetry_for",
    "parse_irreps",
    "so3_basis",
    "irrep_generators",
    "field_generators",
    "field_parity",
    "fully_connected_edge_index",
    "radius_graph_dense",
]
