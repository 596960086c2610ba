"""relax-plugins adapter for escnn.

Importing this package does not import escnn; the escnn-dependent modules
(:mod:`relax_escnn.conv`, :mod:`relax_escnn.linear`, :mod:`relax_escnn.basis`,
:mod:`relax_escnn.groups`, :mod:`relax_escnn.wrapper`) are imported by the plugin hooks once a
model holds escnn layers. See ``docs/escnn.md``.
"""
