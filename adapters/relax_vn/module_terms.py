"""The relaxation of a whole VN module whose channel maps the probe found (its layout, not its class)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from relax_plugins.term import may_modify_inputs

from .probe import ModuleLayout
from .terms import DEFAULT_PENALTY_SAMPLES, VNLinearRelaxation

__all__ = ["VNModuleRelaxation"]


class VNModuleRelaxation(VNLinearRelaxation):
    """A VN layer module relaxed as a whole: f(x) + θ·W·x from its input fibre to its output fibre.

    For VN layers whose channel map is not called as an ``nn.Linear`` module (``F.linear`` with the
    weight, ``einsum`` with an own parameter, ...): the probe (:func:`relax_vn.probe.probe_vn`)
    observed the module's xyz axis and channel axis, the same in input and output; every other axis
    is a position (W acts per position). Fibre, generators, penalties and projection are those of
    :class:`VNLinearRelaxation` (xyz-major ``3·C`` fibres). ``project(merge=True)`` cannot fold
    θ·P(W) into an arbitrary module: it drops W (with a warning), as ``merge=False`` does.

    Args:
        layout: the module's axes and channels.
        group, rank, init_std, penalty_samples: as :class:`VNLinearRelaxation`.

    Example:
        >>> import torch
        >>> from relax_vn.probe import ModuleLayout
        >>> term = VNModuleRelaxation(ModuleLayout(ndim=4, xyz=3, channel=2, c_in=2, c_out=5))
        >>> tuple(term.to_fibre(torch.randn(6, 7, 2, 3)).shape)
        (42, 6)
    """

    def __init__(
        self,
        layout: ModuleLayout,
        group: str = "SO(3)",
        rank: int | None = None,
        init_std: float = 0.0,
        penalty_samples: int | None = DEFAULT_PENALTY_SAMPLES,
    ) -> None:
        super().__init__(layout.c_in, layout.c_out, group, rank, init_std, penalty_samples)
        self.layout = layout

    def take_input(self, args: tuple, kwargs: dict) -> Tensor:
        for a in args:
            if isinstance(a, Tensor) and a.is_floating_point():
                return a
        raise ValueError("relax_vn: a relaxed VN layer module needs its features as a positional tensor argument")

    def _axes(self, t: Tensor, channels: int) -> tuple[int, int]:
        lay = self.layout
        if t.dim() != lay.ndim or t.shape[lay.xyz] != 3 or t.shape[lay.channel] != channels:
            raise ValueError(
                f"relax_vn: this VN layer module was observed with rank-{lay.ndim} features, xyz on axis {lay.xyz} "
                f"and {channels} channels on axis {lay.channel}; got shape {tuple(t.shape)}"
            )
        return lay.xyz, lay.channel

    def to_fibre(self, x: Tensor) -> Tensor:
        a, c = self._axes(x, self.c_in)
        return x.movedim((a, c), (-2, -1)).reshape(-1, 3 * self.c_in)

    def from_fibre(self, delta: Tensor, out: Tensor) -> Tensor:
        a, c = self._axes(out, self.c_out)
        shape = out.movedim((a, c), (-2, -1)).shape
        return delta.reshape(shape).movedim((-2, -1), (a, c))

    def forward(self, base: nn.Module, theta: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        # read (and copy: the module is user code) before the base module runs
        xf = self.to_fibre(self.take_input(args, kwargs))
        if may_modify_inputs(base):
            xf = xf.clone()
        self.remember("_x", xf.detach())
        out = base(*args, **kwargs)
        if not isinstance(out, Tensor):
            raise ValueError(f"relax_vn: a relaxed VN layer module must return a tensor, got {type(out).__name__}")
        if not self._exactly_base(theta):
            out = out + self.from_fibre(self.apply_weight(xf, theta), out)
        self.remember("_y", out.detach())
        return out

    can_merge = False  # an arbitrary module's parameters cannot hold θ·P(W)

    def extra_repr(self) -> str:
        lay = self.layout
        return f"{super().extra_repr()}, module (xyz axis {lay.xyz}, channel axis {lay.channel}, rank {lay.ndim})"
