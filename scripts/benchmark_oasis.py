#!/usr/bin/env python
"""Optimizer benchmark on the real OASIS pair (moving l2r_subject1 -> fixed vxm_test_scan).

For each λ it runs the instance optimization in a fresh process (so peak RSS is that run's own),
and measures, in the same run, two baselines: no registration (identity) and SimpleITK's
diffeomorphic demons (the strongest classical tool on this pair). It prints a table with runtime,
peak memory, Dice over the 30 VoxelMorph labels before/after, HD95, % folding and SDlogJ, plus
ratios against demons, and writes ``benchmarks/oasis_optimize.{md,json}``.

    python scripts/benchmark_oasis.py [--lambdas 0.02,0.05,0.1,0.2] [--threads 2] [--no-demons]

Data come from ``--data`` or ``$LEARNEDREG_DATA`` (default ``../shared/data``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "LearnedRegistration"))

PAIR = ("l2r_subject1", "vxm_test_scan")  # (moving, fixed)


def load_pair(data: Path):
    from LearnedRegistrationLib.imageio import read_volume

    folder = data / "brain_oasis"
    moving, moving_grid = read_volume(folder / f"{PAIR[0]}_T1.nii.gz")
    fixed, fixed_grid = read_volume(folder / f"{PAIR[1]}_T1.nii.gz")
    moving_labels, _ = read_volume(folder / f"{PAIR[0]}_aseg.nii.gz")
    fixed_labels, _ = read_volume(folder / f"{PAIR[1]}_aseg.nii.gz")
    labels = json.loads((folder / "labels.json").read_text())["voxelmorph_eval_labels_30"]
    return fixed, fixed_grid, moving, moving_grid, fixed_labels, moving_labels, labels


def score(displacement_ras, jacobian, pair) -> dict:
    import numpy as np

    from LearnedRegistrationLib.metrics import dice_mean, folding_percent, hd95_mm, sdlogj
    from LearnedRegistrationLib.transforms import resample_image

    fixed, fixed_grid, moving, moving_grid, fixed_labels, moving_labels, labels = pair
    warped_labels = resample_image(moving_labels, moving_grid, fixed_grid, displacement_ras, mode="nearest")
    hd = hd95_mm(fixed_labels, warped_labels, labels, fixed_grid)
    return {
        "dice_mean": dice_mean(fixed_labels, warped_labels, labels),
        "hd95_mean_mm": float(np.mean([v for v in hd.values() if np.isfinite(v)])),
        "folding_percent": folding_percent(jacobian),
        "sdlogj": sdlogj(jacobian),
    }


def run_ours(data: Path, lam: float) -> dict:
    from LearnedRegistrationLib.optimize import RegistrationOptions, register_images

    pair = load_pair(data)
    fixed, fixed_grid, moving, moving_grid = pair[:4]
    start = time.perf_counter()
    result = register_images(fixed, fixed_grid, moving, moving_grid, RegistrationOptions(regularization_weight=lam))
    runtime = time.perf_counter() - start
    row = {"method": f"ours (optimize, λ={lam:g})", "lambda": lam, "runtime_s": runtime, "device": result.device}
    row.update(score(result.displacement_ras, result.jacobian, pair))
    row["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    return row


def run_identity(data: Path) -> dict:
    import numpy as np

    from LearnedRegistrationLib.metrics import jacobian_map

    pair = load_pair(data)
    zero = np.zeros((*pair[1].shape, 3), np.float32)
    row = {"method": "no registration", "runtime_s": 0.0}
    row.update(score(zero, jacobian_map(zero, pair[1]), pair))
    row["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    return row


def run_demons(data: Path) -> dict:
    """SimpleITK diffeomorphic demons, 3-level pyramid, after histogram matching (pair is pre-aligned)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_helpers import demons_displacement  # the one home of the demons baseline

    from LearnedRegistrationLib.metrics import jacobian_map

    pair = load_pair(data)
    fixed, fixed_grid, moving, moving_grid = pair[:4]
    start = time.perf_counter()
    displacement_ras = demons_displacement(fixed, fixed_grid, moving, moving_grid)
    runtime = time.perf_counter() - start
    row = {"method": "SimpleITK diffeomorphic demons", "runtime_s": runtime}
    row.update(score(displacement_ras, jacobian_map(displacement_ras, fixed_grid), pair))
    row["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    return row


def in_subprocess(args: list[str], threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, __file__, *args], env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def markdown(rows: list[dict], demons: dict | None, meta: dict) -> str:
    lines = [
        "# Optimizer benchmark: OASIS pair (l2r_subject1 → vxm_test_scan)",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}, {meta['threads']} threads, torch {meta['torch']}, date {meta['date']}",
        "",
        "| method | λ | runtime s | peak RSS GB | Dice (30 labels) | HD95 mm | % folding | SDlogJ | time vs demons | ΔDice vs demons |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = f"{r['runtime_s'] / demons['runtime_s']:.2f}×" if demons and r["runtime_s"] > 0 else "–"
        delta = f"{r['dice_mean'] - demons['dice_mean']:+.3f}" if demons else "–"
        lam = f"{r['lambda']:g}" if "lambda" in r else "–"
        lines.append(
            f"| {r['method']} | {lam} | {r['runtime_s']:.1f} | {r['peak_rss_gb']:.2f} | {r['dice_mean']:.3f} | "
            f"{r['hd95_mean_mm']:.2f} | {r['folding_percent']:.4f} | {r['sdlogj']:.3f} | {ratio} | {delta} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    from LearnedRegistrationLib.optimize import DEFAULT_LAMBDA

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("LEARNEDREG_DATA", ROOT.parent / "shared" / "data")))
    parser.add_argument("--lambdas", default=None, help=f"comma-separated λ values (default {DEFAULT_LAMBDA} and neighbours)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-demons", action="store_true", help="skip the SimpleITK demons baseline")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks")
    parser.add_argument("--single", help=argparse.SUPPRESS)  # internal: one measurement in this process
    args = parser.parse_args()

    if args.single:
        import torch

        torch.set_num_threads(args.threads)
        kind, _, value = args.single.partition("=")
        row = {"identity": lambda: run_identity(args.data), "demons": lambda: run_demons(args.data)}.get(
            kind, lambda: run_ours(args.data, float(value))
        )()
        print(json.dumps(row))
        return

    lambdas = [float(v) for v in args.lambdas.split(",")] if args.lambdas else sorted({DEFAULT_LAMBDA / 2, DEFAULT_LAMBDA, DEFAULT_LAMBDA * 2, DEFAULT_LAMBDA * 4})
    base = ["--data", str(args.data), "--threads", str(args.threads)]
    rows = [in_subprocess([*base, "--single", "identity"], args.threads)]
    demons = None
    if not args.no_demons:
        demons = in_subprocess([*base, "--single", "demons"], args.threads)
        rows.append(demons)
    for lam in lambdas:
        rows.append(in_subprocess([*base, "--single", f"ours={lam}"], args.threads))
        print(f"λ={lam:g}: Dice {rows[-1]['dice_mean']:.3f}, {rows[-1]['runtime_s']:.1f} s", file=sys.stderr)

    import torch

    meta = {
        "command": "python scripts/benchmark_oasis.py" + (f" --lambdas {args.lambdas}" if args.lambdas else ""),
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "threads": args.threads,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    text = markdown(rows, demons, meta)
    print(text)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "oasis_optimize.md").write_text(text)
    (args.output / "oasis_optimize.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
