"""A clinical-size pair (512 x 512 x 400 float32, a routine CT) through the command line's logic:
peak memory, time, and the refusal when memory is short.

The pair: the real thorax/abdomen CT of ``abdomen_totalseg/example_ct.nii.gz`` (3 mm) resampled
onto a 512 x 512 x 400 grid over its own field of view (0.71 x 0.59 x 0.84 mm voxels) as the
moving image, and the same CT deformed by a known smooth B-spline transform (up to about 9 mm) as
the fixed image, so that the registration's error against the true displacement is known. Both
are written as uncompressed NRRD into a temporary folder (never into the repository) by a child
process of their own.

Each measurement runs in a fresh child process on ``--threads`` CPU threads (``OMP_NUM_THREADS``
and ``torch.set_num_threads``), whose peak resident memory is ``resource.getrusage`` 's
``ru_maxrss``:

- **register**: the images loaded into a headless slicer-core scene (``app.headless``) and
  registered with ``bridge.logic.RegistrationLogic.register`` (the command line's logic, default
  method "path"), every output node written; wall time from the start of the child.
- **command line**: ``learnedreg register --fixed ... --moving ... --output-dir ...`` (the same,
  plus writing every output file and the ``.mrb`` scene).
- **refusal**: the register child with ``LEARNEDREG_MEMORY_LIMIT_GB`` set below the need (a
  machine short of memory): the engine must refuse before any heavy work, with one line saying
  what to change.
- **baseline** (same run): the register child on the same CT and field of view at 256 x 256 x 200
  (1/8 of the voxels): the registration itself works on the same 2 mm pyramid, so the ratios
  show what the full-resolution part costs.

    .venv/bin/python scripts/benchmark_large_volume.py       # -> benchmarks/large_volume.{md,json}

Targets (issue 16, item 5): the register child in <= 6 GB peak RSS and <= 5 minutes on 2 threads,
and a clear refusal when memory is short. Timings on a machine shared with other work are noisy:
the load average is recorded beside each.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "LearnedRegistration"))

CT = "abdomen_totalseg/example_ct.nii.gz"
SIZE = (512, 512, 400)  # (X, Y, Z)
BASELINE_SIZE = (256, 256, 200)
TARGET_PEAK_GB = 6.0
TARGET_SECONDS = 300.0
#: The known deformation: a cubic B-spline on a 4 x 4 x 4 mesh with N(0, 2.5 mm) coefficients.
BSPLINE_MESH, BSPLINE_SD_MM, SEED = 4, 2.5, 0
#: Body voxels (CT > -500 HU in the fixed image) where the displacement error is measured.
ERROR_POINTS = 20_000


# ------------------------------------------------------------------------------------- the pair
def _reference(size):
    """(SimpleITK image of the CT, empty float32 reference image of ``size`` over the CT's extent)."""
    import numpy as np
    import SimpleITK as sitk

    ct = sitk.Cast(sitk.ReadImage(str(_data() / CT)), sitk.sitkFloat32)
    extent = (np.array(ct.GetSize()) - 1) * np.array(ct.GetSpacing())
    reference = sitk.Image([int(n) for n in size], sitk.sitkFloat32)
    reference.SetSpacing((extent / (np.array(size) - 1)).tolist())
    reference.SetOrigin(ct.GetOrigin())
    reference.SetDirection(ct.GetDirection())
    return ct, reference


def _true_transform(reference):
    """The known B-spline transform (LPS): the fixed image is ``ct(T(x))``, so the true resampling
    displacement at a fixed point x is ``T(x) - x``."""
    import numpy as np
    import SimpleITK as sitk

    transform = sitk.BSplineTransformInitializer(reference, [BSPLINE_MESH] * 3, 3)
    rng = np.random.default_rng(SEED)
    transform.SetParameters(rng.normal(0.0, BSPLINE_SD_MM, len(transform.GetParameters())).tolist())
    return transform


def make_pair(size, folder: Path) -> dict:
    """Write fixed.nrrd (the CT deformed by the known transform) and moving.nrrd (the CT) of ``size``."""
    import SimpleITK as sitk

    ct, reference = _reference(size)
    fixed = sitk.Resample(ct, reference, _true_transform(reference), sitk.sitkLinear, -1024.0, sitk.sitkFloat32)
    sitk.WriteImage(fixed, str(folder / "fixed.nrrd"), useCompression=False)
    del fixed
    moving = sitk.Resample(ct, reference, sitk.Transform(), sitk.sitkLinear, -1024.0, sitk.sitkFloat32)
    sitk.WriteImage(moving, str(folder / "moving.nrrd"), useCompression=False)
    return {"size": list(size), "spacing_mm": [round(s, 4) for s in reference.GetSpacing()]}


def displacement_error(size, displacement_ras, grid, fixed) -> dict:
    """Error (mm) of a (Z, Y, X, 3) RAS displacement against the known one at body voxels of ``fixed``."""
    import numpy as np

    _, reference = _reference(size)
    transform = _true_transform(reference)
    rng = np.random.default_rng(1)
    body = np.flatnonzero(fixed.reshape(-1) > -500.0)
    picked = np.sort(rng.choice(body, size=min(ERROR_POINTS, body.size), replace=False))
    kji = np.stack(np.unravel_index(picked, grid.shape), axis=1)
    ras = (grid.ijk_to_ras @ np.c_[kji[:, ::-1], np.ones(len(kji))].T)[:3].T
    flip = np.array([-1.0, -1.0, 1.0])  # RAS <-> LPS
    truth = np.array([np.asarray(transform.TransformPoint((p * flip).tolist())) * flip - p for p in ras])
    estimated = displacement_ras[kji[:, 0], kji[:, 1], kji[:, 2]].astype(np.float64)
    error = np.linalg.norm(estimated - truth, axis=1)
    return {
        "displacement_error_mean_mm": round(float(error.mean()), 3),
        "displacement_error_p95_mm": round(float(np.percentile(error, 95)), 3),
        "true_displacement_mean_mm": round(float(np.linalg.norm(truth, axis=1).mean()), 3),
        "points": int(len(picked)),
    }


def _data() -> Path:
    return Path(os.environ.get("LEARNEDREG_DATA", ROOT.parent / "shared" / "data"))


# ------------------------------------------------------------------------------------- children
def _peak_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss: KiB on Linux


def child_register(folder: Path, size) -> dict:
    """Load the pair into a headless scene and register it with the logic (default method)."""
    started = time.perf_counter()
    import numpy as np
    import torch
    from vtk.util import numpy_support

    from LearnedRegistrationLib.app.headless import HeadlessSlicer
    from LearnedRegistrationLib.bridge import mrml
    from LearnedRegistrationLib.bridge.logic import RegistrationLogic
    from LearnedRegistrationLib.engine.common import RegistrationOptions
    from LearnedRegistrationLib.engine.optimize import estimate_memory

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    row: dict = {}
    with HeadlessSlicer(cacheDirectory=folder / "cache") as app:
        fixed_node = app.loadVolume(folder / "fixed.nrrd", "fixed")
        moving_node = app.loadVolume(folder / "moving.nrrd", "moving")
        row["loaded_s"] = round(time.perf_counter() - started, 1)
        row["peak_before_register_gb"] = round(_peak_gb(), 2)
        estimate = estimate_memory(mrml.gridFromVolumeNode(fixed_node), mrml.gridFromVolumeNode(moving_node), RegistrationOptions())
        row["estimate_gb"] = {k: round(getattr(estimate, k) / 1e9, 2) for k in ("preparation", "registration", "outputs", "peak")}
        logic = RegistrationLogic()
        begin = time.perf_counter()
        try:
            outputs = logic.register(fixed_node, moving_node)
        except ValueError as error:  # the refusal
            row.update(refused=True, message=str(error), refused_after_s=round(time.perf_counter() - begin, 2))
        else:
            row.update(refused=False, register_s=round(time.perf_counter() - begin, 1))
            row["history_s"] = {k: round(v, 1) for k, v in logic.instantSession().history.items() if k.startswith("time_")}
            row["folding_percent"] = outputs.metrics["folding_percent"]
            row["sdlogj"] = round(outputs.metrics["sdlogj"], 4)
            image = outputs.displacementVolumeNode.GetImageData()
            grid = mrml.gridFromVolumeNode(outputs.displacementVolumeNode)
            displacement = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(*grid.shape, 3)
            fixed = numpy_support.vtk_to_numpy(fixed_node.GetImageData().GetPointData().GetScalars()).reshape(grid.shape)
            row["wall_s"] = round(time.perf_counter() - started, 1)
            row["peak_rss_gb"] = round(_peak_gb(), 2)
            row.update(displacement_error(size, displacement, grid, np.asarray(fixed)))
    row.setdefault("wall_s", round(time.perf_counter() - started, 1))
    row.setdefault("peak_rss_gb", round(_peak_gb(), 2))
    return row


def child_cli(folder: Path) -> dict:
    """``learnedreg register`` on the pair, every file and the scene written."""
    started = time.perf_counter()
    import torch

    from LearnedRegistrationLib.app.cli import main

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    status = main(["register", "--fixed", str(folder / "fixed.nrrd"), "--moving", str(folder / "moving.nrrd"),
                   "--output-dir", str(folder / "cli-output"), "--quiet"])
    return {"status": status, "wall_s": round(time.perf_counter() - started, 1), "peak_rss_gb": round(_peak_gb(), 2)}


def run_child(role: str, folder: Path, size, threads: int, env: dict | None = None) -> dict:
    """Run ``role`` in a fresh process; its result (one JSON line) with the load average around it."""
    environment = dict(os.environ, OMP_NUM_THREADS=str(threads), **(env or {}))
    before = os.getloadavg()
    command = [sys.executable, __file__, "--child", role, "--folder", str(folder), "--size", "x".join(map(str, size))]
    done = subprocess.run(command, env=environment, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"child {role} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    row["loadavg_1min_before_after"] = [round(before[0], 2), round(os.getloadavg()[0], 2)]
    return row


# ------------------------------------------------------------------------------------- report
def render(results: dict) -> str:
    full, base, cli, refusal = results["register"], results["baseline"], results.get("cli"), results["refusal"]
    size = "×".join(map(str, results["pair"]["size"]))
    base_size = "×".join(map(str, results["baseline_pair"]["size"]))
    met = lambda ok: "met" if ok else "**missed**"  # noqa: E731
    lines = [
        "# Clinical-size volumes: peak memory, time, refusal",
        "",
        f"`python scripts/benchmark_large_volume.py` — {results['date']}, {results['machine']}, {results['threads']} torch threads, "
        f"torch {results['torch']}. Pair: the real CT `{CT}` resampled to {size} float32 "
        f"({' × '.join(f'{s:g}' for s in results['pair']['spacing_mm'])} mm) as the moving image, and the same deformed by a known "
        f"B-spline (mean {full.get('true_displacement_mean_mm', 'n/a')} mm at body voxels) as the fixed image. Each row is a fresh "
        "process; peak RSS is its `ru_maxrss`. The machine was shared with other work: the 1-minute load average "
        "before/after each run is listed, and the timings are noisy.",
        "",
        "| run | wall s | peak RSS GB | load avg before/after | notes |",
        "|---|---|---|---|---|",
        f"| register {size} (logic, default method path) | {full['wall_s']} | {full['peak_rss_gb']} | "
        f"{full['loadavg_1min_before_after']} | loading {full['loaded_s']} s, registration and every output node "
        f"{full['register_s']} s; error vs the known field {full['displacement_error_mean_mm']} mm mean, "
        f"{full['displacement_error_p95_mm']} mm p95 |",
        f"| baseline: register {base_size} (same CT, same field of view) | {base['wall_s']} | {base['peak_rss_gb']} | "
        f"{base['loadavg_1min_before_after']} | registration {base['register_s']} s; error {base['displacement_error_mean_mm']} mm mean |",
    ]
    if cli is not None:
        lines.append(f"| command line {size} (`learnedreg register`, files and scene written) | {cli['wall_s']} | {cli['peak_rss_gb']} | "
                     f"{cli['loadavg_1min_before_after']} | exit status {cli['status']} |")
    lines += [
        f"| refusal {size}, `LEARNEDREG_MEMORY_LIMIT_GB={results['refusal_limit_gb']:g}` | {refusal['wall_s']} | "
        f"{refusal['peak_rss_gb']} | {refusal['loadavg_1min_before_after']} | refused {refusal['refused_after_s']} s into "
        "`register` |",
        "",
        f"Refusal message: `{refusal.get('message', '(none: not refused)')}`",
        "",
        "| | value | target |",
        "|---|---|---|",
        f"| peak RSS, register {size} | {full['peak_rss_gb']} GB | ≤ {TARGET_PEAK_GB:g} GB: {met(full['peak_rss_gb'] <= TARGET_PEAK_GB)} |",
        f"| wall time, register {size} | {full['wall_s']} s | ≤ {TARGET_SECONDS:g} s: {met(full['wall_s'] <= TARGET_SECONDS)} |",
        f"| refused when short of memory | {refusal['refused']} | refused with one line: {met(refusal['refused'])} |",
        f"| peak RSS before registering (process, scene, both images loaded) | {full['peak_before_register_gb']} GB | |",
        f"| the engine's estimate of its own need (preparation / registration / outputs) | "
        f"{full['estimate_gb']['preparation']} / {full['estimate_gb']['registration']} / {full['estimate_gb']['outputs']} GB | |",
        f"| peak RSS, full size / baseline (voxels ×{results['voxel_ratio']:g}) | ×{results['ratios']['peak_rss']:.2f} | |",
        f"| wall time, full size / baseline | ×{results['ratios']['wall']:.2f} | |",
        "",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (the target is 2 cores)")
    parser.add_argument("--size", default="x".join(map(str, SIZE)), help="X x Y x Z voxels of the pair")
    parser.add_argument("--baseline-size", default="x".join(map(str, BASELINE_SIZE)))
    parser.add_argument("--refusal-limit-gb", type=float, default=2.0, help="LEARNEDREG_MEMORY_LIMIT_GB of the refusal run")
    parser.add_argument("--skip-cli", action="store_true", help="leave out the command-line run (it also writes every file)")
    parser.add_argument("--work", type=Path, default=None, help="folder for the images (default: a temporary folder, removed)")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "large_volume", help="prefix of the .md/.json results")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    size = tuple(int(n) for n in args.size.split("x"))

    if args.child:
        row = {"register": lambda: child_register(args.folder, size), "cli": lambda: child_cli(args.folder),
               "pair": lambda: make_pair(size, args.folder)}[args.child]()
        print(json.dumps(row))
        return 0

    import torch

    baseline_size = tuple(int(n) for n in args.baseline_size.split("x"))
    with tempfile.TemporaryDirectory(prefix="learnedreg-large-", dir=args.work) as work:
        full_dir, base_dir = Path(work) / "full", Path(work) / "baseline"
        full_dir.mkdir()
        base_dir.mkdir()
        results: dict = {
            "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} {os.cpu_count()} cores",
            "threads": args.threads, "torch": torch.__version__, "refusal_limit_gb": args.refusal_limit_gb,
        }
        results["pair"] = run_child("pair", full_dir, size, args.threads)
        results["baseline_pair"] = run_child("pair", base_dir, baseline_size, args.threads)
        print("pairs written", flush=True)
        results["baseline"] = run_child("register", base_dir, baseline_size, args.threads)
        print("baseline", results["baseline"], flush=True)
        results["register"] = run_child("register", full_dir, size, args.threads)
        print("register", results["register"], flush=True)
        results["refusal"] = run_child("register", full_dir, size, args.threads,
                                       {"LEARNEDREG_MEMORY_LIMIT_GB": f"{args.refusal_limit_gb:g}"})
        print("refusal", results["refusal"], flush=True)
        if not args.skip_cli:
            results["cli"] = run_child("cli", full_dir, size, args.threads)
            print("cli", results["cli"], flush=True)
    full, base = results["register"], results["baseline"]
    results["voxel_ratio"] = math.prod(size) / math.prod(baseline_size)
    results["ratios"] = {"peak_rss": full["peak_rss_gb"] / base["peak_rss_gb"], "wall": full["wall_s"] / base["wall_s"]}
    results["targets"] = {"peak_rss_gb": TARGET_PEAK_GB, "wall_s": TARGET_SECONDS}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    args.output.with_suffix(".md").write_text(render(results))
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
