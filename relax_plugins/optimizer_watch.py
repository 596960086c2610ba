"""Catch the commonest silent mistake: an optimiser built before ``relax()``, which never updates W."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from .relaxed import relaxation_parameters

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
        if last is None:
            return
        base_moved = bool((now_base != last[0]).any())
        had_grad = grads > 0
        stuck = had_grad & (now_extra == last[1]).all(dim=-1)
        if base_moved and bool(stuck.any()):
            self.left = 0
            warnings.warn(
                "the relaxation weights received gradients but did not change while the model's own weights "
                "did: the optimiser does not hold them. Build it after relax() (or add "
                "rp.relaxation_parameters(model) to it), otherwise relaxation has no effect.",
                RuntimeWarning, stacklevel=3,
            )
        elif base_moved and bool(had_grad.any()):
            self.left = 0  # W is being trained: nothing more to watch


def _fingerprint(params: list[Tensor]) -> Tensor:
    """(Σ p, Σ p²) over ``params`` in float64: changes whenever an optimiser step moves any of them."""
    if not params:
        return torch.zeros(2, dtype=torch.float64)
    sums = torch.stack([torch.stack([p.detach().double().sum(), p.detach().double().square().sum()]).cpu()
                        for p in params])
    return sums.sum(dim=0)
