"""relax-plugins adapter for MACE (mace-torch): relax the ``SymmetricContraction`` of unmodified
MACE models; the e3nn layers inside MACE (``o3.Linear``, tensor products) are the ``e3nn`` adapter's.

mace and e3nn are imported on first access, so that loading the plugin imports neither:

>>> import relax_mace
>>> relax_mace.__all__
['MaceSymmetricContractionRelaxation', 'contraction_input_irreps']
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["MaceSymmetricContractionRelaxation", "contraction_input_irreps"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module(".terms", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
