"""Learned per-layer θ driven to zero by dual ascent (after ACE, arXiv 2505.13631).

Instead of a fixed schedule, every relaxed layer's θ_i becomes a learnable γ_i ≥ 0 and training
solves  min L(w, γ)  subject to  γ_i = 0  through its Lagrangian L + Σ_i λ_i γ_i: primal descent on
the weights and γ (your optimiser), dual ascent λ_i ← max(0, λ_i + η γ_i) (this class). γ_i only
comes down once λ_i outweighs the task's pull −∂L/∂γ_i, and λ_i = η Σ_t γ_i(t) records how long
layer i kept its relaxation. ACE reads the duals as a per-layer symmetry-breaking diagnostic; here,
with Adam on a toy SO(2) task (symmetric teacher vs. a fixed-direction target, 5 seeds), they did not
separate the two cases, so treat them as a record, not a verdict. Keep η small against the task's
pull (with Adam, γ moves at about the learning rate per step whatever the gradient size).

The *resilient* variant relaxes the constraint to γ_i ≤ u_i with a learned slack u_i ≥ 0 that costs
(ρ/2)·u_i²; it ends with γ_i ≈ u_i > 0 where the data are not symmetric, i.e. with a model that is
only **approximately** equivariant: do not project it if you want to keep that slack.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

from ._checks import check_bool, check_real
from .api import _require_relaxed
from .errors import NonFiniteError, NotRelaxedError
from .relaxed import _require_still_relaxed, check_theta_fits

__all__ = ["DualAscentTheta"]


class DualAscentTheta:
    """Per-layer learnable θ with dual variables; create it *before* the optimiser.

    Args:
        model: a relaxed model.
        init: initial γ_i.
        dual_lr: η, the dual step size.
        resilient: learn a slack u_i per layer (approximate equivariance at the end).
        slack_cost: ρ, the cost (ρ/2)·u² of the slack.
        slack_lr: step size of the slack's gradient step.
        augmented: ρ of the augmented-Lagrangian term (ρ/2)·Σ γ_i² (method of multipliers); it
            damps the oscillation of plain gradient descent–ascent without moving the solution γ = 0.

    Example:
        >>> import torch, relax_plugins as rp
        >>> from relax_toy.layers import SO2Linear
        >>> model = rp.relax(torch.nn.Sequential(SO2Linear(2, 2)))
        >>> dual = rp.DualAscentTheta(model, init=0.5, dual_lr=0.1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)   # now includes γ
        >>> loss = model(torch.randn(4, 4)).square().mean() + dual.penalty()
        >>> loss.backward(); opt.step(); dual.step()
        >>> dual.duals()["0"] > 0
        True
    """

    def __init__(
        self,
        model: nn.Module,
        init: float = 1.0,
        dual_lr: float = 1e-2,
        *,
        resilient: bool = False,
        slack_cost: float = 1.0,
        slack_lr: float = 1e-2,
        augmented: float = 0.0,
    ) -> None:
        init, dual_lr, slack_cost, slack_lr, augmented = (
            check_real(v, n) for v, n in ((init, "init"), (dual_lr, "dual_lr"), (slack_cost, "slack_cost"),
                                          (slack_lr, "slack_lr"), (augmented, "augmented"))
        )
        resilient = check_bool(resilient, "resilient")
        self.model = model
        self.dual_lr, self.resilient = dual_lr, resilient
        self.slack_cost, self.slack_lr = slack_cost, slack_lr
        self.augmented = augmented
        self.layers = _require_relaxed(model, "DualAscentTheta")
        for _, layer in self.layers:
            if isinstance(layer.theta, nn.Parameter):
                raise ValueError("θ is already learnable (another DualAscentTheta?)")
        check_theta_fits(init, self.layers, "init")
        for _, layer in self.layers:
            value = layer.theta.detach().clone().fill_(init)
            del layer._buffers["theta"]
            layer.theta = nn.Parameter(value)
        self.lambdas = {name: 0.0 for name, _ in self.layers}
        self.slacks = {name: 0.0 for name, _ in self.layers}

    def gammas(self) -> dict[str, float]:
        """Current γ_i (= θ_i) per layer."""
        return {name: float(layer.theta.detach()) for name, layer in self.layers}

    def duals(self) -> dict[str, float]:
        """Current λ_i per layer (η times the accumulated γ_i)."""
        return dict(self.lambdas)

    def _require_learning(self, what: str) -> None:
        _require_still_relaxed(self.model, self.layers, f"DualAscentTheta.{what}()")
        done = [name or "<root>" for name, layer in self.layers if not isinstance(layer.theta, nn.Parameter)]
        if done:
            raise NotRelaxedError(f"DualAscentTheta.{what}() after finish(): θ of layer(s) {done} is a fixed "
                                  "buffer again, nothing is learned any more")

    def penalty(self) -> Tensor:
        """Σ_i λ_i (γ_i − u_i) + (ρ/2)·Σ_i γ_i²: add it to the loss every step (λ, u are constants here)."""
        self._require_learning("penalty")
        terms = [layer.theta * self.lambdas[name] + 0.5 * self.augmented * layer.theta.square()
                 for name, layer in self.layers]
        return torch.stack(terms).sum() - sum(self.lambdas[n] * self.slacks[n] for n, _ in self.layers)

    @torch.no_grad()
    def step(self) -> None:
        """After ``optimizer.step()``: the dual (and, resilient, slack) updates."""
        self._require_learning("step")
        bad = [name or "<root>" for name, layer in self.layers if not bool(torch.isfinite(layer.theta).all())]
        if bad:
            raise NonFiniteError(f"γ (= θ) of layer(s) {bad} is NaN/inf after the optimiser step: lower the "
                                 "learning rate; the duals were not updated")
        for name, layer in self.layers:
            # constraint 0 ≤ γ ≤ u (u = 0 unless resilient): projected γ, λ ≥ 0
            layer.theta.clamp_(min=0.0)
            violation = float(layer.theta.detach()) - (self.slacks[name] if self.resilient else 0.0)
            self.lambdas[name] = max(0.0, self.lambdas[name] + self.dual_lr * violation)
            if self.resilient:
                u = self.slacks[name] - self.slack_lr * (self.slack_cost * self.slacks[name] - self.lambdas[name])
                self.slacks[name] = max(0.0, u)

    def finish(self) -> None:
        """Turn γ back into fixed buffers; θ = 0 unless resilient (then the learned γ stays).

        Call it once: a second call raises :class:`~relax_plugins.NotRelaxedError` and changes nothing,
        as :meth:`~relax_plugins.RelaxedTraining.finish` does when called twice (its model is projected
        by then).

        Raises:
            NotRelaxedError: ``finish()`` already ran (θ is a fixed buffer again in some layer).
        """
        # check every layer first: a second call must not half-convert, nor fail with a bare KeyError
        self._require_learning("finish")
        for _, layer in self.layers:
            value = layer.theta.detach().clone()
            if not self.resilient:
                value.zero_()
            del layer._parameters["theta"]
            layer.register_buffer("theta", value)
        if self.resilient and any(v > 0 for v in self.gammas().values()):
            warnings.warn(
                "resilient dual ascent kept θ > 0 in some layers: the model is only approximately equivariant "
                "(project() would drop that part)",
                stacklevel=2,
            )

    def state_dict(self) -> dict[str, Any]:
        return {"lambdas": dict(self.lambdas), "slacks": dict(self.slacks)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; a state of another model (other layer names) or with negative or
        non-finite duals raises before anything changes."""
        if not isinstance(state, dict) or set(state) != {"lambdas", "slacks"}:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"not a DualAscentTheta state: expected keys ['lambdas', 'slacks'], got {got}")
        names = sorted(self.lambdas)
        new = {}
        for key in ("lambdas", "slacks"):
            part = state[key]
            if not isinstance(part, dict) or sorted(part) != names:
                got = sorted(part) if isinstance(part, dict) else type(part).__name__
                raise ValueError(f"state[{key!r}] belongs to another model: layers {got}, this model has {names}")
            new[key] = {k: check_real(v, f"state[{key!r}][{k!r}]") for k, v in part.items()}
        self.lambdas, self.slacks = new["lambdas"], new["slacks"]
