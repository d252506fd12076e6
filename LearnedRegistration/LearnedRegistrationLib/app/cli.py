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

Everything is written into a temporary folder next to the output folder and moved into place at
the end, so a failure or Ctrl-C leaves no half-written output. User errors print one line and
exit with status 2; Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from ..bridge.compute import DEFAULT_SPATIALLY_VARYING, METHODS
from ..engine.common import SIMILARITIES, RegistrationCancelled
from ..engine.metric_table import SWEEP_KEYS, summary

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130

#: Output file names, in the order they are written.
OUTPUT_FILES = {
    "warpedVolumeNode": "warped.nrrd",
    "displacementVolumeNode": "displacement.nrrd",
    "transformNode": "transform.h5",
    "checkerboardVolumeNode": "checkerboard.nrrd",
    "differenceVolumeNode": "difference.nrrd",
    "jacobianVolumeNode": "jacobian.nrrd",
    "lambdaMapVolumeNode": "lambda_map.nrrd",
    "warpedLabelNode": "warped_labels.nrrd",
}
SCENE_FILE = "scene.mrb"
METRICS_FILE = "metrics.json"
SWEEP_FILES = ("lambda_sweep.json", "lambda_sweep.png")


class UserError(Exception):
    """An error the user can fix (bad path, bad option); reported in one line, exit status 2."""


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
    )
    register.add_argument("--fixed", help="fixed image (NRRD, NIfTI, MHA, ... any ITK format)")
    register.add_argument("--moving", help="moving image")
    register.add_argument("--output-dir", required=True, help="folder for the results (created; existing files replaced)")
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
        "--similarity", default=None, choices=list(SIMILARITIES),
        help="similarity measure: mse (default; same contrast), lncc (same modality), ncc, ngf or mi (multi-modal)",
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
    register.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
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
    return parser


# ------------------------------------------------------------------------------------------ output folder
def prepare_output(output_dir: str) -> tuple[Path, Path]:
    """Check that ``output_dir`` can be written and make a staging folder next to it.

    Returns:
        ``(output_dir, staging_dir)``; the staging folder is in the output folder's parent (the
        same file system, so the final move is a rename).

    Raises:
        UserError: the path is a file, its parent cannot be created, or it is not writable.
    """
    output = Path(output_dir).expanduser().absolute()
    if output.exists() and not output.is_dir():
        raise UserError(f"the output folder '{output}' exists and is not a folder")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.learnedreg-", dir=output.parent))
    except OSError as error:
        raise UserError(f"cannot write the output folder '{output}': {error.strerror or error}") from None
    if output.is_dir():
        probe = output / f".learnedreg-write-test-{os.getpid()}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            shutil.rmtree(staging, ignore_errors=True)
            raise UserError(f"cannot write the output folder '{output}': {error.strerror or error}") from None
    return output, staging


def publish_output(staging: Path, output: Path) -> None:
    """Move the staged files into ``output`` (a rename of the whole folder when it does not exist yet)."""
    if not output.exists():
        # mkdtemp made the staging folder private (0700); give it the usual permissions.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)
        os.replace(staging, output)
        return
    for item in staging.iterdir():
        target = output / item.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(item, target)
    staging.rmdir()


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
    if bool(args.fixed) != bool(args.moving):
        raise UserError("give both --fixed and --moving (or neither, for the built-in demo)")
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
    """``"0.1,0.5"`` -> [0.1, 0.5]; every value in [0, 1]. Raises UserError."""
    if not text:
        return []
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--lambda-sweep needs comma-separated numbers, got {text!r}") from None
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise UserError(f"--lambda-sweep values must be in [0, 1], got {text!r}")
    return values


def _sweep_row(metrics: dict) -> dict:
    return {k: metrics[k] for k in SWEEP_KEYS if k in metrics}


def run_lambda_sweep(logic, outputs, lambdas: Sequence[float], register_again, staging: Path, method: str) -> list[dict]:
    """Metrics at each λ (the λ path or a network: the instant slider update of every output node;
    optimize: a new run each), with the seconds each λ took (``update_s``), and their plot."""
    from ..bridge.logic import jsonSafe
    from .plots import plot_lambda_sweep

    rows = []
    for lam in lambdas:
        start = time.perf_counter()
        if logic.canSetRegularizationInstantly():
            updated = logic.setRegularization(lam)
        else:
            updated = register_again(lam, outputs)
        rows.append(dict(_sweep_row(updated.metrics), update_s=time.perf_counter() - start))
    (staging / SWEEP_FILES[0]).write_text(json.dumps(jsonSafe(rows), indent=2) + "\n")
    metric = "dice_mean" if all(r.get("dice_mean") is not None for r in rows) else "sdlogj"
    plot_lambda_sweep(staging / SWEEP_FILES[1], {method: rows}, metric=metric, title=f"λ sweep ({method})")
    return rows


def run_register(args) -> dict:
    """The ``register`` command; returns the metrics. Raises UserError / ValueError / RegistrationCancelled."""
    if args.iteration_scale <= 0:
        raise UserError(f"--iteration-scale must be positive, got {args.iteration_scale}")
    sweep = parse_lambda_sweep(args.lambda_sweep)
    evaluation_labels = parse_evaluation_labels(args.eval_labels, args.labels_json, args.labels_key)
    output, staging = prepare_output(args.output_dir)
    progress = _ProgressBar(not args.quiet)
    try:
        # Heavy imports only once the command line is known to be sound.
        from ..bridge.logic import RegistrationLogic, jsonSafe
        from .headless import HeadlessSlicer

        with _quiet_vtk_log(args.verbose), HeadlessSlicer(cacheDirectory=staging / ".cache") as slicer_app:
            demo = None
            if args.fixed or args.moving:
                nodes = _load_inputs(slicer_app, args)
            else:
                nodes, demo, truth_node = _demo_inputs(slicer_app, args)
            logic = RegistrationLogic()
            options = dict(
                similarity=args.similarity,
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
            outputs = logic.register(progressCallback=progress, regularizationWeight=args.regularization_weight, **options)
            progress.close()
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

            for attribute, file_name in OUTPUT_FILES.items():
                node = getattr(outputs, attribute)
                if node is None:
                    continue
                if attribute == "warpedLabelNode" and node.IsA("vtkMRMLSegmentationNode"):
                    file_name = "warped_labels.seg.nrrd"
                slicer_app.saveNode(node, staging / file_name)
            if demo is not None:
                slicer_app.saveNode(truth_node, staging / "true_displacement.nrrd")
            slicer_app.saveScene(staging / SCENE_FILE)
            if sweep:

                def register_again(lam, previous):
                    return logic.register(regularizationWeight=lam, outputNodes=previous, **options)

                metrics["lambda_sweep"] = run_lambda_sweep(logic, outputs, sweep, register_again, staging, metrics["method"])
            (staging / METRICS_FILE).write_text(json.dumps(jsonSafe(metrics), indent=2, sort_keys=True) + "\n")
        shutil.rmtree(staging / ".cache", ignore_errors=True)
        publish_output(staging, output)
        return metrics
    finally:
        progress.close()
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _summary(metrics: dict) -> str:
    return ", ".join(part for part in (metrics.get("method"), summary(metrics)) if part)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``learnedreg``; returns the exit status (0 ok, 2 user error, 130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "register":
        parser.print_help(sys.stderr)
        return EXIT_USER_ERROR
    if importlib.util.find_spec("torch") is None:
        print("learnedreg: error: PyTorch is not installed (pip install torch)", file=sys.stderr)
        return EXIT_USER_ERROR
    try:
        metrics = run_register(args)
    except KeyboardInterrupt:
        print("\nlearnedreg: interrupted; nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except RegistrationCancelled:
        print("learnedreg: cancelled; nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (UserError, ValueError, FileNotFoundError) as error:
        print(f"learnedreg: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(f"learnedreg: wrote {Path(args.output_dir)} ({_summary(metrics)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
