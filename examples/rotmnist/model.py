"""A small C8-steerable CNN for rotated MNIST, built from unmodified escnn modules.

Invariant classifier: four ``R2Conv`` layers on regular C8 fields with batch norm, ReLU and
anti-aliased pooling, group pooling and spatial averaging (rotation invariant up to the grid), then a
plain ``torch.nn.Linear``. ``relax_plugins.relax`` wraps exactly the four ``R2Conv`` layers.
"""

from __future__ import annotations

from escnn import gspaces
from escnn import nn as enn
from torch import Tensor, nn

__all__ = ["C8Net"]


class C8Net(nn.Module):
    """C_N-steerable CNN (default N = 8) on 29×29 images.

    Args:
        n: order of the rotation group.
        fields: number of regular fields of the four convolutions.

    Example:
        >>> import torch
        >>> net = C8Net(n=4, fields=(2, 2, 2, 2))
        >>> net(torch.zeros(3, 1, 29, 29)).shape
        torch.Size([3, 10])
    """

    def __init__(self, n: int = 8, fields: tuple[int, int, int, int] = (4, 8, 8, 12)) -> None:
        super().__init__()
        self.gspace = gspaces.rot2dOnR2(n)
        gs = self.gspace
        self.in_type = enn.FieldType(gs, [gs.trivial_repr])
        t = [enn.FieldType(gs, [gs.regular_repr] * f) for f in fields]
        self.features = enn.SequentialModule(
            enn.R2Conv(self.in_type, t[0], 7, padding=3), enn.InnerBatchNorm(t[0]), enn.ReLU(t[0], inplace=True),
            enn.R2Conv(t[0], t[1], 5, padding=2), enn.InnerBatchNorm(t[1]), enn.ReLU(t[1], inplace=True),
            enn.PointwiseAvgPoolAntialiased(t[1], sigma=0.66, stride=2),
            enn.R2Conv(t[1], t[2], 5, padding=2), enn.InnerBatchNorm(t[2]), enn.ReLU(t[2], inplace=True),
            enn.PointwiseAvgPoolAntialiased(t[2], sigma=0.66, stride=2),
            enn.R2Conv(t[2], t[3], 5, padding=1), enn.InnerBatchNorm(t[3]), enn.ReLU(t[3], inplace=True),
            enn.GroupPooling(t[3]),
        )
        self.head = nn.Sequential(nn.Linear(fields[3], 64), nn.ELU(), nn.Linear(64, 10))

    def forward(self, x: Tensor) -> Tensor:
        z = self.features(enn.GeometricTensor(x, self.in_type)).tensor
        return self.head(z.mean(dim=(2, 3)))
