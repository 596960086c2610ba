"""Catch the commonest silent mistake: an optimiser built before ``relax()``, which never updates W."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from .relaxed import relaxation_parameters, relaxed_modules

__all__ = ["OptimizerWatch"]


class OptimizerWatch:
    """Watches the first steps of a training loop and warns once if the model's own weights change
    while the relaxation weights, which received gradients, do not.

    That is the signature of an optimiser built on ``model.parameters()`` *before*
    :func:`relax_plugins.relax` added W (or of a parameter group that leaves W out): relaxation then
    silently does nothing. Gradient accumulation (several backward passes per optimiser step) and a W
    whose gradient is still zero (θ = 0 at the start of the triangular schedule) are not mistaken for
    it: the base weights must have changed between two checks. Costs a pass over the parameters (and
    a host sync per tensor) per check, for at most ``checks`` calls.

    Args:
        model: the relaxed model.
        checks: how many calls to look at before giving up (a loop that never steps the optimiser).

    Example:
        >>> import torch, warnings, relax_plugins as rp
        >>> from relax_toy.layers import SO2Linear
        >>> model = torch.nn.Sequential(SO2Linear(2, 2))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)   # built before relax(): misses W
        >>> model = rp.relax(model); rp.set_theta(model, 1.0)
        >>> watch = OptimizerWatch(model)
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     for _ in range(3):
        ...         watch()
        ...         opt.zero_grad()
        ...         (model(torch.randn(4, 4)).square().sum() + rp.penalty(model)).backward()
        ...         opt.step()
        ...     watch()
        >>> "after relax()" in str(caught[0].message)
        True
    """

    def __init__(self, model: nn.Module, checks: int = 20) -> None:
        self.model = model
        self.left = checks
        self._last: tuple[Tensor, Tensor] | None = None
        self._moved: set[int] = set()  # ids of relaxation parameters seen changing

    def __call__(self) -> None:
        if self.left <= 0:
            return
        self.left -= 1
        extra = relaxation_parameters(self.model)
        if not extra:
            self.left = 0
            return
        ids = {id(p) for p in extra}
        base = [p for p in self.model.parameters() if id(p) not in ids]
        with torch.no_grad():
            now_base = _fingerprint(base)
            now_extra = torch.stack([_fingerprint([p]) for p in extra])
            grads = torch.stack([p.grad.detach().double().abs().sum().cpu() if p.grad is not None
                                 else torch.zeros((), dtype=torch.float64) for p in extra])
        last, self._last = self._last, (now_base, now_extra)
        if last is None or last[1].shape != now_extra.shape:  # first call, or θ turned learnable since
            return
        base_moved = bool((now_base != last[0]).any())
        had_grad = grads > 0
        moved = (now_extra != last[1]).any(dim=-1)
        stuck = had_grad & ~moved
        if base_moved and bool(stuck.any()):
            self.left = 0
            thetas = {id(layer.theta) for _, layer in relaxed_modules(self.model)}
            if any(id(p) in thetas for p, s in zip(extra, stuck.tolist()) if s):
                what = ("the learnable θ", "Build it after DualAscentTheta(model) (which makes θ a parameter)")
            else:
                what = ("the relaxation weights", "Build it after relax()")
            warnings.warn(
                f"{what[0]} received gradients but did not change while the model's own weights "
                f"did: the optimiser does not hold them. {what[1]} (or add "
                "rp.relaxation_parameters(model) to it), otherwise relaxation has no effect.",
                RuntimeWarning, stacklevel=3,
            )
        elif base_moved:
            # watched until every trainable relaxation parameter was seen moving: W moves from the first
            # step, a learned θ only once W ≠ 0 gives it a gradient
            self._moved.update(id(p) for p, m in zip(extra, moved.tolist()) if m)
            if all(id(p) in self._moved for p in extra if p.requires_grad):
                self.left = 0  # everything is being trained: nothing more to watch


def _fingerprint(params: list[Tensor]) -> Tensor:
    """(Σ p, Σ p²) over ``params`` in float64: changes whenever an optimiser step moves any of them."""
    if not params:
        return torch.zeros(2, dtype=torch.float64)
    sums = torch.stack([torch.stack([p.detach().double().sum(), p.detach().double().square().sum()]).cpu()
                        for p in params])
    return sums.sum(dim=0)
