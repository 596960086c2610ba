"""Penalties through second moments: PenaltyTerms and the batched moment_penalties of pointwise layers."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .lowrank import low_rank_moments, use_factors

__all__ = ["PenaltyTerms", "moment_penalties", "moment_sums", "under_func_transform"]

if TYPE_CHECKING:
    from .linear import LinearRelaxation


class PenaltyTerms(tuple):
    """(lie, norm, samples): per-layer *sums over samples* of the squared Lie/discrete defect and of
    ||W x||², and the number of samples they were summed over."""

    __slots__ = ()

    def __new__(cls, lie: Tensor, norm: Tensor, samples: int):
        return super().__new__(cls, (lie, norm, samples))

    @property
    def lie(self) -> Tensor:
        return self[0]

    @property
    def norm(self) -> Tensor:
        return self[1]

    @property
    def samples(self) -> int:
        return self[2]


def moment_penalties(terms: list[LinearRelaxation], inputs: list[tuple[Tensor, int]]) -> list[PenaltyTerms]:
    """Penalties of several layers with equal shapes in one batched computation (per layer: the
    values of :func:`moment_sums`).

    With S_l = Σ x xᵀ over layer l's samples and C_lk = W_l ρ_in(A_k) − ρ_out(A_k) W_l:
    Σ_n ||C_lk x_n||² = ⟨C_lk S_l, C_lk⟩ and Σ_n ||W_l x_n||² = ⟨W_l S_l, W_l⟩. Batching the layers
    turns some ten autograd operations per layer into ten for the whole group, which is what the
    penalty costs on models with many small layers. Low-rank layers (W = B·A, same rank) wide enough
    for :func:`~relax_plugins.lowrank.use_factors` (``penalty=True``) are computed through their factors
    (:func:`low_rank_moments`), never forming B·A; narrow ones take B·A as a dense W (cheaper there).

    With ``term.penalty_generators = m`` (equal in the group) each call uses m of the K generators,
    drawn uniformly without replacement, and scales the Lie sum by K/m: an unbiased estimate of the
    exact sum (each generator is drawn with probability m/K), so ``form="mean"`` stays unbiased while
    the square roots of ``"sqrt"``/``"paper"`` make those slightly biased low (Jensen).
    """
    lie, norm = moment_sums(terms, inputs)
    return [PenaltyTerms(lie[i], norm[i], n) for i, (_, n) in enumerate(inputs)]


def moment_sums(terms: list[LinearRelaxation], inputs: list[tuple[Tensor, int]]) -> tuple[Tensor, Tensor]:
    """The Lie and norm sums of :func:`moment_penalties` as two (L,) tensors, one entry per layer:
    what the penalty adds up, without a tensor per layer (their selection and autograd nodes cost
    more than the batched products on models with many small layers).

    Example:
        >>> import torch
        >>> J = torch.tensor([[0., -1.], [1., 0.]])
        >>> from relax_plugins.linear import LinearRelaxation
        >>> from relax_plugins.symmetry import Symmetry
        >>> terms = [LinearRelaxation(Symmetry(2, 2, lie_in=J[None], lie_out=J[None]), init_std=1.0)
        ...          for _ in range(3)]
        >>> lie, norm = moment_sums(terms, [(torch.randn(5, 2), 5)] * 3)
        >>> lie.shape, norm.shape
        (torch.Size([3]), torch.Size([3]))
    """
    factored = [t.factors() for t in terms]
    ranks = {f[0].shape[0] for f in factored if f is not None}
    # through the factors where that is cheaper (use_factors); narrow layers take B·A as a dense W
    if (all(f is not None for f in factored) and len(ranks) == 1
            and use_factors(factored[0][0].shape[1], factored[0][1].shape[0], factored[0][0].shape[0], penalty=True)):
        A = torch.stack([f[0] for f in factored])  # (L, r, d_in)
        B = torch.stack([f[1] for f in factored])  # (L, d_out, r)
        with torch.no_grad():
            S = torch.stack([x.T @ x for x, _ in inputs])
        G_in, G_out, _, scale = _stacked_generators(terms, A.dtype)
        lie, norm = low_rank_moments(A, B, G_in, G_out, S)
        if scale != 1.0:
            lie = lie * scale
        return lie, norm
    W = torch.stack([t.dense() for t in terms])  # (L, d_out, d_in)
    L, d_out, _ = W.shape
    _, G_out, G_in, scale = _stacked_generators(terms, W.dtype)  # G_in laid out (L, d_in, K·d_in)
    G_out = G_out.reshape(L, G_out.shape[1] * d_out, d_out)
    with torch.no_grad():
        S = torch.stack([x.T @ x for x, _ in inputs])  # (L, d_in, d_in): detached, trains W only
    if W.requires_grad and torch.is_grad_enabled() and not under_func_transform():
        lie, norm = _DenseMoments.apply(W, S, G_in, G_out)
    else:  # torch.func transforms (hessian of the penalty in W) need the plain operations
        lie, norm = _dense_moments(W, S, G_in, G_out)[:2]
    lie, norm = lie.clamp_min(0.0), norm.clamp_min(0.0)
    if scale != 1.0:
        lie = lie * scale
    return lie, norm


def _dense_moments(W: Tensor, S: Tensor, G_in: Tensor, G_out: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Σ_k ⟨C_k S, C_k⟩ and ⟨W S, W⟩ per layer (before clamping), with C S and W S.

    W: (L, d_out, d_in); S: (L, d_in, d_in); G_in: (L, d_in, K·d_in), the blocks ρ_in(A_k) side by
    side; G_out: (L, K·d_out, d_out), the blocks ρ_out(A_k) stacked.
    """
    L, d_out, d_in = W.shape
    k = G_out.shape[1] // d_out
    WG = (W @ G_in).reshape(L, d_out, k, d_in).transpose(1, 2).reshape(L, k * d_out, d_in)
    C = WG - G_out @ W  # (L, k·d_out, d_in): the blocks W ρ_in(A_k) − ρ_out(A_k) W
    CS, WS = C @ S, W @ S
    return (CS * C).sum(dim=(1, 2)), (WS * W).sum(dim=(1, 2)), CS, WS


def under_func_transform() -> bool:
    """Whether the caller runs inside a torch.func transform (vmap, grad, jacrev, hessian): there,
    tensors stand for one trace's values (not to be cached) and hand-written autograd.Functions
    without transform rules cannot run.

    Example:
        >>> inside = []
        >>> _ = torch.func.vmap(lambda x: inside.append(under_func_transform()) or x)(torch.ones(2))
        >>> under_func_transform(), inside
        (False, [True])
    """
    functorch = getattr(torch._C, "_functorch", None)
    return functorch is not None and functorch.peek_interpreter_stack() is not None


class _DenseMoments(torch.autograd.Function):
    """:func:`_dense_moments` with its gradient in closed form: ∂/∂W of ⟨C S, C⟩ is the pull-back of
    2·C S through C(W) = W G − G_out W, and of ⟨W S, W⟩ it is 2·W S (S is symmetric). C S and W S come
    from the forward, so the backward takes two batched products where autograd's takes four and a
    dozen reshapes. A backward that must itself be differentiable (``create_graph=True``)
    recomputes them from W with differentiable operations.
    """

    @staticmethod
    def forward(ctx: Any, W: Tensor, S: Tensor, G_in: Tensor, G_out: Tensor) -> tuple[Tensor, Tensor]:
        lie, norm, CS, WS = _dense_moments(W, S, G_in, G_out)
        ctx.save_for_backward(W, S, G_in, G_out, CS, WS)
        return lie, norm

    @staticmethod
    def backward(ctx: Any, g_lie: Tensor, g_norm: Tensor) -> tuple[Tensor | None, ...]:
        W, S, G_in, G_out, CS, WS = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: the gradient as a function of W that autograd can follow
            _, _, CS, WS = _dense_moments(W, S, G_in, G_out)
        L, d_out, d_in = W.shape
        k = G_out.shape[1] // d_out
        dt = CS.dtype  # under autocast the forward's products ran in a lower precision: so do these
        gC = (2 * g_lie).to(dt)[:, None, None] * CS
        gW = gC.reshape(L, k, d_out, d_in).transpose(1, 2).reshape(L, d_out, k * d_in) @ G_in.to(dt).transpose(1, 2)
        gW = gW - G_out.to(dt).transpose(1, 2) @ gC
        gW = gW + (2 * g_norm).to(dt)[:, None, None] * WS.to(dt)
        return gW.to(W.dtype), None, None, None


#: stacked generators of the layer groups recently penalised (the same groups every step): stacking
#: copies L·K·d² entries per call, more than the products on them cost on small layers. Keyed by the
#: per-layer stacks' ids and checked through weak references to them (a moved or freed symmetry
#: misses); the oldest entries go beyond :data:`_STACK_CACHE_SIZE`.
_STACK_CACHE: dict[tuple, tuple[list[weakref.ref], Tensor, Tensor, Tensor]] = {}
_STACK_CACHE_SIZE = 16


def _stacked_generators(terms: list[LinearRelaxation], dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, float]:
    """(L, K, d_in, d_in) and (L, K, d_out, d_out): every layer's generators (Lie, then finite), or
    the m drawn this step (``penalty_generators``); the input ones also laid out (L, d_in, K·d_in)
    for the dense path; and the factor K/m that makes their sum unbiased."""
    G_in, G_out, G_in_flat = _cached_stack(terms, dtype)
    idx = terms[0].sample_generators(G_in.shape[1])
    if idx is None:
        return G_in, G_out, G_in_flat, 1.0
    idx = idx.to(G_in.device)
    return G_in[:, idx], G_out[:, idx], _flat(G_in[:, idx]), G_in.shape[1] / idx.numel()


def _flat(G_in: Tensor) -> Tensor:
    # laid out for plain (un-broadcast) bmm: broadcasting small batched matmuls was 5x slower
    L, K, d_in, _ = G_in.shape
    return G_in.permute(0, 2, 1, 3).reshape(L, d_in, K * d_in)


def _stack(gens: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor, Tensor]:
    G_in = torch.stack([g[0] for g in gens])
    return G_in, torch.stack([g[1] for g in gens]), _flat(G_in)


def _cached_stack(terms: list[LinearRelaxation], dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """The stacked generators, and the input ones laid out (L, d_in, K·d_in) for the dense path."""
    gens = [t.symmetry.stacked(dtype) for t in terms]  # each cached by its symmetry
    if torch.compiler.is_compiling():  # a compiled graph keeps the stacks itself; the cache's ids cannot be guarded
        return _stack(gens)
    key = tuple(id(g) for pair in gens for g in pair)
    hit = _STACK_CACHE.get(key)
    if hit is not None and all(r() is g for r, g in zip(hit[0], (g for pair in gens for g in pair))):
        return hit[1], hit[2], hit[3]
    G_in, G_out, G_in_flat = _stack(gens)
    _STACK_CACHE.pop(key, None)
    while len(_STACK_CACHE) >= _STACK_CACHE_SIZE:
        del _STACK_CACHE[next(iter(_STACK_CACHE))]
    _STACK_CACHE[key] = ([weakref.ref(g) for pair in gens for g in pair], G_in, G_out, G_in_flat)
    return G_in, G_out, G_in_flat
