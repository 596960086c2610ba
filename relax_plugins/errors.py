"""Exceptions raised by relax-plugins; all derive from :class:`RelaxError`."""

from __future__ import annotations


class RelaxError(RuntimeError):
    """Base class of every error raised by relax-plugins."""


class NothingToRelaxError(RelaxError):
    """relax() found no layer that any loaded adapter recognises."""


class AlreadyRelaxedError(RelaxError):
    """relax() was called on a model that already holds relaxed layers."""


class NotRelaxedError(RelaxError):
    """project()/set_theta()/penalty() were called on a model without relaxed layers."""


class UnknownAdapterError(RelaxError, KeyError):
    """An adapter name that no loaded plugin provides."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class PluginLoadError(RelaxError, ImportError):
    """An adapter plugin (entry point) failed to import or to validate."""


class AdapterError(RelaxError):
    """An adapter failed while relaxing, projecting or merging a layer."""


class NonFiniteError(RelaxError, FloatingPointError):
    """A penalty, relaxation weight or merge came out NaN/inf; the message names the layer."""
