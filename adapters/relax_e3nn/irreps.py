"""O(3) representation helpers in e3nn's feature layout (imports e3nn; loaded lazily by the plugin).

The fibre structure, structured generators and Schur projection are the core's
(:mod:`relax_plugins.irreps`); this module supplies e3nn's own generators (:func:`so3_generators64`,
derived from e3nn, equal to the core's torch-only closed form to 1e-15) and e3nn-facing helpers.

Conventions: a feature vector of ``Irreps("2x1o + 1x0e")`` is laid out copy-major, irrep by irrep,
exactly as e3nn stores it; a dense map W acts on column vectors, y = W x (so an e3nn layer's dense
matrix is ``layer(I).T``). For O(3) the intertwiners between two irreps lists are, block by block,
multiples of the identity between copies of the *same* irrep (l and parity), and zero otherwise.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence

import e3nn
import torch
from e3nn import o3
from torch import Tensor, nn

from relax_plugins import Symmetry
from relax_plugins.irreps import Fibre, FibreGenerators, SchurProjection, so3_basis

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
_SO3_BASIS = so3_basis().tolist()


_GENERATORS64: dict[int, Tensor] = {}  # l → its generators, built once by _so3_generators64


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
        K = so3_basis().reshape(3, 9)
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
    l = int(l)
    if l not in _GENERATORS64:
        # built once in a thread of its own: torch.func transforms are thread-local, and a first penalty
        # under the caller's torch.func.hessian would otherwise run autograd.functional inside one (refused)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            _GENERATORS64[l] = pool.submit(_so3_generators64, l).result()
    return _GENERATORS64[l].clone()


def D_from_matrix64(irreps: o3.Irreps | str, R: Tensor) -> Tensor:
    """``Irreps.D_from_matrix(R)`` computed in float64 (see :func:`so3_generators64`).

    Example:
        >>> D_from_matrix64("1x0e + 1x1o", -torch.eye(3)).diagonal().tolist()
        [1.0, -1.0, -1.0, -1.0]
    """
    with _float64_default():
        return _irreps(irreps).D_from_matrix(R.to(torch.float64))


def irreps_fibre(irreps: o3.Irreps | str) -> Fibre:
    """The core :class:`~relax_plugins.irreps.Fibre` of an irreps list (e3nn's multiplicity-major
    layout, one block per entry, zero multiplicities kept so that block indices are e3nn's), with
    e3nn's own generators :func:`so3_generators64`.

    Example:
        >>> irreps_fibre("2x1o + 1x0e").dim
        7
    """
    return Fibre([(mul, ir.l, ir.p) for mul, ir in _irreps(irreps)], "mul_ir", generators=so3_generators64)


class IrrepsAction(nn.Module):
    """The so(3) generators and the inversion of an irreps list, applied without dense matrices
    (:meth:`relax_plugins.irreps.Fibre.lie`: O(n·d·(2l+1)) per l instead of O(n·d²)).

    Args:
        irreps: the irreps of the fibre.

    Example:
        >>> act = IrrepsAction("2x1o + 1x0e")
        >>> act.lie(torch.randn(4, 7)).shape, act.parity.tolist()
        (torch.Size([3, 4, 7]), [-1.0, -1.0, -1.0, -1.0, -1.0, -1.0, 1.0])
    """

    def __init__(self, irreps: o3.Irreps | str) -> None:
        super().__init__()
        self.fibre = irreps_fibre(irreps)
        self.dim = self.fibre.dim
        self.ls: list[int] = sorted({b.l for b in self.fibre.blocks if b.mul and b.l})
        self.register_buffer("parity", self.fibre.parity(), persistent=False)

    def lie(self, x: Tensor) -> Tensor:
        """dρ(A_k) x for the three so(3) generators: (n, d) → (3, n, d), generator-major."""
        return self.fibre.lie(x)

    def dense_lie(self) -> Tensor:
        """The generators as dense (3, d, d) matrices (for :class:`relax_plugins.Symmetry`)."""
        return self.fibre.lie_matrices().to(dtype=self.parity.dtype, device=self.parity.device)


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
    fi, fo = irreps_fibre(irreps_in), irreps_fibre(irreps_out)
    # structured, dense only on first use: the generators of so3_generators64 per irrep copy (float64,
    # which float64 checks of subgroup projections rely on) and the inversion, each irrep's parity
    # (D_from_matrix(-I) of e3nn, as a test checks)
    return Symmetry(fi.dim, fo.dim, lie_in=FibreGenerators(fi), lie_out=FibreGenerators(fo),
                    group_in=FibreGenerators(fi, "parity"), group_out=FibreGenerators(fo, "parity"), name=name)


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


def irreps_projection(
    irreps_in: o3.Irreps | str, irreps_out: o3.Irreps | str, pairs: Iterable[tuple[int, int]] | None = None
) -> SchurProjection:
    """The core :class:`~relax_plugins.irreps.SchurProjection` between two irreps lists, restricted to
    ``pairs`` (default: all pairs of equal irreps, i.e. the whole intertwiner space).

    Example:
        >>> irreps_projection("1x0e + 1x1o", "2x1o").block_coefficients(torch.ones(6, 4))[(1, 0)]
        tensor([[1.],
                [1.]])
    """
    return SchurProjection(irreps_fibre(irreps_in), irreps_fibre(irreps_out), pairs=pairs)


def path_coefficients(
    W: Tensor, irreps_in: o3.Irreps, irreps_out: o3.Irreps, pairs: Iterable[tuple[int, int]]
) -> dict[tuple[int, int], Tensor]:
    """For each path (i_in, i_out): the (mul_out, mul_in) matrix c with P(W)'s block = c ⊗ I.

    c[v, u] = tr(W_vu) / (2l + 1), the orthogonal projection of the (2l+1)-square block W_vu onto
    multiples of the identity.
    """
    return irreps_projection(irreps_in, irreps_out, list(pairs)).block_coefficients(W)


def project_irreps_dense(
    W: Tensor,
    irreps_in: o3.Irreps | str,
    irreps_out: o3.Irreps | str,
    pairs: Iterable[tuple[int, int]] | None = None,
) -> Tensor:
    """Orthogonal (Frobenius) projection of a dense (d_out, d_in) map onto the O(3) intertwiners
    restricted to ``pairs`` (default: all pairs of equal irreps, i.e. the whole intertwiner space).

    Closed form (:class:`relax_plugins.irreps.SchurProjection`), computed in float64 and returned in
    W's dtype: each block between copies of the same irrep becomes tr(block)/(2l+1)·I, every other
    block 0.

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
    return irreps_projection(irreps_in, irreps_out, pairs)(W.detach().double()).to(W.dtype)


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
