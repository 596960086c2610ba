"""Entry point pyg of relax-plugins."""
