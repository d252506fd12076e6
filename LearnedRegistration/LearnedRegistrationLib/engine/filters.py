"""Small differentiable filters on 3D tensors: smoothing, box means, finite differences, Jacobians.

Shapes follow torch's channels-first convention: ``x: (N, C, Z, Y, X)``. Spacings are given in mm
along (I, J, K) = (X, Y, Z), the same order as :attr:`grid.ImageGrid.spacing`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F


def _check_5d(name: str, x: torch.Tensor) -> None:
    if x.dim() != 5:
        raise ValueError(f"{name} must have shape (N, C, Z, Y, X), got {tuple(x.shape)}")


def gaussian_kernel_1d(sigma: float, dtype=torch.float32, device=None) -> torch.Tensor:
    """Normalized 1D Gaussian of standard deviation ``sigma`` voxels, truncated at 3 sigma."""
    radius = max(1, int(math.ceil(3.0 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(x: torch.Tensor, sigma_vox: Sequence[float]) -> torch.Tensor:
    """Separable Gaussian smoothing with replicate padding.

    Args:
        x: (N, C, Z, Y, X) tensor.
        sigma_vox: standard deviation in voxels along (X, Y, Z); an entry <= 0 skips that axis.

    Returns:
        Tensor of the same shape.
    """
    _check_5d("gaussian_blur() 'x'", x)
    n, c = x.shape[:2]
    out = x.reshape(n * c, 1, *x.shape[2:])
    # axis order (X, Y, Z) -> tensor dims (4, 3, 2)
    for sigma, dim in zip(sigma_vox, (4, 3, 2)):
        if sigma <= 0 or out.shape[dim] < 2:
            continue
        kernel = gaussian_kernel_1d(float(sigma), out.dtype, out.device)
        radius = min(kernel.numel() // 2, out.shape[dim] - 1)
        centre = kernel.numel() // 2
        kernel = kernel[centre - radius : centre + radius + 1]
        kernel = kernel / kernel.sum()
        shape = [1, 1, 1, 1, 1]
        shape[dim] = kernel.numel()
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (4 - dim)] = radius
        pad[2 * (4 - dim) + 1] = radius
        out = F.conv3d(F.pad(out, pad, mode="replicate"), kernel.view(shape))
    return out.reshape(x.shape)


def box_mean(x: torch.Tensor, size_vox: Sequence[int]) -> torch.Tensor:
    """Local mean over a box of odd ``size_vox`` = (sx, sy, sz) voxels; borders average what is inside.

    Separable running sums (cumulative sums), so the cost does not grow with the window size:
    about 4x faster than ``avg_pool3d`` on CPU for a 5-voxel window.

    Args:
        x: (N, C, Z, Y, X) tensor.
        size_vox: odd window sizes along (X, Y, Z).
    """
    _check_5d("box_mean() 'x'", x)
    sizes = (int(size_vox[2]), int(size_vox[1]), int(size_vox[0]))  # tensor dims 2, 3, 4
    if any(k % 2 == 0 or k < 1 for k in sizes):
        raise ValueError(f"box_mean() window sizes must be odd and positive, got {tuple(size_vox)}")
    out = x
    for dim, k in zip((2, 3, 4), sizes):
        length = out.shape[dim]
        if k == 1:
            continue
        r = k // 2
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (4 - dim)], pad[2 * (4 - dim) + 1] = r + 1, r
        c = torch.cumsum(F.pad(out, pad), dim=dim)
        window_sum = c.narrow(dim, k, length) - c.narrow(dim, 0, length)
        # number of voxels inside the image for each window position (separable, 1D)
        idx = torch.arange(length, device=x.device)
        count = (torch.clamp(idx + r, max=length - 1) - torch.clamp(idx - r, min=0) + 1).to(x.dtype)
        shape = [1, 1, 1, 1, 1]
        shape[dim] = length
        out = window_sum / count.view(shape)
    return out


def window_voxels(size_mm: float, spacing: Sequence[float]) -> list[int]:
    """Odd voxel counts along (X, Y, Z) of a window ``size_mm`` mm wide: per axis the odd number
    nearest ``size_mm / spacing``, never less than one voxel (so a window narrower than a thick
    slice stays within the slice instead of spanning three of them).

    Raises:
        ValueError: if ``size_mm`` or a spacing is not positive.
    """
    if not size_mm > 0 or any(not s > 0 for s in spacing):
        raise ValueError(f"window_voxels() needs a positive size and spacing, got {size_mm} mm and {tuple(spacing)}")
    return [max(1, 2 * int(math.floor((size_mm / s - 1.0) / 2.0 + 0.5)) + 1) for s in spacing]


def shift_replicate(x: torch.Tensor, offset_zyx: Sequence[int]) -> torch.Tensor:
    """``out[..., z, y, x] = x[..., z + dz, y + dy, x + dx]`` for an integer ``offset_zyx`` = (dz, dy, dx)
    in voxels, with the border voxels repeated beyond the edge (replicate padding).

    Args:
        x: (N, C, Z, Y, X) tensor.
    """
    _check_5d("shift_replicate() 'x'", x)
    r = max(abs(int(o)) for o in offset_zyx)
    if r == 0:
        return x
    padded = F.pad(x, [r] * 6, mode="replicate")
    z, y, w = x.shape[2:]
    dz, dy, dx = (int(o) + r for o in offset_zyx)
    return padded[:, :, dz : dz + z, dy : dy + y, dx : dx + w]


def spatial_gradient(x: torch.Tensor, spacing: Sequence[float]) -> torch.Tensor:
    """First derivatives per mm by central differences (one-sided at the border).

    Args:
        x: (N, C, Z, Y, X) tensor.
        spacing: voxel size in mm along (X, Y, Z).

    Returns:
        (N, C, 3, Z, Y, X): derivative of every channel along (X, Y, Z), in units of x per mm.
    """
    _check_5d("spatial_gradient() 'x'", x)
    dz, dy, dx = torch.gradient(x, spacing=(float(spacing[2]), float(spacing[1]), float(spacing[0])), dim=(2, 3, 4))
    return torch.stack([dx, dy, dz], dim=2)


def jacobian_determinant(displacement_mm: torch.Tensor, spacing: Sequence[float]) -> torch.Tensor:
    """Jacobian determinant of the map ``x -> x + u(x)``.

    ``J = det(I + du/dx)``, with derivatives by central differences per mm.

    Args:
        displacement_mm: (N, 3, Z, Y, X) displacement ``u`` in mm, components along the grid's
            (I, J, K) axes (any orthonormal frame gives the same determinant as long as the
            derivative axes are the same frame).
        spacing: voxel size in mm along (I, J, K).

    Returns:
        (N, Z, Y, X) determinant (dimensionless; 1 = volume preserved, <= 0 = folding).

    Raises:
        ValueError: if ``displacement_mm`` is not (N, 3, Z, Y, X).
    """
    if displacement_mm.dim() != 5 or displacement_mm.shape[1] != 3:
        raise ValueError(
            f"jacobian_determinant() 'displacement_mm' must have shape (N, 3, Z, Y, X), got {tuple(displacement_mm.shape)}"
        )
    if displacement_mm.requires_grad and torch.is_grad_enabled():  # losses: one differentiable expression
        g = spatial_gradient(displacement_mm, spacing)  # (N, 3 components, 3 derivative axes, Z, Y, X)
        return _det3([[g[:, c, a] + (1.0 if c == a else 0.0) for a in range(3)] for c in range(3)])
    out = torch.empty((displacement_mm.shape[0], *displacement_mm.shape[2:]), dtype=displacement_mm.dtype, device=displacement_mm.device)
    depth = displacement_mm.shape[2]
    # Slabs of a few slices (with a one-slice halo, so the central differences are exact): the nine
    # derivative volumes of a slab stay in cache, and slabs run on parallel threads (torch
    # releases the GIL). About 3x faster than whole-volume torch.gradient on a 160x192x224 field.
    slabs = [(n, z, min(depth, z + _JACOBIAN_SLAB)) for n in range(out.shape[0]) for z in range(0, depth, _JACOBIAN_SLAB)]
    workers = max(1, min(len(slabs), torch.get_num_threads())) if displacement_mm.device.type == "cpu" else 1

    def run(job):
        n, z0, z1 = job
        a, b = max(0, z0 - 1), min(depth, z1 + 1)
        x = displacement_mm[n, :, a:b]
        if b - a >= 2:
            dz, dy, dx = torch.gradient(x, spacing=(float(spacing[2]), float(spacing[1]), float(spacing[0])), dim=(1, 2, 3))
        else:  # a single slice: no derivative along Z
            dy, dx = torch.gradient(x, spacing=(float(spacing[1]), float(spacing[0])), dim=(2, 3))
            dz = torch.zeros_like(x)
        keep = slice(z0 - a, z1 - a)
        out[n, z0:z1] = _det3([[d[c, keep] + (1.0 if c == axis else 0.0) for axis, d in enumerate((dx, dy, dz))] for c in range(3)])

    if workers == 1:
        for job in slabs:
            run(job)
    else:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(run, slabs))
    return out


def _det3(m) -> torch.Tensor:
    """Determinant of a 3x3 matrix given as nested lists ``m[row][column]`` of equally shaped tensors.

    Cofactor expansion along the first row, with fused multiply-adds on fresh temporaries (about
    10 % faster than the plain expression on large volumes; differentiable).
    """
    minor = m[1][1] * m[2][2]
    minor = minor.addcmul(m[1][2], m[2][1], value=-1)
    det = m[0][0] * minor
    minor = (m[1][0] * m[2][2]).addcmul(m[1][2], m[2][0], value=-1)
    det = det.addcmul(m[0][1], minor, value=-1)
    minor = (m[1][0] * m[2][1]).addcmul(m[1][1], m[2][0], value=-1)
    return det.addcmul(m[0][2], minor)


#: Slices per slab in :func:`jacobian_determinant`.
_JACOBIAN_SLAB = 8
