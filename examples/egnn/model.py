"""An E(n)-equivariant GNN (Satorras, Hoogeboom & Welling 2021) for the N-body task, as a PyG
``MessagePassing`` layer, written from the paper's equations (velocity variant):

    m_ij = φ_e(h_i, h_j, ||x_i − x_j||², a_ij)
    x_i' = x_i + φ_v(h_i) · v_i + mean_{j≠i} (x_i − x_j) · φ_x(m_ij)
    h_i' = h_i + φ_h(h_i, Σ_j m_ij)

Inputs of the model: positions and velocities at frame 30, the speed |v_i| as the initial node
feature and a_ij = q_i q_j as the edge attribute; output: positions at frame 40.

Importing this module declares :class:`EGNNLayer` to the relax-plugins ``pyg`` adapter: h are
``hidden`` invariant scalars, ``pos`` a position (centred per graph through ``batch``), ``vel`` one
vector, and the layer returns new (h, pos).
"""

from __future__ import annotations

import relax_pyg
import torch
from torch import Tensor, nn
from torch_geometric.nn import MessagePassing

__all__ = ["EGNNLayer", "EGNN", "EGNNSystems", "nbody_graph"]


def _mlp(d_in: int, d_hidden: int, d_out: int, final_act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(d_in, d_hidden), nn.SiLU(), nn.Linear(d_hidden, d_out)]
    if final_act:
        layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class EGNNLayer(MessagePassing):
    """One E(n)-equivariant layer with a velocity term.

    Args:
        hidden: width of the invariant features h and messages.
        edge_dim: number of invariant edge attributes.

    Example:
        >>> import torch
        >>> layer = EGNNLayer(8)
        >>> batch = torch.zeros(5, dtype=torch.long)
        >>> h, x = layer(torch.randn(5, 8), torch.randn(5, 3), torch.randn(5, 3),
        ...              relax_pyg.fully_connected_edge_index(batch), torch.randn(20, 1), batch)
        >>> h.shape, x.shape
        (torch.Size([5, 8]), torch.Size([5, 3]))
    """

    def __init__(self, hidden: int, edge_dim: int = 1) -> None:
        super().__init__(aggr="add")
        self.hidden = hidden
        self.phi_e = _mlp(2 * hidden + 1 + edge_dim, hidden, hidden)
        self.phi_h = _mlp(2 * hidden, hidden, hidden, final_act=False)
        self.phi_x = _mlp(hidden, hidden, 1, final_act=False)
        self.phi_v = _mlp(hidden, hidden, 1, final_act=False)
        # small initial coordinate updates keep the first steps stable (as in the reference model)
        nn.init.xavier_uniform_(self.phi_x[-1].weight, gain=1e-3)
        nn.init.zeros_(self.phi_x[-1].bias)

    def forward(
        self, h: Tensor, pos: Tensor, vel: Tensor, edge_index: Tensor, edge_attr: Tensor, batch: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """New (h, pos). ``batch`` is not used by the layer itself; a relaxation uses it to take
        positions relative to each graph's centroid."""
        src, dst = edge_index
        rel = pos.index_select(0, dst) - pos.index_select(0, src)  # x_i − x_j, i = target
        dist2 = rel.square().sum(-1, keepdim=True)
        m = self.phi_e(torch.cat([h.index_select(0, dst), h.index_select(0, src), dist2, edge_attr], -1))
        n = h.shape[0]
        deg = torch.zeros(n, 1, dtype=h.dtype, device=h.device).index_add_(
            0, dst, torch.ones(dst.shape[0], 1, dtype=h.dtype, device=h.device)
        )
        shift = torch.zeros_like(pos).index_add_(0, dst, rel * self.phi_x(m)) / deg.clamp_min(1.0)
        pos = pos + self.phi_v(h) * vel + shift
        agg = self.propagate(edge_index, m=m, size=(n, n))
        h = h + self.phi_h(torch.cat([h, agg], -1))
        return h, pos

    def message(self, m: Tensor) -> Tensor:
        return m


relax_pyg.declare(
    EGNNLayer,
    inputs={"h": lambda layer: f"{layer.hidden}x0e", "pos": "pos", "vel": "1x1o"},
    outputs=(lambda layer: f"{layer.hidden}x0e", "pos"),
    group="O(3)",
    batch="batch",
)


def nbody_graph(n_graphs: int, n_nodes: int = 5, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """``batch`` and fully connected ``edge_index`` (no self-loops) for ``n_graphs`` graphs of
    ``n_nodes`` nodes, nodes numbered graph by graph.

    Example:
        >>> batch, edges = nbody_graph(2, 3)
        >>> batch.tolist(), edges.shape
        ([0, 0, 0, 1, 1, 1], torch.Size([2, 12]))
    """
    batch = torch.arange(n_graphs, device=device).repeat_interleave(n_nodes)
    return batch, relax_pyg.fully_connected_edge_index(batch)


class EGNN(nn.Module):
    """EGNN for the N-body task: ``forward(loc, vel, charges, edge_index, batch)`` on flattened
    nodes ((N, 3), (N, 3), (N, 1)) returns predicted positions (N, 3).

    Example:
        >>> import torch
        >>> batch, edges = nbody_graph(2)
        >>> EGNN(hidden=8, layers=2)(torch.randn(10, 3), torch.randn(10, 3), torch.ones(10, 1), edges, batch).shape
        torch.Size([10, 3])
    """

    def __init__(self, hidden: int = 64, layers: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(1, hidden)
        self.layers = nn.ModuleList(EGNNLayer(hidden, edge_dim=1) for _ in range(layers))

    def forward(self, loc: Tensor, vel: Tensor, charges: Tensor, edge_index: Tensor, batch: Tensor) -> Tensor:
        h = self.embed(vel.norm(dim=-1, keepdim=True))
        edge_attr = charges.index_select(0, edge_index[0]) * charges.index_select(0, edge_index[1])
        x = loc
        for layer in self.layers:
            h, x = layer(h, x, vel, edge_index, edge_attr, batch)
        return x


class EGNNSystems(nn.Module):
    """:class:`EGNN` on batches of systems ((B, n, 3) positions and velocities, (B, n, 1) charges), the
    N-body runner's interface (as :class:`examples.nbody.model.SEGNN`): each system is one fully
    connected graph, built here.

    Example:
        >>> import torch
        >>> EGNNSystems(hidden=8, layers=2)(torch.randn(2, 5, 3), torch.randn(2, 5, 3), torch.ones(2, 5, 1)).shape
        torch.Size([2, 5, 3])
    """

    def __init__(self, hidden: int = 64, layers: int = 4) -> None:
        super().__init__()
        self.egnn = EGNN(hidden=hidden, layers=layers)
        self._graphs: dict[tuple, tuple[Tensor, Tensor]] = {}  # (B, n, device) → graph: rebuilt per step otherwise

    def forward(self, loc: Tensor, vel: Tensor, charges: Tensor) -> Tensor:
        B, n, _ = loc.shape
        key = (B, n, loc.device)
        if key not in self._graphs:
            self._graphs[key] = nbody_graph(B, n, device=loc.device)
        batch, edges = self._graphs[key]
        out = self.egnn(loc.reshape(B * n, 3), vel.reshape(B * n, 3), charges.reshape(B * n, 1), edges, batch)
        return out.reshape(B, n, 3)
