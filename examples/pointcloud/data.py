"""Synthetic rotated point-cloud classification, the offline stand-in for ModelNet40
(``/work/shared/docs/benchmarks.md`` §2).

Procedure (re-implemented from that description; every step is seeded):

* 16 parametric surface classes (:data:`CLASSES`), several pairs differing subtly: sphere vs. two
  ellipsoids (1:1:1.5 and 1:1.3:1.8), cube vs. boxes 1:1:2 and 1:2:3, cylinder vs. capsule,
  thin vs. thick torus (r/R = 0.25 vs 0.45), cone vs. square pyramid, tetrahedron vs. octahedron,
  a helix tube and an L-shaped union of two boxes;
* ``n_points`` (default 300) points sampled **uniformly by area** (mesh triangles chosen by area,
  rejection sampling for ellipsoids and tori, arc length for the helix);
* per-sample anisotropic scale jitter ``1 + U(-jitter, jitter)`` on each axis (default 0.08), then
  centring (mean 0) and normalisation (max norm 1), then Gaussian noise of std ``noise`` (0.01);
* a uniformly random rotation per sample (``QR`` of a Gaussian matrix with sign fix, det +1):
  SO(3) on train, validation and test ("SO(3)/SO(3)"), or rotations about z only in training
  ("z/SO(3)").

Sample ``i`` of split ``s`` draws from ``numpy.random.default_rng([seed, split_id, i])``, so splits
are disjoint streams and a sample does not depend on how many are requested.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

__all__ = ["CLASSES", "make_split", "make_dataset", "random_rotation", "sample_shape"]

Sampler = Callable[[np.random.Generator, int], np.ndarray]
_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


# -- samplers ----------------------------------------------------------------------------------


def _sample_mesh(vertices: np.ndarray, faces: np.ndarray, rng: np.random.Generator, n: int) -> np.ndarray:
    tri = vertices[faces]  # (F, 3, 3)
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    idx = rng.choice(len(faces), size=n, p=area / area.sum())
    u, v = rng.random(n), rng.random(n)
    flip = u + v > 1  # fold the unit square onto the triangle: uniform barycentric coordinates
    u[flip], v[flip] = 1 - u[flip], 1 - v[flip]
    t = tri[idx]
    return t[:, 0] + u[:, None] * (t[:, 1] - t[:, 0]) + v[:, None] * (t[:, 2] - t[:, 0])


def _box_mesh(a: float, b: float, c: float) -> tuple[np.ndarray, np.ndarray]:
    v = np.array([[x, y, z] for x in (-a, a) for y in (-b, b) for z in (-c, c)], dtype=float) / 2
    quads = [(0, 1, 3, 2), (4, 5, 7, 6), (0, 1, 5, 4), (2, 3, 7, 6), (0, 2, 6, 4), (1, 3, 7, 5)]
    faces = [f for q in quads for f in ((q[0], q[1], q[2]), (q[0], q[2], q[3]))]
    return v, np.array(faces)


def box(a: float, b: float, c: float) -> Sampler:
    """Surface of an a x b x c box centred at 0, uniform by area.

    Example:
        >>> box(1, 2, 3)(np.random.default_rng(0), 5).shape
        (5, 3)
    """
    v, f = _box_mesh(a, b, c)
    return lambda rng, n: _sample_mesh(v, f, rng, n)


def _unit_sphere(rng: np.random.Generator, n: int) -> np.ndarray:
    p = rng.normal(size=(n, 3))
    return p / np.linalg.norm(p, axis=1, keepdims=True)


def ellipsoid(a: float, b: float, c: float) -> Sampler:
    """Ellipsoid with semi-axes a, b, c. Rejection sampling: a sphere point mapped to the ellipsoid
    is kept with probability proportional to the local area stretch (uniform by area).

    Example:
        >>> p = ellipsoid(1, 1, 2)(np.random.default_rng(0), 4)
        >>> bool(np.allclose((p ** 2 / np.array([1, 1, 4])).sum(1), 1))
        True
    """

    def sample(rng: np.random.Generator, n: int) -> np.ndarray:
        out, gmax = [], max(b * c, a * c, a * b)
        while sum(len(o) for o in out) < n:
            u = _unit_sphere(rng, 4 * n)
            g = np.sqrt((b * c * u[:, 0]) ** 2 + (a * c * u[:, 1]) ** 2 + (a * b * u[:, 2]) ** 2)
            out.append(u[rng.random(len(u)) < g / gmax] * np.array([a, b, c]))
        return np.concatenate(out)[:n]

    return sample


def cylinder(r: float, h: float) -> Sampler:
    """Closed cylinder of radius r and height h along z.

    Example:
        >>> cylinder(0.5, 2)(np.random.default_rng(0), 3).shape
        (3, 3)
    """
    def sample(rng: np.random.Generator, n: int) -> np.ndarray:
        side, cap = 2 * np.pi * r * h, np.pi * r * r
        part = rng.choice(3, size=n, p=np.array([side, cap, cap]) / (side + 2 * cap))
        phi = rng.uniform(0, 2 * np.pi, n)
        rad = np.where(part == 0, r, r * np.sqrt(rng.random(n)))
        z = np.where(part == 0, rng.uniform(-h / 2, h / 2, n), np.where(part == 1, -h / 2, h / 2))
        return np.stack((rad * np.cos(phi), rad * np.sin(phi), z), axis=1)

    return sample


def capsule(r: float, h: float) -> Sampler:
    """Cylinder of radius r and height h with hemispherical caps.

    Example:
        >>> capsule(0.5, 1.5)(np.random.default_rng(0), 3).shape
        (3, 3)
    """
    def sample(rng: np.random.Generator, n: int) -> np.ndarray:
        side, sphere = 2 * np.pi * r * h, 4 * np.pi * r * r
        on_side = rng.random(n) < side / (side + sphere)
        phi = rng.uniform(0, 2 * np.pi, n)
        p = np.stack((r * np.cos(phi), r * np.sin(phi), rng.uniform(-h / 2, h / 2, n)), axis=1)
        s = r * _unit_sphere(rng, n)
        s[:, 2] += np.sign(s[:, 2]) * h / 2  # split the sphere into two caps
        return np.where(on_side[:, None], p, s)

    return sample


def cone(r: float, h: float) -> Sampler:
    """Closed cone: base radius r, height h.

    Example:
        >>> cone(0.7, 1.6)(np.random.default_rng(0), 3).shape
        (3, 3)
    """
    def sample(rng: np.random.Generator, n: int) -> np.ndarray:
        slant = np.pi * r * np.hypot(r, h)
        base = np.pi * r * r
        on_side = rng.random(n) < slant / (slant + base)
        phi = rng.uniform(0, 2 * np.pi, n)
        s = np.sqrt(rng.random(n))  # area of the lateral surface grows linearly with distance to apex
        side = np.stack((s * r * np.cos(phi), s * r * np.sin(phi), h / 2 - s * h), axis=1)
        q = r * np.sqrt(rng.random(n))
        bottom = np.stack((q * np.cos(phi), q * np.sin(phi), np.full(n, -h / 2)), axis=1)
        return np.where(on_side[:, None], side, bottom)

    return sample


def torus(R: float, r: float) -> Sampler:
    """Torus with tube radius r around a circle of radius R in the xy plane.

    Example:
        >>> p = torus(1.0, 0.25)(np.random.default_rng(0), 4)
        >>> bool(np.allclose((np.hypot(p[:, 0], p[:, 1]) - 1) ** 2 + p[:, 2] ** 2, 0.0625))
        True
    """
    def sample(rng: np.random.Generator, n: int) -> np.ndarray:
        out = []
        while sum(len(o) for o in out) < n:
            theta = rng.uniform(0, 2 * np.pi, 4 * n)
            keep = rng.random(4 * n) < (R + r * np.cos(theta)) / (R + r)  # area element ∝ R + r cos θ
            theta = theta[keep]
            phi = rng.uniform(0, 2 * np.pi, len(theta))
            rho = R + r * np.cos(theta)
            out.append(np.stack((rho * np.cos(phi), rho * np.sin(phi), r * np.sin(theta)), axis=1))
        return np.concatenate(out)[:n]

    return sample


def pyramid(a: float, h: float) -> Sampler:
    """Square pyramid with base side a and height h, both halved (base included).

    Example:
        >>> pyramid(1.2, 1.2)(np.random.default_rng(0), 3).shape
        (3, 3)
    """
    v = np.array([[-a, -a, 0], [a, -a, 0], [a, a, 0], [-a, a, 0], [0, 0, h]], dtype=float) / 2
    f = np.array([[0, 1, 2], [0, 2, 3], [0, 1, 4], [1, 2, 4], [2, 3, 4], [3, 0, 4]])
    return lambda rng, n: _sample_mesh(v, f, rng, n)


def tetrahedron() -> Sampler:
    """Regular tetrahedron surface.

    Example:
        >>> tetrahedron()(np.random.default_rng(0), 3).shape
        (3, 3)
    """
    v = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=float)
    f = np.array([[0, 1, 2], [0, 1, 3], [0, 2, 3], [1, 2, 3]])
    return lambda rng, n: _sample_mesh(v, f, rng, n)


def octahedron() -> Sampler:
    """Regular octahedron surface.

    Example:
        >>> octahedron()(np.random.default_rng(0), 3).shape
        (3, 3)
    """
    v = np.concatenate((np.eye(3), -np.eye(3)))
    f = np.array([[i, j, k] for i in (0, 3) for j in (1, 4) for k in (2, 5)])
    return lambda rng, n: _sample_mesh(v, f, rng, n)


def helix(radius: float = 0.5, pitch: float = 0.35, turns: float = 3.0, tube: float = 0.08) -> Sampler:
    """Points near a helix (uniform in arc length, offset by ``tube`` in a random direction).

    Example:
        >>> helix()(np.random.default_rng(0), 3).shape
        (3, 3)
    """
    def sample(rng: np.random.Generator, n: int) -> np.ndarray:
        t = rng.uniform(0, 2 * np.pi * turns, n)  # constant speed: uniform t is uniform arc length
        c = np.stack((radius * np.cos(t), radius * np.sin(t), pitch * t / (2 * np.pi)), axis=1)
        return c + tube * _unit_sphere(rng, n)

    return sample


def l_shape() -> Sampler:
    """Surface of the union of boxes A = [0,2]x[0,1]x[0,1] and B = [0,1]x[0,1]x[1,2].

    Example:
        >>> l_shape()(np.random.default_rng(0), 3).shape
        (3, 3)
    """
    va, f = _box_mesh(2, 1, 1)
    vb, _ = _box_mesh(1, 1, 1)
    va, vb = va + np.array([1, 0.5, 0.5]), vb + np.array([0.5, 0.5, 1.5])
    verts = np.concatenate((va, vb))
    faces = np.concatenate((f, f + 8))

    def inside(p: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        return np.all((p > lo - 1e-9) & (p < hi + 1e-9), axis=1)

    def sample(rng: np.random.Generator, n: int) -> np.ndarray:
        out = []
        while sum(len(o) for o in out) < n:
            p = _sample_mesh(verts, faces, rng, 2 * n)
            # a point of one box's surface inside the other box is an internal face of the union
            in_a = inside(p, np.array([0, 0, 0.0]), np.array([2, 1, 1.0]))
            in_b = inside(p, np.array([0, 0, 1.0]), np.array([1, 1, 2.0]))
            out.append(p[~(in_a & in_b)])
        return np.concatenate(out)[:n]

    return sample


#: name → surface sampler (unnormalised; each sample is jittered, centred and normalised)
CLASSES: dict[str, Sampler] = {
    "sphere": ellipsoid(1.0, 1.0, 1.0),
    "ellipsoid_1_1_1.5": ellipsoid(1.0, 1.0, 1.5),
    "ellipsoid_1_1.3_1.8": ellipsoid(1.0, 1.3, 1.8),
    "cube": box(1, 1, 1),
    "box_1_1_2": box(1, 1, 2),
    "box_1_2_3": box(1, 2, 3),
    "cylinder": cylinder(0.5, 2.0),
    "capsule": capsule(0.5, 1.5),
    "cone": cone(0.7, 1.6),
    "square_pyramid": pyramid(1.2, 1.2),
    "torus_thin": torus(1.0, 0.25),
    "torus_thick": torus(1.0, 0.45),
    "tetrahedron": tetrahedron(),
    "octahedron": octahedron(),
    "helix": helix(),
    "l_shape": l_shape(),
}


def random_rotation(rng: np.random.Generator, z_only: bool = False) -> np.ndarray:
    """A uniformly random rotation (Haar on SO(3)), or a uniform rotation about z.

    Example:
        >>> R = random_rotation(np.random.default_rng(0))
        >>> bool(np.allclose(R @ R.T, np.eye(3))), round(float(np.linalg.det(R)), 6)
        (True, 1.0)
    """
    if z_only:
        a = rng.uniform(0, 2 * np.pi)
        return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1.0]])
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))  # sign fix makes the QR factor Haar-distributed on O(3)
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def sample_shape(
    name: str, rng: np.random.Generator, n_points: int = 300, jitter: float = 0.08, noise: float = 0.01
) -> np.ndarray:
    """One centred, normalised, jittered and noisy sample of class ``name`` (not rotated), (n, 3).

    Example:
        >>> p = sample_shape("torus_thin", np.random.default_rng(0), n_points=50)
        >>> p.shape, bool(abs(p.mean(0)).max() < 0.05)
        ((50, 3), True)
    """
    p = CLASSES[name](rng, n_points) * (1 + rng.uniform(-jitter, jitter, size=3))
    p = p - p.mean(0)
    p = p / np.linalg.norm(p, axis=1).max()
    return p + noise * rng.normal(size=p.shape)


def make_split(
    split: str,
    per_class: int,
    seed: int = 0,
    n_points: int = 300,
    rotation: str = "so3",
    jitter: float = 0.08,
    noise: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Points ``[S, 3, n_points]`` (float32) and labels ``[S]`` of one split, class-balanced.

    Args:
        split: "train", "val" or "test".
        per_class: samples per class.
        seed: data seed (independent of the training seeds).
        n_points: points per cloud.
        rotation: "so3" (SO(3) everywhere) or "z" (z-rotations in "train", SO(3) elsewhere).
        jitter: per-axis scale jitter amplitude.
        noise: Gaussian noise std after normalisation.

    Example:
        >>> x, y = make_split("val", per_class=1, n_points=32)
        >>> tuple(x.shape), int(y.max()) + 1 == len(CLASSES)
        ((16, 3, 32), True)
    """
    if split not in _SPLIT_IDS:
        raise ValueError(f"split must be one of {sorted(_SPLIT_IDS)}, got {split!r}")
    if rotation not in ("so3", "z"):
        raise ValueError(f"rotation must be 'so3' or 'z', got {rotation!r}")
    names = list(CLASSES)
    xs, ys = [], []
    for i in range(per_class * len(names)):
        label = i % len(names)
        rng = np.random.default_rng([seed, _SPLIT_IDS[split], i])
        p = sample_shape(names[label], rng, n_points, jitter, noise)
        R = random_rotation(rng, z_only=(rotation == "z" and split == "train"))
        xs.append((p @ R.T).T)
        ys.append(label)
    return torch.tensor(np.stack(xs), dtype=torch.float32), torch.tensor(ys)


def make_dataset(
    per_class: tuple[int, int, int] = (64, 16, 32), seed: int = 0, n_points: int = 300, rotation: str = "so3"
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Train / val / test splits with ``per_class`` samples per class each.

    Example:
        >>> d = make_dataset((1, 1, 1), n_points=16)
        >>> sorted(d)
        ['test', 'train', 'val']
    """
    return {
        s: make_split(s, k, seed=seed, n_points=n_points, rotation=rotation)
        for s, k in zip(("train", "val", "test"), per_class)
    }
