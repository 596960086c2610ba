"""Low-rank relaxation weights W = B·A, applied and penalised through the factors (never forming B·A)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["low_rank_apply", "low_rank_moments"]


class _LowRankApply(torch.autograd.Function):
    """θ·(x Aᵀ) Bᵀ [+ x (I_blocks ⊗ M)ᵀ], saving only x and the factors for backward.

    x Aᵀ (n × r) is not kept: backward takes the parameter gradients from G = gᵀ x, so a low-rank W
    saves no more activations than a dense one (which keeps x and W).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, A: Tensor, B: Tensor, theta: Tensor | None, M: Tensor | None,
                blocks: int) -> Tensor:
        xa = x @ A.T
        out = xa @ B.T
        dt = out.dtype  # under autocast, the dtype the products ran in
        if theta is not None:
            out = theta.to(dt) * out
        if M is not None:
            n = x.shape[0]
            base = (x.reshape(n * blocks, -1) @ M.T).reshape(n, -1)
            out = base.to(dt) + out
        ctx.save_for_backward(x, A, B, theta, M)
        ctx.blocks, ctx.dt = blocks, dt
        return out

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        # one GEMM for the parameter gradients, G = gᵀ x (d_out × d_in, the dense backward's cost),
        # then the factors' gradients from G: fewer passes over the n-sized tensors than the skinny
        # r-wide GEMMs (which are memory-bound), and x Aᵀ is never needed
        x, A, B, theta, M = ctx.saved_tensors
        need_x, need_a, need_b, need_t, need_m, _ = ctx.needs_input_grad
        dt, blocks = ctx.dt, ctx.blocks
        g, x, A, B = g.to(dt), x.to(dt), A.to(dt), B.to(dt)
        th = None if theta is None else theta.to(dt)
        gx = ga = gb = gt = gm = None
        if need_a or need_b or need_t or need_m:
            G = g.T @ x
            if need_a or need_b:
                GT = G if th is None else th * G
                ga = B.T @ GT if need_a else None
                gb = GT @ A.T if need_b else None
            if need_t:
                gt = ((G @ A.T) * B).sum()  # ⟨G, B A⟩ without forming B A
            if need_m:
                c_out, c_in = M.shape
                gm = G.reshape(blocks, c_out, blocks, c_in).diagonal(dim1=0, dim2=2).sum(-1)
        if need_x:
            gx = (g @ B) @ A if th is None else th * ((g @ B) @ A)
            if M is not None:
                n = x.shape[0]
                gx = gx + (g.reshape(n * blocks, -1) @ M.to(dt)).reshape(x.shape)
        return gx, ga, gb, gt, gm, None


def low_rank_apply(
    x: Tensor, A: Tensor, B: Tensor, theta: Tensor | None = None, M: Tensor | None = None, blocks: int = 1
) -> Tensor:
    """θ·(B·A) applied to the last axis of ``x`` through the factors, plus an optional block-diagonal
    base map: ``x (I_blocks ⊗ M)ᵀ + θ (x Aᵀ) Bᵀ``.

    Never forms B·A, and saves only ``x`` and the factors for backward (``x Aᵀ`` is recomputed), so
    a rank-r W costs O(n·r·(d_in + d_out)) time and no activation memory beyond its input.

    Args:
        x: (..., d_in) inputs.
        A: (r, d_in) right factor.
        B: (d_out, r) left factor.
        theta: optional scalar factor θ (gets a gradient if it requires one).
        M: optional (c_out, c_in) base map applied to each of ``blocks`` consecutive chunks of x's
            last axis (d_in = blocks·c_in, d_out = blocks·c_out).
        blocks: number of chunks M acts on.

    Returns:
        (..., d_out) tensor.

    Example:
        >>> import torch
        >>> x, A, B = torch.randn(5, 3), torch.randn(2, 3), torch.randn(4, 2)
        >>> bool(torch.allclose(low_rank_apply(x, A, B), x @ (B @ A).T, atol=1e-6))
        True
    """
    lead = x.shape[:-1]
    out = _LowRankApply.apply(x.reshape(-1, x.shape[-1]), A, B, theta, M, blocks)
    return out.reshape(*lead, out.shape[-1])


def low_rank_moments(A: Tensor, B: Tensor, G_in: Tensor, G_out: Tensor, S: Tensor) -> tuple[Tensor, Tensor]:
    """Σ_k ⟨C_k S, C_k⟩ and ⟨W S, W⟩ for W = B·A through the factors, for L layers at once.

    C_k = W G_k^in − G_k^out W = U_k V_k with U_k = [B, −G_k^out B] (d_out × 2r) and
    V_k = [A G_k^in; A] (2r × d_in), so ⟨C_k S, C_k⟩ = tr(U_k V_k S V_kᵀ U_kᵀ) = ⟨U_kᵀ U_k, V_k S V_kᵀ⟩,
    2r × 2r matrices; likewise ⟨W S, W⟩ = ⟨BᵀB, A S Aᵀ⟩. Costs O(K·r·(d_in² + d_out²)) instead of
    the O(K·d_in·d_out·(d_in + d_out)) of the dense C_k.

    Args:
        A: (L, r, d_in). B: (L, d_out, r). G_in: (L, K, d_in, d_in). G_out: (L, K, d_out, d_out).
        S: (L, d_in, d_in) second moments Σ x xᵀ.

    Returns:
        (lie, norm), each of shape (L,).

    Example:
        >>> import torch
        >>> A, B = torch.randn(1, 2, 3, dtype=torch.float64), torch.randn(1, 4, 2, dtype=torch.float64)
        >>> G_in, G_out = torch.randn(1, 2, 3, 3).double(), torch.randn(1, 2, 4, 4).double()
        >>> x = torch.randn(10, 3, dtype=torch.float64)
        >>> W = B[0] @ A[0]
        >>> exact = sum(((x @ (W @ gi - go @ W).T) ** 2).sum() for gi, go in zip(G_in[0], G_out[0]))
        >>> lie, norm = low_rank_moments(A, B, G_in, G_out, (x.T @ x)[None])
        >>> bool(torch.allclose(lie[0], exact)), bool(torch.allclose(norm[0], (x @ W.T).square().sum()))
        (True, True)
    """
    L, r, d_in = A.shape
    d_out, K = B.shape[1], G_in.shape[1]
    # V_k stacked over k: (L, K·2r, d_in); plain bmm everywhere (broadcast batched matmuls are slow)
    AG = (A @ G_in.permute(0, 2, 1, 3).reshape(L, d_in, K * d_in)).reshape(L, r, K, d_in).transpose(1, 2)
    V = torch.cat([AG, A[:, None].expand(L, K, r, d_in)], dim=2).reshape(L, K * 2 * r, d_in)
    VSV = (V @ S).reshape(L * K, 2 * r, d_in) @ V.reshape(L * K, 2 * r, d_in).transpose(1, 2)
    GB = (G_out.reshape(L, K * d_out, d_out) @ B).reshape(L, K, d_out, r)
    U = torch.cat([B[:, None].expand(L, K, d_out, r), -GB], dim=3).reshape(L * K, d_out, 2 * r)
    UU = U.transpose(1, 2) @ U
    lie = (UU * VSV).reshape(L, -1).sum(1).clamp_min(0.0)
    norm = ((B.transpose(1, 2) @ B) * ((A @ S) @ A.transpose(1, 2))).sum(dim=(1, 2)).clamp_min(0.0)
    return lie, norm
