"""Evaluation metrics of Learn2Reg: Dice, HD95, TRE, Jacobian determinant, % folding, SDlogJ, and the
error against a known displacement (synthetic pairs, the demo).

numpy in, numpy/float out; label maps are (Z, Y, X) integer arrays on one grid, displacements are
(Z, Y, X, 3) RAS mm resampling displacements on the fixed grid (see :mod:`transforms`).
How each metric is named, formatted and ordered for display is in :mod:`metric_table`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Optional

import numpy as np
import torch
from scipy import ndimage

from .common import z_slabs
from .filters import jacobian_determinant
from .grid import ImageGrid
from .transforms import ras_displacement_to_mm_ijk


def _check_labels(name: str, a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name}() label maps must have the same shape, got {a.shape} and {b.shape}")


def present_labels(*label_maps: np.ndarray) -> list[int]:
    """Sorted non-zero label values present in any of the maps."""
    values = set()
    for m in label_maps:
        values.update(int(v) for v in np.unique(m))
    values.discard(0)
    return sorted(values)


def dice_per_label(a: np.ndarray, b: np.ndarray, labels: Optional[Iterable[int]] = None) -> dict[int, float]:
    """Dice overlap ``2|A∩B| / (|A|+|B|)`` per label (labels absent from both maps are left out).

    Args:
        a, b: (Z, Y, X) label maps on the same grid.
        labels: label values to score; default every non-zero value present in either map.
    """
    _check_labels("dice_per_label", a, b)
    labels = present_labels(a, b) if labels is None else [int(v) for v in labels]
    # One bincount over joint codes is much faster than a mask per label on large volumes.
    a_flat = a.astype(np.int64).ravel()
    b_flat = b.astype(np.int64).ravel()
    n = int(max(a_flat.max(initial=0), b_flat.max(initial=0), max(labels, default=0))) + 1
    count_a = np.bincount(a_flat, minlength=n)
    count_b = np.bincount(b_flat, minlength=n)
    both = np.bincount(a_flat[a_flat == b_flat], minlength=n)
    scores = {}
    for label in labels:
        total = count_a[label] + count_b[label]
        if total > 0:
            scores[label] = float(2.0 * both[label] / total)
    return scores


def dice_mean(a: np.ndarray, b: np.ndarray, labels: Optional[Iterable[int]] = None) -> float:
    """Mean of :func:`dice_per_label` (nan when no label is present)."""
    scores = dice_per_label(a, b, labels)
    return float(np.mean(list(scores.values()))) if scores else float("nan")


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def hd95_mm(a: np.ndarray, b: np.ndarray, labels: Optional[Iterable[int]], grid: ImageGrid) -> dict[int, float]:
    """95th-percentile symmetric Hausdorff distance in mm per label.

    The larger of the two directed 95th percentiles of surface-voxel distances (as in MONAI's and
    DeepMind's ``compute_robust_hausdorff``). A label present in only one map scores ``inf``;
    labels absent from both are left out.
    """
    _check_labels("hd95_mm", a, b)
    labels = present_labels(a, b) if labels is None else [int(v) for v in labels]
    sampling = grid.spacing[::-1]  # (Z, Y, X) order for scipy
    result = {}
    for label in labels:
        ma, mb = a == label, b == label
        if not ma.any() and not mb.any():
            continue
        if not ma.any() or not mb.any():
            result[label] = float("inf")
            continue
        # Crop to the union's bounding box (+1 voxel) so each distance transform stays small.
        idx = np.argwhere(ma | mb)
        lo = np.maximum(idx.min(0) - 1, 0)
        hi = np.minimum(idx.max(0) + 2, a.shape)
        box = tuple(slice(low, high) for low, high in zip(lo, hi))
        sa, sb = _surface(ma[box]), _surface(mb[box])
        dist_to_b = ndimage.distance_transform_edt(~sb, sampling=sampling)
        dist_to_a = ndimage.distance_transform_edt(~sa, sampling=sampling)
        result[label] = float(max(np.percentile(dist_to_b[sa], 95), np.percentile(dist_to_a[sb], 95)))
    return result


def interpolate_displacement(displacement_ras: np.ndarray, grid: ImageGrid, points_ras: np.ndarray) -> np.ndarray:
    """Trilinear value of a (Z, Y, X, 3) displacement at RAS points (P, 3); edge values outside."""
    points = np.asarray(points_ras, dtype=np.float64).reshape(-1, 3)
    ijk = (grid.ras_to_ijk @ np.c_[points, np.ones(len(points))].T)[:3]
    coords = ijk[::-1]  # (K, J, I) for the (Z, Y, X) array
    return np.stack(
        [ndimage.map_coordinates(displacement_ras[..., c], coords, order=1, mode="nearest") for c in range(3)],
        axis=1,
    )


def tre_mm(
    fixed_points_ras: np.ndarray, moving_points_ras: np.ndarray, displacement_ras: np.ndarray, fixed_grid: ImageGrid
) -> np.ndarray:
    """Target registration error per landmark: ``|x_f + d(x_f) - x_m|`` in mm, shape (P,).

    Args:
        fixed_points_ras, moving_points_ras: (P, 3) corresponding landmarks in RAS mm.
        displacement_ras: (Z, Y, X, 3) resampling displacement on ``fixed_grid`` (RAS mm).
    """
    fixed_points_ras = np.asarray(fixed_points_ras, dtype=np.float64).reshape(-1, 3)
    moving_points_ras = np.asarray(moving_points_ras, dtype=np.float64).reshape(-1, 3)
    if fixed_points_ras.shape != moving_points_ras.shape:
        raise ValueError(
            f"tre_mm() needs as many fixed as moving landmarks, got {len(fixed_points_ras)} and {len(moving_points_ras)}"
        )
    mapped = fixed_points_ras + interpolate_displacement(displacement_ras, fixed_grid, fixed_points_ras)
    return np.linalg.norm(mapped - moving_points_ras, axis=1)


def jacobian_map(displacement_ras: np.ndarray, grid: ImageGrid) -> np.ndarray:
    """Jacobian determinant of ``x -> x + d(x)`` for a (Z, Y, X, 3) RAS mm displacement, (Z, Y, X) float32.

    Computed in slabs along Z with a one-slice halo (:func:`common.z_slabs`), so that the
    central differences are those of the whole volume and only a slab is converted at a time.

    Raises:
        ValueError: a displacement that is not (Z, Y, X, 3) on ``grid``.
    """
    displacement_ras = np.asarray(displacement_ras)
    if displacement_ras.shape != (*grid.shape, 3):
        raise ValueError(f"jacobian_map() 'displacement_ras' must have shape {(*grid.shape, 3)}, got {displacement_ras.shape}")
    out = np.empty(grid.shape, dtype=np.float32)
    depth = grid.shape[0]
    with torch.no_grad():
        for z0, z1 in z_slabs(grid.shape):
            a, b = max(0, z0 - 1), min(depth, z1 + 1)
            jac = jacobian_determinant(ras_displacement_to_mm_ijk(displacement_ras[a:b], grid), grid.spacing)
            out[z0:z1] = jac[0, z0 - a : z1 - a].numpy()
    return out


def _masked_slabs(values: np.ndarray, mask: Optional[np.ndarray]):
    """The values (inside ``mask`` when given) as flat slabs along the first axis (no whole-volume temporaries)."""
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != values.shape:
            raise ValueError(f"the mask has shape {mask.shape} but the values have {values.shape}")
    for z0, z1 in z_slabs(values.shape):
        yield values[z0:z1].reshape(-1) if mask is None else values[z0:z1][mask[z0:z1] > 0]


def folding_percent(jacobian: np.ndarray, mask: Optional[np.ndarray] = None) -> float:
    """Percentage of voxels (inside ``mask`` when given) with a non-positive Jacobian determinant.

    Raises:
        ValueError: a mask whose shape differs from the Jacobian's.
    """
    folded = total = 0
    for values in _masked_slabs(np.asarray(jacobian), mask):
        folded += int(np.count_nonzero(values <= 0))
        total += values.size
    return float(100.0 * folded / total) if total else float("nan")


def sdlogj(jacobian: np.ndarray, mask: Optional[np.ndarray] = None) -> float:
    """Standard deviation of ``log J`` (J clipped to [1e-9, 1e9]), inside ``mask`` when given (Learn2Reg).

    Two passes over slabs (mean, then squared deviations) with float64 sums.

    Raises:
        ValueError: a mask whose shape differs from the Jacobian's.
    """
    jacobian = np.asarray(jacobian)

    def logs():
        for values in _masked_slabs(jacobian, mask):
            yield np.log(np.clip(values, 1e-9, 1e9))

    total = count = 0
    for v in logs():
        total += float(v.sum(dtype=np.float64))
        count += v.size
    if not count:
        return float("nan")
    mean = total / count
    squares = sum(float(np.square(v - mean, dtype=np.float64).sum()) for v in logs())
    return float(np.sqrt(squares / count))


def displacement_error(
    estimated_ras: np.ndarray, true_ras: np.ndarray, mask: np.ndarray | None = None
) -> dict[str, float]:
    """Error of an estimated displacement against the true one, in mm.

    Args:
        estimated_ras, true_ras: (Z, Y, X, 3) RAS mm displacements on the same grid and convention.
        mask: optional (Z, Y, X); only voxels > 0 count (e.g. the foreground, where the images
            carry information).

    Returns:
        ``{"displacement_error_mean_mm", "displacement_error_p95_mm", "true_displacement_mean_mm"}``.

    Raises:
        ValueError: shape mismatch or an empty mask.
    """
    estimated_ras = np.asarray(estimated_ras, dtype=np.float64)
    true_ras = np.asarray(true_ras, dtype=np.float64)
    if estimated_ras.shape != true_ras.shape or estimated_ras.shape[-1:] != (3,):
        raise ValueError(
            f"displacement_error() needs two (Z, Y, X, 3) fields of one shape, got {estimated_ras.shape} and {true_ras.shape}"
        )
    error = np.linalg.norm(estimated_ras - true_ras, axis=-1)
    magnitude = np.linalg.norm(true_ras, axis=-1)
    if mask is not None:
        selected = np.asarray(mask) > 0
        if not selected.any():
            raise ValueError("displacement_error() mask is empty")
        error, magnitude = error[selected], magnitude[selected]
    return {
        "displacement_error_mean_mm": float(error.mean()),
        "displacement_error_p95_mm": float(np.percentile(error, 95)),
        "true_displacement_mean_mm": float(magnitude.mean()),
    }
