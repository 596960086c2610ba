"""Copying a model's *state* without ``copy.deepcopy`` of the user's modules.

``copy.deepcopy`` walks every attribute of every module, and some libraries' objects do not
survive it: escnn's SO(3) field types hold dicts keyed by ``GroupElement``s, whose ``__hash__``
runs before the copy's state is set (``AttributeError: 'GroupElement' object has no attribute
'group'``), so an ``R3Conv`` over SO(3) cannot be deep-copied at all. :func:`module_copy` builds new
module objects instead: every parameter and buffer is copied (detached, same dtype, device and
``requires_grad``), the module tree is rebuilt with fresh containers, and everything else
(configuration such as field types, irreps, kernel sizes, hyper-parameters) is *shared* with the
original, one level deep (top-level lists, dicts and sets of a module's ``__dict__`` are copied
shallowly). Aliasing is kept: a module or tensor reachable twice is copied once.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["module_copy", "model_copy"]

_CONTAINERS = ("_parameters", "_buffers", "_modules")


def _tensor_copy(t: Tensor | None, memo: dict[int, Any]) -> Tensor | None:
    if t is None:
        return None
    if id(t) in memo:
        return memo[id(t)]
    with torch.no_grad():
        data = t.detach().clone()
    out = nn.Parameter(data, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else data
    memo[id(t)] = out
    return out


def module_copy(module: nn.Module, memo: dict[int, Any] | None = None) -> nn.Module:
    """A copy of ``module`` with its own parameters and buffers, built without ``copy.deepcopy``.

    The copy has the same classes, module tree and state_dict (values equal, storage separate),
    so training or merging into one does not change the other; non-tensor configuration objects
    are shared (see the module docstring). Tensors kept as plain attributes (not registered as
    parameters or buffers) are shared too.

    Args:
        module: any ``nn.Module``.
        memo: id → copy of what was copied already (keeps shared modules and tensors shared).

    Returns:
        The copy.

    Example:
        >>> import torch
        >>> a = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
        >>> b = module_copy(a)
        >>> type(b[1]).__name__, b[0].weight is a[0].weight, torch.equal(b[0].weight, a[0].weight)
        ('BatchNorm1d', False, True)
    """
    memo = {} if memo is None else memo
    if id(module) in memo:
        return memo[id(module)]
    if isinstance(module, torch.jit.ScriptModule):
        # TorchScript modules (e3nn 0.4's compiled codegen) keep their tree in C++-backed containers
        # that cannot be rebuilt from Python; they are made to be deep-copied, and hold no escnn objects
        new = copy.deepcopy(module)
        memo[id(module)] = new
        return new
    cls = type(module)
    new = cls.__new__(cls)
    memo[id(module)] = new
    state = {}
    for key, value in module.__dict__.items():
        if key in _CONTAINERS:
            continue
        # hook dicts, config lists: fresh top-level containers, shared contents
        if isinstance(value, (dict, list, set)):
            value = value.copy()
        state[key] = value
    new.__dict__.update(state)
    new.__dict__["_parameters"] = type(module._parameters)(
        (k, _tensor_copy(v, memo)) for k, v in module._parameters.items()
    )
    new.__dict__["_buffers"] = type(module._buffers)((k, _tensor_copy(v, memo)) for k, v in module._buffers.items())
    new.__dict__["_modules"] = type(module._modules)(
        (k, None if v is None else module_copy(v, memo)) for k, v in module._modules.items()
    )
    if isinstance(module, torch.fx.GraphModule):
        # GraphModule.__new__ gave the copy a fresh per-instance class (GraphModuleImpl) without the
        # generated forward (MACE's SymmetricContraction holds such modules): install it from the
        # shared graph, as GraphModule.__init__ and its __deepcopy__ do
        new.recompile()
    return new


def model_copy(module: nn.Module) -> nn.Module:
    """``copy.deepcopy(module)``, or its state copy (:func:`module_copy`) where it cannot be deep-copied
    (escnn's SO(3) layers; MACE with ``use_so3`` or odd-parity hidden irreps holds mace's ``EmptyParam``,
    whose ``__new__`` ``Parameter.__deepcopy__`` cannot call).

    Example:
        >>> a = nn.Linear(2, 2)
        >>> b = model_copy(a)
        >>> b is not a and torch.equal(a.weight, b.weight)
        True
    """
    try:
        return copy.deepcopy(module)
    except Exception:
        return module_copy(module)
