"""A plain-loop training helper: θ schedule, penalty and logging in one place, resumable."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ._checks import check_bool, check_int
from .api import (
    check_penalty_args,
    layers_penalty,
    project,
    projection_report,
    set_theta,
)
from .copying import module_copy
from .optimizer_watch import OptimizerWatch
from .projection import _check_mergeable
from .relaxed import _require_relaxed, check_theta_fits
from .schedules import Schedule, as_schedule

__all__ = ["RelaxedTraining", "DEFAULT_PENALTY_EVERY"]

#: ``penalty_every`` of a scheduled run unless given: the ``every4`` arm of the paper-length N-body
#: evidence, the relaxation arm with the lowest validation MSE there (``docs/evidence.md``)
DEFAULT_PENALTY_EVERY = 4

#: the keys of :meth:`RelaxedTraining.state_dict`: always, and when they apply (``policy``: a learned
#: θ policy; ``random_states``: terms drawing generators per step)
STATE_KEYS = frozenset({"position", "history", "schedule"})
OPTIONAL_STATE_KEYS = frozenset({"penalty_calls", "policy", "random_states"})


class RelaxedTraining:
    """Drives one relaxed model through training.

    Call :meth:`advance` once per schedule unit (epoch or step, your choice through ``total``) to set
    θ, add :meth:`penalty` to the task loss, and use :meth:`export` for every checkpoint you keep:
    it returns a *projected* copy, so a saved "best" model is never a relaxed one. :meth:`finish`
    projects the model itself at the end.

    Args:
        model: a model already passed through :func:`relax_plugins.relax`; its relaxed layers are found
            here, once, and again only when one of them has left its place (replaced, projected).
        schedule: the default ``"triangular"`` (θ 0 → 1 → 0, the paper's recipe; with the default ``lie``,
            ``norm``, ``form`` and ``penalty_every`` it is the ``every4`` arm of the paper-length N-body
            evidence, the arm that evidence chose on validation MSE, ``docs/evidence.md``), a
            :class:`~relax_plugins.schedules.Schedule`, a name ("triangular", "linear_decay", "cosine",
            "constant"), a callable of t ∈ [0, 1], or a learned θ policy built on
            this model (:class:`~relax_plugins.DualAscentTheta`, :class:`~relax_plugins.LearnedModulation`, or
            any object with ``layers``, ``step()``, ``penalty()``, ``finish()``, ``state_dict()`` and
            ``load_state_dict()``): call :meth:`step` after every ``optimizer.step()`` (it runs the policy's
            ``step()``; with a schedule it does nothing, so one loop serves both), its ``penalty()`` joins
            :meth:`penalty`, and :meth:`finish` calls its ``finish()``. Build a
            :class:`~relax_plugins.DualAscentTheta` (and this helper) before the optimiser: its γ are
            parameters.
        total: number of :meth:`advance` calls (needed for a name or callable; optional for a policy,
            where it only sets :attr:`done`).
        lie: λ_LD. norm: λ_N. form: see :func:`relax_plugins.penalty`.
        penalty_every: compute the penalty on every k-th :meth:`penalty` call only (calls 0, k, 2k,
            ...), returning k × the penalty there and a graph-free zero otherwise: its sum over k
            consecutive calls is the sum of k per-step penalties whenever the penalty changes little
            over k steps (its expectation over a uniformly random step is unchanged), at 1/k of the
            cost. Not the same optimisation: the penalty's gradient arrives k-fold on one step instead
            of spread over k (SGD sees the same sum; Adam's normalisation does not). None (default):
            4 with a schedule — the recipe the paper-length evidence chose on validation (its
            ``every4`` arm, ``docs/evidence.md``) — and 1 with a learned θ policy (measured that way).
            1 computes it every call. It counts calls, not optimiser steps: with an optimiser that
            evaluates its closure several times per step (LBFGS), pass 1, or the evaluations within
            one step would see different objectives.

    Example:
        >>> import torch, relax_plugins as rp
        >>> from relax_toy.layers import SO2Linear
        >>> model = rp.relax(torch.nn.Sequential(SO2Linear(2, 2)))
        >>> run = rp.RelaxedTraining(model, "triangular", total=3)
        >>> [run.advance() for _ in range(3)]
        [0.0, 1.0, 0.0]
        >>> loss = run.loss(model(torch.randn(4, 4)).square().mean())
        >>> type(run.finish()[0]).__name__
        'SO2Linear'

        Learned θ (dual ascent) through the same loop:

        >>> model = rp.relax(torch.nn.Sequential(SO2Linear(2, 2)))
        >>> run = rp.RelaxedTraining(model, rp.DualAscentTheta(model, dual_lr=1e-3))
        >>> opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        >>> for _ in range(3):
        ...     theta = run.advance()
        ...     opt.zero_grad()
        ...     run.loss(model(torch.randn(4, 4)).square().mean()).backward()
        ...     opt.step()
        ...     run.step()
        >>> type(run.finish()[0]).__name__
        'SO2Linear'
    """

    def __init__(
        self,
        model: nn.Module,
        schedule: Schedule | str | Callable[[float], float] | Any = "triangular",
        total: int | None = None,
        *,
        lie: float = 1e-2,
        norm: float = 1e-2,
        form: str = "sqrt",
        penalty_every: int | None = None,
    ) -> None:
        self.model = model
        self._find_layers()  # fails early on a non-module or an unrelaxed model
        self.policy = _check_policy(schedule, self._layers) if _is_policy(schedule) else None
        if self.policy is not None:
            if total is not None:
                check_int(total, "total", minimum=1)
        elif isinstance(schedule, Schedule):
            if total is not None and check_int(total, "total", minimum=1) != schedule.total:
                raise ValueError(f"total={total} contradicts the schedule's own total ({schedule!r}); omit total")
        elif total is None:
            raise ValueError("total is required unless schedule is a Schedule instance")
        else:
            check_int(total, "total", minimum=1)
        self.lie, self.norm, self.form, self._eps = check_penalty_args(lie, norm, form, 1e-12)
        if penalty_every is None:
            penalty_every = 1 if self.policy is not None else DEFAULT_PENALTY_EVERY
        self.penalty_every = check_int(penalty_every, "penalty_every", minimum=1)
        self.total = total
        self.schedule = None if self.policy is not None else as_schedule(schedule, total=total or 1)
        if self.schedule is not None:  # a θ the buffers cannot hold fails now, not mid-training
            check_theta_fits(_largest_value(self.schedule), self._layers, "the schedule's largest θ")
        self.penalty_calls = 0  # penalty() calls so far: with penalty_every = k, calls 0, k, 2k, ... compute it
        self.position = 0  # index of the next advance()
        self.policy_steps = 0  # step() calls that ran the policy
        self.history: list[dict[str, float]] = []
        self._watch = OptimizerWatch(model)  # warns if the optimiser never updates W (built before relax())

    def _find_layers(self) -> None:
        """The relaxed layers and where each sits (parent module, attribute): walking a large
        module tree costs ~1 ms, checking that every layer is still in its place microseconds."""
        self._layers: list[tuple[str, nn.Module]] = _require_relaxed(self.model, "RelaxedTraining")
        self._places: list[tuple[nn.Module | None, str]] = []  # (parent, attribute) of each layer, in order
        for name, _ in self._layers:
            parent, _, attr = name.rpartition(".")
            self._places.append((self.model.get_submodule(parent) if name else None, attr))

    def _current_layers(self) -> list[tuple[str, nn.Module]]:
        """The relaxed layers, found again when one left its place (projected, replaced)."""
        for (parent, attr), (_, layer) in zip(self._places, self._layers):
            if (self.model if parent is None else parent._modules.get(attr)) is not layer:
                self._find_layers()  # NotRelaxedError when no relaxed layer is left
                break
        return self._layers

    @property
    def theta(self) -> float:
        """θ of the current index (with a learned policy, or before the first :meth:`advance`: the
        mean of the layers' θ)."""
        if self.policy is not None or self.position == 0:
            # the layers' own θ (before the first advance() no schedule index has been set yet);
            # one host sync for all layers (advance() and loss() read this every step)
            thetas = [layer.theta.detach().double() for _, layer in self._current_layers()]
            return float(torch.stack(thetas).mean())
        return self.schedule(self.position - 1)

    @property
    def done(self) -> bool:
        """True once the schedule has reached its last index (θ = 0); with a learned policy, once
        ``total`` advances were made (never without ``total``)."""
        if self.policy is not None:
            return self.total is not None and self.position >= self.total
        return self.position >= self.schedule.total

    def advance(self) -> float:
        """Set θ for the next schedule index and return it (with a learned policy: count the index and
        return the mean θ, which :meth:`step` sets).

        Raises:
            RuntimeError: with a learned policy, when :meth:`step` was not called since the last
                :meth:`advance` (the policy would never move θ).

        Warns (``RuntimeWarning``, once, in the first steps) when the model's own weights change but the
        relaxation weights, which get gradients, do not: an optimiser built before ``relax()``.
        """
        self._watch()
        if self.policy is not None:
            if self.position > self.policy_steps:
                raise RuntimeError("RelaxedTraining with a learned θ policy: call run.step() after every "
                                   "optimizer.step(), before the next advance()")
            self.position += 1
            return self.theta
        value = self.schedule(self.position)
        set_theta(self.model, value)
        self.position += 1
        return value

    def step(self) -> None:
        """After ``optimizer.step()``: the learned policy's update of θ (nothing with a schedule).

        Raises:
            RuntimeError: with a learned policy, a second call without :meth:`advance` in between (the
                policy would update θ twice for one optimiser step).
        """
        if self.policy is not None:
            if self.policy_steps >= self.position:
                raise RuntimeError("RelaxedTraining.step() once per advance(): call run.advance() at the start "
                                   "of every training step and run.step() after its optimizer.step()")
            self.policy.step()
            self.policy_steps += 1

    def penalty(self) -> Tensor:
        """The relaxation penalty for the last forward pass (k × it on every k-th call and a graph-free
        zero otherwise, with ``penalty_every = k``)."""
        k, call = self.penalty_every, self.penalty_calls
        layers = self._current_layers()
        if call % k:
            theta = layers[0][1].theta
            out = torch.zeros((), dtype=theta.dtype, device=theta.device)
        else:
            out = layers_penalty(layers, self.lie, self.norm, self.form, self._eps)
            out = out if k == 1 else k * out
        # the policy's own term (dual ascent's λ·γ) on every call: it is what moves θ
        out = out if self.policy is None else out + self.policy.penalty()
        self.penalty_calls += 1  # counted once it succeeded: a failed call does not shift the k-cycle
        return out

    def loss(self, task_loss: Tensor) -> Tensor:
        """``task_loss + penalty``; logs both (as floats) in :attr:`history`."""
        if not isinstance(task_loss, Tensor) or task_loss.numel() != 1 or not task_loss.is_floating_point():
            raise TypeError(f"task_loss must be a one-element floating tensor, got {type(task_loss).__name__}"
                            + (f" of shape {tuple(task_loss.shape)}" if isinstance(task_loss, Tensor) else ""))
        pen = self.penalty()
        self.history.append(
            {"position": self.position - 1, "theta": self.theta, "task": float(task_loss.detach()),
             "penalty": float(pen.detach())}
        )
        return task_loss + pen

    def report(self) -> dict[str, dict[str, float]]:
        """:func:`relax_plugins.projection_report` of the model."""
        return projection_report(self.model)

    def export(self, merge: bool = False) -> nn.Module:
        """A projected copy of the model (the model itself stays relaxed): save this one.

        The copy is a *state* copy (:func:`relax_plugins.copying.module_copy`), not a
        ``copy.deepcopy``: its parameters and buffers are its own, so training the relaxed model
        further does not change it, while configuration objects (field types, irreps, ...) are
        shared with the model. This works for modules that cannot be deep-copied (escnn's SO(3)
        layers). Same classes and state_dict keys as the model before :func:`relax_plugins.relax`.

        Args:
            merge: fold θ·P(W) into the copy's weights (see :func:`relax_plugins.project`).
        """
        check_bool(merge, "merge")
        return project(module_copy(self.model), merge=merge)

    def finish(self, merge: bool = False) -> nn.Module:
        """Project the model in place (after the schedule ends θ is 0 already; a learned policy's
        ``finish()`` sets it to 0).

        Raises:
            NotRelaxedError: the model holds no relaxed layer any more (finished or projected before).
            NonFiniteError: ``merge=True`` and some relaxation weights are not finite; nothing changed.
        """
        # everything that can refuse is checked before θ changes: a refused finish leaves the run as it was
        merge = check_bool(merge, "merge")
        layers = self._current_layers()  # NotRelaxedError once projected (a second finish())
        if merge:
            for name, layer in layers:
                _check_mergeable(name, layer)
        if self.policy is not None:
            self.policy.finish()
        elif not self.done and not math.isclose(self.theta, 0.0):
            set_theta(self.model, 0.0)
        return project(self.model, merge=merge)

    def state_dict(self) -> dict[str, Any]:
        """Schedule position and log; θ and W live in the model's own state_dict."""
        state = {"position": self.position, "history": [dict(h) for h in self.history],
                 "schedule": self._schedule_name(),
                 "penalty_calls": self.penalty_calls}
        if self.policy is not None:
            state["policy"] = {"state": self.policy.state_dict(), "steps": self.policy_steps}
        streams = self._random_states()
        if streams:  # terms drawing generators per step (penalty_generators): their streams resume too
            state["random_states"] = streams
        return state

    def _random_states(self) -> dict[str, Tensor]:
        out = {}
        for name, layer in self._current_layers():
            get = getattr(layer.term, "random_state", None)
            value = get() if callable(get) else None
            if value is not None:
                out[name] = value
        return out

    def _schedule_name(self) -> str:
        return repr(self.schedule) if self.policy is None else type(self.policy).__name__

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; a state of another run (other keys or schedule) raises before
        anything changes."""
        if not isinstance(state, dict) or set(state) - OPTIONAL_STATE_KEYS != STATE_KEYS:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"not a RelaxedTraining state: expected keys ['history', 'position', 'schedule'], "
                             f"got {got}")
        if state["schedule"] != self._schedule_name():
            raise ValueError(f"checkpoint was made with {state['schedule']}, this run uses {self._schedule_name()}")
        if ("policy" in state) != (self.policy is not None):
            raise ValueError("checkpoint and run disagree on whether θ is learned by a policy")
        # past the schedule's end is a state advance() makes (θ stays 0 there): it loads as it was saved
        position = check_int(state["position"], "state['position']", minimum=0)
        history = state["history"]
        if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
            raise ValueError("state['history'] must be a list of dicts")
        calls = check_int(state.get("penalty_calls", 0), "state['penalty_calls']", minimum=0)
        streams = state.get("random_states", {})
        terms = {name: layer.term for name, layer in self._current_layers()}
        if not isinstance(streams, dict) or not all(
                k in terms and callable(getattr(terms[k], "set_random_state", None))
                and isinstance(v, Tensor) and v.dtype == torch.uint8 for k, v in streams.items()):
            raise ValueError("state['random_states'] must map this model's relaxed layers to generator states")
        if self.policy is not None:
            policy = state["policy"]
            if not isinstance(policy, dict) or set(policy) != {"state", "steps"}:
                raise ValueError("state['policy'] must be {'state': ..., 'steps': ...}")
            steps = check_int(policy["steps"], "state['policy']['steps']", minimum=0)
            # step() follows each advance(): after `position` advances, position - 1 or position steps
            if not position - 1 <= steps <= position:
                raise ValueError(f"state['policy']['steps'] = {steps} does not fit state['position'] = {position} "
                                 "(expected position - 1 or position)")
            self.policy.load_state_dict(policy["state"])  # validates before changing anything
            self.policy_steps = steps
        self.position = position
        self.history = [dict(h) for h in history]
        self.penalty_calls = calls
        for name, value in streams.items():
            terms[name].set_random_state(value)
        if self.position > 0 and self.policy is None:
            set_theta(self.model, self.schedule(self.position - 1))


def _largest_value(schedule: Schedule, points: int = 100_000) -> float:
    """The largest θ the schedule gives (at every index, or at ``points`` evenly spread ones for very
    long schedules); evaluating it also validates a callable schedule's values up front."""
    n = schedule.total
    idx = range(n) if n <= points else sorted({round(k * (n - 1) / (points - 1)) for k in range(points)})
    return max(schedule(i) for i in idx)


_POLICY_METHODS = ("step", "penalty", "finish", "state_dict", "load_state_dict")


def _is_policy(obj: Any) -> bool:
    """A learned θ policy (duck-typed: DualAscentTheta, LearnedModulation or a user's own)."""
    return not isinstance(obj, (str, Schedule)) and hasattr(obj, "layers") and all(
        callable(getattr(obj, m, None)) for m in _POLICY_METHODS)


def _check_policy(policy: Any, layers: list[tuple[str, nn.Module]]) -> Any:
    """The policy, if it drives exactly the relaxed layers ``layers`` (the model's)."""
    mine = {id(m) for _, m in layers}
    theirs = {id(layer) for _, layer in policy.layers}
    if mine != theirs:
        raise ValueError(f"the {type(policy).__name__} was built on another model (or before a change of "
                         "its relaxed layers): build it on this model")
    return policy
