"""relax-plugins adapter for e3nn: relax ``o3.Linear`` and ``o3.TensorProduct`` layers of
unmodified e3nn models (O(3): so(3) Lie derivative + inversion).

The e3nn-dependent helpers are imported on first access, so that loading the plugin does not
import e3nn:

>>> import relax_e3nn
>>> sorted(n for n in relax_e3nn.__all__ if n.startswith("E3nn"))
['E3nnLinearRelaxation', 'E3nnRelaxation', 'E3nnTensorProductRelaxation']
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "E3nnRelaxation",
    "E3nnLinearRelaxation",
    "E3nnTensorProductRelaxation",
    "IrrepsAction",
    "irreps_symmetry",
    "irrep_pairs",
    "project_irreps_dense",
    "equivariance_error",
    "random_o3",
    "so3_generators64",
    "D_from_matrix64",
]

_WHERE = {
    "E3nnRelaxation": "terms",
    "E3nnLinearRelaxation": "terms",
    "E3nnTensorProductRelaxation": "terms",
}


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module(f".{_WHERE.get(name, 'irreps')}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
