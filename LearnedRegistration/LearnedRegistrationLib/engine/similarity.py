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
from .filters import box_mean, shift_replicate, spatial_gradient, window_voxels

#: κ: per-similarity scale of the regularization term, so that one λ means about the same
#: smoothness whichever similarity is chosen (the losses have different ranges). MSE's κ is the
#: anchor (on [0, 1]-normalized intensities the default λ = 0.25 gives OASIS Dice 0.75 with < 0.01 %
#: folding; λκ / (1 - λ) runs from 0 through 0.004 (default) to 0.1 (λ = 0.9)). The others are
#: calibrated by scripts/calibrate_similarity.py (benchmarks/similarity_calibration.md): on the OASIS
#: pair at the default λ (4 mm working spacing, half the iterations), the κ at which the
#: optimizer's SDlogJ equals MSE's (0.310), interpolated in (log κ, log SDlogJ) between two runs
#: that bracket it:
#:
#: ==========  =======  =====================================
#: similarity  κ        runs: κ → SDlogJ
#: ==========  =======  =====================================
#: mse         0.0122   0.0122 → 0.310 (anchor)
#: lncc        0.45     0.3 → 0.358; 2.4 → 0.171
#: ncc         0.097    0.3 → 0.214; 0.0375 → 0.424
#: ngf         0.27     0.3 → 0.294; 0.0375 → 0.935
#: mi          0.33     0.3 → 0.319; 2.4 → 0.145
#: mind        0.070    0.3 → 0.188; 0.0375 → 0.384
#: ==========  =======  =====================================
REGULARIZATION_SCALE = {"mse": 0.0122, "lncc": 0.45, "ncc": 0.097, "ngf": 0.27, "mi": 0.33, "mind": 0.070}


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


#: The six-neighbourhood of a voxel, offsets (dz, dy, dx) in voxels.
_SIX_NEIGHBOURHOOD = ((0, 0, 1), (0, 0, -1), (0, 1, 0), (0, -1, 0), (1, 0, 0), (-1, 0, 0))
#: MIND-SSC's self-similarity context: the 12 pairs of six-neighbours sqrt(2) voxels apart (every
#: pair but the three opposite ones; Heinrich et al., MICCAI 2013, Fig. 1).
_SSC_PAIRS = tuple(
    (a, b) for i, a in enumerate(_SIX_NEIGHBOURHOOD) for b in _SIX_NEIGHBOURHOOD[i + 1 :]
    if sum((p - q) ** 2 for p, q in zip(a, b)) == 2
)


def mind_ssc(image: torch.Tensor, patch_vox: int = 3) -> torch.Tensor:
    """MIND-SSC descriptor (Heinrich et al., MedIA 2012; self-similarity context, MICCAI 2013).

    For each of the 12 pairs (a, b) of six-neighbours that are sqrt(2) voxels apart
    (:data:`_SSC_PAIRS`), the patch distance ``D_ab(x) = box_mean((I(x + a) - I(x + b))^2)`` over a
    ``patch_vox``-voxel cube; then, as in the authors' code (ConvexAdam's ``MINDSSC``), each
    voxel's smallest distance is subtracted, the local variance estimate is
    ``V(x) = mean_ab D_ab(x)``, bounded to [1e-3, 1e3] times its mean over the image (flat regions),
    and the descriptor is ``exp(-D_ab(x) / V(x))`` in (0, 1].

    Offsets and patch are in voxels of the grid the image is on: on an anisotropic grid (say
    1 x 1 x 5 mm) the through-plane neighbours are one slice (5 mm) away and the patch spans three
    slices, so the descriptor sees in-plane structure at the in-plane spacing and through-plane
    structure at the slice spacing; fixed and warped images on the same grid are described alike,
    which is all the loss needs, but descriptors of two differently sampled grids do not compare.

    Invariance: for ``a != 0`` the descriptor of ``a * image + b`` equals that of ``image`` exactly
    (every ``D``, their minimum, ``V`` and its bounds scale by ``a^2``; ``b`` cancels in the
    differences), up to the floor of ``V`` at the smallest positive float (constant images).

    Args:
        image: (N, 1, Z, Y, X).
        patch_vox: odd patch edge in voxels.

    Returns:
        (N, 12, Z, Y, X) descriptor, differentiable with respect to ``image``.

    Raises:
        ValueError: for a bad shape or an even ``patch_vox``.
    """
    if image.dim() != 5 or image.shape[1] != 1:
        raise ValueError(f"mind_ssc() 'image' must have shape (N, 1, Z, Y, X), got {tuple(image.shape)}")
    if patch_vox < 1 or patch_vox % 2 == 0:
        raise ValueError(f"mind_ssc() 'patch_vox' must be odd and positive, got {patch_vox}")
    shifted = {offset: shift_replicate(image, offset) for offset in _SIX_NEIGHBOURHOOD}
    squared = torch.cat([(shifted[a] - shifted[b]) ** 2 for a, b in _SSC_PAIRS], dim=1)
    distance = box_mean(squared, (patch_vox,) * 3)
    distance = distance - distance.min(dim=1, keepdim=True).values
    variance = distance.mean(dim=1, keepdim=True)
    overall = variance.mean()
    variance = torch.clamp(variance, min=overall * 1e-3, max=overall * 1e3).clamp_min(torch.finfo(image.dtype).tiny)
    return torch.exp(-distance / variance)


def mind(fixed: torch.Tensor, warped: torch.Tensor, mask: Optional[torch.Tensor] = None, patch_vox: int = 3) -> torch.Tensor:
    """MIND-SSC loss: mean squared difference of the fixed and warped :func:`mind_ssc` descriptors, in [0, 1].

    ``mean_x mean_ab (MIND_F(x, ab) - MIND_W(x, ab))^2`` (Heinrich et al., MedIA 2012, eq. 8 with
    the SSC layout; ConvexAdam's instance optimization uses the same). Multi-modal: it compares
    local structure, not intensities, and is unchanged when either image is remapped by its own
    ``a * I + b`` (``a != 0``, see :func:`mind_ssc`); 0 for an image and itself.
    """
    _check_pair("mind", fixed, warped, mask)
    difference = (mind_ssc(fixed, patch_vox) - mind_ssc(warped, patch_vox)) ** 2
    return _masked_mean(difference.mean(dim=1, keepdim=True), mask)


#: At most this many voxels enter the MI histogram (:func:`mi_sample_stride`).
MI_MAX_SAMPLES = 200_000


def mi_sample_stride(voxels: int, max_samples: int = MI_MAX_SAMPLES) -> int:
    """The stride through a flattened volume of ``voxels`` voxels at which :func:`mutual_information`
    takes its samples (every voxel when there are at most ``max_samples``)."""
    return max(1, int(voxels) // int(max_samples))


def mutual_information(
    fixed: torch.Tensor,
    warped: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    bins: int = 32,
    max_samples: int = MI_MAX_SAMPLES,
    intensity_range: Optional[tuple[float, float]] = None,
) -> torch.Tensor:
    """Negative normalized mutual information ``-(H(F) + H(W)) / H(F, W)`` in [-2, -1].

    Normalized form of Studholme et al. (Pattern Recognit. 1999) on a differentiable Parzen-window
    joint histogram with cubic B-spline kernels (Mattes et al., IEEE TMI 2003; Thévenaz & Unser,
    IEEE TIP 2000): each voxel adds its weight to the 4 x 4 bins around its (fixed, warped)
    intensity pair (a product of two sparse Parzen-weight matrices, :func:`_parzen_matrix`), so the
    histogram costs O(samples x bins) multiply-adds of sparse rows instead of one Gaussian per
    sample and bin pair (about 40x faster on a 2 mm brain), and stays smooth in the intensities. Intensities are rescaled to bin positions [0, bins - 1] with each image's own
    min/max (treated as constants), or with ``intensity_range`` (lo, hi) for both when given; the
    kernels spill one bin past either end. At most ``max_samples`` voxels enter the histogram, on a
    fixed stride through the volume (:func:`mi_sample_stride`; deterministic, so that the stage
    keeper compares like with like; elastix and ANTs likewise sample a subset).

    Raises:
        ValueError: for mismatched shapes (see :func:`mse`) or ``bins < 2``.
    """
    _check_pair("mutual_information", fixed, warped, mask)
    if bins < 2:
        raise ValueError(f"mutual_information() needs at least 2 bins, got {bins}")
    losses = []
    for b in range(fixed.shape[0]):
        stride = mi_sample_stride(fixed[b].numel(), max_samples)
        f = fixed[b].reshape(-1)[::stride]
        w = warped[b].reshape(-1)[::stride]
        wt = None if mask is None else mask[b].reshape(-1)[::stride]
        f_parzen = _parzen_matrix(f, bins, intensity_range)
        if wt is not None:
            f_parzen = f_parzen * wt[:, None]
        joint = f_parzen.T @ _parzen_matrix(w, bins, intensity_range)
        joint = joint / joint.sum().clamp_min(1e-12)
        losses.append(-(_entropy(joint.sum(1)) + _entropy(joint.sum(0))) / _entropy(joint))
    return torch.stack(losses).mean()


def _parzen_matrix(x: torch.Tensor, bins: int, intensity_range: Optional[tuple[float, float]]) -> torch.Tensor:
    """(N, bins + 3) Parzen weights of the N intensities ``x`` (:func:`_cubic_parzen`): row n holds
    its 4 kernel weights from its first bin on, zeros elsewhere. The joint histogram of two images
    is then one matrix product, ``A.T @ B`` (the same values as 16 scattered adds, in about the
    same time: 48 against 44 ms forward and backward for 200 000 samples on 2 CPU threads)."""
    first, weights = _cubic_parzen(x, bins, intensity_range)
    columns = first.long()[:, None] + torch.arange(4, device=x.device)
    return x.new_zeros(x.shape[0], bins + 3).scatter(1, columns, torch.stack(weights, dim=1))


def _cubic_parzen(x: torch.Tensor, bins: int, intensity_range: Optional[tuple[float, float]]):
    """``(first bin, (4 weights))`` of each intensity of ``x`` (1D) for a cubic B-spline Parzen
    window: the bin position ``p`` in [0, bins - 1] (from the min/max of ``x``, or
    ``intensity_range``; outside it clamped) spreads over bins ``floor(p) - 1 .. floor(p) + 2``,
    stored shifted by one (the first histogram cell is bin -1). The weights sum to one."""
    lo, hi = intensity_range if intensity_range is not None else (x.detach().min(), x.detach().max())
    lo, hi = torch.as_tensor(lo, dtype=x.dtype), torch.as_tensor(hi, dtype=x.dtype)
    position = ((x - lo) / (hi - lo).clamp_min(1e-6) * (bins - 1)).clamp(0, bins - 1)
    floor = position.detach().floor()
    t = position - floor
    t2, t3 = t * t, t * t * t
    weights = ((1 - t) ** 3 / 6, (3 * t3 - 6 * t2 + 4) / 6, (-3 * t3 + 3 * t2 + 3 * t + 1) / 6, t3 / 6)
    return floor.long(), weights


def _entropy(p: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of a probability table; empty bins add nothing."""
    return -(p * torch.log(p + 1e-12)).sum()


def similarity_loss(
    name: str,
    fixed: torch.Tensor,
    warped: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    window_mm: float = 9.0,
) -> torch.Tensor:
    """Dispatch by name (one of :data:`common.SIMILARITIES`).

    Args:
        spacing: voxel size in mm along (X, Y, Z) of the grid the images are on.
        window_mm: LNCC window edge length in mm, converted per axis to the odd voxel count nearest
            ``window_mm / spacing``, at least one voxel (:func:`filters.window_voxels`), and widened
            to three voxels of the finest spacing when it is narrower: on a level coarser than the
            window (8 mm for 9 mm) a one-voxel window in every axis has no variance, and LNCC no
            gradient. A thick-slice axis (1 x 1 x 10 mm: 9 x 9 x 1 voxels) keeps one slice.

    Raises:
        ValueError: for an unknown name.
    """
    if name == "lncc":
        return lncc(fixed, warped, mask, window_vox=window_voxels(max(window_mm, 3.0 * min(spacing)), spacing))
    if name == "mse":
        return mse(fixed, warped, mask)
    if name == "ncc":
        return ncc(fixed, warped, mask)
    if name == "ngf":
        return ngf(fixed, warped, mask, spacing=spacing)
    if name == "mi":
        return mutual_information(fixed, warped, mask)
    if name == "mind":
        return mind(fixed, warped, mask)
    raise ValueError(f"unknown similarity {name!r}; choose one of {', '.join(SIMILARITIES)}")
