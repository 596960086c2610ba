"""relax_plugins.irreps: the torch-only fibres, generators, structured maps and Schur projection that
the e3nn, torch-geometric and vector-neuron adapters share."""

from __future__ import annotations

import random

import pytest
import torch

import relax_plugins as rp
from relax_plugins.irreps import (
    Block,
    Fibre,
    FibreGenerators,
    SchurProjection,
    parse_irreps,
    so3_basis,
    so3_generators,
)
from relax_plugins.symmetry import intertwiner_basis

CYCLIC = ((0, 1, 2), (1, 2, 0), (2, 0, 1))


def random_fibre(seed: int, layout: str | None, max_blocks: int = 4, max_mul: int = 3, max_l: int = 2) -> Fibre:
    """Random blocks; ``layout=None`` mixes both layouts within the fibre (as PyG's fields do)."""
    rng = random.Random(seed)
    blocks = [
        Block(rng.randint(1, max_mul), rng.randint(0, max_l), rng.choice([1, -1]),
              layout or rng.choice(["mul_ir", "ir_mul"]))
        for _ in range(rng.randint(1, max_blocks))
    ]
    return Fibre(blocks)


LAYOUT_CASES = [(seed, layout) for layout in ("mul_ir", "ir_mul", None) for seed in range(4)]


# -- generators -------------------------------------------------------------------------------


@pytest.mark.parametrize("l", range(7))
def test_generators_are_a_real_antisymmetric_representation_of_so3(l):
    X = so3_generators(l)
    assert X.dtype == torch.float64 and X.shape == (3, 2 * l + 1, 2 * l + 1)
    assert torch.allclose(X, -X.transpose(1, 2), atol=1e-14)
    for a, b, c in CYCLIC:
        assert torch.allclose(X[a] @ X[b] - X[b] @ X[a], X[c], atol=1e-12)
    # Casimir: Σ_k X_k² = −l(l+1)·I (irreducible, of degree l)
    casimir = (X @ X).sum(0)
    assert torch.allclose(casimir, -l * (l + 1) * torch.eye(2 * l + 1, dtype=torch.float64), atol=1e-11)


def test_so3_basis_is_the_rotations_about_x_y_z():
    A = so3_basis()
    for a, b, c in CYCLIC:
        assert torch.equal(A[a] @ A[b] - A[b] @ A[a], A[c])
    t = torch.tensor(0.3, dtype=torch.float64)
    R = torch.linalg.matrix_exp(t * A[2])
    assert torch.allclose(R @ torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64),
                          torch.stack([t.cos(), t.sin(), torch.zeros_like(t)]))
    assert torch.equal(so3_generators(1), A)  # l = 1 is plain (x, y, z), exactly


@pytest.mark.parametrize("l", range(1, 9))
def test_generators_equal_e3nn(l):
    o3 = pytest.importorskip("e3nn.o3")
    from relax_e3nn.irreps import _float64_default, so3_generators64

    # the e3nn adapter's generators (derived from e3nn's D_from_angles, any e3nn version)
    assert torch.allclose(so3_generators(l), so3_generators64(l), rtol=0, atol=1e-14)
    if hasattr(o3, "so3_generators"):  # e3nn >= 0.5: the same closed form, bit for bit for l >= 2
        with _float64_default():
            expected = o3.so3_generators(l)
        assert torch.allclose(so3_generators(l), expected, rtol=0, atol=1e-15)
        if l >= 2:
            assert torch.equal(so3_generators(l), expected)


@pytest.mark.parametrize("l", [1, 2])
def test_generators_rotate_the_real_harmonics(l):
    # exp(t·X_k) Y(v) = Y(exp(t·A_k) v) for the basis PyG ViSNet and e3nn use (l ≤ 2 stated in torch)
    from relax_pyg.irreps import _harmonics

    A, X = so3_basis(), so3_generators(l)
    v = torch.randn(6, 3, dtype=torch.float64)
    for k in range(3):
        lhs = _harmonics(l, v) @ torch.linalg.matrix_exp(0.7 * X[k]).T
        assert torch.allclose(lhs, _harmonics(l, v @ torch.linalg.matrix_exp(0.7 * A[k]).T), atol=1e-12)


# -- fibres -----------------------------------------------------------------------------------


def test_blocks_layouts_and_parsing():
    f = Fibre.from_irreps("2x1o + 1x0e", "ir_mul")
    assert f.dim == 7 and [b.layout for b in f.blocks] == ["ir_mul", "ir_mul"]
    assert Block(2, 1, -1, "mul_ir").index(3) == [[3, 4, 5], [6, 7, 8]]
    assert Block(2, 1, -1, "ir_mul").index(3) == [[3, 5, 7], [4, 6, 8]]
    assert [(m, str(ir)) for m, ir in parse_irreps("3x0o+1e")] == [(3, "0o"), (1, "1e")]
    with pytest.raises(ValueError):
        Block(1, 1, 1, "mul_xyz")
    with pytest.raises(ValueError):
        parse_irreps("2x1q")
    assert Fibre([(0, 1, -1), (2, 0, 1)]).offsets == (0, 0)  # empty blocks keep e3nn's indices


@pytest.mark.parametrize("seed,layout", LAYOUT_CASES)
def test_structured_application_matches_dense_generators(seed, layout):
    f = random_fibre(seed, layout)
    dense = f.lie_matrices()
    for a, b, c in CYCLIC:
        assert torch.allclose(dense[a] @ dense[b] - dense[b] @ dense[a], dense[c], atol=1e-12)
    x = torch.randn(5, f.dim, dtype=torch.float64)
    assert torch.equal(f.lie(x), torch.einsum("kij,nj->kni", dense, x))
    mats = {l: torch.randn(2 * l + 1, 2 * l + 1, dtype=torch.float64) for l in range(3)}
    full = torch.block_diag(*[
        torch.kron(torch.eye(b.mul, dtype=torch.float64), mats[b.l]) if b.layout == "mul_ir"
        else torch.kron(mats[b.l], torch.eye(b.mul, dtype=torch.float64)) for b in f.blocks
    ])
    assert torch.allclose(f.apply(mats.get, x), x @ full.T, atol=1e-12)
    assert torch.allclose(f.apply(mats.get, x, transpose=True), x @ full, atol=1e-12)
    # compact: the scalar entries (zero under rotations) are left out
    keep = f.nonscalar_index()
    assert torch.equal(f.lie(x, compact=True), f.lie(x)[..., keep])
    assert torch.equal(f.parity_matrix(), torch.diag(f.parity(torch.float64)))


# -- the Schur projection -----------------------------------------------------------------------


@pytest.mark.parametrize("seed,layout", LAYOUT_CASES)
@pytest.mark.parametrize("parity", [True, False])
def test_projection_is_the_orthogonal_projection_onto_intertwiners(seed, layout, parity):
    fi, fo = random_fibre(seed, layout), random_fibre(100 + seed, layout)
    P = SchurProjection(fi, fo, parity=parity)
    W = torch.randn(fo.dim, fi.dim, dtype=torch.float64)
    PW = P(W)
    assert torch.allclose(P(PW), PW, atol=1e-13)  # idempotent
    V = torch.randn_like(W)
    assert torch.allclose((W - PW).mul(P(V)).sum(), torch.zeros((), dtype=torch.float64), atol=1e-11)  # orthogonal
    gi, go = fi.lie_matrices(), fo.lie_matrices()
    assert torch.allclose(PW @ gi, go @ PW, atol=1e-12)  # equivariant under so(3)
    if parity:
        assert torch.allclose(PW @ fi.parity_matrix(), fo.parity_matrix() @ PW, atol=1e-14)
    # ... and equal to the generic null-space projection of the same symmetry
    group = dict(group_in=fi.parity_matrix()[None], group_out=fo.parity_matrix()[None]) if parity else {}
    Q = intertwiner_basis(rp.Symmetry(fi.dim, fo.dim, gi, go, **group))
    assert torch.allclose(PW, (Q @ (Q.T @ W.reshape(-1))).reshape(W.shape), atol=1e-10)


def test_projection_restricted_to_pairs_and_block_coefficients():
    fi = Fibre([(2, 0, 1), (1, 1, -1), (3, 0, 1)])
    fo = Fibre([(1, 0, 1), (2, 1, -1)])
    W = torch.randn(fo.dim, fi.dim, dtype=torch.float64)
    full = SchurProjection(fi, fo)
    coef = full.block_coefficients(W)
    assert set(coef) == {(0, 0), (2, 0), (1, 1)}
    assert torch.allclose(coef[(1, 1)], W[1:, 2:5].reshape(2, 3, 1, 3).diagonal(dim1=1, dim2=3).mean(-1))
    only = SchurProjection(fi, fo, pairs=[(2, 0)])
    P = only(W)
    assert set(only.block_coefficients(W)) == {(2, 0)}
    assert torch.equal(P[:, 5:], full(W)[:, 5:]) and not P[:, :5].any()
    assert torch.allclose(only(P), P)


def test_projection_is_differentiable_and_keeps_dtype():
    f = Fibre([(2, 1, -1), (1, 2, 1)], "ir_mul")
    W = torch.randn(f.dim, f.dim, requires_grad=True)
    P = SchurProjection(f, f)(W)
    assert P.dtype == torch.float32
    P.square().sum().backward()
    assert torch.allclose(W.grad, 2 * SchurProjection(f, f)(W.detach()), atol=1e-6)


# -- lazy dense matrices in a Symmetry --------------------------------------------------------------


def test_fibre_generators_are_dense_only_on_request():
    fi, fo = Fibre([(40, 1, -1), (40, 2, 1)], "ir_mul"), Fibre([(3, 0, 1), (2, 1, -1)])
    sym = rp.Symmetry(fi.dim, fo.dim, FibreGenerators(fi), FibreGenerators(fo),
                      FibreGenerators(fi, "parity"), FibreGenerators(fo, "parity"))
    assert sym.num_lie == 3 and sym.num_group == 1 and not list(sym.buffers())
    sym = sym.double()
    assert torch.equal(sym.lie_in, fi.lie_matrices()) and torch.equal(sym.group_out[0], fo.parity_matrix())
    assert sym.lie_in.dtype == torch.float64 and "lie_in" in dict(sym.named_buffers())
    with pytest.raises(ValueError):
        FibreGenerators(fi, "mirror")
