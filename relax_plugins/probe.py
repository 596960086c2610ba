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

__all__ = ["kept_state", "preserved_state", "probe_forward", "normalize_example_inputs"]


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
def kept_state(model: nn.Module) -> Iterator[nn.Module]:
    """Whatever runs inside, on exit ``model`` and the RNGs are exactly as before: parameter and buffer
    values, every module's train/eval flag, what relaxation terms recorded from the last forward pass
    (``recorded_state()``), the state of any ``torch.Generator`` a module holds, and the torch (CPU and
    initialised CUDA), ``random`` and NumPy RNGs. Errors included.

    Buffers are swapped for copies inside, so a forward that updates them (BatchNorm statistics in
    train mode) never touches the user's tensors, nor their autograd versions: a backward pending
    from the user's own forward still runs. Parameters are restored only where they changed.

    Example:
        >>> import torch
        >>> bn = torch.nn.BatchNorm1d(2)
        >>> with kept_state(bn):
        ...     _ = bn(torch.randn(4, 2))
        >>> bn.running_mean.tolist(), bn.training
        ([0.0, 0.0], True)
    """
    params, buffers = [], []
    for module in model.modules():
        for key, t in module._parameters.items():
            if t is not None:
                params.append((module._parameters, key, t, t.detach().clone()))
        for key, t in module._buffers.items():
            if t is not None:
                buffers.append((module._buffers, key, t, t.detach().clone()))
    modes = [(m, m.training) for m in model.modules()]
    recorded = [(m, m.recorded_state()) for m in model.modules() if callable(getattr(m, "recorded_state", None))]
    generators = [(g, g.get_state()) for m in model.modules() for g in vars(m).values()
                  if isinstance(g, torch.Generator)]
    cpu_rng = torch.random.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    py_rng = random.getstate()
    np_mod = sys.modules.get("numpy")
    np_rng = np_mod.random.get_state() if np_mod is not None else None
    for store, key, _, saved in buffers:
        store[key] = saved.clone()
    try:
        yield model
    finally:
        with torch.no_grad():
            # copied back only where changed (buffers: through another reference than the store)
            for store, key, t, saved in (*params, *buffers):
                store[key] = t
                if (t.shape, t.dtype, t.device) != (saved.shape, saved.dtype, saved.device):  # e.g. .double()
                    t.data = saved
                elif not torch.equal(t.detach(), saved):
                    t.detach().copy_(saved)
        for m, mode in modes:
            m.training = mode
        for term, state in recorded:
            term.__dict__.update(state)
        for g, state in generators:
            g.set_state(state)
        torch.random.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        random.setstate(py_rng)
        if np_rng is not None:
            np_mod.random.set_state(np_rng)


@contextmanager
def preserved_state(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no gradients inside; on exit, the model and the RNGs exactly as before
    (:func:`kept_state`).

    Example:
        >>> import torch
        >>> m = torch.nn.Sequential(torch.nn.BatchNorm1d(2), torch.nn.Dropout(0.5)).train()
        >>> with preserved_state(m):
        ...     _ = m(torch.randn(4, 2))
        ...     _ = m[0].running_mean.add_(1.0)
        >>> m.training, float(m[0].running_mean.abs().sum())
        (True, 0.0)
    """
    with kept_state(model):
        model.eval()
        with torch.no_grad():
            yield model


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
