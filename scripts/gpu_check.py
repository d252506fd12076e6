#!/usr/bin/env python
"""The GPU check: one command for the few minutes a GPU is lent (an NVIDIA H200, ≤ 8 minutes).

It runs on the lent machine's own Python 3.12 (torch, numpy, scipy, scikit-image; no SimpleITK,
slicer-core or this package installed) from the repository's working tree, reads the OASIS pair and
the training label maps from a folder prepared here beforehand (``--prepare``), and writes
``report.json`` plus logs and the trained checkpoint into ``--output`` (the device tool's ``$OUT``).
Sections, in this order, each recorded in ``report.json`` as soon as it ends (an error in one is
recorded with its traceback and the next one still runs):

1. ``environment``: versions, the GPU, threads, load, the prepared data's manifest.
2. ``tests``: the engine tests that take the ``device`` fixture (``Testing/conftest.py``) run on the
   GPU: ``pytest`` on :data:`ENGINE_TEST_FILES` with ``LEARNEDREG_TEST_DEVICE=cuda`` (log:
   ``pytest_cuda.log``). The machine's image lists pytest among its packages (the device notes'
   KINDS.md); where ``import pytest`` fails, the copy of pytest and its pure-Python requirements
   that ``--prepare`` puts into ``DIR/site-packages`` is appended to ``PYTHONPATH``. The tests that
   compare against SimpleITK skip there (``pytest.importorskip``); the others import only torch,
   numpy and scipy.
3. ``compare``: the same registration on the CPU and on the GPU (:func:`register_images` at the
   default options, and :func:`register_path` read at :data:`COMPARE_LAMBDAS`): the displacement
   fields must agree inside the brain within :data:`FIELD_TOLERANCE_MM` and the Dice over the 30
   labels within :data:`DICE_TOLERANCE`.
4. ``speed``: ``optimize`` and the λ path on the GPU (wall time after a warm-up run, Dice, peak GPU
   memory from ``torch.cuda.max_memory_allocated``) and the latency of a λ change, median of
   ``--lambda-repeats`` (≥ 50): ``LambdaPath.evaluate(λ).warped`` (the displayed volume, target
   ≤ 30 ms) and ``LambdaPath.predict(λ)`` (every output); with ``--cpu-baseline`` each figure beside
   this machine's CPU one (2 threads) and their ratio.
5. ``train``: ``scripts/train.py`` on the λ-conditioned network for the minutes that remain of
   ``--budget-s``, continuing from the shipped weights: synthesis on the GPU, the encoder under
   bfloat16 autocast, the largest batch that fits, a checkpoint (``network.pt``, overwritten) and
   the OASIS validation Dice (``network.pt.log.json``) every two minutes (log: ``train_console.log``).

The exit status is 0 when every section ran and every check passed, else 1 (2: bad arguments).
Registration inputs: the moving image is histogram-matched during the preparation
(:meth:`train.OasisPair.registration_moving`), exactly what the engine does first by default
(with SimpleITK, absent on the GPU machine), so the engine runs with ``histogram_matching=False``
on both devices and gives the same numbers as the default pipeline.

Commands (from the repository root):

1. Preparation, here, with SimpleITK (about 15 s; writes ``gpu_data/``, git-ignored, about
   16 MiB: the OASIS pair at 1 mm as float32 / int16 arrays with their geometry, the 20 SynthSeg
   label maps already aligned and resampled to the 2 mm working grid as uint16, pytest's copy, a
   ``manifest.json``; it refuses to write more than :data:`SIZE_BUDGET_MIB` MiB together with the
   working tree that travels)::

       .venv/bin/python scripts/gpu_check.py --prepare gpu_data

2. The CPU baseline, here, 2 threads (committed as ``benchmarks/gpu_cpu_baseline.json``; about
   1.5 minutes; its ``environment.loadavg`` and ``speed.loadavg_after`` record how busy the CPUs
   were: timings on a shared machine are noisy)::

       .venv/bin/python scripts/gpu_check.py --data gpu_data --device cpu --threads 2 --sections speed \\
           --output output/gpu_cpu_baseline --write-baseline benchmarks/gpu_cpu_baseline.json

3. The device run, a call of the device tool (``run``), with ``carry=["gpu_data"]`` and
   ``timeout_s=540`` (the script stops itself after ``--budget-s`` 450 s; the rest covers a slow
   start and the transfer back)::

       set -o pipefail; PYTHONUNBUFFERED=1 python3 scripts/gpu_check.py --data gpu_data --output $OUT \\
           --cpu-baseline benchmarks/gpu_cpu_baseline.json --budget-s 450 2>&1 | tee $OUT/console.log

   It leaves at most 8 files in ``$OUT`` (what the tool brings back): ``report.json``,
   ``console.log``, ``pytest_cuda.log``, ``train_console.log``, ``network.pt``,
   ``network.pt.log.json`` (and ``report.json.tmp`` or ``network.pt.tmp`` if stopped while
   writing). Then call ``give_back``. With the machine's start and the transfers the call uses
   about 10 of the 15 minutes of device time, too few for a second full run: a run that fails in
   its first minute (an import error: run the dry run here first) can be repeated at once with
   ``--budget-s`` cut to the device time left (``status``'s ``budget_left_s``) minus 4 minutes.

4. The dry run (CPU, tiny iteration counts, the pair strided to 4 mm, one training step; about
   30 s on ``gpu_data``; ``Testing/test_gpu_check.py`` runs it on a tiny preparation, ``--prepare
   DIR --max-label-maps 2 --working-spacing 8 --oasis-stride 4``, with SimpleITK, slicer, vtk,
   tqdm and matplotlib made unimportable)::

       .venv/bin/python scripts/gpu_check.py --dry-run --data gpu_data --output output/gpu_dry_run
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "LearnedRegistration"))
sys.path.insert(0, str(ROOT / "scripts"))

import train  # noqa: E402  (scripts/train.py: the prepared data's format and the OASIS pair)

from LearnedRegistrationLib.engine.common import RegistrationOptions, choose_device  # noqa: E402
from LearnedRegistrationLib.engine.metrics import folding_percent  # noqa: E402
from LearnedRegistrationLib.engine.optimize import register_images  # noqa: E402
from LearnedRegistrationLib.engine.path import DEFAULT_KNOTS, PathOptions, register_path  # noqa: E402
from LearnedRegistrationLib.learned.network import NetworkConfig  # noqa: E402
from LearnedRegistrationLib.learned.weights import shipped_model_path  # noqa: E402
from LearnedRegistrationLib.training.synthesis import SynthesisConfig  # noqa: E402

#: The engine tests that take the ``device`` fixture (run on the GPU by the ``tests`` section).
ENGINE_TEST_FILES = (
    "Testing/test_engine_geometry.py",
    "Testing/test_engine_losses_metrics.py",
    "Testing/test_engine_optimize.py",
    "Testing/test_engine_path.py",
)
#: The dry run's few of them (seconds, not a minute): one per file, each computing on the device.
DRY_RUN_TESTS = (
    "test_scaling_and_squaring_of_constant_velocity_is_translation or test_diffusion_of_linear_field_is_closed_form "
    "or test_no_overlap_after_initialization or test_cancel_and_bad_options"
)
#: λ values at which the CPU and GPU λ paths are compared (the knots: where the path's own velocities are).
COMPARE_LAMBDAS = DEFAULT_KNOTS
#: CPU vs GPU: largest mean and 99th percentile of |d_cpu(x) - d_gpu(x)| over the fixed brain (labels > 0), mm.
#: Set from the spread that float rounding alone causes: the same registrations on this CPU with 1
#: and with 2 threads (another summation order, nothing else) differ by mean 0.37 mm, 99th
#: percentile 3.3 mm (max 12.9 mm) for ``optimize`` and mean 0.15-0.52 mm, p99 0.6-4.5 mm at the
#: path's knots (largest at λ = 0.05), with Dice within 0.0017: Adam amplifies last-bit differences
#: where the MSE leaves the field free (flat tissue), and the fields part there while the overlap
#: stays. The bounds are about twice that spread; the compare section also reports the GPU's own
#: run-to-run spread (atomic adds in ``grid_sample``'s backward pass) beside them.
FIELD_TOLERANCE_MM = {"mean": 1.0, "p99": 8.0}
#: CPU vs GPU: largest difference of the mean Dice over the 30 labels.
DICE_TOLERANCE = 0.005
#: Target of the displayed volume's update after a λ change on the GPU (ms).
LAMBDA_CHANGE_TARGET_MS = 30.0
#: The prepared folder plus the working tree must stay under this (the device tool carries 64 MiB).
SIZE_BUDGET_MIB = 48.0
#: Seconds kept back at the end of ``--budget-s`` for the training's last validation and checkpoint.
TRAIN_MARGIN_S = 25.0
#: The dry run registers (and validates the training on) the OASIS pair strided to about this voxel size (mm).
DRY_RUN_SPACING_MM = 4.0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prepare", type=Path, metavar="DIR",
                   help="write the prepared data into DIR (here, with SimpleITK) and exit")
    p.add_argument("--source", type=Path, default=Path(os.environ.get("LEARNEDREG_DATA", ROOT.parent / "shared" / "data")),
                   help="with --prepare: the shared data folder (default $LEARNEDREG_DATA or ../shared/data)")
    p.add_argument("--max-label-maps", type=int, default=0, help="with --prepare: only the first N label maps (0 = all 20)")
    p.add_argument("--working-spacing", type=float, default=train.DEFAULT_WORKING_SPACING_MM,
                   help="with --prepare: the training grid's voxel size (mm; default 2, the shipped model's)")
    p.add_argument("--oasis-stride", type=int, default=1,
                   help="with --prepare: keep every N-th voxel of the OASIS pair (1 = the 1 mm pair; 4 for tests)")
    p.add_argument("--data", type=Path, default=ROOT / "gpu_data", help="the prepared folder (default gpu_data)")
    p.add_argument("--output", type=Path, help="folder for report.json, the logs and the checkpoint ($OUT on the device)")
    p.add_argument("--device", default="cuda", help="the device under test (default cuda; cpu for the baseline)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--sections", default="tests,compare,speed,train",
                   help="comma-separated sections to run (default all: tests,compare,speed,train)")
    p.add_argument("--budget-s", type=float, default=450.0,
                   help="wall-clock seconds for the whole run; the training gets what is left (default 450)")
    p.add_argument("--lambda-repeats", type=int, default=50, help="λ changes timed (median; default 50)")
    p.add_argument("--cpu-baseline", type=Path, help="a report of a CPU run (--write-baseline): ratios against it")
    p.add_argument("--write-baseline", type=Path, help="also write the report to this file (the CPU baseline)")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, tiny iteration counts, a few tests, one training step: checks that the script works")
    args = p.parse_args(argv)
    if args.prepare is None and args.output is None:
        p.error("give --output (the run) or --prepare DIR (the preparation)")
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - {"tests", "compare", "speed", "train"})
    if unknown:
        p.error(f"unknown section(s) {unknown}; choose from tests, compare, speed, train")
    args.sections = sections
    if args.lambda_repeats < 1 or args.oasis_stride < 1 or args.max_label_maps < 0:
        p.error("--lambda-repeats and --oasis-stride must be >= 1, --max-label-maps >= 0")
    if args.dry_run:
        args.device = "cpu"
        args.lambda_repeats = min(args.lambda_repeats, 5)
    return args


# --------------------------------------------------------------------------------- preparation
def prepare(folder: Path, source: Path, max_label_maps: int, working_spacing: float, oasis_stride: int) -> dict:
    """Write what the GPU run reads into ``folder`` (module docstring) and return its manifest.

    Raises:
        ValueError: when the folder and the working tree would exceed :data:`SIZE_BUDGET_MIB`.
    """
    started = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    pair = train.read_oasis_pair(source / "brain_oasis").strided(oasis_stride).with_matched_histogram()
    train.save_prepared_pair(folder / train.PREPARED_PAIR, pair)
    maps, files, values, grid = train.load_label_maps(
        source / "synthseg_label_maps", train.DEFAULT_FOV_MM, working_spacing, NetworkConfig().divisor,
        SynthesisConfig.extracerebral_label, max_label_maps)
    train.save_prepared_label_maps(folder / train.PREPARED_LABEL_MAPS, maps, files, values, grid, train.DEFAULT_FOV_MM)
    carried = copy_pytest(folder / "site-packages")
    folder_bytes = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and f.name != "manifest.json")
    tree_bytes = working_tree_bytes()
    total_mib = (folder_bytes + (tree_bytes or 0)) / 2**20
    manifest = {
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain")),
        "source": str(source),
        "oasis_pair": {
            "file": train.PREPARED_PAIR,
            "pair": f"moving {train.VALIDATION_PAIR[0]} -> fixed {train.VALIDATION_PAIR[1]} (brain_oasis)",
            "shape_zyx": list(pair.fixed.shape),
            "spacing_mm": list(pair.fixed_grid.spacing),
            "stride": oasis_stride,
            "arrays": "fixed, moving, moving_matched (engine.common.match_histogram onto fixed): float32; fixed_labels, "
                      "moving_labels: int16 aseg; labels: the 30 voxelmorph_eval_labels_30; {fixed,moving}_{spacing,origin,"
                      "direction}: RAS geometry",
        },
        "label_maps": {
            "file": train.PREPARED_LABEL_MAPS,
            "count": len(files),
            "files": files,
            "working_spacing_mm": working_spacing,
            "shape_zyx": list(maps.shape[1:]),
            "fov_mm_zyx": list(train.DEFAULT_FOV_MM),
            "note": "aligned to the first map (centroid affine) and resampled (nearest) onto the working grid, uint16",
        },
        "site_packages": {"folder": "site-packages", "distributions": carried,
                          "note": "pytest and its requirements, used only where the GPU machine lacks pytest"},
        "size_mib": {"folder": round(folder_bytes / 2**20, 2),
                     "working_tree": None if tree_bytes is None else round(tree_bytes / 2**20, 2),
                     "together": round(total_mib, 2), "budget": SIZE_BUDGET_MIB, "device_tool_limit": 64},
        "seconds": round(time.perf_counter() - started, 1),
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    if total_mib > SIZE_BUDGET_MIB:
        raise ValueError(f"{folder} ({folder_bytes / 2**20:.1f} MiB) and the working tree ({(tree_bytes or 0) / 2**20:.1f} MiB) "
                         f"come to {total_mib:.1f} MiB, over the {SIZE_BUDGET_MIB:g} MiB budget; use fewer --max-label-maps "
                         "or a coarser --working-spacing")
    if _git("check-ignore", "-q", str(folder.resolve())) is None and folder.resolve().is_relative_to(ROOT):
        print(f"warning: {folder} is inside the repository but not git-ignored; it would travel (and could be committed)")
    return manifest


def copy_pytest(dest: Path) -> list[str]:
    """Copy pytest and its (pure-Python) requirements from this interpreter's environment into ``dest``,
    files and ``.dist-info`` as installed, without byte code; returns "name version" of each."""
    from importlib import metadata

    from packaging.requirements import Requirement

    copied, todo = [], ["pytest"]
    while todo:
        name = todo.pop()
        dist = metadata.distribution(name)
        if any(c.split()[0] == dist.metadata["Name"] for c in copied):
            continue
        for entry in dist.files or []:
            if ".." in entry.parts or "__pycache__" in entry.parts or entry.suffix == ".pyc":
                continue  # scripts outside site-packages, byte code
            source = Path(dist.locate_file(entry))
            if source.is_file():
                (dest / entry).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, dest / entry)
        copied.append(f"{dist.metadata['Name']} {dist.version}")
        for requirement in map(Requirement, dist.requires or []):
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return sorted(copied)


def working_tree_bytes():
    """Bytes of what the device tool sends: tracked and untracked-not-ignored files (None without git)."""
    listing = _git("ls-files", "-z", "--cached", "--others", "--exclude-standard")
    if listing is None:
        return None
    return sum((ROOT / name).stat().st_size for name in listing.split("\0") if name and (ROOT / name).is_file())


def _git(*command):
    """Output of ``git command`` in the repository, or None where git or the repository is missing."""
    try:
        return subprocess.run(["git", *command], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


# --------------------------------------------------------------------------------- sections
def environment(args) -> dict:
    """Versions, the devices, threads and load (``os.getloadavg``), the prepared data's manifest."""
    import scipy

    info = {
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg": [round(v, 2) for v in os.getloadavg()],
        "cuda_available": torch.cuda.is_available(),
        "simpleitk_installed": importlib.util.find_spec("SimpleITK") is not None,
        "pytest": pytest_source(args.data)[1],
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
    manifest = Path(args.data) / "manifest.json"
    info["prepared"] = json.loads(manifest.read_text()) if manifest.is_file() else None
    return info


def pytest_source(data: Path):
    """``(folder to add to PYTHONPATH or None, description)``: the interpreter's pytest when it has one,
    else the copy ``--prepare`` carried in ``data/site-packages``, else ``(None, "none")``."""
    spec = importlib.util.find_spec("pytest")
    if spec is not None:
        return None, f"installed ({Path(spec.origin).parent})"
    carried = Path(data) / "site-packages"
    if (carried / "pytest").is_dir():
        return carried, f"carried copy ({carried})"
    return None, "none"


def run_engine_tests(args, output: Path, timeout_s: float) -> dict:
    """``pytest`` on :data:`ENGINE_TEST_FILES` with ``LEARNEDREG_TEST_DEVICE=args.device``, in a child
    process; the log goes to ``output/pytest_<device>.log``, the counts come from its JUnit XML.

    Raises:
        RuntimeError: when no pytest is available (neither installed nor carried).
    """
    extra_path, where = pytest_source(args.data)
    if where == "none":
        raise RuntimeError(f"pytest is not installed and {args.data}/site-packages has no copy; run --prepare again")
    env = child_environment(extra_path, args.threads)
    env.update(LEARNEDREG_TEST_DEVICE=args.device, PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    log = output / f"pytest_{args.device.replace(':', '')}.log"
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *ENGINE_TEST_FILES]
        if args.dry_run:
            command += ["-k", DRY_RUN_TESTS]
        with log.open("w") as stream:
            try:
                code = subprocess.run(command, cwd=ROOT, env=env, stdout=stream, stderr=subprocess.STDOUT, timeout=timeout_s).returncode
            except subprocess.TimeoutExpired as exc:
                raise RuntimeError(f"the engine tests did not finish within {timeout_s:.0f} s (see {log.name})") from exc
        counts = junit_counts(junit) if junit.is_file() else {}
    passed = code == 0 and counts.get("tests", 0) > 0 and counts.get("failures", 1) == 0 and counts.get("errors", 1) == 0
    return {"passed": passed, "returncode": code, "device": args.device, "pytest": where, "log": log.name,
            "selection": DRY_RUN_TESTS if args.dry_run else "all", **counts}


def junit_counts(path: Path) -> dict:
    """Totals of a pytest JUnit XML file and the names of the tests that failed or errored."""
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    counts["time_s"] = round(sum(float(s.get("time", 0.0)) for s in suites), 1)
    counts["failed"] = [f"{case.get('classname')}::{case.get('name')}" for case in root.iter("testcase")
                        if case.find("failure") is not None or case.find("error") is not None]
    counts["skipped_tests"] = [f"{case.get('classname')}::{case.get('name')}" for case in root.iter("testcase")
                               if case.find("skipped") is not None]
    return counts


def child_environment(extra_path=None, threads: int = 0) -> dict:
    """This process's environment with the package (and ``extra_path`` last) on ``PYTHONPATH`` and,
    with ``threads``, ``OMP_NUM_THREADS`` (torch's CPU threads) set to it."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    parts = [str(ROOT / "LearnedRegistration"), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    if extra_path is not None:
        parts.append(str(extra_path))
    env["PYTHONPATH"] = os.pathsep.join(parts)
    return env


def registration_settings(dry_run: bool) -> tuple[RegistrationOptions, PathOptions]:
    """The engine's defaults; for the dry run a tenth of the iterations and two steps per knot."""
    if dry_run:
        return RegistrationOptions(iteration_scale=0.1), PathOptions(knot_iterations=2)
    return RegistrationOptions(), PathOptions()


def field_difference(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> dict:
    """|a(x) - b(x)| (mm) of two (Z, Y, X, 3) RAS displacements over ``mask``: mean, 99th percentile, max."""
    norm = np.linalg.norm(a.astype(np.float64) - b.astype(np.float64), axis=-1)[mask]
    return {"mean": float(norm.mean()), "p99": float(np.percentile(norm, 99)), "max": float(norm.max())}


def compare_devices(pair: train.OasisPair, devices, dry_run: bool) -> dict:
    """The same ``optimize`` run and λ path on each of two devices; fields and Dice side by side.

    Returns:
        Per device the Dice and seconds, the field differences (mm, inside the fixed brain),
        ``passed``: every difference within :data:`FIELD_TOLERANCE_MM` and :data:`DICE_TOLERANCE`,
        and the second device's run-to-run spread (``optimize`` once more) for context.
    """
    options, path_options = registration_settings(dry_run)
    moving, matching = pair.registration_moving()
    options = replace(options, histogram_matching=matching)
    brain = pair.fixed_labels > 0
    runs = []
    for device in devices:
        run = {"device": device}
        started = time.perf_counter()
        result = register_images(pair.fixed, pair.fixed_grid, moving, pair.moving_grid, replace(options, device=device))
        run["optimize_s"] = round(time.perf_counter() - started, 2)
        run["optimize_dice"] = pair.dice(result.displacement_ras)
        run["optimize_field"] = result.displacement_ras
        del result
        started = time.perf_counter()
        path = register_path(pair.fixed, pair.fixed_grid, moving, pair.moving_grid, replace(options, device=device), path_options)
        run["path_s"] = round(time.perf_counter() - started, 2)
        run["path_fields"] = {lam: path.evaluate(lam).displacement_ras for lam in COMPARE_LAMBDAS}
        run["path_dice"] = {lam: pair.dice(field) for lam, field in run["path_fields"].items()}
        del path
        runs.append(run)
    a, b = runs
    repeat = register_images(pair.fixed, pair.fixed_grid, moving, pair.moving_grid, replace(options, device=devices[1]))
    repeatability = field_difference(b["optimize_field"], repeat.displacement_ras, brain)
    del repeat
    checks = {"optimize": {"field_mm": field_difference(a["optimize_field"], b["optimize_field"], brain),
                           "dice": [a["optimize_dice"], b["optimize_dice"]]}}
    for lam in COMPARE_LAMBDAS:
        checks[f"path_lambda_{lam:g}"] = {"field_mm": field_difference(a["path_fields"][lam], b["path_fields"][lam], brain),
                                          "dice": [a["path_dice"][lam], b["path_dice"][lam]]}
    for check in checks.values():
        check["dice_difference"] = abs(check["dice"][0] - check["dice"][1])
        check["passed"] = (check["field_mm"]["mean"] <= FIELD_TOLERANCE_MM["mean"] and check["field_mm"]["p99"] <= FIELD_TOLERANCE_MM["p99"]
                           and check["dice_difference"] <= DICE_TOLERANCE)
    return {
        "passed": all(c["passed"] for c in checks.values()),
        "devices": [a["device"], b["device"]],
        "tolerance": {"field_mm": FIELD_TOLERANCE_MM, "dice": DICE_TOLERANCE, "where": "fixed brain (aseg > 0)"},
        "seconds": [{"device": r["device"], "optimize": r["optimize_s"], "path": r["path_s"]} for r in runs],
        "checks": checks,
        "repeatability": {"what": f"optimize run twice on {devices[1]}: |d_1 - d_2| inside the brain, mm (not a check)",
                          "field_mm": repeatability},
    }


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device):
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None


def _latency(samples_s) -> dict:
    ms = [1000.0 * s for s in samples_s]
    return {"median_ms": round(statistics.median(ms), 2), "p90_ms": round(float(np.percentile(ms, 90)), 2),
            "max_ms": round(max(ms), 2), "count": len(ms)}


def measure_speed(pair: train.OasisPair, device_name: str, repeats: int, dry_run: bool) -> dict:
    """Wall time, Dice, folding and peak GPU memory of ``optimize`` and the λ path on one device, and
    the latency of λ changes (module docstring). A short warm-up registration runs first (CUDA
    context, cuDNN and kernel caches); the first three λ changes are warm-up too and not counted."""
    device = choose_device(device_name)
    options, path_options = registration_settings(dry_run)
    moving, matching = pair.registration_moving()
    options = replace(options, histogram_matching=matching, device=str(device))
    args = (pair.fixed, pair.fixed_grid, moving, pair.moving_grid)
    register_images(*args, replace(options, iteration_scale=0.05 if not dry_run else 0.01))  # warm-up

    _reset_peak(device)
    _synchronize(device)
    started = time.perf_counter()
    result = register_images(*args, options)
    _synchronize(device)
    optimize = {"wall_s": round(time.perf_counter() - started, 3), "dice": pair.dice(result.displacement_ras),
                "folding_percent": folding_percent(result.jacobian, pair.fixed_labels > 0), "peak_gpu_gib": _peak_gib(device),
                "lambda": options.regularization_weight}
    del result

    _reset_peak(device)
    _synchronize(device)
    started = time.perf_counter()
    path = register_path(*args, options, path_options)
    _synchronize(device)
    path_run = {"wall_s": round(time.perf_counter() - started, 3), "peak_gpu_gib": _peak_gib(device),
                "knots": list(path.knots), "dice": {f"{lam:g}": pair.dice(path.evaluate(lam).displacement_ras) for lam in path.knots}}
    path_run["ratio_to_optimize"] = round(path_run["wall_s"] / optimize["wall_s"], 3)

    lambdas = [float(v) for v in np.linspace(0.05, 0.95, repeats + 3)]
    _reset_peak(device)
    shown, full = [], []
    for lam in lambdas:
        started = time.perf_counter()
        _ = path.evaluate(lam).warped  # a numpy array on the host: includes the copy back
        shown.append(time.perf_counter() - started)
    for lam in lambdas:
        started = time.perf_counter()
        path.predict(lam)
        full.append(time.perf_counter() - started)
    change = {"evaluate_warped": _latency(shown[3:]), "predict": _latency(full[3:]), "peak_gpu_gib": _peak_gib(device),
              "target_ms": LAMBDA_CHANGE_TARGET_MS}
    change["evaluate_warped"]["meets_target"] = change["evaluate_warped"]["median_ms"] <= LAMBDA_CHANGE_TARGET_MS
    return {"device": str(device), "shape_zyx": list(pair.fixed.shape), "optimize": optimize, "path": path_run, "lambda_change": change}


def ratios(speed: dict, baseline: dict) -> dict:
    """Each speed figure beside the CPU baseline's and ``cpu / this`` (the speed-up), plus the Dice differences."""
    cpu = baseline.get("speed", baseline)
    pairs = {
        "optimize_wall_s": (speed["optimize"]["wall_s"], cpu["optimize"]["wall_s"]),
        "path_wall_s": (speed["path"]["wall_s"], cpu["path"]["wall_s"]),
        "evaluate_warped_median_ms": (speed["lambda_change"]["evaluate_warped"]["median_ms"],
                                      cpu["lambda_change"]["evaluate_warped"]["median_ms"]),
        "predict_median_ms": (speed["lambda_change"]["predict"]["median_ms"], cpu["lambda_change"]["predict"]["median_ms"]),
    }
    out = {name: {"this": this, "cpu_baseline": base, "speedup": round(base / this, 2) if this else None}
           for name, (this, base) in pairs.items()}
    out["optimize_dice_difference"] = speed["optimize"]["dice"] - cpu["optimize"]["dice"]
    out["baseline_environment"] = {k: baseline.get("environment", {}).get(k) for k in ("torch", "torch_threads", "loadavg", "cpu_count")}
    return out


def run_training(args, data: Path, output: Path, seconds: float) -> dict:
    """``scripts/train.py --prepared data`` in a child process for about ``seconds`` (one step in the
    dry run); the summary of its log (``network.pt.log.json``) and the console log's name.

    Raises:
        RuntimeError: when it fails or writes no log.
    """
    checkpoint = output / "network.pt"
    command = [sys.executable, str(ROOT / "scripts" / "train.py"), "--prepared", str(data), "--device", args.device,
               "--output", str(checkpoint), "--init", str(shipped_model_path()), "--seed", "0", "--lr", "5e-4",
               "--rotation-deg", "1", "--translation-mm", "1", "--scaling", "0.01", "--bf16"]
    if args.threads:
        command += ["--threads", str(args.threads)]
    if args.dry_run:
        command += ["--steps", "1", "--val-every", "1", "--batch-size", "2", "--val-lambdas", "0.2"]
    else:
        batch = ["--batch-size", "0"] if args.device.startswith("cuda") else ["--batch-size", "1"]
        command += ["--steps", "1000000000", "--val-every", "1000000000", *batch, "--checkpoint-every-s", "120",
                    "--time-limit-s", f"{seconds:.0f}", "--val-lambdas", "0.05,0.2,0.5"]
    log = output / "train_console.log"
    with log.open("w") as stream:
        try:
            code = subprocess.run(command, cwd=ROOT, env=child_environment(threads=args.threads), stdout=stream, stderr=subprocess.STDOUT,
                                  timeout=seconds + 120).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    meta_path = checkpoint.with_name(checkpoint.name + ".log.json")
    if code != 0 or not meta_path.is_file():
        raise RuntimeError(f"scripts/train.py ended with {code} (see {log.name}): {log.read_text()[-2000:]}")
    meta = json.loads(meta_path.read_text())
    continued = (meta.get("continued_from") or {}).get("iterations", 0)
    new_curve = [row for row in meta["validation_curve"] if row["step"] > continued]
    new_steps = meta["iterations"] - continued
    train_s = meta["train_time_s"] - (meta.get("continued_from") or {}).get("train_time_s", 0.0)
    return {
        "passed": new_steps >= 1 and bool(new_curve),
        "steps": new_steps,
        "batch_size": meta["optimizer"]["batch_size"],
        "pairs_per_s": None if not train_s else round(new_steps * meta["optimizer"]["batch_size"] / max(train_s, 1e-9), 2),
        "wall_time_s": meta["wall_time_s"],
        "peak_gpu_gib": meta.get("peak_gpu_memory_gib"),
        "dice_after_affine": meta["dice_after_affine"],
        "validation": new_curve,
        "checkpoint": checkpoint.name,
        "log": log.name,
    }


# --------------------------------------------------------------------------------- main
def _jsonable(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def write_report(path: Path, report: dict) -> None:
    """Write ``report`` as JSON through a temporary file (a run stopped mid-write keeps the last one)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=_jsonable))
    os.replace(tmp, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.prepare is not None:
        manifest = prepare(args.prepare, args.source, args.max_label_maps, args.working_spacing, args.oasis_stride)
        print(json.dumps({k: manifest[k] for k in ("oasis_pair", "label_maps", "size_mib", "seconds")}, indent=1))
        return 0
    deadline = time.monotonic() + args.budget_s
    output = args.output
    output.mkdir(parents=True, exist_ok=True)
    report_path = output / "report.json"
    report = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "dry_run": args.dry_run,
        "device": args.device,
        "sections": args.sections,
        "environment": environment(args),
    }
    write_report(report_path, report)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA GPU; use --device cpu or --dry-run", file=sys.stderr)
        return 2
    print(f"environment: {json.dumps({k: v for k, v in report['environment'].items() if k != 'prepared'})}", flush=True)

    pair = None

    def oasis() -> train.OasisPair:
        """The prepared pair; in the dry run strided to about :data:`DRY_RUN_SPACING_MM`."""
        nonlocal pair
        if pair is None:
            pair = train.load_prepared_pair(args.data)
            if args.dry_run:
                pair = pair.strided(max(1, round(DRY_RUN_SPACING_MM / min(pair.fixed_grid.spacing))))
        return pair

    def section(name: str, work) -> None:
        started = time.perf_counter()
        print(f"[{name}] started ({deadline - time.monotonic():.0f} s of the budget left)", flush=True)
        try:
            report[name] = {"status": "ok", **work()}
        except Exception as exc:  # a harness: record any failure, keep the other sections
            report[name] = {"status": "error", "passed": False, "error": f"{type(exc).__name__}: {exc}",
                            "traceback": traceback.format_exc()}
        report[name]["seconds"] = round(time.perf_counter() - started, 1)
        report[name]["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]  # how busy the CPUs were (1, 5, 15 min)
        write_report(report_path, report)
        shown = {k: v for k, v in report[name].items() if k not in ("traceback", "checks", "validation", "skipped_tests")}
        print(f"[{name}] {json.dumps(shown, default=_jsonable)}", flush=True)

    if "tests" in args.sections:
        section("tests", lambda: run_engine_tests(args, output, min(240.0, max(30.0, deadline - time.monotonic() - 120.0))))
    if "compare" in args.sections:
        if args.dry_run:
            devices = ("cpu", "cpu")
        elif args.device.startswith("cuda"):
            devices = ("cpu", args.device)
        else:
            devices = None
        if devices is not None:
            section("compare", lambda: compare_devices(oasis(), devices, args.dry_run))
        else:
            report["compare"] = {"status": "skipped", "passed": True, "reason": f"needs a GPU; --device is {args.device}"}
    if "speed" in args.sections:
        def speed() -> dict:
            figures = measure_speed(oasis(), args.device, args.lambda_repeats, args.dry_run)
            if args.cpu_baseline is not None:
                figures["against_cpu_baseline"] = ratios(figures, json.loads(args.cpu_baseline.read_text()))
            return {"passed": True, **figures}

        section("speed", speed)
    if "train" in args.sections:
        seconds = deadline - time.monotonic() - TRAIN_MARGIN_S
        if args.dry_run:
            def dry_training() -> dict:  # the same label maps, with the strided pair for a quick validation
                with tempfile.TemporaryDirectory() as tmp:
                    shutil.copy2(Path(args.data) / train.PREPARED_LABEL_MAPS, tmp)
                    train.save_prepared_pair(Path(tmp) / train.PREPARED_PAIR, oasis())
                    return run_training(args, Path(tmp), output, seconds)

            section("train", dry_training)
        elif seconds >= 60.0:
            section("train", lambda: run_training(args, args.data, output, seconds))
        else:
            report["train"] = {"status": "skipped", "passed": True, "reason": f"only {seconds:.0f} s of the budget left"}
    ran = [report[name] for name in args.sections if name in report]
    report["passed"] = all(r.get("status") in ("ok", "skipped") and r.get("passed", True) for r in ran)
    report["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    write_report(report_path, report)
    if args.write_baseline is not None:
        args.write_baseline.parent.mkdir(parents=True, exist_ok=True)
        write_report(args.write_baseline, report)
    print(f"{'passed' if report['passed'] else 'FAILED'}: {report_path}", flush=True)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
