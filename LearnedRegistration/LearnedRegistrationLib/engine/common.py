"""What the optimizer, the network path and the logic share: options, result, cancellation, input checks.

:class:`RegistrationOptions` and :class:`RegistrationResult` are the contract between the engine and
its callers (the MRML logic, the network path, the scripts); :func:`validate_volume`,
:func:`normalize_intensity` and :func:`match_histogram` prepare the images the same way for every
method; :func:`choose_device` picks where torch runs.

This module imports neither torch nor SimpleITK at import time (they are imported where they are
used), so the Slicer panel and the logic can use its types and defaults before PyTorch is installed.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import numpy as np

from .grid import ImageGrid

if TYPE_CHECKING:
    import torch

#: Names of the similarity measures (:func:`similarity.similarity_loss`).
SIMILARITIES = ("mse", "lncc", "ncc", "ngf", "mi", "mind")
#: Similarities that are sums over voxels of a function of the two intensities (NCC and MI through
#: their sums and histogram): they can be measured on a sample of voxels (:func:`optimize.sampled_similarity`).
POINTWISE_SIMILARITIES = ("mse", "ncc", "mi")
#: Similarities whose finest level is measured at the images' own resolution (``native_final_level``):
#: MSE only, where it was measured to help (full benchmark: OASIS Dice +0.009 both ways, synthetic
#: brain 0.34 -> 0.19 mm); MI lost 0.036 Dice on OASIS with it (its histogram of unsmoothed 1 mm
#: intensities); NCC was not measured.
NATIVE_LEVEL_SIMILARITIES = ("mse",)

#: The similarity for each situation, "same-modality" (the default) and "multimodal", chosen by
#: measurement on scripts/benchmark.py's pairs (ours at the default λ, mean displacement error):
#: multimodal_cardiac (bSSFP / LGE) mind 2.58 mm, mi 5.74 mm, ngf 3.71 mm (no registration 1.52 mm:
#: none beats it yet); same modality: MSE, with histogram matching (synth_brain 0.36 mm, no
#: registration 2.09 mm). The situation is the user's to state: the images alone do not tell it
#: reliably (the mean distance between the two images' normalized foreground intensity quantiles
#: is 0.044 for the OASIS T1 pair, 0.045 for the bSSFP / LGE pair, 0.27 for two T1 scans with
#: different fields of view), so there is no "auto".
SITUATION_SIMILARITIES = {"same-modality": "mse", "multimodal": "mind"}


def resolve_similarity(name: str) -> str:
    """The similarity measure a name stands for: a situation of :data:`SITUATION_SIMILARITIES`
    ("same-modality", "multimodal") gives its measure, a measure of :data:`SIMILARITIES` itself.

    Raises:
        ValueError: for any other name, listing what is accepted.
    """
    key = str(name).strip().lower()
    if key in SITUATION_SIMILARITIES:
        return SITUATION_SIMILARITIES[key]
    if key in SIMILARITIES:
        return key
    raise ValueError(f"similarity must be one of {', '.join((*SITUATION_SIMILARITIES, *SIMILARITIES))}, got {name!r}")

#: Default regularization weight λ (slider position).
DEFAULT_LAMBDA = 0.25

#: Adam steps per λ knot of the λ path beyond the reference one (``engine.path.PathOptions``);
#: here, torch-free, so that the logic can use it before torch is loaded.
PATH_KNOT_ITERATIONS = 16

INITIALIZATIONS = ("com", "moments", "none")
AFFINE_MODELS = ("affine", "rigid", "none")

#: ``progress(fraction in [0, 1], message)``, called as the work advances.
ProgressCallback = Callable[[float, str], None]
#: ``cancel() -> True`` to stop; polled at every iteration.
CancelCallback = Callable[[], bool]


class RegistrationCancelled(RuntimeError):
    """Raised when a ``cancel`` callable returned True (:func:`optimize.register_images`, the network's
    test-time adaptation); nothing the call was computing is kept."""


@dataclass
class RegistrationOptions:
    """Settings of :func:`optimize.register_images` (the network path uses its initialization and affine stage).

    Attributes:
        similarity: "mse" (default; same contrast, robustly normalized intensities), "lncc"
            (same modality, varying contrast), "ncc", "ngf", "mi" or "mind" (MIND-SSC; multi-modal),
            or a situation, "same-modality" or "multimodal", replaced by its measure
            (:func:`resolve_similarity`) when the options are made.
        regularization_weight: λ in [0, 1], the HyperMorph weight (0 = similarity only, 1 = no
            deformation; the loss is in :mod:`optimize`).
        initialization: "com", "moments" or "none".
        affine_model: "affine", "rigid" or "none" (keep the initialization).
        affine_spacings_mm / affine_iterations: pyramid of the affine stage.
        deformable_spacings_mm / deformable_iterations: pyramid of the SVF stage (coarse to fine);
            an empty tuple skips the deformable stage.
        iteration_scale: multiplies every iteration count (``0.25`` for a quick preview).
        lncc_window_mm: LNCC window edge in mm.
        svf_steps: scaling-and-squaring steps.
        learning_rate_vox: Adam step of the velocity, in units of the control grid's finest spacing
            on every axis (voxels of an isotropic grid), so that a step is as long in mm along a
            thick-slice axis as in-plane (:func:`optimize.optimize_velocity`).
        smoothing_sigma_vox: Gaussian smoothing of the velocity parameters each iteration (a
            preconditioner in the manner of ConvexAdam's instance optimization).
        control_spacing_factor: the velocity of each level lives on a grid this many times
            coarser than the level (1 = same grid).
        native_final_level: with MSE (:data:`NATIVE_LEVEL_SIMILARITIES`), the
            finest deformable level measures the similarity at the fixed image's own resolution,
            on a lattice of about as many voxels as the level has (every 2nd voxel per axis of a
            1 mm image at the 2 mm level, :func:`optimize.native_stride`), instead of on images
            down-sampled to the level's spacing; its velocity keeps the level's control grid, so a
            step costs about the same (:func:`optimize.prepare_pair`). Fixed images of more than
            :data:`optimize.NATIVE_LEVEL_MAX_VOXELS` voxels keep the down-sampled level.
        jacobian_penalty: γ, weight of the penalty on non-positive Jacobian determinants.
        histogram_matching: with "mse", map the moving intensities onto the fixed image's
            histogram first (Nyúl & Udupa style quantile matching, SimpleITK), as demons does;
            other similarities are insensitive to such changes and skip it.
        device: "cpu", "cuda", "cuda:N" or None (automatic).
        seed: torch seed (the optimization itself is deterministic on CPU).
    """

    similarity: str = "mse"
    regularization_weight: float = DEFAULT_LAMBDA
    initialization: str = "com"
    affine_model: str = "affine"
    affine_spacings_mm: Sequence[float] = (8.0, 4.0)
    affine_iterations: Sequence[int] = (60, 40)
    deformable_spacings_mm: Sequence[float] = (4.0, 2.0)
    deformable_iterations: Sequence[int] = (100, 40)
    iteration_scale: float = 1.0
    lncc_window_mm: float = 9.0
    svf_steps: int = 5
    learning_rate_vox: float = 0.5
    smoothing_sigma_vox: float = 0.0
    control_spacing_factor: float = 2.0
    native_final_level: bool = True
    jacobian_penalty: float = 1.0
    histogram_matching: bool = True
    device: Optional[str] = None
    seed: int = 0

    def __post_init__(self) -> None:
        # a situation name becomes its measure here, so results and metrics name the measure used
        if isinstance(self.similarity, str) and self.similarity.strip().lower() in SITUATION_SIMILARITIES:
            self.similarity = resolve_similarity(self.similarity)

    def validated(self) -> RegistrationOptions:
        """Return self after checking every field.

        Raises:
            ValueError: naming the first bad field and what it accepts.
        """
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {', '.join(SIMILARITIES)}, got {self.similarity!r}")
        lam = float(self.regularization_weight)
        if not (0.0 <= lam <= 1.0) or math.isnan(lam):
            raise ValueError(f"regularization weight λ must be in [0, 1], got {self.regularization_weight}")
        if self.initialization not in INITIALIZATIONS:
            raise ValueError(f"initialization must be one of {', '.join(INITIALIZATIONS)}, got {self.initialization!r}")
        if self.affine_model not in AFFINE_MODELS:
            raise ValueError(f"affine_model must be one of {', '.join(AFFINE_MODELS)}, got {self.affine_model!r}")
        if len(self.affine_spacings_mm) != len(self.affine_iterations):
            raise ValueError("affine_spacings_mm and affine_iterations must have the same length")
        if len(self.deformable_spacings_mm) != len(self.deformable_iterations):
            raise ValueError("deformable_spacings_mm and deformable_iterations must have the same length")
        if any(s <= 0 for s in (*self.affine_spacings_mm, *self.deformable_spacings_mm)):
            raise ValueError("pyramid spacings must be positive (mm)")
        if self.iteration_scale <= 0:
            raise ValueError(f"iteration_scale must be positive, got {self.iteration_scale}")
        return self


@dataclass
class RegistrationResult:
    """A registration at one λ (:func:`optimize.register_images`, the network's ``predict``); arrays are
    numpy on the CPU, on the fixed grid.

    Attributes:
        fixed_grid: geometry of every array below.
        warped: (Z, Y, X) float32, the moving image resampled into the fixed grid.
        displacement_ras: (Z, Y, X, 3) float32, RAS mm, resampling ("from parent") convention:
            the moving point matching fixed point ``x`` is ``x + d(x)`` (affine included).
        jacobian: (Z, Y, X) float32, ``det(I + dd/dx)``.
        lambda_map: (Z, Y, X) float32, the regularization weight used at each voxel (λ · λ(x)).
        affine_ras: (4, 4) resampling affine (fixed RAS -> moving RAS) found before the SVF.
        velocity: (1, 3, Z', Y', X') stationary velocity on ``velocity_grid``, normalized units.
        velocity_grid: grid of ``velocity`` (the finest deformable level), or None.
        runtime_s: wall time of the call in seconds.
        device: the torch device used.
        regularization_weight: λ.
        similarity: similarity name.
        history: final loss and elapsed time (s) of each stage.
    """

    fixed_grid: ImageGrid
    warped: np.ndarray
    displacement_ras: np.ndarray
    jacobian: np.ndarray
    lambda_map: np.ndarray
    affine_ras: np.ndarray
    velocity: Optional[torch.Tensor]
    velocity_grid: Optional[ImageGrid]
    runtime_s: float
    device: str
    regularization_weight: float
    similarity: str
    history: dict[str, float] = field(default_factory=dict)


def choose_device(requested: Optional[str] = None) -> torch.device:
    """The torch device to run on: ``requested`` ("cpu", "cuda" or "cuda:N"), or CUDA when available, else CPU.

    Only CPU and CUDA devices are accepted: other torch device types ("mps", "meta", "xpu" ...)
    parse as devices but fail part-way through a registration (float64 steps, no data on "meta").

    Raises:
        ValueError: for any other name or device type, for CUDA when no CUDA GPU is available, or
            for a GPU index beyond the GPUs present; the message says what is accepted.
    """
    import torch

    if requested is None or (isinstance(requested, str) and requested.strip().lower() in ("", "auto")):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    accepted = "use 'cpu', 'cuda' (or 'cuda:N' for GPU N) or leave it automatic"
    try:
        device = torch.device(requested.strip().lower() if isinstance(requested, str) else requested)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {requested!r}; {accepted}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {requested!r} is not supported (LearnedRegistration runs on the CPU or CUDA GPUs); {accepted}")
    if device.type == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"device {requested!r} was requested but no CUDA GPU is available; use 'cpu' or automatic")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ValueError(f"device {requested!r}: this machine has {count} CUDA GPU(s), 'cuda:0' to 'cuda:{count - 1}'")
    return device


def validate_volume(name: str, image: np.ndarray, grid: ImageGrid) -> np.ndarray:
    """Check a (Z, Y, X) volume against its grid and return it as float32.

    Raises:
        ValueError: for a 2D (single-slice) or non-3D array, a shape that does not match the grid,
            NaN or infinite values, or an empty (constant) volume.
    """
    image = np.asarray(image)
    if image.ndim != 3 or min(image.shape) < 2:
        raise ValueError(
            f"the {name} image must be a 3D volume with at least 2 voxels along each axis, got shape {image.shape}; "
            "2D images are not supported"
        )
    if image.shape != grid.shape:
        raise ValueError(f"the {name} image has shape {image.shape} but its geometry says {grid.shape}")
    image = image.astype(np.float32, copy=False)
    if not np.isfinite(image).all():
        raise ValueError(f"the {name} image contains NaN or infinite values; fix or mask them before registering")
    if float(image.max()) == float(image.min()):
        raise ValueError(f"the {name} image is empty: every voxel equals {float(image.min())}")
    return image


def volume_tensor(image: np.ndarray, device=None) -> torch.Tensor:
    """(1, 1, Z, Y, X) tensor of a (Z, Y, X) array, sharing its memory on the CPU, read-only arrays included.

    The logic hands the engine read-only views of Slicer's voxels (:func:`bridge.mrml.arrayFromVolumeNode`
    with ``copy=False``); the engine never writes its inputs, so torch's warning about non-writable
    arrays is silenced here instead of copying a volume.
    """
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.as_tensor(image, device=device)[None, None]


def normalize_intensity(image: np.ndarray) -> np.ndarray:
    """Robust rescale to about [0, 1] (0.5th-99.5th percentile), so losses and κ have a known scale.

    Returns a new (Z, Y, X) float32 array, computed slab by slab (:func:`z_slabs`): the float64
    arithmetic never holds more than a slab.
    """
    sample = image.reshape(-1)[:: max(1, image.size // 2_000_000)]
    lo, hi = np.percentile(sample, [0.5, 99.5])
    if hi <= lo:
        lo, hi = float(image.min()), float(image.max())
    out = np.empty(image.shape, dtype=np.float32)
    for z0, z1 in z_slabs(image.shape):
        out[z0:z1] = np.clip((image[z0:z1] - lo) / (hi - lo), -0.5, 1.5)
    return out


def match_histogram(moving: np.ndarray, fixed: np.ndarray, levels: int = 256, match_points: int = 15) -> np.ndarray:
    """Moving intensities mapped onto the fixed image's histogram (SimpleITK ``HistogramMatching``).

    Voxels at or below each image's mean are treated as background and excluded from the
    quantiles (``ThresholdAtMeanIntensity``), so large empty regions do not dominate. Geometry is
    irrelevant here: only intensities change. Returns a (Z, Y, X) float32 array.
    """
    import SimpleITK as sitk

    matched = sitk.HistogramMatching(
        sitk.GetImageFromArray(np.asarray(moving, dtype=np.float32)),  # SimpleITK copies the voxels
        sitk.GetImageFromArray(np.asarray(fixed, dtype=np.float32)),
        numberOfHistogramLevels=levels,
        numberOfMatchPoints=match_points,
        thresholdAtMeanIntensity=True,
    )
    return np.array(sitk.GetArrayViewFromImage(matched), dtype=np.float32)


#: Voxels per slab of the full-resolution passes (:func:`z_slabs`): 2 M voxels, 8 MB per float32
#: channel, so that a slab's temporaries (sampling positions, their permuted copy, sampled
#: channels, derivatives: about 24 channels) stay near 200 MB whatever the volume.
SLAB_VOXELS = 1 << 21


def z_slabs(shape, voxels: Optional[int] = None) -> list[tuple[int, int]]:
    """``[(z0, z1), ...]``: consecutive ranges of the first (slowest) axis of an array of ``shape``
    (Z, Y, X) that cover it, each of about ``voxels`` voxels (default :data:`SLAB_VOXELS`; at least
    one slice).

    The full-resolution outputs (warped, displacement, Jacobian, checkerboard, difference, λ map)
    are computed slab by slab along Z and written into their arrays, so that a clinical-size
    volume (512 x 512 x 400) costs its outputs and a slab's temporaries.
    """
    depth, per_slice = int(shape[0]), max(1, int(np.prod(shape[1:])))
    step = max(1, int(SLAB_VOXELS if voxels is None else voxels) // per_slice)
    return [(z, min(depth, z + step)) for z in range(0, depth, step)]


#: Environment variable: the memory (GB, 10^9 bytes) a registration may still allocate, used
#: instead of what the system reports available (for tests, or a limit the system does not report).
MEMORY_LIMIT_ENV = "LEARNEDREG_MEMORY_LIMIT_GB"


def available_memory_bytes() -> Optional[int]:
    """Bytes of memory this process may still allocate, or None when the system does not say.

    ``$LEARNEDREG_MEMORY_LIMIT_GB`` when it is set; otherwise on Linux ``MemAvailable`` of
    ``/proc/meminfo`` (bounded by the control group's limit, in a container), on Windows the
    available physical memory, elsewhere ``os.sysconf``'s available pages where it has them.

    Raises:
        ValueError: ``$LEARNEDREG_MEMORY_LIMIT_GB`` is not a positive number.
    """
    value = os.environ.get(MEMORY_LIMIT_ENV, "").strip()
    if value:
        try:
            limit_gb = float(value)
        except ValueError:
            limit_gb = float("nan")
        if not (math.isfinite(limit_gb) and limit_gb > 0):
            raise ValueError(f"the environment variable {MEMORY_LIMIT_ENV} must be a positive number of GB, got {value!r}")
        return int(limit_gb * 1e9)
    available = _meminfo_available()
    if available is not None:
        headroom = _cgroup_headroom()
        return available if headroom is None else min(available, headroom)
    if sys.platform == "win32":
        return _windows_available()
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def release_freed_memory() -> None:
    """Hand memory that was freed but is still held by the C allocator back to the system (glibc's
    ``malloc_trim``; a no-op elsewhere).

    The optimizer frees thousands of tensors smaller than glibc's 32 MB ``mmap`` threshold, whose
    memory otherwise stays resident (about 0.6 GB after a λ path at a 2 mm working spacing) while
    the full-resolution outputs are made.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _meminfo_available() -> Optional[int]:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes (Linux), or None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_headroom() -> Optional[int]:
    """Bytes left below this control group's memory limit (cgroup v2, then v1), or None without a limit."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_file, encoding="ascii") as f:
                limit = f.read().strip()
            with open(usage_file, encoding="ascii") as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or not limit.isdigit() or int(limit) >= 1 << 60:  # no limit
            return None
        return max(0, int(limit) - usage)
    return None


def _windows_available() -> Optional[int]:
    """Available physical memory in bytes on Windows (``GlobalMemoryStatusEx``), or None."""
    import ctypes

    class MemoryStatus(ctypes.Structure):
        _fields_ = [("dwLength", ctypes.c_ulong), ("dwMemoryLoad", ctypes.c_ulong), ("ullTotalPhys", ctypes.c_ulonglong),
                    ("ullAvailPhys", ctypes.c_ulonglong), ("ullTotalPageFile", ctypes.c_ulonglong),
                    ("ullAvailPageFile", ctypes.c_ulonglong), ("ullTotalVirtual", ctypes.c_ulonglong),
                    ("ullAvailVirtual", ctypes.c_ulonglong), ("ullAvailExtendedVirtual", ctypes.c_ulonglong)]

    status = MemoryStatus()
    status.dwLength = ctypes.sizeof(MemoryStatus)
    try:
        if ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):
            return int(status.ullAvailPhys)
    except (AttributeError, OSError):
        pass
    return None
