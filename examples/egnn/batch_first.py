"""An EGNN in the batch-first layout of ``egnn-pytorch``: ``feats [B, N, D]``, ``coors [B, N, 3]``,
an optional node ``mask [B, N]``, dense all-pairs messages, ``forward`` returning ``(feats, coors)``.

Written here from the EGNN equations (Satorras et al. 2021), in that package's style (no PyG graph,
no ``batch`` vector: one graph per row)::

    m_ij = φ_e(h_i, h_j, ||x_i − x_j||²)                  (pairs of real nodes, i ≠ j)
    x_i' = x_i + Σ_j (x_i − x_j) · φ_x(m_ij) / (number of neighbours)
    h_i' = h_i + φ_h(h_i, Σ_j m_ij)

Importing this module declares :class:`BatchFirstEGNNLayer` to the relax-plugins ``pyg`` adapter
with ``node_axes=2``: W acts on each node's fibre (``D`` scalars and its position relative to its
own graph's centroid over the real nodes), so the relaxed layer stays permutation- and
translation-equivariant and breaks rotations only::

    import relax_plugins as rp
    from examples.egnn.batch_first import BatchFirstEGNN

    model = BatchFirstEGNN(dim=16, depth=2)
    rp.relax(model, adapters=["pyg"])            # every layer -> f(x) + θ·W·x, per node
    ...
    rp.project(model)                            # original classes and keys, E(3)-equivariant
"""

from __future__ import annotations

import relax_pyg
import torch
from torch import Tensor, nn

__all__ = ["BatchFirstEGNNLayer", "BatchFirstEGNN"]


class BatchFirstEGNNLayer(nn.Module):
    """One E(n)-equivariant layer on batch-first tensors.

    Args:
        dim: width D of the invariant node features.
        hidden: width of the message MLPs (default ``dim``).

    Example:
        >>> import torch
        >>> layer = BatchFirstEGNNLayer(8)
        >>> h, x = layer(torch.randn(2, 5, 8), torch.randn(2, 5, 3))
        >>> tuple(h.shape), tuple(x.shape)
        ((2, 5, 8), (2, 5, 3))
    """

    def __init__(self, dim: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or dim
        self.dim = dim
        self.edge_mlp = nn.Sequential(nn.Linear(2 * dim + 1, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        self.coors_mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        self.node_mlp = nn.Sequential(nn.Linear(dim + hidden, hidden), nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, feats: Tensor, coors: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        b, n, _ = feats.shape
        rel = coors[:, :, None, :] - coors[:, None, :, :]  # [B, N, N, 3]: x_i − x_j
        dist2 = rel.square().sum(-1, keepdim=True)
        hi = feats[:, :, None, :].expand(b, n, n, self.dim)
        hj = feats[:, None, :, :].expand(b, n, n, self.dim)
        m = self.edge_mlp(torch.cat([hi, hj, dist2], dim=-1))  # [B, N, N, hidden]
        pair = ~torch.eye(n, dtype=torch.bool, device=feats.device).expand(b, n, n)
        if mask is not None:
            pair = pair & mask[:, :, None] & mask[:, None, :]
        pm = pair.to(feats.dtype)[..., None]
        m = m * pm
        deg = pm.sum(2).clamp_min(1.0)  # [B, N, 1]
        coors_out = coors + (rel * self.coors_mlp(m) * pm).sum(2) / deg
        feats_out = feats + self.node_mlp(torch.cat([feats, m.sum(2)], dim=-1))
        return feats_out, coors_out


relax_pyg.declare(
    BatchFirstEGNNLayer,
    inputs={"feats": lambda layer: f"{layer.dim}x0e", "coors": "pos"},
    outputs=(lambda layer: f"{layer.dim}x0e", "pos"),
    group="O(3)",
    node_axes=2,  # [B, N, ...]: one graph per row, W per node
    mask="mask",
)


class BatchFirstEGNN(nn.Module):
    """A stack of :class:`BatchFirstEGNNLayer`: ``forward(feats [B, N, F], coors [B, N, 3], mask)``
    returns ``(node features [B, N, dim], coordinates [B, N, 3])``.

    Example:
        >>> import torch
        >>> h, x = BatchFirstEGNN(in_dim=4, dim=8, depth=2)(torch.randn(3, 6, 4), torch.randn(3, 6, 3))
        >>> tuple(h.shape), tuple(x.shape)
        ((3, 6, 8), (3, 6, 3))
    """

    def __init__(self, in_dim: int = 1, dim: int = 16, depth: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(in_dim, dim)
        self.layers = nn.ModuleList(BatchFirstEGNNLayer(dim) for _ in range(depth))

    def forward(self, feats: Tensor, coors: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        h = self.embed(feats)
        for layer in self.layers:
            h, coors = layer(h, coors, mask)
        return h, coors
