"""Doctests of the MACE adapter need mace-torch (the ``.venv-mace`` environment of the Makefile)."""

import importlib.util

collect_ignore = [] if importlib.util.find_spec("mace") is not None else ["terms.py"]
