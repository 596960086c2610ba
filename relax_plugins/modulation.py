"""Per-layer θ modulated by a recurrent estimate of the symmetry breaking each layer uses (after RECM).

RECM (Pertigkiozoglou et al., arXiv 2602.02853) learns each layer's relaxation level from the training
signal and the symmetry of the layer's input-target distribution, and proves that it converges to at
most the layer's *symmetry gap*, so layers on symmetric distributions return to exact equivariance.
Only the paper's abstract and summaries could be read here, not its update rule: this is a
re-derivation with the same contract, not the published algorithm. Per relaxed layer i, after the
optimiser step, from the last forward pass (input fibres X, relaxed output Y = f(X) + θ_i·W_i·X):

* violation: f_i = θ_i‖(W_i − P(W_i))·X‖ / ‖Y‖ (Frobenius norms over the batch, clipped to 1),
  the share of the layer's output that is not equivariant; P is the adapter's projection.
* recurrent modulation: θ_i ← (1 − α)·θ_i + α·θ_max·f_i, from θ_i = θ_max.

So 0 ≤ θ_i ≤ θ_max, and θ_i tracks θ_max times the symmetry breaking its layer actually uses. The task
(W's gradient θ·G) and the penalties set that share: where the layer's input-target distribution is
symmetric the task's mean pull on W − P(W) vanishes at equivariant points and the Lie/norm penalties
remove the rest, so f_i → 0 and θ_i decays geometrically to 0; where the data need symmetry breaking,
W keeps it against the penalty and θ_i settles near θ_max·f_i > 0.

Differences from the paper (as far as its abstract tells): the level is read from the relaxation's
own non-equivariant output, the symmetry breaking the task bought against the penalty, rather than
from the paper's estimator, so the bound is on that share and not on the paper's symmetry gap; it
relies on ``relax_plugins.penalty`` being in the loss; a finite training set has a gap of its own,
which can keep θ slightly above 0 on a symmetric task (``finish()`` then sets it to 0).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from ._checks import check_int, check_real
from .api import _require_relaxed
from .errors import NonFiniteError
from .relaxed import _require_still_relaxed, check_theta_fits
from .term import LinearRelaxation

__all__ = ["LearnedModulation"]


class LearnedModulation:
    """Per-layer θ that follows the non-equivariant share of its layer's output; DualAscentTheta's interface.

    θ stays a buffer (nothing joins the optimiser), so the object may be built before or after it.
    Keep ``relax_plugins.penalty`` in the loss: its Lie and norm terms remove unneeded symmetry breaking.

    Args:
        model: a relaxed model whose relaxed layers are :class:`LinearRelaxation` terms.
        theta_max: initial and largest θ (θ_i → θ_max·f_i).
        rate: α, the per-step rate at which θ_i follows θ_max·f_i (half-life ≈ 0.69/α steps).
        every: measure f_i every this many steps (θ_i moves every step, toward the last f_i).

    Example:
        >>> import torch, relax_plugins as rp
        >>> from relax_toy.layers import SO2Linear
        >>> model = rp.relax(torch.nn.Sequential(SO2Linear(2, 2)))
        >>> mod = rp.LearnedModulation(model, theta_max=1.0, rate=0.5)
        >>> opt = torch.optim.Adam(model.parameters(), lr=1e-2)   # θ is not a parameter
        >>> x = torch.randn(64, 4)
        >>> for _ in range(8):                                     # a symmetric task: y = 0
        ...     loss = model(x).square().mean() + rp.penalty(model) + mod.penalty()
        ...     opt.zero_grad(); loss.backward(); opt.step(); mod.step()
        >>> mod.gammas()["0"] < 0.01   # no symmetry breaking in use: θ halves every step
        True
        >>> mod.finish(); rp.get_theta(model)
        {'0': 0.0}
    """

    def __init__(self, model: nn.Module, theta_max: float = 1.0, rate: float = 1e-3, every: int = 1) -> None:
        theta_max = check_real(theta_max, "theta_max", positive=True)
        rate = check_real(rate, "rate", positive=True)
        if rate > 1:
            raise ValueError(f"rate must be in (0, 1], got {rate}")
        every = check_int(every, "every", minimum=1)
        self.model, self.theta_max, self.rate, self.every = model, float(theta_max), float(rate), int(every)
        self.count = 0
        self.layers = _require_relaxed(model, "LearnedModulation")
        for name, layer in self.layers:
            if not isinstance(layer.term, LinearRelaxation):
                raise TypeError(f"layer {name!r}: LearnedModulation needs a LinearRelaxation term, "
                                f"got {type(layer.term).__name__}")
            if isinstance(layer.theta, nn.Parameter):
                raise ValueError(f"layer {name!r}: θ is already learnable (a DualAscentTheta is attached)")
        check_theta_fits(self.theta_max, self.layers, "theta_max")
        self.thetas = {name: self.theta_max for name, _ in self.layers}
        self.shares = {name: 0.0 for name, _ in self.layers}
        self._write_thetas()

    def _write_thetas(self) -> None:
        _require_still_relaxed(self.model, self.layers, "LearnedModulation")
        with torch.no_grad():
            for name, layer in self.layers:
                layer.theta.fill_(self.thetas[name])

    def gammas(self) -> dict[str, float]:
        """Current θ_i per layer."""
        return dict(self.thetas)

    def violations(self) -> dict[str, float]:
        """Last measured f_i per layer: the non-equivariant share of the layer's output."""
        return dict(self.shares)

    def penalty(self) -> Tensor:
        """Always 0 (θ is not trained through the loss); kept so that a training loop can swap policies."""
        ref = self.layers[0][1].theta
        return torch.zeros((), dtype=ref.dtype, device=ref.device)

    @torch.no_grad()
    def step(self) -> None:
        """After ``optimizer.step()``: measure f_i on the last forward pass, then move θ_i toward θ_max·f_i.

        Raises:
            RuntimeError: no forward pass was recorded yet.
            NonFiniteError: a measured layer's W, input or relaxed output is NaN/inf (after a NaN/inf
                loss, say); θ, f and the step count are left as they were.
        """
        if self.count % self.every == 0:
            rows = []
            for _, layer in self.layers:
                term = layer.term
                if term._x is None or term._y is None:
                    raise RuntimeError("LearnedModulation.step(): run the model on a batch first")
                x = term._x.double()
                W = term.dense().detach().double()
                S = x.T @ x  # Σ_n x xᵀ: ‖C·X‖² = ⟨C S, C⟩ without forming C·X
                C = W - term.project_dense(W).double()
                rows.append(torch.stack([((C @ S) * C).sum(), term._y.double().square().sum()]))
            values = torch.stack(rows).tolist()  # one host sync for all layers
            # NaN/inf would pass through min(1.0, nan) = 1.0 (or y2 > 0 = False) and silently drive θ to
            # θ_max (or 0): refuse before anything changes, as DualAscentTheta.step does
            bad = [name or "<root>" for (name, _), v in zip(self.layers, values) if not all(map(math.isfinite, v))]
            if bad:
                raise NonFiniteError(f"LearnedModulation.step(): W, input or output of layer(s) {bad} is NaN/inf "
                                     "(a NaN/inf loss or optimiser step?): lower the learning rate; θ was not updated")
            for (name, _), (c2, y2) in zip(self.layers, values):
                self.shares[name] = min(1.0, self.thetas[name] * math.sqrt(max(c2, 0.0) / y2)) if y2 > 0 else 0.0
        self.count += 1
        for name in self.thetas:
            self.thetas[name] = (1 - self.rate) * self.thetas[name] + self.rate * self.theta_max * self.shares[name]
        self._write_thetas()

    def finish(self, exact: bool = True) -> None:
        """θ → fixed values: 0 (``exact``: ``project()`` is then lossless) or the learned θ_i.

        With ``exact`` and θ_i > 1 % of θ_max somewhere, warns: the data kept those layers relaxed and
        projecting drops what they learned. With ``exact=False`` the model is only approximately
        equivariant: do not project it. Later ``step()`` calls would move θ again: stop calling it.
        """
        kept = [n for n, th in self.thetas.items() if th > 0.01 * self.theta_max]
        if exact:
            if kept:
                warnings.warn(f"LearnedModulation.finish(): θ was still > 1% of theta_max in {kept}; "
                              "setting it to 0 drops the symmetry breaking those layers learned", stacklevel=2)
            self.thetas = {n: 0.0 for n in self.thetas}
        self._write_thetas()

    def state_dict(self) -> dict[str, Any]:
        """θ_i and the last f_i per layer (plain floats) and the step count."""
        return {"thetas": dict(self.thetas), "shares": dict(self.shares), "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; everything is validated before anything changes.

        Raises:
            ValueError: a state of another model or policy (other keys or layer names), or a θ_i outside
                [0, θ_max], an f_i outside [0, 1], a NaN/inf value or a negative count.
            TypeError: a value that is not a real number (θ_i, f_i) or not an int (count).
        """
        if not isinstance(state, dict) or set(state) != {"thetas", "shares", "count"}:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"not a LearnedModulation state: expected keys ['count', 'shares', 'thetas'], got {got}")
        names = sorted(self.thetas)
        # upper bounds with a little slack: (1 − α)·θ_max + α·θ_max may round one ulp above θ_max
        new = {}
        for key, upper in (("thetas", self.theta_max), ("shares", 1.0)):
            part = state[key]
            if not isinstance(part, dict) or sorted(part, key=str) != names:
                got = sorted(part, key=str) if isinstance(part, dict) else type(part).__name__
                raise ValueError(f"state[{key!r}] is for layers {got}, this model has {names}")
            new[key] = {k: check_real(v, f"state[{key!r}][{k!r}]") for k, v in part.items()}
            high = {k: v for k, v in new[key].items() if v > upper * (1 + 1e-9)}
            if high:
                raise ValueError(f"state[{key!r}] holds {high}, above {upper:g} "
                                 f"({'theta_max' if key == 'thetas' else 'a share'}): not a state of this policy")
        count = check_int(state["count"], "state['count']", minimum=0)
        self.thetas, self.shares, self.count = new["thetas"], new["shares"], count
        self._write_thetas()
