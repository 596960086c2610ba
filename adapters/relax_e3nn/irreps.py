"""O(3) representation helpers in e3nn's feature layout (imports e3nn; loaded lazily by the plugin).

Conventions: a feature vector of ``Irreps("2x1o + 1x0e")`` is laid out copy-major, irrep by irrep,
exactly as e3nn stores it; a dense map W acts on column vectors, y = W x (so an e3nn layer's dense
matrix is ``layer(I).T``). For O(3) the intertwiners between two irreps lists are, block by block,
multiples of the identity between copies of the *same* irrep (l and parity), and zero otherwise.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator, Sequence

import e3nn
import torch
from e3nn import o3
from torch import Tensor, nn

from relax_plugins import Symmetry

__all__ = [
    "IrrepsAction",
    "irreps_symmetry",
    "project_irreps_dense",
    "irrep_pairs",
    "equivariance_error",
    "random_o3",
    "so3_generators64",
    "D_from_matrix64",
]


def _irreps(irreps: o3.Irreps | str) -> o3.Irreps:
    return o3.Irreps(irreps)


@contextlib.contextmanager
def _float64_default() -> Iterator[None]:
    """e3nn builds its generators and ``D_from_matrix`` in the *default* dtype: under float32
    they are accurate to ~1e-7 only. Build them in float64 (then cast), as e3nn's own tests do.
    Changes the process-wide default dtype for the duration (not thread-safe)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


# the right-handed so(3) basis, rotations about x, y, z: exp(t·K[k]) rotates by t about axis k
_SO3_BASIS = (
    ((0.0, 0.0, 0.0), (0.0, 0.0, -1.0), (0.0, 1.0, 0.0)),
    ((0.0, 0.0, 1.0), (0.0, 0.0, 0.0), (-1.0, 0.0, 0.0)),
    ((0.0, -1.0, 0.0), (1.0, 0.0, 0.0), (0.0, 0.0, 0.0)),
)


@functools.cache
def _so3_generators64(l: int) -> Tensor:
    jac = torch.autograd.functional.jacobian

    def d_alpha(f: Callable[..., Tensor]) -> Tensor:
        zero = torch.zeros((), dtype=torch.float64)
        return jac(lambda a: f(a, zero, zero), zero)

    def d_beta(f: Callable[..., Tensor]) -> Tensor:
        zero = torch.zeros((), dtype=torch.float64)
        return jac(lambda b: f(zero, b, zero), zero)

    # works under no_grad / inference_mode too (relax() may be called there)
    with _float64_default(), torch.inference_mode(False), torch.enable_grad():
        # the derivatives of e3nn's two elementary Euler rotations (whatever its convention) at the
        # identity: 3x3 matrices from angles_to_matrix, (2l+1)-square ones from D_from_angles, which
        # represents angles_to_matrix by definition. Derivatives of exp / cos / sin at 0: exact.
        Ga, Gb = d_alpha(o3.angles_to_matrix), d_beta(o3.angles_to_matrix)
        ir = o3.Irrep(l, 1)
        A, B = d_alpha(ir.D_from_angles), d_beta(ir.D_from_angles)
        # Ga, Gb and [Ga, Gb] span so(3); dρ is a Lie algebra map, so K = c1·Ga + c2·Gb + c3·[Ga, Gb]
        # goes to c1·A + c2·B + c3·[A, B]. The coefficients are 0 or ±1: solved, then rounded.
        span = torch.stack([Ga, Gb, Ga @ Gb - Gb @ Ga]).reshape(3, 9)
        K = torch.tensor(_SO3_BASIS, dtype=torch.float64).reshape(3, 9)
        coeff = torch.linalg.lstsq(span.T, K.T).solution.T.round()
        if not torch.equal(coeff @ span, K):
            raise RuntimeError(f"e3nn {e3nn.__version__}: its elementary Euler rotations do not span so(3)")
        return torch.einsum("kj,jab->kab", coeff, torch.stack([A, B, A @ B - B @ A])).detach()


def so3_generators64(l: int) -> Tensor:
    """The so(3) generators of the irrep ``l`` in e3nn's own real basis, in float64, for any e3nn
    from 0.4.4 on: dρ_l(K_x), dρ_l(K_y), dρ_l(K_z) for the rotations about x, y, z.

    e3nn 0.4 has no ``o3.so3_generators``; these are the exact derivatives at the identity of
    ``Irrep(l).D_from_angles``, which equal ``o3.so3_generators(l)`` of e3nn >= 0.5 (tested). Cached;
    a fresh copy is returned.

    Example:
        >>> G = so3_generators64(1)
        >>> G.dtype, G[2].round().tolist()  # l=1 is (x, y, z): the rotation about z
        (torch.float64, [[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
        >>> bool(torch.allclose(G[0] @ G[1] - G[1] @ G[0], G[2]))
        True
    """
    if l < 0:
        raise ValueError(f"l must be >= 0, got {l}")
    return _so3_generators64(int(l)).clone()


def D_from_matrix64(irreps: o3.Irreps | str, R: Tensor) -> Tensor:
    """``Irreps.D_from_matrix(R)`` computed in float64 (see :func:`so3_generators64`).

    Example:
        >>> D_from_matrix64("1x0e + 1x1o", -torch.eye(3)).diagonal().tolist()
        [1.0, -1.0, -1.0, -1.0]
    """
    with _float64_default():
        return _irreps(irreps).D_from_matrix(R.to(torch.float64))


class IrrepsAction(nn.Module):
    """The so(3) generators and the inversion of an irreps list, applied without dense matrices.

    The generators of ``Irreps`` are block diagonal (:func:`so3_generators64` once per copy), so
    applying them per l costs O(n·d·(2l+1)) instead of O(n·d²) for a dense (3, d, d) product: this
    keeps the Lie penalty cheap on wide layers.

    Args:
        irreps: the irreps of the fibre.

    Example:
        >>> act = IrrepsAction("2x1o + 1x0e")
        >>> act.lie(torch.randn(4, 7)).shape, act.parity.tolist()
        (torch.Size([3, 4, 7]), [-1.0, -1.0, -1.0, -1.0, -1.0, -1.0, 1.0])
    """

    def __init__(self, irreps: o3.Irreps | str) -> None:
        super().__init__()
        irreps = _irreps(irreps)
        self.dim = irreps.dim
        self.ls: list[int] = []
        dtype = torch.get_default_dtype()
        by_l: dict[int, list[int]] = {}
        for (mul, ir), sl in zip(irreps, irreps.slices()):
            if mul == 0 or ir.l == 0:  # so(3) acts as 0 on scalars: nothing to compute
                continue
            by_l.setdefault(ir.l, []).extend(range(sl.start, sl.stop))
        for l, idx in sorted(by_l.items()):
            self.ls.append(l)
            self.register_buffer(f"idx_{l}", torch.tensor(idx, dtype=torch.long), persistent=False)
            self.register_buffer(f"gen_{l}", so3_generators64(l).to(dtype), persistent=False)
        parity = [float(ir.p) for mul, ir in irreps for _ in range(mul * ir.dim)]
        self.register_buffer("parity", torch.tensor(parity, dtype=dtype).reshape(self.dim), persistent=False)

    def lie(self, x: Tensor) -> Tensor:
        """dρ(A_k) x for the three so(3) generators: (n, d) → (3, n, d), generator-major."""
        n = x.shape[0]
        out = x.new_zeros(3, n, self.dim)
        for l in self.ls:
            idx, gen = getattr(self, f"idx_{l}"), getattr(self, f"gen_{l}").to(x.dtype)
            xs = x.index_select(1, idx).reshape(n, -1, 2 * l + 1)
            out = out.index_copy(2, idx, torch.einsum("kij,nuj->knui", gen, xs).reshape(3, n, -1))
        return out

    def dense_lie(self) -> Tensor:
        """The generators as dense (3, d, d) matrices (for :class:`relax_plugins.Symmetry`)."""
        eye = torch.eye(self.dim, dtype=self.parity.dtype, device=self.parity.device)
        return self.lie(eye).transpose(1, 2).contiguous()


def irreps_symmetry(irreps_in: o3.Irreps | str, irreps_out: o3.Irreps | str, name: str = "O(3)") -> Symmetry:
    """The O(3) :class:`~relax_plugins.Symmetry` of a layer between two irreps lists.

    Lie generators: :func:`so3_generators64` per irrep copy, in e3nn's order (rotations about x,
    y, z). The Lie derivative alone only sees SO(3); the inversion ``D_from_matrix(-I)`` (a ±1
    diagonal holding each irrep's parity) is added as a finite-group generator.

    Example:
        >>> sym = irreps_symmetry("1x0e + 1x1o", "1x1o")
        >>> (sym.num_lie, sym.num_group, sym.dim_in, sym.dim_out)
        (3, 1, 4, 3)
    """
    irreps_in, irreps_out = _irreps(irreps_in), _irreps(irreps_out)
    dtype = torch.get_default_dtype()

    def parts(irreps: o3.Irreps) -> tuple[Tensor, Tensor]:
        # float64 from so3_generators64 (not the default-dtype buffers of IrrepsAction): the Symmetry
        # keeps generators exact, which float64 checks of subgroup projections rely on
        blocks = [so3_generators64(ir.l) for mul, ir in irreps for _ in range(mul)]
        lie = torch.stack([torch.block_diag(*[b[k] for b in blocks]) for k in range(3)])
        # D_from_matrix(-I) of the whole irreps list: computed by e3nn (not restated) so that the
        # parity convention is e3nn's own; rounded: e3nn 0.4 gives the ±1 diagonal only up to 1e-16
        inv = D_from_matrix64(irreps, -torch.eye(3)).round().to(dtype)
        return lie, inv[None]

    li, gi = parts(irreps_in)
    lo, go = parts(irreps_out)
    return Symmetry(irreps_in.dim, irreps_out.dim, lie_in=li, lie_out=lo, group_in=gi, group_out=go, name=name)


def irrep_pairs(irreps_in: o3.Irreps | str, irreps_out: o3.Irreps | str) -> list[tuple[int, int]]:
    """Every (i_in, i_out) of entries with the same irrep (l and parity), i.e. all possible
    ``o3.Linear`` paths.

    Example:
        >>> irrep_pairs("1x0e + 1x1o", "2x1o + 1x0e + 1x0o")
        [(0, 1), (1, 0)]
    """
    irreps_in, irreps_out = _irreps(irreps_in), _irreps(irreps_out)
    return [
        (i, j)
        for i, (mi, ir_i) in enumerate(irreps_in)
        for j, (mo, ir_o) in enumerate(irreps_out)
        if ir_i == ir_o and mi > 0 and mo > 0
    ]


def path_coefficients(
    W: Tensor, irreps_in: o3.Irreps, irreps_out: o3.Irreps, pairs: Iterable[tuple[int, int]]
) -> dict[tuple[int, int], Tensor]:
    """For each path (i_in, i_out): the (mul_out, mul_in) matrix c with P(W)'s block = c ⊗ I.

    c[v, u] = tr(W_vu) / (2l + 1), the orthogonal projection of the (2l+1)-square block W_vu onto
    multiples of the identity.
    """
    s_in, s_out = irreps_in.slices(), irreps_out.slices()
    out = {}
    for i, j in dict.fromkeys(pairs):  # unique, order kept
        (mi, ir), (mo, _) = irreps_in[i], irreps_out[j]
        blk = W[s_out[j], s_in[i]].reshape(mo, ir.dim, mi, ir.dim)
        out[(i, j)] = torch.einsum("vmum->vu", blk) / ir.dim
    return out


def project_irreps_dense(
    W: Tensor,
    irreps_in: o3.Irreps | str,
    irreps_out: o3.Irreps | str,
    pairs: Iterable[tuple[int, int]] | None = None,
) -> Tensor:
    """Orthogonal (Frobenius) projection of a dense (d_out, d_in) map onto the O(3) intertwiners
    restricted to ``pairs`` (default: all pairs of equal irreps, i.e. the whole intertwiner space).

    Closed form, computed in float64 and returned in W's dtype: each block between copies of the
    same irrep becomes tr(block)/(2l+1)·I, every other block 0.

    Example:
        >>> W = torch.arange(16.).reshape(4, 4)
        >>> project_irreps_dense(W, "1x0e + 1x1o", "1x0e + 1x1o")[1:, 1:]
        tensor([[10.,  0.,  0.],
                [ 0., 10.,  0.],
                [ 0.,  0., 10.]])
    """
    irreps_in, irreps_out = _irreps(irreps_in), _irreps(irreps_out)
    if W.shape != (irreps_out.dim, irreps_in.dim):
        raise ValueError(f"W must be ({irreps_out.dim}, {irreps_in.dim}), got {tuple(W.shape)}")
    pairs = irrep_pairs(irreps_in, irreps_out) if pairs is None else list(pairs)
    Wd = W.detach().double()
    P = torch.zeros_like(Wd)
    s_in, s_out = irreps_in.slices(), irreps_out.slices()
    for (i, j), c in path_coefficients(Wd, irreps_in, irreps_out, pairs).items():
        d = irreps_in[i].ir.dim
        eye = torch.eye(d, dtype=Wd.dtype, device=Wd.device)
        P[s_out[j], s_in[i]] = torch.einsum("vu,mn->vmun", c, eye).reshape(c.shape[0] * d, c.shape[1] * d)
    return P.to(W.dtype)


def random_o3(n: int, parity: bool = True, dtype: torch.dtype = torch.float64, generator=None) -> Tensor:
    """``n`` random orthogonal 3x3 matrices: Haar rotations, each times −1 with probability ½ if
    ``parity``.

    Example:
        >>> R = random_o3(4)
        >>> bool(torch.allclose(R @ R.transpose(1, 2), torch.eye(3, dtype=R.dtype).expand(4, 3, 3)))
        True
    """
    q = torch.linalg.qr(torch.randn(n, 3, 3, dtype=torch.float64, generator=generator)).Q
    q = q * torch.linalg.det(q).sign()[:, None, None]  # a rotation
    if parity:
        signs = torch.randint(0, 2, (n,), generator=generator).double() * 2 - 1
        q = q * signs[:, None, None]
    return q.to(dtype)


def equivariance_error(
    fn: Callable[..., Tensor],
    inputs: Sequence[Tensor],
    irreps_in: Sequence[o3.Irreps | str | None],
    irreps_out: o3.Irreps | str,
    n_transforms: int = 4,
    parity: bool = True,
    generator: torch.Generator | None = None,
) -> float:
    """Largest relative equivariance error max_g ||f(ρ_in(g) x) − ρ_out(g) f(x)|| / ||f(x)|| over
    random O(3) elements (SO(3) if ``parity`` is False), in float64.

    Args:
        fn: the function (module) to test; it is called as ``fn(*inputs)``.
        inputs: its arguments (converted to float64; cast ``fn`` with ``.double()`` first).
        irreps_in: the irreps of each argument, or None for an argument left unchanged.
        irreps_out: the irreps of the output.
        n_transforms: how many random group elements to try.
        parity: include improper elements (inversion).
        generator: optional torch generator for the group elements.

    Returns:
        The maximum relative error (0 for an exactly equivariant ``fn``, up to rounding).

    Example:
        >>> lin = o3.Linear("2x1o", "1x1o").double()
        >>> equivariance_error(lin, [torch.randn(5, 6)], ["2x1o"], "1x1o") < 1e-12
        True
    """
    if len(inputs) != len(irreps_in):
        raise ValueError("give one irreps (or None) per input")
    inputs = [t.double() if t.is_floating_point() else t for t in inputs]
    irreps_out = _irreps(irreps_out)
    with torch.no_grad():
        ref = fn(*inputs)
        worst = 0.0
        for R in random_o3(n_transforms, parity=parity, generator=generator):
            moved = [t if ir is None else t @ D_from_matrix64(ir, R).T.to(t) for t, ir in zip(inputs, irreps_in)]
            out = fn(*moved)
            err = (out - ref @ D_from_matrix64(irreps_out, R).T.to(ref)).norm() / ref.norm().clamp_min(1e-300)
            worst = max(worst, float(err))
    return worst
