"""Charged 5-body N-body benchmark: data (:mod:`examples.nbody.data`), a SEGNN-style e3nn model
(:mod:`examples.nbody.model`) and the standard-vs-relaxed comparison (``python -m examples.nbody.run``)."""
