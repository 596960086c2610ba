"""relax-plugins adapter for pyg (under construction)."""
