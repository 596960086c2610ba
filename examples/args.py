"""argparse types the example runners share: counts that must be ≥ 1 (a count of 0 trains nothing, or
divides by it) or ≥ 0."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """An int ≥ 1, as an argparse ``type`` (a bad value is a one-line usage error).

    Example:
        >>> positive_int("3")
        3
    """
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    """An int ≥ 0, as an argparse ``type``.

    Example:
        >>> nonnegative_int("0")
        0
    """
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value
