"""Entry point vn of relax-plugins."""
