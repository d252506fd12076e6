"""The computing half of the logic: a :class:`RegistrationRequest` (numpy arrays with their geometry)
in, a :class:`ComputedRegistration` (the engine's result, derived volumes, metrics) out.

No MRML, vtk or Qt here, and no torch at import time (the engine is imported where it runs), so the
same functions run in the Slicer panel's background process (:mod:`jobs`), in a script, in the
command line and in tests, while :mod:`logic` reads the request from MRML nodes and writes the
results into them on the main thread.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np

from ..engine.common import CancelCallback, ProgressCallback, RegistrationOptions, RegistrationResult
from ..engine.grid import ImageGrid
from .tasks import scaled_progress

if TYPE_CHECKING:  # torch-dependent types, imported where they are used
    from typing import Union

    import slicer

    from ..engine.path import LambdaPath
    from ..learned.network import RegistrationNetwork
    from ..learned.predict import NetworkRegistration

    #: What a λ change re-evaluates without a new optimization: ``.predict(λ)`` and ``.state()``.
    InstantSession = Union[LambdaPath, NetworkRegistration]

#: Registration methods: the λ path (every λ from one run), instance optimization at one λ, and
#: the experimental λ-conditioned network, alone or adapted to the pair.
METHODS = ("path", "optimize", "network", "network+adapt")
#: Methods whose λ changes need no new optimization.
INSTANT_METHODS = ("path", "network", "network+adapt")
#: Methods that are experimental: the shipped network, trained for under two hours on 2 CPU cores,
#: does not beat the affine stage on the OASIS validation pair (benchmarks/network.md).
EXPERIMENTAL_METHODS = ("network", "network+adapt")

#: The default method: the λ path, as accurate as the optimizer at every λ of the OASIS sweep
#: (within 0.005 Dice; benchmarks/results.md) and instant on the slider.
DEFAULT_METHOD = "path"
#: Whether the λ path learns a per-pair λ(x) by default (decided on the OASIS pairs: benchmarks/results.md).
DEFAULT_SPATIALLY_VARYING = False

#: Loaded networks by (resolved weights file, modification time): ``(network, metadata)``.
NetworkCache = dict[tuple[str, int], tuple["RegistrationNetwork", dict]]


@dataclass
class RegistrationRequest:
    """Everything :func:`computeRegistration` needs, as numpy arrays.

    Arrays are (Z, Y, X) on their grid (world RAS mm); points are (P, 3) RAS mm. ``lambdaMap`` lies
    on ``lambdaMapGrid`` (the fixed grid when None); it is resampled onto the fixed grid when the
    registration runs. ``scene`` and the node IDs are only used by ``writeOutputs`` (main thread).
    """

    fixed: np.ndarray
    fixedGrid: ImageGrid
    moving: np.ndarray
    movingGrid: ImageGrid
    options: RegistrationOptions
    fixedMask: Optional[np.ndarray] = None
    lambdaMap: Optional[np.ndarray] = None
    lambdaMapGrid: Optional[ImageGrid] = None
    fixedLabels: Optional[np.ndarray] = None
    movingLabels: Optional[np.ndarray] = None
    labelNames: Optional[list[str]] = None  # names of label values 1..N when labels came from segmentations
    movingLabelsAreSegmentation: bool = False
    evaluationLabels: Optional[list[int]] = None
    fixedPoints: Optional[np.ndarray] = None
    movingPoints: Optional[np.ndarray] = None
    method: str = DEFAULT_METHOD
    spatiallyVarying: bool = DEFAULT_SPATIALLY_VARYING  # learn a per-pair λ(x) map (the λ path)
    modelPath: Optional[str] = None  # network weights (None = the shipped ones)
    adaptationSteps: int = 0
    scene: Optional[slicer.vtkMRMLScene] = None
    fixedVolumeNodeID: str = ""
    movingVolumeNodeID: str = ""
    outputBaseName: str = "Registered"
    checkerboardSquareMm: float = 20.0

    def atLambda(self, regularizationWeight: float) -> RegistrationRequest:
        """The same request at another λ."""
        return replace(self, options=replace(self.options, regularization_weight=float(regularizationWeight)))


@dataclass
class ComputedRegistration:
    """What :func:`computeRegistration` produced (numpy, on the fixed grid).

    Attributes:
        result: the engine's :class:`engine.common.RegistrationResult` (warped, displacement_ras,
            jacobian, lambda_map, affine_ras, runtime_s, device, regularization_weight ...).
        checkerboard, difference: (Z, Y, X) float32 (see :mod:`engine.visualization`).
        warpedLabels: (Z, Y, X) int32 moving labels warped with nearest neighbour, or None.
        metrics: dict with ``folding_percent``, ``sdlogj``, ``runtime_s``, ``device``, ``lambda``,
            ``similarity`` and, when labels were given, ``dice_mean``, ``dice_per_label``,
            ``dice_mean_initial`` (labels resampled without deformation), ``hd95_mean_mm``,
            ``hd95_per_label_mm``; with landmarks ``tre_mean_mm``, ``tre_max_mm``,
            ``tre_initial_mean_mm`` (keys and display: :mod:`engine.metric_table`).
        session: the λ path or the network bound to the pair (:data:`INSTANT_METHODS`), re-evaluated
            at a new λ by ``RegistrationLogic.setRegularization``; None for the optimizer.
    """

    result: RegistrationResult
    checkerboard: np.ndarray
    difference: np.ndarray
    warpedLabels: Optional[np.ndarray]
    metrics: dict
    session: Optional[InstantSession] = None


# --------------------------------------------------------------------------------------- compute
def computeRegistration(
    request: RegistrationRequest,
    progressCallback: Optional[ProgressCallback] = None,
    cancelRequested: Optional[CancelCallback] = None,
    networks: Optional[NetworkCache] = None,
) -> ComputedRegistration:
    """Run the engine and compute the derived volumes and metrics; touches no MRML (any thread or process).

    Args:
        progressCallback: callable(fraction in [0, 1], message), called from this thread.
        cancelRequested: callable returning True to stop; polled every iteration.
        networks: a cache of loaded networks to use and fill (network methods).

    Raises:
        ValueError: images the engine rejects (2D, NaN, empty, no overlap ...).
        engine.common.RegistrationCancelled: when ``cancelRequested()`` returned True.
        learned.checkpoint.CheckpointError: a missing, corrupt or incompatible weights file.
    """

    def report(fraction: float, message: str) -> None:
        if progressCallback is not None:
            progressCallback(float(fraction), message)

    session = None
    if request.method == "optimize":
        from ..engine.optimize import register_images

        result = register_images(
            request.fixed,
            request.fixedGrid,
            request.moving,
            request.movingGrid,
            request.options,
            fixed_mask=request.fixedMask,
            lambda_map=lambdaMapOnFixedGrid(request),
            progress=lambda fraction, message: report(0.95 * fraction, message),
            cancel=cancelRequested,
        )
    else:
        started = time.perf_counter()
        session = instantSession(request, report, cancelRequested, networks)
        result = session.predict(request.options.regularization_weight)
        # the run's time (the session and its first λ), not the prediction's alone
        result = replace(result, runtime_s=time.perf_counter() - started)
    report(0.95, "computing metrics")
    computed = deriveOutputs(request, result, session)
    report(1.0, "done")
    return computed


def computeSweep(
    request: RegistrationRequest,
    lambdas: Sequence[float],
    progressCallback: Optional[ProgressCallback] = None,
    cancelRequested: Optional[CancelCallback] = None,
    networks: Optional[NetworkCache] = None,
) -> list[dict]:
    """The metrics of the registration at each λ of ``lambdas`` (a λ sweep), in order.

    With the optimizer every λ is a registration of its own; with the λ path or a network method
    the pair is registered once and each λ is a prediction of that session. Each row has
    ``update_s``: the seconds that λ took (a registration, or a prediction and its outputs).

    Raises:
        as :func:`computeRegistration`.
    """
    lambdas = [float(v) for v in lambdas]
    if not lambdas:
        raise ValueError("a λ sweep needs at least one λ")
    rows: list[dict] = []
    session, first = None, 0.0
    if request.method in INSTANT_METHODS:  # one registration, a prediction per λ
        first = 0.9
        session = instantSession(request, scaled_progress(progressCallback, 0.0, first), cancelRequested, networks)
    for index, lam in enumerate(lambdas):
        start = first + (1.0 - first) * index / len(lambdas)
        stop = first + (1.0 - first) * (index + 1) / len(lambdas)
        report = scaled_progress(progressCallback, start, stop, f"λ = {lam:.2f} ({index + 1}/{len(lambdas)}): ")
        began = time.perf_counter()
        if session is not None:
            computed = deriveOutputs(request.atLambda(lam), session.predict(lam), session)
        else:
            computed = computeRegistration(request.atLambda(lam), report, cancelRequested, networks)
        rows.append(dict(computed.metrics, update_s=time.perf_counter() - began))
        report(1.0, "done")
    return rows


def lambdaMapOnFixedGrid(request: RegistrationRequest) -> Optional[np.ndarray]:
    """The request's λ(x) map on the fixed grid (linear resampling, 1 outside its own grid), or None."""
    if request.lambdaMap is None:
        return None
    grid = request.lambdaMapGrid
    if grid is None or grid.same_geometry(request.fixedGrid):
        return request.lambdaMap
    from ..engine.transforms import resample_image

    return np.clip(resample_image(request.lambdaMap, grid, request.fixedGrid, mode="linear", default_value=1.0), 0.0, 1.0)


def loadNetwork(modelPath: Optional[str] = None, networks: Optional[NetworkCache] = None) -> tuple[RegistrationNetwork, dict]:
    """(network, metadata) from ``modelPath`` (None = the shipped weights), from or into ``networks``.

    Raises:
        learned.checkpoint.CheckpointNotFoundError, learned.checkpoint.CheckpointError: a missing,
            corrupt or incompatible weights file (the message names the file).
    """
    from ..learned.checkpoint import CheckpointNotFoundError, load_checkpoint
    from ..learned.weights import shipped_model_path

    path = Path(modelPath) if modelPath is not None else shipped_model_path()
    if not path.is_file():
        raise CheckpointNotFoundError(f"network weights file '{path}' does not exist")
    key = (str(path.resolve()), path.stat().st_mtime_ns)
    if networks is None:
        return load_checkpoint(path)
    if key not in networks:
        networks[key] = load_checkpoint(path)
    return networks[key]


def instantSession(
    request: RegistrationRequest,
    report: Optional[ProgressCallback] = None,
    cancelRequested: Optional[CancelCallback] = None,
    networks: Optional[NetworkCache] = None,
) -> InstantSession:
    """The λ path (:func:`engine.path.register_path`) or the network session of the request's method.

    Raises:
        ValueError: a method without an instant session ("optimize"), or what the engine raises.
    """
    if request.method == "path":
        from ..engine.path import PathOptions, register_path

        return register_path(
            request.fixed, request.fixedGrid, request.moving, request.movingGrid, request.options,
            PathOptions(spatially_varying=request.spatiallyVarying), fixed_mask=request.fixedMask,
            lambda_map=lambdaMapOnFixedGrid(request), progress=report, cancel=cancelRequested,
        )
    if request.method in ("network", "network+adapt"):
        return networkSession(request, report, cancelRequested, networks)
    raise ValueError(f"the method {request.method!r} has no instant λ session")


def networkSession(
    request: RegistrationRequest,
    report: Optional[ProgressCallback] = None,
    cancelRequested: Optional[CancelCallback] = None,
    networks: Optional[NetworkCache] = None,
) -> InstantSession:
    """Affine stage of the optimizer, then a :class:`learned.predict.NetworkRegistration`; with
    ``network+adapt``, the λ path started from it (:func:`learned.predict.adapt`)."""
    from ..engine.path import PathOptions
    from ..learned.predict import adapt, register_with_network

    network, metadata = loadNetwork(request.modelPath, networks)
    adapting = request.method == "network+adapt" and request.adaptationSteps > 0
    session = register_with_network(
        network, metadata, request.fixed, request.fixedGrid, request.moving, request.movingGrid, request.options,
        fixed_mask=request.fixedMask, progress=scaled_progress(report, 0.0, 0.3 if adapting else 1.0), cancel=cancelRequested,
    )
    if not adapting:
        return session
    return adapt(session, request.options, PathOptions(knot_iterations=request.adaptationSteps), request.fixedMask,
                 scaled_progress(report, 0.3, 1.0, "adapting: "), cancelRequested)


def deriveOutputs(
    request: RegistrationRequest, result: RegistrationResult, session: Optional[InstantSession] = None
) -> ComputedRegistration:
    """Metrics, warped labels, checkerboard and difference of an engine result (any thread).

    Each derived volume is one new array on the fixed grid, made slab by slab by the engine
    (checkerboard, difference, resampled labels; metrics over slabs), so that a clinical-size
    volume costs its outputs and little more."""
    from ..engine import metrics as metricsLib
    from ..engine.common import release_freed_memory
    from ..engine.transforms import resample_image
    from ..engine.visualization import checkerboard, difference

    fixedGrid = request.fixedGrid
    metrics: dict = {
        "method": request.method,
        "lambda": float(result.regularization_weight),
        "similarity": result.similarity,
        "device": result.device,
        "runtime_s": float(result.runtime_s),
        "folding_percent": float(metricsLib.folding_percent(result.jacobian, request.fixedMask)),
        "sdlogj": float(metricsLib.sdlogj(result.jacobian, request.fixedMask)),
    }
    metrics.update(qualityMetrics(result.history))
    if request.method == "network+adapt":
        metrics["adaptation_steps"] = int(request.adaptationSteps)  # per λ knot of the adapted path
    if request.method == "path":
        metrics["spatially_varying"] = bool(request.spatiallyVarying)

    def labelsOnFixedGrid(displacement: Optional[np.ndarray]) -> np.ndarray:
        resampled = resample_image(request.movingLabels, request.movingGrid, fixedGrid, displacement, mode="nearest")
        return np.rint(resampled, out=resampled).astype(np.int32)

    warpedLabels = None
    if request.movingLabels is not None:
        warpedLabels = labelsOnFixedGrid(result.displacement_ras)
        initialLabels = labelsOnFixedGrid(None)
        labels = request.evaluationLabels
        dice = metricsLib.dice_per_label(request.fixedLabels, warpedLabels, labels)
        diceInitial = metricsLib.dice_per_label(request.fixedLabels, initialLabels, labels)
        hd95 = metricsLib.hd95_mm(request.fixedLabels, warpedLabels, list(dice), fixedGrid)
        metrics.update(
            dice_mean=_finiteMean(dice.values()),
            dice_per_label={int(k): float(v) for k, v in dice.items()},
            dice_mean_initial=_finiteMean(diceInitial.values()),
            hd95_mean_mm=_finiteMean(hd95.values()),
            hd95_per_label_mm={int(k): _jsonNumber(v) for k, v in hd95.items()},
        )
        if request.labelNames:
            metrics["label_names"] = {i + 1: name for i, name in enumerate(request.labelNames)}

    if request.fixedPoints is not None:
        tre = metricsLib.tre_mm(request.fixedPoints, request.movingPoints, result.displacement_ras, fixedGrid)
        initial = np.linalg.norm(request.fixedPoints - request.movingPoints, axis=1)
        metrics.update(
            tre_mean_mm=float(np.mean(tre)),
            tre_max_mm=float(np.max(tre)),
            tre_initial_mean_mm=float(np.mean(initial)),
        )

    board = checkerboard(request.fixed, result.warped, fixedGrid, request.checkerboardSquareMm)
    diff = difference(request.fixed, result.warped)
    release_freed_memory()  # the slabs' temporaries, before the caller writes the outputs
    return ComputedRegistration(result, board, diff, warpedLabels, metrics, session)


# --------------------------------------------------------------------------------------- quality
def qualityMetrics(history: dict) -> dict:
    """The quality signal of an engine result's ``history``, for metrics.json.

    ``rolled_back_stages``: the stages the optimizer rolled back because they did not improve the
    similarity (``"initialization"``, ``"affine_<level>"``, ``"svf_<level>"``; empty for methods
    that roll nothing back). When the engine measured them (:mod:`engine.optimize`):
    ``similarity_before`` (the pair as given, identity transform), ``similarity_after`` (the
    result), both the similarity loss (lower is better) on the finest deformable level and on the
    fixed mask when given, and ``improved`` (after < before).
    """
    out: dict = {"rolled_back_stages": [key[len("rolled_back_"):] for key in history if key.startswith("rolled_back_")]}
    if "similarity_before" in history and "similarity_after" in history:
        out.update(similarity_before=float(history["similarity_before"]), similarity_after=float(history["similarity_after"]),
                   improved=bool(history["improved"]))
    return out


def qualityWarning(metrics: dict) -> Optional[str]:
    """One sentence when the result is not better than the start (``metrics["improved"]`` is False), else None."""
    if metrics.get("improved") is not False:
        return None
    return ("not better than the start: similarity {:.4g} before registration, {:.4g} after (lower is better); "
            "check the images' overlap and the similarity").format(metrics["similarity_before"], metrics["similarity_after"])


# --------------------------------------------------------------------------------------- JSON
def _finiteMean(values) -> Optional[float]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def _jsonNumber(value: float) -> Optional[float]:
    """JSON has no inf/NaN: such values become None (null)."""
    return float(value) if value is not None and math.isfinite(value) else None


def jsonSafe(value):
    """Metrics with inf/NaN as None and dict keys as strings, for json.dumps."""
    if isinstance(value, dict):
        return {str(k): jsonSafe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonSafe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return _jsonNumber(float(value))
    if isinstance(value, np.integer):
        return int(value)
    return value
