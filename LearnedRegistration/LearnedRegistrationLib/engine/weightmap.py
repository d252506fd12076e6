"""A per-pair spatially varying regularization weight λ(x), optimized with the deformation.

After Chen et al., "Unsupervised learning of spatially varying regularization for diffeomorphic
image registration" (MedIA 2025, arXiv 2412.17982): the diffusion regularizer is weighted voxel by
voxel by a map λ(x) ∈ (0, 1), and the map is learned with the deformation under a Beta hyperprior
that keeps it away from the trivial 0 and 1. Chen et al. predict the map with a network; here it is
optimized for one pair, as the deformation is, and made smooth by a penalty on its gradient:

``loss += λ·κ·Ē · (c_prior · mean_x BetaNLL(λ(x); α, β) + c_smooth · mean_x |∇ logit λ(x)|²)``

where Ē is the current mean diffusion energy of the velocity *without* the map, detached: the
penalties scale with the term they balance (so the same constants hold for every similarity, pair
and λ) but not with the map itself (scaling them with the weighted term lets the map collapse to 0
where the energy is high, which a first version did: folding rose to 0.3 % on OASIS). At a voxel
the map settles where ``2 e(x) / Ē = c_prior (1/λ(x) - 1/(1 - λ(x)))`` (Beta(2, 2)): near the
prior's mode 0.5 where the velocity barely varies, lower where it varies most. The map enters the
regularizer divided by the prior's mode (so λ(x) = 0.5 means the uniform weight and the global λ
keeps its meaning); the effective weight ``λ · λ(x) / mode`` is the ``lambda_map`` output.

Parameterization: ``λ(x) = sigmoid(θ(x))`` with θ on a grid of ``spacing_mm`` spanning the fixed
image (trilinearly up-sampled to each level's velocity grid), so λ(x) is smooth by construction
and cheap to optimize.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .filters import spatial_gradient
from .grid import ImageGrid
from .regularization import beta_prior_nll
from .transforms import resize_field


@dataclass(frozen=True)
class WeightMapOptions:
    """Settings of the learned λ(x).

    Attributes:
        spacing_mm: spacing of the map's parameter grid (mm).
        prior_alpha, prior_beta: Beta prior (2, 2: mode 0.5, vanishing at 0 and 1).
        prior_weight: c_prior, relative to the regularization term (module docstring).
        smoothness_weight: c_smooth, relative to the regularization term, on the logit's gradient per mm.
        learning_rate: Adam step of the logit θ.
    """

    spacing_mm: float = 8.0
    prior_alpha: float = 2.0
    prior_beta: float = 2.0
    prior_weight: float = 2.0
    smoothness_weight: float = 50.0
    learning_rate: float = 0.05
    normalize_by_mean: bool = False

    def validated(self) -> WeightMapOptions:
        if not self.spacing_mm > 0 or min(self.prior_alpha, self.prior_beta) < 1 or min(self.prior_weight, self.smoothness_weight) < 0:
            raise ValueError(f"invalid λ(x) map options: {self}")
        return self


class WeightMap:
    """The optimizable map λ(x) = sigmoid(θ(x)) on a coarse grid of the fixed image (module docstring).

    Args:
        fixed_grid: the fixed image's grid (the map spans its extent).
        options: :class:`WeightMapOptions`.
        device: where θ lives.
    """

    def __init__(self, fixed_grid: ImageGrid, options: WeightMapOptions, device) -> None:
        self.options = options.validated()
        self.grid = fixed_grid.with_spacing(options.spacing_mm)
        self.logit = torch.zeros((1, 1, *self.grid.shape), dtype=torch.float32, device=device, requires_grad=True)

    def values(self) -> torch.Tensor:
        """λ(x) ∈ (0, 1) on the map's grid, (1, 1, z, y, x)."""
        return torch.sigmoid(self.logit)

    def normalized(self, shape) -> torch.Tensor:
        """λ(x) / m on a grid of ``shape`` (Z, Y, X) with the fixed image's extent, (1, 1, Z, Y, X);
        m is the mean of λ(x) or the prior's mode."""
        values = resize_field(self.values(), shape)
        if self.options.normalize_by_mean:
            return values / values.mean().clamp_min(1e-6)
        a, b = self.options.prior_alpha, self.options.prior_beta
        return values / ((a - 1.0) / (a + b - 2.0) if a + b > 2.0 else 0.5)

    def penalty(self, energy: torch.Tensor, lam: float, kappa: float) -> torch.Tensor:
        """The Beta prior and the smoothness penalty, scaled by ``λ · κ · energy`` (the mean diffusion
        energy of the velocity without the map; detached)."""
        scale = float(lam) * kappa * energy.detach()
        values = self.values()
        prior = beta_prior_nll(values, self.options.prior_alpha, self.options.prior_beta)
        gradient = spatial_gradient(self.logit, self.grid.spacing)
        smooth = (gradient * gradient).sum(dim=(1, 2)).mean()
        return scale * (self.options.prior_weight * prior + self.options.smoothness_weight * smooth)
