"""Instance optimization: initialization, multi-resolution affine, multi-resolution SVF.

Pipeline (all in the fixed image's physical space, RAS mm):

1. **Initialization** (``"com"``: match intensity centres of mass; ``"moments"``: also align the
   principal axes of the intensity distributions; ``"none"``: identity), kept only when it lowers
   the similarity below the identity's on the first affine level (:func:`_keep_initialization`).
2. **Affine** (or rigid) optimization on a coarse-to-fine pyramid (``affine_spacings_mm``); its
   update ``R · diag(s) · (I + H)`` is bounded by its parametrization (:func:`affine_update`:
   rotation ≤ 30°, scaling within ×/÷ 1.5, shear ≤ 0.25), and kept only when the coarsest
   deformable level ends clearly better from it than from its start (:func:`_check_affine`).
3. **Deformable**: a stationary velocity field ``v`` on the fixed grid, resampled to each level of
   ``deformable_spacings_mm``, integrated by scaling and squaring, optimized with Adam on

   ``loss = (1 - λ) · sim(fixed, moving ∘ A ∘ exp(v)) + λ · κ · mean_x λ(x) |∇v|² + γ · relu(-J)²``

   where ``λ ∈ [0, 1]`` is the user's regularization weight (the HyperMorph convention, Hoopes et
   al., IPMI 2021: 0 = similarity only, 1 = no deformation), ``λ(x)`` an optional per-voxel map in
   [0, 1] (Chen et al., spatially varying regularization), ``κ`` a fixed per-similarity calibration
   that puts the default λ in the useful range, and ``γ`` a small penalty on folding. With MSE
   the finest level measures the similarity on a lattice of the fixed image's own voxels
   (:func:`native_stride`, :func:`sampled_similarity`).

**Never worse than the stage before** (:class:`_StageKeeper`): each stage (the affine stage at
each level, the SVF stage at each level) evaluates its similarity at its start and once after its
last step, and is rolled back to its start when the similarity did not improve; ``history``
records ``rolled_back_<stage>`` (and :mod:`bridge.compute` lists them in the metrics). This also
keeps a pair that starts at an optimum there (an image registered to itself, a translated copy
after the initialization): Adam is scale-free, its first steps move every parameter by about the
full step size whatever the gradient, and on rounding noise it walked away (an image registered
to itself moved by 1.2 mm on average, 11 mm at most). For the same reason the matrices that
sample the moving image are composed in float64 (:func:`_theta`): identical grids and an identity
affine then sample exactly the same values.

**Anisotropic images**: every level keeps each axis at its own spacing when that is coarser than
the level's (:meth:`grid.ImageGrid.with_spacing`), the box filter before down-sampling is per axis
(:func:`_antialias`), the velocity's control grid is ``control_spacing_factor`` times the level's
finest spacing (:func:`control_grid`: a thick-slice axis keeps its slices), its parameters step the
same distance in mm along every axis, and the regularizer takes derivatives per mm.

**Quality signal** (``history``): ``similarity_before``, the similarity of the pair as given (the
identity, before initialization), and ``similarity_after``, that of the result, both measured on
the finest deformable level (on the fixed mask when given), and ``improved`` (1.0 when after <
before). :mod:`bridge.compute` puts them in the metrics with ``rolled_back_stages``.

The device is chosen automatically (CUDA when available, else CPU) unless the caller names one.
A ``cancel`` callable is polled every iteration; ``progress`` gets (fraction, message).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .common import (
    NATIVE_LEVEL_SIMILARITIES,
    POINTWISE_SIMILARITIES,
    SLAB_VOXELS,
    CancelCallback,
    ProgressCallback,
    RegistrationCancelled,
    RegistrationOptions,
    RegistrationResult,
    available_memory_bytes,
    choose_device,
    match_histogram,
    normalize_intensity,
    release_freed_memory,
    validate_volume,
    volume_tensor,
    z_slabs,
)
from .fields import FixedGridOutputs, FixedGridSampler
from .filters import box_mean, gaussian_blur
from .grid import ALIGN_CORNERS, ImageGrid, mm_per_normalized_unit
from .regularization import diffusion, negative_jacobian_penalty, weighted_diffusion
from .similarity import REGULARIZATION_SCALE, mi_sample_stride, similarity_loss
from .transforms import (
    affine_matrix,
    field_on_lattice,
    grid_sample,
    integrate_svf,
    lattice_points,
    normalized_to_mm,
    per_channel,
    resize_field,
    rotation_matrix,
    warp,
)
from .weightmap import WeightMap


def _level_grids(grid: ImageGrid, spacings_mm: Sequence[float]) -> list[ImageGrid]:
    """One grid per pyramid level (coarse to fine), dropping repeats when the image is coarser."""
    levels: list[ImageGrid] = []
    for s in spacings_mm:
        g = grid.with_spacing(s)
        if not levels or levels[-1].shape != g.shape:
            levels.append(g)
    return levels


#: The largest fixed image (voxels) whose finest deformable level is measured at its own
#: resolution (``RegistrationOptions.native_final_level``): that level holds the fixed, moving and
#: mask images at full size (16.8 M voxels = 256 x 256 x 256; larger images keep the level's
#: down-sampled images and the memory bound of :func:`estimate_memory`).
NATIVE_LEVEL_MAX_VOXELS = 256**3


def native_stride(fixed_grid: ImageGrid, level: ImageGrid, options: RegistrationOptions) -> tuple[int, int, int]:
    """The (Z, Y, X) voxel strides of the lattice at which the finest deformable ``level`` is
    measured on the fixed image's own grid (``options.native_final_level``): on each axis the level's
    spacing over the fixed image's, rounded, so that the lattice has about the level's voxel count;
    (1, 1, 1) (the level's own down-sampled images) when the option is off, the similarity is not
    one of :data:`common.NATIVE_LEVEL_SIMILARITIES`, no axis of the fixed grid is finer than the
    level's, or it has more than :data:`NATIVE_LEVEL_MAX_VOXELS` voxels.

    Why: the similarity of a 2 mm level cannot see sub-voxel misalignment of 1 mm images. Measured
    in the full benchmark (``scripts/benchmark.py``, against the run before): synthetic brain 0.34 ->
    0.19 mm mean error, thick-slice cardiac 0.33 -> 0.21 mm, OASIS Dice +0.009 both ways.
    """
    ones = (1, 1, 1)
    if (not options.native_final_level or options.similarity not in NATIVE_LEVEL_SIMILARITIES
            or int(np.prod(fixed_grid.shape)) > NATIVE_LEVEL_MAX_VOXELS):
        return ones
    # spacing along (I, J, K) = (X, Y, Z); strides in array order (Z, Y, X)
    ratio = np.asarray(level.spacing, dtype=np.float64) / np.asarray(fixed_grid.spacing, dtype=np.float64)
    return tuple(int(max(1, round(r))) for r in ratio[::-1])


def control_grid(level: ImageGrid, factor: float) -> ImageGrid:
    """The velocity's control grid of a pyramid level: ``factor`` times the level's *finest* spacing
    on every axis, each axis clipped to the level's own voxel count (:meth:`ImageGrid.with_spacing`).

    A thick-slice axis therefore keeps its slices while the in-plane axes coarsen: on a 0.73 x 0.73
    x 12 mm cardiac stack at the 2 mm level the control grid is 4 x 4 x 12 mm (it was 24 x 24 x 12 mm
    when the factor multiplied the *largest* spacing, too coarse for the in-plane motion).
    """
    return level.with_spacing(factor * min(level.spacing))


# --------------------------------------------------------------------------------- memory
#: Full-resolution float32 volumes on the fixed grid that a registration leaves: the engine's
#: warped image, displacement (3 channels), Jacobian and λ map, and what its callers derive from
#: them (the logic's checkerboard and difference, and the grid transform's own copy of the
#: displacement, 3 channels).
OUTPUT_VOLUMES = 11
#: float32 channels of one slab's temporaries while the outputs are computed (:func:`common.z_slabs`).
_SLAB_CHANNELS = 24
#: Volumes of the larger image in memory at once while the images are prepared at full resolution:
#: both normalized images, an anti-aliased copy and a slab's temporaries, or the copies of histogram
#: matching (peak RSS of :func:`prepare_pair` on a 256 x 256 x 200 CT, 2 CPU threads: 9.4 volumes,
#: of which about 3 are the level-size terms of :func:`estimate_memory`).
_PREPARATION_VOLUMES = 6
#: The optimizer's working set in bytes per voxel of the finest deformable level (one iteration's
#: autograd graph) and its fixed part, by similarity: peak-RSS increase of :func:`optimize_velocity`
#: at 0.9 M and 4.1 M level voxels on 2 CPU threads, rounded up.
_OPTIMIZER_BYTES_PER_VOXEL = {"mse": 140, "ncc": 170, "ngf": 210, "lncc": 250, "mi": 160, "mind": 600}
_OPTIMIZER_FIXED_BYTES = {"mse": 100e6, "ncc": 100e6, "ngf": 100e6, "lncc": 200e6, "mi": 500e6, "mind": 200e6}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a registration allocates beyond its input images, by phase (:func:`estimate_memory`).

    The phases follow each other, so the peak is the largest of them.

    Attributes:
        preparation: intensity preparation and the pyramid's anti-aliasing at full resolution.
        registration: the pyramid and the optimizer's working set at the finest level.
        outputs: the full-resolution outputs and the volumes derived from them
            (:data:`OUTPUT_VOLUMES`), plus a slab's temporaries.
        volume: one float32 volume on the fixed grid.
    """

    preparation: int
    registration: int
    outputs: int
    volume: int

    @property
    def peak(self) -> int:
        """The largest phase, in bytes."""
        return max(self.preparation, self.registration, self.outputs)


def estimate_memory(
    fixed_grid: ImageGrid, moving_grid: ImageGrid, options: Optional[RegistrationOptions] = None, *,
    fixed_mask: bool = False, lambda_map: bool = False,
) -> MemoryEstimate:
    """The memory a registration of images on these grids will need beyond the images themselves.

    A model of where the memory goes, calibrated on CPU with peak RSS (constants above): the
    outputs are :data:`OUTPUT_VOLUMES` float32 volumes on the fixed grid; preparing the images
    holds :data:`_PREPARATION_VOLUMES` volumes of the larger image; the optimizer needs a working
    set proportional to its finest level (``options.deformable_spacings_mm[-1]``, the working
    spacing). The λ path and the optimizer need the same (the path's knots reuse the finest level).

    Args:
        fixed_grid, moving_grid: the images' grids.
        options: the registration's options (defaults when None).
        fixed_mask, lambda_map: whether a fixed mask / a λ(x) map is given (one more volume each).

    Returns:
        :class:`MemoryEstimate`.
    """
    opts = options or RegistrationOptions()
    volume = 4 * int(np.prod(fixed_grid.shape))
    larger = max(volume, 4 * int(np.prod(moving_grid.shape)))
    extra = volume * (int(fixed_mask) + int(lambda_map))
    levels = _level_grids(fixed_grid, opts.deformable_spacings_mm)
    pyramid = sum(4 * (3 if fixed_mask else 2) * int(np.prod(g.shape)) for g in levels)
    if levels and native_stride(fixed_grid, levels[-1], opts) != (1, 1, 1):  # the finest level's images at full size
        pyramid += 4 * (3 if fixed_mask else 2) * int(np.prod(fixed_grid.shape))
    per_voxel = _OPTIMIZER_BYTES_PER_VOXEL[opts.similarity]
    working = int(per_voxel * np.prod(levels[-1].shape) + _OPTIMIZER_FIXED_BYTES[opts.similarity]) if levels else 0
    affine_levels = _level_grids(fixed_grid, opts.affine_spacings_mm) if opts.affine_model != "none" else []
    affine = int(per_voxel * np.prod(affine_levels[-1].shape)) if affine_levels else 0
    slab = 4 * _SLAB_CHANNELS * max(SLAB_VOXELS, int(np.prod(fixed_grid.shape[1:])))
    return MemoryEstimate(
        # the pyramid twice: its images and the sampling positions that make them
        preparation=_PREPARATION_VOLUMES * larger + extra + 2 * pyramid + affine,
        registration=pyramid + working,
        outputs=OUTPUT_VOLUMES * volume + pyramid + slab,
        volume=volume,
    )


def check_memory(
    fixed_grid: ImageGrid, moving_grid: ImageGrid, options: RegistrationOptions, device: torch.device, *,
    fixed_mask: bool = False, lambda_map: bool = False,
) -> MemoryEstimate:
    """Refuse, before any heavy work, a registration that will not fit in the available memory.

    The need is :func:`estimate_memory`; what is available is :func:`common.available_memory_bytes`
    (``$LEARNEDREG_MEMORY_LIMIT_GB`` overrides it). On a CUDA device the preparation and the
    optimizer also have to fit in the GPU's free memory. Nothing is refused where the system does
    not report its memory.

    Returns:
        The estimate (when it fits).

    Raises:
        ValueError: one line: what the registration needs, what is available, and what to change
            (a coarser working spacing when that is enough, else a smaller fixed image).
    """
    estimate = estimate_memory(fixed_grid, moving_grid, options, fixed_mask=fixed_mask, lambda_map=lambda_map)
    host = estimate.peak if device.type != "cuda" else max(estimate.preparation, estimate.outputs)
    available = available_memory_bytes()
    if available is not None and host > available:
        raise ValueError(_memory_advice(estimate, host, available, "", fixed_grid, moving_grid, options, fixed_mask, lambda_map))
    if device.type == "cuda":
        free = int(torch.cuda.mem_get_info(device)[0])
        gpu = max(estimate.preparation, estimate.registration)
        if gpu > free:
            raise ValueError(_memory_advice(estimate, gpu, free, " on the GPU", fixed_grid, moving_grid, options, fixed_mask,
                                            lambda_map, gpu=True))
    return estimate


def _memory_advice(estimate: MemoryEstimate, needed: int, available: int, where: str, fixed_grid: ImageGrid,
                   moving_grid: ImageGrid, options: RegistrationOptions, fixed_mask: bool, lambda_map: bool,
                   gpu: bool = False) -> str:
    """The one-line message of :func:`check_memory`."""

    def gb(n: float) -> str:
        return f"{n / 1e9:.{1 if n >= 1e9 else 2}f} GB"

    size = "x".join(str(n) for n in fixed_grid.size_ijk)
    spacings = tuple(options.deformable_spacings_mm)
    working = f", {gb(estimate.registration)} to register at {spacings[-1]:g} mm" if spacings else ""
    head = (f"not enough memory{where}: this registration needs about {gb(needed)} ({gb(estimate.outputs)} for the outputs "
            f"on the {size} fixed grid{working}) but {gb(available)} is available")
    full_resolution = estimate.preparation if gpu else max(estimate.preparation, estimate.outputs)
    if spacings and full_resolution <= available:
        for factor in (1.5, 2.0, 3.0, 4.0, 6.0, 8.0):
            coarser = replace(options, deformable_spacings_mm=tuple(s * factor for s in spacings))
            again = estimate_memory(fixed_grid, moving_grid, coarser, fixed_mask=fixed_mask, lambda_map=lambda_map)
            if (max(again.preparation, again.registration) if gpu else again.peak) <= available:
                spacing = f"{spacings[-1] * factor:g}"
                return (f"{head}; register at a coarser working spacing: --working-spacing {spacing} on the command line "
                        f"(workingSpacingMm={spacing} in Slicer's logic)")
    if gpu:
        return f"{head}; register on the CPU (--device cpu) or at a coarser working spacing (--working-spacing)"
    return (f"{head}; crop or resample the fixed image to fewer voxels (each output is a volume on its grid, "
            f"{gb(estimate.volume)} per float32 volume), or close other programs")


def _antialias(image: torch.Tensor, source: ImageGrid, target_spacing: Sequence[float]) -> torch.Tensor:
    """Box-filter ``image`` (on ``source``) to about the voxel size of ``target_spacing`` before sampling.

    A box of the target voxel's width is what averaging down-sampling does; its running-sum
    implementation costs the same for any width, unlike a Gaussian convolution (5-10x slower on CPU).

    ``image`` is (1, C, Z, Y, X). The passes run in slabs, so that beyond the result only a slab's
    temporaries exist (the whole-volume filter holds about four more volumes): the pass along Z in
    slabs along Y, the passes along Y and X in slabs along Z. Each running sum still spans a whole
    row, so the values are exactly those of :func:`filters.box_mean` on the whole volume.
    """
    width = [int(round(t / s)) // 2 * 2 + 1 for t, s in zip(target_spacing, source.spacing)]
    if max(width) <= 1:
        return image
    out = torch.empty_like(image)
    if width[2] > 1:  # along Z, slabs of rows along Y
        rows = max(1, SLAB_VOXELS // max(1, image.shape[2] * image.shape[4]))
        for y0 in range(0, image.shape[3], rows):
            out[:, :, :, y0 : y0 + rows] = box_mean(image[:, :, :, y0 : y0 + rows], (1, 1, width[2]))
        image = out
    if width[0] > 1 or width[1] > 1:  # along Y then X, slabs along Z
        for z0, z1 in z_slabs(image.shape[2:]):
            out[:, :, z0:z1] = box_mean(image[:, :, z0:z1], (width[0], width[1], 1))
    return out


def _ones_like_grid(grid: ImageGrid, device) -> torch.Tensor:
    """(1, 1, Z, Y, X) ones on ``grid`` without the memory of a volume (one element, expanded):
    the user's λ(x) map when there is none. :func:`_to_level` samples it as it would a real volume
    (so the pyramid's weights are the same to the last bit) and skips its box filter (of ones: ones)."""
    return torch.ones((1, 1, 1, 1, 1), device=device).expand(1, 1, *grid.shape)


def _to_level(
    image: torch.Tensor, source: ImageGrid, level: ImageGrid, theta: torch.Tensor, mode: str = "linear"
) -> torch.Tensor:
    """Resample a (1, 1, ...) tensor on ``source`` onto ``level`` through ``theta`` (level -> source
    normalized), in Z slabs (:func:`common.z_slabs`): the sampling positions of a full-size level
    would be three volumes more."""
    if mode == "linear" and image.stride()[2:] != (0, 0, 0):  # an expanded constant needs no anti-aliasing
        image = _antialias(image, source, level.spacing)
    slabs = z_slabs(level.shape)
    if len(slabs) == 1:
        grid = F.affine_grid(theta.unsqueeze(0), (1, 1, *level.shape), align_corners=ALIGN_CORNERS)
        return grid_sample(image, grid, mode)
    out = image.new_empty((1, image.shape[1], *level.shape))

    def axis(n: int) -> torch.Tensor:
        # the voxel centres bit for bit as affine_grid puts them (linspace), so that identical grids
        # still sample exactly; slab_theta's rescaled z, or arange arithmetic, would round off them
        return torch.linspace(-1.0, 1.0, n, dtype=theta.dtype, device=theta.device) if n > 1 else theta.new_zeros(1)

    z_all, y, x = (axis(n) for n in level.shape)
    for z0, z1 in slabs:
        zz, yy, xx = torch.meshgrid(z_all[z0:z1], y, x, indexing="ij")
        points = torch.stack([xx, yy, zz], dim=-1)
        out[:, :, z0:z1] = grid_sample(image, (points @ theta[:, :3].T + theta[:, 3]).unsqueeze(0), mode)
    return out


def _theta(moving_grid: ImageGrid, affine: torch.Tensor, level: ImageGrid) -> torch.Tensor:
    """(3, 4) level-normalized -> moving-normalized matrix for a torch (4, 4) RAS affine (differentiable).

    Composed in float64 and returned in ``affine``'s dtype: for one grid and the identity (an image
    registered to itself) it is exactly the identity, so the moving image is sampled exactly as the
    fixed one (in float32 the product is off by a few 1e-7, enough for the optimizer to act on)."""
    left = torch.as_tensor(moving_grid.ras_to_normalized, dtype=torch.float64, device=affine.device)
    right = torch.as_tensor(level.normalized_to_ras, dtype=torch.float64, device=affine.device)
    return (left @ affine.to(torch.float64) @ right)[:3].to(affine.dtype)


#: Adam steps over which each stage's step size rises linearly to its full value (:func:`_warm_up`).
WARM_UP_STEPS = 5


def _warm_up(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """A linear warm-up of ``optimizer``'s step sizes over :data:`WARM_UP_STEPS` steps (call
    ``.step()`` after each of its steps).

    Adam's first step moves every parameter by its full step size whatever the gradient: at the
    start of an SVF level that is a ±0.5-voxel noise field, whose regularization took the first
    20 steps of the demo's fine level to undo (the level ended worse than it started, 0.00035 ->
    0.023 -> 0.00125). Warmed up, the quick demo registration's mean error dropped from 1.87 to
    1.52 mm, the default one's stayed (1.448 -> 1.455 mm).
    """
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / WARM_UP_STEPS))


class _StageKeeper:
    """What a stage keeps at its end (module docstring): the parameters at the start, at the lowest
    objective seen, and the similarity at the start and at the last point.

    :meth:`record` each evaluated point (the objective and the similarity, before the step, and
    once after the last step); :meth:`finish` puts back what the stage keeps:

    - ``"similarity"``: the stage is rolled back to its start when its last similarity is not
      lower than its first (the optimizer's stages and the λ path's reference knot);
    - ``"objective"``: the stage ends at its lowest objective (the λ path's other knots, whose start
      is a neighbour's solution: the λ they are optimized at is in the objective alone).
    """

    def __init__(self, params: Sequence[torch.Tensor]) -> None:
        self.params = list(params)
        self.start: Optional[list[torch.Tensor]] = None
        self.best: Optional[list[torch.Tensor]] = None
        self.best_loss = math.inf
        self.best_similarity = self.first_similarity = self.last_similarity = math.nan
        self.first_loss = self.last_loss = self.kept_loss = math.nan

    def record(self, loss: float, similarity: float) -> None:
        if self.start is None:
            self.start = [p.detach().clone() for p in self.params]
            self.first_similarity, self.first_loss = similarity, loss
        if loss < self.best_loss:
            self.best = [p.detach().clone() for p in self.params]
            self.best_loss, self.best_similarity = loss, similarity
        self.last_similarity, self.last_loss = similarity, loss

    def _put(self, values: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, value in zip(self.params, values):
                p.copy_(value)

    def finish(self, keep: str) -> tuple[float, bool]:
        """Put back what the stage keeps; ``(its similarity, whether the stage was rolled back)``;
        ``kept_loss`` is then the objective there."""
        if keep == "objective":
            self._put(self.best)
            self.kept_loss = self.best_loss
            return self.best_similarity, False
        if not self.last_similarity < self.first_similarity:
            self._put(self.start)
            self.kept_loss = self.first_loss
            return self.first_similarity, True
        self.kept_loss = self.last_loss
        return self.last_similarity, False


def _intensity_moments(image: torch.Tensor, grid: ImageGrid) -> tuple[np.ndarray, np.ndarray]:
    """Centre of mass (RAS mm) and (3, 3) second central moment of the intensity above the minimum."""
    w = (image - image.min()).reshape(-1).double().cpu().numpy()
    pts = grid.world_points().reshape(-1, 3)
    total = max(w.sum(), 1e-12)
    com = (w[:, None] * pts).sum(0) / total
    d = pts - com
    cov = (w[:, None] * d).T @ d / total
    return com, cov


def initial_affine(
    fixed: torch.Tensor, fixed_grid: ImageGrid, moving: torch.Tensor, moving_grid: ImageGrid, method: str
) -> np.ndarray:
    """(4, 4) resampling affine (fixed RAS -> moving RAS) from image moments.

    ``"com"`` translates the fixed intensity centre of mass onto the moving one; ``"moments"``
    also rotates the principal axes onto each other (axis signs chosen nearest to the identity,
    a proper rotation); ``"none"`` is the identity. Inputs are coarse (1, 1, Z, Y, X) tensors.
    """
    if method == "none":
        return np.eye(4)
    com_f, cov_f = _intensity_moments(fixed, fixed_grid)
    com_m, cov_m = _intensity_moments(moving, moving_grid)
    rotation = np.eye(3)
    if method == "moments":
        _, axes_f = np.linalg.eigh(cov_f)
        _, axes_m = np.linalg.eigh(cov_m)
        for i in range(3):  # eigenvector signs are arbitrary: pick the ones closest to identity
            if axes_f[:, i] @ axes_m[:, i] < 0:
                axes_m[:, i] *= -1
        rotation = axes_m @ axes_f.T
        if np.linalg.det(rotation) < 0:
            axes_m[:, 0] *= -1
            rotation = axes_m @ axes_f.T
    a = np.eye(4)
    a[:3, :3] = rotation
    a[:3, 3] = com_m - rotation @ com_f
    return a


class _Progress:
    """Turns per-iteration ticks into (fraction, message) calls and polls cancel."""

    def __init__(self, total: int, progress: Optional[ProgressCallback], cancel: Optional[CancelCallback]):
        self.total, self.done = max(total, 1), 0
        self.progress, self.cancel = progress, cancel
        self.started = time.perf_counter()

    def tick(self, message: str) -> None:
        if self.cancel is not None and self.cancel():
            raise RegistrationCancelled("registration cancelled by the user")
        self.done += 1
        if self.progress is not None:
            self.progress(min(self.done / self.total, 1.0), message)


# --------------------------------------------------------------------------------- stages
#: Bounds of the affine stage's update (on top of the initialization), enforced by its
#: parametrization (:func:`affine_update`). Between subjects the head, heart or abdomen differ in
#: size by up to about 20 % per axis (intracranial volume 1100-1700 cm³: ±15 % in length) and in pose
#: by a tilt the initialization leaves of at most 10-20°; within a subject the linear part is nearly
#: a rotation. Rotation ≤ 30°, scaling in [1/1.5, 1.5] per axis and shear ≤ 0.25 cover both with a
#: margin, and keep out what no anatomy needs: a moving image shrunk onto a part of the fixed one
#: (scaling ≤ 0.5), flattened, or turned upside down, which an intensity similarity can prefer on a
#: small or thick-slice field of view.
MAX_ROTATION_RAD = math.radians(30.0)
MAX_SCALE = 1.5
MAX_SHEAR = 0.25
#: Adam step of the affine stage's rotation, log-scale and shear parameters (about 0.3 %).
AFFINE_STEP = 3e-3


def _bounded(raw: torch.Tensor, bound: float) -> torch.Tensor:
    """``bound · tanh(raw / bound)``: the identity near 0 (same gradient), never beyond ±bound."""
    return bound * torch.tanh(raw / bound)


def affine_update(rotation: torch.Tensor, log_scale: Optional[torch.Tensor] = None,
                  shear: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(3, 3) linear part ``R(ω) · diag(s) · (I + H)`` of the affine stage's update, from unbounded parameters.

    ``ω`` (rotation vector, rad) is ``rotation`` with its norm mapped through :func:`_bounded` to at
    most :data:`MAX_ROTATION_RAD`; ``s = exp(tanh-bounded log_scale)`` lies in [1/:data:`MAX_SCALE`,
    :data:`MAX_SCALE`]; ``H`` is strictly upper triangular with the 3 ``shear`` values bounded to
    ±:data:`MAX_SHEAR`. Without ``log_scale`` and ``shear`` (the rigid model) it is ``R(ω)``. All
    parameters zero give the identity, and near zero each acts as itself (unit gradient).

    Args:
        rotation, log_scale, shear: (3,) tensors (any dtype and device, differentiable).

    Returns:
        (3, 3) tensor; its QR decomposition gives back ``R`` and ``diag(s)(I + H)``.
    """
    norm = torch.sqrt((rotation * rotation).sum() + 1e-12)
    linear = rotation_matrix(rotation * (_bounded(norm, MAX_ROTATION_RAD) / norm))
    if log_scale is not None:
        scale = torch.exp(_bounded(log_scale, math.log(MAX_SCALE)))
        upper = torch.triu(torch.ones(3, 3, dtype=torch.bool, device=rotation.device), diagonal=1)
        h = torch.zeros(3, 3, dtype=rotation.dtype, device=rotation.device).masked_scatter(upper, _bounded(shear, MAX_SHEAR))
        linear = linear @ (torch.diag(scale) @ (torch.eye(3, dtype=rotation.dtype, device=rotation.device) + h))
    return linear


class _AffineLevel(NamedTuple):
    """One level of the affine stage: its grid, the fixed image and mask on it, the moving image
    anti-aliased to its spacing (on the moving grid)."""

    grid: ImageGrid
    fixed: torch.Tensor
    mask: Optional[torch.Tensor]
    moving: torch.Tensor


def _affine_level(fixed_t, mask_t, fixed_grid: ImageGrid, moving_t, moving_grid: ImageGrid, level: ImageGrid) -> _AffineLevel:
    """The tensors of :class:`_AffineLevel` (the fixed grid and a level grid share the normalized frame)."""
    identity = torch.eye(3, 4, device=fixed_t.device)
    return _AffineLevel(
        level, _to_level(fixed_t, fixed_grid, level, identity),
        None if mask_t is None else _to_level(mask_t, fixed_grid, level, identity, "nearest"),
        _antialias(moving_t, moving_grid, level.spacing),
    )


def _affine_similarity(level: _AffineLevel, moving_grid: ImageGrid, affine: torch.Tensor, opts: RegistrationOptions) -> torch.Tensor:
    """Similarity (loss, lower is better) of the fixed level image and the moving image resampled
    through the (4, 4) RAS ``affine`` onto the level, on the fixed mask when given."""
    theta = _theta(moving_grid, affine, level.grid)
    grid = F.affine_grid(theta.unsqueeze(0), (1, 1, *level.grid.shape), align_corners=ALIGN_CORNERS)
    warped = grid_sample(level.moving, grid)
    return similarity_loss(opts.similarity, level.fixed, warped, level.mask, level.grid.spacing, opts.lncc_window_mm)


def _optimize_affine(grids: Sequence[ImageGrid], make_level, moving_grid, init, opts, device, ticker, history) -> np.ndarray:
    """The affine stage on the level ``grids`` (coarse to fine; ``make_level(grid)`` gives each one's
    :class:`_AffineLevel`, made when it is reached so that one anti-aliased moving image exists at a
    time), from the (4, 4) RAS affine ``init``; its update is bounded (:func:`affine_update`).
    Returns the (4, 4) float64 resampling affine, RAS mm."""
    dtype = torch.float32
    centre = torch.as_tensor(grids[-1].center_ras, dtype=dtype, device=device)
    init_t = torch.as_tensor(init, dtype=dtype, device=device)
    translation, rotation, log_scale, shear = (torch.zeros(3, dtype=dtype, device=device, requires_grad=True) for _ in range(4))
    linear_params = [rotation] + ([log_scale, shear] if opts.affine_model == "affine" else [])

    def current() -> torch.Tensor:
        # the optimized update acts on the fixed side: A = init @ update
        return init_t @ affine_matrix(affine_update(*linear_params), translation, centre)

    for grid, iters in zip(grids, opts.affine_iterations):
        level = make_level(grid)
        n_iter = max(1, int(round(iters * opts.iteration_scale)))
        # translation steps of about a quarter voxel, rotations/scalings/shears of about 0.3 %
        optimizer = torch.optim.Adam(
            [
                {"params": [translation], "lr": 0.25 * min(level.grid.spacing)},
                {"params": linear_params, "lr": AFFINE_STEP},
            ]
        )
        keeper = _StageKeeper([translation, *linear_params])
        warm_up = _warm_up(optimizer)
        for _ in range(n_iter):
            optimizer.zero_grad(set_to_none=True)
            loss = _affine_similarity(level, moving_grid, current(), opts)
            keeper.record(loss.item(), loss.item())
            loss.backward()
            optimizer.step()
            warm_up.step()
            ticker.tick(f"affine {level.grid.shape[::-1]}: loss {loss.item():.4f}")
        with torch.no_grad():
            loss = _affine_similarity(level, moving_grid, current(), opts).item()
            keeper.record(loss, loss)
        similarity, rolled_back = keeper.finish("similarity")
        name = "x".join(map(str, level.grid.shape[::-1]))
        history[f"affine_{name}"] = float(similarity)
        if rolled_back:
            history[f"rolled_back_affine_{name}"] = 1.0
        history[f"time_affine_{name}_s"] = time.perf_counter() - ticker.started
    return current().detach().double().cpu().numpy()


def optimize_velocity(
    pair: PreparedPair,
    lam: float,
    levels: Sequence[int],
    iterations: Sequence[int],
    initial: Optional[torch.Tensor] = None,
    label: str = "deformable",
    weight_map: Optional[WeightMap] = None,
    learn_weight_map: bool = False,
    learning_rate_vox: Optional[float] = None,
    keep: str = "similarity",
) -> torch.Tensor:
    """The SVF stage at regularization weight ``lam`` on the pyramid levels ``levels`` (indices into
    ``pair.levels``, coarse to fine), ``iterations[i]`` Adam steps on ``levels[i]`` (before
    ``iteration_scale``), starting from ``initial`` (a normalized velocity on any control grid of the
    same extent; zero when None). With ``weight_map`` the regularization is also weighted by its
    λ(x) (normalized to mean 1, :mod:`weightmap`), which is optimized along when ``learn_weight_map``.
    ``keep`` says what each level keeps at its end (:class:`_StageKeeper`): "similarity" rolls a
    level back when it did not lower the similarity, "objective" ends at the lowest objective.

    Per level the velocity lives on a control grid ``control_spacing_factor`` times coarser than
    the level, is integrated there and its displacement up-sampled to the level: the similarity
    sees every level voxel while the costly scaling and squaring runs on 8x fewer.

    Returns:
        (1, 3, z, y, x) velocity on the last level's control grid, normalized units, (x, y, z).
    """
    opts, history, ticker = pair.options, pair.history, pair.ticker
    velocity_norm = initial
    for index, iters in zip(levels, iterations):
        level = pair.levels[index]
        n_iter = max(1, int(round(iters * opts.iteration_scale)))
        control = level.control
        # parameters in units of the control grid's finest spacing on every axis (voxels of an isotropic
        # grid): Adam's steps are then the same length in mm along each axis, where per-axis voxels
        # made a thick-slice axis step 10x further (and move across the slices) than the in-plane ones
        to_norm = per_channel(min(control.spacing) / mm_per_normalized_unit(control.shape, control.spacing), pair.device)
        if velocity_norm is None:
            v_vox = torch.zeros((1, 3, *control.shape), dtype=torch.float32, device=pair.device)
        else:
            v_vox = resize_field(velocity_norm, control.shape) / to_norm
        v_vox.requires_grad_(True)
        groups = [{"params": [v_vox], "lr": opts.learning_rate_vox if learning_rate_vox is None else learning_rate_vox}]
        if weight_map is not None and learn_weight_map:
            groups.append({"params": [weight_map.logit], "lr": weight_map.options.learning_rate})
        optimizer = torch.optim.Adam(groups)

        def evaluate(level=level, control=control, v_vox=v_vox, to_norm=to_norm) -> tuple[torch.Tensor, torch.Tensor]:
            weight = level.weight
            if weight_map is not None:
                with torch.set_grad_enabled(learn_weight_map and torch.is_grad_enabled()):
                    weight = weight * weight_map.normalized(control.shape)
            loss, sim, _ = svf_objective(
                _velocity(v_vox, opts.smoothing_sigma_vox, to_norm), control, level.fixed, level.moving, level.grid.spacing,
                lam, weight, opts.similarity, mask=level.mask, integration_steps=opts.svf_steps,
                jacobian_penalty=opts.jacobian_penalty, lncc_window_mm=opts.lncc_window_mm, stride=level.stride,
            )
            if weight_map is not None and learn_weight_map:
                with torch.no_grad():
                    energy = diffusion(normalized_to_mm(_velocity(v_vox, opts.smoothing_sigma_vox, to_norm), control), control.spacing)
                loss = loss + weight_map.penalty(energy, lam, REGULARIZATION_SCALE[opts.similarity])
            return loss, sim

        keeper = _StageKeeper([p for group in groups for p in group["params"]])
        warm_up = _warm_up(optimizer)
        for _ in range(n_iter):
            optimizer.zero_grad(set_to_none=True)
            loss, sim = evaluate()
            keeper.record(loss.item(), sim.item())
            loss.backward()
            optimizer.step()
            warm_up.step()
            ticker.tick(f"{label} {level.grid.shape[::-1]}: similarity {sim.item():.4f}")
        with torch.no_grad():
            loss, sim = evaluate()
            keeper.record(loss.item(), sim.item())
        similarity, rolled_back = keeper.finish(keep)
        name = "x".join(map(str, level.grid.shape[::-1]))
        history[f"svf_{name}"] = float(similarity)
        history[f"objective_svf_{name}"] = float(keeper.kept_loss)
        if rolled_back:
            history[f"rolled_back_svf_{name}"] = 1.0
        history[f"time_svf_{name}_s"] = time.perf_counter() - ticker.started
        with torch.no_grad():
            velocity_norm = _velocity(v_vox, opts.smoothing_sigma_vox, to_norm)
    return velocity_norm


def _velocity(v_vox: torch.Tensor, smoothing_sigma_vox: float, to_norm: torch.Tensor) -> torch.Tensor:
    """The optimized parameters (voxel units, optionally Gaussian-smoothed) as a normalized velocity."""
    smooth = gaussian_blur(v_vox, [smoothing_sigma_vox] * 3) if smoothing_sigma_vox > 0 else v_vox
    return smooth * to_norm


class SvfObjective(NamedTuple):
    """Scalar tensors of :func:`svf_objective`."""

    loss: torch.Tensor
    similarity: torch.Tensor
    regularization: torch.Tensor


def svf_objective(
    velocity: torch.Tensor,
    velocity_grid: ImageGrid,
    fixed: torch.Tensor,
    moving: torch.Tensor,
    level_spacing: Sequence[float],
    lam: float,
    weight_map: Optional[torch.Tensor] = None,
    similarity: str = "mse",
    *,
    normalize_weight_map: bool = False,
    mask: Optional[torch.Tensor] = None,
    integration_steps: int = 5,
    jacobian_penalty: float = 1.0,
    lncc_window_mm: float = 9.0,
    stride: Sequence[int] = (1, 1, 1),
) -> SvfObjective:
    """Loss of one SVF iteration, shared by the optimizer and the network's test-time adaptation.

    ``(1 - λ)·sim(fixed, moving ∘ exp(v)) + λ·κ·mean_x λ(x)|∇v|² + γ·mean(relu(-det J)²)``, with κ
    :data:`REGULARIZATION_SCALE` of the similarity and the Jacobian of ``exp(v)`` on the velocity grid.

    Args:
        velocity: (1, 3, z, y, x) stationary velocity on ``velocity_grid``, normalized units, (x, y, z).
        velocity_grid: grid of ``velocity`` (same extent as the level images).
        fixed, moving: (1, 1, Z, Y, X) level images (moving already affinely resampled), same extent.
        level_spacing: level voxel size in mm along (I, J, K) (LNCC window, NGF gradients).
        lam: λ ∈ [0, 1], weighting the similarity by ``1 - λ`` and the regularization by ``λ``.
        weight_map: optional (1, 1, z, y, x) spatially varying weight λ(x) per velocity voxel
            (Chen et al.), not scaled by λ; None = 1 everywhere.
        similarity: a name of :data:`common.SIMILARITIES`.
        normalize_weight_map: use ``λ(x) / mean λ(x)`` instead of ``λ(x)``, so that the map only
            redistributes the regularization and λ keeps its meaning (a network's predicted map).
        mask: optional (1, 1, Z, Y, X) similarity mask.
        integration_steps: scaling-and-squaring steps.
        jacobian_penalty: γ (0 = off).
        lncc_window_mm: LNCC window edge in mm.
        stride: (Z, Y, X) voxel strides: measure a pointwise similarity on that lattice of the
            level only (:func:`sampled_similarity`; MI always samples, at least at its own stride).
    """
    displacement = integrate_svf(velocity, integration_steps)
    if similarity in POINTWISE_SIMILARITIES and fixed.shape[0] == 1 and (tuple(stride) != (1, 1, 1) or similarity == "mi"):
        sim = sampled_similarity(similarity, fixed, moving, displacement, mask, stride)
    else:
        warped = warp(moving, resize_field(displacement, fixed.shape[2:]))
        sim = similarity_loss(similarity, fixed, warped, mask, level_spacing, lncc_window_mm)
    velocity_mm = normalized_to_mm(velocity, velocity_grid)
    if weight_map is None:
        reg = lam * diffusion(velocity_mm, velocity_grid.spacing)
    else:
        weight = lam * weight_map
        if normalize_weight_map:
            weight = weight / weight_map.mean().clamp_min(1e-6)
        reg = weighted_diffusion(velocity_mm, velocity_grid.spacing, weight)
    loss = (1.0 - lam) * sim + REGULARIZATION_SCALE[similarity] * reg
    if jacobian_penalty > 0:
        loss = loss + jacobian_penalty * negative_jacobian_penalty(
            normalized_to_mm(displacement, velocity_grid), velocity_grid.spacing
        )
    return SvfObjective(loss, sim, reg)


def sampled_similarity(name: str, fixed: torch.Tensor, moving: torch.Tensor, displacement: torch.Tensor,
                       mask: Optional[torch.Tensor], stride: Sequence[int] = (1, 1, 1)) -> torch.Tensor:
    """A pointwise similarity (:data:`common.POINTWISE_SIMILARITIES`) of ``fixed`` and ``moving``
    warped by ``displacement``, measured on the lattice of every ``stride``-th voxel only.

    The displacement (normalized, on its own coarser grid of the same extent) is read at the
    lattice (:func:`transforms.field_on_lattice`) and the moving image sampled there, instead of up-sampling
    the displacement to the whole grid and warping every voxel; the values are the same
    (``align_corners`` trilinear), so with stride 1 the loss equals the full computation's. MI then
    keeps at most :data:`similarity.MI_MAX_SAMPLES` of the lattice's voxels, on its own flat stride
    (:func:`similarity.mi_sample_stride`), and samples the moving image there only: equal to MI of
    the fully warped level while its warp and backward cost a quarter of a 2 mm brain level.

    Args:
        name: "mse", "ncc" or "mi".
        fixed, moving: (1, 1, Z, Y, X) level images; mask: (1, 1, Z, Y, X) or None.
        displacement: (1, 3, z, y, x) normalized displacement, channels (x, y, z).
        stride: (Z, Y, X) voxel strides (each >= 1).

    Raises:
        ValueError: for a similarity that is not pointwise.
    """
    if name not in POINTWISE_SIMILARITIES:
        raise ValueError(f"{name!r} is not a pointwise similarity ({', '.join(POINTWISE_SIMILARITIES)})")
    stride = tuple(int(s) for s in stride)
    shape = tuple(fixed.shape[2:])
    z, y, x = (slice(None, None, s) for s in stride)
    u = field_on_lattice(displacement, shape, stride).permute(0, 2, 3, 4, 1)  # (1, n_z, n_y, n_x, 3)
    points = lattice_points(shape, stride, fixed.device, displacement.dtype) + u
    f = fixed[:, :, z, y, x]
    m = None if mask is None else mask[:, :, z, y, x]
    if name == "mi":  # MI's own flat stride through the lattice
        every = mi_sample_stride(f.numel())
        points = points.reshape(1, -1, 1, 1, 3)[:, ::every]
        f = f.reshape(1, 1, -1, 1, 1)[:, :, ::every]
        m = None if m is None else m.reshape(1, 1, -1, 1, 1)[:, :, ::every]
    return similarity_loss(name, f, grid_sample(moving, points), m)


def _check_overlap(fixed_t, fixed_grid, moving_grid, affine, device) -> None:
    """Fail early when, after initialization, the moving image's field of view misses the fixed foreground."""
    coarse = fixed_grid.with_spacing(max(8.0, *fixed_grid.spacing))
    theta = _theta(moving_grid, torch.as_tensor(affine, dtype=torch.float32, device=device), coarse)
    grid = F.affine_grid(theta.unsqueeze(0), (1, 1, *coarse.shape), align_corners=ALIGN_CORNERS)
    inside = (grid.abs() <= 1.0).all(dim=-1).float()
    fixed_c = F.interpolate(fixed_t, size=coarse.shape, mode="trilinear", align_corners=ALIGN_CORNERS)
    foreground = (fixed_c > fixed_c.min() + 0.05 * (fixed_c.max() - fixed_c.min())).float()[0, 0]
    covered = float((inside[0] * foreground).sum() / foreground.sum().clamp_min(1))
    if covered < 0.05:
        raise ValueError(
            f"the moving image does not overlap the fixed image after initialization ({100 * covered:.1f} % of the "
            "fixed foreground is inside the moving field of view); check the images' origins and orientations, "
            "or choose another initialization"
        )


# --------------------------------------------------------------------------------- public API
def register_images(
    fixed: np.ndarray,
    fixed_grid: ImageGrid,
    moving: np.ndarray,
    moving_grid: ImageGrid,
    options: Optional[RegistrationOptions] = None,
    *,
    fixed_mask: Optional[np.ndarray] = None,
    lambda_map: Optional[np.ndarray] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelCallback] = None,
) -> RegistrationResult:
    """Register ``moving`` to ``fixed`` (affine then diffeomorphic SVF), in physical space.

    Args:
        fixed: (Z, Y, X) fixed image on ``fixed_grid`` (any intensity unit).
        fixed_grid: fixed geometry; every output lies on it.
        moving: (Z, Y, X) moving image on ``moving_grid`` (any size, spacing, orientation).
        moving_grid: moving geometry.
        options: :class:`RegistrationOptions` (defaults when None).
        fixed_mask: optional (Z, Y, X) mask on the fixed grid; similarity counts only voxels > 0.
        lambda_map: optional (Z, Y, X) per-voxel regularization map in [0, 1] on the fixed grid;
            the effective weight is λ · λ(x).
        progress: optional callable(fraction in [0, 1], message).
        cancel: optional callable returning True to stop; polled every iteration.

    Returns:
        :class:`RegistrationResult`.

    Raises:
        ValueError: bad images (2D, NaN, empty, shape/geometry mismatch), a bad mask or λ map,
            bad options, CUDA requested but absent, or no overlap after initialization.
        RegistrationCancelled: when ``cancel()`` returned True.
    """
    with seeded(int((options or RegistrationOptions()).seed)):
        return _register_images(fixed, fixed_grid, moving, moving_grid, options, fixed_mask, lambda_map, progress, cancel)


@contextlib.contextmanager
def seeded(seed: int):
    """Seed torch inside a fork of its global RNG state, so that a registration is reproducible and
    does not reset the caller's random stream (Slicer's Python console, a training loop, tests)."""
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        for index in cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


def _register_images(fixed, fixed_grid, moving, moving_grid, options, fixed_mask, lambda_map, progress, cancel) -> RegistrationResult:
    """:func:`register_images` after seeding (same arguments and result)."""
    pair = prepare_pair(fixed, fixed_grid, moving, moving_grid, options, fixed_mask, lambda_map, progress, cancel)
    velocity = None
    if pair.levels:
        first = 0 if pair.coarse_velocity is None else 1  # the affine check ran the first level
        velocity = optimize_velocity(pair, float(pair.options.regularization_weight), range(first, len(pair.levels)),
                                     pair.options.deformable_iterations[first:], pair.coarse_velocity)
    pair.history["time_optimization_s"] = time.perf_counter() - pair.start
    return finish_registration(pair, velocity, float(pair.options.regularization_weight))


@dataclass
class PyramidLevel:
    """One deformable level of a :class:`PreparedPair`, every tensor (1, C, ...) on ``grid`` or ``control``.

    Attributes:
        grid: the level's grid (the fixed grid's extent at the level's spacing).
        control: the velocity's control grid (``control_spacing_factor`` times coarser, same extent).
        fixed: normalized fixed image; ``moving``: normalized moving image after the affine stage.
        mask: similarity mask or None.
        weight: the user's λ(x) map on ``control`` (ones without one), not scaled by λ.
        stride: (Z, Y, X) voxel strides of the lattice at which the similarity is measured:
            (1, 1, 1), or more when ``grid`` is the fixed image's own, finer than the level it
            stands for (:func:`native_stride`); ``control`` is then that level's.
    """

    grid: ImageGrid
    control: ImageGrid
    fixed: torch.Tensor
    moving: torch.Tensor
    mask: Optional[torch.Tensor]
    weight: torch.Tensor
    stride: tuple[int, int, int] = (1, 1, 1)


@dataclass
class PreparedPair:
    """A pair after checks, intensity preparation, initialization and the affine stage, with its
    deformable pyramid: what :func:`optimize_velocity` needs at any λ (and :mod:`path` at many).

    Attributes:
        options: validated options (iteration lists trimmed to the levels that exist).
        device: where the tensors are.
        fixed, moving: the validated (Z, Y, X) float32 images; ``fixed_grid``, ``moving_grid``.
        lambda_map: the user's λ(x) on the fixed grid, (Z, Y, X) float32, or None (1 everywhere).
        affine: (4, 4) resampling affine in RAS mm found by the affine stage.
        levels: the deformable pyramid, coarse to fine (a caller that is done with the coarser
            levels may replace them by None to free them, as the λ path does).
        ticker: progress and cancel of the whole run; ``history``: stage losses and times; ``start``:
            ``time.perf_counter()`` at the start.
        coarse_velocity: when the affine was checked (:func:`_check_affine`), the velocity of the
            first level at the reference λ (on its control grid), from which a caller at that λ
            continues with the next level; else None.
    """

    options: RegistrationOptions
    device: torch.device
    fixed: np.ndarray
    fixed_grid: ImageGrid
    moving: np.ndarray
    moving_grid: ImageGrid
    lambda_map: Optional[np.ndarray]
    affine: np.ndarray
    levels: list[Optional[PyramidLevel]]
    ticker: _Progress
    history: dict
    start: float
    coarse_velocity: Optional[torch.Tensor] = None


def prepare_pair(
    fixed, fixed_grid, moving, moving_grid, options, fixed_mask, lambda_map, progress, cancel, extra_iterations: int = 0,
    affine: Optional[np.ndarray] = None, reference_lambda: Optional[float] = None,
) -> PreparedPair:
    """Checks, intensity preparation, initialization, the affine stage and the deformable pyramid.

    Arguments as :func:`register_images`; ``extra_iterations`` are added to the progress total (the
    deformable iterations a caller runs beyond one pass over the pyramid, e.g. more λ knots). With
    ``affine`` (a (4, 4) resampling affine found before), initialization and the affine stage are
    skipped. After an affine stage that moved, the coarsest deformable level is run from both its
    start and its result at ``reference_lambda`` (default: the options' λ), and the affine is kept
    only when its run ends clearly better (:func:`_check_affine`); that level's velocity is then
    ``coarse_velocity``, for the caller to continue at that λ.

    Raises:
        as :func:`register_images`.
    """
    start = time.perf_counter()
    opts = replace(options or RegistrationOptions()).validated()
    device = choose_device(opts.device)
    check_memory(fixed_grid, moving_grid, opts, device, fixed_mask=fixed_mask is not None, lambda_map=lambda_map is not None)
    fixed = validate_volume("fixed", fixed, fixed_grid)
    moving = validate_volume("moving", moving, moving_grid)
    if fixed_mask is not None:
        fixed_mask = np.asarray(fixed_mask)
        if fixed_mask.shape != fixed_grid.shape:
            raise ValueError(f"the fixed mask has shape {fixed_mask.shape} but the fixed image has {fixed_grid.shape}")
        if not (fixed_mask > 0).any():
            raise ValueError("the fixed mask is empty; it must mark at least one voxel")
    lam_map = None  # 1 everywhere
    if lambda_map is not None:
        lam_map = np.asarray(lambda_map, dtype=np.float32)
        if lam_map.shape != fixed_grid.shape:
            raise ValueError(f"the λ map has shape {lam_map.shape} but the fixed image has {fixed_grid.shape}")
        if not np.isfinite(lam_map).all() or lam_map.min() < 0 or lam_map.max() > 1:
            raise ValueError("the λ map must hold finite values in [0, 1]")

    moving_for_similarity = moving
    if opts.similarity == "mse" and opts.histogram_matching:
        moving_for_similarity = match_histogram(moving, fixed)
    fixed_t = torch.as_tensor(normalize_intensity(fixed), device=device)[None, None]
    moving_t = torch.as_tensor(normalize_intensity(moving_for_similarity), device=device)[None, None]
    del moving_for_similarity
    mask_t = None if fixed_mask is None else torch.as_tensor((fixed_mask > 0).astype(np.float32), device=device)[None, None]
    lam_t = None if lam_map is None else torch.as_tensor(lam_map, device=device)[None, None]

    affine_levels = _level_grids(fixed_grid, opts.affine_spacings_mm) if opts.affine_model != "none" and affine is None else []
    deform_levels = _level_grids(fixed_grid, opts.deformable_spacings_mm)
    affine_iters = list(opts.affine_iterations)[-len(affine_levels):] if affine_levels else []
    deform_iters = list(opts.deformable_iterations)[-len(deform_levels):] if deform_levels else []
    opts = replace(opts, affine_iterations=affine_iters, deformable_iterations=deform_iters)
    check_affine = bool(affine_levels and deform_levels)
    total = sum(max(1, int(round(i * opts.iteration_scale))) for i in (*affine_iters, *deform_iters)) + int(extra_iterations)
    total += max(1, int(round(deform_iters[0] * opts.iteration_scale))) if check_affine else 0
    ticker = _Progress(total, progress, cancel)
    identity = torch.eye(3, 4, device=device)
    history: dict = {}
    with torch.no_grad():
        if affine is None:
            coarse = fixed_grid.with_spacing(max(4.0, *fixed_grid.spacing))
            moving_coarse_grid = moving_grid.with_spacing(max(4.0, *moving_grid.spacing))
            init = initial_affine(
                _to_level(fixed_t, fixed_grid, coarse, identity),
                coarse,
                _to_level(moving_t, moving_grid, moving_coarse_grid, identity),
                moving_coarse_grid,
                opts.initialization,
            )
            if opts.initialization != "none":
                first = _level_grids(fixed_grid, opts.affine_spacings_mm or opts.deformable_spacings_mm or (4.0,))[0]
                first_level = _affine_level(fixed_t, mask_t, fixed_grid, moving_t, moving_grid, first)
                init = _keep_initialization(first_level, moving_grid, init, opts, history)
                del first_level
        else:
            init = np.asarray(affine, dtype=np.float64)
        _check_overlap(fixed_t, fixed_grid, moving_grid, init, device)
    if progress is not None:
        progress(0.0, "initialized")

    affine = init
    if affine_levels:
        def make_level(grid: ImageGrid) -> _AffineLevel:
            with torch.no_grad():
                return _affine_level(fixed_t, mask_t, fixed_grid, moving_t, moving_grid, grid)

        affine = _optimize_affine(affine_levels, make_level, moving_grid, init, opts, device, ticker, history)

    def make_pyramid_level(grid: ImageGrid, affine: np.ndarray) -> PyramidLevel:
        with torch.no_grad():
            affine_t = torch.as_tensor(affine, dtype=torch.float32, device=device)
            control = control_grid(grid, opts.control_spacing_factor)
            stride = native_stride(fixed_grid, grid, opts) if grid is deform_levels[-1] else (1, 1, 1)
            native = stride != (1, 1, 1)
            if native:  # the finest level measured at the fixed image's own resolution (its control grid kept)
                grid = fixed_grid
            return PyramidLevel(
                grid=grid,
                control=control,
                fixed=fixed_t if native else _to_level(fixed_t, fixed_grid, grid, identity),
                moving=_to_level(moving_t, moving_grid, grid, _theta(moving_grid, affine_t, grid)),
                mask=mask_t if native or mask_t is None else _to_level(mask_t, fixed_grid, grid, identity, "nearest"),
                weight=resize_field(_to_level(_ones_like_grid(fixed_grid, device) if lam_t is None else lam_t,
                                              fixed_grid, grid, identity), control.shape),
                stride=stride,
            )

    pair = PreparedPair(opts, device, fixed, fixed_grid, moving, moving_grid, lam_map, affine, [], ticker, history, start)
    if check_affine and not np.array_equal(affine, init):
        lam = float(opts.regularization_weight if reference_lambda is None else reference_lambda)
        _check_affine(pair, init, lambda a: make_pyramid_level(deform_levels[0], a), lam)
    pair.levels += [make_pyramid_level(grid, pair.affine) for grid in deform_levels[len(pair.levels):]]
    levels = pair.levels
    with torch.no_grad():
        quality = levels[-1] if levels else _affine_level(fixed_t, mask_t, fixed_grid, moving_t, moving_grid, _level_grids(
            fixed_grid, opts.affine_spacings_mm or (4.0,))[-1])
        history.update(_similarity_before(quality, fixed_t, fixed_grid, moving_t, moving_grid, mask_t, opts))
        if not levels:  # the affine is the result
            history.update(quality_signal(history["similarity_before"], _affine_similarity(
                quality, moving_grid, torch.as_tensor(affine, dtype=torch.float32, device=device), opts).item()))
    return pair


def _keep_initialization(level: _AffineLevel, moving_grid: ImageGrid, init: np.ndarray, opts: RegistrationOptions,
                         history: dict) -> np.ndarray:
    """``init`` when it lowers the similarity below the identity's on ``level`` (the first affine
    level, as the affine stage measures it, on the fixed mask when given), else the identity; the
    similarities go to ``history`` (``initialization``, and ``rolled_back_initialization`` = 1)."""
    device = level.fixed.device
    before = _affine_similarity(level, moving_grid, torch.eye(4, device=device), opts).item()
    after = _affine_similarity(level, moving_grid, torch.as_tensor(init, dtype=torch.float32, device=device), opts).item()
    if after < before:
        history["initialization"] = after
        return init
    history["initialization"] = before
    history["rolled_back_initialization"] = 1.0
    return np.eye(4)


#: The affine stage's result is kept when the coarsest deformable level, run from it, ends at
#: least this fraction closer to a perfect match than from the stage's start (:func:`_check_affine`):
#: the simpler model wins unless the affine clearly helps.
AFFINE_CHECK_MARGIN = 0.1


def _check_affine(pair: PreparedPair, before: np.ndarray, make_level: Callable[[np.ndarray], PyramidLevel],
                  lam: float) -> None:
    """Keep the affine stage's result (``pair.affine``) only when the deformable registration is
    clearly better from it than from the stage's start ``before``.

    The affine stage is judged on what it is for: the coarsest deformable level (``make_level(A)``
    gives it for an affine A) is optimized at weight ``lam`` from each, ending at objectives
    ``e_affine`` and ``e_start`` (similarity and regularization on the same fixed image and mask).
    Against the objective of a perfect match, ``b = (1 - λ) · sim(fixed, fixed)`` (0 for MSE and
    MIND, -1 for NCC and LNCC, -2 for the normalized MI), the affine is kept when
    ``e_affine - b < (1 - AFFINE_CHECK_MARGIN) · (e_start - b)``: a scale- and sign-free test.

    Why: an affine can lower the affine similarity by absorbing part of a local deformation as a
    global scaling, shear or shift, which the deformable stage must then undo. On the thin CT slab
    (30 slices of 3 mm) the affine shifted 2.8 mm along z where the true field's mean was 0.2 mm
    (final error 1.48 mm, 1.31 mm without); on the thick-slice cardiac sequence it raised the
    final error from 0.35 to 0.94 mm; on phantoms with a zero-mean in-plane field it ended 5-8 %
    lower at the coarse level and 0.15-0.2 mm worse at the end. A needed affine (an 8° rotation
    and a 5 mm shift) ends 70 % lower.

    ``history`` gets ``affine_check_affine`` and ``affine_check_initial`` (the objectives minus
    ``b``), and ``rolled_back_affine`` = 1 when ``before`` is kept; ``pair.levels`` becomes ``[the
    kept level]`` and ``pair.coarse_velocity`` its velocity.
    """
    trials = {}
    for name, affine in (("affine", pair.affine), ("initial", np.asarray(before, dtype=np.float64))):
        level = make_level(affine)
        trial = replace(pair, levels=[level], history={})
        velocity = optimize_velocity(trial, lam, [0], pair.options.deformable_iterations[:1], label=f"affine check ({name})")
        with torch.no_grad():
            perfect = (1.0 - lam) * similarity_loss(pair.options.similarity, level.fixed, level.fixed, level.mask,
                                                    level.grid.spacing, pair.options.lncc_window_mm).item()
        key = "x".join(map(str, level.grid.shape[::-1]))
        pair.history[f"affine_check_{name}"] = trial.history[f"objective_svf_{key}"] - perfect
        trials[name] = (affine, level, velocity, trial.history)
    excess_affine, excess_start = pair.history["affine_check_affine"], pair.history["affine_check_initial"]
    name = "affine" if excess_affine < (1.0 - AFFINE_CHECK_MARGIN) * excess_start else "initial"
    affine, level, velocity, history = trials[name]
    pair.history.update(history)
    if name == "initial":
        pair.history["rolled_back_affine"] = 1.0
    pair.affine, pair.levels, pair.coarse_velocity = affine, [level], velocity


def _similarity_before(level, fixed_t, fixed_grid, moving_t, moving_grid, mask_t, opts) -> dict:
    """``{"similarity_before": ...}``: the similarity of the pair as given (the identity transform,
    before initialization) on the finest deformable level (:class:`PyramidLevel` or, without a
    deformable stage, the finest affine level), on the fixed mask when given, at the level's voxel
    sample (``stride``): the reference of the quality signal (:func:`quality_signal`)."""
    grid = level.grid
    moving = _to_level(moving_t, moving_grid, grid, _theta(moving_grid, torch.eye(4, device=moving_t.device), grid))
    return {"similarity_before": _level_similarity(level, moving, None, opts)}


def _level_similarity(level, moving: torch.Tensor, velocity: Optional[torch.Tensor], opts: RegistrationOptions) -> float:
    """The similarity of ``level.fixed`` and ``moving`` (on the level's grid) warped by
    ``exp(velocity)`` (None: as it is), measured as the optimizer measures it on that level: at its
    voxel sample when it has one (:func:`sampled_similarity`), so that a full-size level never
    warps every voxel."""
    stride = level.stride if isinstance(level, PyramidLevel) else (1, 1, 1)  # an _AffineLevel: its images
    if stride != (1, 1, 1):
        displacement = moving.new_zeros((1, 3, 2, 2, 2)) if velocity is None else integrate_svf(velocity, opts.svf_steps)
        return float(sampled_similarity(opts.similarity, level.fixed, moving, displacement, level.mask, stride).item())
    if velocity is not None:
        moving = warp(moving, resize_field(integrate_svf(velocity, opts.svf_steps), level.grid.shape))
    return float(similarity_loss(opts.similarity, level.fixed, moving, level.mask, level.grid.spacing, opts.lncc_window_mm).item())


def quality_signal(before: float, after: float) -> dict:
    """The quality signal in ``history``: ``similarity_after`` and ``improved`` (1.0 when the result's
    similarity is lower, i.e. better, than ``similarity_before``, else 0.0)."""
    return {"similarity_after": float(after), "improved": float(after < before)}


def result_similarity(pair: PreparedPair, velocity: Optional[torch.Tensor]) -> float:
    """The result's similarity on the finest deformable level, measured as :func:`_similarity_before`:
    the moving image through the affine and ``exp(velocity)`` (None: the affine alone)."""
    level = pair.levels[-1]
    return _level_similarity(level, level.moving, velocity, pair.options)


def finish_registration(pair: PreparedPair, velocity: Optional[torch.Tensor], lam: float) -> RegistrationResult:
    """The full-resolution :class:`RegistrationResult` of ``velocity`` (on the last level's control
    grid; None = the affine alone) at weight ``lam``.

    The displacement ``A(x + u(x))`` is formed on the control grid and sampled at the fixed voxels
    slab by slab, as the λ path does (:class:`fields.FixedGridOutputs`): beyond the outputs, the
    memory is a slab's worth whatever the fixed image's size."""
    fixed_grid = pair.fixed_grid
    with torch.no_grad():
        if velocity is not None:
            u = integrate_svf(velocity, pair.options.svf_steps)
        else:  # the affine alone: a zero displacement on the smallest grid of the fixed image's extent
            u = torch.zeros((1, 3, 2, 2, 2), dtype=torch.float32, device=pair.device)
        if pair.levels and pair.levels[-1] is not None:
            pair.history.update(quality_signal(pair.history["similarity_before"], result_similarity(pair, velocity)))
    velocity_grid = pair.levels[-1].control if velocity is not None else None
    pair.levels = [None] * len(pair.levels)  # the pyramid's images (a finest level may be full size) are done with
    release_freed_memory()  # what the optimization freed, before the outputs are made
    sampler = FixedGridSampler(fixed_grid, fixed_grid, pair.affine, pair.moving_grid, pair.device)
    moving = volume_tensor(pair.moving, pair.device)
    outputs = FixedGridOutputs(sampler, moving, u, lam, pair.lambda_map)
    return RegistrationResult(
        fixed_grid=fixed_grid,
        warped=outputs.warped,
        displacement_ras=outputs.displacement_ras,
        jacobian=outputs.jacobian,
        lambda_map=outputs.lambda_map,
        affine_ras=pair.affine,
        velocity=None if velocity is None else velocity.detach().cpu(),
        velocity_grid=velocity_grid,
        runtime_s=time.perf_counter() - pair.start,
        device=str(pair.device),
        regularization_weight=float(lam),
        similarity=pair.options.similarity,
        history=pair.history,
    )
