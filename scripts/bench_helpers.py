"""Pure helpers of the peer benchmark (``scripts/benchmark.py``).

Nothing here imports a peer tool (antspyx, itk-elastix): those live in ``scripts/bench_peers.py``,
so this module and its tests run in the project's main environment.

Convention (the project's, see README "Conventions"): a registration result is a resampling
displacement ``d`` of shape (Z, Y, X, 3) in RAS mm on the fixed grid; the moving point matching
fixed point ``x`` is ``x + d(x)``. ITK, SimpleITK, ANTs and elastix displacement fields use the
same resampling direction but LPS vector components: :func:`lps_field_to_ras` is the one
conversion.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "LearnedRegistration") not in sys.path:
    sys.path.insert(0, str(ROOT / "LearnedRegistration"))

from LearnedRegistrationLib.engine.grid import LPS_TO_RAS, ImageGrid  # noqa: E402


# --------------------------------------------------------------------------------- metrics
def dsc30(per_label: dict) -> float:
    """Mean of the lowest 30 % of per-label Dice values (at least one label); nan when empty.

    The Learn2Reg "DSC30" robustness score: ``ceil(0.3 * n)`` worst labels.
    """
    values = sorted(float(v) for v in per_label.values())
    if not values:
        return float("nan")
    k = max(1, int(math.ceil(0.3 * len(values))))
    return float(np.mean(values[:k]))


def lps_field_to_ras(field_lps: np.ndarray) -> np.ndarray:
    """(Z, Y, X, 3) LPS-component displacement (ITK/ANTs/elastix) -> RAS components, float32.

    The resampling direction is the same in both tools (fixed point -> moving point), only the
    vector components flip: (dL, dP, dS) -> (-dL, -dP, dS).
    """
    field_lps = np.asarray(field_lps, dtype=np.float64)
    if field_lps.shape[-1:] != (3,):
        raise ValueError(f"lps_field_to_ras() needs a (..., 3) field, got {field_lps.shape}")
    return (field_lps @ LPS_TO_RAS).astype(np.float32)  # LPS_TO_RAS is diagonal (symmetric)


def points_to_displacement(mapped_points_ras: np.ndarray, grid: ImageGrid) -> np.ndarray:
    """Displacement from the moving-space images of every fixed voxel centre: ``y(x) - x``, (Z, Y, X, 3)."""
    mapped = np.asarray(mapped_points_ras, dtype=np.float64).reshape(*grid.shape, 3)
    return (mapped - grid.world_points()).astype(np.float32)


def foreground_mask(image: np.ndarray, fraction: float = 0.1) -> np.ndarray:
    """Foreground of a scan: above ``min + fraction * (p99 - min)``, closed, holes filled (bool, same shape).

    The closing runs on a copy padded by replicating the border: scipy's erosion treats the outside
    as background, which wiped every slice but the middle one of a 5-slice cardiac stack (the
    mask then scored one slice in five) and two slices at each end of the CT slab.
    """
    from scipy import ndimage

    image = np.asarray(image, dtype=np.float32)
    lo, hi = float(image.min()), float(np.percentile(image, 99))
    mask = image > lo + fraction * (hi - lo)
    pad = 2
    mask = ndimage.binary_closing(np.pad(mask, pad, mode="edge"), iterations=pad)[(slice(pad, -pad),) * mask.ndim]
    return ndimage.binary_fill_holes(mask)


def ratios(ours: dict, peer: dict) -> dict:
    """Ours-vs-peer comparison of two rows of one pair: time ratio and metric differences (ours - peer)."""
    out = {"peer": peer["method"]}
    if ours.get("runtime_s") and peer.get("runtime_s"):
        out["time_ratio"] = ours["runtime_s"] / peer["runtime_s"]
    for key in ("dice_mean", "dsc30", "hd95_mean_mm", "displacement_error_mean_mm", "displacement_error_p95_mm"):
        if key in ours and key in peer and ours[key] is not None and peer[key] is not None:
            out[f"delta_{key}"] = ours[key] - peer[key]
    return out


# --------------------------------------------------------------------------------- synthetic pairs
def synthetic_deformation(
    grid: ImageGrid,
    seed: int,
    max_displacement_mm: float = 8.0,
    control_spacing_mm: float = 40.0,
    in_plane: bool = False,
    max_gradient: float = 0.3,
):
    """Seeded smooth invertible deformation: ``(u, d_true)`` (Z, Y, X, 3) RAS mm on ``grid``.

    Same recipe as :func:`LearnedRegistrationLib.app.demo.smooth_displacement` (random vectors on a
    coarse lattice, cubic interpolation, scaled to ``max_displacement_mm``, then shrunk so no
    gradient entry exceeds ``max_gradient`` < 1/3, which keeps ``x -> x + u(x)`` invertible), but
    with about ``control_spacing_mm`` between control points along EACH axis: the demo's cubic
    lattice would put as many control points across a thin slab (a 30-slice CT, a 4-slice cardiac
    stack) as across its long axes and the gradient bound would then shrink the field to nothing.
    With ``in_plane`` the component along the grid's K axis is removed (thick-slice scans).

    The moving image is ``fixed(y + u(y))``; the resampling displacement that registers it back
    (``warped(x) = moving(x + d(x)) = fixed(x)``) is the inverse ``d_true`` of ``u``
    (:func:`LearnedRegistrationLib.app.demo.invert_displacement`).
    """
    from scipy import ndimage

    from LearnedRegistrationLib.app.demo import invert_displacement

    if not 0 < max_gradient < 1 / 3:
        raise ValueError(f"max_gradient must be in (0, 1/3), got {max_gradient}")
    rng = np.random.default_rng(seed)
    extent_kji = grid.extent_mm[::-1]
    counts = [max(3, int(round(float(e) / control_spacing_mm)) + 1) for e in extent_kji]
    coarse = rng.standard_normal((3, *counts))
    zoom = [n / c for n, c in zip(grid.shape, counts)]
    u = np.stack([ndimage.zoom(coarse[c], zoom, order=3, mode="nearest", grid_mode=True) for c in range(3)], -1)
    u = u[: grid.shape[0], : grid.shape[1], : grid.shape[2]]
    if in_plane:
        k_axis = grid.direction[:, 2]
        u = u - (u @ k_axis)[..., None] * k_axis
    u *= max_displacement_mm / max(np.abs(u).max(), 1e-12)
    spacing_kji = grid.spacing[::-1]
    gradient = max(np.abs(np.gradient(u[..., c], spacing_kji[a], axis=a)).max() for c in range(3) for a in range(3))
    if gradient > max_gradient:
        u *= max_gradient / gradient
    return u, invert_displacement(u, grid, iterations=15)


def deform(image: np.ndarray, grid: ImageGrid, u: np.ndarray, order: int = 1) -> np.ndarray:
    """``image(y + u(y))`` on ``grid`` (order 1 = linear for images, 0 = nearest for labels)."""
    from LearnedRegistrationLib.app.demo import _index_coordinates, _sample

    coordinates = _index_coordinates(grid, grid.world_points() + u)
    out = _sample(np.asarray(image, dtype=np.float64 if order else np.float64), coordinates, order, "nearest")
    return out.reshape(grid.shape).astype(np.float32)


# --------------------------------------------------------------------------------- demons (one home)
def demons_displacement(fixed: np.ndarray, fixed_grid: ImageGrid, moving: np.ndarray, moving_grid: ImageGrid) -> np.ndarray:
    """SimpleITK diffeomorphic demons after histogram matching; (Z, Y, X, 3) RAS mm resampling field.

    3-level pyramid (shrink 4, 2, 1 with 100, 60, 20 iterations; never shrinking an axis below 8
    voxels), Gaussian σ 1.5 voxels. For pre-aligned, same-modality pairs.
    """
    import SimpleITK as sitk

    from LearnedRegistrationLib.engine.imageio import sitk_image

    f = sitk_image(np.asarray(fixed, np.float32), fixed_grid)
    m = sitk.HistogramMatching(sitk_image(np.asarray(moving, np.float32), moving_grid), f, 256, 15, True)
    field = None
    for shrink, iterations in ((4, 100), (2, 60), (1, 20)):
        factors = [max(1, min(shrink, n // 8)) for n in f.GetSize()]
        fs = sitk.Shrink(f, factors) if max(factors) > 1 else f
        ms = sitk.Shrink(m, factors) if max(factors) > 1 else m
        demons = sitk.DiffeomorphicDemonsRegistrationFilter()
        demons.SetNumberOfIterations(iterations)
        demons.SetStandardDeviations(1.5)
        if field is None:
            field = demons.Execute(fs, ms)
        else:
            init = sitk.Resample(field, fs, sitk.Transform(), sitk.sitkLinear, 0.0, field.GetPixelID())
            field = demons.Execute(fs, ms, init)
    if field.GetSize() != f.GetSize():
        field = sitk.Resample(field, f, sitk.Transform(), sitk.sitkLinear, 0.0, field.GetPixelID())
    return lps_field_to_ras(sitk.GetArrayFromImage(field))
