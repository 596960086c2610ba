"""relax-plugins adapter for escnn (under construction)."""
