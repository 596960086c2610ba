"""Root pytest set-up, shared by tests/ and the doctests of relax_plugins/ and adapters/."""

from __future__ import annotations

import importlib.util
import shutil
import sys
import tempfile
import warnings

import pytest

_ESCNN_CACHE: str | None = None


def _redirect_escnn_disk_cache(path: str) -> int:
    """Point escnn's joblib disk caches (numerical Clebsch-Gordan coefficients, restricted irreps, ...)
    at ``path``; returns how many cached functions were redirected.

    Without py3nj escnn solves the SO(3)/O(3) Clebsch-Gordan coefficients numerically from random group
    samples and caches them in its own site-packages folder, so a run would otherwise inherit whatever
    an earlier run (another seed, another package version, py3nj) left there."""
    import escnn.group  # noqa: F401  (imports every module that defines a cache)
    import joblib
    from joblib.memory import MemorizedFunc

    backend = joblib.Memory(path, verbose=0).store_backend
    count = 0
    for name, module in list(sys.modules.items()):
        if not name.startswith("escnn") or module is None:
            continue
        for value in list(vars(module).values()):
            if isinstance(value, MemorizedFunc):
                value.store_backend = backend
                backend.store_cached_func_code([value.func_id])
                value._func_code_info = None  # re-check the function's code against the new store
                value._func_code_id = None
                count += 1
    return count


def pytest_configure(config: pytest.Config) -> None:
    """Every test run builds the escnn caches it depends on itself, in a temporary folder."""
    global _ESCNN_CACHE
    if importlib.util.find_spec("escnn") is None:
        return
    _ESCNN_CACHE = tempfile.mkdtemp(prefix="relax-plugins-escnn-cache-")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _redirect_escnn_disk_cache(_ESCNN_CACHE)
    except Exception as exc:  # a joblib/escnn layout we do not know: say so, keep running
        warnings.warn(f"could not point escnn's disk cache at a fresh folder: {exc!r}", stacklevel=1)


def pytest_unconfigure(config: pytest.Config) -> None:
    if _ESCNN_CACHE is not None:
        shutil.rmtree(_ESCNN_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True)
def _seed_numpy():
    """escnn draws the group samples of its numerical Clebsch-Gordan solve from NumPy's global RNG:
    seed it per test, so that a test's escnn basis does not depend on which tests ran before it."""
    np = sys.modules.get("numpy")
    if np is not None:
        np.random.seed(0)
    yield


@pytest.fixture(autouse=True)
def _fresh_escnn_basis_cache():
    """escnn shares one basis-expansion module between all layers with the same basis (a global cache),
    so ``.double()`` or ``.to(device)`` on one model also converts the basis of every later layer.
    Tests that build float64 models would leak into the next test: start each with an empty cache."""
    mod = sys.modules.get("escnn.nn.modules.basismanager.basisexpansion_singleblock")
    if mod is not None:
        mod._stored_filters.clear()
    yield
