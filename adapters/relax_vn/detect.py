"""Which nn.Linear layers are VN channel maps: the call sites in the parent's source, then the structure."""

from __future__ import annotations

import inspect
import re
import weakref

from torch import nn

__all__ = ["VN_LINEAR_NAMES", "vn_linear_names"]

#: attribute names of VN channel maps in public VN code (used only when the parent has no source)
VN_LINEAR_NAMES = ("map_to_feat", "map_to_dir", "map_to_src_dir", "vn_lin")


_SOURCE_CACHE: weakref.WeakKeyDictionary[type, frozenset[str] | None] = weakref.WeakKeyDictionary()


_CALL_HEAD = re.compile(r"self\s*\.\s*([A-Za-z_]\w*)\s*\(")


_ARG_TRANSPOSED = re.compile(
    r"^(?:[\w.\[\]]+\.transpose\((?:1,-1|-1,1)\)|torch\.transpose\([\w.\[\]]+,(?:1,-1|-1,1)\))$"
)


def _call_arguments(source: str) -> list[tuple[str, str]]:
    """(attribute, argument text without whitespace) for every ``self.<attr>(...)`` call."""
    out = []
    for m in _CALL_HEAD.finditer(source):
        depth, i = 1, m.end()
        while i < len(source) and depth:
            depth += {"(": 1, ")": -1}.get(source[i], 0)
            i += 1
        out.append((m.group(1), re.sub(r"\s+", "", source[m.end(): i - 1])))
    return out


def vn_linear_names(cls: type) -> frozenset[str] | None:
    """Attribute names that ``cls`` (or a base class) applies VN-style, ``self.a(x.transpose(1, -1))``.

    Returns None when no source is available (classes built with ``exec``, C extensions).

    Example:
        >>> from relax_vn.layers import VNLinearLeakyReLU
        >>> sorted(vn_linear_names(VNLinearLeakyReLU))
        ['map_to_dir', 'map_to_feat']
    """
    if cls in _SOURCE_CACHE:
        return _SOURCE_CACHE[cls]
    names: set[str] = set()
    found_source = False
    for klass in cls.__mro__:
        # mixins count (a helper method may apply the map); torch's own classes never do
        if klass is object or klass.__module__.split(".")[0] == "torch":
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        found_source = True
        names.update(a for a, arg in _call_arguments(source) if _ARG_TRANSPOSED.match(arg))
    result = frozenset(names) if found_source else None
    _SOURCE_CACHE[cls] = result
    return result


def _structural_verdict(module: nn.Linear, name: str, root: nn.Module | None) -> bool | None:
    """True/False from the parent's source, or None when there is no readable parent source."""
    if root is None or not name:
        return None
    parent_name, _, attr = name.rpartition(".")
    try:
        parent = root.get_submodule(parent_name)
    except AttributeError:
        return None
    if parent._modules.get(attr) is not module:
        return None
    applied = vn_linear_names(type(parent))
    if applied is None:
        return None
    # a bias on vector features would itself break equivariance: such a Linear is not VN
    return attr in applied and module.bias is None
