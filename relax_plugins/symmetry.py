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

import itertools
from collections.abc import Callable
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

# dense intertwiner bases above this many weight entries are too costly for the generic projector
MAX_GENERIC_NULLSPACE = 4096


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


def _as_apply(W: Tensor | Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    return W if callable(W) else (lambda v: v @ W.T)


def _defect(
    W: Tensor | Callable[[Tensor], Tensor], x: Tensor, g_in: Tensor, g_out: Tensor, Wx: Tensor | None
) -> Tensor:
    """Σ_k ||W g_in[k] x − g_out[k] W x||² per sample, one generator at a time (generator-major)."""
    if g_in.shape[0] == 0:
        return x.new_zeros(x.shape[0])
    apply = _as_apply(W)
    if Wx is None:
        Wx = apply(x)
    gx = torch.einsum("kij,nj->kni", g_in.to(x.dtype), x)  # (k, n, d_in)
    d = apply(gx) - torch.einsum("kij,nj->kni", g_out.to(Wx.dtype), Wx)
    return d.square().sum(dim=(0, 2))


def lie_defect(W: Tensor | Callable[[Tensor], Tensor], x: Tensor, sym: Symmetry, Wx: Tensor | None = None) -> Tensor:
    """Per-sample squared Lie derivative Σ_k ||W dρ_in(A_k) x − dρ_out(A_k) W x||².

    Computed generator-major (one generator at a time), so the null space over W is exactly the
    set of maps that commute with every generator.

    Args:
        W: (d_out, d_in) dense map, or a function applying it to the last axis.
        x: (n, d_in) detached inputs.
        sym: the layer's generators.
        Wx: optional precomputed ``x @ W.T``.

    Returns:
        (n,) tensor of squared norms.

    Example:
        >>> import torch
        >>> J = torch.tensor([[0., -1.], [1., 0.]])
        >>> sym = Symmetry(2, 2, lie_in=J[None], lie_out=J[None])
        >>> lie_defect(torch.eye(2), torch.randn(5, 2), sym).abs().max().item()
        0.0
    """
    return _defect(W, x, sym.lie_in, sym.lie_out, Wx)


def group_defect(W: Tensor | Callable[[Tensor], Tensor], x: Tensor, sym: Symmetry, Wx: Tensor | None = None) -> Tensor:
    """Per-sample squared discrete defect Σ_j ||W ρ_in(g_j) x − ρ_out(g_j) W x||².

    Example:
        >>> import torch
        >>> P = torch.tensor([[0., 1.], [1., 0.]])
        >>> sym = Symmetry(2, 2, group_in=P[None], group_out=P[None])
        >>> group_defect(torch.ones(2, 2), torch.randn(3, 2), sym).abs().max().item()
        0.0
    """
    return _defect(W, x, sym.group_in, sym.group_out, Wx)


def constraint_matrix(sym: Symmetry) -> Tensor:
    """Dense matrix C with C·vec(W) = 0 iff W is an intertwiner (vec is row-major, W.flatten()).

    Its size is (num_generators·d_out·d_in) × (d_out·d_in): use it for small layers and tests.
    """
    di, do = sym.dim_in, sym.dim_out
    Ii = torch.eye(di, dtype=torch.float64, device=sym.lie_in.device)
    Io = torch.eye(do, dtype=torch.float64, device=sym.lie_in.device)
    blocks = []
    # row-major vec: vec(A W B) = (A ⊗ Bᵀ) vec(W)
    for Ain, Aout in itertools.chain(zip(sym.lie_in, sym.lie_out), zip(sym.group_in, sym.group_out)):
        blocks.append(torch.kron(Io, Ain.double().T.contiguous()) - torch.kron(Aout.double(), Ii))
    return torch.cat(blocks, dim=0)


def intertwiner_basis(sym: Symmetry, tol: float = 1e-8) -> Tensor:
    """Orthonormal basis (columns) of the intertwiner space, as row-major vec(W), in float64.

    A dense SVD: fine up to d_in·d_out of a few thousand. Adapters with structure (e3nn paths,
    escnn bases) provide closed forms instead.

    Example:
        >>> import torch
        >>> J = torch.tensor([[0., -1.], [1., 0.]])
        >>> intertwiner_basis(Symmetry(2, 2, lie_in=J[None], lie_out=J[None])).shape  # aI + bJ
        torch.Size([4, 2])
    """
    C = constraint_matrix(sym)
    # eigh of the Gram matrix is much cheaper than an SVD of the tall constraint matrix
    evals, evecs = torch.linalg.eigh(C.T @ C)
    scale = max(float(evals.max()), 1.0)
    return evecs[:, evals < tol * scale].contiguous()


def group_closure(gens: Tensor, max_order: int = 10_000, tol: float = 1e-6) -> Tensor:
    """All elements of the finite matrix group generated by ``gens`` (including the identity).

    Example:
        >>> import torch
        >>> R = torch.tensor([[0., -1.], [1., 0.]])
        >>> group_closure(R[None]).shape[0]
        4
    """
    d = gens.shape[-1]
    elems = [torch.eye(d, dtype=gens.dtype, device=gens.device)]
    frontier = list(elems)
    while frontier:
        new = []
        for a in frontier:
            for g in gens:
                b = g @ a
                if not any(torch.allclose(b, e, atol=tol) for e in elems):
                    elems.append(b)
                    new.append(b)
                    if len(elems) > max_order:
                        raise ValueError(f"group generated has more than {max_order} elements")
        frontier = new
    return torch.stack(elems)


class GenericProjector(nn.Module):
    """P(W) onto the intertwiners of a :class:`Symmetry`, linear and differentiable in W.

    Finite groups (no Lie generators): the Reynolds average (1/|G|) Σ_g ρ_out(g)⁻¹ W ρ_in(g) over
    the group closed from the generators (an orthogonal projection for orthogonal representations).
    Otherwise: the orthogonal projection onto the null space of the generator constraints, for layers
    of at most ``MAX_GENERIC_NULLSPACE`` weight entries. Adapters with structure (e3nn paths, escnn
    bases) use closed forms instead. Computed in float64, cached once per device.

    Example:
        >>> import torch
        >>> J = torch.tensor([[0., -1.], [1., 0.]])
        >>> P = GenericProjector(Symmetry(2, 2, lie_in=J[None], lie_out=J[None]))
        >>> W = P(torch.randn(2, 2, dtype=torch.float64))
        >>> bool(torch.allclose(P(W), W))
        True
    """

    def __init__(self, symmetry: Symmetry) -> None:
        super().__init__()
        self.symmetry = symmetry
        self._cache: dict[torch.device, tuple[str, Tensor, Tensor | None]] = {}

    def _prepare(self, device: torch.device) -> tuple[str, Tensor, Tensor | None]:
        if device in self._cache:
            return self._cache[device]
        sym = self.symmetry
        if sym.num_lie == 0:
            # close the group on ρ_in ⊕ ρ_out so that input and output elements stay paired
            di = sym.dim_in
            gens = torch.stack([torch.block_diag(i, o) for i, o in zip(sym.group_in.double(), sym.group_out.double())])
            elems = group_closure(gens.cpu()).to(device)
            entry = ("reynolds", elems[:, :di, :di].contiguous(), torch.linalg.inv(elems[:, di:, di:]))
        else:
            if sym.dim_in * sym.dim_out > MAX_GENERIC_NULLSPACE:
                raise NotImplementedError(
                    f"no closed-form projection for a {sym.dim_out}x{sym.dim_in} layer with Lie generators; "
                    "the adapter must provide one (override project_dense)"
                )
            entry = ("basis", intertwiner_basis(sym).to(device), None)
        self._cache[device] = entry
        return entry

    def forward(self, W: Tensor) -> Tensor:
        kind, a, b = self._prepare(W.device)
        Wd = W.double()
        if kind == "reynolds":
            out = (b @ Wd @ a).mean(0)
        else:
            out = (a @ (a.T @ Wd.reshape(-1))).reshape(W.shape)
        return out.to(W.dtype)


class OneGeneratorProjector(nn.Module):
    """P(W) onto the maps commuting with one Lie generator (a one-parameter group such as SO(2) about
    an axis), for fibres of any size: with the spectral projectors Π_λ of the Hermitian i·A,
    P(W) = Σ_λ Π_λ^out W Π_λ^in (a pinching: the orthogonal projection onto the commutant).
    Linear and differentiable in W; the eigendecompositions are computed once, in float64.

    Args:
        A_in: (d_in, d_in) real antisymmetric generator on the input.
        A_out: (d_out, d_out) the same Lie-algebra element on the output.
        tol: eigenvalues closer than this are one eigenspace.

    Example:
        >>> import torch
        >>> J = torch.tensor([[0., -1.], [1., 0.]], dtype=torch.float64)
        >>> P = OneGeneratorProjector(J, J)
        >>> W = P(torch.randn(2, 2, dtype=torch.float64))
        >>> bool(torch.allclose(W @ J, J @ W))
        True
    """

    def __init__(self, A_in: Tensor, A_out: Tensor, tol: float = 1e-6) -> None:
        super().__init__()
        pairs = []
        ev_in, V_in = torch.linalg.eigh(1j * A_in.to(torch.complex128))
        ev_out, V_out = torch.linalg.eigh(1j * A_out.to(torch.complex128))
        for lam in torch.unique(torch.round(ev_in / tol) * tol):
            sel_in = (ev_in - lam).abs() < 10 * tol
            sel_out = (ev_out - lam).abs() < 10 * tol
            if sel_in.any() and sel_out.any():
                pairs.append((V_out[:, sel_out], V_in[:, sel_in]))
        # Π^out_λ W Π^in_λ = U (Uᴴ W V) Vᴴ, stacked over λ as one pair of matrices per side
        self.register_buffer("U", torch.cat([u for u, _ in pairs], 1) if pairs else torch.zeros(A_out.shape[0], 0,
                             dtype=torch.complex128), persistent=False)
        self.register_buffer("V", torch.cat([v for _, v in pairs], 1) if pairs else torch.zeros(A_in.shape[0], 0,
                             dtype=torch.complex128), persistent=False)
        mask = torch.block_diag(*[torch.ones(u.shape[1], v.shape[1]) for u, v in pairs]) if pairs else torch.zeros(0, 0)
        self.register_buffer("mask", mask.to(torch.complex128), persistent=False)

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        # complex float64 buffers: follow the device only
        probe = fn(torch.zeros((), dtype=torch.float64, device=self.U.device))
        for name in ("U", "V", "mask"):
            self._buffers[name] = self._buffers[name].to(device=probe.device)
        return self

    def forward(self, W: Tensor) -> Tensor:
        inner = (self.U.conj().T @ W.to(torch.complex128) @ self.V) * self.mask
        return (self.U @ inner @ self.V.conj().T).real.to(W.dtype)
