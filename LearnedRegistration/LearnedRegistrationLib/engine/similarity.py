"""Image similarity losses (lower is better), each with an optional fixed-image mask.

All take ``fixed`` and ``warped`` of shape (N, 1, Z, Y, X) on the same grid and an optional
``mask`` of the same shape (weights in [0, 1]; voxels with 0 do not count), and return a scalar
tensor (mean over the batch). Pure functions; :func:`similarity_loss` picks one by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch

from .common import SIMILARITIES
from .filters import box_mean, spatial_gradient

#: κ: per-similarity scale of the regularization term, so that one λ means about the same
#: smoothness whichever similarity is chosen (the losses have different ranges). Calibrated on the
#: OASIS pair (scripts/benchmark.py, its λ sweep): with MSE on [0, 1]-normalized intensities the default
#: λ = 0.25 gives Dice 0.75 with < 0.01 % folding; the ratio of the two terms, λκ / (1 - λ), runs
#: from 0 (λ = 0) through 0.004 (default) to 0.1 (λ = 0.9) and infinity (λ = 1, no deformation).
REGULARIZATION_SCALE = {"mse": 0.0122, "lncc": 0.3, "ncc": 0.3, "ngf": 0.3, "mi": 0.3}


def _check_pair(name: str, fixed: torch.Tensor, warped: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
    if fixed.dim() != 5 or fixed.shape[1] != 1:
        raise ValueError(f"{name}() 'fixed' must have shape (N, 1, Z, Y, X), got {tuple(fixed.shape)}")
    if warped.shape != fixed.shape:
        raise ValueError(f"{name}() 'warped' must have shape {tuple(fixed.shape)}, got {tuple(warped.shape)}")
    if mask is not None and mask.shape != fixed.shape:
        raise ValueError(f"{name}() 'mask' must have shape {tuple(fixed.shape)}, got {tuple(mask.shape)}")


def _masked_mean(values: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    if mask is None:
        return values.mean()
    return (values * mask).sum() / mask.sum().clamp_min(1e-6)


def mse(fixed: torch.Tensor, warped: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean squared intensity difference (units of intensity squared)."""
    _check_pair("mse", fixed, warped, mask)
    return _masked_mean((fixed - warped) ** 2, mask)


def ncc(fixed: torch.Tensor, warped: torch.Tensor, mask: Optional[torch.Tensor] = None, eps: float = 1e-8) -> torch.Tensor:
    """Global normalized cross-correlation loss ``1 - NCC`` in [0, 2] (0 = perfectly correlated)."""
    _check_pair("ncc", fixed, warped, mask)
    w = torch.ones_like(fixed) if mask is None else mask
    dims = (1, 2, 3, 4)
    total = w.sum(dims).clamp_min(1e-6)
    mf = (w * fixed).sum(dims) / total
    mw = (w * warped).sum(dims) / total
    f0 = fixed - mf.view(-1, 1, 1, 1, 1)
    w0 = warped - mw.view(-1, 1, 1, 1, 1)
    cov = (w * f0 * w0).sum(dims)
    var_f = (w * f0 * f0).sum(dims)
    var_w = (w * w0 * w0).sum(dims)
    return (1.0 - cov / torch.sqrt(var_f * var_w + eps)).mean()


def lncc(
    fixed: torch.Tensor,
    warped: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    window_vox: Sequence[int] = (9, 9, 9),
    eps: float = 1e-5,
) -> torch.Tensor:
    """Local (windowed) squared normalized cross-correlation loss ``1 - mean(cc^2)`` in [0, 1].

    ``cc^2 = cov^2 / (var_f var_w)`` over a box window, as in VoxelMorph (Balakrishnan et al.,
    IEEE TMI 2019) and ANTs' CC metric, with ``eps`` (intensity squared) kept so that identical
    images are the optimum: ``cc^2 = (|cov| + eps)^2 / ((var_f + eps)(var_w + eps)) <= 1`` (by
    Cauchy-Schwarz and ``2|cov| <= var_f + var_w``), with equality for an image and itself.
    VoxelMorph's ``cov^2 / (var_f var_w + eps)`` instead rises with the warped image's local
    variance, so that registering an image to itself moved it (MRBrainTumor1: 0.6 mm). The window
    is given in voxels along (X, Y, Z); callers convert a window in mm with the grid spacing.
    """
    _check_pair("lncc", fixed, warped, mask)
    stacked = torch.cat([fixed, warped, fixed * fixed, warped * warped, fixed * warped], dim=1)
    m = box_mean(stacked, window_vox)
    mf, mw, mff, mww, mfw = m.unbind(dim=1)
    cov = mfw - mf * mw
    var_f = (mff - mf * mf).clamp_min(0)
    var_w = (mww - mw * mw).clamp_min(0)
    cc = (cov.abs() + eps) ** 2 / ((var_f + eps) * (var_w + eps))
    return 1.0 - _masked_mean(cc.unsqueeze(1), mask)


def ngf(
    fixed: torch.Tensor,
    warped: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    eps: Optional[float] = None,
) -> torch.Tensor:
    """Normalized gradient fields loss ``1 - mean(r^2)`` in [0, 1] (Haber & Modersitzki, 2006).

    ``r = (|grad F . grad W| + e_F e_W) / (sqrt(|grad F|^2 + e_F^2) sqrt(|grad W|^2 + e_W^2))``: the
    cosine between the gradients extended by their edge parameter ``e`` (intensity per mm; by
    default the mean gradient magnitude of each image, which suppresses noise-level edges), with
    either sign of the gradients (multi-modal pairs). Where the gradients are far above ``e`` it is
    Haber and Modersitzki's ``n_F . n_W``; unlike their ``(n_F . n_W)^2`` (whose ``n`` grows with
    the edge's strength, so that sharpening the warped image's edges lowers the loss), ``r <= 1``
    with equality for an image and itself, or a rescaled copy: identical images are the optimum.
    """
    _check_pair("ngf", fixed, warped, mask)

    def gradient(img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = spatial_gradient(img, spacing)[:, 0]  # (N, 3, Z, Y, X)
        norm2 = (g * g).sum(1, keepdim=True)
        e = torch.as_tensor(eps, dtype=img.dtype, device=img.device) if eps is not None else norm2.detach().sqrt().mean().clamp_min(1e-6)
        return g, torch.sqrt(norm2 + e * e), e

    g_f, length_f, e_f = gradient(fixed)
    g_w, length_w, e_w = gradient(warped)
    r = ((g_f * g_w).sum(1, keepdim=True).abs() + e_f * e_w) / (length_f * length_w)
    return 1.0 - _masked_mean(r * r, mask)


def mutual_information(
    fixed: torch.Tensor,
    warped: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    bins: int = 32,
    sigma_bins: float = 0.5,
    max_samples: int = 200_000,
    intensity_range: Optional[tuple[float, float]] = None,
) -> torch.Tensor:
    """Negative normalized mutual information ``-(H(F) + H(W)) / H(F, W)`` in [-2, -1].

    Differentiable Parzen-window joint histogram with Gaussian kernels (Mattes et al., IEEE TMI
    2003; normalized form of Studholme et al., 1999). Intensities are rescaled to the bin range
    with each image's own min/max (treated as constants), or with ``intensity_range`` (lo, hi) for
    both when given; at most ``max_samples`` voxels (a fixed, deterministic stride)
    enter the histogram to bound memory.
    """
    _check_pair("mutual_information", fixed, warped, mask)
    losses = []
    for b in range(fixed.shape[0]):
        f = fixed[b].reshape(-1)
        w = warped[b].reshape(-1)
        wt = torch.ones_like(f) if mask is None else mask[b].reshape(-1)
        stride = max(1, f.numel() // max_samples)
        f, w, wt = f[::stride], w[::stride], wt[::stride]

        def to_bins(x: torch.Tensor) -> torch.Tensor:
            lo, hi = intensity_range if intensity_range is not None else (x.detach().min(), x.detach().max())
            lo, hi = torch.as_tensor(lo, dtype=x.dtype), torch.as_tensor(hi, dtype=x.dtype)
            return (x - lo) / (hi - lo).clamp_min(1e-6) * (bins - 1)

        centres = torch.arange(bins, dtype=f.dtype, device=f.device)
        pf = torch.exp(-0.5 * ((to_bins(f)[:, None] - centres) / sigma_bins) ** 2)
        pw = torch.exp(-0.5 * ((to_bins(w)[:, None] - centres) / sigma_bins) ** 2)
        pf = pf / pf.sum(1, keepdim=True) * wt[:, None]
        pw = pw / pw.sum(1, keepdim=True)
        joint = pf.T @ pw
        joint = joint / joint.sum().clamp_min(1e-12)
        p_f, p_w = joint.sum(1), joint.sum(0)
        tiny = 1e-12
        h_f = -(p_f * torch.log(p_f + tiny)).sum()
        h_w = -(p_w * torch.log(p_w + tiny)).sum()
        h_fw = -(joint * torch.log(joint + tiny)).sum()
        losses.append(-(h_f + h_w) / h_fw)
    return torch.stack(losses).mean()


def similarity_loss(
    name: str,
    fixed: torch.Tensor,
    warped: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    window_mm: float = 9.0,
) -> torch.Tensor:
    """Dispatch by name ("lncc", "mse", "ncc", "ngf", "mi").

    Args:
        spacing: voxel size in mm along (X, Y, Z) of the grid the images are on.
        window_mm: LNCC window edge length in mm (converted to an odd voxel count >= 3 per axis).

    Raises:
        ValueError: for an unknown name.
    """
    if name == "lncc":
        window = [max(3, int(round(window_mm / s)) // 2 * 2 + 1) for s in spacing]
        return lncc(fixed, warped, mask, window_vox=window)
    if name == "mse":
        return mse(fixed, warped, mask)
    if name == "ncc":
        return ncc(fixed, warped, mask)
    if name == "ngf":
        return ngf(fixed, warped, mask, spacing=spacing)
    if name == "mi":
        return mutual_information(fixed, warped, mask)
    raise ValueError(f"unknown similarity {name!r}; choose one of {', '.join(SIMILARITIES)}")
