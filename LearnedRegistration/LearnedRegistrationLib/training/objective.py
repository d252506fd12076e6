"""Training objective of the λ-conditioned network (shared by ``scripts/train.py`` and the tests).

For a synthesized pair (:mod:`synthesis`) and a λ drawn per pair (:func:`sample_lambda`):

``loss = (1 - λ) · (1 - softDice(moving_onehot ∘ exp(v), fixed_onehot))
        + λ · κ · mean_x λ(x) |∇v|²  +  γ · BetaNLL(λ(x); α, β)``

- soft Dice over the foreground label channels (SynthMorph, Hoffmann et al., IEEE TMI 2022),
  evaluated on every ``dice_stride``-th voxel along each axis from a random offset per step (an
  unbiased estimate of the full-grid Dice at ``1 / stride³`` of the cost of warping ~30 one-hot
  channels, which otherwise dominates a CPU training step);
- ``v`` the predicted velocity in mm along the grid axes, ``|∇v|²`` per mm² summed over components
  and directions (:func:`engine.regularization.weighted_diffusion`), weighted per voxel by the predicted
  map λ(x) (Chen et al., spatially varying regularization), by default divided by its image mean
  (:attr:`LossConfig.normalize_weight_map`), κ a fixed calibration;
- a Beta(α, β) prior on λ(x) (:func:`engine.regularization.beta_prior_nll`) that keeps the map away from
  the trivial 0 (no regularization anywhere);
- λ ∈ [0, 1] the HyperMorph weight (Hoopes et al., IPMI 2021), sampled with extra mass at both ends.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import NamedTuple, Optional

import torch

from ..engine.grid import mm_per_normalized_unit
from ..engine.regularization import beta_prior_nll, weighted_diffusion
from ..engine.transforms import grid_sample, identity_grid, per_channel
from ..learned.network import NetworkOutput, RegistrationNetwork
from .synthesis import SynthesizedPair, one_hot


@dataclass(frozen=True)
class LossConfig:
    """Weights of the training loss.

    Attributes:
        kappa: κ, scale of the regularization term against ``1 - Dice`` (dimensionless).
        prior_weight: γ, weight of the Beta prior on λ(x).
        prior_alpha, prior_beta: Beta prior parameters (2, 2: mode 0.5, vanishing at 0 and 1).
        endpoint_probability: chance of λ = 0 and, separately, of λ = 1 (HyperMorph: about 20 %
            of the samples at the ends together).
        normalize_weight_map: divide λ(x) by its mean over the image in the regularization term,
            so the map only *redistributes* the regularization and the global λ keeps its meaning
            (the slider). Without it the network can lower the term by shrinking λ(x) everywhere,
            held back only by the prior (λ(x) ≈ γ / (λκ|∇v|²) where the energy is high).
    """

    kappa: float = 1.0
    prior_weight: float = 0.01
    prior_alpha: float = 2.0
    prior_beta: float = 2.0
    endpoint_probability: float = 0.1
    normalize_weight_map: bool = True
    dice_stride: int = 2

    def to_dict(self) -> dict:
        return asdict(self)


class LossTerms(NamedTuple):
    """Scalar tensors: total loss and its parts (batch means)."""

    loss: torch.Tensor
    dice: torch.Tensor
    regularization: torch.Tensor
    prior: torch.Tensor


def sample_lambda(batch: int, generator: torch.Generator, endpoint_probability: float = 0.1, device=None) -> torch.Tensor:
    """λ per pair, shape (N,): 0 and 1 each with ``endpoint_probability``, else uniform in (0, 1)."""
    if not 0.0 <= endpoint_probability <= 0.5:
        raise ValueError(f"sample_lambda() 'endpoint_probability' must be in [0, 0.5], got {endpoint_probability}")
    device = torch.device(device or "cpu")
    u = torch.rand(batch, generator=generator, device=device)
    lam = torch.rand(batch, generator=generator, device=device)
    lam = torch.where(u < endpoint_probability, torch.zeros_like(lam), lam)
    return torch.where(u > 1.0 - endpoint_probability, torch.ones_like(lam), lam)


def soft_dice(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Mean soft Dice over channels 1.. (channel 0 = background is left out), per batch element.

    Args:
        a, b: (N, K + 1, Z, Y, X) one-hot or soft label maps.

    Returns:
        (N,) Dice in [0, 1]; channels empty in both maps count as 1.
    """
    if a.shape != b.shape or a.dim() != 5 or a.shape[1] < 2:
        raise ValueError(f"soft_dice() needs two (N, K + 1, Z, Y, X) maps of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    dims = (2, 3, 4)
    inter = (a[:, 1:] * b[:, 1:]).sum(dims)
    total = a[:, 1:].sum(dims) + b[:, 1:].sum(dims)
    return ((2 * inter + eps) / (total + eps)).mean(1)


def warped_labels_at(
    moving_onehot: torch.Tensor, displacement: torch.Tensor, stride: int = 1, offset: Sequence[int] = (0, 0, 0)
) -> torch.Tensor:
    """Warp soft labels, but only at the voxels ``offset + stride · k`` of each axis.

    Args:
        moving_onehot: (N, C, Z, Y, X) soft labels on the fixed grid's extent.
        displacement: (N, 3, Z, Y, X) normalized resampling displacement (x, y, z) on that grid.
        stride: keep every ``stride``-th voxel along each axis.
        offset: (z, y, x) first voxel kept, each in ``[0, stride)``.

    Returns:
        (N, C, Z', Y', X') ``moving(p + u(p))`` at the kept voxels ``p``.
    """
    oz, oy, ox = (int(o) for o in offset)
    pick = (slice(oz, None, stride), slice(oy, None, stride), slice(ox, None, stride))
    points = identity_grid(displacement.shape[2:], displacement.device, displacement.dtype)[(slice(None), *pick)]
    points = points + displacement[(slice(None), slice(None), *pick)].permute(0, 2, 3, 4, 1)
    return grid_sample(moving_onehot, points, "linear", padding_mode="zeros")


def registration_loss(
    output: NetworkOutput,
    pair: SynthesizedPair,
    lam: torch.Tensor,
    label_values: Sequence[int],
    spacing_mm: float,
    config: LossConfig = LossConfig(),
    dice_offset: Sequence[int] = (0, 0, 0),
) -> LossTerms:
    """The training loss (module docstring) for one batch; ``lam`` (N,), grid spacing ``spacing_mm`` (isotropic).

    ``dice_offset`` (z, y, x), each in ``[0, config.dice_stride)``: first voxel of the Dice subsample.
    """
    stride = int(config.dice_stride)
    oz, oy, ox = (int(o) for o in dice_offset)
    fixed_onehot = one_hot(pair.fixed_labels[:, :, oz::stride, oy::stride, ox::stride], label_values)
    moving_onehot = one_hot(pair.moving_labels, label_values)
    warped = warped_labels_at(moving_onehot, output.displacement, stride, (oz, oy, ox))
    dice = soft_dice(warped, fixed_onehot)  # (N,)
    unit = per_channel(mm_per_normalized_unit(output.velocity.shape[2:], spacing_mm), lam.device, output.velocity.dtype)
    velocity_mm = output.velocity * unit
    spacing = (spacing_mm,) * 3
    weight = output.weight_map
    if config.normalize_weight_map:
        weight = weight / weight.mean(dim=(1, 2, 3, 4), keepdim=True).clamp_min(1e-6)
    reg = torch.stack([weighted_diffusion(velocity_mm[i : i + 1], spacing, weight[i : i + 1]) for i in range(lam.shape[0])])
    prior = beta_prior_nll(output.weight_map, config.prior_alpha, config.prior_beta)
    loss = ((1 - lam) * (1 - dice) + lam * config.kappa * reg).mean() + config.prior_weight * prior
    return LossTerms(loss, dice.mean(), reg.mean(), prior)


def network_output(
    network: RegistrationNetwork, pair: SynthesizedPair, lam: torch.Tensor, autocast_dtype: Optional[torch.dtype] = None
) -> NetworkOutput:
    """The network's prediction for a training batch, ``network(pair.fixed, pair.moving, lam)``.

    With ``autocast_dtype`` (``torch.bfloat16``) the λ-free encoder runs under ``torch.autocast`` on
    the images' device and its features are cast back to float32 for the decoder. The decoder stays
    in float32 because it also integrates the velocity (scaling and squaring inside
    :meth:`RegistrationNetwork.decode_coarse`): under autocast the velocity head's output would be
    bfloat16, and :func:`engine.transforms.warp` builds its sampling grid in the displacement's dtype,
    so the positions would be rounded to bfloat16 (8 significant bits: steps of 2⁻⁸ near ±1, about a
    fifth of a voxel on a 112-voxel axis) at every squaring. The loss is computed from these float32
    outputs.

    Returns:
        :class:`NetworkOutput`, float32, on the input grid.
    """
    if autocast_dtype is None:
        return network(pair.fixed, pair.moving, lam)
    with torch.autocast(pair.fixed.device.type, dtype=autocast_dtype):
        encoded = network.encode(pair.fixed, pair.moving)
    encoded = encoded._replace(skips=[s.float() for s in encoded.skips])
    return network.decode(encoded, lam)


def train_step(
    network: RegistrationNetwork,
    optimizer: torch.optim.Optimizer,
    pair: SynthesizedPair,
    lam: torch.Tensor,
    label_values: Sequence[int],
    spacing_mm: float,
    config: LossConfig = LossConfig(),
    dice_offset: Sequence[int] = (0, 0, 0),
    autocast_dtype: Optional[torch.dtype] = None,
) -> LossTerms:
    """One optimizer step on ``pair``; returns the detached loss terms. ``autocast_dtype``: see
    :func:`network_output` (None = float32 throughout)."""
    network.train()
    optimizer.zero_grad(set_to_none=True)
    output = network_output(network, pair, lam, autocast_dtype)
    terms = registration_loss(output, pair, lam, label_values, spacing_mm, config, dice_offset)
    terms.loss.backward()
    optimizer.step()
    return LossTerms(*(t.detach() for t in terms))
