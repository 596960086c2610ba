"""Entry point escnn of relax-plugins."""
