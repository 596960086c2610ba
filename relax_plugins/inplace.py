"""How a relaxation reads the base layer's call: whether the layer might update its inputs in place
(then what the relaxation reads must be cloned), the name its input may be passed by, and whether
hooks wait on its ``__call__``."""

from __future__ import annotations

import inspect

from torch import nn
from torch.nn.modules import module as _module

__all__ = ["PURE_LIBRARIES", "may_modify_inputs", "first_arg_name", "has_call_hooks"]

#: top-level packages whose layers never update their inputs in place (checked by exact class module)
PURE_LIBRARIES = frozenset({"torch", "e3nn", "escnn"})


def may_modify_inputs(base: nn.Module, pure: tuple[type, ...] = ()) -> bool:
    """Whether ``base`` might update its input tensors in place (``x.add_(...)``, ``coord += ...``).

    A relaxation reads its input x *before* the base layer runs, so that W acts on x and not on what
    an in-place update left in it (the official EGNN's ``E_GCL_vel`` does ``coord += ...``). When the
    term's view of x shares memory with the argument, it must then be cloned, which this decides:
    False for the exact classes in ``pure`` and for layers defined in :data:`PURE_LIBRARIES` (torch,
    e3nn, escnn), True for everything else (user code, including subclasses of library layers, whose
    ``forward`` may do anything).

    Example:
        >>> import torch
        >>> may_modify_inputs(torch.nn.Linear(2, 2))
        False
        >>> class Mine(torch.nn.Linear):
        ...     pass
        >>> may_modify_inputs(Mine(2, 2)), may_modify_inputs(Mine(2, 2), pure=(Mine,))
        (True, False)
    """
    cls = type(base)
    if cls in pure:
        return False
    return cls.__module__.split(".", 1)[0] not in PURE_LIBRARIES


def first_arg_name(module: nn.Module, default: str = "x") -> str:
    """The name of the first argument of ``module.forward`` (after ``self``): the keyword a user may
    pass the layer's input by (e3nn's ``o3.Linear(features=...)``, escnn's ``R2Conv(input=...)``).

    Example:
        >>> first_arg_name(nn.Linear(2, 2)), first_arg_name(nn.Identity())
        ('input', 'input')
    """
    params = list(inspect.signature(type(module).forward).parameters)
    return params[1] if len(params) > 1 else default


def has_call_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` runs hooks (its own or global forward / backward hooks): a term
    that computes the layer's output itself instead of calling it must then call it, or the user's
    hooks would silently stop running.

    Example:
        >>> layer = nn.Linear(2, 2)
        >>> before = has_call_hooks(layer)
        >>> handle = layer.register_forward_hook(lambda m, args, out: None)
        >>> before, has_call_hooks(layer)
        (False, True)
        >>> handle.remove()
    """
    own = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks,
           getattr(module, "_backward_pre_hooks", None))
    # the global registries are private to torch.nn.modules.module: read defensively
    shared = (getattr(_module, name, None) for name in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks"))
    return any(bool(h) for h in (*own, *shared))
