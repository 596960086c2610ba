"""relax-plugins adapter for vn (under construction)."""
