"""Small equivariant layers shared by several test modules."""

from __future__ import annotations

import torch


class VecLayer(torch.nn.Module):
    """Equivariant toy layer with vector channels (N, C, 3) and keyword-only edge arguments: vectors
    mixed over channels plus the summed relative positions of incoming edges (2x1o → 2x1o)."""

    def __init__(self, c: int = 2) -> None:
        super().__init__()
        self.mix = torch.nn.Parameter(torch.randn(c, c))

    def forward(self, vec, pos, *, edge_index=None):
        src, dst = edge_index
        rel = torch.zeros_like(pos).index_add_(0, dst, pos[dst] - pos[src])
        return torch.einsum("oc,ncd->nod", self.mix, vec) + rel[:, None, :]
