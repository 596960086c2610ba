"""MACE relax → train → project on molecules with EMT energies and forces (``python -m examples.mace.run``)."""
