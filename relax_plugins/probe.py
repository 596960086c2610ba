"""Probe forwards: run a model on example inputs without changing anything about it.

Adapters that recognise layers by observing them at work (``relax_observe``) run the model through
:func:`probe_forward` or inside :func:`preserved_state`: every module is put in eval mode (no
dropout, BatchNorm uses its running statistics), gradients are off, and on exit the train/eval flag
of every module, every parameter and buffer value (BatchNorm running statistics and counters,
caches) and the random number generators (torch CPU and initialised CUDA devices, ``random``,
``numpy``) are exactly what they were.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

__all__ = ["preserved_state", "probe_forward", "normalize_example_inputs"]


def normalize_example_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of one forward call from what a user passes as ``example_inputs``.

    Accepted: a tensor (one positional argument), a tuple or list (the positional arguments), a
    dict with string keys (keyword arguments), or both as ``{"args": (...), "kwargs": {...}}``.

    Raises:
        TypeError: anything else.

    Example:
        >>> import torch
        >>> args, kwargs = normalize_example_inputs(torch.zeros(2))
        >>> len(args), kwargs
        (1, {})
        >>> normalize_example_inputs({"args": (1,), "kwargs": {"k": 2}})
        ((1,), {'k': 2})
    """
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    if isinstance(example_inputs, dict):
        if not all(isinstance(k, str) for k in example_inputs):
            raise TypeError("example_inputs as a dict must have string keys (keyword arguments of forward)")
        if set(example_inputs) <= {"args", "kwargs"} and example_inputs:
            args, kwargs = example_inputs.get("args", ()), example_inputs.get("kwargs", {})
            if not isinstance(args, (tuple, list)) or not isinstance(kwargs, dict):
                raise TypeError("example_inputs={'args': tuple, 'kwargs': dict} expected")
            return tuple(args), dict(kwargs)
        return (), dict(example_inputs)
    raise TypeError(
        "example_inputs must be a tensor, a tuple/list of positional arguments, a dict of keyword "
        f"arguments or {{'args': ..., 'kwargs': ...}}; got {type(example_inputs).__name__}"
    )


@contextmanager
def preserved_state(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no gradients inside; on exit, the model and the RNGs exactly as before.

    Example:
        >>> import torch
        >>> m = torch.nn.Sequential(torch.nn.BatchNorm1d(2), torch.nn.Dropout(0.5)).train()
        >>> with preserved_state(m):
        ...     _ = m(torch.randn(4, 2))
        ...     _ = m[0].running_mean.add_(1.0)
        >>> m.training, float(m[0].running_mean.abs().sum())
        (True, 0.0)
    """
    modes = [(m, m.training) for m in model.modules()]
    tensors = [(t, t.detach().clone()) for t in (*model.parameters(), *model.buffers())]
    cpu_rng = torch.random.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    py_rng = random.getstate()
    np_mod = sys.modules.get("numpy")
    np_rng = np_mod.random.get_state() if np_mod is not None else None
    try:
        model.eval()
        with torch.no_grad():
            yield model
    finally:
        with torch.no_grad():
            for t, saved in tensors:
                if t.shape == saved.shape:
                    t.copy_(saved)
        for m, mode in modes:
            m.training = mode
        torch.random.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        random.setstate(py_rng)
        if np_rng is not None:
            np_mod.random.set_state(np_rng)


def probe_forward(model: nn.Module, args: tuple, kwargs: dict) -> Any:
    """``model(*args, **kwargs)`` inside :func:`preserved_state`.

    Example:
        >>> import torch
        >>> m = torch.nn.Linear(2, 1)
        >>> probe_forward(m, (torch.ones(1, 2),), {}).requires_grad
        False
    """
    with preserved_state(model):
        return model(*args, **kwargs)
