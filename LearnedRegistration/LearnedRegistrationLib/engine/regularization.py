"""Regularization of displacement / velocity fields, spacing-aware (derivatives per mm).

Every function takes ``field_mm: (N, 3, Z, Y, X)``, a vector field in mm with components along
the grid's (I, J, K) axes, and ``spacing`` in mm along (I, J, K); it returns a scalar tensor
(mean over voxels and batch). Because the direction matrix is orthonormal, these energies equal
their values in RAS. Pure functions; no state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch

from .filters import jacobian_determinant, spatial_gradient


def _check_field(name: str, field_mm: torch.Tensor) -> None:
    if field_mm.dim() != 5 or field_mm.shape[1] != 3:
        raise ValueError(f"{name}() 'field_mm' must have shape (N, 3, Z, Y, X), got {tuple(field_mm.shape)}")


def diffusion(field_mm: torch.Tensor, spacing: Sequence[float]) -> torch.Tensor:
    """Diffusion (membrane) energy ``mean_x sum_{c,d} (du_c/dx_d)^2`` (dimensionless)."""
    _check_field("diffusion", field_mm)
    g = spatial_gradient(field_mm, spacing)
    return (g * g).sum(dim=(1, 2)).mean()


def weighted_diffusion(field_mm: torch.Tensor, spacing: Sequence[float], weight: torch.Tensor) -> torch.Tensor:
    """λ(x)-weighted diffusion ``mean_x λ(x) sum_{c,d} (du_c/dx_d)^2``.

    The spatially varying regularization of Chen et al. ("Unsupervised learning of spatially
    varying regularization for diffeomorphic image registration"): ``weight`` is the per-voxel map
    λ(x), shape (N, 1, Z, Y, X) or broadcastable to it.
    """
    _check_field("weighted_diffusion", field_mm)
    g = spatial_gradient(field_mm, spacing)
    energy = (g * g).sum(dim=(1, 2))  # (N, Z, Y, X)
    if weight.dim() == 5:
        weight = weight[:, 0]
    return (weight * energy).mean()


def bending_energy(field_mm: torch.Tensor, spacing: Sequence[float]) -> torch.Tensor:
    """Bending energy ``mean_x sum_c sum_{d,e} (d2u_c/dx_d dx_e)^2`` (per mm^2), Rueckert et al. 1999."""
    _check_field("bending_energy", field_mm)
    n, c = field_mm.shape[:2]
    g = spatial_gradient(field_mm, spacing)  # (N, 3, 3, Z, Y, X)
    h = spatial_gradient(g.reshape(n, c * 3, *field_mm.shape[2:]), spacing)  # (N, 9, 3, ...)
    return (h * h).sum(dim=(1, 2)).mean()


def negative_jacobian_penalty(field_mm: torch.Tensor, spacing: Sequence[float], threshold: float = 0.0) -> torch.Tensor:
    """Penalty on folding: ``mean_x relu(threshold - J(x))^2`` where ``J = det(I + du/dx)``.

    ``field_mm`` is a displacement (not a velocity) here.
    """
    _check_field("negative_jacobian_penalty", field_mm)
    jac = jacobian_determinant(field_mm, spacing)
    return torch.relu(threshold - jac).pow(2).mean()


def beta_prior_nll(weight: torch.Tensor, alpha: float, beta: float, eps: float = 1e-6) -> torch.Tensor:
    """Negative log of a Beta(alpha, beta) prior on a per-voxel weight map in (0, 1), up to a constant.

    ``mean_x -[(alpha - 1) log w + (beta - 1) log(1 - w)]`` (Chen et al., spatially varying
    regularization, keeps λ(x) away from the trivial solutions 0 and 1).
    """
    w = weight.clamp(eps, 1 - eps)
    return -((alpha - 1) * torch.log(w) + (beta - 1) * torch.log1p(-w)).mean()


REGULARIZERS = ("diffusion", "bending")


def regularization_loss(
    name: str, field_mm: torch.Tensor, spacing: Sequence[float], weight: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Dispatch by name ("diffusion" or "bending"); with ``weight`` the diffusion is λ(x)-weighted.

    Raises:
        ValueError: for an unknown name, or a ``weight`` map with "bending" (no weighted form).
    """
    if name == "diffusion":
        return diffusion(field_mm, spacing) if weight is None else weighted_diffusion(field_mm, spacing, weight)
    if name == "bending":
        if weight is not None:
            raise ValueError("a λ(x) weight map is only supported with the diffusion regularizer")
        return bending_energy(field_mm, spacing)
    raise ValueError(f"unknown regularizer {name!r}; choose one of {', '.join(REGULARIZERS)}")
