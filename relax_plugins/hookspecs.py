"""Hook specifications: the reference for writing an adapter plugin.

An adapter is any Python object (usually a module) with functions marked by
:data:`relax_plugins.hookimpl`, registered through the entry-point group
``relax_plugins.adapters`` of its distribution::

    [project.entry-points."relax_plugins.adapters"]
    mylayers = "my_package.relax_adapter"

or at run time with :func:`relax_plugins.register_adapter`. First-party adapters (e3nn, escnn,
vector neurons, torch-geometric) use the same entry-point path.

Adapters should recognise layers by capability or by ``isinstance`` (MRO), never by
``type(m) in mapping``, and must not import their library at module import time: check
``sys.modules`` instead, since a model cannot hold e3nn layers if e3nn was never imported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from torch import nn

    from .term import RelaxationTerm

PROJECT_NAME = "relax_plugins"
ENTRY_POINT_GROUP = "relax_plugins.adapters"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec(firstresult=True)
def relax_make_term(
    module: nn.Module, name: str, options: dict[str, Any], root: nn.Module
) -> RelaxationTerm | None:
    """Build the relaxation term for ``module``, or return None if this adapter does not handle it.

    Called for every submodule, outermost first; once an adapter returns a term for a module, its
    children are not visited. The first adapter (in pluggy call order: last registered first,
    ``tryfirst``/``trylast`` respected) that returns a term wins; pass ``adapters=[...]`` to
    :func:`relax_plugins.relax` to restrict the choice.

    The term must not change the module, must be created on the CPU in the default dtype (the
    core moves it to the module's device and dtype) and must leave the layer's outputs unchanged
    while θ·W = 0. Raise an exception (not return None) if the module is recognised but cannot be
    relaxed: the core then aborts the whole relax() without changing the model.

    Implementations may declare any subset of the arguments, without default values (pluggy does
    not pass arguments that have defaults).

    The core validates what comes back before it touches the model: a :class:`RelaxationTerm`, with
    finite parameters, none of the layer's own tensors and not already used for another layer
    (``AdapterError``/``NonFiniteError`` otherwise); likewise ``penalty_terms()`` must return
    ``PenaltyTerms(lie, norm, samples)`` and ``merge()`` a bool. Every option key the user passes must be
    read by some adapter (through ``options[...]``, ``options.get`` or ``in``), or relax() refuses it.

    Args:
        module: a submodule of the user's model.
        name: its qualified name in the model ("" for the root).
        root: the model being relaxed, for context (``root.get_submodule(parent_name)`` gives the
            container of ``module``); never modify it here.
        options: relax() keyword options: ``rank`` (None for dense W, or the low-rank width),
            ``init_std`` (std of a random initial W, default 0), plus any adapter-specific ones
            the user passed through ``relax(model, adapter_options={...})``.

    Returns:
        A :class:`relax_plugins.RelaxationTerm` or None.
    """


@hookspec
def relax_observe(
    root: nn.Module, example_inputs: tuple[tuple, dict], options: dict[str, Any]
) -> dict[str, Any] | None:
    """Observe the model at work before any layer is visited: called once by
    ``relax(model, example_inputs=...)``, never without example inputs.

    For adapters that recognise layers by what they do rather than by class or source text (the
    ``vn`` adapter finds the Linears whose inputs carry xyz vectors by running the model on rotated
    copies of the inputs). Run the model through :func:`relax_plugins.probe.probe_forward`, which
    leaves its state exactly as it was (train/eval flags, parameters, buffers such as BatchNorm
    running statistics, random number generators); never modify the model here.

    Args:
        root: the model being relaxed.
        example_inputs: ``(args, kwargs)`` of one forward call, ``root(*args, **kwargs)``.
        options: the options of this relax() call (read only).

    Returns:
        A dict merged into the options that every ``relax_make_term`` call of this relax() call
        receives (prefix the keys with the adapter name), or None. A list under the key
        ``"probe_notes"`` is appended to, not replaced: its lines are shown when nothing is
        recognised.
    """


@hookspec(firstresult=True)
def relax_wrapper_class(module: nn.Module) -> type | None:
    """Return a subclass of :class:`relax_plugins.RelaxedModule` to wrap ``module`` with.

    Only needed when containers check the type of their children (escnn's ``SequentialModule``
    requires ``EquivariantModule``s): the subclass mixes that base class in. Return None to use
    :class:`relax_plugins.RelaxedModule` itself.
    """


@hookspec
def relax_adapter_info() -> dict[str, str] | None:
    """Describe this adapter: ``{"description": ..., "layers": "o3.Linear, o3.TensorProduct, ..."}``.

    Shown by :func:`relax_plugins.list_adapters` and ``relax-plugins list``.
    """
