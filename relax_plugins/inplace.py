"""Whether a layer might update its inputs in place (then a relaxation must clone what it reads)."""

from __future__ import annotations

from torch import nn

__all__ = ["PURE_LIBRARIES", "may_modify_inputs"]

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
