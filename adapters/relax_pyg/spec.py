"""Declarations: which inputs and outputs of a layer class are scalars, vectors or positions.

A user declares a layer class once::

    relax_pyg.declare(
        EGNNLayer,
        inputs={"h": "64x0e", "pos": "pos", "vel": "1x1o"},
        outputs=("64x0e", "pos", "1x1o"),
        batch="batch",
    )

after which ``relax_plugins.relax(model)`` relaxes every instance (and every instance of a
subclass). A class can carry the same information itself as a ``__relax_pyg__`` attribute holding a
:class:`LayerSpec`, and field specs may be callables of the layer instance when widths differ
between instances (``inputs={"h": lambda m: f"{m.hidden}x0e"}``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from .irreps import Field

__all__ = ["LayerSpec", "ResolvedSpec", "declare", "undeclare", "declared_spec", "GROUPS", "POS_CENTERS"]

GROUPS = ("O(3)", "SO(3)")
POS_CENTERS = ("batch", "edges")

FieldLike = str | Field | Callable[[nn.Module], str | Field]
MergeFn = Callable[[nn.Module, Tensor, Any], 'dict[str, Tensor]']


def _as_field(spec: FieldLike | None, module: nn.Module) -> Field | None:
    if spec is None:
        return None
    if callable(spec) and not isinstance(spec, Field):
        spec = spec(module)
    if isinstance(spec, str):
        return Field(spec)
    if isinstance(spec, Field):
        return spec
    raise TypeError(f"a field must be an irreps string, a relax_pyg.Field or a callable, got {spec!r}")


@dataclass(frozen=True)
class LayerSpec:
    """What a relaxed layer's W acts on and adds to.

    Args:
        inputs: forward-argument name → field (irreps string, :class:`Field`, or a callable of the
            layer instance). W acts on the concatenation of these fibres, in this order.
        outputs: one field if ``forward`` returns a tensor, or a sequence matching the returned
            tuple, with None for outputs that are not relaxed (edge features, ...).
        group: ``"O(3)"`` (rotations and inversion, the default) or ``"SO(3)"`` (rotations only,
            for layers with cross products or pseudo-vectors of undeclared parity).
        batch: name of the forward argument that assigns nodes to graphs (positions are centred on
            their own graph's centroid; batch None at call time means one graph).
        edge_index: name of the forward argument holding edges, used when ``pos_center="edges"``.
        pos_center: ``"batch"`` (per-graph centroid) or ``"edges"`` (mean of x_i − x_j over the
            edges into i): how positions enter W without breaking translation equivariance.
        merge: optional ``fn(layer, delta, term) -> {name: tensor}``: the change to the layer's own
            parameters (keys of ``layer.state_dict()``) that adds the dense intertwiner ``delta``
            (d_out, d_in, float64) to the layer's map; relax-plugins adds it (``fn`` only reads the
            layer). Without it ``project(merge=True)`` drops the relaxation of this layer.
        node_axes: how many leading axes index nodes. 1 (default): node-major ``[N, ...]`` tensors
            of PyG, graphs told apart by ``batch``. 2: batch-first ``[B, N, ...]`` tensors
            (egnn-pytorch style), one graph per row: W acts on each node's fibre (the axes after
            the first two), positions are centred on their own row's centroid.
        mask: batch-first only: name of the forward argument holding a ``[B, N]`` boolean node mask
            (padding False); centroids are taken over the real nodes (None at call time: all).
    """

    inputs: Mapping[str, FieldLike]
    outputs: FieldLike | Sequence[FieldLike | None]
    group: str = "O(3)"
    batch: str | None = None
    edge_index: str | None = None
    pos_center: str = "batch"
    merge: MergeFn | None = None
    node_axes: int = 1
    mask: str | None = None

    def __post_init__(self) -> None:
        if self.group not in GROUPS:
            raise ValueError(f"group must be one of {GROUPS}, got {self.group!r}")
        if self.pos_center not in POS_CENTERS:
            raise ValueError(f"pos_center must be one of {POS_CENTERS}, got {self.pos_center!r}")
        if not self.inputs:
            raise ValueError("a LayerSpec needs at least one input field")
        if self.pos_center == "edges" and self.edge_index is None:
            raise ValueError("pos_center='edges' needs the name of the edge_index argument")
        if self.node_axes not in (1, 2) or isinstance(self.node_axes, bool):
            raise ValueError(f"node_axes must be 1 ([N, ...], node-major) or 2 ([B, N, ...], batch-first), "
                             f"got {self.node_axes!r}")
        if self.node_axes == 2:
            if self.batch is not None:
                raise ValueError("batch-first layouts (node_axes=2) have one graph per row: leave batch=None")
            if self.pos_center != "batch":
                raise ValueError("batch-first layouts (node_axes=2) centre positions per row: pos_center must be "
                                 "'batch'")
        elif self.mask is not None:
            raise ValueError("mask is for batch-first layouts (node_axes=2); node-major graphs use batch")

    def resolve(self, module: nn.Module) -> ResolvedSpec:
        """Fix the fields for one layer instance and find the argument positions of ``forward``."""
        params = _forward_params(module)
        inputs = tuple((name, _argpos(params, name, module), _as_field(f, module)) for name, f in self.inputs.items())
        if any(f is None for _, _, f in inputs):
            raise ValueError("input fields cannot be None; leave the argument out instead")
        if isinstance(self.outputs, (list, tuple)):
            outputs = tuple(_as_field(f, module) for f in self.outputs)
            is_tuple = True
        else:
            outputs = (_as_field(self.outputs, module),)
            is_tuple = False
        if all(f is None for f in outputs):
            raise ValueError("at least one output field must be declared")
        has_pos = any(f.is_pos for _, _, f in inputs)
        batch = None if self.batch is None else (self.batch, _argpos(params, self.batch, module))
        edges = None if self.edge_index is None else (self.edge_index, _argpos(params, self.edge_index, module))
        if has_pos and self.pos_center == "edges" and edges is None:  # pragma: no cover - checked above
            raise ValueError("pos_center='edges' needs edge_index")
        mask = None if self.mask is None else (self.mask, _argpos(params, self.mask, module))
        return ResolvedSpec(
            inputs, outputs, is_tuple, self.group, batch, edges, self.pos_center, self.merge, self.node_axes, mask
        )


@dataclass(frozen=True)
class ResolvedSpec:
    """A :class:`LayerSpec` fixed for one layer instance (argument positions looked up once, so that
    the relaxed forward needs no ``inspect`` and stays traceable by torch.compile)."""

    inputs: tuple[tuple[str, int | None, Field], ...]
    outputs: tuple[Field | None, ...]
    is_tuple: bool
    group: str
    batch: tuple[str, int | None] | None
    edge_index: tuple[str, int | None] | None
    pos_center: str
    merge: MergeFn | None = field(default=None, compare=False)
    node_axes: int = 1
    mask: tuple[str, int | None] | None = None

    @property
    def dim_in(self) -> int:
        return sum(f.dim for _, _, f in self.inputs)

    @property
    def dim_out(self) -> int:
        return sum(f.dim for f in self.outputs if f is not None)


def _forward_params(module: nn.Module) -> list[inspect.Parameter]:
    sig = inspect.signature(type(module).forward)
    return list(sig.parameters.values())[1:]  # drop self


def _argpos(params: list[inspect.Parameter], name: str, module: nn.Module) -> int | None:
    """Positional index of argument ``name`` (None if keyword-only)."""
    for i, p in enumerate(params):
        if p.name == name:
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                return i
            if p.kind == p.KEYWORD_ONLY:
                return None
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return None
    raise ValueError(
        f"{type(module).__name__}.forward has no argument {name!r} (arguments: {[p.name for p in params]})"
    )


_REGISTRY: dict[type, LayerSpec] = {}


def declare(
    cls: type,
    inputs: Mapping[str, FieldLike],
    outputs: FieldLike | Sequence[FieldLike | None],
    *,
    group: str = "O(3)",
    batch: str | None = None,
    edge_index: str | None = None,
    pos_center: str = "batch",
    merge: MergeFn | None = None,
    node_axes: int = 1,
    mask: str | None = None,
) -> LayerSpec:
    """Declare how a layer class's inputs and outputs transform, so that relax() relaxes it.

    The declaration covers subclasses too (looked up along the MRO); declaring a class again
    replaces its declaration. See :class:`LayerSpec` for the arguments.

    Returns:
        The stored :class:`LayerSpec`.

    Example:
        >>> import torch
        >>> class Scale(torch.nn.Module):
        ...     def forward(self, vec):
        ...         return 2 * vec
        >>> spec = declare(Scale, inputs={"vec": "4x1o"}, outputs="4x1o")
        >>> declared_spec(Scale()) is spec
        True
        >>> undeclare(Scale)
    """
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise TypeError(f"declare() needs an nn.Module subclass, got {cls!r}")
    spec = LayerSpec(dict(inputs), outputs, group, batch, edge_index, pos_center, merge, node_axes, mask)
    _REGISTRY[cls] = spec
    return spec


def undeclare(cls: type) -> None:
    """Remove a class's declaration (no error if it had none)."""
    _REGISTRY.pop(cls, None)


def declared_spec(module: nn.Module) -> LayerSpec | None:
    """The declaration that applies to ``module`` (registry or ``__relax_pyg__`` attribute, nearest
    class in the MRO first), or None."""
    for klass in type(module).__mro__:
        if klass in _REGISTRY:
            return _REGISTRY[klass]
        own = klass.__dict__.get("__relax_pyg__")
        if own is not None:
            if not isinstance(own, LayerSpec):
                raise TypeError(
                    f"{klass.__name__}.__relax_pyg__ must be a relax_pyg.LayerSpec, got {type(own).__name__}"
                )
            return own
    return None
