"""The generator interface: how a group acts on a layer's input and output features.

A :class:`Symmetry` holds, in the layer's own feature layout (a flat *fibre* vector of length ``d``
per sample / point / node), the generators of the group that the layer is equivariant to:

* ``lie_in`` / ``lie_out``: Lie-algebra generators dρ(A_k) of a continuous group, shape (k, d, d);
* ``group_in`` / ``group_out``: generators ρ(g_j) of a finite group (or the finite part of a mixed
  group, such as parity for O(3)), shape (m, d, d).

A linear map W between the fibres is an intertwiner iff ``W dρ_in(A) = dρ_out(A) W`` for every Lie
generator and ``W ρ_in(g) = ρ_out(g) W`` for every group generator (for a connected continuous part
plus the finite generators, this is exactly equivariance under the whole group).

Generators are stored as non-persistent float64 buffers: they follow the module's device, keep full
precision whatever its dtype (penalties cast them to the weights' dtype), and do not enter
checkpoints (they are derived from the layer, not learned).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "Symmetry",
    "constraint_matrix",
    "intertwiner_basis",
    "group_closure",
    "lie_defect",
    "group_defect",
    "GenericProjector",
    "OneGeneratorProjector",
    "KronGenerators",
]


class KronGenerators:
    """Generators ``factor_k ⊗ I_channels`` (fibre index ``j·channels + c``), kept as small factors.

    A :class:`Symmetry` built from these (or from any object with ``count``, ``dim``, ``dense()`` and
    ``to(device)``, such as :class:`relax_plugins.irreps.FibreGenerators`) materialises the dense
    (k, d, d) matrices only if something asks for them; adapters with structured penalties and
    projections (vector neurons, torch-geometric) never do, which saves O(d²) memory per layer on wide
    layers.

    Example:
        >>> import torch
        >>> g = KronGenerators(torch.eye(3)[None], channels=4)
        >>> g.dense().shape
        torch.Size([1, 12, 12])
    """

    def __init__(self, factors: Tensor, channels: int) -> None:
        self.factors = torch.as_tensor(factors).double()
        if self.factors.dim() == 2:
            self.factors = self.factors[None]
        self.channels = int(channels)

    @property
    def count(self) -> int:
        return self.factors.shape[0]

    @property
    def dim(self) -> int:
        return self.factors.shape[-1] * self.channels

    def dense(self) -> Tensor:
        eye = torch.eye(self.channels, dtype=torch.float64, device=self.factors.device)
        return torch.stack([torch.kron(f, eye) for f in self.factors])

    def to(self, device: torch.device) -> KronGenerators:
        self.factors = self.factors.to(device)
        return self


def _is_lazy(mats: Any) -> bool:
    """Structured generators (:class:`KronGenerators`, :class:`relax_plugins.irreps.FibreGenerators`):
    ``count``, ``dim``, ``dense()`` and ``to(device)``, materialised only on first use."""
    return all(hasattr(mats, a) for a in ("count", "dim", "dense", "to")) and not isinstance(mats, Tensor)


_GENERATORS = ("lie_in", "lie_out", "group_in", "group_out")


def _stack(mats: Tensor | list[Tensor] | None, d: int) -> Tensor:
    if mats is None:
        return torch.zeros(0, d, d, dtype=torch.float64)
    if isinstance(mats, (list, tuple)):
        if len(mats) == 0:
            return torch.zeros(0, d, d, dtype=torch.float64)
        mats = torch.stack([torch.as_tensor(m) for m in mats])
    mats = torch.as_tensor(mats)
    if mats.dim() == 2:
        mats = mats[None]
    if mats.shape[-2:] != (d, d):
        raise ValueError(f"generators must have shape (k, {d}, {d}), got {tuple(mats.shape)}")
    return mats


class Symmetry(nn.Module):
    """Group generators acting on the input and output fibres of one layer.

    Args:
        dim_in: fibre dimension of the layer input.
        dim_out: fibre dimension of the layer output.
        lie_in: Lie-algebra generators on the input, (k, dim_in, dim_in).
        lie_out: the same Lie-algebra basis on the output, (k, dim_out, dim_out).
        group_in: finite-group generators on the input, (m, dim_in, dim_in).
        group_out: the same group elements on the output, (m, dim_out, dim_out).
        name: a human-readable group name for reports ("SO(3)", "C8", ...).

    Example:
        >>> import torch
        >>> J = torch.tensor([[0., -1.], [1., 0.]])
        >>> sym = Symmetry(2, 2, lie_in=J[None], lie_out=J[None], name="SO(2)")
        >>> sym.num_lie, sym.num_group
        (1, 0)
    """

    def __init__(
        self,
        dim_in: int,
        dim_out: int,
        lie_in: Tensor | list[Tensor] | None = None,
        lie_out: Tensor | list[Tensor] | None = None,
        group_in: Tensor | list[Tensor] | None = None,
        group_out: Tensor | list[Tensor] | None = None,
        name: str = "",
    ) -> None:
        super().__init__()
        self.dim_in, self.dim_out, self.name = int(dim_in), int(dim_out), name
        self._lazy: dict[str, Any] = {}
        self._device = torch.device("cpu")
        counts = {}
        for key, mats, d in (("lie_in", lie_in, dim_in), ("lie_out", lie_out, dim_out),
                             ("group_in", group_in, dim_in), ("group_out", group_out, dim_out)):
            if _is_lazy(mats):
                if mats.dim != d:
                    raise ValueError(f"{key}: structured generators of dimension {mats.dim}, expected {d}")
                self._lazy[key], counts[key] = mats, mats.count
                continue
            dense = _stack(mats, d)
            counts[key] = dense.shape[0]
            # float64 always (see _apply); contiguous: generators built from numpy can be Fortran-ordered
            self.register_buffer(key, dense.double().contiguous(), persistent=False)
        if counts["lie_in"] != counts["lie_out"] or counts["group_in"] != counts["group_out"]:
            raise ValueError("input and output must have the same number of generators")
        if counts["lie_in"] + counts["group_in"] == 0:
            raise ValueError("a Symmetry needs at least one generator")
        self._num_lie, self._num_group = counts["lie_in"], counts["group_in"]

    def __getattr__(self, name: str) -> Any:
        lazy = self.__dict__.get("_lazy")
        if lazy and name in lazy:
            # first use of structured generators: materialise them as a (non-persistent) buffer
            self.register_buffer(name, lazy.pop(name).dense().to(self._device).contiguous(), persistent=False)
        return super().__getattr__(name)

    def stacked(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """All generators (Lie, then finite) stacked, (k + m, d, d) on input and output, in ``dtype``;
        cached, since penalties ask for them every step."""
        key = (dtype, self._device)
        cache = self.__dict__.setdefault("_stacked", {})
        if key not in cache:
            cache.clear()
            cache[key] = (
                torch.cat([self.lie_in, self.group_in]).to(dtype),
                torch.cat([self.lie_out, self.group_out]).to(dtype),
            )
        return cache[key]

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        # follow the module's device but stay float64: after model.float().double() the generators
        # must still be exact, and penalties cast them to the weights' dtype when used
        probe = fn(torch.zeros((), dtype=torch.float64, device=self._device))
        self._device = probe.device
        for name in _GENERATORS:
            if name in self._buffers:
                self._buffers[name] = self._buffers[name].to(device=probe.device)
        for lazy in self._lazy.values():
            lazy.to(probe.device)
        return self

    @property
    def num_lie(self) -> int:
        return self._num_lie

    @property
    def num_group(self) -> int:
        return self._num_group

    def extra_repr(self) -> str:
        return f"{self.name or 'group'}: {self.dim_in} -> {self.dim_out}, lie={self.num_lie}, group={self.num_group}"


# the defects and projections of a Symmetry live in their own modules (which import Symmetry from
# here, hence the import at the end); every name stays importable from this module
from .defects import group_defect, lie_defect  # noqa: E402
from .projectors import (  # noqa: E402, F401
    MAX_GENERIC_NULLSPACE,
    GenericProjector,
    OneGeneratorProjector,
    constraint_matrix,
    group_closure,
    intertwiner_basis,
)
