"""argparse types the example runners share: counts that must be ≥ 1 (a count of 0 trains nothing, or
divides by it) or ≥ 0."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: an int ≥ ``minimum`` (a bad value is a one-line usage error).

    Example:
        >>> int_at_least(1)("3")
        3
    """
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = "int"  # argparse names the type in "invalid int value: 'x'"
    return parse


positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)
