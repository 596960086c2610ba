"""θ schedules: θ as a function of the step (or epoch) index, exactly 0 at the last one.

All schedules take ``total``, the number of calls you will make (epochs for a per-epoch schedule,
optimiser steps for a per-step one), and are evaluated at ``0 .. total-1``; position
``t = i / (total - 1)`` runs from 0 to 1, and θ(total-1) = 0 exactly. Indices past the end give 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from ._checks import check_int, check_real

__all__ = ["Schedule", "Triangular", "LinearDecay", "Cosine", "Constant", "FromCallable", "as_schedule"]


class Schedule:
    """Base class: subclasses implement ``shape(t)`` for t in [0, 1]; θ = peak · shape(t).

    Args:
        total: number of schedule calls (epochs or steps); must be ≥ 1.
        peak: the scale of θ: the largest θ of the named shapes, which peak at 1 (a
            :class:`FromCallable` gives θ = peak · fn(t), whatever fn's largest value).
    """

    def __init__(self, total: int, peak: float = 1.0) -> None:
        self.total = check_int(total, "total", minimum=1)
        self.peak = check_real(peak, "peak", minimum=0.0)

    def shape(self, t: float) -> float:  # pragma: no cover
        raise NotImplementedError

    def __call__(self, i: int) -> float:
        i = check_int(i, "schedule index", minimum=0)
        if i >= self.total - 1:
            return 0.0
        return self.peak * self.shape(i / (self.total - 1))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(total={self.total}, peak={self.peak})"


class Triangular(Schedule):
    """Up from 0 to ``peak`` at fraction ``peak_at`` of training, then down to 0 (the paper's code has
    the peak in the middle and stopped at 2/E; here the last index is exactly 0).

    Args:
        total: number of schedule calls.
        peak: the largest θ.
        peak_at: where the peak sits, as a fraction of training in (0, 1).

    Example:
        >>> s = Triangular(total=5)
        >>> [s(i) for i in range(5)]
        [0.0, 0.5, 1.0, 0.5, 0.0]
        >>> [round(Triangular(total=5, peak_at=0.25)(i), 6) for i in range(5)]
        [0.0, 1.0, 0.666667, 0.333333, 0.0]
    """

    def __init__(self, total: int, peak: float = 1.0, peak_at: float = 0.5) -> None:
        super().__init__(total, peak)
        peak_at = check_real(peak_at, "peak_at", minimum=0.0, positive=True)  # NumPy and tensor scalars too
        if not peak_at < 1.0:
            raise ValueError(f"peak_at must be a number in (0, 1), got {peak_at!r}")
        self.peak_at = float(peak_at)

    def shape(self, t: float) -> float:
        a = self.peak_at
        if a == 0.5:
            return 1.0 - abs(2.0 * t - 1.0)  # bit for bit the earlier formula: resumed runs stay identical
        return t / a if t <= a else (1.0 - t) / (1.0 - a)

    def __repr__(self) -> str:
        extra = "" if self.peak_at == 0.5 else f", peak_at={self.peak_at}"
        return f"{type(self).__name__}(total={self.total}, peak={self.peak}{extra})"


class LinearDecay(Schedule):
    """``peak`` for the first half, then linearly to 0 over the second half (the paper's text).

    Example:
        >>> s = LinearDecay(total=5)
        >>> [s(i) for i in range(5)]
        [1.0, 1.0, 1.0, 0.5, 0.0]
    """

    def shape(self, t: float) -> float:
        return 1.0 if t <= 0.5 else 2.0 * (1.0 - t)


class Cosine(Schedule):
    """Half a cosine from ``peak`` to 0.

    Example:
        >>> s = Cosine(total=3)
        >>> [round(s(i), 6) for i in range(3)]
        [1.0, 0.5, 0.0]
    """

    def shape(self, t: float) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * t))


class Constant(Schedule):
    """``peak`` everywhere but the last index, which is 0 (the constant-θ ablation).

    Example:
        >>> s = Constant(total=3, peak=0.5)
        >>> [s(i) for i in range(3)]
        [0.5, 0.5, 0.0]
    """

    def shape(self, t: float) -> float:
        return 1.0


class FromCallable(Schedule):
    """Any callable ``fn(t)`` on t ∈ [0, 1], θ = peak · fn(t) (with the default peak 1, fn gives θ
    itself; values must be finite and ≥ 0); the last index is still forced to 0.

    Example:
        >>> s = FromCallable(lambda t: 1 - t * t, total=3)
        >>> [s(i) for i in range(3)]
        [1.0, 0.75, 0.0]
    """

    def __init__(self, fn: Callable[[float], float], total: int, peak: float = 1.0) -> None:
        if not callable(fn):
            raise TypeError(f"fn must be a callable of t in [0, 1], got {type(fn).__name__}")
        super().__init__(total, peak)
        self.fn = fn

    def shape(self, t: float) -> float:
        v = self.fn(t)
        try:
            return check_real(v, "the schedule function's value", minimum=0.0)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"schedule function returned {v!r} at t={t}; θ must be a finite number >= 0") from exc


_NAMED: dict[str, type[Schedule]] = {
    "triangular": Triangular,
    "linear_decay": LinearDecay,
    "cosine": Cosine,
    "constant": Constant,
}


def as_schedule(spec: str | Schedule | Callable[[float], float], total: int, peak: float = 1.0) -> Schedule:
    """A schedule from a name ("triangular", "linear_decay", "cosine", "constant"), a
    :class:`Schedule` (returned as is) or a callable of t ∈ [0, 1].

    Example:
        >>> as_schedule("cosine", total=10)
        Cosine(total=10, peak=1.0)
    """
    if isinstance(spec, Schedule):
        return spec
    check_int(total, "total", minimum=1)
    check_real(peak, "peak", minimum=0.0)
    if isinstance(spec, str):
        try:
            return _NAMED[spec](total=total, peak=peak)
        except KeyError:
            raise ValueError(f"unknown schedule {spec!r}; choose from {sorted(_NAMED)}") from None
    if callable(spec):
        return FromCallable(spec, total=total, peak=peak)
    raise TypeError(
        f"schedule must be a name {sorted(_NAMED)}, a Schedule or a callable of t, got {type(spec).__name__}"
    )
