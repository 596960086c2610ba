"""relax-plugins adapter for e3nn (under construction)."""
