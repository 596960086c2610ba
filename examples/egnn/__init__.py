"""EGNN on the charged 5-body N-body task, standard vs relaxed training (``python -m examples.egnn.run``)."""
