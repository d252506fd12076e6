"""Volumes for looking at a registration: checkerboard and difference of fixed vs warped."""

from __future__ import annotations

import numpy as np

from .grid import ImageGrid


def _rescaled(image: np.ndarray) -> np.ndarray:
    """Robust min-max to [0, 1] (1st-99th percentile) so two images of different range can interleave."""
    lo, hi = np.percentile(image, [1, 99])
    return np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1).astype(np.float32)


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
    index = np.indices(grid.shape, sparse=True)  # K, J, I
    spacing_kji = grid.spacing[::-1]
    parity = sum((idx * s // square_mm).astype(np.int64) for idx, s in zip(index, spacing_kji)) % 2
    return np.where(parity == 0, _rescaled(fixed), _rescaled(warped)).astype(np.float32)


def difference(fixed: np.ndarray, warped: np.ndarray) -> np.ndarray:
    """Signed difference ``warped - fixed`` in the images' intensity units, (Z, Y, X) float32."""
    if fixed.shape != warped.shape:
        raise ValueError(f"difference() needs images of one shape, got {fixed.shape} and {warped.shape}")
    return (np.asarray(warped, dtype=np.float32) - np.asarray(fixed, dtype=np.float32)).astype(np.float32)
