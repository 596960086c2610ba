"""``relax-plugins`` command line: list adapters; report on a saved checkpoint."""

from __future__ import annotations

import argparse
import importlib
import pickle
import sys
from pathlib import Path
from typing import Any

import torch

from .errors import RelaxError
from .plugins import list_adapters


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(f"{c:{w}}" for c, w in zip(r, widths)) + "  " + r[-1] for r in rows)


class CliError(Exception):
    """A user error of the command line: reported as one line, exit status 2."""


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _state_dict_of(obj: Any) -> tuple[dict[str, torch.Tensor], str]:
    """The model state in a checkpoint and where it was found.

    A checkpoint of :class:`relax_plugins.lightning.RelaxationCallback` keeps the *projected* model
    under ``state_dict`` and the relaxed one under ``relax_plugins/state_dict``: the relaxed one is
    reported.
    """
    if _is_state_dict(obj):
        return obj, "state_dict"
    if isinstance(obj, dict):
        relaxed = obj.get("relax_plugins")
        if isinstance(relaxed, dict) and _is_state_dict(relaxed.get("state_dict")):
            return relaxed["state_dict"], "relaxed state saved by RelaxationCallback (Lightning)"
        for key in ("model", "state_dict", "model_state_dict"):
            if _is_state_dict(obj.get(key)):
                return obj[key], f"checkpoint[{key!r}]"
    raise CliError(
        "checkpoint holds no state_dict (expected a state_dict, a dict with a 'model'/'state_dict' entry, "
        f"or a Lightning checkpoint); found {type(obj).__name__}"
    )


def _load_checkpoint(path: str) -> Any:
    p = Path(path)
    if not p.exists():
        raise CliError(f"no such file: {path}")
    if not p.is_file():
        raise CliError(f"not a file: {path}")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except PermissionError:
        raise CliError(f"cannot read {path}: permission denied") from None
    except pickle.UnpicklingError:
        raise CliError(
            f"{path} is not a tensors-only torch checkpoint: weights_only loading refused it (a pickled "
            "model, or a corrupt file; save model.state_dict())"
        ) from None
    except Exception as exc:  # truncated zip, random bytes, ...
        raise CliError(f"{path} is not a readable torch checkpoint ({type(exc).__name__}: {_first(exc)})") from None


def _first(exc: BaseException) -> str:
    """The first sentence of an exception's message (torch's messages run to several lines)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    head = text.split(". ")[0]
    return head if len(head) <= 160 else head[:157] + "..."


def _build_model(spec: str) -> torch.nn.Module:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise CliError(f"--model must be 'package.module:factory', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise CliError(f"--model {spec}: cannot import {module_name!r} ({type(exc).__name__}: {exc})") from None
    factory = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise CliError(f"--model {spec}: {module_name!r} has no attribute {attr!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise CliError(f"--model {spec}: {attr!r} is not callable")
    try:
        model = factory()
    except Exception as exc:
        raise CliError(f"--model {spec}: the factory failed ({type(exc).__name__}: {exc})") from None
    if not isinstance(model, torch.nn.Module):
        raise CliError(f"--model {spec}: the factory returned {type(model).__name__}, not a torch.nn.Module")
    return model


def checkpoint_summary(state: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """Per relaxed layer found in a state_dict: θ and ||W|| (dense or low-rank B·A).

    Example:
        >>> s = {"0.theta": torch.tensor(0.5), "0.term.weight": torch.ones(2, 2), "0.base.a": torch.ones(1)}
        >>> checkpoint_summary(s)
        [{'layer': '0', 'theta': 0.5, 'weight_norm': 2.0}]
        >>> checkpoint_summary({"rot.theta": torch.randn(3), "scale.theta": torch.tensor(0.3)})  # users' own
        []
    """
    out = []
    for key, value in state.items():
        if not key.endswith("theta") or not (key == "theta" or key.endswith(".theta")):
            continue
        prefix = key[: -len("theta")]
        # a relaxed layer's θ is a scalar next to its term's weights; a user's own `theta` is not
        if not (torch.is_tensor(value) and value.dim() == 0 and value.is_floating_point()
                and any(k.startswith(prefix + "term.") for k in state)):
            continue
        w = state.get(prefix + "term.weight")
        if w is None and prefix + "term.lora_b" in state:
            w = state[prefix + "term.lora_b"] @ state[prefix + "term.lora_a"]
        row = {"layer": prefix.rstrip(".") or "<root>", "theta": float(state[key])}
        if w is not None:
            row["weight_norm"] = float(w.norm())
        out.append(row)
    return out


def relax_settings(state: dict[str, torch.Tensor], layers: list[str]) -> dict[str, Any]:
    """The ``relax()`` arguments a relaxed state_dict shows: its relaxed ``layers`` (as
    :func:`checkpoint_summary` names them) as ``include``, and the rank of their low-rank W.

    Raises:
        CliError: the layers mix ranks (or dense and low-rank W): no single ``relax()`` call made them.

    Example:
        >>> s = {"0.theta": torch.tensor(0.5), "0.term.lora_a": torch.ones(2, 3), "0.term.lora_b": torch.ones(3, 2)}
        >>> relax_settings(s, ["0"])
        {'include': ['0'], 'rank': 2}
    """
    ranks = set()
    for layer in layers:
        a = state.get("term.lora_a" if layer == "<root>" else f"{layer}.term.lora_a")
        ranks.add(None if a is None else int(a.shape[0]))
    if len(ranks) > 1:
        shown = sorted("dense" if r is None else f"rank {r}" for r in ranks)
        raise CliError(f"the checkpoint's relaxed layers mix {shown}: the CLI can rebuild one relax() call only")
    settings: dict[str, Any] = {} if layers == ["<root>"] else {"include": [_literal(n) for n in layers]}
    rank = ranks.pop()
    if rank is not None:
        settings["rank"] = rank
    return settings


def _literal(name: str) -> str:
    # include= takes fnmatch patterns: a module name's own [ ] * ? must match themselves
    return "".join(f"[{c}]" if c in "[]*?" else c for c in name)


def _call(settings: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in settings.items()) or "model"


def _report(args: argparse.Namespace) -> int:
    state, where = _state_dict_of(_load_checkpoint(args.checkpoint))
    rows = checkpoint_summary(state)
    if not rows:
        sys.stdout.write("no relaxed layer in this checkpoint (already projected, or not a relaxed model)\n")
        return 0
    if args.model is None:
        table = [("layer", "theta", "||W||")] + [
            (r["layer"], f"{r['theta']:.4g}", f"{r.get('weight_norm', float('nan')):.4g}") for r in rows
        ]
        sys.stdout.write(f"{where}\n" + _table(table) + "\n(pass --model module:factory for projection errors)\n")
        return 0
    import relax_plugins as rp

    model = _build_model(args.model)
    settings = relax_settings(state, [r["layer"] for r in rows])
    try:
        model = rp.relax(model, **settings)
    except Exception as exc:
        raise CliError(f"--model {args.model}: relax({_call(settings)}) failed ({type(exc).__name__}: {exc})") from None
    missing, unexpected = _key_mismatch(model, state)
    if missing or unexpected:
        raise CliError(
            f"the checkpoint does not belong to --model {args.model} relaxed as relax({_call(settings)}) (the "
            f"layers and rank its keys show; other relax() options are not stored in it): {len(missing)} "
            f"missing key(s) {missing[:3]}, {len(unexpected)} unexpected key(s) {unexpected[:3]}"
        )
    try:
        model.load_state_dict(state)
    except Exception as exc:
        raise CliError(f"the checkpoint does not fit --model {args.model}: {_first(exc)}") from None
    report = {"layers": rp.projection_report(model), "model": {}}
    from .diagnostics import format_report, save_report

    sys.stdout.write(format_report(report) + "\n")
    if args.json:
        try:
            save_report(report, args.json)
        except OSError as exc:
            raise CliError(f"cannot write --json {args.json}: {exc.strerror or exc}") from None
    return 0


def _key_mismatch(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    # escnn's eval-mode filter caches are derived from the weights: not required either way
    derived = ("filter", "expanded_bias", "matrix")
    own = set(model.state_dict())
    missing = sorted(k for k in own - set(state) if k.rpartition(".")[2] not in derived)
    unexpected = sorted(k for k in set(state) - own if k.rpartition(".")[2] not in derived)
    return missing, unexpected


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``relax-plugins`` command; user errors (bad paths, files that are not
    checkpoints, bad ``--model`` specs) print one line on stderr and return 2.

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
    try:
        if args.cmd == "list":
            rows = [("adapter", "distribution", "layers", "adapter_options")] + [
                (a.name, a.distribution, a.layers or a.description, ", ".join(a.options) or "-")
                for a in list_adapters()
            ]
            sys.stdout.write(_table(rows) + "\n")
            return 0
        return _report(args)
    except (CliError, RelaxError) as exc:
        one_line = " ".join(str(exc).split())  # library messages may span lines; the CLI promises one
        sys.stderr.write(f"relax-plugins {args.cmd}: error: {one_line}\n")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
