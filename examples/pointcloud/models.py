"""VN-PointNet and VN-DGCNN classifiers built from :mod:`relax_vn.layers` (SO(3)-invariant logits).

Architectures follow the vector-neuron paper (Deng et al. 2021): channel counts are the ordinary
PointNet / DGCNN widths divided by 3 (a VN channel holds 3 numbers), scaled here by ``width`` so
that the CPU benchmark stays small. Input: points ``[B, 3, N]``.
"""

from __future__ import annotations

import torch
from relax_vn.layers import (
    VNBatchNorm,
    VNLinear,
    VNLinearLeakyReLU,
    VNStdFeature,
    graph_feature_cross,
    vn_mean_pool,
)
from torch import Tensor, nn

__all__ = ["VNPointNet", "VNDGCNN", "build_model"]


def _head(in_features: int, n_classes: int, hidden: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_features, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(hidden, hidden // 2, bias=False), nn.BatchNorm1d(hidden // 2), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(hidden // 2, n_classes),
    )


class VNPointNet(nn.Module):
    """VN-PointNet: edge features → per-point VN MLP → global mean concat → invariant frame → max.

    Args:
        n_classes: output logits.
        k: neighbours of the input edge features.
        widths: VN channels of (edge conv, conv1, conv2, conv3); the paper's are (21, 21, 42, 341).
        hidden: width of the invariant classification head.
        dropout: head dropout.

    Example:
        >>> import torch
        >>> VNPointNet(5, k=4, widths=(4, 4, 8, 16))(torch.randn(2, 3, 20)).shape
        torch.Size([2, 5])
    """

    def __init__(
        self,
        n_classes: int,
        k: int = 16,
        widths: tuple[int, int, int, int] = (16, 16, 32, 128),
        hidden: int = 128,
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        c0, c1, c2, c3 = widths
        self.k = k
        self.conv_pos = VNLinearLeakyReLU(3, c0)
        self.conv1 = VNLinearLeakyReLU(c0, c1)
        self.conv2 = VNLinearLeakyReLU(c1, c2)
        self.conv3 = VNLinear(c2, c3)
        self.bn3 = VNBatchNorm(c3)
        self.std_feature = VNStdFeature(2 * c3, normalize_frame=False)
        self.head = _head(2 * c3 * 3, n_classes, hidden, dropout)

    def forward(self, points: Tensor) -> Tensor:
        x = vn_mean_pool(self.conv_pos(graph_feature_cross(points, self.k)))  # [B, c0, 3, N]
        x = self.conv2(self.conv1(x))
        x = self.bn3(self.conv3(x))  # [B, c3, 3, N]
        x = torch.cat((x, x.mean(-1, keepdim=True).expand_as(x)), dim=1)
        x, _ = self.std_feature(x)  # invariant [B, 2 c3, 3, N]
        return self.head(x.flatten(1, 2).max(dim=-1).values)


def _edge_features(x: Tensor, k: int) -> Tensor:
    """DGCNN edge features on VN channels: (x_j − x_i, x_i) over the k-NN graph of the channel-mean
    positions, ``[B, 2C, 3, N, k]`` (equivariant: distances are invariant)."""
    B, C, _, N = x.shape
    pts = x.mean(1)  # [B, 3, N], an equivariant per-point position for the graph
    idx = torch.cdist(pts.transpose(1, 2), pts.transpose(1, 2)).topk(k, dim=-1, largest=False).indices
    flat = x.permute(0, 3, 1, 2).reshape(B, N, C * 3)
    nb = flat[torch.arange(B, device=x.device)[:, None, None], idx].reshape(B, N, k, C, 3)
    ctr = x.permute(0, 3, 1, 2)[:, :, None].expand(B, N, k, C, 3)
    return torch.cat((nb - ctr, ctr), dim=3).permute(0, 3, 4, 1, 2).contiguous()


class VNDGCNN(nn.Module):
    """A small VN-DGCNN: EdgeConv blocks on dynamic k-NN graphs, mean over neighbours.

    Example:
        >>> import torch
        >>> VNDGCNN(5, k=4, widths=(4, 4, 8))(torch.randn(2, 3, 20)).shape
        torch.Size([2, 5])
    """

    def __init__(
        self, n_classes: int, k: int = 16, widths: tuple[int, int, int] = (16, 16, 64), hidden: int = 128,
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        c1, c2, c3 = widths
        self.k = k
        self.conv1 = VNLinearLeakyReLU(3, c1)
        self.conv2 = VNLinearLeakyReLU(2 * c1, c2)
        self.conv3 = VNLinearLeakyReLU(c1 + c2, c3)
        self.std_feature = VNStdFeature(2 * c3, normalize_frame=False)
        self.head = _head(2 * c3 * 3, n_classes, hidden, dropout)

    def forward(self, points: Tensor) -> Tensor:
        x1 = vn_mean_pool(self.conv1(graph_feature_cross(points, self.k)))  # [B, c1, 3, N]
        x2 = vn_mean_pool(self.conv2(_edge_features(x1, self.k)))
        x = self.conv3(torch.cat((x1, x2), dim=1))
        x = torch.cat((x, x.mean(-1, keepdim=True).expand_as(x)), dim=1)
        x, _ = self.std_feature(x)
        return self.head(x.flatten(1, 2).max(dim=-1).values)


def build_model(name: str, n_classes: int, **kwargs) -> nn.Module:
    """``"pointnet"`` or ``"dgcnn"``.

    Example:
        >>> type(build_model("pointnet", 3)).__name__
        'VNPointNet'
    """
    models = {"pointnet": VNPointNet, "dgcnn": VNDGCNN}
    if name not in models:
        raise ValueError(f"model must be one of {sorted(models)}, got {name!r}")
    return models[name](n_classes, **kwargs)
