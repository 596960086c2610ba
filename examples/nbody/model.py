"""A SEGNN-style steerable E(3)-equivariant graph network for the charged N-body task, in e3nn.

After Brandstetter et al. (2022), "Geometric and Physical Quantities Improve E(3) Equivariant
Message Passing": every learnable layer is an ``o3.FullyConnectedTensorProduct`` of node/edge
features with *steerable attributes* (spherical harmonics), followed by a swish gate.

* node input ``2x1o + 1x0e``: x − centroid of its system, v, |v|;
* edge attributes: spherical harmonics (l ≤ ``lmax_attr``) of x_i − x_j;
* node attributes: mean of the incident edge harmonics + harmonics of v;
* message scalars ``2x0e``: ||x_i − x_j||², q_i·q_j;
* ``layers`` message-passing layers on the fully connected graph of each 5-particle system
  (sum aggregation, residual update); output ``1x1o`` added to x.

Message passing is plain torch (``index_add``) so no optional graph library is needed. The model is
exactly E(3)-equivariant (rotations, inversion, translations); ``relax_plugins.relax`` relaxes each
tensor product (W on its first input).
"""

from __future__ import annotations

import torch
from e3nn import o3
from e3nn.nn import Gate
from torch import Tensor, nn

__all__ = ["SEGNN", "TensorProductBlock", "fully_connected_edges"]


def fully_connected_edges(n_systems: int, n_per: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """Ordered pairs (i, j), i ≠ j, within each system of ``n_per`` consecutive nodes.

    Example:
        >>> src, dst = fully_connected_edges(2, 3)
        >>> src.tolist()[:6], dst.tolist()[:6]
        ([0, 0, 1, 1, 2, 2], [1, 2, 0, 2, 0, 1])
    """
    i, j = torch.meshgrid(torch.arange(n_per), torch.arange(n_per), indexing="ij")
    keep = i != j
    i, j = i[keep], j[keep]
    offset = (torch.arange(n_systems) * n_per)[:, None]
    return (i[None] + offset).reshape(-1).to(device), (j[None] + offset).reshape(-1).to(device)


class TensorProductBlock(nn.Module):
    """SEGNN's ``O3TensorProduct`` (+ optional swish gate): FCTP(x, attr) + bias on the 0e outputs.

    Args:
        irreps_in: irreps of the features.
        irreps_attr: irreps of the steerable attribute.
        irreps_out: irreps of the output.
        gate: apply a gate (SiLU on scalars, sigmoid gates on the other irreps).

    Example:
        >>> blk = TensorProductBlock("2x1o + 1x0e", "1x0e + 1x1o", "4x0e + 2x1o", gate=True)
        >>> blk(torch.randn(3, 7), torch.randn(3, 4)).shape
        torch.Size([3, 10])
    """

    def __init__(self, irreps_in: str | o3.Irreps, irreps_attr: str | o3.Irreps, irreps_out: str | o3.Irreps,
                 gate: bool = False) -> None:
        super().__init__()
        irreps_out = o3.Irreps(irreps_out).simplify()
        self.irreps_in, self.irreps_out = o3.Irreps(irreps_in), irreps_out
        if gate:
            scalars = o3.Irreps([(m, ir) for m, ir in irreps_out if ir.l == 0])
            gated = o3.Irreps([(m, ir) for m, ir in irreps_out if ir.l > 0])
            gates = o3.Irreps(f"{gated.num_irreps}x0e") if gated.num_irreps > 0 else o3.Irreps("")
            self.gate: nn.Module | None = Gate(
                scalars, [nn.functional.silu] * len(scalars), gates, [torch.sigmoid] * len(gates), gated
            )
            tp_out = self.gate.irreps_in
        else:
            self.gate, tp_out = None, irreps_out
        self.tp = o3.FullyConnectedTensorProduct(self.irreps_in, irreps_attr, tp_out, shared_weights=True)
        self.scalar_mask: Tensor
        mask = torch.cat([torch.full((mul * ir.dim,), float(ir == o3.Irrep("0e"))) for mul, ir in tp_out])
        self.register_buffer("scalar_mask", mask, persistent=False)
        self.bias = nn.Parameter(torch.zeros(tp_out.dim))

    def forward(self, x: Tensor, attr: Tensor) -> Tensor:
        # a bias only on the invariant (0e) outputs keeps the block equivariant
        y = self.tp(x, attr) + self.bias * self.scalar_mask
        return y if self.gate is None else self.gate(y)


class SEGNN(nn.Module):
    """SEGNN-like model for the charged N-body task (inputs at frame 30 → positions at frame 40).

    Args:
        hidden_irreps: irreps of the hidden node features.
        layers: number of message-passing layers.
        lmax_attr: largest l of the steerable attributes.
        n_particles: particles per system.

    Example:
        >>> model = SEGNN("8x0e + 4x1o", layers=1)
        >>> model(torch.randn(2, 5, 3), torch.randn(2, 5, 3), torch.ones(2, 5, 1)).shape
        torch.Size([2, 5, 3])
    """

    def __init__(self, hidden_irreps: str | o3.Irreps = "16x0e + 8x1o", layers: int = 4, lmax_attr: int = 1,
                 n_particles: int = 5) -> None:
        super().__init__()
        hidden = o3.Irreps(hidden_irreps).simplify()
        self.attr_irreps = o3.Irreps.spherical_harmonics(lmax_attr)
        self.n_particles = n_particles
        self.embed = TensorProductBlock("2x1o + 1x0e", self.attr_irreps, hidden)
        msg_in, msg_idx = self._sorted_layout([hidden, hidden, o3.Irreps("2x0e")])
        attr = self.attr_irreps
        self.message1 = nn.ModuleList(TensorProductBlock(msg_in, attr, hidden, gate=True) for _ in range(layers))
        self.message2 = nn.ModuleList(TensorProductBlock(hidden, attr, hidden, gate=True) for _ in range(layers))
        upd_in, upd_idx = self._sorted_layout([hidden, hidden])
        self.update1 = nn.ModuleList(TensorProductBlock(upd_in, attr, hidden, gate=True) for _ in range(layers))
        self.update2 = nn.ModuleList(TensorProductBlock(hidden, self.attr_irreps, hidden) for _ in range(layers))
        self.readout1 = TensorProductBlock(hidden, self.attr_irreps, hidden, gate=True)
        self.readout2 = TensorProductBlock(hidden, self.attr_irreps, "1x1o")
        self.hidden_irreps, self.msg_in, self.upd_in = hidden, msg_in, upd_in
        self.register_buffer("msg_idx", msg_idx, persistent=False)
        self.register_buffer("upd_idx", upd_idx, persistent=False)

    @staticmethod
    def _sorted_layout(parts: list[o3.Irreps]) -> tuple[o3.Irreps, Tensor]:
        """Irreps of the concatenation of ``parts`` once sorted (what the next layer expects) and
        the index that sorts the concatenated tensor."""
        irreps = sum(parts, o3.Irreps(""))
        sorted_irreps, _, inv = irreps.sort()  # inv[new position] = old position
        idx = torch.cat([torch.arange(s.start, s.stop) for s in (irreps.slices()[i] for i in inv)])
        return sorted_irreps.simplify(), idx

    def forward(self, loc: Tensor, vel: Tensor, charges: Tensor) -> Tensor:
        """Predicted positions (B, n, 3) from positions, velocities (B, n, 3) and charges (B, n, 1)."""
        B, n, _ = loc.shape
        src, dst = fully_connected_edges(B, n, loc.device)
        x = loc.reshape(B * n, 3)
        v = vel.reshape(B * n, 3)
        q = charges.reshape(B * n, 1)
        # subtract the centroid of each system (not a per-particle coordinate mean)
        centred = (loc - loc.mean(dim=1, keepdim=True)).reshape(B * n, 3)
        rel = x[dst] - x[src]  # x_i - x_j for the message j → i (i = dst)
        edge_attr = o3.spherical_harmonics(self.attr_irreps, rel, normalize=True, normalization="integral")
        node_attr = torch.zeros(B * n, edge_attr.shape[-1], dtype=x.dtype, device=x.device)
        node_attr = node_attr.index_add(0, dst, edge_attr) / (n - 1)
        node_attr = node_attr + o3.spherical_harmonics(self.attr_irreps, v, normalize=True, normalization="integral")
        edge_scalars = torch.cat([rel.square().sum(-1, keepdim=True), q[dst] * q[src]], dim=-1)

        h = self.embed(torch.cat([centred, v, v.norm(dim=-1, keepdim=True)], dim=-1), node_attr)
        for m1, m2, u1, u2 in zip(self.message1, self.message2, self.update1, self.update2):
            msg_in = torch.cat([h[dst], h[src], edge_scalars], dim=-1)[:, self.msg_idx]
            m = m2(m1(msg_in, edge_attr), edge_attr)
            agg = torch.zeros_like(h).index_add(0, dst, m)
            upd_in = torch.cat([h, agg], dim=-1)[:, self.upd_idx]
            h = h + u2(u1(upd_in, node_attr), node_attr)
        out = self.readout2(self.readout1(h, node_attr), node_attr)
        return (x + out).reshape(B, n, 3)
