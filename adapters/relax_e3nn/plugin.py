"""Entry point e3nn of relax-plugins."""
