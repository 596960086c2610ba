"""relax-plugins adapter for vector neurons (VN): structural detection of VN channel maps in any VN
layer file, dense SO(3)/O(3) relaxations with closed-form projection, and first-party VN layers
(:mod:`relax_vn.layers`). See ``docs/vn.md``."""
