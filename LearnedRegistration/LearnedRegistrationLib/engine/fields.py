"""A coarse displacement, evaluated at every voxel of the fixed image fast: the λ slider's inner loop.

Both instant-λ paths (the λ path of :mod:`path` and the network of ``learned.predict``) hold a
displacement ``u`` on a coarse grid and need, at each λ, the full-resolution outputs: the RAS
displacement of ``x -> A(x + u(x))``, the warped moving image and the Jacobian determinant.
:class:`FixedGridSampler` does the sampling once per λ, cheaply:

- the affine parts are linear in ``x``, and trilinear interpolation reproduces linear functions
  exactly, so the channels *RAS displacement* (3) and *moving-image normalized position* (3) are
  formed on the coarse grid and sampled at the fixed voxels, giving the same values as composing
  at full resolution for a fraction of the memory traffic;
- the coarse grid is extended by one voxel on every side, because the outermost fixed voxels may
  lie up to half a coarse voxel beyond its outermost voxel centres: there the affine part stays
  exact and ``u`` takes its border value (as ``grid_sample``'s "border" padding);
- when the fixed grid and the coarse grid are axis-aligned up to permutations and flips (the
  usual case, and always for a pyramid level of the fixed grid), the trilinear sampling is three
  1-D matrix passes (:class:`transforms.AxisAlignedResampler`); otherwise ``grid_sample``.

Frames: ``u: (1, 3, z, y, x)`` in the normalized units of ``frame`` (a grid whose extent the coarse
grid shares), channels (x, y, z); outputs on the fixed grid, RAS mm (see :mod:`grid`).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .grid import ImageGrid
from .transforms import AxisAlignedResampler, grid_sample, sampling_grid


class FixedGridSampler:
    """Samples coarse displacements at the fixed voxels, composed with an affine (module docstring).

    Args:
        fixed_grid: the output grid.
        frame: the grid whose normalized units (and extent) ``u`` is expressed in.
        affine_ras: (4, 4) resampling affine in RAS mm applied after ``u``: the moving point of
            fixed point ``x`` is ``A(x + u(x))``.
        moving_grid: the moving image's grid (for its normalized positions).
        device: where the tensors live.
    """

    def __init__(self, fixed_grid: ImageGrid, frame: ImageGrid, affine_ras: np.ndarray, moving_grid: ImageGrid,
                 device: torch.device) -> None:
        self.fixed_grid, self.frame, self.moving_grid, self.device = fixed_grid, frame, moving_grid, device
        self.affine_ras = np.asarray(affine_ras, dtype=np.float64)
        to_moving = moving_grid.ras_to_normalized
        # normalized frame displacement (x, y, z) -> mm along the frame's I, J, K -> RAS -> through A
        to_ras = self.affine_ras[:3, :3] @ np.asarray(frame.direction) @ np.diag(frame.normalized_unit_mm)
        # (3, 6): a row vector u maps to [RAS mm | moving image's normalized frame]
        linear = np.concatenate([to_ras.T, (to_moving[:3, :3] @ to_ras).T], axis=1)
        self._linear = torch.as_tensor(linear.astype(np.float32), device=device)
        self._shape: Optional[tuple] = None  # coarse shape the caches below were built for
        self._base: Optional[torch.Tensor] = None
        self._extended: Optional[ImageGrid] = None
        self._resampler: Optional[AxisAlignedResampler] = None
        self._points: Optional[torch.Tensor] = None

    def coarse_fields(self, u: torch.Tensor, extra: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(1, 6 + C, z + 2, y + 2, x + 2) on the extended coarse grid: RAS displacement ``A(x + u) - x``
        (mm, 3), moving-image normalized position of ``A(x + u)`` (3), then the ``extra`` channels
        ``(1, C, z, y, x)`` (e.g. λ(x)) extended with their border values."""
        shape = tuple(u.shape[2:])
        if self._shape != shape:
            self._build(shape)
        deformable = torch.einsum("nkzyx,kc->nczyx", u, self._linear)
        if extra is not None:
            deformable = torch.cat([deformable, extra], dim=1)
        deformable = F.pad(deformable, (1,) * 6, mode="replicate")  # border value, like grid_sample's "border"
        return torch.cat([self._base + deformable[:, :6], deformable[:, 6:]], dim=1)

    def to_fixed(self, coarse: torch.Tensor) -> torch.Tensor:
        """(1, C, z + 2, y + 2, x + 2) on the extended grid (:meth:`coarse_fields`) -> (1, C, Z, Y, X)
        at the fixed voxels (trilinear)."""
        if self._resampler is not None:
            return self._resampler(coarse)
        if self._points is None:
            self._points = sampling_grid(self.fixed_grid, self._extended, device=self.device)
        return grid_sample(coarse, self._points, "linear", padding_mode="border")

    def _build(self, shape: tuple) -> None:
        grid = self.frame.resized(shape)
        extended = ImageGrid(tuple(n + 2 for n in shape), grid.spacing, grid.origin - grid.direction @ np.asarray(grid.spacing),
                             grid.direction)
        ras = extended.world_points()  # (z + 2, y + 2, x + 2, 3) RAS mm
        moved = ras @ self.affine_ras[:3, :3].T + self.affine_ras[:3, 3]
        to_moving = self.moving_grid.ras_to_normalized
        base = np.concatenate([moved - ras, moved @ to_moving[:3, :3].T + to_moving[:3, 3]], axis=-1)
        self._base = torch.as_tensor(base.transpose(3, 0, 1, 2)[None].astype(np.float32), device=self.device)
        self._extended, self._shape, self._points = extended, shape, None
        self._resampler = AxisAlignedResampler.between(self.fixed_grid, extended, self.device)


def warp_and_displacement(
    sampler: FixedGridSampler, moving: torch.Tensor, u: torch.Tensor, extra: Optional[torch.Tensor] = None
) -> tuple[np.ndarray, np.ndarray, Optional[torch.Tensor]]:
    """The warped moving image and the RAS displacement of ``u`` at the fixed voxels.

    Args:
        sampler: for the pair's grids and affine.
        moving: (1, 1, Z', Y', X') moving image on its own grid.
        u: (1, 3, z, y, x) coarse displacement in the sampler's frame.
        extra: optional (1, C, z, y, x) channels sampled along (e.g. λ(x)).

    Returns:
        ``(warped (Z, Y, X) float32, displacement_ras (Z, Y, X, 3) float32 RAS mm, extra (C, Z, Y, X)
        tensor or None)``.
    """
    sampled = sampler.to_fixed(sampler.coarse_fields(u, extra))[0]  # (6 + C, Z, Y, X)
    displacement_ras = sampled[:3].permute(1, 2, 3, 0).contiguous().cpu().numpy()
    moving_points = sampled[3:6].permute(1, 2, 3, 0).contiguous().unsqueeze(0)  # (1, Z, Y, X, 3)
    warped = grid_sample(moving, moving_points, "linear", padding_mode="zeros")[0, 0]
    return warped.cpu().numpy(), displacement_ras, (sampled[6:] if extra is not None else None)
