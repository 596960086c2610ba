"""Runnable examples of relax-plugins (``python -m examples.<name>``)."""
