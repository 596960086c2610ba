"""``relax-plugins`` command line: list adapters."""

from __future__ import annotations

import argparse
import sys

from .plugins import list_adapters


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
    args = ap.parse_args(argv)
    if args.cmd == "list":
        rows = [(a.name, a.distribution, a.layers or a.description) for a in list_adapters()]
        widths = [max(len(r[i]) for r in [("adapter", "distribution", "layers"), *rows]) for i in range(2)]
        for name, dist, what in [("adapter", "distribution", "layers"), *rows]:
            sys.stdout.write(f"{name:{widths[0]}}  {dist:{widths[1]}}  {what}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
