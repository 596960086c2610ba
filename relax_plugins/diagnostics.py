"""Equivariance report: per-layer relaxation statistics and model-level equivariance errors, as a
dict (JSON-ready), a terminal table and a PNG."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._checks import check_bool, check_real
from .api import _require_relaxed, preserved_state, project, projection_report, relaxed_modules
from .copying import model_copy

__all__ = ["equivariance_report", "format_report", "save_report", "plot_report", "plot_history", "saved_tensor_bytes",
           "json_safe"]


def saved_tensor_bytes(fn: Callable[[], Any]) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn()`` runs: the training
    memory that grows with the batch (a CPU stand-in for peak GPU memory). A tensor saved by several
    operations (a layer's input, kept by the layer and by W·x) is one allocation and counts once.

    Example:
        >>> x = torch.randn(4, 3, requires_grad=True)
        >>> saved_tensor_bytes(lambda: (x * x).sum())   # x saved twice: one storage of 12 float32
        48
    """
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())

LAYER_COLUMNS = ("theta", "relax_ratio", "lie_defect", "rel_weight_error", "rel_output_error")


def equivariance_report(
    model: nn.Module,
    *inputs: Any,
    error_fn: Callable[[nn.Module], float] | None = None,
    merge: bool = False,
) -> dict[str, Any]:
    """Per relaxed layer: θ, θ||Wx||/||f_θ(x)||, mean Lie/discrete defect, ||W−P(W)||/||W|| and
    θ||(W−P(W))x||/||f_θ(x)|| on ``inputs``; for the whole model, ``error_fn`` of the relaxed model
    and of a projected copy (the model itself is not changed).

    Args:
        model: a relaxed model.
        *inputs: one batch, passed as ``model(*inputs)`` in the caller's grad mode (models that
            differentiate inside forward, e.g. MACE's forces, need it; nothing is backpropagated).
        error_fn: model → equivariance error (your group action on your data); optional.
        merge: how the projected copy is made.

    Example:
        >>> import torch, relax_plugins as rp
        >>> from relax_toy.layers import SO2Linear
        >>> m = rp.relax(torch.nn.Sequential(SO2Linear(1, 1)))
        >>> r = rp.equivariance_report(m, torch.randn(4, 2))
        >>> sorted(r)
        ['layers', 'model']
    """
    _require_relaxed(model, "equivariance_report")
    if error_fn is not None and not callable(error_fn):
        raise TypeError(f"error_fn must be a callable model -> float or None, got {type(error_fn).__name__}")
    merge = check_bool(merge, "merge")
    if not inputs:
        raise TypeError("equivariance_report needs one batch of inputs: equivariance_report(model, x, ...)")
    # the report's batch runs through the model as it is (train or eval mode, the caller's grad mode:
    # MACE differentiates inside its forward for forces), then everything it touched (BatchNorm
    # statistics, dropout's RNG draws, the recorded activations) is put back
    with preserved_state(model):
        model(*inputs)
        with torch.no_grad():
            layers = projection_report(model)
        for name, layer in relaxed_modules(model):
            layers[name]["adapter"] = layer.adapter
            layers[name]["layer"] = type(layer.base).__name__
        out: dict[str, Any] = {"layers": layers, "model": {}}
        if error_fn is not None:  # in the caller's grad mode too: error_fn runs the user's own code
            out["model"]["relaxed"] = _error_value(error_fn(model), "relaxed")
            with torch.no_grad():
                projected = project(model_copy(model), merge=merge)
            out["model"]["projected"] = _error_value(error_fn(projected), "projected")
    return out


def _error_value(value: Any, which: str) -> float:
    try:
        return check_real(value, f"error_fn({which} model)", minimum=None)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{exc} (error_fn must return a finite number)") from None


def format_report(report: dict[str, Any]) -> str:
    """The report as a fixed-width table.

    Example:
        >>> print(format_report({"layers": {"0": {"theta": 0.5}}, "model": {}}).splitlines()[0].split()[:2])
        ['layer', 'theta']
    """
    _check_report(report)
    header = f"{'layer':24s} " + " ".join(f"{c:>16s}" for c in LAYER_COLUMNS)
    lines = [header, "-" * len(header)]
    for name, row in report["layers"].items():
        cells = " ".join(f"{row[c]:16.3e}" if c in row else f"{'-':>16s}" for c in LAYER_COLUMNS)
        lines.append(f"{name or '<root>':24.24s} {cells}")
    for k, v in report.get("model", {}).items():
        lines.append(f"model equivariance error ({k}): {v:.3e}")
    return "\n".join(lines)


def save_report(report: dict[str, Any], path: str | Path) -> Path:
    """Write the report as strict JSON (RFC 8259): a NaN or infinite value, which JSON cannot hold,
    is written as null (a diverged layer's row then still loads in jq or a browser)."""
    _check_report(report)
    if not isinstance(path, (str, Path)):
        raise TypeError(f"path must be a str or Path, got {type(path).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(report), indent=2, sort_keys=True, allow_nan=False))
    return path


def json_safe(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float (nested in dicts, lists, tuples) replaced by None, so
    that ``json.dumps(..., allow_nan=False)`` writes strict JSON.

    Example:
        >>> json_safe({"a": [1.0, float("nan")], "b": float("inf")})
        {'a': [1.0, None], 'b': None}
    """
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def _check_report(report: Any) -> None:
    if not (isinstance(report, dict) and isinstance(report.get("layers"), dict)
            and all(isinstance(row, dict) for row in report["layers"].values())):
        raise TypeError("report must be a dict from equivariance_report(): {'layers': {name: {...}}, 'model': {...}}")


def _save(fig: Any, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    if not path.suffix:  # matplotlib writes "<path>.png" then: return the file that exists
        path = path.with_name(path.name + ".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_report(report: dict[str, Any], path: str | Path, columns: Sequence[str] = LAYER_COLUMNS[1:]) -> Path:
    """Per-layer bar charts (log scale) of the report's columns, as a PNG (needs matplotlib)."""
    _check_report(report)
    if isinstance(columns, str) or not isinstance(columns, Sequence) or not columns:
        raise TypeError(f"columns must be a non-empty list of column names, got {columns!r}")
    known = list(dict.fromkeys([*LAYER_COLUMNS, *(k for row in report["layers"].values() for k in row)]))
    unknown = [c for c in columns if c not in known]
    if unknown:
        raise ValueError(f"unknown columns {unknown}; the report's columns are {known}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["layers"])
    fig, axes = plt.subplots(1, len(columns), figsize=(4 * len(columns), 0.35 * len(names) + 2), squeeze=False)
    for ax, col in zip(axes[0], columns):
        vals = [max(report["layers"][n].get(col, 0.0), 1e-30) for n in names]
        ax.barh(range(len(names)), vals)
        ax.set_xscale("log")
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.invert_yaxis()
        ax.set_title(col)
    if report.get("model"):
        fig.suptitle(", ".join(f"{k}: {v:.2e}" for k, v in report["model"].items()))
    return _save(fig, path)


def plot_history(history: Sequence[dict[str, float]], path: str | Path) -> Path:
    """θ, task loss and penalty over training (e.g. :attr:`RelaxedTraining.history`) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3))
    x = range(len(history))
    for ax, key in zip(axes, ("theta", "task", "penalty")):
        ax.plot(x, [h[key] for h in history])
        ax.set_title(key)
        ax.set_xlabel("step")
        if key != "theta":
            ax.set_yscale("log")
    return _save(fig, path)
