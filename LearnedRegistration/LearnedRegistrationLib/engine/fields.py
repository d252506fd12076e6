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
  1-D matrix passes (:class:`transforms.AxisAlignedResampler`); otherwise ``grid_sample``;
- the full-resolution outputs are computed in slabs along the fixed grid's Z
  (:func:`common.z_slabs`) and written into their arrays, so that beyond the outputs
  themselves only a slab's positions and channels are in memory (:class:`FixedGridOutputs`).

Frames: ``u: (1, 3, z, y, x)`` in the normalized units of ``frame`` (a grid whose extent the coarse
grid shares), channels (x, y, z); outputs on the fixed grid, RAS mm (see :mod:`grid`).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .common import release_freed_memory, z_slabs
from .grid import ImageGrid
from .metrics import jacobian_map
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

    def to_fixed(self, coarse: torch.Tensor, rows: Optional[tuple[int, int]] = None, channels_last: bool = False) -> torch.Tensor:
        """(1, C, z + 2, y + 2, x + 2) on the extended grid (:meth:`coarse_fields`) -> (1, C, Z, Y, X)
        at the fixed voxels (trilinear); with ``rows = (z0, z1)`` only the fixed slices z0 <= Z < z1
        (a slab of :func:`common.z_slabs`), (1, C, z1 - z0, Y, X); with ``channels_last``
        (1, Z, Y, X, C), contiguous (e.g. positions for ``grid_sample``)."""
        if self._extended is None:
            raise ValueError("FixedGridSampler.to_fixed() needs the coarse_fields() of a displacement first")
        if self._resampler is not None:
            return self._resampler(coarse, channels_last=channels_last, rows=rows)
        points = sampling_grid(self.fixed_grid, self._extended, device=self.device, rows=rows)
        out = grid_sample(coarse, points, "linear", padding_mode="border")
        return out.permute(0, 2, 3, 4, 1).contiguous() if channels_last else out

    def _build(self, shape: tuple) -> None:
        grid = self.frame.resized(shape)
        extended = ImageGrid(tuple(n + 2 for n in shape), grid.spacing, grid.origin - grid.direction @ np.asarray(grid.spacing),
                             grid.direction)
        ras = extended.world_points()  # (z + 2, y + 2, x + 2, 3) RAS mm
        moved = ras @ self.affine_ras[:3, :3].T + self.affine_ras[:3, 3]
        to_moving = self.moving_grid.ras_to_normalized
        base = np.concatenate([moved - ras, moved @ to_moving[:3, :3].T + to_moving[:3, 3]], axis=-1)
        self._base = torch.as_tensor(base.transpose(3, 0, 1, 2)[None].astype(np.float32), device=self.device)
        self._extended, self._shape = extended, shape
        self._resampler = AxisAlignedResampler.between(self.fixed_grid, extended, self.device)


@torch.no_grad()
def sample_warped(sampler: FixedGridSampler, coarse: torch.Tensor, moving: torch.Tensor) -> np.ndarray:
    """The moving image at the moving positions of :meth:`FixedGridSampler.coarse_fields`, slab by slab.

    Args:
        sampler: the sampler ``coarse`` came from.
        coarse: (1, 6 + C, z + 2, y + 2, x + 2) coarse fields (channels 3-5: moving normalized positions).
        moving: (1, 1, Z', Y', X') moving image on the sampler's moving grid and device.

    Returns:
        (Z, Y, X) float32 on the fixed grid (trilinear; 0 outside the moving image).
    """
    out = np.empty(sampler.fixed_grid.shape, dtype=np.float32)
    positions = coarse[:, 3:6].contiguous()
    for z0, z1 in z_slabs(out.shape):
        points = sampler.to_fixed(positions, (z0, z1), channels_last=True)  # (1, z1 - z0, Y, X, 3)
        out[z0:z1] = grid_sample(moving, points, "linear", padding_mode="zeros")[0, 0].cpu().numpy()
    return out


@torch.no_grad()
def sample_displacement(sampler: FixedGridSampler, coarse: torch.Tensor) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """The RAS displacement (and the extra channels) of :meth:`FixedGridSampler.coarse_fields` at the
    fixed voxels, slab by slab.

    Returns:
        ``(displacement_ras (Z, Y, X, 3) float32 RAS mm, extra (C, Z, Y, X) float32 or None)``.
    """
    shape = sampler.fixed_grid.shape
    fields = coarse[:, [0, 1, 2, *range(6, coarse.shape[1])]].contiguous()
    displacement = np.empty((*shape, 3), dtype=np.float32)
    extra = np.empty((fields.shape[1] - 3, *shape), dtype=np.float32) if fields.shape[1] > 3 else None
    for z0, z1 in z_slabs(shape):
        sampled = sampler.to_fixed(fields, (z0, z1))[0]  # (3 + C, z1 - z0, Y, X)
        displacement[z0:z1] = sampled[:3].permute(1, 2, 3, 0).cpu().numpy()
        if extra is not None:
            extra[:, z0:z1] = sampled[3:].cpu().numpy()
    return displacement, extra


def warp_and_displacement(
    sampler: FixedGridSampler, moving: torch.Tensor, u: torch.Tensor, extra: Optional[torch.Tensor] = None
) -> tuple[np.ndarray, np.ndarray, Optional[torch.Tensor]]:
    """The warped moving image and the RAS displacement of ``u`` at the fixed voxels (slab by slab).

    Args:
        sampler: for the pair's grids and affine.
        moving: (1, 1, Z', Y', X') moving image on its own grid.
        u: (1, 3, z, y, x) coarse displacement in the sampler's frame.
        extra: optional (1, C, z, y, x) channels sampled along (e.g. λ(x)).

    Returns:
        ``(warped (Z, Y, X) float32, displacement_ras (Z, Y, X, 3) float32 RAS mm, extra (C, Z, Y, X)
        CPU tensor or None)``.
    """
    with torch.no_grad():
        coarse = sampler.coarse_fields(u, extra)
    warped = sample_warped(sampler, coarse, moving)
    displacement_ras, sampled_extra = sample_displacement(sampler, coarse)
    return warped, displacement_ras, (None if sampled_extra is None else torch.from_numpy(sampled_extra))


class FixedGridOutputs:
    """The full-resolution outputs of one coarse displacement, each computed (slab by slab) when first
    asked for, all (Z, Y, X) float32 numpy arrays on the fixed grid.

    ``warped`` needs the moving positions at the fixed voxels and one trilinear sampling of the
    moving image (about a third of the work: a viewer can show it first); ``displacement_ras``,
    ``lambda_map`` and ``jacobian`` add the rest. The λ path's evaluation at one λ and the
    optimizer's result share this class.

    Args:
        sampler: the pair's :class:`FixedGridSampler` (fixed grid, affine, moving grid).
        moving: (1, 1, Z', Y', X') moving image (any intensity unit) on the sampler's moving grid and device.
        u: (1, 3, z, y, x) coarse displacement in the sampler's frame, normalized units, (x, y, z).
        lam: λ, the regularization weight.
        user_lambda_map: the user's λ(x) on the fixed grid, (Z, Y, X), or None (1 everywhere).
        learned_map: a learned λ(x) / mean λ(x), (1, 1, z, y, x) on ``u``'s grid, or None.
    """

    def __init__(self, sampler: FixedGridSampler, moving: torch.Tensor, u: torch.Tensor, lam: float,
                 user_lambda_map: Optional[np.ndarray] = None, learned_map: Optional[torch.Tensor] = None) -> None:
        self.sampler, self.moving, self.lam, self.user_lambda_map = sampler, moving, float(lam), user_lambda_map
        with torch.no_grad():
            self._coarse = sampler.coarse_fields(u, learned_map)
        self._warped: Optional[np.ndarray] = None
        self._displacement: Optional[np.ndarray] = None
        self._jacobian: Optional[np.ndarray] = None
        self._lambda_map: Optional[np.ndarray] = None

    @property
    def warped(self) -> np.ndarray:
        """(Z, Y, X) float32 moving image resampled at ``A(x + u(x))`` (0 outside it)."""
        if self._warped is None:
            self._warped = sample_warped(self.sampler, self._coarse, self.moving)
            release_freed_memory()  # the slabs' temporaries, before the next output
        return self._warped

    @property
    def displacement_ras(self) -> np.ndarray:
        """(Z, Y, X, 3) float32 RAS mm resampling displacement."""
        if self._displacement is None:
            displacement, learned = sample_displacement(self.sampler, self._coarse)
            # the regularization weight used at each voxel: λ · user's λ(x) · learned λ(x) / mean
            shape, user = self.sampler.fixed_grid.shape, self.user_lambda_map
            lambda_map = np.full(shape, self.lam, np.float32) if user is None else np.multiply(user, self.lam, dtype=np.float32)
            if learned is not None:
                lambda_map *= learned[0]
            self._displacement, self._lambda_map = displacement, lambda_map
            release_freed_memory()
        return self._displacement

    @property
    def lambda_map(self) -> np.ndarray:
        """(Z, Y, X) float32 regularization weight used at each voxel (sampled with the displacement)."""
        if self._lambda_map is None:
            _ = self.displacement_ras
        return self._lambda_map

    @property
    def jacobian(self) -> np.ndarray:
        """(Z, Y, X) float32 Jacobian determinant of ``x -> x + d(x)``."""
        if self._jacobian is None:
            self._jacobian = jacobian_map(self.displacement_ras, self.sampler.fixed_grid)
            release_freed_memory()  # the derivative slabs of every thread
        return self._jacobian
