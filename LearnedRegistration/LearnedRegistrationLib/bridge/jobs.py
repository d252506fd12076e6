"""Registration jobs that run away from Slicer's main thread: in a child process, or synchronously.

Slicer's main thread holds the Python GIL while it waits in the Qt event loop, so a Python thread
inside Slicer barely advances; long work therefore runs in a separate process of Slicer's own
Python (``PythonSlicer``), as SlicerMONAIAuto3DSeg and SlicerNNUnet do. A job is a folder:

=====================  ======================================================================
``job.json``           what to run: ``{"kind": "register" | "sweep", "lambdas": [...]}``
``request.json/.npz``  the prepared :class:`compute.RegistrationRequest`: geometry, options and
                       settings as JSON, the arrays (images, masks, labels, λ map, landmarks) as
                       an uncompressed ``.npz``
``stdout.log``         the child's output: one JSON object per line (progress, then ``done`` or
                       ``error``), read by :class:`tasks.ProcessTask` at each poll
``stderr.log``         the child's Python tracebacks and library messages
``result/``            written by the child under another name and renamed when complete:
                       ``computed.json/.npz`` (metrics, result arrays), ``session.pt`` (what the
                       λ slider needs afterwards: the network session's state), ``sweep.json``
=====================  ======================================================================

The request is written from the arrays that :meth:`logic.RegistrationLogic.prepareRegistration`
made on the main thread (segmentations already rasterized, parent transforms already applied),
not from the nodes through storage nodes: a storage node writes a volume without its parent
transform, and the child (plain ``PythonSlicer``, no MRML) would have to redo the preparation.
``.npz`` keeps the arrays and the float64 geometry exactly (no LPS/RAS text round trip) and is
fast to write and read (no compression).

:func:`startJob` returns a :class:`tasks.Task`: a :class:`tasks.ProcessTask` running
``python -m LearnedRegistrationLib.bridge.jobs JOBDIR`` (the Slicer panel), or a
:class:`tasks.SynchronousTask` computing in the caller's thread (scripts, tests). The command line
and the web app compute in their own process.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Optional, Union

import numpy as np

from ..engine.common import RegistrationCancelled, RegistrationOptions, RegistrationResult
from ..engine.grid import ImageGrid
from .compute import ComputedRegistration, NetworkCache, RegistrationRequest, computeRegistration, computeSweep, jsonSafe
from .tasks import ProcessTask, SynchronousTask, Task

#: Job kinds: one registration, or the metrics of a λ sweep.
JOB_KINDS = ("register", "sweep")
#: Version of the folder layout (the parent and the child are always the same code).
JOB_FORMAT = 1

_REQUEST_ARRAYS = ("fixed", "moving", "fixedMask", "lambdaMap", "fixedLabels", "movingLabels", "fixedPoints", "movingPoints")
_REQUEST_GRIDS = ("fixedGrid", "movingGrid", "lambdaMapGrid")
_REQUEST_SETTINGS = ("labelNames", "movingLabelsAreSegmentation", "evaluationLabels", "method", "spatiallyVarying",
                     "modelPath", "adaptationSteps", "outputBaseName", "checkerboardSquareMm")
_RESULT_ARRAYS = ("warped", "displacement_ras", "jacobian", "lambda_map")


# ------------------------------------------------------------------------------------ geometry
def gridToDict(grid: ImageGrid) -> dict:
    """JSON form of an :class:`ImageGrid` (RAS, float64 written in full)."""
    return {"shape": list(grid.shape), "spacing": list(grid.spacing), "origin": grid.origin.tolist(),
            "direction": grid.direction.tolist()}


def gridFromDict(data: dict) -> ImageGrid:
    """Inverse of :func:`gridToDict`."""
    return ImageGrid(tuple(data["shape"]), tuple(data["spacing"]), np.asarray(data["origin"]), np.asarray(data["direction"]))


# ------------------------------------------------------------------------------------ request
def saveRequest(folder: Path, request: RegistrationRequest) -> None:
    """Write ``request`` (without its scene and node IDs) into ``folder``."""
    arrays = {name: getattr(request, name) for name in _REQUEST_ARRAYS if getattr(request, name) is not None}
    np.savez(folder / "request.npz", **arrays)
    data = {name: getattr(request, name) for name in _REQUEST_SETTINGS}
    data["grids"] = {name: gridToDict(getattr(request, name)) for name in _REQUEST_GRIDS if getattr(request, name) is not None}
    data["options"] = asdict(request.options)
    (folder / "request.json").write_text(json.dumps(data))


def loadRequest(folder: Path) -> RegistrationRequest:
    """The request :func:`saveRequest` wrote (without scene and node IDs)."""
    data = json.loads((folder / "request.json").read_text())
    with np.load(folder / "request.npz") as arrays:
        values = {name: arrays[name] for name in arrays.files}
    values.update({name: gridFromDict(grid) for name, grid in data.pop("grids").items()})
    known = {f.name for f in fields(RegistrationOptions)}
    options = RegistrationOptions(**{k: tuple(v) if isinstance(v, list) else v  # JSON gives lists for tuples
                                     for k, v in data.pop("options").items() if k in known})
    return RegistrationRequest(options=options, **values, **data)


# ------------------------------------------------------------------------------------ result
def saveComputed(folder: Path, computed: ComputedRegistration) -> None:
    """Write ``computed`` into ``folder`` (created): arrays, metrics, and the network session's state."""
    folder.mkdir(parents=True, exist_ok=True)
    result = computed.result
    arrays = {name: getattr(result, name) for name in _RESULT_ARRAYS}
    arrays.update(checkerboard=computed.checkerboard, difference=computed.difference)
    if computed.warpedLabels is not None:
        arrays["warpedLabels"] = computed.warpedLabels
    np.savez(folder / "computed.npz", **arrays)
    data = {
        "metrics": jsonSafe(computed.metrics),
        "affine_ras": np.asarray(result.affine_ras).tolist(),
        "runtime_s": result.runtime_s, "device": result.device, "regularization_weight": result.regularization_weight,
        "similarity": result.similarity, "history": jsonSafe(result.history),
    }
    (folder / "computed.json").write_text(json.dumps(data))
    if computed.session is not None:
        import torch

        torch.save({"method": computed.metrics.get("method"), "state": computed.session.state()}, folder / "session.pt")


def loadComputed(folder: Path, request: RegistrationRequest, networks: Optional[NetworkCache] = None) -> ComputedRegistration:
    """The result :func:`saveComputed` wrote, for ``request`` (the one the job ran).

    The metrics come back as JSON gives them (label keys as strings, inf as None). The session the
    λ slider needs is rebuilt from its state: the λ path's knots and velocities, or the network
    session with the network of ``request.modelPath`` (no optimization, encoder or adaptation runs
    again). The velocity field is not carried over (``velocity`` is None).
    """
    data = json.loads((folder / "computed.json").read_text())
    with np.load(folder / "computed.npz") as stored:
        arrays = {name: stored[name] for name in stored.files}
    result = RegistrationResult(
        fixed_grid=request.fixedGrid, affine_ras=np.asarray(data["affine_ras"]), velocity=None, velocity_grid=None,
        runtime_s=data["runtime_s"], device=data["device"], regularization_weight=data["regularization_weight"],
        similarity=data["similarity"], history=data["history"], **{name: arrays[name] for name in _RESULT_ARRAYS},
    )
    session = None
    if (folder / "session.pt").is_file():
        import torch

        saved = torch.load(folder / "session.pt", map_location="cpu", weights_only=True)
        session = restoreSession(saved["method"], saved["state"], request, networks)
    return ComputedRegistration(result, arrays["checkerboard"], arrays["difference"], arrays.get("warpedLabels"),
                                data["metrics"], session)


def restoreSession(method: str, state: dict, request: RegistrationRequest, networks: Optional[NetworkCache] = None):
    """The instant-λ session of ``method`` from its ``state()``, for ``request``'s images."""
    from ..engine.common import choose_device

    device = choose_device(request.options.device)
    if method == "path":
        from ..engine.path import LambdaPath
        from .compute import lambdaMapOnFixedGrid

        return LambdaPath.restore(state, request.fixedGrid, request.moving, request.movingGrid,
                                  lambdaMapOnFixedGrid(request), device)
    from ..learned.predict import NetworkRegistration
    from .compute import loadNetwork

    network, metadata = loadNetwork(request.modelPath, networks)
    return NetworkRegistration.restore(network, metadata, request.fixed, request.fixedGrid, request.moving,
                                       request.movingGrid, state, device)


# ------------------------------------------------------------------------------------ starting
def startJob(
    request: RegistrationRequest,
    kind: str = "register",
    lambdas: Sequence[float] = (),
    *,
    backend: str = "process",
    networks: Optional[NetworkCache] = None,
    temporaryFolder: Optional[Union[str, os.PathLike]] = None,
    python: Optional[str] = None,
) -> Task:
    """A task (not started) that runs ``request`` as a job of ``kind``; its result is a
    :class:`compute.ComputedRegistration` ("register") or the list of metrics per λ ("sweep").

    Args:
        request: made by ``RegistrationLogic.prepareRegistration``.
        kind: "register" or "sweep" (then ``lambdas`` are the λ values).
        backend: "process" (a child process of :func:`pythonExecutable`; the Slicer panel) or
            "synchronous" (computed in :meth:`tasks.Task.start`, in the caller's thread).
        networks: cache of loaded networks (the synchronous backend, and the parent's session
            rebuild after a process job).
        temporaryFolder: where the job folder is made (default: the system's temporary folder);
            it is removed when the task ends, whatever the outcome.
        python: the interpreter for the child (default :func:`pythonExecutable`).

    Raises:
        ValueError: unknown kind or backend, or a sweep without λ values.
    """
    if kind not in JOB_KINDS:
        raise ValueError(f"unknown job kind {kind!r}; choose one of {', '.join(JOB_KINDS)}")
    lambdas = [float(v) for v in lambdas]
    if kind == "sweep" and not lambdas:
        raise ValueError("a λ sweep job needs λ values")
    if backend == "synchronous":
        if kind == "register":
            return SynchronousTask(lambda progress, cancel: computeRegistration(request, progress, cancel, networks),
                                   name="registration", cancelled_exceptions=(RegistrationCancelled,))
        return SynchronousTask(lambda progress, cancel: computeSweep(request, lambdas, progress, cancel, networks),
                               name="λ sweep", cancelled_exceptions=(RegistrationCancelled,))
    if backend != "process":
        raise ValueError(f"unknown backend {backend!r}; choose 'process' or 'synchronous'")
    folder = Path(tempfile.mkdtemp(prefix="learnedreg-job-", dir=temporaryFolder))
    try:
        saveRequest(folder, request)
        (folder / "job.json").write_text(json.dumps({"format": JOB_FORMAT, "kind": kind, "lambdas": lambdas}))
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise

    def load(resultFolder: Path):
        if kind == "sweep":
            return json.loads((resultFolder / "sweep.json").read_text())
        return loadComputed(resultFolder, request, networks)

    command = [python or pythonExecutable(), "-m", __name__, str(folder)]
    return ProcessTask(command, folder, load, env=childEnvironment(), name=f"registration {kind}")


def pythonExecutable(slicerHome: Optional[str] = None) -> str:
    """The interpreter for a job's child process: Slicer's ``PythonSlicer`` when there is one (found
    on ``PATH``, as SlicerMONAIAuto3DSeg does, or in ``slicerHome/bin``), else this Python.

    Raises:
        RuntimeError: inside an application whose executable is not a Python interpreter (Slicer
            without ``PythonSlicer``): a child started from it would open a second application.
    """
    name = "PythonSlicer.exe" if os.name == "nt" else "PythonSlicer"
    found = shutil.which("PythonSlicer")
    if found:
        return found
    if slicerHome and (Path(slicerHome) / "bin" / name).is_file():
        return str(Path(slicerHome) / "bin" / name)
    if Path(sys.executable).name.lower().startswith("python"):
        return sys.executable
    raise RuntimeError(f"{name} was not found (looked on PATH and next to {sys.executable}); cannot start the registration process")


def childEnvironment() -> dict:
    """This process's environment, with this package's folder first on ``PYTHONPATH`` (Slicer adds
    module folders to ``sys.path`` at start-up, which a plain ``PythonSlicer`` does not)."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([root, *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    env["PYTHONUNBUFFERED"] = "1"
    return env


# ------------------------------------------------------------------------------------ child
class _Reporter:
    """Progress as JSON lines on stdout, at most every ``interval_s`` (the first and last always)."""

    def __init__(self, interval_s: float = 0.1):
        self.interval_s, self.last = interval_s, 0.0

    def __call__(self, fraction: float, message: str) -> None:
        now = time.monotonic()
        if now - self.last >= self.interval_s or fraction >= 1.0:
            self.last = now
            emit({"progress": float(fraction), "message": str(message)})


def emit(message: dict) -> None:
    """One JSON object on one line of stdout, flushed (the parent reads it at its next poll)."""
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def runJob(folder: Path) -> int:
    """Run the job in ``folder`` (the child process's work); returns the exit status (0: done, 1: failed)."""
    try:
        job = json.loads((folder / "job.json").read_text())
        if job.get("format") != JOB_FORMAT or job.get("kind") not in JOB_KINDS:
            raise ValueError(f"'{folder}' holds no job this code can run ({job.get('format')}, {job.get('kind')})")
        request = loadRequest(folder)
        report = _Reporter()
        report(0.0, "starting")
        partial = folder / "result.partial"
        shutil.rmtree(partial, ignore_errors=True)
        if job["kind"] == "register":
            saveComputed(partial, computeRegistration(request, report))
        else:
            partial.mkdir()
            rows = computeSweep(request, job["lambdas"], report)
            (partial / "sweep.json").write_text(json.dumps(jsonSafe(rows)))
        os.replace(partial, folder / "result")
        emit({"done": True})
        return 0
    except Exception as error:  # everything the parent must hear about, as one readable line
        traceback.print_exc(file=sys.stderr)
        message = " ".join(str(error).split()) or type(error).__name__
        emit({"error": message, "type": type(error).__name__})
        return 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m LearnedRegistrationLib.bridge.jobs JOBDIR``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1:
        print("usage: python -m LearnedRegistrationLib.bridge.jobs JOBDIR", file=sys.stderr)
        return 2
    return runJob(Path(argv[0]))


if __name__ == "__main__":
    sys.exit(main())
