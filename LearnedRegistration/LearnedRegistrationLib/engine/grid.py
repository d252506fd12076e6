"""Image grids and coordinate frames.

This is the one place where the three frames of the project meet:

- **index** (IJK): voxel indices; a tensor ``image: (N, C, Z, Y, X)`` is stored in KJI order, so
  tensor axis -1 is I, -2 is J, -3 is K.
- **world**: physical millimetres in **RAS** (as Slicer holds data in memory). Files (NRRD, NIfTI
  through ITK, ITK transforms) are LPS; :meth:`ImageGrid.from_lps` / :meth:`ImageGrid.lps_geometry`
  do that flip and nothing else does.
- **normalized**: torch ``grid_sample`` coordinates in [-1, 1], last axis ordered (x, y, z) =
  (I, J, K). We use ``align_corners=True`` everywhere (:data:`ALIGN_CORNERS`): -1 and +1 are the
  centres of the first and last voxels, so a field in normalized units does not depend on the
  resolution it is sampled at, which makes multi-resolution up-sampling a plain interpolation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: The single ``align_corners`` setting used by every ``grid_sample`` / ``interpolate`` call.
ALIGN_CORNERS = True

#: Diagonal that flips LPS <-> RAS (its own inverse).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def mm_per_normalized_unit(shape, spacing=1.0) -> np.ndarray:
    """Millimetres per normalized unit along (I, J, K) of a grid: ``spacing * (n - 1) / 2``, shape (3,).

    The one place that states the scale of torch's normalized frame (with :data:`ALIGN_CORNERS`,
    -1 and +1 are the centres of the first and last voxels, ``n - 1`` voxel steps apart). Multiply a
    normalized vector by it to get mm, divide a mm vector by it to get normalized units.

    Args:
        shape: voxel counts in tensor order (Z, Y, X).
        spacing: voxel size in mm along (I, J, K), or one number for an isotropic grid; the
            default 1 gives *voxels* per normalized unit.
    """
    size_ijk = np.asarray(tuple(shape)[::-1], dtype=np.float64)
    return np.asarray(spacing, dtype=np.float64) * (size_ijk - 1.0) / 2.0


@dataclass(frozen=True)
class ImageGrid:
    """Geometry of a 3D image: voxel shape plus the index-to-RAS mapping.

    ``world = origin + direction @ diag(spacing) @ ijk`` with ``world`` in RAS mm.

    Attributes:
        shape: voxel counts in tensor order ``(Z, Y, X)`` = (K, J, I).
        spacing: voxel size in mm along (I, J, K).
        origin: RAS position (mm) of the centre of voxel (0, 0, 0), shape (3,).
        direction: (3, 3) orthonormal matrix whose columns are the RAS unit vectors of the
            I, J and K axes.

    Raises:
        ValueError: for a shape that is not 3D with at least 2 voxels per axis, non-positive
            spacing, or a direction matrix that is not orthonormal.
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: np.ndarray
    direction: np.ndarray

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in self.shape)
        if len(shape) != 3 or min(shape) < 2:
            raise ValueError(
                f"ImageGrid needs a 3D volume with at least 2 voxels along each axis, got shape {shape}"
            )
        spacing = tuple(float(s) for s in self.spacing)
        if len(spacing) != 3 or not all(np.isfinite(spacing)) or min(spacing) <= 0:
            raise ValueError(f"ImageGrid spacing must be 3 positive numbers (mm), got {spacing}")
        origin = np.asarray(self.origin, dtype=np.float64).reshape(3)
        direction = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)
        if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
            raise ValueError(f"ImageGrid direction must be orthonormal, got\n{direction}")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "origin", origin)
        object.__setattr__(self, "direction", direction)

    # ----------------------------------------------------------------------------- constructors
    @classmethod
    def from_ijk_to_ras(cls, shape, ijk_to_ras: np.ndarray) -> ImageGrid:
        """Grid from a (4, 4) IJK-to-RAS matrix (Slicer's ``GetIJKToRASMatrix``) and a KJI shape."""
        m = np.asarray(ijk_to_ras, dtype=np.float64)
        linear = m[:3, :3]
        spacing = np.linalg.norm(linear, axis=0)
        return cls(tuple(shape), tuple(spacing), m[:3, 3].copy(), linear / spacing)

    @classmethod
    def from_lps(cls, shape, spacing, origin_lps, direction_lps) -> ImageGrid:
        """Grid from ITK/SimpleITK geometry (LPS origin, row-major flattened LPS direction)."""
        direction = LPS_TO_RAS @ np.asarray(direction_lps, dtype=np.float64).reshape(3, 3)
        origin = LPS_TO_RAS @ np.asarray(origin_lps, dtype=np.float64).reshape(3)
        return cls(tuple(shape), tuple(spacing), origin, direction)

    # ----------------------------------------------------------------------------- geometry
    def lps_geometry(self) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
        """(spacing, LPS origin, row-major LPS direction) as SimpleITK's setters take them."""
        origin = LPS_TO_RAS @ self.origin
        direction = LPS_TO_RAS @ self.direction
        return self.spacing, tuple(origin.tolist()), tuple(direction.ravel().tolist())

    @property
    def size_ijk(self) -> tuple[int, int, int]:
        """Voxel counts along (I, J, K) (reverse of :attr:`shape`)."""
        return self.shape[::-1]

    @property
    def ijk_to_ras(self) -> np.ndarray:
        """(4, 4) homogeneous matrix mapping voxel index (I, J, K) to RAS mm."""
        m = np.eye(4)
        m[:3, :3] = self.direction * np.asarray(self.spacing)
        m[:3, 3] = self.origin
        return m

    @property
    def ras_to_ijk(self) -> np.ndarray:
        """(4, 4) inverse of :attr:`ijk_to_ras`."""
        return np.linalg.inv(self.ijk_to_ras)

    @property
    def ijk_to_normalized(self) -> np.ndarray:
        """(4, 4) matrix mapping voxel index (I, J, K) to torch normalized (x, y, z), align_corners=True."""
        m = np.diag([*(1.0 / mm_per_normalized_unit(self.shape)), 1.0])
        m[:3, 3] = -1.0
        return m

    @property
    def ras_to_normalized(self) -> np.ndarray:
        """(4, 4) matrix mapping RAS mm to this grid's normalized (x, y, z) frame."""
        return self.ijk_to_normalized @ self.ras_to_ijk

    @property
    def normalized_to_ras(self) -> np.ndarray:
        """(4, 4) matrix mapping this grid's normalized (x, y, z) frame to RAS mm."""
        return self.ijk_to_ras @ np.linalg.inv(self.ijk_to_normalized)

    @property
    def normalized_unit_mm(self) -> np.ndarray:
        """Millimetres per normalized unit along (I, J, K) (:func:`mm_per_normalized_unit`), shape (3,)."""
        return mm_per_normalized_unit(self.shape, self.spacing)

    @property
    def extent_mm(self) -> np.ndarray:
        """Distance in mm between the first and last voxel centres along (I, J, K), shape (3,)."""
        return np.asarray(self.spacing) * (np.asarray(self.size_ijk) - 1.0)

    @property
    def center_ras(self) -> np.ndarray:
        """RAS position (mm) of the grid's geometric centre, shape (3,)."""
        centre_ijk = (np.asarray(self.size_ijk, dtype=np.float64) - 1.0) / 2.0
        return self.origin + self.direction @ (np.asarray(self.spacing) * centre_ijk)

    def with_spacing(self, spacing_mm: float) -> ImageGrid:
        """A grid covering the same first/last voxel centres with about ``spacing_mm`` isotropic voxels.

        Each axis keeps at least its original extent; the voxel count per axis is
        ``round(extent / spacing_mm) + 1`` (never below 2, never above the original count).
        """
        extent = self.extent_mm
        size_ijk = np.clip(np.round(extent / float(spacing_mm)).astype(int) + 1, 2, self.size_ijk)
        return self.resized(tuple(int(s) for s in size_ijk[::-1]))

    def resized(self, shape) -> ImageGrid:
        """The grid with a new voxel ``shape`` (Z, Y, X) whose first and last voxel centres stay put.

        This matches ``align_corners=True`` interpolation, so normalized coordinates mean the
        same physical point on both grids.
        """
        shape = tuple(int(s) for s in shape)
        size_ijk = np.asarray(shape[::-1], dtype=np.float64)
        spacing = self.extent_mm / (size_ijk - 1.0)
        return ImageGrid(shape, tuple(spacing), self.origin.copy(), self.direction.copy())

    def world_points(self) -> np.ndarray:
        """RAS mm position of every voxel centre, shape (Z, Y, X, 3), float64."""
        k, j, i = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in self.shape), indexing="ij")
        ijk = np.stack([i, j, k], axis=-1)
        return ijk @ (self.direction * np.asarray(self.spacing)).T + self.origin

    def same_geometry(self, other: ImageGrid, tol_mm: float = 1e-3) -> bool:
        """True when both grids have the same shape and voxel centres agree within ``tol_mm``."""
        if self.shape != other.shape:
            return False
        corners = np.array(
            [[0, 0, 0, 1], [*(np.asarray(self.size_ijk) - 1), 1]], dtype=np.float64
        ).T
        diff = (self.ijk_to_ras @ corners) - (other.ijk_to_ras @ corners)
        return bool(np.abs(diff).max() <= tol_mm) and np.allclose(
            self.direction, other.direction, atol=1e-4
        )
