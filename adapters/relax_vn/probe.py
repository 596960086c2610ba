"""Finding vector-neuron channel maps by watching them work, not by reading source text.

VN code applies its channel maps in many ways: ``self.map(x.transpose(1, -1))``, a helper function,
``x.permute(0, 2, 3, 1)`` then the Linear, ``F.linear(x, self.map.weight)``, ``torch.einsum`` with
the weight, features with the channel axis anywhere. What they share is what the maps *do*: a
channel map receives tensors with one axis of size 3 that carries xyz vectors. :func:`probe_vn`
runs the model twice on example inputs, the second time with every input rotated by a random
rotation R along its xyz axis, and records

* for every bias-free ``nn.Linear`` that is called: its input, per call; the Linear is a VN channel
  map if, in every call, its input of the rotated run is R applied along one axis of size 3 (not
  the channel axis, the last) of its input of the plain run, and not invariant. The axis is kept per
  input rank, so ``[B, 3, C]``, ``[B, 3, N, C]`` and ``[B, N, 3, k, C]`` inputs all work;
* for every other *VN layer module* (a user class that owns a matrix parameter applied functionally:
  its own 2-D parameter, or the weight of a bias-free Linear child that is never called as a
  module, as with ``F.linear``/``einsum``): its input and output. It is relaxed as a whole if both
  rotate along the same axis, input and output have the same rank, and exactly one other axis
  (besides the batch axis 0) is not a position axis — the channel axis; position axes are found by
  permuting them (a pointwise layer commutes with the permutation).

Everything runs inside :func:`relax_plugins.probe.preserved_state` (eval mode, no gradients, state
and RNGs restored). Which axis of each example input is xyz: every axis of size 3 but the first
(the batch axis) is tried, combination by combination (at most 16), and the combination that finds
the most maps wins; ``adapter_options={"vn": {"vn_input_axis": a}}`` fixes it.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from relax_plugins.probe import preserved_state

__all__ = ["VNProbe", "ModuleLayout", "probe_vn", "rotate_axis"]

_MAX_CALLS = 8  # calls recorded per module
_MAX_COMBOS = 16


@dataclass
class ModuleLayout:
    """Axes of a VN layer module relaxed as a whole: xyz and channel axes of a rank-``ndim`` input
    (the output has the same rank and axes), channels in and out."""

    ndim: int
    xyz: int
    channel: int
    c_in: int
    c_out: int


@dataclass
class VNProbe:
    """What one probe found: VN Linears (id → {input rank: xyz axis}), VN layer modules
    (id → :class:`ModuleLayout`), every module called during the probe, and notes for the user."""

    linears: dict[int, dict[int, int]] = field(default_factory=dict)
    modules: dict[int, ModuleLayout] = field(default_factory=dict)
    called: set[int] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)
    keep: list[nn.Module] = field(default_factory=list, repr=False)  # keeps the ids valid


def rotate_axis(t: Tensor, axis: int, R: Tensor) -> Tensor:
    """R (3x3) applied along ``axis`` of ``t`` (that axis has size 3).

    Example:
        >>> import torch
        >>> R = torch.tensor([[0., -1, 0], [1, 0, 0], [0, 0, 1]])
        >>> rotate_axis(torch.tensor([[1., 0, 0]]), 1, R).tolist()
        [[0.0, 1.0, 0.0]]
    """
    return torch.movedim(torch.movedim(t, axis, -1) @ R.to(t.dtype).T, -1, axis)


def _tol(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-8, torch.float32: 1e-4}.get(dtype, 1e-2)


def _rotating_axes(x1: Tensor, x2: Tensor, R: Tensor, exclude: tuple[int, ...] = ()) -> list[int]:
    """Axes a of size 3 along which x2 = R·x1 (and x1 is not invariant there)."""
    if x1.shape != x2.shape or not x1.is_floating_point() or x1.dim() < 1:
        return []
    tol = _tol(x1.dtype)
    x1, x2 = x1.double(), x2.double()
    scale = float(x1.norm())
    if not math.isfinite(scale) or scale == 0.0:
        return []
    out = []
    for a in range(x1.dim()):
        if x1.shape[a] != 3 or a in exclude or (a == 0 and x1.dim() > 1):
            continue
        rx = rotate_axis(x1, a, R)
        if float((x2 - rx).norm()) <= tol * scale and float((rx - x1).norm()) > 100 * tol * scale:
            out.append(a)
    return out


def _input_combos(args: tuple, kwargs: dict, fixed: int | None) -> tuple[list[Tensor], list[tuple[int | None, ...]]]:
    tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, Tensor) and t.is_floating_point()]
    choices = []
    for t in tensors:
        if fixed is not None:
            a = fixed % t.dim() if t.dim() else None
            choices.append([a if a is not None and t.shape[a] == 3 else None])
            continue
        axes = [a for a in range(1 if t.dim() > 1 else 0, t.dim()) if t.shape[a] == 3]
        choices.append(axes or [None])
    return tensors, list(itertools.islice(itertools.product(*choices), _MAX_COMBOS))


def _rotated_call(args: tuple, kwargs: dict, combo: tuple[int | None, ...], R: Tensor) -> tuple[tuple, dict]:
    it = iter(combo)

    def rot(v: Any) -> Any:
        if isinstance(v, Tensor) and v.is_floating_point():
            a = next(it)
            return v if a is None else rotate_axis(v, a, R)
        return v

    new_args = tuple(rot(v) for v in args)
    new_kwargs = {k: rot(v) for k, v in kwargs.items()}
    return new_args, new_kwargs


def _functional_owner(module: nn.Module) -> bool:
    """A user class that owns a matrix applied functionally (own 2-D+ parameter, or a bias-free
    Linear child), a candidate VN layer module."""
    if type(module).__module__.split(".", 1)[0] == "torch":
        return False
    if any(p is not None and p.dim() >= 2 for p in module._parameters.values()):
        return True
    return any(isinstance(c, nn.Linear) and c.bias is None for c in module.children())


def _clone(v: Any) -> Any:
    if isinstance(v, Tensor):
        return v.detach().clone()
    if isinstance(v, (tuple, list)):
        return type(v)(_clone(u) for u in v) if not hasattr(v, "_fields") else type(v)(*(_clone(u) for u in v))
    if isinstance(v, dict):
        return {k: _clone(u) for k, u in v.items()}
    return v


class _Recorder:
    def __init__(self, root: nn.Module) -> None:
        self.linears = {id(m): m for m in root.modules() if isinstance(m, nn.Linear) and m.bias is None}
        self.owners = {id(m): m for m in root.modules() if _functional_owner(m)}
        self.calls: dict[int, list[Tensor]] = {}
        self.first: dict[int, tuple[tuple, dict, Any]] = {}
        self.called: set[int] = set()
        # TorchScript modules take no Python hooks (MACE compiles some); nothing in them is a VN layer
        self.handles = [m.register_forward_hook(self._hook, with_kwargs=True) for m in root.modules()
                        if not isinstance(m, torch.jit.ScriptModule)]

    def reset(self) -> None:
        self.calls, self.first, self.called = {}, {}, set()

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        key = id(module)
        self.called.add(key)
        if key in self.linears:
            if args and isinstance(args[0], Tensor):
                calls = self.calls.setdefault(key, [])
                if len(calls) < _MAX_CALLS:
                    calls.append(args[0].detach().clone())
        elif key in self.owners and key not in self.first:
            self.first[key] = (_clone(args), _clone(kwargs), _clone(output))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _linear_verdicts(
    rec1: dict[int, list[Tensor]], rec2: dict[int, list[Tensor]], R: Tensor
) -> dict[int, dict[int, int]]:
    found: dict[int, dict[int, int]] = {}
    for key, calls in rec1.items():
        other = rec2.get(key, [])
        if not calls or len(other) != len(calls):
            continue
        axes: dict[int, int] = {}
        for x1, x2 in zip(calls, other):
            cand = _rotating_axes(x1, x2, R, exclude=(x1.dim() - 1,))
            if len(cand) != 1 or axes.get(x1.dim(), cand[0]) != cand[0]:
                axes = {}
                break
            axes[x1.dim()] = cand[0]
        if axes:
            found[key] = axes
    return found


def _first_tensor(args: tuple) -> tuple[int, Tensor] | None:
    for i, a in enumerate(args):
        if isinstance(a, Tensor) and a.is_floating_point():
            return i, a
    return None


def _module_layout(
    module: nn.Module, call1: tuple[tuple, dict, Any], call2: tuple[tuple, dict, Any], R: Tensor
) -> ModuleLayout | str:
    (args1, kwargs1, out1), (args2, _, out2) = call1, call2
    first = _first_tensor(args1)
    if first is None or not isinstance(out1, Tensor) or not isinstance(out2, Tensor):
        return "its input or output is not a tensor"
    i, x1 = first
    x2 = args2[i]
    a_in = _rotating_axes(x1, x2, R)
    a_out = _rotating_axes(out1, out2, R)
    if len(a_in) != 1 or len(a_out) != 1:
        return "its input or output does not carry xyz vectors along one axis"
    a = a_in[0]
    if out1.dim() != x1.dim() or a_out[0] != a:
        return "its output has another rank or xyz axis than its input"
    differ = [k for k in range(x1.dim()) if k != a and x1.shape[k] != out1.shape[k]]
    cands = [k for k in range(1, x1.dim()) if k != a]
    if len(differ) == 1 and differ[0] != 0:
        channel = differ[0]
    elif differ:
        return "its input and output differ on more than one axis"
    elif len(cands) == 1:
        channel = cands[0]
    else:
        g = torch.Generator().manual_seed(0)
        mixing = []
        for k in cands:
            perm = torch.randperm(x1.shape[k], generator=g)
            if x1.shape[k] < 2:
                continue
            args_p = list(args1)
            args_p[i] = x1.index_select(k, perm)
            try:
                out_p = module(*args_p, **kwargs1)
            except Exception:  # noqa: BLE001 - a module that rejects the permuted input mixes that axis
                mixing.append(k)
                continue
            ref = out1.index_select(k, perm)
            if not isinstance(out_p, Tensor) or out_p.shape != ref.shape or float(
                (out_p.double() - ref.double()).norm()
            ) > _tol(out1.dtype) * float(ref.double().norm()):
                mixing.append(k)
        if len(mixing) != 1:
            return f"no single channel axis among axes {cands} (mixing axes: {mixing})"
        channel = mixing[0]
    return ModuleLayout(x1.dim(), a, channel, int(x1.shape[channel]), int(out1.shape[channel]))


def probe_vn(root: nn.Module, args: tuple, kwargs: dict, options: dict[str, Any]) -> VNProbe:
    """Run the probe (see the module docstring) and return what it found.

    Example:
        >>> import torch
        >>> from relax_vn.layers import VNLinear
        >>> net = torch.nn.Sequential(VNLinear(2, 4))
        >>> found = probe_vn(net, (torch.randn(5, 2, 3, 7),), {}, {})
        >>> list(found.linears.values())
        [{4: 2}]
    """
    result = VNProbe(keep=list(root.modules()))
    fixed = options.get("vn_input_axis")
    tensors, combos = _input_combos(args, kwargs, None if fixed is None else int(fixed))
    if not tensors or all(all(a is None for a in c) for c in combos):
        result.notes.append(
            "vn: no floating-point example input has an axis of size 3 to rotate "
            "(pass example_inputs with xyz on one axis, or adapter_options={'vn': {'vn_input_axis': a}})"
        )
        combos = []
    gen = torch.Generator().manual_seed(12345)
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))
    R = q * torch.sign(torch.diagonal(r))
    if torch.det(R) < 0:
        R[:, 0] = -R[:, 0]
    rec = _Recorder(root)
    try:
        with preserved_state(root):
            root(*args, **kwargs)
            calls1, first1, result.called = rec.calls, rec.first, set(rec.called)
            best: tuple[int, dict, dict] = (-1, {}, {})
            for combo in combos:
                if all(a is None for a in combo):
                    continue
                rec.reset()
                r_args, r_kwargs = _rotated_call(args, kwargs, combo, R)
                root(*r_args, **r_kwargs)
                calls2, first2 = rec.calls, rec.first
                linears = _linear_verdicts(calls1, calls2, R)
                candidates = {k: (first1[k], first2[k]) for k in first1 if k in first2}
                score = len(linears) + len(candidates)
                if score > best[0]:
                    best = (score, linears, candidates)
            rec.remove()
            _, result.linears, candidates = best
            modules = {id(m): m for m in root.modules()}
            # a VN layer module: owns a matrix that is applied functionally (own parameter, or a
            # bias-free Linear child that the probe never saw called as a module)
            for key, (c1, c2) in candidates.items():
                module = modules[key]
                own = any(p is not None and p.dim() >= 2 for p in module._parameters.values())
                uncalled = any(
                    isinstance(c, nn.Linear) and c.bias is None and id(c) not in result.called
                    for c in module.children()
                )
                if not (own or uncalled):
                    continue
                layout = _module_layout(module, c1, c2, R)
                if isinstance(layout, ModuleLayout):
                    result.modules[key] = layout
                else:
                    result.notes.append(f"vn: {type(module).__name__} owns a channel map but is not relaxed: {layout}")
    finally:
        rec.remove()
    if not result.linears and not result.modules and combos:
        result.notes.append(
            "vn: the probe found no bias-free nn.Linear or VN layer module whose input carries xyz vectors "
            "(rotating the example inputs did not rotate any channel map's input along one axis of size 3)"
        )
    return result
