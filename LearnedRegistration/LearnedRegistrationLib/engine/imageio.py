"""Reading and writing volumes with SimpleITK, converting LPS geometry through :class:`grid.ImageGrid`.

Used by the scripts and tests that work without an MRML scene; the Slicer side goes through
:mod:`bridge.mrml`. Arrays are (Z, Y, X) = KJI, as SimpleITK's ``GetArrayFromImage`` returns them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .grid import ImageGrid


def grid_from_sitk(image: sitk.Image) -> ImageGrid:
    """:class:`ImageGrid` of a 3D SimpleITK image (LPS geometry converted to RAS).

    Raises:
        ValueError: for an image that is not 3D.
    """
    if image.GetDimension() != 3:
        raise ValueError(f"expected a 3D image, got a {image.GetDimension()}D one")
    return ImageGrid.from_lps(image.GetSize()[::-1], image.GetSpacing(), image.GetOrigin(), image.GetDirection())


def read_volume(path, dtype=np.float32) -> tuple[np.ndarray, ImageGrid]:
    """Read any SimpleITK-readable 3D scalar volume: ``(array (Z, Y, X), ImageGrid)``.

    Raises:
        ValueError: unreadable file, not 3D, or more than one component per voxel.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no such image file: {path}")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise ValueError(f"cannot read {path} as an image: {str(exc).strip().splitlines()[-1]}") from exc
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{path} has {image.GetNumberOfComponentsPerPixel()} components per voxel; expected a scalar volume")
    if image.GetDimension() == 2 or (image.GetDimension() == 3 and min(image.GetSize()) < 2):
        raise ValueError(f"{path} is a 2D image (size {image.GetSize()}); LearnedRegistration registers 3D volumes")
    return sitk.GetArrayFromImage(image).astype(dtype, copy=False), grid_from_sitk(image)


def sitk_image(array: np.ndarray, grid: ImageGrid) -> sitk.Image:
    """SimpleITK image of a (Z, Y, X) or (Z, Y, X, C) array on ``grid`` (RAS geometry written as LPS)."""
    array = np.asarray(array)
    image = sitk.GetImageFromArray(array, isVector=array.ndim == 4)
    spacing, origin, direction = grid.lps_geometry()
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


def write_volume(path, array: np.ndarray, grid: ImageGrid) -> None:
    """Write a (Z, Y, X) array on ``grid`` to any SimpleITK-writable file (compressed)."""
    sitk.WriteImage(sitk_image(array, grid), str(path), useCompression=True)
