"""A pure-torch adapter for two small equivariant layer families (SO(2) on 2-vectors, C_N on the
regular representation). It exercises the core without optional libraries and doubles as the
smallest complete example of an adapter."""
