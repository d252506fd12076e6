"""Instance optimization: initialization, multi-resolution affine, multi-resolution SVF.

Pipeline (all in the fixed image's physical space, RAS mm):

1. **Initialization** (``"com"``: match intensity centres of mass; ``"moments"``: also align the
   principal axes of the intensity distributions; ``"none"``: identity).
2. **Affine** (or rigid) optimization on a coarse-to-fine pyramid (``affine_spacings_mm``).
3. **Deformable**: a stationary velocity field ``v`` on the fixed grid, resampled to each level of
   ``deformable_spacings_mm``, integrated by scaling and squaring, optimized with Adam on

   ``loss = (1 - λ) · sim(fixed, moving ∘ A ∘ exp(v)) + λ · κ · mean_x λ(x) |∇v|² + γ · relu(-J)²``

   where ``λ ∈ [0, 1]`` is the user's regularization weight (the HyperMorph convention, Hoopes et
   al., IPMI 2021: 0 = similarity only, 1 = no deformation), ``λ(x)`` an optional per-voxel map in
   [0, 1] (Chen et al., spatially varying regularization), ``κ`` a fixed per-similarity calibration
   that puts the default λ in the useful range, and ``γ`` a small penalty on folding.

The device is chosen automatically (CUDA when available, else CPU) unless the caller names one.
A ``cancel`` callable is polled every iteration; ``progress`` gets (fraction, message).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .common import (
    CancelCallback,
    ProgressCallback,
    RegistrationCancelled,
    RegistrationOptions,
    RegistrationResult,
    choose_device,
    match_histogram,
    normalize_intensity,
    validate_volume,
)
from .filters import box_mean, gaussian_blur
from .grid import ALIGN_CORNERS, ImageGrid, mm_per_normalized_unit
from .metrics import jacobian_map
from .regularization import diffusion, negative_jacobian_penalty, weighted_diffusion
from .similarity import similarity_loss
from .transforms import (
    affine_matrix,
    displacement_to_ras,
    grid_sample,
    integrate_svf,
    normalized_to_mm,
    per_channel,
    resample_image,
    resize_field,
    rotation_matrix,
    warp,
)
from .weightmap import WeightMap

#: κ: per-similarity scale of the regularization term, so that one λ means about the same
#: smoothness whichever similarity is chosen (the losses have different ranges). Calibrated on the
#: OASIS pair (scripts/benchmark.py, its λ sweep): with MSE on [0, 1]-normalized intensities the default
#: λ = 0.25 gives Dice 0.75 with < 0.01 % folding; the ratio of the two terms, λκ / (1 - λ), runs
#: from 0 (λ = 0) through 0.004 (default) to 0.1 (λ = 0.9) and infinity (λ = 1, no deformation).
REGULARIZATION_SCALE = {"mse": 0.0122, "lncc": 0.3, "ncc": 0.3, "ngf": 0.3, "mi": 0.3}


def _level_grids(grid: ImageGrid, spacings_mm: Sequence[float]) -> list[ImageGrid]:
    """One grid per pyramid level (coarse to fine), dropping repeats when the image is coarser."""
    levels: list[ImageGrid] = []
    for s in spacings_mm:
        g = grid.with_spacing(s)
        if not levels or levels[-1].shape != g.shape:
            levels.append(g)
    return levels


def _antialias(image: torch.Tensor, source: ImageGrid, target_spacing: Sequence[float]) -> torch.Tensor:
    """Box-filter ``image`` (on ``source``) to about the voxel size of ``target_spacing`` before sampling.

    A box of the target voxel's width is what averaging down-sampling does; its running-sum
    implementation costs the same for any width, unlike a Gaussian convolution (5-10x slower on CPU).
    """
    width = [int(round(t / s)) // 2 * 2 + 1 for t, s in zip(target_spacing, source.spacing)]
    if max(width) <= 1:
        return image
    return box_mean(image, width)


def _to_level(
    image: torch.Tensor, source: ImageGrid, level: ImageGrid, theta: torch.Tensor, mode: str = "linear"
) -> torch.Tensor:
    """Resample a (1, 1, ...) tensor on ``source`` onto ``level`` through ``theta`` (level -> source normalized)."""
    if mode == "linear":
        image = _antialias(image, source, level.spacing)
    grid = F.affine_grid(theta.unsqueeze(0), (1, 1, *level.shape), align_corners=ALIGN_CORNERS)
    return grid_sample(image, grid, mode)


def _theta(moving_grid: ImageGrid, affine: torch.Tensor, level: ImageGrid) -> torch.Tensor:
    """(3, 4) level-normalized -> moving-normalized matrix for a torch (4, 4) RAS affine (differentiable)."""
    left = torch.as_tensor(moving_grid.ras_to_normalized, dtype=affine.dtype, device=affine.device)
    right = torch.as_tensor(level.normalized_to_ras, dtype=affine.dtype, device=affine.device)
    return (left @ affine @ right)[:3]


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
def _optimize_affine(
    fixed_levels, mask_levels, moving_t, moving_grid, init, opts, device, ticker, history
) -> np.ndarray:
    dtype = torch.float32
    centre = torch.as_tensor(fixed_levels[-1][1].center_ras, dtype=dtype, device=device)
    init_t = torch.as_tensor(init, dtype=dtype, device=device)
    rotvec = torch.zeros(3, dtype=dtype, device=device, requires_grad=True)
    linear = torch.zeros(3, 3, dtype=dtype, device=device, requires_grad=True)
    translation = torch.zeros(3, dtype=dtype, device=device, requires_grad=True)
    params = [translation, rotvec] + ([linear] if opts.affine_model == "affine" else [])

    def current() -> torch.Tensor:
        lin = rotation_matrix(rotvec)
        if opts.affine_model == "affine":
            lin = lin + linear
        # the optimized update acts on the fixed side: A = init @ update
        return init_t @ affine_matrix(lin, translation, centre)

    for (fixed_l, level), mask_l, iters in zip(fixed_levels, mask_levels, opts.affine_iterations):
        n_iter = max(1, int(round(iters * opts.iteration_scale)))
        # translation steps of about a quarter voxel, rotations/shears of about 0.3 %
        optimizer = torch.optim.Adam(
            [
                {"params": [translation], "lr": 0.25 * min(level.spacing)},
                {"params": params[1:], "lr": 3e-3},
            ]
        )
        blurred = _antialias(moving_t, moving_grid, level.spacing)
        for _ in range(n_iter):
            optimizer.zero_grad(set_to_none=True)
            theta = _theta(moving_grid, current(), level)
            grid = F.affine_grid(theta.unsqueeze(0), (1, 1, *level.shape), align_corners=ALIGN_CORNERS)
            warped = grid_sample(blurred, grid)
            loss = similarity_loss(opts.similarity, fixed_l, warped, mask_l, level.spacing, opts.lncc_window_mm)
            loss.backward()
            optimizer.step()
            ticker.tick(f"affine {level.shape[::-1]}: loss {loss.item():.4f}")
        history[f"affine_{'x'.join(map(str, level.shape[::-1]))}"] = float(loss.item())
        history[f"time_affine_{'x'.join(map(str, level.shape[::-1]))}_s"] = time.perf_counter() - ticker.started
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
) -> torch.Tensor:
    """The SVF stage at regularization weight ``lam`` on the pyramid levels ``levels`` (indices into
    ``pair.levels``, coarse to fine), ``iterations[i]`` Adam steps on ``levels[i]`` (before
    ``iteration_scale``), starting from ``initial`` (a normalized velocity on any control grid of the
    same extent; zero when None). With ``weight_map`` the regularization is also weighted by its
    λ(x) (normalized to mean 1, :mod:`weightmap`), which is optimized along when ``learn_weight_map``.

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
        to_norm = per_channel(1.0 / mm_per_normalized_unit(control.shape), pair.device)  # voxels -> normalized
        if velocity_norm is None:
            v_vox = torch.zeros((1, 3, *control.shape), dtype=torch.float32, device=pair.device)
        else:
            v_vox = resize_field(velocity_norm, control.shape) / to_norm
        v_vox.requires_grad_(True)
        groups = [{"params": [v_vox], "lr": opts.learning_rate_vox if learning_rate_vox is None else learning_rate_vox}]
        if weight_map is not None and learn_weight_map:
            groups.append({"params": [weight_map.logit], "lr": weight_map.options.learning_rate})
        optimizer = torch.optim.Adam(groups)
        for _ in range(n_iter):
            optimizer.zero_grad(set_to_none=True)
            weight = level.weight
            if weight_map is not None:
                with torch.set_grad_enabled(learn_weight_map):
                    weight = weight * weight_map.normalized(control.shape)
            loss, sim, reg = svf_objective(
                _velocity(v_vox, opts.smoothing_sigma_vox, to_norm), control, level.fixed, level.moving, level.grid.spacing,
                lam, weight, opts.similarity, mask=level.mask, integration_steps=opts.svf_steps,
                jacobian_penalty=opts.jacobian_penalty, lncc_window_mm=opts.lncc_window_mm,
            )
            if weight_map is not None and learn_weight_map:
                with torch.no_grad():
                    energy = diffusion(normalized_to_mm(_velocity(v_vox, opts.smoothing_sigma_vox, to_norm), control), control.spacing)
                loss = loss + weight_map.penalty(energy, lam, REGULARIZATION_SCALE[opts.similarity])
            loss.backward()
            optimizer.step()
            ticker.tick(f"{label} {level.grid.shape[::-1]}: similarity {sim.item():.4f}")
        history[f"svf_{'x'.join(map(str, level.grid.shape[::-1]))}"] = float(sim.item())
        history[f"time_svf_{'x'.join(map(str, level.grid.shape[::-1]))}_s"] = time.perf_counter() - ticker.started
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
    """
    displacement = integrate_svf(velocity, integration_steps)
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
        velocity = optimize_velocity(pair, float(pair.options.regularization_weight), range(len(pair.levels)),
                                     pair.options.deformable_iterations)
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
    """

    grid: ImageGrid
    control: ImageGrid
    fixed: torch.Tensor
    moving: torch.Tensor
    mask: Optional[torch.Tensor]
    weight: torch.Tensor


@dataclass
class PreparedPair:
    """A pair after checks, intensity preparation, initialization and the affine stage, with its
    deformable pyramid: what :func:`optimize_velocity` needs at any λ (and :mod:`path` at many).

    Attributes:
        options: validated options (iteration lists trimmed to the levels that exist).
        device: where the tensors are.
        fixed, moving: the validated (Z, Y, X) float32 images; ``fixed_grid``, ``moving_grid``.
        lambda_map: the user's λ(x) on the fixed grid (ones without one), (Z, Y, X) float32.
        affine: (4, 4) resampling affine in RAS mm found by the affine stage.
        levels: the deformable pyramid, coarse to fine.
        ticker: progress and cancel of the whole run; ``history``: stage losses and times; ``start``:
            ``time.perf_counter()`` at the start.
    """

    options: RegistrationOptions
    device: torch.device
    fixed: np.ndarray
    fixed_grid: ImageGrid
    moving: np.ndarray
    moving_grid: ImageGrid
    lambda_map: np.ndarray
    affine: np.ndarray
    levels: list[PyramidLevel]
    ticker: _Progress
    history: dict
    start: float


def prepare_pair(
    fixed, fixed_grid, moving, moving_grid, options, fixed_mask, lambda_map, progress, cancel, extra_iterations: int = 0,
    affine: Optional[np.ndarray] = None,
) -> PreparedPair:
    """Checks, intensity preparation, initialization, the affine stage and the deformable pyramid.

    Arguments as :func:`register_images`; ``extra_iterations`` are added to the progress total (the
    deformable iterations a caller runs beyond one pass over the pyramid, e.g. more λ knots). With
    ``affine`` (a (4, 4) resampling affine found before), initialization and the affine stage are
    skipped.

    Raises:
        as :func:`register_images`.
    """
    start = time.perf_counter()
    opts = replace(options or RegistrationOptions()).validated()
    fixed = validate_volume("fixed", fixed, fixed_grid)
    moving = validate_volume("moving", moving, moving_grid)
    if fixed_mask is not None:
        fixed_mask = np.asarray(fixed_mask)
        if fixed_mask.shape != fixed_grid.shape:
            raise ValueError(f"the fixed mask has shape {fixed_mask.shape} but the fixed image has {fixed_grid.shape}")
        if not (fixed_mask > 0).any():
            raise ValueError("the fixed mask is empty; it must mark at least one voxel")
    lam_map = np.ones(fixed_grid.shape, np.float32)
    if lambda_map is not None:
        lam_map = np.asarray(lambda_map, dtype=np.float32)
        if lam_map.shape != fixed_grid.shape:
            raise ValueError(f"the λ map has shape {lam_map.shape} but the fixed image has {fixed_grid.shape}")
        if not np.isfinite(lam_map).all() or lam_map.min() < 0 or lam_map.max() > 1:
            raise ValueError("the λ map must hold finite values in [0, 1]")
    device = choose_device(opts.device)

    moving_for_similarity = moving
    if opts.similarity == "mse" and opts.histogram_matching:
        moving_for_similarity = match_histogram(moving, fixed)
    fixed_t = torch.as_tensor(normalize_intensity(fixed), device=device)[None, None]
    moving_t = torch.as_tensor(normalize_intensity(moving_for_similarity), device=device)[None, None]
    mask_t = None if fixed_mask is None else torch.as_tensor((fixed_mask > 0).astype(np.float32), device=device)[None, None]
    lam_t = torch.as_tensor(lam_map, device=device)[None, None]

    affine_levels = _level_grids(fixed_grid, opts.affine_spacings_mm) if opts.affine_model != "none" and affine is None else []
    deform_levels = _level_grids(fixed_grid, opts.deformable_spacings_mm)
    affine_iters = list(opts.affine_iterations)[-len(affine_levels):] if affine_levels else []
    deform_iters = list(opts.deformable_iterations)[-len(deform_levels):] if deform_levels else []
    opts = replace(opts, affine_iterations=affine_iters, deformable_iterations=deform_iters)
    total = sum(max(1, int(round(i * opts.iteration_scale))) for i in (*affine_iters, *deform_iters)) + int(extra_iterations)
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
        else:
            init = np.asarray(affine, dtype=np.float64)
        _check_overlap(fixed_t, fixed_grid, moving_grid, init, device)
    if progress is not None:
        progress(0.0, "initialized")

    affine = init
    if affine_levels:
        with torch.no_grad():
            # the fixed grid and a level grid share the normalized frame: theta is the identity
            fixed_levels = [(_to_level(fixed_t, fixed_grid, level, identity), level) for level in affine_levels]
            mask_levels = [None if mask_t is None else _to_level(mask_t, fixed_grid, level, identity, "nearest")
                           for level in affine_levels]
        affine = _optimize_affine(fixed_levels, mask_levels, moving_t, moving_grid, init, opts, device, ticker, history)

    levels = []
    with torch.no_grad():
        affine_t = torch.as_tensor(affine, dtype=torch.float32, device=device)
        for grid in deform_levels:
            control = grid.with_spacing(opts.control_spacing_factor * max(grid.spacing))
            levels.append(PyramidLevel(
                grid=grid,
                control=control,
                fixed=_to_level(fixed_t, fixed_grid, grid, identity),
                moving=_to_level(moving_t, moving_grid, grid, _theta(moving_grid, affine_t, grid)),
                mask=None if mask_t is None else _to_level(mask_t, fixed_grid, grid, identity, "nearest"),
                weight=resize_field(_to_level(lam_t, fixed_grid, grid, identity), control.shape),
            ))
    return PreparedPair(opts, device, fixed, fixed_grid, moving, moving_grid, lam_map, affine, levels, ticker, history, start)


def finish_registration(pair: PreparedPair, velocity: Optional[torch.Tensor], lam: float) -> RegistrationResult:
    """The full-resolution :class:`RegistrationResult` of ``velocity`` (on the last level's control
    grid; None = the affine alone) at weight ``lam``."""
    displacement = None
    if velocity is not None:
        with torch.no_grad():
            displacement = resize_field(integrate_svf(velocity, pair.options.svf_steps), pair.fixed_grid.shape)
    fixed_grid = pair.fixed_grid
    displacement_ras = displacement_to_ras(displacement, fixed_grid, pair.affine)
    del displacement
    warped = resample_image(pair.moving, pair.moving_grid, fixed_grid, displacement_ras)
    return RegistrationResult(
        fixed_grid=fixed_grid,
        warped=warped.astype(np.float32),
        displacement_ras=displacement_ras,
        jacobian=jacobian_map(displacement_ras, fixed_grid),
        lambda_map=(float(lam) * pair.lambda_map).astype(np.float32),
        affine_ras=pair.affine,
        velocity=None if velocity is None else velocity.detach().cpu(),
        velocity_grid=pair.levels[-1].control if velocity is not None else None,
        runtime_s=time.perf_counter() - pair.start,
        device=str(pair.device),
        regularization_weight=float(lam),
        similarity=pair.options.similarity,
        history=pair.history,
    )
