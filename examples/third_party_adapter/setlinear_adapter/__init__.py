"""Example third-party adapter for relax-plugins."""

from .layers import SetLinear

__all__ = ["SetLinear"]
