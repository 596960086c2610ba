"""ViSNet relax → train → project round trip on generated molecules (``python -m examples.visnet.run``)."""
