"""PyG's ViSNet with a pure-torch radius graph.

``torch_geometric.nn.models.visnet.Distance`` calls ``radius_graph``, which needs pyg-lib or
torch-cluster (neither is installable from wheels here). :class:`DenseDistance` is a drop-in
subclass built on :func:`relax_pyg.radius_graph_dense`; it has no parameters, so swapping it in
leaves the state_dict unchanged and the model loadable by plain PyG.
"""

from __future__ import annotations

import relax_pyg
import torch
from torch import Tensor
from torch_geometric.nn.models import ViSNet
from torch_geometric.nn.models.visnet import Distance

__all__ = ["DenseDistance", "make_visnet"]


class DenseDistance(Distance):
    """``Distance`` with an O(N²) radius graph; edge weights in the positions' dtype (PyG's uses
    the default dtype, which breaks float64 models).

    Example:
        >>> import torch
        >>> pos, batch = torch.tensor([[0., 0, 0], [1, 0, 0]]), torch.zeros(2, dtype=torch.long)
        >>> ei, w, vec = DenseDistance(cutoff=2.0)(pos, batch)
        >>> ei.shape[1], w.tolist()
        (4, [0.0, 1.0, 1.0, 0.0])
    """

    def forward(self, pos: Tensor, batch: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        edge_index = relax_pyg.radius_graph_dense(
            pos, r=self.cutoff, batch=batch, loop=self.add_self_loops, max_num_neighbors=self.max_num_neighbors
        )
        edge_vec = pos[edge_index[0]] - pos[edge_index[1]]
        if self.add_self_loops:
            mask = edge_index[0] != edge_index[1]
            edge_weight = torch.zeros(edge_vec.size(0), dtype=pos.dtype, device=pos.device)
            edge_weight[mask] = torch.norm(edge_vec[mask], dim=-1)
        else:
            edge_weight = torch.norm(edge_vec, dim=-1)
        return edge_index, edge_weight, edge_vec


def make_visnet(**kwargs) -> ViSNet:
    """A ``torch_geometric.nn.models.ViSNet`` whose distance module is :class:`DenseDistance`.

    Example:
        >>> m = make_visnet(hidden_channels=16, num_heads=2, num_layers=2, num_rbf=8, lmax=2)
        >>> type(m.representation_model.distance).__name__
        'DenseDistance'
    """
    model = ViSNet(**kwargs)
    rep = model.representation_model
    old = rep.distance
    rep.distance = DenseDistance(old.cutoff, max_num_neighbors=old.max_num_neighbors, add_self_loops=old.add_self_loops)
    return model
