"""First-party vector-neuron (VN) layers (Deng et al., ICCV 2021), written for this library.

Feature convention (the one every public VN code base uses): a tensor ``[B, C, 3, *S]`` holds, for
each sample and each position in ``S`` (points ``N``, or points × neighbours ``N, k``), ``C``
channel vectors in R³ (axis 2 is xyz). A rotation R acts as ``x ↦ einsum("ij,bcj...->bci...", R, x)``.

Every learnable map is a bias-free ``nn.Linear`` on the channel axis, applied exactly as public VN
code applies it, ``self.map_to_feat(x.transpose(1, -1)).transpose(1, -1)``; this is what the ``vn``
adapter recognises (structurally, not by class), so these layers and copies of public VN layer files
are relaxed the same way. All layers are equivariant to O(3) (rotations and reflections);
:func:`graph_feature_cross` uses cross products and is SO(3)-equivariant only.

Example:
    >>> import torch
    >>> layer = VNLinearLeakyReLU(2, 4)
    >>> layer(torch.randn(5, 2, 3, 7)).shape
    torch.Size([5, 4, 3, 7])
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = [
    "EPS",
    "VNLinear",
    "VNLeakyReLU",
    "VNLinearLeakyReLU",
    "VNBatchNorm",
    "VNMaxPool",
    "VNStdFeature",
    "vn_mean_pool",
    "knn",
    "graph_feature_cross",
]

# keeps the norm / direction divisions finite for zero vectors
EPS = 1e-6


def _channel_linear(linear: nn.Linear, x: Tensor) -> Tensor:
    """Apply ``linear`` on the channel axis of ``[B, C, 3, *S]`` (the VN convention)."""
    return linear(x.transpose(1, -1)).transpose(1, -1)


def _leaky_project(x: Tensor, d: Tensor, negative_slope: float) -> Tensor:
    """VN leaky ReLU: keep each channel vector if it points along its learned direction d, else
    remove its component along d; blend with the identity by ``negative_slope``.

    α·x + (1−α)·(x − [<x,d> < 0]·<x,d>/|d|²·d) is evaluated as x − c·d with the per-vector
    coefficient c computed on the 3x smaller [B, C, 1, *S] tensor (same function, fewer full passes).
    """
    dot = (x * d).sum(2, keepdim=True)
    d_sq = (d * d).sum(2, keepdim=True)
    coef = (1.0 - negative_slope) * (dot < 0).to(x.dtype) * dot / (d_sq + EPS)
    return x - coef * d


def _vector_norm(x: Tensor) -> Tensor:
    """|x| over the xyz axis (2); torch.norm over a middle axis is ~30x slower on CPU than this."""
    return (x * x).sum(2).clamp_min(EPS * EPS).sqrt()


class VNLinear(nn.Module):
    """Channel mixing of 3D vectors: y_o = Σ_c M_oc x_c (O(3)-equivariant).

    Args:
        in_channels: C_in.
        out_channels: C_out.

    Example:
        >>> import torch
        >>> VNLinear(3, 5)(torch.randn(2, 3, 3, 10)).shape
        torch.Size([2, 5, 3, 10])
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.map_to_feat = nn.Linear(in_channels, out_channels, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.map_to_feat(x.transpose(1, -1)).transpose(1, -1)


class VNLeakyReLU(nn.Module):
    """Vector leaky ReLU with a learned direction per channel (or one shared direction).

    Args:
        in_channels: C.
        share_nonlinearity: one direction for all channels instead of one per channel.
        negative_slope: weight of the identity in the blend.

    Example:
        >>> import torch
        >>> VNLeakyReLU(4)(torch.randn(2, 4, 3, 6)).shape
        torch.Size([2, 4, 3, 6])
    """

    def __init__(self, in_channels: int, share_nonlinearity: bool = False, negative_slope: float = 0.2) -> None:
        super().__init__()
        self.map_to_dir = nn.Linear(in_channels, 1 if share_nonlinearity else in_channels, bias=False)
        self.negative_slope = negative_slope

    def forward(self, x: Tensor) -> Tensor:
        d = self.map_to_dir(x.transpose(1, -1)).transpose(1, -1)
        return _leaky_project(x, d, self.negative_slope)


class VNBatchNorm(nn.Module):
    """Batch norm of the vector norms (invariant), rescaling each vector.

    ``BatchNorm1d`` on the norms flattened to ``[B, C, L]`` serves every ``S``, so one module works
    for ``[B, C, 3]``, ``[B, C, 3, N]`` and ``[B, C, 3, N, k]``.

    Args:
        num_features: C.

    Example:
        >>> import torch
        >>> VNBatchNorm(4)(torch.randn(2, 4, 3, 6, 5)).shape
        torch.Size([2, 4, 3, 6, 5])
    """

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(num_features)

    def forward(self, x: Tensor) -> Tensor:
        norm = _vector_norm(x) + EPS  # [B, C, *S]
        flat = norm.flatten(2) if norm.dim() > 2 else norm
        scaled = self.bn(flat).reshape(norm.shape)
        return x * (scaled / norm).unsqueeze(2)


class VNLinearLeakyReLU(nn.Module):
    """VNLinear → optional VNBatchNorm → vector leaky ReLU whose direction is read from the input.

    Args:
        in_channels: C_in.
        out_channels: C_out.
        share_nonlinearity: one learned direction for all output channels.
        negative_slope: weight of the identity in the leaky blend.
        use_batchnorm: apply :class:`VNBatchNorm` after the linear map.

    Example:
        >>> import torch
        >>> VNLinearLeakyReLU(3, 8)(torch.randn(2, 3, 3, 16, 4)).shape
        torch.Size([2, 8, 3, 16, 4])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        share_nonlinearity: bool = False,
        negative_slope: float = 0.2,
        use_batchnorm: bool = True,
    ) -> None:
        super().__init__()
        self.negative_slope = negative_slope
        self.map_to_feat = nn.Linear(in_channels, out_channels, bias=False)
        self.batchnorm = VNBatchNorm(out_channels) if use_batchnorm else nn.Identity()
        self.map_to_dir = nn.Linear(in_channels, 1 if share_nonlinearity else out_channels, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        p = self.map_to_feat(x.transpose(1, -1)).transpose(1, -1)
        p = self.batchnorm(p)
        d = self.map_to_dir(x.transpose(1, -1)).transpose(1, -1)
        return _leaky_project(p, d, self.negative_slope)


class VNMaxPool(nn.Module):
    """Pool the last axis by picking, per channel, the vector most aligned with a learned direction.

    Example:
        >>> import torch
        >>> VNMaxPool(4)(torch.randn(2, 4, 3, 9)).shape
        torch.Size([2, 4, 3])
    """

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.map_to_dir = nn.Linear(in_channels, in_channels, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        d = self.map_to_dir(x.transpose(1, -1)).transpose(1, -1)
        idx = (x * d).sum(2, keepdim=True).argmax(dim=-1, keepdim=True)  # [B, C, 1, *S[:-1], 1]
        return x.gather(-1, idx.expand(*x.shape[:-1], 1)).squeeze(-1)


def vn_mean_pool(x: Tensor, dim: int = -1, keepdim: bool = False) -> Tensor:
    """Mean over one spatial axis (equivariant).

    Example:
        >>> import torch
        >>> vn_mean_pool(torch.ones(1, 2, 3, 4)).shape
        torch.Size([1, 2, 3])
    """
    return x.mean(dim=dim, keepdim=keepdim)


class VNStdFeature(nn.Module):
    """Invariant features: a learned equivariant frame Z (3 vectors) and the coordinates x·Zᵀ.

    Args:
        in_channels: C (≥ 4).
        normalize_frame: build an orthonormal frame from two learned vectors (Gram-Schmidt and a
            cross product, so SO(3) only); otherwise the frame is three learned vectors (O(3)).
        share_nonlinearity: passed to the two inner :class:`VNLinearLeakyReLU`.
        negative_slope: idem.

    Returns (from forward): ``(x_std, frame)`` with ``x_std`` ``[B, C, 3, *S]`` invariant and
    ``frame`` ``[B, 3, 3, *S]`` equivariant.

    Example:
        >>> import torch
        >>> x_std, frame = VNStdFeature(8)(torch.randn(2, 8, 3, 5))
        >>> tuple(x_std.shape), tuple(frame.shape)
        ((2, 8, 3, 5), (2, 3, 3, 5))
    """

    def __init__(
        self,
        in_channels: int,
        normalize_frame: bool = False,
        share_nonlinearity: bool = False,
        negative_slope: float = 0.2,
    ) -> None:
        super().__init__()
        self.normalize_frame = normalize_frame
        self.vn1 = VNLinearLeakyReLU(in_channels, in_channels // 2, share_nonlinearity, negative_slope)
        self.vn2 = VNLinearLeakyReLU(in_channels // 2, in_channels // 4, share_nonlinearity, negative_slope)
        self.vn_lin = nn.Linear(in_channels // 4, 2 if normalize_frame else 3, bias=False)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = self.vn2(self.vn1(x))
        z = self.vn_lin(z.transpose(1, -1)).transpose(1, -1)  # [B, 2 or 3, 3, *S]
        if self.normalize_frame:
            u1 = z[:, 0] / (_vector_norm(z[:, :1]) + EPS)
            v2 = z[:, 1] - (z[:, 1] * u1).sum(1, keepdim=True) * u1
            u2 = v2 / (_vector_norm(v2[:, None]) + EPS)
            z = torch.stack((u1, u2, torch.cross(u1, u2, dim=1)), dim=1)
        # x_std[b, c, i] = <x_c, z_i>: invariant because x and z rotate together
        x_std = torch.einsum("bcj...,bij...->bci...", x, z)
        return x_std, z


def knn(points: Tensor, k: int) -> Tensor:
    """Indices of the k nearest neighbours (self included) of every point of ``[B, 3, N]``.

    Example:
        >>> import torch
        >>> knn(torch.randn(2, 3, 10), 4).shape
        torch.Size([2, 10, 4])
    """
    d2 = torch.cdist(points.transpose(1, 2), points.transpose(1, 2))
    return d2.topk(k, dim=-1, largest=False).indices


def graph_feature_cross(points: Tensor, k: int) -> Tensor:
    """Edge features (x_j − x_i, x_i, x_j × x_i) of the k-NN graph, ``[B, 3, 3, N, k]``.

    The cross product makes the features SO(3)- (not O(3)-) equivariant.

    Example:
        >>> import torch
        >>> graph_feature_cross(torch.randn(2, 3, 10), 4).shape
        torch.Size([2, 3, 3, 10, 4])
    """
    B = points.shape[0]
    idx = knn(points, k)  # [B, N, k]
    p = points.transpose(1, 2)  # [B, N, 3]
    nb = p[torch.arange(B, device=p.device)[:, None, None], idx]  # [B, N, k, 3]
    center = p[:, :, None, :].expand_as(nb)
    feat = torch.stack((nb - center, center, torch.cross(nb, center, dim=-1)), dim=1)  # [B, 3, N, k, 3]
    return feat.permute(0, 1, 4, 2, 3).contiguous()
