"""The penalty (the regulariser of the relaxation terms) and the validation of its arguments."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ._checks import check_choice, check_real
from .errors import AdapterError, NonFiniteError, RelaxError
from .moments import moment_sums, under_func_transform
from .relaxed import _require_relaxed
from .term import LinearRelaxation, PenaltyTerms
from .wrapper import RelaxedModule

__all__ = ["penalty", "layers_penalty", "check_penalty_args", "PENALTY_FORMS"]

PENALTY_FORMS = ("sqrt", "mean", "paper")


def check_penalty_args(lie: Any, norm: Any, form: Any, eps: Any) -> tuple[float, float, str, float]:
    """Validate :func:`penalty`'s settings (also used up front by the training helpers)."""
    form = check_choice(form, "form", PENALTY_FORMS)
    lie, norm = check_real(lie, "lie"), check_real(norm, "norm")
    # √ has an infinite derivative at 0 and W = 0 at the start: ε = 0 would give NaN gradients
    eps = check_real(eps, "eps", positive=form != "mean")
    return lie, norm, form, eps


def penalty(
    model: nn.Module,
    lie: float = 1e-2,
    norm: float = 1e-2,
    *,
    form: str = "sqrt",
    eps: float = 1e-12,
) -> Tensor:
    """Regulariser of the relaxation terms, from the inputs of the last forward pass.

    With per-layer sums over samples (points / nodes / pixels) LD_l (squared Lie derivative plus
    squared discrete-generator defect) and N_l (||W x||²) on n_l samples:

    * ``form="sqrt"`` (default, batch-size independent):
      lie·√(Σ_l LD_l/n_l + ε) + norm·√(Σ_l N_l/n_l + ε)
    * ``form="mean"``: lie·Σ_l LD_l/n_l + norm·Σ_l N_l/n_l (squared, no roots)
    * ``form="paper"``: lie·√(Σ_l LD_l + ε) + norm·√(Σ_l N_l + ε), the authors' code (sums, so its
      strength grows with the batch size).

    Inputs are detached: the penalty trains W only. ``lie``, ``norm`` are finite numbers >= 0; ``eps``
    must be > 0 for the root forms (√ has an infinite slope at 0, where W starts). A layer that saw
    no samples (an empty batch) contributes 0.

    Raises:
        NonFiniteError: the penalty came out NaN/inf; the message names the layer and whether its
            recorded input, its relaxation weights or the penalty computation is at fault.

    Example:
        >>> import torch, relax_plugins as rp
        >>> from relax_toy.layers import SO2Linear
        >>> m = rp.relax(torch.nn.Sequential(SO2Linear(2, 2)))
        >>> _ = m(torch.randn(8, 4))
        >>> float(rp.penalty(m).detach()) < 1e-5   # W = 0 at the start
        True
    """
    lie, norm, form, eps = check_penalty_args(lie, norm, form, eps)
    return layers_penalty(_require_relaxed(model, "penalty"), lie, norm, form, eps)


def layers_penalty(layers: list[tuple[str, RelaxedModule]], lie: float, norm: float, form: str, eps: float) -> Tensor:
    """:func:`penalty` of the relaxed layers ``layers`` ((name, layer) pairs, as
    :func:`~relax_plugins.relaxed_modules` gives them) with validated settings: for callers that
    found the layers once (a model's module tree can take a millisecond to walk)."""
    groups = _penalty_groups(layers)
    lie_total: Tensor | float = 0.0
    norm_total: Tensor | float = 0.0
    for _, lie_v, norm_v, samples in groups:
        if form != "paper":  # "sqrt"/"mean": each layer's sums become means over its samples
            if len(set(samples)) == 1:
                scale: Tensor | float = 1.0 / max(samples[0], 1)
            else:
                scale = torch.tensor([1.0 / max(n, 1) for n in samples], dtype=lie_v.dtype, device=lie_v.device)
            lie_v, norm_v = lie_v * scale, norm_v * scale
        lie_total = lie_total + lie_v.sum()
        norm_total = norm_total + norm_v.sum()
    if form == "mean":
        out = lie * lie_total + norm * norm_total
    else:
        out = lie * torch.sqrt(lie_total + eps) + norm * torch.sqrt(norm_total + eps)
    out = torch.as_tensor(out)
    # one check per call, diagnosed only on failure; not inside a torch.func transform (vmap cannot
    # branch on a value), where the caller's own loss sees a NaN as usual
    if not under_func_transform() and not bool(torch.isfinite(out.detach()).all()):
        _raise_non_finite(layers, _per_layer(groups))
    return out


def _raise_non_finite(layers: list[tuple[str, RelaxedModule]], per_layer: list[tuple[str, PenaltyTerms]]) -> None:
    by_name = dict(layers)
    for name, t in per_layer:
        values = [torch.as_tensor(v).detach() for v in (t.lie, t.norm)]
        if all(bool(torch.isfinite(v).all()) for v in values):
            continue
        layer = by_name[name]
        where = f"layer {name or '<root>'!r} ({type(layer.base).__name__}, adapter {layer.adapter!r})"
        bad_w = [n for n, p in layer.term.named_parameters() if not bool(torch.isfinite(p.detach()).all())]
        if bad_w:
            raise NonFiniteError(f"penalty of {where} is not finite: its relaxation weights {bad_w} hold NaN/inf "
                                 "(a diverged optimiser step?)")
        bad_x = [k for k, v in layer.term.recorded_state().items()
                 if isinstance(v, Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad_x:
            raise NonFiniteError(f"penalty of {where} is not finite: the input recorded in the last forward pass "
                                 "holds NaN/inf (from the model's own computation, upstream of this layer)")
        raise NonFiniteError(f"penalty of {where} came out non-finite (lie={float(values[0]):g}, "
                             f"norm={float(values[1]):g}) from finite inputs and weights: overflow in the "
                             "adapter's penalty (try float32/float64 instead of half precision)")
    raise NonFiniteError("the penalty is not finite although every layer's terms are (overflow in the sum; "
                         "lower lie/norm or use float64)")


def _check_penalty_terms(t: Any, name: str, layer: RelaxedModule) -> PenaltyTerms:
    """An adapter's penalty_terms() value, validated before it reaches the loss."""
    where = f"penalty_terms() of layer {name or '<root>'!r} (adapter {layer.adapter!r})"
    if not isinstance(t, tuple) or len(t) != 3:
        raise AdapterError(f"{where} returned {type(t).__name__}, not PenaltyTerms(lie, norm, samples)")
    lie, norm, samples = t
    for what, v in (("lie", lie), ("norm", norm)):
        if not (isinstance(v, Tensor) and v.numel() == 1 and v.is_floating_point()):
            raise AdapterError(f"{where}: {what} must be a one-element floating tensor, got {type(v).__name__}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
        raise AdapterError(f"{where}: samples must be an int >= 0, got {samples!r}")
    return t if isinstance(t, PenaltyTerms) else PenaltyTerms(lie, norm, samples)


#: one group of :func:`_penalty_groups`: layer names, their Lie and norm sums as (L,) tensors, samples
PenaltyGroup = tuple[list[str], Tensor, Tensor, list[int]]


def _penalty_groups(layers: list[tuple[str, RelaxedModule]]) -> list[PenaltyGroup]:
    """Every layer's penalty sums, by group: layers of equal shapes on the default path are computed
    together (:func:`moment_sums`) and stay one (L,) tensor each for Lie and norm; any other layer is
    a group of its own."""
    groups: dict[tuple, list[tuple[str, LinearRelaxation]]] = {}
    out: list[PenaltyGroup] = []
    for name, layer in layers:
        term = layer.term
        recorded = term.recorded_state()
        if recorded and not any(isinstance(v, Tensor) for v in recorded.values()):
            raise RelaxError(f"penalty: layer {name or '<root>'!r} ({type(layer.base).__name__}) has not run a "
                             "forward pass yet: run the model on a batch before penalty()")
        if not torch.is_inference_mode_enabled():
            _leave_inference(term, recorded)
        _check_not_escaped(recorded, name, layer)
        # the declared capability decides; batchable_penalty() may still decline for this batch
        key = term.batchable_penalty() if term.batched_penalty else None
        if key is None:
            t = _check_penalty_terms(term.penalty_terms(), name, layer)
            out.append(([name], t.lie.reshape(1), t.norm.reshape(1), [t.samples]))
        else:
            groups.setdefault(key, []).append((name, term))
    for group in groups.values():
        terms = [t for _, t in group]
        inputs = [t.penalty_input() for t in terms]
        lie, norm = moment_sums(terms, inputs)
        out.append(([n for n, _ in group], lie, norm, [n for _, n in inputs]))
    return out


def _leave_inference(term: Any, recorded: dict[str, Any]) -> None:
    """Replace recorded inference tensors (a forward under ``torch.inference_mode``) by normal copies:
    autograd cannot save inference tensors for the penalty's backward."""
    for key, value in recorded.items():
        if isinstance(value, Tensor) and value.is_inference():
            term.__dict__[key] = value.clone()


def _check_not_escaped(recorded: dict[str, Any], name: str, layer: RelaxedModule) -> None:
    """A forward under a torch.func transform (vmap, grad, jacrev) records the transform's wrapped tensors;
    outside that transform they are dead, and functorch's own error would not say why."""
    functorch = getattr(torch._C, "_functorch", None)
    # inside a transform its tensors are alive
    if functorch is None or not hasattr(functorch, "is_functorch_wrapped_tensor") or under_func_transform():
        return
    if any(isinstance(v, Tensor) and functorch.is_functorch_wrapped_tensor(v) for v in recorded.values()):
        raise RelaxError(
            f"penalty: layer {name or '<root>'!r} ({type(layer.base).__name__}) last ran inside a torch.func "
            "transform (vmap/grad/jacrev), whose tensors cannot be used outside it: compute the penalty inside "
            "the same transform, or run a plain forward pass before penalty()"
        )


def _per_layer(groups: list[PenaltyGroup]) -> list[tuple[str, PenaltyTerms]]:
    return [(name, PenaltyTerms(lie[i], norm[i], samples[i]))
            for names, lie, norm, samples in groups for i, name in enumerate(names)]


def _all_penalty_terms(layers: list[tuple[str, RelaxedModule]]) -> list[tuple[str, PenaltyTerms]]:
    """Every layer's PenaltyTerms (name, terms), in the order :func:`_penalty_groups` computes them."""
    return _per_layer(_penalty_groups(layers))
