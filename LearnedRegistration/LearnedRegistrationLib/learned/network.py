"""λ-conditioned 3D U-Net that predicts a stationary velocity field and a regularization weight map.

Given a fixed and a moving image on the same grid and the user's regularization weight
``λ ∈ [0, 1]`` (the HyperMorph convention, Hoopes et al., IPMI 2021: 0 = similarity only,
1 = no deformation), the network predicts

- a **stationary velocity field** ``v: (N, 3, Z, Y, X)`` in the *input grid's* normalized units,
  channels (x, y, z) = (I, J, K) (see :mod:`engine.grid`), integrated by scaling and squaring
  (:func:`engine.transforms.integrate_svf`) into the resampling displacement ``u = exp(v)``:
  ``warped(p) = moving(p + u(p))`` in the fixed grid's normalized coordinates;
- a **spatially varying regularization weight map** ``λ(x): (N, 1, Z, Y, X)`` in (0, 1) (sigmoid),
  from a second head on the same decoder features (Chen et al., "Unsupervised learning of
  spatially varying regularization for diffeomorphic image registration", MedIA 2025 / arXiv
  2412.17982). Training weighs the diffusion of ``v`` voxel by voxel with it
  (:func:`engine.regularization.weighted_diffusion`) under a Beta prior
  (:func:`engine.regularization.beta_prior_nll`).

Conditioning on λ: **conditional instance normalization** (CIN, Mok & Chung, "Conditional
deformable image registration with convolutional neural network", MICCAI 2021, cLapIRN), i.e.
instance normalization followed by a FiLM scale and shift (Perez et al., AAAI 2018) computed from
λ by a small shared MLP, at every convolution of the decoder and the heads, so λ modulates every
resolution level of the U-Net. We chose it over a HyperMorph hypernetwork because a hypernetwork
must emit every convolution weight, so its last layer alone is ``hidden × (number of weights)``
parameters (tens of MB for this U-Net), while CIN adds only ``2 × channels`` outputs per layer:
the model stays around 1 MB of float32, far under the 20 MB budget for shipped weights (cLapIRN
reports the same smoothness control as HyperMorph). The *encoder* is deliberately λ-free (plain
instance normalization): its features depend on the image pair only, so :meth:`encode` runs once
per pair and a slider move re-runs only :meth:`decode` — the part of the network that λ needs.
Instance normalization also removes the global contrast of each feature map, which suits
contrast-agnostic training (SynthMorph, Hoffmann et al., IEEE TMI 2022).

Output resolution: the decoder stops at level ``output_level`` (1 = half the input resolution,
like the optimizer's velocity control grid at twice the finest image spacing); velocity and λ(x)
are predicted there, the velocity is integrated there, and displacement and λ(x) are up-sampled
trilinearly to the input grid. Because the fields are in normalized units over the same physical
extent (``align_corners=True``), the coarse and fine tensors describe the same transform.

Input sizes: every axis must be divisible by ``2 ** levels`` (and give a bottleneck of at least
2 voxels for the instance normalization). :meth:`RegistrationNetwork.forward` pads any input to
that (:func:`pad_to_multiple`) and crops back (:func:`crop_padding`), and converts the fields from
the padded grid's normalized units back to the input grid's (:func:`rescale_normalized_field`),
so callers never see the padding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..engine.grid import ALIGN_CORNERS, mm_per_normalized_unit
from ..engine.transforms import integrate_svf, per_channel

#: Bump when the architecture changes in a way old checkpoints cannot load into.
ARCHITECTURE_VERSION = 2

#: Bounds of :class:`NetworkConfig` (far beyond any useful value: they only stop a damaged or
#: hostile config from asking for absurd work, e.g. 2 ** 10**9 scaling-and-squaring steps).
MAX_LEVELS = 8
MAX_FEATURES = 1024
MAX_INTEGRATION_STEPS = 20


def _checked_int(name: str, value, low: int, high: int) -> int:
    """``value`` as an int in [low, high] (an integral number, not a bool), else ValueError naming the field."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= int(value) <= high:
        raise ValueError(f"NetworkConfig {name!r} must be an integer in [{low}, {high}], got {value!r}")
    return int(value)


def _int_tuple(name: str, values) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"NetworkConfig {name!r} must be a sequence of channel counts, got {values!r}")
    return tuple(_checked_int(f"{name}[{i}]", v, 1, MAX_FEATURES) for i, v in enumerate(values))


def _checked_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) or not math.isfinite(value):
        raise ValueError(f"NetworkConfig {name!r} must be a finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class NetworkConfig:
    """Everything needed to rebuild a :class:`RegistrationNetwork` (saved in every checkpoint).

    Attributes:
        encoder_features: channels at each resolution level, full resolution first; its length is
            ``levels + 1`` (level 0 is full resolution, level ``i`` is down-sampled by ``2 ** i``).
        decoder_features: channels of the decoder blocks from level ``levels - 1`` up to level
            ``output_level`` (length ``levels - output_level``).
        head_features: channels of the extra block at ``output_level`` shared by both heads.
        output_level: resolution level of the predicted fields (0 = input resolution, 1 = half).
        condition_features: width of the MLP that embeds λ for the CIN layers.
        integration_steps: scaling-and-squaring steps for ``exp(v)``.
        weight_map_init: initial value of λ(x) everywhere (bias of the sigmoid head), in (0, 1).
        negative_slope: LeakyReLU slope, in [0, 1).

    Raises:
        ValueError: naming the first field of the wrong type or out of bounds: 1 to
            :data:`MAX_LEVELS` levels, channel counts in [1, :data:`MAX_FEATURES`],
            ``integration_steps`` in [0, :data:`MAX_INTEGRATION_STEPS`].
    """

    encoder_features: tuple[int, ...] = (8, 16, 32, 32, 32)
    decoder_features: tuple[int, ...] = (32, 32, 32)
    head_features: int = 16
    output_level: int = 1
    condition_features: int = 64
    integration_steps: int = 7
    weight_map_init: float = 0.5
    negative_slope: float = 0.2

    def __post_init__(self) -> None:
        enc = _int_tuple("encoder_features", self.encoder_features)
        dec = _int_tuple("decoder_features", self.decoder_features)
        object.__setattr__(self, "encoder_features", enc)
        object.__setattr__(self, "decoder_features", dec)
        if not 2 <= len(enc) <= MAX_LEVELS + 1 or min(enc) < 1 or max(enc) > MAX_FEATURES:
            raise ValueError(
                f"NetworkConfig 'encoder_features' needs 2 to {MAX_LEVELS + 1} channel counts in [1, {MAX_FEATURES}], got {enc}"
            )
        output_level = _checked_int("output_level", self.output_level, 0, len(enc) - 2)
        want = len(enc) - 1 - output_level
        if len(dec) != want or min(dec) < 1 or max(dec) > MAX_FEATURES:
            raise ValueError(
                f"NetworkConfig 'decoder_features' needs {want} channel counts in [1, {MAX_FEATURES}] "
                f"(one per level from {len(enc) - 2} up to output_level {output_level}), got {dec}"
            )
        object.__setattr__(self, "output_level", output_level)
        for name in ("head_features", "condition_features"):
            object.__setattr__(self, name, _checked_int(name, getattr(self, name), 1, MAX_FEATURES))
        object.__setattr__(
            self, "integration_steps", _checked_int("integration_steps", self.integration_steps, 0, MAX_INTEGRATION_STEPS)
        )
        init = _checked_float("weight_map_init", self.weight_map_init)
        if not 0.0 < init < 1.0:
            raise ValueError(f"NetworkConfig 'weight_map_init' must be in (0, 1), got {self.weight_map_init}")
        slope = _checked_float("negative_slope", self.negative_slope)
        if not 0.0 <= slope < 1.0:
            raise ValueError(f"NetworkConfig 'negative_slope' must be in [0, 1), got {self.negative_slope}")
        object.__setattr__(self, "weight_map_init", init)
        object.__setattr__(self, "negative_slope", slope)

    @property
    def levels(self) -> int:
        """Number of 2x down-samplings."""
        return len(self.encoder_features) - 1

    @property
    def divisor(self) -> int:
        """Every padded axis must be a multiple of this (``2 ** levels``)."""
        return 2**self.levels

    def to_dict(self) -> dict:
        """Plain dict of lists/ints/floats (safe for ``torch.load(weights_only=True)`` and JSON)."""
        d = asdict(self)
        d["encoder_features"] = list(self.encoder_features)
        d["decoder_features"] = list(self.decoder_features)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> NetworkConfig:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: for unknown keys or invalid values.
        """
        if not isinstance(d, dict):
            raise ValueError(f"NetworkConfig.from_dict() needs a dict, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"NetworkConfig has no field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


class NetworkOutput(NamedTuple):
    """What :meth:`RegistrationNetwork.forward` returns; all on the input grid.

    Attributes:
        velocity: (N, 3, Z, Y, X) stationary velocity, input grid's normalized units, (x, y, z).
        displacement: (N, 3, Z, Y, X) ``exp(velocity)`` as a normalized resampling displacement.
        weight_map: (N, 1, Z, Y, X) regularization weight λ(x) in (0, 1).
    """

    velocity: torch.Tensor
    displacement: torch.Tensor
    weight_map: torch.Tensor


# --------------------------------------------------------------------------------- padding
def padded_shape(shape: Sequence[int], divisor: int) -> tuple[int, int, int]:
    """(Z, Y, X) rounded up to multiples of ``divisor``, and to at least ``2 * divisor`` per axis.

    The minimum keeps the bottleneck at >= 2 voxels per axis, which instance normalization needs.
    """
    return tuple(max(2 * divisor, int(math.ceil(int(s) / divisor)) * divisor) for s in shape)


def pad_to_multiple(x: torch.Tensor, divisor: int, value: float = 0.0) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Pad (N, C, Z, Y, X) symmetrically with ``value`` to :func:`padded_shape`.

    Returns:
        (padded tensor, padding) where ``padding`` is in ``F.pad`` order
        (x_before, x_after, y_before, y_after, z_before, z_after), for :func:`crop_padding`.

    Raises:
        ValueError: if ``x`` is not 5D or ``divisor`` < 1.
    """
    if x.dim() != 5:
        raise ValueError(f"pad_to_multiple() 'x' must have shape (N, C, Z, Y, X), got {tuple(x.shape)}")
    if int(divisor) < 1:
        raise ValueError(f"pad_to_multiple() 'divisor' must be >= 1, got {divisor}")
    target = padded_shape(x.shape[2:], int(divisor))
    padding: list[int] = []
    for size, want in zip(reversed(x.shape[2:]), reversed(target)):  # F.pad starts at the last axis
        extra = want - size
        padding += [extra // 2, extra - extra // 2]
    if not any(padding):
        return x, tuple(padding)
    return F.pad(x, padding, mode="constant", value=value), tuple(padding)


def crop_padding(x: torch.Tensor, padding: Sequence[int]) -> torch.Tensor:
    """Undo :func:`pad_to_multiple` on (N, C, Z', Y', X')."""
    px0, px1, py0, py1, pz0, pz1 = (int(p) for p in padding)
    z, y, xx = x.shape[2:]
    return x[:, :, pz0 : z - pz1, py0 : y - py1, px0 : xx - px1]


def rescale_normalized_field(field: torch.Tensor, from_shape: Sequence[int], to_shape: Sequence[int]) -> torch.Tensor:
    """Convert a normalized vector field between two grids of equal spacing but different extent.

    A displacement of ``d`` normalized units on a grid of ``from_shape`` is ``d * s_from / s_to`` units
    on a grid of ``to_shape`` with the same voxel size (e.g. a padded and a cropped grid), ``s`` the
    voxels per normalized unit (:func:`grid.mm_per_normalized_unit`). ``field: (N, 3, Z, Y, X)``,
    channels (x, y, z); shapes are (Z, Y, X); an axis of one voxel counts as two.
    """
    if field.dim() != 5 or field.shape[1] != 3:
        raise ValueError(f"rescale_normalized_field() 'field' must be (N, 3, Z, Y, X), got {tuple(field.shape)}")
    scale = mm_per_normalized_unit(np.maximum(from_shape, 2)) / mm_per_normalized_unit(np.maximum(to_shape, 2))
    return field * per_channel(scale, field.device, field.dtype)


# --------------------------------------------------------------------------------- layers
class ConditionalInstanceNorm(nn.Module):
    """Instance normalization then a λ-dependent scale and shift: ``(1 + γ(e)) · IN(x) + β(e)``.

    ``e`` is the λ embedding (N, E); γ and β start at zero so the untrained layer is plain IN.
    """

    def __init__(self, channels: int, embedding: int) -> None:
        super().__init__()
        self.norm = nn.InstanceNorm3d(channels, affine=False)
        self.film = nn.Linear(embedding, 2 * channels)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.film(embedding).view(x.shape[0], 2, x.shape[1], 1, 1, 1).unbind(1)
        return (1.0 + gamma) * self.norm(x) + beta


class ConvBlock(nn.Module):
    """3x3x3 convolution (optionally stride 2) -> CIN(λ) -> LeakyReLU."""

    def __init__(self, cin: int, cout: int, embedding: int, stride: int = 1, negative_slope: float = 0.2) -> None:
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, kernel_size=3, stride=stride, padding=1)
        self.norm = ConditionalInstanceNorm(cout, embedding)
        self.negative_slope = negative_slope

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(self.norm(self.conv(x), embedding), self.negative_slope)


class EncoderBlock(nn.Module):
    """3x3x3 convolution (optionally stride 2) -> instance norm -> LeakyReLU; λ-free (cacheable)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, negative_slope: float = 0.2) -> None:
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, kernel_size=3, stride=stride, padding=1)
        self.norm = nn.InstanceNorm3d(cout, affine=True)
        self.negative_slope = negative_slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(self.norm(self.conv(x)), self.negative_slope)


class EncodedPair(NamedTuple):
    """λ-free encoder features of one image pair (:meth:`RegistrationNetwork.encode`).

    Attributes:
        skips: feature maps of every level, full resolution first, on the padded grid.
        padding: ``F.pad``-order padding applied to the input (:func:`pad_to_multiple`).
        shape: (Z, Y, X) of the unpadded input.
    """

    skips: list
    padding: tuple
    shape: tuple


# --------------------------------------------------------------------------------- network
class RegistrationNetwork(nn.Module):
    """λ-conditioned U-Net: (fixed, moving, λ) -> (velocity, displacement, λ(x)); see the module docstring.

    Args:
        config: architecture; a :class:`NetworkConfig` or its dict form (as stored in checkpoints).
    """

    def __init__(self, config: Union[NetworkConfig, dict, None] = None) -> None:
        super().__init__()
        if config is None:
            config = NetworkConfig()
        elif isinstance(config, dict):
            config = NetworkConfig.from_dict(config)
        self.config = config
        emb = config.condition_features
        slope = config.negative_slope
        self.condition = nn.Sequential(nn.Linear(1, emb), nn.ReLU(), nn.Linear(emb, emb), nn.ReLU())
        enc = config.encoder_features
        self.encoder = nn.ModuleList([EncoderBlock(2, enc[0], 1, slope)])
        for i in range(1, len(enc)):
            self.encoder.append(EncoderBlock(enc[i - 1], enc[i], 2, slope))
        self.decoder = nn.ModuleList()
        below = enc[-1]
        for i, cout in enumerate(config.decoder_features):
            skip = enc[len(enc) - 2 - i]
            self.decoder.append(ConvBlock(below + skip, cout, emb, 1, slope))
            below = cout
        self.head = ConvBlock(below, config.head_features, emb, 1, slope)
        self.velocity_head = nn.Conv3d(config.head_features, 3, kernel_size=3, padding=1)
        self.weight_head = nn.Conv3d(config.head_features, 1, kernel_size=3, padding=1)
        # Start near the identity transform (VoxelMorph's init) and at λ(x) = weight_map_init.
        nn.init.normal_(self.velocity_head.weight, std=1e-5)
        nn.init.zeros_(self.velocity_head.bias)
        nn.init.normal_(self.weight_head.weight, std=1e-5)
        p = config.weight_map_init
        nn.init.constant_(self.weight_head.bias, math.log(p / (1.0 - p)))

    def parameter_count(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters())

    @staticmethod
    def _check_lambda(lam, batch: int, device, dtype) -> torch.Tensor:
        lam = torch.as_tensor(lam, dtype=dtype, device=device).reshape(-1)
        if lam.numel() == 1 and batch > 1:
            lam = lam.expand(batch)
        if lam.numel() != batch:
            raise ValueError(f"RegistrationNetwork 'lam' must be a scalar or have shape ({batch},), got {tuple(lam.shape)}")
        if not bool(torch.isfinite(lam).all()) or float(lam.min()) < 0.0 or float(lam.max()) > 1.0:
            raise ValueError(f"RegistrationNetwork 'lam' must be in [0, 1], got {lam.tolist()}")
        return lam

    def _check_pair(self, fixed: torch.Tensor, moving: torch.Tensor) -> None:
        if fixed.dim() != 5 or fixed.shape[1] != 1:
            raise ValueError(f"RegistrationNetwork 'fixed' must have shape (N, 1, Z, Y, X), got {tuple(fixed.shape)}")
        if moving.shape != fixed.shape:
            raise ValueError(
                f"RegistrationNetwork 'moving' must have the fixed image's shape {tuple(fixed.shape)}, got {tuple(moving.shape)}"
            )

    def encode(self, fixed: torch.Tensor, moving: torch.Tensor) -> EncodedPair:
        """λ-free encoder pass of a pair (cache it: every λ reuses it through :meth:`decode`).

        Args:
            fixed, moving: (N, 1, Z, Y, X) images on the same grid, intensities about [0, 1].

        Raises:
            ValueError: on shape mismatch.
        """
        self._check_pair(fixed, moving)
        x, padding = pad_to_multiple(torch.cat([fixed, moving], dim=1), self.config.divisor)
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
        return EncodedPair(skips, padding, tuple(fixed.shape[2:]))

    def decode_coarse(self, encoded: EncodedPair, lam) -> NetworkOutput:
        """λ-conditioned decoder and heads, fields left on the output level of the *padded* grid.

        The tensors span the padded input's extent with ``2 ** output_level`` times fewer voxels
        per axis; the velocity and displacement are in that extent's normalized units (which, with
        ``align_corners=True``, are the same at any resolution). Callers that pad the input
        themselves to multiples of :attr:`NetworkConfig.divisor` (no internal padding) can sample
        these directly at any point of the input grid's normalized frame, the fastest path for a
        slider move. Use :meth:`decode` for fields on the input grid.
        """
        skips = list(encoded.skips)
        x = skips[-1]
        lam = self._check_lambda(lam, x.shape[0], x.device, x.dtype)
        embedding = self.condition(lam.unsqueeze(1))
        level = len(skips) - 1
        for block in self.decoder:
            level -= 1
            skip = skips[level]
            x = F.interpolate(x, size=skip.shape[2:], mode="trilinear", align_corners=ALIGN_CORNERS)
            x = block(torch.cat([x, skip], dim=1), embedding)
        x = self.head(x, embedding)
        velocity = self.velocity_head(x)
        weight_map = torch.sigmoid(self.weight_head(x))
        # Integrate on the coarse padded grid: room for the flow at the border, and 8x fewer voxels.
        displacement = integrate_svf(velocity, self.config.integration_steps)
        return NetworkOutput(velocity, displacement, weight_map)

    def decode(self, encoded: EncodedPair, lam) -> NetworkOutput:
        """λ-conditioned decoder and heads on cached encoder features; see :meth:`forward`."""
        velocity, displacement, weight_map = self.decode_coarse(encoded, lam)
        padded = encoded.skips[0].shape[2:]
        if tuple(velocity.shape[2:]) != tuple(padded):
            up = dict(size=padded, mode="trilinear", align_corners=ALIGN_CORNERS)
            velocity, displacement, weight_map = (F.interpolate(t, **up) for t in (velocity, displacement, weight_map))
        # Crop the padding and express the fields in the input grid's normalized units.
        shape, padding = encoded.shape, encoded.padding
        velocity = rescale_normalized_field(crop_padding(velocity, padding), padded, shape)
        displacement = rescale_normalized_field(crop_padding(displacement, padding), padded, shape)
        return NetworkOutput(velocity, displacement, crop_padding(weight_map, padding))

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor, lam) -> NetworkOutput:
        """Predict the registration of ``moving`` onto ``fixed`` at regularization weight ``lam``.

        Same as ``decode(encode(fixed, moving), lam)``.

        Args:
            fixed: (N, 1, Z, Y, X) fixed image, intensities about [0, 1].
            moving: (N, 1, Z, Y, X) moving image on the same grid (already affinely aligned).
            lam: λ in [0, 1], a float or a tensor of shape () or (N,).

        Returns:
            :class:`NetworkOutput` on the input grid (any Z, Y, X >= 1; padding is internal).

        Raises:
            ValueError: on shape mismatch or λ outside [0, 1].
        """
        self._check_pair(fixed, moving)
        self._check_lambda(lam, fixed.shape[0], fixed.device, fixed.dtype)
        return self.decode(self.encode(fixed, moving), lam)
