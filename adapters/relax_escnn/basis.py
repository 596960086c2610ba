"""Least-squares projection of a dense kernel onto an escnn layer's own equivariant basis.

escnn expands a layer's ``weights`` through a :class:`~escnn.nn.modules.basismanager.BlocksBasisExpansion`:
for every pair (input representation, output representation) one sampled basis ``B`` of shape
(d, o, i, S) is shared by all field pairs of that kind, each with its own ``d`` coefficients. The
map weights → filter is therefore block-diagonal, and the least-squares problem

    min_w || expand(w) − K ||²

splits into one small problem per representation pair, solved for all field pairs at once with the
pseudo-inverse of the (o·i·S, d) matrix of ``B``. The sampled columns are *not* orthogonal (escnn
normalises them but does not orthogonalise them), so a real least-squares solve is needed; the
pseudo-inverse is computed once in float64 and cached.

This module imports escnn.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from escnn.nn.modules.basismanager import BlocksBasisExpansion
from torch import Tensor

__all__ = ["BasisProjector", "eval_cache_delta", "refresh_eval_cache"]

# above this many entries, the generic dense fallback (Jacobian of the expansion) is refused
_MAX_DENSE = 50_000_000


class BasisProjector:
    """Orthogonal projection (least squares) onto the span of an escnn basis expansion.

    Works on kernels in the *basis layout* (out_size, in_size, S) that ``basisexpansion(weights)``
    returns (S = number of sampled points, 1 for ``nn.Linear``).

    Args:
        expansion: the layer's ``basisexpansion`` (``BlocksBasisExpansion``; any other linear
            expansion falls back to a dense Jacobian, fine for small layers only).
        out_size: rows of the kernel (``out_type.size``).
        in_size: columns of the kernel (input fibre size, per group for grouped convolutions).

    Example:
        >>> import torch
        >>> from escnn import gspaces, nn
        >>> gs = gspaces.rot2dOnR2(4)
        >>> t = nn.FieldType(gs, [gs.regular_repr])
        >>> conv = nn.R2Conv(t, t, 3)
        >>> proj = BasisProjector(conv.basisexpansion, t.size, t.size)
        >>> K = conv.basisexpansion(conv.weights).detach()
        >>> bool(torch.allclose(proj.coefficients(K), conv.weights.detach(), atol=1e-5))
        True
    """

    def __init__(self, expansion: torch.nn.Module, out_size: int, in_size: int) -> None:
        self.expansion = expansion
        self.out_size, self.in_size = int(out_size), int(in_size)
        self.dim = int(expansion.dimension())
        self._blocks: list[tuple] | None = None  # float64 master copies, built lazily
        self._dense_pinv: Tensor | None = None
        self._cast: dict[tuple, list] = {}

    # -- set-up -------------------------------------------------------------------------------
    def _build(self) -> None:
        if self._blocks is not None or self._dense_pinv is not None:
            return
        be = self.expansion
        if isinstance(be, BlocksBasisExpansion):
            blocks = []
            for pair in be._representations_pairs:
                key = be._escape_pair(pair)
                block = getattr(be, f"block_expansion_{key}")
                B = block.sampled_basis.detach().to("cpu", torch.float64)  # (d, o, i, S)
                d = B.shape[0]
                M = B.reshape(d, -1).T  # (o·i·S, d), columns are the sampled basis elements
                pinv = torch.linalg.pinv(M)  # (d, o·i·S): a proper solve, the columns are not orthogonal
                start, stop = be._weights_ranges[pair]
                out_idx = getattr(be, f"out_indices_{key}")
                in_idx = getattr(be, f"in_indices_{key}")
                if be._contiguous[pair]:
                    rows = torch.arange(int(out_idx[0]), int(out_idx[1]))
                    cols = torch.arange(int(in_idx[0]), int(in_idx[1]))
                else:
                    # meshgrid (ij) of all output × all input channel indices, flattened
                    n_out = int(torch.unique(out_idx).numel())
                    n_in = int(torch.unique(in_idx).numel())
                    rows = out_idx.reshape(n_out, n_in)[:, 0].cpu()
                    cols = in_idx.reshape(n_out, n_in)[0, :].cpu()
                o, i = B.shape[1], B.shape[2]
                n_oc, n_ic = be._out_count[pair[1]], be._in_count[pair[0]]
                blocks.append((pinv, rows, cols, o, i, n_oc, n_ic, start, stop))
            self._blocks = blocks
        else:
            n = self.dim * self.out_size * self.in_size
            if n > _MAX_DENSE:
                raise NotImplementedError(f"basis expansion {type(be).__name__} is too large for a dense projection")
            # the expansion is linear in the weights: its Jacobian is the basis matrix
            eye = torch.eye(self.dim, dtype=torch.float64)
            ref = next((b for b in be.buffers() if b.is_floating_point()), None)
            cols = [be(e.to(ref.dtype if ref is not None else torch.float32)).double().reshape(-1) for e in eye]
            M = torch.stack(cols, dim=1)
            self._dense_pinv = torch.linalg.pinv(M)

    def _for(self, dtype: torch.dtype, device: torch.device) -> list:
        self._build()
        key = (dtype, device)
        if key not in self._cast:
            if self._blocks is not None:
                self._cast[key] = [
                    (p.to(device, dtype), r.to(device), c.to(device), *rest) for p, r, c, *rest in self._blocks
                ]
            else:
                self._cast[key] = [self._dense_pinv.to(device, dtype)]
        return self._cast[key]

    # -- maths --------------------------------------------------------------------------------
    def coefficients(self, K: Tensor) -> Tensor:
        """Least-squares coefficients w (shape (dim,)) with expand(w) ≈ K; differentiable in K.

        Args:
            K: kernel in basis layout, (out_size, in_size, S) or anything reshapable to it.
        """
        K = K.reshape(self.out_size, self.in_size, -1)
        S = K.shape[-1]
        parts = self._for(K.dtype, K.device)
        # in K's own precision even under autocast: bf16 matmuls would spoil the projection (and the
        # index_add of a bf16 product into a float32 buffer fails)
        with torch.autocast(K.device.type, enabled=False):
            if self._blocks is None:
                return parts[0] @ K.reshape(-1)
            w = K.new_zeros(self.dim)
            for pinv, rows, cols, o, i, n_oc, n_ic, start, stop in parts:
                sub = K.index_select(0, rows).index_select(1, cols)  # (n_oc·o, n_ic·i, S)
                sub = sub.reshape(n_oc, o, n_ic, i, S).permute(0, 2, 1, 3, 4).reshape(n_oc * n_ic, o * i * S)
                w = w.index_add(0, torch.arange(start, stop, device=K.device), (sub @ pinv.T).reshape(-1))
            return w

    def expand(self, w: Tensor) -> Tensor:
        """The kernel (out_size, in_size, S) of coefficients ``w``, by escnn's own expansion."""
        with torch.autocast(w.device.type, enabled=False):
            return self.expansion(w).reshape(self.out_size, self.in_size, -1)

    def project(self, K: Tensor) -> Tensor:
        """P(K): the closest kernel (Frobenius norm) in the span of the basis, same shape as K."""
        return self.expand(self.coefficients(K)).reshape(K.shape)


def eval_cache_delta(
    base: torch.nn.Module, name: str, w: Tensor, expand: Callable[[Tensor], Tensor]
) -> dict[str, Tensor]:
    """The change of escnn's eval-mode cache ``name`` (``filter`` of a convolution, ``matrix`` of a
    Linear) when ``w`` is added to ``base.weights``: ``expand(w)`` in the cache's shape, as escnn
    would expand it (``w`` cast to the weights' dtype first). Empty in train mode, where escnn
    expands the weights at every call and the cache (if any) is stale by design."""
    cached = base._buffers.get(name)
    if base.training or cached is None:
        return {}
    dw = w.to(base.weights.dtype)
    return {name: expand(dw.to(base.weights.device)).reshape(cached.shape)}


def refresh_eval_cache(base: torch.nn.Module, name: str) -> None:
    """Rebuild escnn's eval-mode cache ``name`` (and ``expanded_bias``) from the merged weights, as
    ``eval()`` builds it (``base.expand_parameters()``), each as a new buffer in its old slot: the
    state_dict keeps its key order, and the relax-plugins core can put the old buffers back."""
    if base.training or base._buffers.get(name) is None:
        return
    with torch.no_grad():
        cache, bias = base.expand_parameters()
    base._buffers[name] = cache
    if bias is not None and base._buffers.get("expanded_bias") is not None:
        base._buffers["expanded_bias"] = bias
