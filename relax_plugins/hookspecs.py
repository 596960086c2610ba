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
    :func:`relax_plugins.relax` to restrict the choice (the core calls the hook through
    ``pm.subset_hook_caller``). The core calls each adapter's implementation through the plugin
    manager with that adapter's own ``options`` (see below), so hookwrappers and tracing see every
    call.

    The term must not change the module, must be created on the CPU in the default dtype (the
    core moves it to the module's device and dtype) and must leave the layer's outputs unchanged
    while θ·W = 0. Raise an exception (not return None) if the module is recognised but cannot be
    relaxed: the core then aborts the whole relax() without changing the model, naming the layer and
    this adapter.

    Implementations may declare any subset of the arguments, without default values (pluggy does
    not pass arguments that have defaults).

    The core validates what comes back before it touches the model: a :class:`RelaxationTerm`, with
    finite parameters, none of the layer's own tensors and not already used for another layer
    (``AdapterError``/``NonFiniteError`` otherwise); likewise ``penalty_terms()`` must return
    ``PenaltyTerms(lie, norm, samples)``, and a term that declares ``can_merge = True`` must return
    from ``merge_delta(base, theta)`` a dict ``{key of base.state_dict(): tensor to add}`` of the
    right shapes (the core adds it; the term never writes into ``base``). What a term can do
    (``can_merge``, ``batched_penalty``, ``subsampled_penalty``) is declared on its class, never
    inferred from which methods it overrides. Every option the user passes to this
    adapter must be read by it on this model (through ``options[...]``, ``options.get`` or ``in``),
    or relax() refuses it (a misspelt key, or one meant for layers the model does not hold).

    Args:
        module: a submodule of the user's model.
        name: its qualified name in the model ("" for the root).
        root: the model being relaxed, for context (``root.get_submodule(parent_name)`` gives the
            container of ``module``); never modify it here. Prefer reading context from ``root``
            to keeping state between calls: nothing may outlive the relax() call.
        options: this adapter's options for this relax() call: ``rank`` (None for dense W, or the
            low-rank width), ``init_std`` (std of a random initial W, default 0), every option the
            adapter declares in :func:`relax_adapter_options` (the user's value, validated, or the
            declared default), and what this adapter's :func:`relax_observe` returned. The user
            passes them as ``relax(model, adapter_options={"<adapter name>": {key: value}})``.

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
    running statistics, random number generators); never modify the model here. The core also runs
    each adapter's call inside :func:`relax_plugins.probe.kept_state`, so parameters,
    buffers, train/eval modes and the torch, ``random`` and NumPy RNGs are restored whatever the
    implementation does (``probe_forward`` still gives the eval mode and no-gradient probe).

    Called through the plugin manager once per adapter (each with its own ``options``), restricted
    to ``adapters=[...]`` when the user passes it; an exception aborts relax() (``AdapterError``
    naming this adapter) without changing the model.

    Args:
        root: the model being relaxed.
        example_inputs: ``(args, kwargs)`` of one forward call, ``root(*args, **kwargs)``.
        options: this adapter's options of this relax() call (read only; as for ``relax_make_term``).

    Returns:
        A dict merged into the options that this adapter's ``relax_make_term`` calls of this
        relax() call receive (this is how per-call state reaches them: never keep it in the
        adapter module), or None. A list or tuple of strings under the key ``"probe_notes"`` is
        collected for the error message shown when nothing is recognised (anything else there, a
        bare string included, is an ``AdapterError`` naming this adapter).
    """


@hookspec(firstresult=True)
def relax_wrapper_class(module: nn.Module) -> type | None:
    """Return a subclass of :class:`relax_plugins.RelaxedModule` to wrap ``module`` with.

    Only needed when containers check the type of their children (escnn's ``SequentialModule``
    requires ``EquivariantModule``s): the subclass mixes that base class in. Return None to use
    :class:`relax_plugins.RelaxedModule` itself. Asked only of the adapter whose term was chosen
    for ``module`` (``pm.subset_hook_caller`` without the other plugins). An exception aborts
    relax() (``AdapterError`` naming this adapter and the hook, chained from it) before any layer is
    replaced.
    """


@hookspec
def relax_adapter_info() -> dict[str, str] | None:
    """Describe this adapter: ``{"description": ..., "layers": "o3.Linear, o3.TensorProduct, ..."}``.

    Shown by :func:`relax_plugins.list_adapters` and ``relax-plugins list``. An exception, or
    anything but a dict of strings, makes ``list_adapters()`` raise ``PluginLoadError`` naming this
    adapter (and the hook), as an adapter that fails to import does.
    """


@hookspec
def relax_adapter_options() -> dict[str, Any] | None:
    """Declare the options this adapter accepts: ``{key: AdapterOption(type, default, doc)}``.

    Users pass them per adapter, under the adapter's (entry-point) name::

        relax(model, adapter_options={"vn": {"vn_names": ["mixer"]}, "e3nn": {"subgroup": "SO(3)"}})

    The core validates them before anything is changed: an unknown adapter name, an undeclared key
    (the error names the declared ones) or a value of the wrong type (``TypeError`` naming
    ``adapter.key`` and the expected type) is refused, and ``relax_make_term``/``relax_observe``
    receive the user's values with the declared defaults filled in. An adapter that does not
    implement this hook accepts no options (``rank`` and ``init_std`` are relax() arguments and
    always present). An exception, or an invalid declaration, is a ``PluginLoadError`` naming this
    adapter (raised by relax() before anything changes, and by ``list_adapters()``).

    Each value is a :class:`relax_plugins.AdapterOption` (or a plain ``(type, default, doc)``
    tuple), where ``type`` is a type or a tuple of types checked with ``isinstance`` (``bool`` is
    not an ``int`` here, an ``int`` is a ``float``, ``None`` passes when the default is None; use
    ``object`` for anything), or a callable validator ``f(value)`` that raises ``TypeError`` or
    ``ValueError`` for a bad value. Check the values themselves (ranges, choices) in
    ``relax_make_term``: its exceptions are reported with the layer. Prefix keys with the adapter
    name (``vn_group``) unless they mean the same for every adapter (``subgroup``).

    Example::

        @hookimpl
        def relax_adapter_options():
            return {"set_size": AdapterOption(int, None, "number of set elements n (required)")}
    """
