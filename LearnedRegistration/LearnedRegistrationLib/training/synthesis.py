"""SynthMorph-style training pairs synthesized from label maps (Hoffmann et al., IEEE TMI 2022).

From two label maps on the same working grid (or one map used twice) we draw, independently for
the fixed and the moving side:

1. a random spatial transform: a small random affine (rotation, scaling, shear, translation, in mm
   about the grid centre) after a random smooth diffeomorphism ``exp(v)``, with ``v`` Gaussian noise
   on a coarse control grid, up-sampled and integrated by scaling and squaring
   (:func:`engine.transforms.integrate_svf`); the labels are resampled through it (nearest neighbour);
2. a random image of random contrast: a random mean and standard deviation per label (Gaussian
   mixture, as SynthSeg/SynthMorph), Gaussian blur, a smooth multiplicative bias field, a random
   gamma, additive noise, and min-max normalization to [0, 1];
3. optionally (brain maps) the extra-cerebral labels are set to background in *both* images, so
   the network also sees skull-stripped pairs like the real OASIS scans.

Everything runs in torch on the label maps' device and draws from one ``torch.Generator``, so a
seed reproduces a batch exactly on the same device. Shapes: label maps ``(N, 1, Z, Y, X)``
integer; images ``(N, 1, Z, Y, X)`` float in [0, 1]; the grid spacing (mm, isotropic) is given in
:class:`SynthesisConfig`, and all distances are in mm so results do not depend on the grid size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from ..engine.filters import gaussian_blur
from ..engine.grid import ALIGN_CORNERS, mm_per_normalized_unit
from ..engine.transforms import grid_sample, identity_grid, integrate_svf


@dataclass(frozen=True)
class SynthesisConfig:
    """Ranges of the random draws (each value is drawn uniformly in [0, max] unless said otherwise).

    Attributes:
        spacing_mm: isotropic voxel size of the working grid (mm).
        velocity_std_mm: largest standard deviation of the control-point velocities (mm); each
            sample draws its own in [0, max].
        velocity_spacing_mm: distance between velocity control points (mm); sets the smoothness.
        integration_steps: scaling-and-squaring steps for the random deformation.
        rotation_deg: rotation about each axis, uniform in [-max, max] degrees.
        scaling: log-scale per axis, uniform in [-max, max] (0.03 = about ±3 %).
        shear: off-diagonal shear terms, uniform in [-max, max].
        translation_mm: translation per axis, uniform in [-max, max] mm.
        intensity_std: largest within-label standard deviation (image range about [0, 1]).
        blur_sigma_mm: largest Gaussian blur sigma (mm).
        bias_std: largest standard deviation of the log bias field.
        bias_spacing_mm: control-point distance of the bias field (mm).
        gamma_std: standard deviation of the log of the gamma exponent.
        noise_std: largest standard deviation of the additive noise (after normalization).
        strip_probability: chance that a pair is skull-stripped (labels >= ``extracerebral_label``
            become background, which is then black).
        extracerebral_label: first label value treated as outside the brain (SynthSeg maps use
            FreeSurfer labels < 500 for the brain and 500+ for the head).
    """

    spacing_mm: float = 2.0
    velocity_std_mm: float = 4.0
    velocity_spacing_mm: float = 24.0
    integration_steps: int = 7
    rotation_deg: float = 3.0
    scaling: float = 0.03
    shear: float = 0.01
    translation_mm: float = 3.0
    intensity_std: float = 0.08
    blur_sigma_mm: float = 2.0
    bias_std: float = 0.3
    bias_spacing_mm: float = 48.0
    gamma_std: float = 0.25
    noise_std: float = 0.04
    strip_probability: float = 0.5
    extracerebral_label: int = 500

    def __post_init__(self) -> None:
        if not float(self.spacing_mm) > 0:
            raise ValueError(f"SynthesisConfig 'spacing_mm' must be positive, got {self.spacing_mm}")
        if float(self.velocity_spacing_mm) <= 0 or float(self.bias_spacing_mm) <= 0:
            raise ValueError("SynthesisConfig control-point spacings must be positive")
        if not 0.0 <= float(self.strip_probability) <= 1.0:
            raise ValueError(f"SynthesisConfig 'strip_probability' must be in [0, 1], got {self.strip_probability}")


class SynthesizedPair(NamedTuple):
    """One synthesized batch on the working grid.

    Attributes:
        fixed, moving: (N, 1, Z, Y, X) float images in [0, 1].
        fixed_labels, moving_labels: (N, 1, Z, Y, X) int64 label maps matching the images.
    """

    fixed: torch.Tensor
    moving: torch.Tensor
    fixed_labels: torch.Tensor
    moving_labels: torch.Tensor


def _uniform(shape, low, high, generator, device) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator, device=device)


def _check_labels(name: str, labels: torch.Tensor) -> None:
    if labels.dim() != 5 or labels.shape[1] != 1:
        raise ValueError(f"{name} must have shape (N, 1, Z, Y, X), got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer label map, got dtype {labels.dtype}")


def _smooth_noise(batch: int, channels: int, shape, spacing_mm: float, control_mm: float, generator, device) -> torch.Tensor:
    """Standard normal noise on a coarse grid of ``control_mm`` spacing, trilinearly up-sampled to ``shape``."""
    coarse = [max(2, int(math.ceil((n - 1) * spacing_mm / control_mm)) + 1) for n in shape]
    noise = torch.randn((batch, channels, *coarse), generator=generator, device=device)
    return F.interpolate(noise, size=tuple(shape), mode="trilinear", align_corners=ALIGN_CORNERS)


def _unit_mm(shape: Sequence[int], spacing_mm: float, device) -> torch.Tensor:
    """mm per normalized unit along (x, y, z) for a grid of ``shape`` (Z, Y, X), shape (3,) float32."""
    return torch.as_tensor(mm_per_normalized_unit(shape, spacing_mm), dtype=torch.float32, device=device)


def random_velocity(batch: int, shape, config: SynthesisConfig, generator: torch.Generator, device=None) -> torch.Tensor:
    """Random smooth stationary velocity field, (N, 3, Z, Y, X) in normalized units, channels (x, y, z).

    Each sample has its own amplitude, uniform in [0, ``velocity_std_mm``] mm.
    """
    device = torch.device(device or "cpu")
    shape = tuple(int(s) for s in shape)
    noise = _smooth_noise(batch, 3, shape, config.spacing_mm, config.velocity_spacing_mm, generator, device)
    std_mm = _uniform((batch, 1, 1, 1, 1), 0.0, config.velocity_std_mm, generator, device)
    return noise * std_mm / _unit_mm(shape, config.spacing_mm, device).view(1, 3, 1, 1, 1)


def random_affine(batch: int, shape, config: SynthesisConfig, generator: torch.Generator, device=None) -> torch.Tensor:
    """Random small affines as (N, 3, 4) matrices acting on the grid's normalized (x, y, z) coordinates.

    Built in mm about the grid centre, ``A = R_z R_y R_x · diag(exp(s)) · (I + shear)`` plus a
    translation, then expressed in normalized units: ``D^-1 A D`` with ``D = diag(mm per unit)``,
    so a rotation stays a rotation on non-cubic grids. Maps output points to sampled points.
    """
    device = torch.device(device or "cpu")
    angles = _uniform((batch, 3), -1.0, 1.0, generator, device) * math.radians(config.rotation_deg)
    log_scale = _uniform((batch, 3), -1.0, 1.0, generator, device) * config.scaling
    shear = _uniform((batch, 3), -1.0, 1.0, generator, device) * config.shear
    translation = _uniform((batch, 3), -1.0, 1.0, generator, device) * config.translation_mm
    c, s = torch.cos(angles), torch.sin(angles)
    one, zero = torch.ones(batch, device=device), torch.zeros(batch, device=device)

    def stack(rows):
        return torch.stack([torch.stack(r, dim=-1) for r in rows], dim=-2)

    rx = stack([[one, zero, zero], [zero, c[:, 0], -s[:, 0]], [zero, s[:, 0], c[:, 0]]])
    ry = stack([[c[:, 1], zero, s[:, 1]], [zero, one, zero], [-s[:, 1], zero, c[:, 1]]])
    rz = stack([[c[:, 2], -s[:, 2], zero], [s[:, 2], c[:, 2], zero], [zero, zero, one]])
    sh = stack([[one, shear[:, 0], shear[:, 1]], [zero, one, shear[:, 2]], [zero, zero, one]])
    linear = rz @ ry @ rx @ torch.diag_embed(torch.exp(log_scale)) @ sh
    unit = _unit_mm(tuple(int(n) for n in shape), config.spacing_mm, device)
    linear = linear * unit.view(1, 1, 3) / unit.view(1, 3, 1)  # D^-1 A D
    return torch.cat([linear, (translation / unit).unsqueeze(-1)], dim=-1)


def random_transform_grid(batch: int, shape, config: SynthesisConfig, generator: torch.Generator, device=None) -> torch.Tensor:
    """Sampling positions ``A(p + exp(v)(p))`` for every voxel ``p``, (N, Z, Y, X, 3) normalized (x, y, z)."""
    device = torch.device(device or "cpu")
    shape = tuple(int(s) for s in shape)
    displacement = integrate_svf(random_velocity(batch, shape, config, generator, device), config.integration_steps)
    theta = random_affine(batch, shape, config, generator, device)
    points = identity_grid(shape, device) + displacement.permute(0, 2, 3, 4, 1)
    return points @ theta[:, None, None, :, :3].transpose(-1, -2) + theta[:, None, None, None, :, 3]


def deform_labels(labels: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Resample integer ``labels`` (N, 1, Z, Y, X) at ``grid`` (N, Z, Y, X, 3) by nearest neighbour (0 outside)."""
    out = torch.cat([grid_sample(labels[i : i + 1].float(), grid[i : i + 1], "nearest") for i in range(labels.shape[0])])
    return out.round().to(torch.int64)


def synthesize_image(labels: torch.Tensor, config: SynthesisConfig, generator: torch.Generator, black_background: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Random-contrast image (N, 1, Z, Y, X) in [0, 1] from integer ``labels`` (N, 1, Z, Y, X) >= 0.

    Args:
        labels: label map; values index a random lookup table of means and standard deviations.
        config: random ranges.
        generator: random source on ``labels.device``.
        black_background: optional (N,) bool; where True, label 0 gets intensity 0 before the bias,
            gamma and noise (a skull-stripped look).
    """
    _check_labels("synthesize_image() 'labels'", labels)
    if int(labels.min()) < 0:
        raise ValueError("synthesize_image() 'labels' must be >= 0")
    device = labels.device
    n = labels.shape[0]
    table = int(labels.max()) + 1
    means = torch.rand((n, table), generator=generator, device=device)
    stds = torch.rand((n, table), generator=generator, device=device) * config.intensity_std
    if black_background is not None:
        keep = (~black_background.to(device)).float()
        means[:, 0] = means[:, 0] * keep
        stds[:, 0] = stds[:, 0] * keep
    flat = labels.reshape(n, -1)
    image = means.gather(1, flat) + stds.gather(1, flat) * torch.randn(flat.shape, generator=generator, device=device)
    image = image.reshape(labels.shape)
    sigmas = torch.rand(n, generator=generator, device=device) * (config.blur_sigma_mm / config.spacing_mm)
    image = torch.cat([gaussian_blur(image[i : i + 1], [float(sigmas[i])] * 3) for i in range(n)])
    bias_amp = _uniform((n, 1, 1, 1, 1), 0.0, config.bias_std, generator, device)
    bias = _smooth_noise(n, 1, labels.shape[2:], config.spacing_mm, config.bias_spacing_mm, generator, device)
    image = image.clamp_min(0) * torch.exp(bias * bias_amp)
    image = _minmax(image)
    gamma = torch.exp(torch.randn((n, 1, 1, 1, 1), generator=generator, device=device) * config.gamma_std)
    image = image.clamp_min(1e-6) ** gamma
    noise_amp = _uniform((n, 1, 1, 1, 1), 0.0, config.noise_std, generator, device)
    image = image + noise_amp * torch.randn(image.shape, generator=generator, device=device)
    return _minmax(image)


def _minmax(image: torch.Tensor) -> torch.Tensor:
    lo = image.amin(dim=(1, 2, 3, 4), keepdim=True)
    hi = image.amax(dim=(1, 2, 3, 4), keepdim=True)
    return (image - lo) / (hi - lo).clamp_min(1e-6)


def synthesize_pair(
    fixed_labels: torch.Tensor,
    moving_labels: Optional[torch.Tensor],
    generator: torch.Generator,
    config: SynthesisConfig = SynthesisConfig(),
) -> SynthesizedPair:
    """A fixed/moving training batch from label maps on the working grid.

    Args:
        fixed_labels: (N, 1, Z, Y, X) integer label map (values >= 0) for the fixed side.
        moving_labels: same shape for the moving side (another subject), or None to deform
            ``fixed_labels`` a second time (intra-subject pairs).
        generator: ``torch.Generator`` on the label maps' device; the only source of randomness.
        config: random ranges; ``config.spacing_mm`` must be the grid's voxel size.

    Returns:
        :class:`SynthesizedPair`: images in [0, 1] of independent random contrasts and the labels
        resampled through each side's own random transform.

    Raises:
        ValueError: for label maps that are not (N, 1, Z, Y, X) integers or do not match.
    """
    _check_labels("synthesize_pair() 'fixed_labels'", fixed_labels)
    if moving_labels is None:
        moving_labels = fixed_labels
    _check_labels("synthesize_pair() 'moving_labels'", moving_labels)
    if moving_labels.shape != fixed_labels.shape:
        raise ValueError(
            f"synthesize_pair() label maps must have the same shape, got {tuple(fixed_labels.shape)} and {tuple(moving_labels.shape)}"
        )
    device = fixed_labels.device
    n, shape = fixed_labels.shape[0], fixed_labels.shape[2:]
    strip = torch.rand(n, generator=generator, device=device) < config.strip_probability
    out = []
    for labels in (fixed_labels, moving_labels):
        labels = torch.where(
            strip.view(n, 1, 1, 1, 1) & (labels >= config.extracerebral_label), torch.zeros_like(labels), labels
        )
        grid = random_transform_grid(n, shape, config, generator, device)
        warped = deform_labels(labels, grid)
        out.append((synthesize_image(warped, config, generator, black_background=strip), warped))
    (fixed, fixed_warped), (moving, moving_warped) = out
    return SynthesizedPair(fixed, moving, fixed_warped, moving_warped)


def one_hot(labels: torch.Tensor, label_values: Sequence[int]) -> torch.Tensor:
    """One-hot encoding (N, K + 1, Z, Y, X) float: channel 0 is everything not in ``label_values``.

    Args:
        labels: (N, 1, Z, Y, X) integer label map.
        label_values: the K label values that get their own channel (in that order, from channel 1).
    """
    _check_labels("one_hot() 'labels'", labels)
    values = [int(v) for v in label_values]
    if len(set(values)) != len(values) or (values and min(values) < 0):
        raise ValueError(f"one_hot() 'label_values' must be distinct non-negative integers, got {values}")
    top = max([int(labels.max()), *values, 0]) + 1
    lut = torch.zeros(top, dtype=torch.int64, device=labels.device)
    lut[torch.as_tensor(values, dtype=torch.int64, device=labels.device)] = torch.arange(
        1, len(values) + 1, device=labels.device
    )
    index = lut[labels[:, 0].clamp_min(0)]
    return F.one_hot(index, len(values) + 1).permute(0, 4, 1, 2, 3).float()
