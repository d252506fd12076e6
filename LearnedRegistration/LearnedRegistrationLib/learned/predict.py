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
3. **adapt** (optional, test-time adaptation): instance optimization *started from the network's
   prediction*, at a few knots of λ (default 0.1, 0.25, 0.5, 0.75), each warm-started from the
   previous knot. What is optimized is a residual velocity ``r_k`` per knot on the network's own
   velocity grid, with the optimizer path's loss (:func:`engine.optimize.svf_objective`) on the working grid:
   ``(1 - λ)·MSE(fixed, moving∘exp(v)) + κ·mean_x λ·λ̂(x)|∇v|² + γ·negJac``, ``v = v_net(λ) + r``,
   ``λ̂(x) = λ(x) / mean λ(x)`` the network's map. Afterwards ``predict(λ)`` adds the residual
   interpolated linearly in λ between knots (constant below the first, fading to 0 at λ = 1), so
   the slider stays instant. The network itself is never trained here: the shipped weights on
   disk and in any cached network stay as they are.

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
import torch.nn.functional as F

from ..engine.common import (
    CancelCallback,
    ProgressCallback,
    RegistrationCancelled,
    RegistrationOptions,
    RegistrationResult,
    choose_device,
    match_histogram,
    normalize_intensity,
    validate_volume,
)
from ..engine.filters import box_mean
from ..engine.grid import ImageGrid, mm_per_normalized_unit
from ..engine.metrics import jacobian_map
from ..engine.optimize import register_images, svf_objective
from ..engine.transforms import (
    AxisAlignedResampler,
    grid_sample,
    integrate_svf,
    per_channel,
    resample_image,
    resize_field,
    sampling_grid,
)
from .network import EncodedPair, RegistrationNetwork
from .options import AdaptationOptions


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
        return box_mean(torch.as_tensor(np.ascontiguousarray(image, dtype=np.float32))[None, None], width)[0, 0].numpy()


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
        self.adapted_steps = 0
        self.residuals: list = []  # [(λ knot, (1, 3, z, y, x) residual velocity)], see adapt()
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
        lists (``torch.save`` it; it reads back with ``weights_only=True``): the affine, the encoder
        features and the adapted residuals. :meth:`restore` rebuilds the session from it without
        running the encoder or the adaptation again (how the Slicer panel receives a session that
        a background process computed)."""
        return {
            "affine_ras": torch.as_tensor(self.affine_ras, dtype=torch.float64),
            "skips": [t.detach().cpu() for t in self.encoded.skips],
            "padding": [int(p) for p in self.encoded.padding],
            "shape": [int(n) for n in self.encoded.shape],
            "residuals": [[float(lam), r.detach().cpu()] for lam, r in self.residuals],
            "adapted_steps": int(self.adapted_steps),
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
        session.residuals = [(float(lam), r.to(session.device)) for lam, r in state["residuals"]]
        session.adapted_steps = int(state["adapted_steps"])
        return session

    def _prepare_full_resolution(self) -> None:
        """Cache what every λ needs: the moving image as a tensor and the two 3x3 maps from a
        normalized working displacement to RAS mm (through the affine) and to the moving image's
        normalized frame (the fixed voxels' working positions come in :meth:`_to_fixed`)."""
        # Geometry of the network's output grid, built by _coarse_fields() for the shape it sees:
        self._coarse_shape = self._extended_grid = self._coarse_base = None
        self._resampler = None  # fixed <- extended grid, when axis-aligned (see _to_fixed())
        self._points = None  # else (1, Z, Y, X, 3) fixed voxels in the extended grid's frame
        a3 = self.affine_ras[:3, :3]
        to_moving = self.moving_grid.ras_to_normalized
        # normalized working displacement (x, y, z) -> mm along working I, J, K -> RAS -> through A
        to_ras = a3 @ np.asarray(self.work.direction) @ np.diag(self.work.normalized_unit_mm)
        # (3, 6): a row vector u maps to [RAS mm | moving image's normalized frame]
        linear = np.concatenate([to_ras.T, (to_moving[:3, :3] @ to_ras).T], axis=1)
        self._linear = torch.as_tensor(linear.astype(np.float32), device=self.device)
        self.moving_tensor = torch.as_tensor(np.ascontiguousarray(self.moving, dtype=np.float32), device=self.device)[None, None]

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
        out = self._decode(lam)
        fields = self._coarse_fields(out)  # (1, 7, z + 2, y + 2, x + 2)
        sampled = self._to_fixed(fields)[0]  # (7, Z, Y, X)
        displacement_ras = sampled[:3].permute(1, 2, 3, 0).contiguous().cpu().numpy()  # (Z, Y, X, 3) RAS mm
        moving_points = sampled[3:6].permute(1, 2, 3, 0).contiguous().unsqueeze(0)  # (1, Z, Y, X, 3)
        warped = grid_sample(self.moving_tensor, moving_points, "linear", padding_mode="zeros")[0, 0]
        del moving_points
        weight_map = sampled[6]
        result = RegistrationResult(
            fixed_grid=self.fixed_grid,
            warped=warped.cpu().numpy(),
            displacement_ras=displacement_ras,
            jacobian=jacobian_map(displacement_ras, self.fixed_grid),
            lambda_map=(lam * weight_map).cpu().numpy(),
            affine_ras=self.affine_ras,
            velocity=out.velocity.cpu(),
            velocity_grid=self.work.resized(out.velocity.shape[2:]),
            runtime_s=time.perf_counter() - start,
            device=str(self.device),
            regularization_weight=lam,
            similarity="network" if not self.adapted_steps else f"network+adapt({self.adapted_steps})",
            history={"time_predict_s": time.perf_counter() - start, "time_prepare_s": self.prepare_s},
        )
        return result

    def _to_fixed(self, coarse: torch.Tensor) -> torch.Tensor:
        """(1, C, z + 2, y + 2, x + 2) fields on the extended output grid (:meth:`_coarse_fields`) ->
        (1, C, Z, Y, X) at the fixed voxels (trilinear): three 1-D passes when the grids are
        axis-aligned, else ``grid_sample``."""
        if self._resampler is not None:
            return self._resampler(coarse)
        if self._points is None:
            self._points = sampling_grid(self.fixed_grid, self._extended_grid, device=self.device)
        return grid_sample(coarse, self._points, "linear", padding_mode="border")

    def _coarse_fields(self, out) -> torch.Tensor:
        """Everything a slider move samples, on the network's output grid: (1, 7, z + 2, y + 2, x + 2)
        = RAS displacement ``d = A(x + u) - x`` (mm, 3), moving-image normalized position of
        ``A(x + u)`` (3) and λ(x) (1).

        The affine parts are linear in ``x``, and trilinear interpolation reproduces linear
        functions exactly, so sampling these channels at the fixed voxels gives the same
        displacement and moving positions as composing at full resolution, for a fraction of the
        memory traffic. The grid is extended by one voxel on every side, because the outermost
        fixed voxels may lie up to half a working voxel beyond the working grid's outermost voxel
        centres: there the affine part is still computed exactly and the network's part takes its
        border value.
        """
        u = out.displacement  # (1, 3, z, y, x) normalized working units
        shape = tuple(u.shape[2:])
        if self._coarse_shape != shape:
            self._coarse_shape = shape
            grid = self.work.resized(shape)
            extended = ImageGrid(tuple(n + 2 for n in shape), grid.spacing, grid.origin - grid.direction @ np.asarray(grid.spacing), grid.direction)
            ras = extended.world_points()  # (z + 2, y + 2, x + 2, 3) RAS mm
            moved = ras @ self.affine_ras[:3, :3].T + self.affine_ras[:3, 3]
            to_moving = self.moving_grid.ras_to_normalized
            base = np.concatenate([moved - ras, moved @ to_moving[:3, :3].T + to_moving[:3, 3]], axis=-1)
            self._coarse_base = torch.as_tensor(base.transpose(3, 0, 1, 2)[None].astype(np.float32), device=self.device)
            self._extended_grid = extended
            self._resampler = AxisAlignedResampler.between(self.fixed_grid, extended, self.device)
            self._points = None
        deformable = torch.cat([torch.einsum("nkzyx,kc->nczyx", u, self._linear), out.weight_map], dim=1)
        deformable = F.pad(deformable, (1,) * 6, mode="replicate")  # border value, like grid_sample's "border"
        return torch.cat([self._coarse_base + deformable[:, :6], deformable[:, 6:]], dim=1)

    def residual(self, lam: float) -> Optional[torch.Tensor]:
        """Adapted residual velocity at ``lam`` (None before :meth:`adapt`): linear between knots,
        the first knot's below it, fading linearly to zero between the last knot and λ = 1."""
        if not self.residuals:
            return None
        knots = [k for k, _ in self.residuals] + [1.0]
        fields = [r for _, r in self.residuals] + [torch.zeros_like(self.residuals[0][1])]
        if lam <= knots[0]:
            return fields[0]
        for (k0, f0), (k1, f1) in zip(zip(knots, fields), zip(knots[1:], fields[1:])):
            if lam <= k1:
                t = (lam - k0) / (k1 - k0)
                return (1.0 - t) * f0 + t * f1
        return fields[-1]

    def _decode(self, lam: float):
        """The network's coarse fields at ``lam``, plus the adapted residual when there is one."""
        out = self.network.decode_coarse(self.encoded, lam)
        residual = self.residual(lam)
        if residual is None:
            return out
        velocity = out.velocity + residual
        return out._replace(velocity=velocity, displacement=integrate_svf(velocity, self.network.config.integration_steps))

    @torch.no_grad()
    def weight_map(self, lam: float = 0.5) -> np.ndarray:
        """The network's λ(x) ∈ (0, 1) (not scaled by λ) on the fixed grid, (Z, Y, X) float32."""
        out = self.network.decode_coarse(self.encoded, float(lam))
        return self._to_fixed(self._coarse_fields(out)[:, 6:])[0, 0].cpu().numpy()

    # ----------------------------------------------------------------------------------- adapt
    def adapt(
        self,
        options: Optional[AdaptationOptions] = None,
        progress: Optional[ProgressCallback] = None,
        cancel: Optional[CancelCallback] = None,
    ) -> list[dict]:
        """Test-time adaptation: residual velocities at the knots of λ (module docstring).

        Replaces any earlier adaptation. On cancellation the session is left as before the call.

        Returns:
            One dict per knot: ``lambda``, ``steps``, final ``similarity``, ``regularization``, ``loss``.

        Raises:
            engine.common.RegistrationCancelled: when ``cancel()`` returned True.
        """
        options = (options or AdaptationOptions()).validated()
        moving = match_histogram(self.moving, self.fixed)
        moving_work = torch.as_tensor(to_working_grid(moving, self.moving_grid, self.work, self.affine_ras))[None, None].to(self.device)
        fixed_work = self.working_images()[0]
        levels = {"fine": (fixed_work, moving_work)}
        if options.coarse_steps:
            half = tuple(max(2, n // 2) for n in self.work.shape)
            levels["coarse"] = tuple(resize_field(box_mean(x, [3, 3, 3]), half) for x in (fixed_work, moving_work))
        steps_total, done = options.total_steps, 0
        residuals, history = [], []
        previous = None
        for index, lam in enumerate(float(k) for k in options.knots):
            with torch.no_grad():
                out = self.network.decode_coarse(self.encoded, lam)
            grid = self.work.resized(out.velocity.shape[2:])
            to_norm = per_channel(1.0 / mm_per_normalized_unit(grid.shape), self.device)  # voxels -> normalized
            residual_vox = (torch.zeros_like(out.velocity) if previous is None else previous / to_norm).requires_grad_(True)
            optimizer = torch.optim.Adam([residual_vox], lr=options.learning_rate_vox)
            schedule = [("coarse", options.coarse_steps), ("fine", options.first_steps)] if index == 0 else [("fine", options.steps)]
            for level, steps in schedule:
                fixed_l, moving_l = levels.get(level, levels["fine"])
                for _ in range(int(steps)):
                    if cancel is not None and cancel():
                        raise RegistrationCancelled("adaptation cancelled")
                    optimizer.zero_grad(set_to_none=True)
                    loss, sim, reg = svf_objective(
                        out.velocity + residual_vox * to_norm, grid, fixed_l, moving_l,
                        self.work.resized(fixed_l.shape[2:]).spacing, lam, out.weight_map, "mse",
                        normalize_weight_map=True, integration_steps=self.network.config.integration_steps,
                        jacobian_penalty=options.jacobian_penalty,
                    )
                    loss.backward()
                    optimizer.step()
                    done += 1
                    if progress is not None:
                        progress(done / max(1, steps_total), f"adapting at λ = {lam:g}: step {done}/{steps_total}")
            previous = (residual_vox * to_norm).detach()
            residuals.append((lam, previous))
            ran = sum(n for _, n in schedule)
            history.append({"lambda": lam, "steps": ran, "similarity": sim.item() if ran else None,
                            "regularization": reg.item() if ran else None, "loss": loss.item() if ran else None})
        self.residuals = residuals
        self.adapted_steps = done
        return history


def register_with_network(
    network: RegistrationNetwork,
    metadata: dict,
    fixed: np.ndarray,
    fixed_grid: ImageGrid,
    moving: np.ndarray,
    moving_grid: ImageGrid,
    options: Optional[RegistrationOptions] = None,
    adaptation: Optional[AdaptationOptions] = None,
    fixed_mask: Optional[np.ndarray] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelCallback] = None,
) -> NetworkRegistration:
    """The network method end to end: the optimizer's affine stage, then a :class:`NetworkRegistration`
    (adapted when ``adaptation`` is given). Call ``.predict(λ)`` on the result for any λ.

    Args:
        options: :class:`engine.common.RegistrationOptions` for the affine stage (initialization,
            affine model and pyramid, similarity, device); its deformable levels are ignored.
        adaptation: test-time adaptation settings, or None for the network alone.
        fixed_mask: optional (Z, Y, X) mask on the fixed grid for the affine similarity.
        progress, cancel: as in :func:`engine.optimize.register_images` (affine 0-30 %, adaptation 35-95 %).

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
        progress=lambda fraction, message: report(0.3 * fraction, message), cancel=cancel,
    ).affine_ras
    report(0.3, "network: encoding the pair")
    session = NetworkRegistration(network, metadata, fixed, fixed_grid, moving, moving_grid, affine, options.device)
    if adaptation is not None:
        session.adapt(adaptation, progress=lambda fraction, message: report(0.35 + 0.6 * fraction, message), cancel=cancel)
    return session

