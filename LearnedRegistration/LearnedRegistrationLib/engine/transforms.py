"""Spatial transforms: affine (rigid or full) in physical space, stationary velocity fields, warping.

Frames (see :mod:`grid`):

- An **affine** is a (4, 4) matrix acting on RAS mm. Like every transform here it is a
  *resampling* transform: it maps a point of the fixed image to the corresponding point of the
  moving image (ITK's and Slicer's "from parent" direction).
- A **normalized displacement** ``(N, 3, Z, Y, X)`` lives on a grid and is expressed in that grid's
  normalized units with channels (x, y, z) = (I, J, K): ``warped(p) = moving(p + u(p))`` in the
  grid's normalized coordinates. This is what ``grid_sample`` consumes, and because
  ``align_corners=True`` it is independent of the resolution it is sampled at.
- A **RAS displacement** ``(Z, Y, X, 3)`` (numpy) is in RAS mm on a fixed grid, resampling
  convention: the moving point for fixed point ``x`` is ``x + d(x)``.

Full-resolution passes (:func:`displacement_to_ras`, :func:`resample_image`, and the fixed-grid
sampling of :mod:`fields`) run in slabs along the slowest axis Z (:func:`common.z_slabs`): each slab's
sampling positions and temporaries are a few tens of MB whatever the volume, so a 512 x 512 x 400
CT costs its outputs and little more (one float64 world-point grid of it alone is 2.5 GB).
"""

from __future__ import annotations

import functools
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .common import z_slabs
from .grid import ALIGN_CORNERS, ImageGrid

_GRID_SAMPLE_MODES = {"linear": "bilinear", "nearest": "nearest"}

def slab_theta(theta: np.ndarray, depth: int, rows: tuple[int, int]) -> np.ndarray:
    """The (3, 4) ``affine_grid`` matrix of target rows ``[z0, z1)`` of a grid ``depth`` slices deep.

    ``theta`` maps the whole target's normalized coordinates to the source's; the result does the
    same for an ``affine_grid`` of shape (z1 - z0, Y, X), whose own normalized z runs over [-1, 1]
    (0 for a single slice), so that slab by slab the positions are those of the whole grid.
    """
    z0, z1 = int(rows[0]), int(rows[1])
    if not 0 <= z0 < z1 <= depth:
        raise ValueError(f"slab_theta() rows must satisfy 0 <= z0 < z1 <= {depth}, got {rows}")
    out = np.array(theta, dtype=np.float64, copy=True)
    if depth > 1:
        # normalized z of row k of the whole grid: -1 + 2k / (depth - 1), an affine function of the slab's own z
        scale, offset = (z1 - 1 - z0) / (depth - 1), (z0 + z1 - 1) / (depth - 1) - 1.0
        out[:, 3] += out[:, 2] * offset
        out[:, 2] *= scale
    return out


# --------------------------------------------------------------------------------- warping
def grid_sample(image: torch.Tensor, grid: torch.Tensor, mode: str = "linear", padding_mode: str = "zeros") -> torch.Tensor:
    """``torch.nn.functional.grid_sample`` with this project's ``align_corners`` and CPU threading.

    Args:
        image: (N, C, Z, Y, X) volume to sample.
        grid: (N, Z', Y', X', 3) sampling positions in the image's normalized frame, (x, y, z).
        mode: "linear" or "nearest".
        padding_mode: "zeros", "border" or "reflection".

    Returns:
        (N, C, Z', Y', X').

    torch's CPU kernel parallelizes over the batch only, so a single volume runs on one core; the
    grid is cut into one slab per thread along Z (at least 4 slices each) and sampled as a batch
    (1.6x faster on 2 cores, identical values and gradients).
    """
    if mode not in _GRID_SAMPLE_MODES:
        raise ValueError(f"grid_sample() mode must be one of {sorted(_GRID_SAMPLE_MODES)}, got {mode!r}")
    kwargs = dict(mode=_GRID_SAMPLE_MODES[mode], padding_mode=padding_mode, align_corners=ALIGN_CORNERS)
    depth = grid.shape[1]
    slabs = min(torch.get_num_threads(), depth // 4)
    if image.device.type != "cpu" or grid.shape[0] != 1 or slabs < 2:
        return F.grid_sample(image, grid, **kwargs)
    slab = -(-depth // slabs)
    pad = slab * slabs - depth
    if pad:
        grid = torch.cat([grid, grid[:, -1:].expand(1, pad, *grid.shape[2:])], dim=1)
    out = F.grid_sample(image.expand(slabs, *image.shape[1:]), grid.reshape(slabs, slab, *grid.shape[2:]), **kwargs)
    out = out.permute(1, 0, 2, 3, 4).reshape(1, image.shape[1], slabs * slab, *out.shape[3:])
    return out[:, :, :depth]


def identity_grid(shape, device=None, dtype=torch.float32) -> torch.Tensor:
    """Normalized coordinates of every voxel centre, shape (1, Z, Y, X, 3), last axis (x, y, z).

    Cached per (shape, device, dtype) because the optimizer asks for it in every squaring step;
    treat the returned tensor as read-only.
    """
    return _identity_grid(tuple(int(s) for s in shape), torch.device(device or "cpu"), dtype)


@functools.lru_cache(maxsize=16)
def _identity_grid(shape, device, dtype) -> torch.Tensor:
    theta = torch.eye(3, 4, dtype=dtype, device=device).unsqueeze(0)
    return F.affine_grid(theta, (1, 1, *shape), align_corners=ALIGN_CORNERS)


def normalized_axis(size: int, stride: int = 1, device=None, dtype=torch.float32) -> torch.Tensor:
    """Normalized coordinates of every ``stride``-th voxel centre of a ``size``-voxel axis, as
    ``affine_grid`` puts them (``align_corners``: -1 to 1; 0 for a single voxel), shape (n,)."""
    if size <= 1:
        return torch.zeros(1, device=device, dtype=dtype)
    return torch.arange(0, size, stride, device=device, dtype=dtype) * (2.0 / (size - 1)) - 1.0


@functools.lru_cache(maxsize=8)
def lattice_points(shape: tuple, stride: tuple, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(1, n_z, n_y, n_x, 3) normalized positions (x, y, z; ``align_corners``) of every
    ``stride``-th voxel (per axis, (Z, Y, X)) of a (Z, Y, X) grid; with stride 1 what
    :func:`identity_grid` gives. Cached (treat as read-only)."""
    z, y, x = torch.meshgrid(*(normalized_axis(n, s, device, dtype) for n, s in zip(shape, stride)), indexing="ij")
    return torch.stack([x, y, z], dim=-1).unsqueeze(0)


@functools.lru_cache(maxsize=16)
def _linear_weights(size_out: int, stride: int, size_in: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(n, size_in) linear-interpolation weights, ``align_corners``: row k reads a field of
    ``size_in`` samples at voxel ``k * stride`` of a ``size_out``-voxel axis of the same extent
    (n = ceil(size_out / stride)); cached (treat as read-only)."""
    position = torch.arange(0, size_out, stride, dtype=torch.float64)
    position = position * ((size_in - 1) / (size_out - 1)) if size_out > 1 else position * 0.0
    low = position.floor().clamp(max=max(size_in - 2, 0)).long()
    frac = position - low
    weights = torch.zeros(len(position), size_in, dtype=torch.float64)
    rows = torch.arange(len(position))
    weights[rows, low] = 1.0 - frac
    if size_in > 1:
        weights[rows, low + 1] += frac
    return weights.to(device=device, dtype=dtype)


def field_on_lattice(field: torch.Tensor, shape, stride) -> torch.Tensor:
    """A field read trilinearly (``align_corners``) at every ``stride``-th voxel of a grid.

    Args:
        field: (1, C, z, y, x) field or image (a normalized displacement needs no rescaling).
        shape: (Z, Y, X) of the grid of the same extent that the lattice is taken from.
        stride: (Z, Y, X) voxel strides (each >= 1).

    Returns:
        (1, C, n_z, n_y, n_x); with stride 1 what :func:`resize_field` gives. Trilinear
        interpolation is separable: three small matrix products, whose backward is cheap too (a
        ``grid_sample`` gather at those points: 69 against 9 ms forward and backward, a 41 x 49 x 57
        field read at every 2nd voxel of 160 x 192 x 224, 2 CPU threads).
    """
    wz, wy, wx = (_linear_weights(int(n), int(s), int(m), field.device, field.dtype)
                  for n, s, m in zip(shape, stride, field.shape[2:]))
    out = field @ wx.T  # (1, C, z, y, n_x)
    out = (out.transpose(-1, -2) @ wy.T).transpose(-1, -2)  # (1, C, z, n_y, n_x)
    return torch.einsum("kz,bczyx->bckyx", wz, out)


def warp(
    image: torch.Tensor,
    displacement: torch.Tensor,
    mode: str = "linear",
    padding_mode: str = "zeros",
) -> torch.Tensor:
    """Resample ``image`` at ``p + u(p)``, both on the same grid.

    Args:
        image: (N, C, Z, Y, X).
        displacement: (N, 3, Z, Y, X) normalized displacement of that grid, channels (x, y, z).
        mode: "linear" or "nearest".
        padding_mode: ``grid_sample`` padding ("zeros", "border", "reflection").

    Returns:
        (N, C, Z, Y, X) warped image.

    Raises:
        ValueError: on shape mismatch or unknown mode.
    """
    if displacement.dim() != 5 or displacement.shape[1] != 3:
        raise ValueError(f"warp() 'displacement' must have shape (N, 3, Z, Y, X), got {tuple(displacement.shape)}")
    if image.dim() != 5 or image.shape[2:] != displacement.shape[2:]:
        raise ValueError(
            f"warp() 'image' must have shape (N, C, {', '.join(map(str, displacement.shape[2:]))}), got {tuple(image.shape)}"
        )
    grid = identity_grid(image.shape[2:], image.device, displacement.dtype) + displacement.permute(0, 2, 3, 4, 1)
    return grid_sample(image, grid, mode, padding_mode)


def compose(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """Displacement of ``x -> y + outer(y)`` with ``y = x + inner(x)``: ``inner + outer(x + inner)``.

    Both (N, 3, Z, Y, X) normalized displacements on the same grid; the result likewise. Outside the
    grid ``outer`` is extended with its border value.
    """
    return inner + warp(outer, inner, padding_mode="border")


def integrate_svf(velocity: torch.Tensor, steps: int = 7) -> torch.Tensor:
    """Exponential of a stationary velocity field by scaling and squaring.

    ``phi = exp(v)``: start from ``v / 2**steps`` and compose the displacement with itself
    ``steps`` times (Arsigny et al., MICCAI 2006; Ashburner, NeuroImage 2007). The result is a
    diffeomorphism for a smooth enough ``v``, and ``exp(-v)`` is its inverse.

    Args:
        velocity: (N, 3, Z, Y, X) velocity in normalized units of its grid, channels (x, y, z).
        steps: number of squarings (>= 0).

    Returns:
        (N, 3, Z, Y, X) normalized displacement of ``exp(v)``.
    """
    if velocity.dim() != 5 or velocity.shape[1] != 3:
        raise ValueError(f"integrate_svf() 'velocity' must have shape (N, 3, Z, Y, X), got {tuple(velocity.shape)}")
    if steps < 0:
        raise ValueError(f"integrate_svf() 'steps' must be >= 0, got {steps}")
    displacement = velocity / (2**steps)
    for _ in range(steps):
        displacement = compose(displacement, displacement)
    return displacement


def resize_field(field: torch.Tensor, shape) -> torch.Tensor:
    """Trilinear resampling of a normalized field (or image) to a new (Z, Y, X) shape on the same extent.

    Normalized displacements need no rescaling (``align_corners=True``).
    """
    if tuple(field.shape[2:]) == tuple(shape):
        return field
    return F.interpolate(field, size=tuple(shape), mode="trilinear", align_corners=ALIGN_CORNERS)


# --------------------------------------------------------------------------------- frames
def per_channel(values, device=None, dtype=torch.float32) -> torch.Tensor:
    """A (3,) vector along (I, J, K) = (x, y, z) as a (1, 3, 1, 1, 1) tensor that scales the
    channels of an (N, 3, Z, Y, X) field, e.g. ``per_channel(grid.mm_per_normalized_unit(shape, spacing))``."""
    return torch.as_tensor(np.asarray(values, dtype=np.float64), dtype=dtype, device=device).view(1, 3, 1, 1, 1)


def normalized_to_mm(displacement: torch.Tensor, grid: ImageGrid) -> torch.Tensor:
    """Normalized displacement (N, 3, Z, Y, X) -> mm along the grid's (I, J, K) axes, same shape."""
    return displacement * per_channel(grid.normalized_unit_mm, displacement.device, displacement.dtype)


def mm_to_normalized(displacement_mm: torch.Tensor, grid: ImageGrid) -> torch.Tensor:
    """Inverse of :func:`normalized_to_mm`."""
    return displacement_mm / per_channel(grid.normalized_unit_mm, displacement_mm.device, displacement_mm.dtype)


def affine_theta(affine_ras: np.ndarray, target_grid: ImageGrid, source_grid: ImageGrid) -> np.ndarray:
    """(3, 4) ``affine_grid`` matrix: target normalized coords -> source normalized coords.

    Args:
        affine_ras: (4, 4) resampling affine in RAS mm (target point -> source point).
        target_grid: grid the output is sampled on (the fixed image's).
        source_grid: grid of the image that is sampled (the moving image's).
    """
    m = source_grid.ras_to_normalized @ np.asarray(affine_ras, dtype=np.float64) @ target_grid.normalized_to_ras
    return m[:3]


def sampling_grid(
    target_grid: ImageGrid,
    source_grid: ImageGrid,
    affine_ras: Optional[np.ndarray] = None,
    displacement: Optional[torch.Tensor] = None,
    device=None,
    dtype=torch.float32,
    rows: Optional[tuple[int, int]] = None,
) -> torch.Tensor:
    """Where to sample the source image for every target voxel: ``source(A(p + u(p)))``.

    Args:
        target_grid: output grid (fixed).
        source_grid: grid of the sampled (moving) image.
        affine_ras: (4, 4) resampling affine in RAS mm; identity when None.
        displacement: optional (1, 3, Z, Y, X) normalized displacement on ``target_grid`` (on its
            rows ``[z0, z1)`` only, (1, 3, z1 - z0, Y, X), with ``rows``).
        rows: optional ``(z0, z1)``: only the target slices z0 <= z < z1 (a slab, :func:`common.z_slabs`).

    Returns:
        (1, Z, Y, X, 3) coordinates in the source grid's normalized frame, for ``grid_sample``
        ((1, z1 - z0, Y, X, 3) with ``rows``).
    """
    affine = np.eye(4) if affine_ras is None else np.asarray(affine_ras, dtype=np.float64)
    theta = affine_theta(affine, target_grid, source_grid)
    shape = tuple(target_grid.shape)
    if rows is not None:
        theta = slab_theta(theta, shape[0], rows)
        shape = (int(rows[1]) - int(rows[0]), *shape[1:])
    theta = torch.as_tensor(theta, dtype=dtype, device=device)
    grid = F.affine_grid(theta.unsqueeze(0), (1, 1, *shape), align_corners=ALIGN_CORNERS)
    if displacement is not None:
        if tuple(displacement.shape[2:]) != shape:
            raise ValueError(
                f"sampling_grid() 'displacement' must be on the target grid {shape}, got {tuple(displacement.shape)}"
            )
        # theta's linear part maps target-normalized vectors into source-normalized vectors.
        grid = grid + torch.einsum("ij,nzyxj->nzyxi", theta[:, :3], displacement.permute(0, 2, 3, 4, 1))
    return grid


class AxisAlignedResampler:
    """Trilinear resampling between two grids whose axes are parallel (up to order and sign).

    When every source axis is an affine function of a single target axis (no rotation beyond
    permutations and flips: a fixed image and a working grid of the same orientation family, such
    as OASIS LIA scans and the shipped LIA model), trilinear interpolation factorizes into three
    1-D linear interpolations, each a matrix product with a (target length, source length) matrix
    of two non-zeros per row. On CPU those products are several times faster than one 3-D
    ``grid_sample`` over a large target, and the values are the same: it equals
    ``grid_sample(field, sampling_grid(target, source), "linear", padding_mode="border")``
    (``align_corners=True``) up to float rounding.

    Build one with :meth:`between` (None when the grids are oblique to each other), then call it
    on (N, C, z, y, x) fields on the source grid to get (N, C, Z, Y, X) on the target grid.
    """

    def __init__(self, axes, matrices, target_shape) -> None:
        self.axes = axes  # axes[c] = target axis (0 = X, 1 = Y, 2 = Z) that source axis c (x, y, z) follows
        self.matrices = matrices  # matrices[c]: (target length, source length) interpolation weights
        self.target_shape = tuple(int(n) for n in target_shape)

    @classmethod
    def between(
        cls, target_grid: ImageGrid, source_grid: ImageGrid, device=None, tolerance: float = 1e-6
    ) -> Optional[AxisAlignedResampler]:
        """The resampler from fields on ``source_grid`` to ``target_grid`` (both RAS), or None if
        some source axis depends on more than one target axis (grids oblique to each other)."""
        theta = affine_theta(np.eye(4), target_grid, source_grid)  # (3, 4): target normalized -> source normalized
        linear = np.abs(theta[:, :3])
        axes = [int(np.argmax(row)) for row in linear]
        if sorted(axes) != [0, 1, 2]:
            return None
        for c, a in enumerate(axes):
            if np.any(np.delete(linear[c], a) > tolerance * max(linear[c, a], 1.0)):
                return None
        target_xyz, source_xyz = target_grid.shape[::-1], source_grid.shape[::-1]
        matrices = []
        for c, a in enumerate(axes):
            n_target, n_source = int(target_xyz[a]), int(source_xyz[c])
            # affine_grid's target coordinates for align_corners=True (a single voxel sits at 0)
            t = np.linspace(-1.0, 1.0, n_target) if n_target > 1 else np.zeros(1)
            index = np.clip((theta[c, a] * t + theta[c, 3] + 1.0) * (n_source - 1) / 2.0, 0.0, n_source - 1)  # border
            i0 = np.minimum(np.floor(index), max(n_source - 2, 0)).astype(np.int64)
            w = index - i0
            m = np.zeros((n_target, n_source), dtype=np.float32)
            rows = np.arange(n_target)
            np.add.at(m, (rows, i0), 1.0 - w)
            np.add.at(m, (rows, np.minimum(i0 + 1, n_source - 1)), w)
            matrices.append(torch.as_tensor(m, device=device))
        return cls(axes, matrices, target_grid.shape)

    def __call__(self, field: torch.Tensor, channels_last: bool = False, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """(N, C, z, y, x) on the source grid -> (N, C, Z, Y, X) on the target grid, or
        (N, Z, Y, X, C) with ``channels_last`` (e.g. a vector field for ``grid_sample``), contiguous.

        With ``rows = (z0, z1)`` only the target slices z0 <= Z < z1 are computed (a slab of
        :func:`common.z_slabs`): (N, C, z1 - z0, Y, X), the same values as those rows of the whole."""
        if field.dim() != 5:
            raise ValueError(f"AxisAlignedResampler needs an (N, C, z, y, x) field, got {tuple(field.shape)}")
        n, channels = field.shape[:2]
        out = field.reshape(n * channels, *field.shape[2:])
        matrices = list(self.matrices)
        # Each pass is a matrix product along one axis; the source axis with the fewest voxels goes
        # last, because the last pass writes the whole target (cost: target size x source length).
        order = sorted(range(3), key=lambda k: -matrices[k].shape[1])
        if rows is not None:
            # the source axis along the target's Z: only the slab's rows of its matrix, and first,
            # so that the other passes write the slab only
            z0, z1 = int(rows[0]), int(rows[1])
            if not 0 <= z0 < z1 <= self.target_shape[0]:
                raise ValueError(f"AxisAlignedResampler rows must satisfy 0 <= z0 < z1 <= {self.target_shape[0]}, got {rows}")
            along_z = self.axes.index(2)
            matrices[along_z] = matrices[along_z][z0:z1]
            order = [along_z, *(c for c in order if c != along_z)]
        for c in order:
            m = matrices[c].to(out.dtype)
            b, z, y, x = out.shape
            if c == 0:  # x: the last dimension
                out = (out.reshape(-1, x) @ m.T).view(b, z, y, -1)
            elif c == 1:  # y
                out = (m @ out.reshape(b * z, y, x)).view(b, z, -1, x)
            else:  # z
                out = (m @ out.reshape(b, z, y * x)).view(b, -1, y, x)
        # tensor dim (4 - c) now runs along target axis axes[c], whose place is dim (4 - axes[c])
        order = [0, 1, 0, 0, 0]
        for c, a in enumerate(self.axes):
            order[4 - a] = 4 - c
        if channels_last:
            order = [0, *order[2:], 1]
        return out.view(n, channels, *out.shape[1:]).permute(*order).contiguous()


def displacement_to_ras(
    displacement: Optional[torch.Tensor], grid: ImageGrid, affine_ras: Optional[np.ndarray] = None
) -> np.ndarray:
    """Total resampling displacement in RAS mm of ``p -> A(p + u(p))`` on ``grid``.

    Args:
        displacement: (1, 3, Z, Y, X) normalized displacement on ``grid`` (None = zero).
        grid: the fixed grid.
        affine_ras: (4, 4) resampling affine in RAS mm applied after the displacement (None = identity).

    Returns:
        (Z, Y, X, 3) float32 numpy array, RAS mm: the moving point for fixed point ``x`` is ``x + d(x)``.

    Raises:
        ValueError: a displacement that is not (1, 3, Z, Y, X) on ``grid``.
    """
    affine = np.eye(4) if affine_ras is None else np.asarray(affine_ras, dtype=np.float64)
    if displacement is not None and tuple(displacement.shape) != (1, 3, *grid.shape):
        raise ValueError(f"displacement_to_ras() 'displacement' must have shape {(1, 3, *grid.shape)}, got {tuple(displacement.shape)}")
    dtype = torch.float64
    # p (RAS) from the identity grid, in float64 to keep sub-micron accuracy on large grids; slab by
    # slab (the whole grid in float64 would be 24 bytes a voxel, 2.5 GB for a 512 x 512 x 400 CT).
    theta = grid.normalized_to_ras[:3]
    a = torch.as_tensor(affine, dtype=dtype)
    to_ras = torch.as_tensor(grid.direction.T, dtype=dtype)
    out = np.empty((*grid.shape, 3), dtype=np.float32)
    for z0, z1 in z_slabs(grid.shape):
        rows = torch.as_tensor(slab_theta(theta, grid.shape[0], (z0, z1)), dtype=dtype).unsqueeze(0)
        points = F.affine_grid(rows, (1, 1, z1 - z0, *grid.shape[1:]), align_corners=ALIGN_CORNERS)[0]
        moved = points
        if displacement is not None:
            u_mm = normalized_to_mm(displacement[:, :, z0:z1].detach().to("cpu", dtype), grid)[0].permute(1, 2, 3, 0)
            moved = points + u_mm @ to_ras
        moved = moved @ a[:3, :3].T + a[:3, 3]
        out[z0:z1] = (moved - points).to(torch.float32).numpy()
    return out


def ras_displacement_to_mm_ijk(displacement_ras: np.ndarray, grid: ImageGrid) -> torch.Tensor:
    """(Z, Y, X, 3) RAS mm displacement -> (1, 3, Z, Y, X) tensor of mm along the grid's (I, J, K) axes."""
    d = torch.as_tensor(np.asarray(displacement_ras, dtype=np.float32))
    d = d @ torch.as_tensor(grid.direction, dtype=torch.float32)  # components along I, J, K
    return d.permute(3, 0, 1, 2).unsqueeze(0)


def resample_image(
    image: np.ndarray,
    image_grid: ImageGrid,
    target_grid: ImageGrid,
    displacement_ras: Optional[np.ndarray] = None,
    mode: str = "linear",
    default_value: float = 0.0,
    affine_ras: Optional[np.ndarray] = None,
) -> np.ndarray:
    """Resample a numpy volume onto ``target_grid`` in physical space: ``out(x) = image(A(x) + d(x))``.

    Args:
        image: (Z, Y, X) array on ``image_grid``.
        image_grid: geometry of ``image``.
        target_grid: output geometry.
        displacement_ras: optional (Z, Y, X, 3) RAS mm resampling displacement on ``target_grid``.
        mode: "linear" or "nearest" (use nearest for label maps).
        default_value: value outside the image.
        affine_ras: optional (4, 4) resampling affine in RAS mm (applied when no displacement is
            given; a displacement from :func:`displacement_to_ras` already contains the affine).

    Returns:
        (Z, Y, X) float32 array on ``target_grid`` (labels come back as exact float values).

    The output is computed in slabs along Z (:func:`common.z_slabs`): beyond the output, the memory is
    one float32 copy of ``image`` (none for a float32 image with ``default_value`` 0) and a slab's
    sampling positions.

    Raises:
        ValueError: an unknown mode, or an image or displacement whose shape does not match its grid.
    """
    if mode not in _GRID_SAMPLE_MODES:
        raise ValueError(f"resample_image() mode must be one of {sorted(_GRID_SAMPLE_MODES)}, got {mode!r}")
    image = np.asarray(image)
    if image.shape != image_grid.shape:
        raise ValueError(f"resample_image() 'image' shape {image.shape} does not match its grid {image_grid.shape}")
    d = None
    if displacement_ras is not None:
        d = np.asarray(displacement_ras, dtype=np.float32)
        if d.shape != (*target_grid.shape, 3):
            raise ValueError(
                f"resample_image() 'displacement_ras' must have shape {(*target_grid.shape, 3)}, got {d.shape}"
            )
    src = np.ascontiguousarray(image, dtype=np.float32)
    if default_value != 0:
        src = src - np.float32(default_value)
    src = torch.as_tensor(src)[None, None]
    # RAS mm vectors -> source normalized vectors: linear part of ras_to_normalized.
    lin = torch.as_tensor(image_grid.ras_to_normalized[:3, :3], dtype=torch.float32)
    affine = affine_ras if displacement_ras is None else None
    out = np.empty(target_grid.shape, dtype=np.float32)
    with torch.no_grad():
        for z0, z1 in z_slabs(target_grid.shape):
            grid = sampling_grid(target_grid, image_grid, affine, rows=(z0, z1))
            if d is not None:
                grid = grid + torch.as_tensor(d[z0:z1]) @ lin.T
            slab = grid_sample(src, grid, mode)[0, 0]
            if default_value != 0:
                slab = slab + default_value
            out[z0:z1] = slab.numpy()
    return out


# --------------------------------------------------------------------------------- affine
def rotation_matrix(axis_angle: torch.Tensor) -> torch.Tensor:
    """(3, 3) rotation from an axis-angle vector (radians), by Rodrigues' formula; differentiable."""
    theta = torch.sqrt((axis_angle**2).sum() + 1e-12)
    k = axis_angle / theta
    zero = torch.zeros((), dtype=axis_angle.dtype, device=axis_angle.device)
    kx = torch.stack(
        [
            torch.stack([zero, -k[2], k[1]]),
            torch.stack([k[2], zero, -k[0]]),
            torch.stack([-k[1], k[0], zero]),
        ]
    )
    eye = torch.eye(3, dtype=axis_angle.dtype, device=axis_angle.device)
    return eye + torch.sin(theta) * kx + (1 - torch.cos(theta)) * (kx @ kx)


def affine_matrix(linear: torch.Tensor, translation: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """(4, 4) affine ``x -> linear @ (x - center) + center + translation`` (all RAS mm)."""
    m = torch.eye(4, dtype=linear.dtype, device=linear.device)
    top = torch.cat([linear, (center - linear @ center + translation).unsqueeze(1)], dim=1)
    return torch.cat([top, m[3:]], dim=0)
