"""Volumes for looking at a registration: checkerboard and difference of fixed vs warped.

Each is one new float32 volume on the fixed grid; the checkerboard is filled slab by slab along Z
(:func:`common.z_slabs`), so no whole-volume temporaries are made.
"""

from __future__ import annotations

import numpy as np

from .common import z_slabs
from .grid import ImageGrid


def sampled_percentiles(image: np.ndarray, q, samples: int = 250_000, absolute: bool = False) -> np.ndarray | None:
    """Percentiles ``q`` (0-100) of the finite values (their magnitudes if ``absolute``) of about
    ``samples`` evenly strided voxels.

    As good as the exact percentiles for display windows and robust rescaling, and much faster on
    large volumes (it runs on every slider move). None when no value is finite.
    """
    flat = np.asarray(image).reshape(-1)
    flat = flat[:: max(1, flat.size // samples)]
    finite = flat[np.isfinite(flat)]
    if absolute:
        finite = np.abs(finite)
    return np.percentile(finite, q) if finite.size else None


def _rescaling(image: np.ndarray):
    """``rescale(values)``: robust min-max to [0, 1] (1st-99th percentile of ``image``), so that two
    images of different range can interleave; returns a new float32 array."""
    lo, hi = sampled_percentiles(image, [1, 99])
    scale = np.float32(1.0 / max(hi - lo, 1e-6))

    def rescale(values: np.ndarray) -> np.ndarray:
        out = np.subtract(values, lo, dtype=np.float32)
        out *= scale
        return np.clip(out, 0.0, 1.0, out=out)

    return rescale


def checkerboard(fixed: np.ndarray, warped: np.ndarray, grid: ImageGrid, square_mm: float = 20.0) -> np.ndarray:
    """3D checkerboard alternating fixed and warped in cubes of ``square_mm`` mm (along each index axis).

    Both images are rescaled to [0, 1] (1st-99th percentile) so that differing intensity ranges do
    not hide the seams. Returns (Z, Y, X) float32 on ``grid``.

    Raises:
        ValueError: on shape mismatch or a non-positive square size.
    """
    if fixed.shape != warped.shape or fixed.shape != grid.shape:
        raise ValueError(f"checkerboard() needs fixed, warped and grid of one shape, got {fixed.shape}, {warped.shape}, {grid.shape}")
    if square_mm <= 0:
        raise ValueError(f"checkerboard() square_mm must be positive, got {square_mm}")
    # odd square index along an axis flips the colour: XOR of three 1-D parities, broadcast
    odd = [(np.arange(n) * s // square_mm).astype(np.int64) % 2 == 1 for n, s in zip(grid.shape, grid.spacing[::-1])]
    in_plane = odd[1][:, None] ^ odd[2][None, :]
    rescale_fixed, rescale_warped = _rescaling(fixed), _rescaling(warped)
    board = np.empty(grid.shape, dtype=np.float32)
    for z0, z1 in z_slabs(grid.shape):
        warped_here = odd[0][z0:z1, None, None] ^ in_plane[None]
        board[z0:z1] = rescale_fixed(fixed[z0:z1])
        np.copyto(board[z0:z1], rescale_warped(warped[z0:z1]), where=warped_here)
    return board


def difference(fixed: np.ndarray, warped: np.ndarray) -> np.ndarray:
    """Signed difference ``warped - fixed`` in the images' intensity units, (Z, Y, X) float32."""
    if fixed.shape != warped.shape:
        raise ValueError(f"difference() needs images of one shape, got {fixed.shape} and {warped.shape}")
    return np.subtract(warped, fixed, dtype=np.float32)
