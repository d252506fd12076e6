"""Command-line front door: ``learnedreg register ...`` runs the Slicer logic headless and writes files.

Example::

    learnedreg register --fixed MRBrainTumor1.nii.gz --moving MRBrainTumor2.nii.gz --output-dir out
    learnedreg register --output-dir demo-out          # the built-in demo (known true displacement)
    learnedreg register --fixed F.nii.gz --moving M.nii.gz --output-dir out --method network \
        --lambda-sweep 0.05,0.1,0.2,0.3,0.5,0.7,0.9       # metrics at 7 λ and lambda_sweep.png

The inputs are loaded into a headless slicer-core scene as nodes and registered with
:meth:`bridge.logic.RegistrationLogic.register`, exactly as in Slicer. The output folder receives:

=====================  ===========================================================================
warped.nrrd            moving image resampled on the fixed grid
displacement.nrrd      3-component vector volume, RAS mm (Slicer's vector-volume convention)
transform.h5           ITK displacement-field transform (LPS, as ITK/ANTs/SimpleITK expect), the
                       resampling transform fixed -> moving: ``warped(x) = moving(T(x))``
checkerboard.nrrd      fixed / warped checkerboard
difference.nrrd        warped - fixed
jacobian.nrrd          Jacobian determinant of x -> x + d(x)
lambda_map.nrrd        regularization weight per voxel
warped_labels.nrrd     moving labels warped with nearest neighbour (with --moving-labels)
scene.mrb              all of the above plus the inputs, as a Slicer scene
metrics.json           Dice/HD95 (labels), TRE (landmarks), folding %, SDlogJ, runtime, device, λ,
                       method, and for the demo the error against the known displacement
lambda_sweep.json/png  with --lambda-sweep: the metrics at each λ, and Dice (or, without labels,
                       SDlogJ) against % folding
=====================  ===========================================================================

``--method``: ``path`` (the default: one run registers the pair for every λ, so a sweep or a λ
change needs no new optimization), ``optimize`` (instance optimization at one λ), and the
experimental ``network`` / ``network+adapt`` (the shipped λ-conditioned network, which does not
beat the affine stage yet: ``benchmarks/network.md``). ``--spatially-varying`` learns a per-pair
λ(x) with the path (Chen et al.). The files always hold the registration at ``--lambda``; a sweep
only adds its own files, each row with ``update_s``, the seconds that λ took to update every output.

Input files are checked before Slicer's libraries load: a missing file, a truncated or corrupt
compressed file (the gzip stream must end with a valid checksum; NIfTI and NRRD must hold the
voxel bytes their header announces), a 2D image or one whose voxel axes are not perpendicular is
refused at once. **NaN and infinite voxels**: ITK's NIfTI reader turns them into 0 (so a
``.nii``/``.nii.gz`` with NaN background registers as if it were 0 there); other formats (NRRD,
MHA) keep them, and such an image is refused. Clean the NaNs or mask them if 0 is not right.

The output folder (:mod:`.outputs`): everything is written into a hidden staging folder next to
it and published at the end as one set, so a failure, Ctrl-C, SIGTERM or SIGHUP leaves no
half-written output. In an existing folder only this tool's file names (the table above, plus
``true_displacement.nrrd`` for the demo) are replaced; an earlier run's outputs that this run does
not write are removed; other files and any folder are never touched; an output path that is one
of the inputs is refused. A staging folder left by a killed run is removed (or its committed set
completed) by the next run into the same place once that process is gone.

Exit status: 0 done; 2 a user error (one line on stderr, nothing written: bad option or path,
unreadable or damaged input, an input that would be overwritten, an unusable model, a full disk);
128 + n on signal n (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP), after cleaning up.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Optional

from ..bridge.compute import DEFAULT_SPATIALLY_VARYING, METHODS
from ..engine.common import SIMILARITIES, SITUATION_SIMILARITIES, RegistrationCancelled, resolve_similarity
from ..engine.metric_table import SWEEP_KEYS, summary
from .outputs import (
    METRICS_FILE,
    OUTPUT_FILES,
    RECORD_KEY,
    SCENE_FILE,
    SWEEP_FILES,
    TRUE_DISPLACEMENT_FILE,
    WARPED_SEGMENTATION_FILE,
    OutputFolderError,
    StagedOutput,
    refuse_outputs_over_inputs,
    signals_raise,
)

__all__ = ["EXIT_INTERRUPTED", "EXIT_USER_ERROR", "METRICS_FILE", "OUTPUT_FILES", "SCENE_FILE", "SWEEP_FILES", "main"]

EXIT_USER_ERROR = 2
#: Exit status after Ctrl-C (128 + SIGINT); SIGTERM and SIGHUP give 128 + their number.
EXIT_INTERRUPTED = 128 + signal.SIGINT

#: Options naming image files, checked before Slicer loads (:func:`check_input_files`).
IMAGE_OPTIONS = ("fixed", "moving", "fixed_labels", "moving_labels", "fixed_mask", "lambda_map")
#: Options naming other input files.
OTHER_FILE_OPTIONS = ("fixed_landmarks", "moving_landmarks", "labels_json", "model")


class UserError(Exception):
    """An error the user can fix (bad path, bad option); reported in one line, exit status 2."""


class OutputWriteError(UserError):
    """Writing the results failed (a full disk, a folder that became unwritable)."""


def _default_labels_key(table: dict) -> str:
    lists = [key for key, value in table.items() if isinstance(value, list)]
    if not lists:
        raise UserError("the labels JSON file holds no list of label values")
    return "voxelmorph_eval_labels_30" if "voxelmorph_eval_labels_30" in lists else lists[0]


def parse_evaluation_labels(eval_labels: Optional[str], labels_json: Optional[str], labels_key: Optional[str]):
    """Label values to score, from ``--eval-labels 2,3,4`` or ``--labels-json FILE [--labels-key KEY]``.

    Returns None (score every label present) when neither is given.

    Raises:
        UserError: unreadable file, missing key, or values that are not integers.
    """
    if eval_labels and labels_json:
        raise UserError("give either --eval-labels or --labels-json, not both")
    if eval_labels:
        try:
            return [int(v) for v in eval_labels.replace(" ", "").split(",") if v]
        except ValueError:
            raise UserError(f"--eval-labels must be a comma-separated list of integers, got {eval_labels!r}") from None
    if labels_json:
        try:
            table = json.loads(Path(labels_json).read_text())
        except (OSError, ValueError) as error:
            raise UserError(f"cannot read the labels JSON file '{labels_json}': {error}") from None
        if not isinstance(table, dict):
            raise UserError(f"'{labels_json}' must hold a JSON object of label lists")
        key = labels_key or _default_labels_key(table)
        if key not in table:
            raise UserError(f"'{labels_json}' has no key '{key}' (keys: {', '.join(table)})")
        try:
            return [int(v) for v in table[key]]
        except (TypeError, ValueError):
            raise UserError(f"'{labels_json}' key '{key}' must be a list of integer labels") from None
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="learnedreg",
        description="Deformable image registration with a user-controlled regularization weight (3D Slicer logic, headless).",
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    register = commands.add_parser(
        "register",
        help="register a moving image to a fixed image (or run the built-in demo)",
        description="Register MOVING to FIXED and write the results into OUTPUT_DIR. "
        "Without --fixed/--moving, runs the built-in demo pair and reports the error against its known displacement.",
        epilog="Inputs: truncated or corrupt files, 2D images and images whose axes are not perpendicular are refused. "
        "NaN or infinite voxels: ITK's NIfTI reader turns them into 0 (.nii/.nii.gz); in other formats they are "
        "refused. Output folder: results are staged beside it and published as one set at the end; only this "
        "tool's file names are replaced, an earlier run's outputs this run does not write are removed, other files "
        "and folders are never touched, and an output that is an input is refused. Ctrl-C, SIGTERM and SIGHUP "
        "clean up and exit with 128 + the signal number; user errors print one line and exit with 2.",
    )
    register.add_argument(
        "--fixed", help="fixed image (NRRD, NIfTI, MHA, ... any ITK format; NaN voxels in NIfTI are read as 0)"
    )
    register.add_argument("--moving", help="moving image")
    register.add_argument(
        "--output-dir", required=True,
        help="folder for the results (created; this tool's earlier results there are replaced as a set, other files kept)",
    )
    register.add_argument("--fixed-labels", help="label map on the fixed image's grid (for Dice/HD95)")
    register.add_argument("--moving-labels", help="label map on the moving image's grid (warped to warped_labels.nrrd)")
    register.add_argument("--fixed-mask", help="mask on the fixed image's grid: similarity only where it is non-zero")
    register.add_argument("--lambda-map", help="per-voxel regularization map in [0, 1] (scalar image)")
    register.add_argument("--fixed-landmarks", help="fixed landmarks (.mrk.json or .fcsv) for TRE")
    register.add_argument("--moving-landmarks", help="corresponding moving landmarks, same order")
    register.add_argument(
        "--lambda", dest="regularization_weight", type=float, default=None,
        help="regularization weight λ in [0, 1] (0: similarity only, 1: no deformation; default: the engine's)",
    )
    register.add_argument(
        "--similarity", default="same-modality", choices=[*SITUATION_SIMILARITIES, *SIMILARITIES],
        help="similarity measure, or the situation to pick it for: same-modality (default; "
        f"{SITUATION_SIMILARITIES['same-modality']}) or multimodal ({SITUATION_SIMILARITIES['multimodal']}), chosen on "
        "the benchmark's pairs; say which, the images alone do not tell it reliably. Measures: mse (same contrast), "
        "lncc (same modality, varying contrast), ncc, ngf, mi or mind (MIND-SSC; multi-modal). The log and "
        "metrics.json name the measure used",
    )
    register.add_argument(
        "--method", default=None, choices=list(METHODS),
        help="path (default: one run for every λ; a sweep or λ change needs no new optimization), optimize "
        "(one λ), or the EXPERIMENTAL network / network+adapt (the shipped network does not beat the affine "
        "stage yet; see benchmarks/network.md)",
    )
    register.add_argument(
        "--spatially-varying", action=argparse.BooleanOptionalAction, default=None,
        help="with --method path, learn a per-pair regularization map λ(x) (Chen et al.; written to lambda_map.nrrd) "
        f"(default: {'on' if DEFAULT_SPATIALLY_VARYING else 'off'}, chosen on the OASIS benchmark)",
    )
    register.add_argument("--model", help="network weights file (default: the shipped model)")
    register.add_argument("--adapt-steps", type=int, default=None, help="test-time adaptation steps of network+adapt")
    register.add_argument(
        "--lambda-sweep", metavar="L1,L2,...",
        help="also compute the metrics at each of these λ (written to lambda_sweep.json and lambda_sweep.png)",
    )
    register.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    register.add_argument("--eval-labels", help="comma-separated label values to score (default: every label present)")
    register.add_argument("--labels-json", help="JSON file with lists of label values to score")
    register.add_argument("--labels-key", help="key of the list in --labels-json (default: voxelmorph_eval_labels_30, else the first list)")
    register.add_argument(
        "--initialization", default="com", choices=["com", "moments", "none"],
        help="initial alignment: centres of mass (default), principal axes, or none (trust the image positions)",
    )
    register.add_argument("--working-spacing", type=float, default=None, help="finest registration spacing in mm")
    register.add_argument("--quiet", action="store_true", help="no progress bar")
    register.add_argument("--verbose", action="store_true", help="show VTK/Slicer log messages (hidden by default)")
    # Hidden: for tests and quick looks.
    register.add_argument("--iteration-scale", type=float, default=1.0, help=argparse.SUPPRESS)
    register.add_argument("--demo-size", type=int, default=64, help=argparse.SUPPRESS)
    register.add_argument("--demo-seed", type=int, default=0, help=argparse.SUPPRESS)

    # `learnedreg serve`: the web app (app/web.py), installed with the `web` extra.
    serve = commands.add_parser(
        "serve",
        help="register in a web browser, on Slicer's own slice views (needs the web extra: scripts/setup_env.sh --web)",
        description="Serve the registration as a web page (trame-slicer): inputs from files under DATA_ROOT or the "
        "built-in demo pair, the live λ slider, metrics, and Save into a folder under DATA_ROOT.",
        epilog="Safe defaults: it listens on 127.0.0.1 only unless --host says otherwise, reads and writes only "
        "under --data-root (no absolute paths, no '..', symbolic links resolved), and runs one registration at a time.",
    )
    serve.add_argument("--data-root", default=".", help="the only folder the page reads inputs from and saves results into (default: .)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    serve.add_argument("--port", type=int, default=0, help="port to listen on (default: 0, a free port; the URL is printed)")
    serve.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    serve.add_argument("--verbose", action="store_true", help="show VTK/Slicer and server log messages")
    # Hidden: for tests and quick looks.
    serve.add_argument("--iteration-scale", type=float, default=1.0, help=argparse.SUPPRESS)
    serve.add_argument("--demo-size", type=int, default=64, help=argparse.SUPPRESS)
    return parser


# ------------------------------------------------------------------------------------------ inputs
def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_input_files(args):
    """Check every input file named on the command line, before Slicer's libraries load.

    Every file must exist (all are checked before any is opened); images must be complete,
    readable, 3D and with perpendicular axes (:func:`engine.imageio.check_image_file`).

    Returns:
        The fixed image's :class:`engine.grid.ImageGrid` as ITK reads the file (the grid the
        output volumes are written on), or None for the built-in demo.

    Raises:
        UserError: one line naming the option and the file.
    """
    from ..engine.imageio import check_image_file

    if bool(args.fixed) != bool(args.moving):
        raise UserError("give both --fixed and --moving (or neither, for the built-in demo)")
    for name in (*IMAGE_OPTIONS, *OTHER_FILE_OPTIONS):
        path = getattr(args, name)
        if path and not Path(path).expanduser().is_file():
            what = "image file" if name in IMAGE_OPTIONS else "file"
            raise UserError(f"{_option(name)}: {what} not found: {path}")
    grids = {}
    for name in IMAGE_OPTIONS:
        path = getattr(args, name)
        if path:
            try:
                grids[name] = check_image_file(Path(path).expanduser())
            except (ValueError, OSError) as error:
                raise UserError(f"{_option(name)}: {error}") from None
    return grids.get("fixed")


# ------------------------------------------------------------------------------------------ run
class _ProgressBar:
    """tqdm bar driven by (fraction, message) callbacks."""

    def __init__(self, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=1000, desc="registering", unit="‰", file=sys.stderr, dynamic_ncols=True,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining} {postfix}")

    def __call__(self, fraction: float, message: str) -> None:
        if self.bar is not None:
            self.bar.n = int(round(1000 * min(max(fraction, 0.0), 1.0)))
            self.bar.set_postfix_str(message, refresh=False)
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _load_inputs(slicer_app, args) -> dict:
    """Load the files named on the command line into nodes; returns the node keyword arguments."""
    nodes = {
        "fixedVolumeNode": slicer_app.loadVolume(args.fixed, "fixed"),
        "movingVolumeNode": slicer_app.loadVolume(args.moving, "moving"),
    }
    if args.fixed_labels:
        nodes["fixedLabelNode"] = slicer_app.loadVolume(args.fixed_labels, "fixed labels", labelMap=True)
    if args.moving_labels:
        nodes["movingLabelNode"] = slicer_app.loadVolume(args.moving_labels, "moving labels", labelMap=True)
    if args.fixed_mask:
        nodes["fixedMaskNode"] = slicer_app.loadVolume(args.fixed_mask, "fixed mask", labelMap=True)
    if args.lambda_map:
        nodes["lambdaMapNode"] = slicer_app.loadVolume(args.lambda_map, "lambda map")
    if args.fixed_landmarks:
        nodes["fixedLandmarksNode"] = slicer_app.loadMarkups(args.fixed_landmarks, "fixed landmarks")
    if args.moving_landmarks:
        nodes["movingLandmarksNode"] = slicer_app.loadMarkups(args.moving_landmarks, "moving landmarks")
    return nodes


def _demo_inputs(slicer_app, args):
    """Nodes of the built-in demo pair, and the pair itself (for the error against the truth)."""
    from ..bridge import mrml
    from .demo import make_demo_pair

    pair = make_demo_pair(size=args.demo_size, seed=args.demo_seed)
    scene = slicer_app.scene
    nodes = {
        "fixedVolumeNode": mrml.updateVolumeNodeFromArray(scene, pair.fixed, pair.fixed_grid, name="demo fixed"),
        "movingVolumeNode": mrml.updateVolumeNodeFromArray(scene, pair.moving, pair.moving_grid, name="demo moving"),
        "fixedLabelNode": mrml.updateVolumeNodeFromArray(
            scene, pair.fixed_labels, pair.fixed_grid, name="demo fixed labels", className="vtkMRMLLabelMapVolumeNode"
        ),
        "movingLabelNode": mrml.updateVolumeNodeFromArray(
            scene, pair.moving_labels, pair.moving_grid, name="demo moving labels", className="vtkMRMLLabelMapVolumeNode"
        ),
    }
    truth = mrml.updateDisplacementVolumeNode(scene, pair.true_displacement_ras, pair.fixed_grid, name="demo true displacement")
    return nodes, pair, truth


@contextlib.contextmanager
def _quiet_vtk_log(verbose: bool):
    """Hide VTK/MRML log lines while the command runs (a corrupt file makes Slicer's readers print
    dozens); errors are detected from return values and reported in one line instead."""
    import vtk

    if verbose:
        yield
        return
    cutoff = vtk.vtkLogger.GetCurrentVerbosityCutoff()
    warnings = vtk.vtkObject.GetGlobalWarningDisplay()
    vtk.vtkLogger.SetStderrVerbosity(vtk.vtkLogger.VERBOSITY_OFF)
    vtk.vtkObject.GlobalWarningDisplayOff()
    try:
        yield
    finally:
        vtk.vtkLogger.SetStderrVerbosity(vtk.vtkLogger.ConvertToVerbosity(cutoff))
        vtk.vtkObject.SetGlobalWarningDisplay(warnings)


def parse_lambda_sweep(text: Optional[str]) -> list[float]:
    """``"0.1,0.5"`` -> [0.1, 0.5]; every value in [0, 1]; None (no sweep) -> [].

    Raises:
        UserError: not numbers, a value outside [0, 1], or no value at all (``--lambda-sweep ""``).
    """
    if text is None:
        return []
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--lambda-sweep needs comma-separated numbers, got {text!r}") from None
    if not values:
        raise UserError(f"--lambda-sweep needs at least one λ value in [0, 1] (e.g. 0.1,0.5,0.9), got {text!r}")
    if any(not 0.0 <= v <= 1.0 for v in values):
        raise UserError(f"--lambda-sweep values must be in [0, 1], got {text!r}")
    return values


def _sweep_row(metrics: dict) -> dict:
    return {k: metrics[k] for k in SWEEP_KEYS if k in metrics}


def run_lambda_sweep(logic, outputs, lambdas: Sequence[float], register_again) -> list[dict]:
    """Metrics at each λ (the λ path or a network: the instant slider update of every output node;
    optimize: a new run each), with the seconds each λ took (``update_s``)."""
    rows = []
    for lam in lambdas:
        start = time.perf_counter()
        if logic.canSetRegularizationInstantly():
            updated = logic.setRegularization(lam)
        else:
            updated = register_again(lam, outputs)
        rows.append(dict(_sweep_row(updated.metrics), update_s=time.perf_counter() - start))
    return rows


def write_lambda_sweep(rows: list[dict], folder: Path, method: str) -> None:
    """``lambda_sweep.json`` (the rows) and ``lambda_sweep.png`` (Dice, or without labels SDlogJ,
    against % folding) into ``folder``."""
    from ..bridge.logic import jsonSafe
    from .plots import plot_lambda_sweep

    (folder / SWEEP_FILES[0]).write_text(json.dumps(jsonSafe(rows), indent=2) + "\n")
    metric = "dice_mean" if all(r.get("dice_mean") is not None for r in rows) else "sdlogj"
    plot_lambda_sweep(folder / SWEEP_FILES[1], {method: rows}, metric=metric, title=f"λ sweep ({method})")


def _input_paths(args) -> dict:
    """``{option: path}`` of every input file given (for :func:`outputs.refuse_outputs_over_inputs`)."""
    return {_option(name): getattr(args, name) for name in (*IMAGE_OPTIONS, *OTHER_FILE_OPTIONS) if getattr(args, name)}


@contextlib.contextmanager
def _writing(staged: StagedOutput, name: str):
    """Turn a failure to write ``name`` into one line: which file, which folder, and why (full disk ...)."""
    from ..engine.imageio import describe_write_failure

    try:
        yield
    except OSError:  # engine.imageio.WriteError (ITK, HDF5, Slicer's writers), or ENOSPC from Python
        raise OutputWriteError(
            f"could not write {name} for the output folder '{staged.output}': {describe_write_failure(staged.output.parent)}"
        ) from None


def _refuse_non_finite(request, computed, args) -> None:
    """Refuse a computed registration whose warped image, displacement, Jacobian or λ map holds
    NaN or infinity (before any node or file is written)."""
    import numpy as np

    result = computed.result
    for array, what in ((result.warped, "warped image"), (result.displacement_ras, "displacement field"),
                        (result.jacobian, "Jacobian determinant"), (result.lambda_map, "λ map")):
        if array is not None and not np.isfinite(array).all():
            cause = (
                f"; the network weights '{args.model or 'shipped'}' are not usable on this pair"
                if request.method.startswith("network") else ""
            )
            raise UserError(f"the registration produced NaN or infinite values in the {what}{cause}; nothing was written")


def _write_outputs(slicer_app, outputs, staged: StagedOutput, fixed_grid, truth_node) -> None:
    """Output volumes on the fixed image's grid as ITK reads it (SimpleITK), the transform and the
    scene as Slicer writes them; one line on failure (:func:`_writing`)."""
    for attribute, file_name in OUTPUT_FILES.items():
        node = getattr(outputs, attribute)
        if node is None:
            continue
        if node.IsA("vtkMRMLSegmentationNode"):
            with _writing(staged, WARPED_SEGMENTATION_FILE):
                slicer_app.saveNode(node, staged.staging / WARPED_SEGMENTATION_FILE)
        elif node.IsA("vtkMRMLTransformNode"):
            with _writing(staged, file_name):
                slicer_app.saveNode(node, staged.staging / file_name)
        else:
            with _writing(staged, file_name):
                slicer_app.saveVolumeOnGrid(node, staged.staging / file_name, fixed_grid)
    if truth_node is not None:
        with _writing(staged, TRUE_DISPLACEMENT_FILE):
            slicer_app.saveVolumeOnGrid(truth_node, staged.staging / TRUE_DISPLACEMENT_FILE, fixed_grid)
    with _writing(staged, SCENE_FILE):
        slicer_app.saveScene(staged.staging / SCENE_FILE)


def write_output_set(
    slicer_app,
    outputs,
    staged: StagedOutput,
    metrics: dict,
    fixed_grid=None,
    truth_node=None,
    sweep: Optional[Callable[[], list[dict]]] = None,
) -> None:
    """Write one registration's output set into ``staged`` and publish it (``learnedreg register``
    and the web app's Save, :mod:`.web`).

    In order: every output volume, the transform and ``scene.mrb`` (:func:`_write_outputs`); with
    ``sweep``, its rows into ``metrics["lambda_sweep"]`` and ``lambda_sweep.json``/``.png``;
    ``metrics.json`` with the record of the set (:data:`outputs.RECORD_KEY`); then
    :meth:`outputs.StagedOutput.publish`.

    Args:
        slicer_app: the :class:`.headless.HeadlessSlicer` of the output nodes' scene.
        outputs: the logic's :class:`bridge.logic.RegistrationOutputNodes`.
        staged: the output folder, staged.
        metrics: what ``metrics.json`` holds (needs ``"method"`` with ``sweep``); updated in place.
        fixed_grid: the fixed image's grid as ITK reads its file (volumes are written on it), or
            None for the nodes' own grid (the demo).
        truth_node: the demo's known displacement (``true_displacement.nrrd``), or None.
        sweep: called after the output files are written (so that it may change the output
            nodes), returning the λ-sweep rows.

    Raises:
        OutputWriteError: a file could not be written or moved into place (one line: which, why).
    """
    from ..bridge.logic import jsonSafe

    _write_outputs(slicer_app, outputs, staged, fixed_grid, truth_node)
    if sweep is not None:
        metrics["lambda_sweep"] = sweep()
        with _writing(staged, "lambda_sweep.json/png"):
            write_lambda_sweep(metrics["lambda_sweep"], staged.staging, metrics["method"])
    metrics[RECORD_KEY] = staged.record()
    with _writing(staged, METRICS_FILE):
        (staged.staging / METRICS_FILE).write_text(json.dumps(jsonSafe(metrics), indent=2, sort_keys=True) + "\n")
    try:
        staged.publish()
    except OSError as error:  # a rename failed; if it was committed, the next run into the folder completes it
        raise OutputWriteError(f"could not move the results into '{staged.output}': {error.strerror or error}") from None


def run_register(args) -> dict:
    """The ``register`` command; returns the metrics.

    Everything the command line says is checked first, before Slicer's libraries load: outputs
    that would overwrite inputs, options, input files (:func:`check_input_files`), the device and
    the output folder (:class:`outputs.StagedOutput`).

    Raises:
        UserError, ValueError, FileNotFoundError: a user error (one line, exit 2).
        RegistrationCancelled, KeyboardInterrupt (:class:`outputs.Interrupted`): stopped; the
            staging folder is gone.
    """
    if args.iteration_scale <= 0:
        raise UserError(f"--iteration-scale must be positive, got {args.iteration_scale}")
    refuse_outputs_over_inputs(args.output_dir, _input_paths(args))
    sweep = parse_lambda_sweep(args.lambda_sweep)
    evaluation_labels = parse_evaluation_labels(args.eval_labels, args.labels_json, args.labels_key)
    fixed_grid = check_input_files(args)
    from ..engine.common import choose_device

    choose_device(args.device)  # refuse a device that does not exist before anything is loaded
    staged = StagedOutput(args.output_dir)
    staging = staged.staging
    progress = _ProgressBar(not args.quiet)
    try:
        # Heavy imports only once the command line is known to be sound.
        from ..bridge.logic import RegistrationLogic
        from .headless import HeadlessSlicer

        with _quiet_vtk_log(args.verbose), HeadlessSlicer(cacheDirectory=staging / ".cache", quiet=not args.verbose) as slicer_app:
            demo = truth_node = None
            if args.fixed or args.moving:
                nodes = _load_inputs(slicer_app, args)
            else:
                nodes, demo, truth_node = _demo_inputs(slicer_app, args)
            logic = RegistrationLogic()
            options = dict(
                similarity=resolve_similarity(args.similarity),
                device=args.device,
                iterationScale=args.iteration_scale,
                workingSpacingMm=args.working_spacing,
                initialization=args.initialization,
                evaluationLabels=evaluation_labels,
                method=args.method,
                spatiallyVarying=args.spatially_varying,
                modelPath=args.model,
                adaptationSteps=args.adapt_steps,
                **nodes,
            )
            # logic.register in its three steps, to look at the computed arrays before any node is made
            request = logic.prepareRegistration(regularizationWeight=args.regularization_weight, **options)
            computed = logic.computeRegistration(request, progress)
            progress.close()
            _refuse_non_finite(request, computed, args)
            outputs = logic.writeOutputs(request, computed)
            metrics = dict(outputs.metrics)
            if demo is not None:
                from ..bridge import mrml
                from ..engine.metrics import displacement_error

                estimated, _ = mrml.displacementFromGridTransformNode(outputs.transformNode)
                metrics.update(displacement_error(estimated, demo.true_displacement_ras, demo.fixed_labels > 0))
                metrics["demo"] = {"size": args.demo_size, "seed": args.demo_seed}
            metrics["inputs"] = {
                key: os.path.abspath(value)
                for key, value in (("fixed", args.fixed), ("moving", args.moving), ("fixed_labels", args.fixed_labels),
                                   ("moving_labels", args.moving_labels), ("fixed_mask", args.fixed_mask))
                if value
            }
            run_sweep = None
            if sweep:

                def register_again(lam, previous):
                    return logic.register(regularizationWeight=lam, outputNodes=previous, **options)

                def run_sweep():
                    return run_lambda_sweep(logic, outputs, sweep, register_again)

            write_output_set(slicer_app, outputs, staged, metrics, fixed_grid, truth_node, run_sweep)
        return metrics
    except KeyboardInterrupt as interrupt:
        interrupt.output_written = staged.published
        raise
    finally:
        progress.close()
        staged.discard()


_silenced_at_exit = []


def _silence_native_stderr_at_exit() -> None:
    """After a failed write, HDF5 reports the file it could not close once more when the process
    exits ("HDF5: infinite loop closing library", from its C ``atexit`` handler, after Python has
    finished); the one-line error has been printed, so send file descriptor 2 to the null device
    then (Python's ``atexit`` handlers run before the C library's)."""
    import atexit

    def silence() -> None:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
            os.dup2(os.open(os.devnull, os.O_WRONLY), 2)

    if not _silenced_at_exit:
        _silenced_at_exit.append(silence)
        atexit.register(silence)


def _summary(metrics: dict) -> str:
    """The one-line summary: method, metrics, the similarity before -> after, and a warning when the
    result is not better than the start (:func:`bridge.compute.qualityWarning`)."""
    from ..bridge.compute import qualityWarning

    similarity = None
    if metrics.get("similarity_before") is not None and metrics.get("similarity_after") is not None:
        similarity = f"similarity {metrics['similarity_before']:.4g} -> {metrics['similarity_after']:.4g}"
    line = ", ".join(part for part in (metrics.get("method"), summary(metrics), similarity) if part)
    warning = qualityWarning(metrics)
    return f"{line}; WARNING: {warning}" if warning else line


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``learnedreg``; returns the exit status (0 ok, 2 user error, 128 + n after signal n)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        if importlib.util.find_spec("trame_slicer") is None:
            print("learnedreg: error: the web app needs the web extra (bash scripts/setup_env.sh --web, "
                  "then .venv-web/bin/learnedreg serve)", file=sys.stderr)
            return EXIT_USER_ERROR
        from .web import serve

        return serve(args)
    if args.command != "register":
        parser.print_help(sys.stderr)
        return EXIT_USER_ERROR
    if importlib.util.find_spec("torch") is None:
        print("learnedreg: error: PyTorch is not installed (pip install torch)", file=sys.stderr)
        return EXIT_USER_ERROR
    try:
        with signals_raise():
            metrics = run_register(args)
    except KeyboardInterrupt as interrupt:  # Ctrl-C, or outputs.Interrupted (SIGINT, SIGTERM, SIGHUP)
        signum = getattr(interrupt, "signum", signal.SIGINT)
        name = signal.Signals(signum).name
        if getattr(interrupt, "output_written", False):
            print(f"\nlearnedreg: interrupted ({name}) after writing {Path(args.output_dir)}", file=sys.stderr)
        else:
            print(f"\nlearnedreg: interrupted ({name}); nothing was written", file=sys.stderr)
        return 128 + signum
    except RegistrationCancelled:
        print("learnedreg: cancelled; nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (UserError, OutputFolderError, ValueError, FileNotFoundError) as error:
        # One line, whatever the message (a numpy matrix, a library's multi-line text).
        print(f"learnedreg: error: {' '.join(str(error).split())}", file=sys.stderr)
        if isinstance(error, OutputWriteError) and not args.verbose:
            _silence_native_stderr_at_exit()
        return EXIT_USER_ERROR
    if args.verbose and metrics.get("rolled_back_stages"):
        print(f"learnedreg: rolled back (no better than their start): {', '.join(metrics['rolled_back_stages'])}")
    print(f"learnedreg: wrote {Path(args.output_dir)} ({_summary(metrics)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
