"""Low-rank relaxation weights W = B·A, applied and penalised through the factors where that is cheaper."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["low_rank_apply", "low_rank_moments", "use_factors", "FACTORED_MIN_RATIO", "FUSED_FACTORED_MIN_RATIO"]


#: use the factors when dense W·x costs at least this many times the factored FLOPs, r·(d_in + d_out);
#: below it, skinny (r-wide) GEMMs are memory-bound and B·A formed once is as fast as a dense W.
#: Measured on one CPU core (n = 500–20000, d = 24–384, r = 4–8): the factored path won 2–4× at
#: ratios 12–24, tied at 6–7 and lost up to 2× at 3–5, where forming B·A matched dense W to ±5 %.
FACTORED_MIN_RATIO = 10.0
#: the same threshold when a block-diagonal base map (I ⊗ M) is fused in (vector neurons): the dense
#: alternative then also carries the base map in one GEMM, and the factored path won only from ~16 on
#: (VN-PointNet's layers: 2× slower at 1.6–6, 1.7× at 13, 1.1× faster at 16, 1.2× at 32)
FUSED_FACTORED_MIN_RATIO = 16.0


def use_factors(d_in: int, d_out: int, rank: int, fused_base: bool = False) -> bool:
    """Whether a rank-``rank`` W on a (d_in → d_out) layer is cheaper applied through its factors
    than formed as B·A (see :data:`FACTORED_MIN_RATIO`; ``fused_base``: with a fused block-diagonal
    base map, :data:`FUSED_FACTORED_MIN_RATIO`).

    Example:
        >>> use_factors(384, 384, 8), use_factors(40, 40, 4)
        (True, False)
    """
    ratio = FUSED_FACTORED_MIN_RATIO if fused_base else FACTORED_MIN_RATIO
    return d_in * d_out >= ratio * rank * (d_in + d_out)


class _LowRankApply(torch.autograd.Function):
    """θ·(x Aᵀ) Bᵀ [+ x (I_blocks ⊗ M)ᵀ], saving only x and the factors for backward.

    Backward uses r-wide products only (x Aᵀ is recomputed, never saved): O(n·r·(d_in + d_out))
    time, and no activation memory beyond the input that a dense W keeps too.
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
        x, A, B, theta, M = ctx.saved_tensors
        need_x, need_a, need_b, need_t, need_m, _ = ctx.needs_input_grad
        dt, blocks = ctx.dt, ctx.blocks
        g, x, A, B = g.to(dt), x.to(dt), A.to(dt), B.to(dt)
        th = None if theta is None else theta.to(dt)
        gx = ga = gb = gt = gm = None
        gB = g @ B if (need_x or need_a) else None  # (n, r)
        if need_a:
            ga = gB.T @ x if th is None else th * (gB.T @ x)
        if need_b or need_t:
            gbr = g.T @ (x @ A.T)  # (d_out, r): ∂/∂B of ⟨g, (x Aᵀ) Bᵀ⟩
            gb = (gbr if th is None else th * gbr) if need_b else None
            gt = (gbr * B).sum() if need_t else None  # ⟨gᵀ x, B A⟩ without forming B A
        if need_m:
            c_out, c_in = M.shape
            gm = g.reshape(-1, c_out).T @ x.reshape(-1, c_in)  # the base map's own gradient, Σ over blocks
        if need_x:
            gx = gB @ A if th is None else th * (gB @ A)
            if M is not None:
                n = x.shape[0]
                gx = gx + (g.reshape(n * blocks, -1) @ M.to(dt)).reshape(x.shape)
        return gx, ga, gb, gt, gm, None


def low_rank_apply(
    x: Tensor, A: Tensor, B: Tensor, theta: Tensor | None = None, M: Tensor | None = None, blocks: int = 1
) -> Tensor:
    """θ·(B·A) applied to the last axis of ``x``, plus an optional block-diagonal base map:
    ``x (I_blocks ⊗ M)ᵀ + θ (x Aᵀ) Bᵀ``.

    Wide layers (:func:`use_factors`) go through the factors: B·A is never formed and only ``x``
    and the factors are saved for backward, O(n·r·(d_in + d_out)) time. Narrow ones form B·A once
    (d_out·r·d_in FLOPs; with ``M``, I ⊗ M + θ·B·A) and apply it as a dense W would, which is
    faster there; the result is the same map either way.

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
    flat = x.reshape(-1, x.shape[-1])
    r, d_in = A.shape
    if not use_factors(d_in, B.shape[0], r, fused_base=M is not None):
        W = B @ A if theta is None else theta.to(A.dtype) * (B @ A)
        if M is not None:
            W = torch.kron(torch.eye(blocks, dtype=M.dtype, device=M.device), M) + W
        out = flat @ W.T
    else:
        out = _LowRankApply.apply(flat, A, B, theta, M, blocks)
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
    # through S, not through X Vᵀ: that would be cheaper in time when 2·K·r < d_in, but autograd
    # would keep the n × 2Kr products, more activation memory than the whole dense penalty keeps
    VSV = (V @ S).reshape(L * K, 2 * r, d_in) @ V.reshape(L * K, 2 * r, d_in).transpose(1, 2)
    ASA = (A @ S) @ A.transpose(1, 2)
    GB = (G_out.reshape(L, K * d_out, d_out) @ B).reshape(L, K, d_out, r)
    U = torch.cat([B[:, None].expand(L, K, d_out, r), -GB], dim=3).reshape(L * K, d_out, 2 * r)
    UU = U.transpose(1, 2) @ U
    lie = (UU * VSV).reshape(L, -1).sum(1).clamp_min(0.0)
    norm = ((B.transpose(1, 2) @ B) * ASA).sum(dim=(1, 2)).clamp_min(0.0)
    return lie, norm
