"""Registration with the λ-conditioned network: one pair in memory, any λ in a fraction of a second.

:class:`NetworkRegistration` binds a loaded :class:`network.RegistrationNetwork` to one
fixed/moving pair:

1. **prepare** (once per pair): the moving image is affinely aligned first (the caller passes the
   optimizer's affine, :func:`engine.optimize.register_images` without deformable levels); both images
   are normalized (:func:`engine.common.normalize_intensity`), box-filtered to the working spacing and
   resampled onto the network's *working grid*: the checkpoint's spacing and axis directions
   (isotropic, LIA for the shipped brain model), covering the fixed image's extent, each axis a
   multiple of the network's divisor so no padding happens inside the network. The λ-free encoder
   runs once (:meth:`RegistrationNetwork.encode`) and its features are cached, as are the fixed
   voxels' positions in the working frame and the affine part of the displacement.
2. **predict(λ)**: only the λ-conditioned decoder runs (:meth:`RegistrationNetwork.decode_coarse`);
   its coarse displacement is sampled trilinearly at every fixed voxel (physical space, so any
   size, spacing and orientation of the fixed image works) and composed with the affine:
   ``d(x) = A(x + u(x)) - x`` in RAS mm, the resampling convention of the whole project.
3. **adapt** (:func:`adapt`, optional test-time adaptation): the λ path of :mod:`engine.path`
   *started from the network's prediction* at each knot (:meth:`NetworkRegistration.velocity_on`
   resamples it onto the path's velocity grid), with the network's affine. The result is a
   :class:`engine.path.LambdaPath`: the slider stays instant, and adaptation and the optimizer's
   λ path are one implementation. The network itself is never trained here: the shipped weights
   on disk and in any cached network stay as they are.

Outputs are :class:`engine.common.RegistrationResult` objects, so the logic writes them exactly like the
optimizer's. ``lambda_map`` is the effective regularization weight ``λ · λ(x)`` (Chen et al.,
"Unsupervised learning of spatially varying regularization for diffeomorphic image registration").
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import replace
from typing import Optional

import numpy as np
import torch

from ..engine.common import (
    CancelCallback,
    ProgressCallback,
    RegistrationOptions,
    RegistrationResult,
    choose_device,
    normalize_intensity,
    validate_volume,
    volume_tensor,
)
from ..engine.fields import FixedGridSampler, warp_and_displacement
from ..engine.filters import box_mean
from ..engine.grid import ImageGrid, mm_per_normalized_unit
from ..engine.metrics import jacobian_map
from ..engine.optimize import register_images
from ..engine.path import LambdaPath, PathOptions, register_path
from ..engine.transforms import grid_sample, resample_image, sampling_grid
from .network import EncodedPair, RegistrationNetwork


# --------------------------------------------------------------------------------- working grid
def working_grid(center_ras, fov_mm, spacing_mm: float, divisor: int, direction) -> ImageGrid:
    """Isotropic grid of ``spacing_mm`` with column directions ``direction`` (3x3, RAS), centred on
    ``center_ras``, covering ``fov_mm`` along its (Z, Y, X) = (K, J, I) axes, each axis rounded up to
    a multiple of ``divisor``."""
    shape = tuple(int(math.ceil(max(1, math.ceil(f / spacing_mm - 1e-6)) / divisor) * divisor) for f in fov_mm)
    direction = np.asarray(direction, dtype=np.float64)
    half = mm_per_normalized_unit(shape, spacing_mm)  # centre to the outermost voxel centres, along I, J, K
    origin = np.asarray(center_ras, dtype=np.float64) - direction @ half
    return ImageGrid(shape, (spacing_mm,) * 3, origin, direction)


def working_grid_for(fixed_grid: ImageGrid, spacing_mm: float, divisor: int, direction) -> ImageGrid:
    """:func:`working_grid` covering the fixed image's bounding box (in the working directions)."""
    direction = np.asarray(direction, dtype=np.float64)
    size = np.asarray(fixed_grid.size_ijk, dtype=np.float64) - 1.0
    corners = np.array([[i, j, k, 1.0] for i in (0, size[0]) for j in (0, size[1]) for k in (0, size[2])])
    ras = (fixed_grid.ijk_to_ras @ corners.T)[:3].T
    local = ras @ direction  # coordinates along the working I, J, K axes
    low, high = local.min(axis=0), local.max(axis=0)
    center = direction @ ((low + high) / 2.0)
    # voxel-edge extent (first to last centre plus one fixed voxel), so 224 x 1 mm gives 112 x 2 mm
    fov_kji = (high - low + min(fixed_grid.spacing))[::-1]
    return working_grid(center, fov_kji, spacing_mm, divisor, direction)


def smooth_for_spacing(image: np.ndarray, grid: ImageGrid, spacing_mm: float) -> np.ndarray:
    """Box-filter a (Z, Y, X) image to about ``spacing_mm`` before down-sampling (anti-aliasing)."""
    width = [int(round(spacing_mm / s)) // 2 * 2 + 1 for s in grid.spacing]
    if max(width) <= 1:
        return image
    with torch.no_grad():
        return box_mean(volume_tensor(np.ascontiguousarray(image, dtype=np.float32)), width)[0, 0].numpy()


def to_working_grid(image: np.ndarray, grid: ImageGrid, work: ImageGrid, affine_ras=None, normalize: bool = True) -> np.ndarray:
    """Network input: normalized to about [0, 1], anti-aliased, resampled onto ``work``, clipped to [0, 1]."""
    if normalize:
        image = normalize_intensity(image)
    image = smooth_for_spacing(image, grid, max(work.spacing))
    return np.clip(resample_image(image, grid, work, affine_ras=affine_ras), 0.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------------- session
class NetworkRegistration:
    """A network bound to one fixed/moving pair (see the module docstring).

    Args:
        network: a loaded network (it is copied, never modified).
        metadata: its checkpoint metadata; ``metadata["working_grid"]`` gives ``spacing_mm`` and
            ``direction_ras`` (3x3 column directions) of the training grid.
        fixed: (Z, Y, X) fixed image on ``fixed_grid`` (any size, spacing, orientation).
        moving: (Z, Y, X) moving image on ``moving_grid``.
        affine_ras: (4, 4) resampling affine in RAS mm aligning moving to fixed (None = identity).
        device: "cpu", "cuda" or None (automatic).

    Raises:
        ValueError: bad images (see :func:`engine.common.validate_volume`) or metadata without a working grid.
    """

    def __init__(
        self,
        network: RegistrationNetwork,
        metadata: dict,
        fixed: np.ndarray,
        fixed_grid: ImageGrid,
        moving: np.ndarray,
        moving_grid: ImageGrid,
        affine_ras: Optional[np.ndarray] = None,
        device: Optional[str] = None,
        encoded: Optional[EncodedPair] = None,
    ) -> None:
        start = time.perf_counter()
        fixed = validate_volume("fixed", fixed, fixed_grid)
        moving = validate_volume("moving", moving, moving_grid)
        spec = (metadata or {}).get("working_grid") or {}
        if "spacing_mm" not in spec or "direction_ras" not in spec:
            raise ValueError("the network's metadata has no 'working_grid' with 'spacing_mm' and 'direction_ras'")
        self.device = choose_device(device)
        self.network = copy.deepcopy(network).to(self.device).eval()
        self.metadata = metadata
        self.fixed, self.fixed_grid = fixed, fixed_grid
        self.moving, self.moving_grid = moving, moving_grid
        self.affine_ras = np.eye(4) if affine_ras is None else np.asarray(affine_ras, dtype=np.float64)
        self.work = working_grid_for(fixed_grid, float(spec["spacing_mm"]), network.config.divisor, spec["direction_ras"])
        self._working_images: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        with torch.no_grad():
            if encoded is None:
                encoded = self.network.encode(*self.working_images())
            self.encoded = EncodedPair([t.to(self.device) for t in encoded.skips], tuple(encoded.padding), tuple(encoded.shape))
            self._prepare_full_resolution()
        self.prepare_s = time.perf_counter() - start

    def working_images(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(fixed, moving) network inputs on the working grid, (1, 1, z, y, x) each (made on first use)."""
        if self._working_images is None:
            fixed = torch.as_tensor(to_working_grid(self.fixed, self.fixed_grid, self.work))[None, None].to(self.device)
            moving = torch.as_tensor(to_working_grid(self.moving, self.moving_grid, self.work, self.affine_ras))[None, None]
            self._working_images = (fixed, moving.to(self.device))
        return self._working_images

    # ----------------------------------------------------------------------------------- state
    def state(self) -> dict:
        """Everything of this session but the network and the images, as plain tensors, numbers and
        lists (``torch.save`` it; it reads back with ``weights_only=True``): the affine and the
        encoder features. :meth:`restore` rebuilds the session from it without running the encoder
        again (how the Slicer panel receives a session that a background process computed)."""
        return {
            "affine_ras": torch.as_tensor(self.affine_ras, dtype=torch.float64),
            "skips": [t.detach().cpu() for t in self.encoded.skips],
            "padding": [int(p) for p in self.encoded.padding],
            "shape": [int(n) for n in self.encoded.shape],
        }

    @classmethod
    def restore(
        cls,
        network: RegistrationNetwork,
        metadata: dict,
        fixed: np.ndarray,
        fixed_grid: ImageGrid,
        moving: np.ndarray,
        moving_grid: ImageGrid,
        state: dict,
        device: Optional[str] = None,
    ) -> NetworkRegistration:
        """The session :meth:`state` describes, for the same network, metadata and images.

        Raises:
            ValueError: a state whose encoder features do not fit this network and fixed image.
        """
        encoded = EncodedPair(list(state["skips"]), tuple(state["padding"]), tuple(state["shape"]))
        session = cls(network, metadata, fixed, fixed_grid, moving, moving_grid,
                      np.asarray(state["affine_ras"], dtype=np.float64), device, encoded)
        if tuple(session.encoded.skips[0].shape[2:]) != tuple(session.work.shape):
            raise ValueError(
                f"the saved network session was computed on a working grid of {tuple(session.encoded.skips[0].shape[2:])} "
                f"voxels, but this fixed image gives {session.work.shape}"
            )
        return session

    def _prepare_full_resolution(self) -> None:
        """Cache what every λ needs: the moving image as a tensor and the sampler of the network's
        coarse fields at the fixed voxels (:class:`engine.fields.FixedGridSampler`)."""
        self._sampler = FixedGridSampler(self.fixed_grid, self.work, self.affine_ras, self.moving_grid, self.device)
        self.moving_tensor = volume_tensor(np.ascontiguousarray(self.moving, dtype=np.float32), self.device)

    # ----------------------------------------------------------------------------------- predict
    @torch.no_grad()
    def predict(self, lam: float) -> RegistrationResult:
        """Registration at regularization weight ``lam`` ∈ [0, 1] on the fixed grid (see module docstring).

        Raises:
            ValueError: λ outside [0, 1].
        """
        lam = float(lam)
        if not 0.0 <= lam <= 1.0 or math.isnan(lam):
            raise ValueError(f"λ must be in [0, 1], got {lam}")
        start = time.perf_counter()
        out = self.network.decode_coarse(self.encoded, lam)
        warped, displacement_ras, weight_map = warp_and_displacement(self._sampler, self.moving_tensor, out.displacement,
                                                                    out.weight_map)
        return RegistrationResult(
            fixed_grid=self.fixed_grid,
            warped=warped,
            displacement_ras=displacement_ras,
            jacobian=jacobian_map(displacement_ras, self.fixed_grid),
            lambda_map=(lam * weight_map[0]).cpu().numpy(),
            affine_ras=self.affine_ras,
            velocity=out.velocity.cpu(),
            velocity_grid=self.work.resized(out.velocity.shape[2:]),
            runtime_s=time.perf_counter() - start,
            device=str(self.device),
            regularization_weight=lam,
            similarity="network",
            history={"time_predict_s": time.perf_counter() - start, "time_prepare_s": self.prepare_s},
        )

    @torch.no_grad()
    def weight_map(self, lam: float = 0.5) -> np.ndarray:
        """The network's λ(x) ∈ (0, 1) (not scaled by λ) on the fixed grid, (Z, Y, X) float32."""
        out = self.network.decode_coarse(self.encoded, float(lam))
        return self._sampler.to_fixed(self._sampler.coarse_fields(out.displacement, out.weight_map)[:, 6:])[0, 0].cpu().numpy()

    # ----------------------------------------------------------------------------------- start
    @torch.no_grad()
    def velocity_on(self, lam: float, grid: ImageGrid) -> torch.Tensor:
        """The network's velocity at ``lam`` resampled onto ``grid`` (trilinear, border values outside
        the working grid), in ``grid``'s normalized units: (1, 3, z, y, x), channels (x, y, z).

        The starting point of the network's test-time adaptation, a λ path on the fixed image's
        grid (:func:`adapt`). Vectors are rotated from the working grid's frame into ``grid``'s
        (through RAS mm); both velocities act before the affine, on the fixed side.
        """
        velocity = self.network.decode_coarse(self.encoded, float(lam)).velocity
        source = self.work.resized(velocity.shape[2:])
        points = sampling_grid(grid, source, device=self.device)
        resampled = grid_sample(velocity, points, "linear", padding_mode="border")
        # normalized working vector -> RAS mm -> grid's normalized frame
        to_ras = np.asarray(self.work.direction) @ np.diag(self.work.normalized_unit_mm)
        to_grid = np.diag(1.0 / grid.normalized_unit_mm) @ np.asarray(grid.direction).T @ to_ras
        matrix = torch.as_tensor(to_grid.astype(np.float32), device=self.device)
        return torch.einsum("ck,nkzyx->nczyx", matrix, resampled)


def register_with_network(
    network: RegistrationNetwork,
    metadata: dict,
    fixed: np.ndarray,
    fixed_grid: ImageGrid,
    moving: np.ndarray,
    moving_grid: ImageGrid,
    options: Optional[RegistrationOptions] = None,
    fixed_mask: Optional[np.ndarray] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelCallback] = None,
) -> NetworkRegistration:
    """The network method end to end: the optimizer's affine stage, then a :class:`NetworkRegistration`.
    Call ``.predict(λ)`` on the result for any λ.

    Args:
        options: :class:`engine.common.RegistrationOptions` for the affine stage (initialization,
            affine model and pyramid, similarity, device); its deformable levels are ignored.
        fixed_mask: optional (Z, Y, X) mask on the fixed grid for the affine similarity.
        progress, cancel: as in :func:`engine.optimize.register_images`.

    Raises:
        ValueError: bad images (as :func:`engine.optimize.register_images`).
        engine.common.RegistrationCancelled: when ``cancel()`` returned True.
    """
    def report(fraction: float, message: str) -> None:
        if progress is not None:
            progress(fraction, message)

    options = (options or RegistrationOptions()).validated()
    affine_only = replace(options, deformable_spacings_mm=(), deformable_iterations=())
    report(0.0, "affine alignment")
    affine = register_images(
        fixed, fixed_grid, moving, moving_grid, affine_only, fixed_mask=fixed_mask,
        progress=lambda fraction, message: report(0.9 * fraction, message), cancel=cancel,
    ).affine_ras
    report(0.9, "network: encoding the pair")
    session = NetworkRegistration(network, metadata, fixed, fixed_grid, moving, moving_grid, affine, options.device)
    report(1.0, "network ready")
    return session


def adapt(
    session: NetworkRegistration,
    options: Optional[RegistrationOptions] = None,
    path: Optional[PathOptions] = None,
    fixed_mask: Optional[np.ndarray] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelCallback] = None,
) -> LambdaPath:
    """Test-time adaptation of the network to its pair: the λ path (:func:`engine.path.register_path`)
    started from the network's prediction at each knot, with the network's affine. The network
    itself is never trained here (the shipped weights stay as they are).

    Args:
        session: the network bound to the pair (:func:`register_with_network`).
        options, fixed_mask, progress, cancel: as :func:`engine.path.register_path`.
        path: the path's knots and steps per knot.

    Raises:
        as :func:`engine.path.register_path`.
    """
    return register_path(session.fixed, session.fixed_grid, session.moving, session.moving_grid, options, path,
                         fixed_mask=fixed_mask, progress=progress, cancel=cancel, start=session.velocity_on,
                         affine=session.affine_ras)
