"""Graph construction in plain torch, for machines without pyg-lib / torch-cluster.

PyG's ``radius_graph`` and ``knn_graph`` need pyg-lib or torch-cluster (neither installs from PyPI
wheels here); for small molecules and N-body systems an O(N²)-per-graph dense construction is fast.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["fully_connected_edge_index", "radius_graph_dense"]


def _same_graph(batch: Tensor) -> Tensor:
    return batch[:, None] == batch[None, :]


def fully_connected_edge_index(batch: Tensor, loop: bool = False) -> Tensor:
    """Edges between every ordered pair of nodes of the same graph, (2, E), source row first.

    Args:
        batch: (N,) graph index of each node.
        loop: include self-loops.

    Example:
        >>> import torch
        >>> fully_connected_edge_index(torch.tensor([0, 0, 1, 1])).tolist()
        [[1, 0, 3, 2], [0, 1, 2, 3]]
    """
    mask = _same_graph(batch)
    if not loop:
        mask.fill_diagonal_(False)
    dst, src = mask.nonzero(as_tuple=True)  # row-major in the target: edges grouped by target node
    return torch.stack([src, dst])


def radius_graph_dense(
    pos: Tensor,
    r: float,
    batch: Tensor | None = None,
    loop: bool = False,
    max_num_neighbors: int = 32,
) -> Tensor:
    """Drop-in for ``torch_geometric.nn.radius_graph`` (flow source → target), O(N²) memory.

    Keeps, for each target node, its ``max_num_neighbors`` nearest sources within distance ``r``
    (PyG keeps an arbitrary subset when there are more; nearest-first is deterministic).

    Example:
        >>> import torch
        >>> pos = torch.tensor([[0., 0, 0], [1, 0, 0], [5, 0, 0]])
        >>> radius_graph_dense(pos, r=2.0).tolist()
        [[1, 0], [0, 1]]
    """
    n = pos.shape[0]
    if batch is None:
        batch = torch.zeros(n, dtype=torch.long, device=pos.device)
    dist = torch.cdist(pos, pos)
    ok = _same_graph(batch) & (dist <= r)
    if not loop:
        ok.fill_diagonal_(False)
    if n > max_num_neighbors:
        big = torch.finfo(dist.dtype).max
        masked = torch.where(ok, dist, torch.full_like(dist, big))
        k = min(max_num_neighbors, n)
        keep = torch.zeros_like(ok)
        keep.scatter_(1, masked.topk(k, dim=1, largest=False).indices, True)
        ok = ok & keep
    dst, src = ok.nonzero(as_tuple=True)
    return torch.stack([src, dst])
