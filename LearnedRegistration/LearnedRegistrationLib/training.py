"""Training objective of the λ-conditioned network (shared by ``scripts/train.py`` and the tests).

For a synthesized pair (:mod:`synthesis`) and a λ drawn per pair (:func:`sample_lambda`):

``loss = (1 - λ) · (1 - softDice(moving_onehot ∘ exp(v), fixed_onehot))
        + λ · κ · mean_x λ(x) |∇v|²  +  γ · BetaNLL(λ(x); α, β)``

- soft Dice over the foreground label channels (SynthMorph, Hoffmann et al., IEEE TMI 2022);
- ``v`` the predicted velocity in mm along the grid axes, ``|∇v|²`` per mm² summed over components
  and directions (:func:`regularization.weighted_diffusion`), weighted per voxel by the predicted
  map λ(x) (Chen et al., spatially varying regularization), by default divided by its image mean
  (:attr:`LossConfig.normalize_weight_map`), κ a fixed calibration;
- a Beta(α, β) prior on λ(x) (:func:`regularization.beta_prior_nll`) that keeps the map away from
  the trivial 0 (no regularization anywhere);
- λ ∈ [0, 1] the HyperMorph weight (Hoopes et al., IPMI 2021), sampled with extra mass at both ends.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple, Sequence

import torch

from .network import NetworkOutput, RegistrationNetwork
from .regularization import beta_prior_nll, weighted_diffusion
from .synthesis import SynthesizedPair, one_hot
from .transforms import warp


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


def registration_loss(
    output: NetworkOutput,
    pair: SynthesizedPair,
    lam: torch.Tensor,
    label_values: Sequence[int],
    spacing_mm: float,
    config: LossConfig = LossConfig(),
) -> LossTerms:
    """The training loss (module docstring) for one batch; ``lam`` (N,), grid spacing ``spacing_mm`` (isotropic)."""
    fixed_onehot = one_hot(pair.fixed_labels, label_values)
    moving_onehot = one_hot(pair.moving_labels, label_values)
    warped = warp(moving_onehot, output.displacement)
    dice = soft_dice(warped, fixed_onehot)  # (N,)
    shape = output.velocity.shape[2:]
    unit = torch.tensor([spacing_mm * (n - 1) / 2.0 for n in reversed(shape)], device=lam.device, dtype=output.velocity.dtype)
    velocity_mm = output.velocity * unit.view(1, 3, 1, 1, 1)
    spacing = (spacing_mm,) * 3
    weight = output.weight_map
    if config.normalize_weight_map:
        weight = weight / weight.mean(dim=(1, 2, 3, 4), keepdim=True).clamp_min(1e-6)
    reg = torch.stack([weighted_diffusion(velocity_mm[i : i + 1], spacing, weight[i : i + 1]) for i in range(lam.shape[0])])
    prior = beta_prior_nll(output.weight_map, config.prior_alpha, config.prior_beta)
    loss = ((1 - lam) * (1 - dice) + lam * config.kappa * reg).mean() + config.prior_weight * prior
    return LossTerms(loss, dice.mean(), reg.mean(), prior)


def train_step(
    network: RegistrationNetwork,
    optimizer: torch.optim.Optimizer,
    pair: SynthesizedPair,
    lam: torch.Tensor,
    label_values: Sequence[int],
    spacing_mm: float,
    config: LossConfig = LossConfig(),
) -> LossTerms:
    """One optimizer step on ``pair``; returns the detached loss terms."""
    network.train()
    optimizer.zero_grad(set_to_none=True)
    output = network(pair.fixed, pair.moving, lam)
    terms = registration_loss(output, pair, lam, label_values, spacing_mm, config)
    terms.loss.backward()
    optimizer.step()
    return LossTerms(*(t.detach() for t in terms))
