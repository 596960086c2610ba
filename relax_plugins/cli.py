"""``relax-plugins`` command line: list adapters; report on a saved checkpoint."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

import torch

from .plugins import list_adapters


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(f"{c:{w}}" for c, w in zip(r, widths)) + "  " + r[-1] for r in rows)


def _state_dict_of(obj: Any) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if key in obj and isinstance(obj[key], dict):
                return _state_dict_of(obj[key])
    raise SystemExit("checkpoint holds no state_dict (expected a state_dict or a dict with a 'model' entry)")


def checkpoint_summary(state: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """Per relaxed layer found in a state_dict: θ and ||W|| (dense or low-rank B·A).

    Example:
        >>> s = {"0.theta": torch.tensor(0.5), "0.term.weight": torch.ones(2, 2), "0.base.a": torch.ones(1)}
        >>> checkpoint_summary(s)
        [{'layer': '0', 'theta': 0.5, 'weight_norm': 2.0}]
    """
    out = []
    for key in state:
        if not key.endswith("theta") or not (key == "theta" or key.endswith(".theta")):
            continue
        prefix = key[: -len("theta")]
        w = state.get(prefix + "term.weight")
        if w is None and prefix + "term.lora_b" in state:
            w = state[prefix + "term.lora_b"] @ state[prefix + "term.lora_a"]
        row = {"layer": prefix.rstrip(".") or "<root>", "theta": float(state[key])}
        if w is not None:
            row["weight_norm"] = float(w.norm())
        out.append(row)
    return out


def _report(args: argparse.Namespace) -> int:
    obj = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    state = _state_dict_of(obj)
    rows = checkpoint_summary(state)
    if not rows:
        sys.stdout.write("no relaxed layer in this checkpoint (already projected, or not a relaxed model)\n")
        return 0
    if args.model is None:
        table = [("layer", "theta", "||W||")] + [
            (r["layer"], f"{r['theta']:.4g}", f"{r.get('weight_norm', float('nan')):.4g}") for r in rows
        ]
        sys.stdout.write(_table(table) + "\n(pass --model module:factory for projection errors)\n")
        return 0
    import relax_plugins as rp

    module_name, _, attr = args.model.partition(":")
    model = getattr(importlib.import_module(module_name), attr)()
    model = rp.relax(model)
    model.load_state_dict(state)
    report = {"layers": rp.projection_report(model), "model": {}}
    from .diagnostics import format_report, save_report

    sys.stdout.write(format_report(report) + "\n")
    if args.json:
        save_report(report, args.json)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``relax-plugins`` command.

    Example:
        >>> main(["list"]) == 0  # doctest: +ELLIPSIS
        adapter ...
        True
    """
    ap = argparse.ArgumentParser(prog="relax-plugins", description="constraint relaxation for equivariant networks")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="list loaded adapters and their distributions")
    rep = sub.add_parser("report", help="θ, ||W|| and projection errors of a saved relaxed model")
    rep.add_argument("checkpoint", help="torch.save'd state_dict (or dict with a 'model' state_dict)")
    rep.add_argument("--model", help="module:factory building the unrelaxed model, for projection errors")
    rep.add_argument("--json", help="also write the report as JSON here")
    args = ap.parse_args(argv)
    if args.cmd == "list":
        rows = [("adapter", "distribution", "layers")] + [
            (a.name, a.distribution, a.layers or a.description) for a in list_adapters()
        ]
        sys.stdout.write(_table(rows) + "\n")
        return 0
    return _report(args)


if __name__ == "__main__":
    raise SystemExit(main())
