"""Low-rank relaxation weights W = B·A, applied and penalised through the factors where that is cheaper."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["low_rank_apply", "low_rank_moments", "use_factors", "FACTORED_MIN_RATIO", "FUSED_FACTORED_MIN_RATIO",
           "FACTORED_MIN_WORK", "PENALTY_FACTORED_MIN_RATIO"]


#: apply W through its factors when dense W·x costs at least this many times the factored FLOPs,
#: r·(d_in + d_out) per row. The factors' products are r-thin; laid out with the thin side first
#: (A·xᵀ, Bᵀ·gᵀ: r × n results) they run at full speed, while n × r results (x·Aᵀ) are memory-bound
#: and 3-10× slower. Measured on one CPU core, W·x forward and backward (n = 500–8000, d = 16–192,
#: r = 4–8), against B·A formed once and used as a dense W: the factored path won 1.1-1.6× at
#: ratios 3.5–8.6 and 2-4× from 13 on, and lost 1.13–1.3× at ratios 2–3.
FACTORED_MIN_RATIO = 3.5
#: the same threshold when a block-diagonal base map (I ⊗ M) is fused in (vector neurons): the
#: alternative then carries the base map in the same GEMM, while the factored path applies M block
#: by block, a thin product itself; measured: 1.3–2× slower at ratios 3.6–6, 1.2× faster at 13, 1.4× at 24
FUSED_FACTORED_MIN_RATIO = 12.0
#: and only when the dense product has at least this many multiply-adds (rows · d_in · d_out): below
#: it the factored path's fixed cost (an autograd node with a Python backward) outweighs its saving
#: (measured: lost 4 % at 0.8e6, won 8 % at 1.6e6 and 13 % at 2e6)
FACTORED_MIN_WORK = 1e6
#: the penalty's threshold (:func:`~relax_plugins.moments.moment_sums`): its factored route has about
#: twice the operations of the dense one, which small layers pay as fixed cost. Measured on one CPU
#: core, forward + backward of a group of 2-4 layers, 160-2000 samples, rank 4-8: the factored route
#: lost 1.3-1.5× at ratios 4-4.8 (32 × 32, 24 × 96), tied at 5.5-6 (40 × 48, 48 × 48) and won
#: 0.91-0.73× from 6.7 on (40 × 80, 56 × 56, 82 × 48, 64 × 64), 0.3× at ratio 16-24
PENALTY_FACTORED_MIN_RATIO = 6.5


def use_factors(d_in: int, d_out: int, rank: int, rows: int | None = None, fused_base: bool = False,
                penalty: bool = False) -> bool:
    """Whether a rank-``rank`` W on a (d_in → d_out) layer is cheaper applied through its factors
    than formed as B·A (see :data:`FACTORED_MIN_RATIO`; ``fused_base``: with a fused block-diagonal
    base map, :data:`FUSED_FACTORED_MIN_RATIO`; ``rows``: the number of rows W is applied to, checked
    against :data:`FACTORED_MIN_WORK`; None: the layer's shape alone; ``penalty``: whether the
    second-moment penalty is cheaper through the factors, :data:`PENALTY_FACTORED_MIN_RATIO`).

    Example:
        >>> use_factors(384, 384, 8), use_factors(40, 40, 4), use_factors(82, 48, 4, rows=2000)
        (True, True, True)
        >>> use_factors(82, 48, 4, rows=100), use_factors(24, 24, 4), use_factors(72, 72, 4, fused_base=True)
        (False, False, False)
        >>> use_factors(40, 48, 4, penalty=True), use_factors(64, 64, 4, penalty=True)
        (False, True)
    """
    if penalty:
        ratio = PENALTY_FACTORED_MIN_RATIO
    else:
        ratio = FUSED_FACTORED_MIN_RATIO if fused_base else FACTORED_MIN_RATIO
    if d_in * d_out < ratio * rank * (d_in + d_out):
        return False
    return rows is None or rows * d_in * d_out >= FACTORED_MIN_WORK


class _LowRankApply(torch.autograd.Function):
    """θ·(x Aᵀ) Bᵀ [+ x (I_blocks ⊗ M)ᵀ], saving only x and the factors for backward.

    Every r-thin product is computed with its r × n side as the result (A·xᵀ, Bᵀ·gᵀ), the layout in
    which a BLAS runs them at full speed; x Aᵀ is recomputed in backward, never saved: O(n·r·(d_in +
    d_out)) time, and no activation memory beyond the input that a dense W keeps too.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, A: Tensor, B: Tensor, theta: Tensor | None, M: Tensor | None,
                blocks: int, y: Tensor | None) -> Tensor:
        u = A @ x.T  # (r, n)
        Bt = (B if theta is None else theta.to(B.dtype) * B).T
        if M is not None:  # the base map first, then the low-rank term summed into it where it lies
            n = x.shape[0]
            out = (x.reshape(n * blocks, -1) @ M.T).reshape(n, -1)
            if y is not None:
                out = out + y.to(out.dtype)
            out = out.addmm_(u.T, Bt.to(out.dtype))
        else:  # y + …: the sum in the same pass (y is the caller's: never written to)
            out = u.T @ Bt if y is None else torch.addmm(y.to(u.dtype), u.T, Bt)
        dt = out.dtype  # under autocast, the dtype the products ran in
        ctx.save_for_backward(x, A, B, theta, M)
        ctx.blocks, ctx.dt = blocks, dt
        ctx.y_dtype = None if y is None else y.dtype
        return out

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        x, A, B, theta, M = ctx.saved_tensors
        need_x, need_a, need_b, need_t, need_m, _, need_y = ctx.needs_input_grad
        dt, blocks = ctx.dt, ctx.blocks
        gy = g.to(ctx.y_dtype) if need_y else None
        g, x, A, B = g.to(dt), x.to(dt), A.to(dt), B.to(dt)
        th = None if theta is None else theta.to(dt)
        gx = ga = gb = gt = gm = None
        if need_x or need_a:
            v = (B if th is None else th * B).T @ g.T  # (r, n): θ Bᵀ gᵀ
            ga = v @ x if need_a else None
            if need_x and M is not None:  # the base map's gradient, the low-rank one summed into it
                n = x.shape[0]
                gx = (g.reshape(n * blocks, -1) @ M.to(dt)).reshape(x.shape).addmm_(v.T, A)
            elif need_x:
                gx = v.T @ A
        if need_b or need_t:
            ug = (A @ x.T) @ g  # (r, d_out): ∂/∂Bᵀ of ⟨g, (x Aᵀ) Bᵀ⟩
            gb = (ug if th is None else th * ug).T if need_b else None
            gt = (ug * B.T).sum() if need_t else None  # ⟨gᵀ x, B A⟩ without forming B A
        if need_m:
            c_out, c_in = M.shape
            gm = g.reshape(-1, c_out).T @ x.reshape(-1, c_in)  # the base map's own gradient, Σ over blocks
        return gx, ga, gb, gt, gm, None, gy


def low_rank_apply(
    x: Tensor, A: Tensor, B: Tensor, theta: Tensor | None = None, M: Tensor | None = None, blocks: int = 1,
    add_to: Tensor | None = None,
) -> Tensor:
    """θ·(B·A) applied to the last axis of ``x``, plus an optional block-diagonal base map:
    ``x (I_blocks ⊗ M)ᵀ + θ (x Aᵀ) Bᵀ`` (+ ``add_to``).

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
        add_to: optional (..., d_out) tensor (the layer's own output) added in the same product
            (``addmm``), which saves a pass over the output forward and backward.

    Returns:
        (..., d_out) tensor.

    Example:
        >>> import torch
        >>> x, A, B, y = torch.randn(5, 3), torch.randn(2, 3), torch.randn(4, 2), torch.randn(5, 4)
        >>> bool(torch.allclose(low_rank_apply(x, A, B), x @ (B @ A).T, atol=1e-6))
        True
        >>> bool(torch.allclose(low_rank_apply(x, A, B, add_to=y), y + x @ (B @ A).T, atol=1e-6))
        True
    """
    lead = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1])
    r, d_in = A.shape
    d_out = B.shape[0]
    y = None if add_to is None else add_to.reshape(-1, d_out)
    if not use_factors(d_in, d_out, r, rows=flat.shape[0], fused_base=M is not None):
        W = B @ A if theta is None else theta.to(A.dtype) * (B @ A)
        if M is not None:
            W = torch.kron(torch.eye(blocks, dtype=M.dtype, device=M.device), M) + W
        out = flat @ W.T if y is None else torch.addmm(y, flat, W.T)
    else:
        out = _LowRankApply.apply(flat, A, B, theta, M, blocks, y)
    return out.reshape(*lead, d_out)


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
