"""Charged 5-body N-body data (EGNN / SEGNN protocol), re-implemented from the public description.

Procedure (``/work/shared/docs/benchmarks.md`` §1, after Kipf et al.'s NRI simulator as used by
EGNN and SEGNN):

* 5 particles in 3D, unit mass, charges drawn uniformly from {−1, +1};
* positions x_i ~ N(0, I); velocities 0.5·u_i with u_i a uniformly random unit vector;
* force F_i = Σ_{j≠i} q_i q_j (x_i − x_j) / ||x_i − x_j||³ (like charges repel), every component
  clipped to ±100;
* symplectic Euler with Δt = 0.001: v ← v + Δt F(x) once, then per step x ← x + Δt v (saved every
  100th step), v ← v + Δt F(x); frame k is the state after (k + 1)·100 steps;
* task: from (x, v, q) at frame 30 predict x at frame 40.

Only the frames the task needs are simulated and stored (the trajectory is stopped after frame 40,
which does not change frames 30 and 40).

Randomness: trajectory ``i`` of split ``s`` draws its initial conditions from its own generator
``numpy.random.default_rng([seed, split_id(s), i])``, so the first ``n`` trajectories do not depend
on how many are requested (a quick run uses a prefix of the full split), and the three splits are
disjoint streams. This differs from the original script (one global ``np.random.seed(43)`` stream
for 10000 training, then validation, then test trajectories): the distribution is the same, the
individual trajectories are not.

Results are cached as ``.npz`` files (float64) under ``data_cache/nbody/`` at the repository root
(override with ``cache_dir`` or the ``RELAX_DATA_CACHE`` environment variable); a cache holding more
trajectories than requested is sliced.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

__all__ = ["load_nbody", "simulate", "initial_conditions", "SPLIT_SIZES", "N_PARTICLES"]

N_PARTICLES = 5
DT = 1e-3
SAVE_EVERY = 100
MAX_FORCE = 100.0
FRAME_IN, FRAME_OUT = 30, 40
SPLIT_SIZES = {"train": 3000, "valid": 2000, "test": 2000}
_SPLIT_IDS = {"train": 0, "valid": 1, "test": 2}
_ALIASES = {"val": "valid", "validation": "valid", "training": "train"}
_FORMAT_VERSION = 1


def _split_name(split: str) -> str:
    s = _ALIASES.get(split, split)
    if s not in SPLIT_SIZES:
        raise ValueError(f"split must be one of {sorted(SPLIT_SIZES)} (or 'val'), got {split!r}")
    return s


def initial_conditions(split: str, n: int, seed: int = 43) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Initial positions, velocities and charges of the first ``n`` trajectories of a split.

    Args:
        split: "train", "valid" (or "val") or "test".
        n: number of trajectories.
        seed: base seed.

    Returns:
        (loc (n, 5, 3), vel (n, 5, 3), charges (n, 5, 1)), float64.

    Example:
        >>> loc, vel, q = initial_conditions("train", 2)
        >>> loc.shape, bool(np.allclose(np.linalg.norm(vel, axis=-1), 0.5)), sorted(set(q.ravel()))
        ((2, 5, 3), True, [-1.0, 1.0])
    """
    sid = _SPLIT_IDS[_split_name(split)]
    loc = np.empty((n, N_PARTICLES, 3))
    vel = np.empty((n, N_PARTICLES, 3))
    q = np.empty((n, N_PARTICLES, 1))
    for i in range(n):
        # one generator per trajectory: prefixes are stable whatever n is
        rng = np.random.default_rng([seed, sid, i])
        q[i] = rng.choice(np.array([-1.0, 1.0]), size=(N_PARTICLES, 1))
        loc[i] = rng.standard_normal((N_PARTICLES, 3))
        u = rng.standard_normal((N_PARTICLES, 3))
        vel[i] = 0.5 * u / np.linalg.norm(u, axis=-1, keepdims=True)
    return loc, vel, q


def _forces(x: np.ndarray, qq: np.ndarray) -> np.ndarray:
    diff = x[:, :, None, :] - x[:, None, :, :]  # x_i - x_j, (B, n, n, 3)
    r2 = np.einsum("bijk,bijk->bij", diff, diff)
    n = x.shape[1]
    r2[:, np.arange(n), np.arange(n)] = 1.0  # i == j: diff is 0 anyway, avoid 0/0
    inv_r3 = r2 ** -1.5
    f = np.einsum("bij,bijk->bik", qq * inv_r3, diff)
    return np.clip(f, -MAX_FORCE, MAX_FORCE)


def simulate(
    loc: np.ndarray, vel: np.ndarray, charges: np.ndarray, frames: tuple[int, ...] = (FRAME_IN, FRAME_OUT)
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Run the symplectic-Euler simulator (vectorised over trajectories) and return the saved frames.

    Args:
        loc: (B, n, 3) initial positions.
        vel: (B, n, 3) initial velocities.
        charges: (B, n, 1) charges.
        frames: frame indices to return (frame k = state after (k + 1)·100 steps).

    Returns:
        {frame: (loc (B, n, 3), vel (B, n, 3))}.

    Example:
        >>> loc, vel, q = initial_conditions("test", 3)
        >>> out = simulate(loc, vel, q, frames=(0,))
        >>> out[0][0].shape
        (3, 5, 3)
    """
    x = np.array(loc, dtype=np.float64)
    v = np.array(vel, dtype=np.float64)
    q = np.asarray(charges, dtype=np.float64)[..., 0]
    qq = q[:, :, None] * q[:, None, :]
    wanted = set(int(f) for f in frames)
    last_step = (max(wanted) + 1) * SAVE_EVERY
    out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    v += DT * _forces(x, qq)
    for step in range(1, last_step + 1):
        x += DT * v
        if step % SAVE_EVERY == 0 and step // SAVE_EVERY - 1 in wanted:
            out[step // SAVE_EVERY - 1] = (x.copy(), v.copy())
        v += DT * _forces(x, qq)
    return out


def _default_cache_dir() -> Path:
    env = os.environ.get("RELAX_DATA_CACHE")
    if env:
        return Path(env) / "nbody"
    return Path(__file__).resolve().parents[2] / "data_cache" / "nbody"


def _cache_files(cache_dir: Path, split: str, seed: int) -> list[tuple[int, Path]]:
    found = []
    for p in cache_dir.glob(f"nbody_v{_FORMAT_VERSION}_{split}_seed{seed}_n*.npz"):
        try:
            found.append((int(p.stem.rsplit("_n", 1)[1]), p))
        except ValueError:
            continue
    return sorted(found)


def load_nbody(
    split: str, n: int | None = None, seed: int = 43, cache_dir: str | Path | None = None
) -> dict[str, torch.Tensor]:
    """The charged 5-body data set: inputs at frame 30, target positions at frame 40.

    Simulates on first use (measured: 2000 trajectories in 3.4 s on one core) and caches the result.

    Args:
        split: "train" (3000 by default), "valid" (or "val"; 2000) or "test" (2000).
        n: number of trajectories (default: the split's standard size); any n ≥ 1 is allowed, the
            first n trajectories are the same whatever n is.
        seed: base seed of the initial conditions.
        cache_dir: where the ``.npz`` files live (default ``<repo>/data_cache/nbody`` or
            ``$RELAX_DATA_CACHE/nbody``).

    Returns:
        float32 tensors ``loc`` (B, 5, 3), ``vel`` (B, 5, 3), ``charges`` (B, 5, 1) at frame 30
        and ``target_loc`` (B, 5, 3) at frame 40.

    Example:
        >>> import tempfile
        >>> d = load_nbody("valid", n=2, cache_dir=tempfile.mkdtemp())
        >>> {k: tuple(v.shape) for k, v in sorted(d.items())}
        {'charges': (2, 5, 1), 'loc': (2, 5, 3), 'target_loc': (2, 5, 3), 'vel': (2, 5, 3)}
    """
    split = _split_name(split)
    n = SPLIT_SIZES[split] if n is None else int(n)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    cdir = Path(cache_dir) / "nbody" if cache_dir is not None else _default_cache_dir()
    arrays = None
    for size, path in _cache_files(cdir, split, seed) if cdir.is_dir() else []:
        if size >= n:
            try:
                with np.load(path) as z:
                    arrays = {k: z[k][:n] for k in ("loc", "vel", "charges", "target_loc")}
                break
            except (OSError, ValueError, KeyError):  # a corrupt cache file: regenerate
                continue
    if arrays is None:
        loc0, vel0, q = initial_conditions(split, n, seed)
        frames = simulate(loc0, vel0, q)
        arrays = {
            "loc": frames[FRAME_IN][0], "vel": frames[FRAME_IN][1], "charges": q,
            "target_loc": frames[FRAME_OUT][0],
        }
        cdir.mkdir(parents=True, exist_ok=True)
        # atomic write: other processes may read or write the same cache concurrently
        fd, tmp = tempfile.mkstemp(dir=cdir, suffix=".npz.tmp")
        os.close(fd)
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, cdir / f"nbody_v{_FORMAT_VERSION}_{split}_seed{seed}_n{n}.npz")
    return {k: torch.from_numpy(np.ascontiguousarray(v)).float() for k, v in arrays.items()}
