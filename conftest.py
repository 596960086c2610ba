"""Root pytest set-up, shared by tests/ and the doctests of relax_plugins/ and adapters/."""

from __future__ import annotations

import sys

import pytest


@pytest.fixture(autouse=True)
def _fresh_escnn_basis_cache():
    """escnn shares one basis-expansion module between all layers with the same basis (a global cache),
    so ``.double()`` or ``.to(device)`` on one model also converts the basis of every later layer.
    Tests that build float64 models would leak into the next test: start each with an empty cache."""
    mod = sys.modules.get("escnn.nn.modules.basismanager.basisexpansion_singleblock")
    if mod is not None:
        mod._stored_filters.clear()
    yield
