"""Mutual information on the OASIS pair: this tree against an earlier revision, in one run.

Issue 17 asks MI to be at least 5x faster than when it was filed, at equal or better Dice. The
earlier code is taken from git (``git archive <rev>``, default ``20ce0a3``, the tree the issue was
filed against) into a temporary folder; each side registers both OASIS directions with
``similarity="mi"`` at the default λ in its own process (2 torch threads, same machine, one after
the other), and the script prints and writes the times, the mean Dice over the 30 evaluation
labels and the ratios.

Usage::

    python scripts/benchmark_mi.py [--baseline-rev 20ce0a3] [--data ../shared/data]
                                   [--output benchmarks/mi_speed.md]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Runs in a child process with the tree to measure first on sys.path: one registration, one JSON line.
CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np, torch
torch.set_num_threads(int(sys.argv[5]))
from LearnedRegistrationLib.engine.common import RegistrationOptions
from LearnedRegistrationLib.engine.imageio import read_volume
from LearnedRegistrationLib.engine.metrics import dice_per_label
from LearnedRegistrationLib.engine.optimize import register_images
from LearnedRegistrationLib.engine.transforms import resample_image
oasis, moving_name, fixed_name = sys.argv[2], sys.argv[3], sys.argv[4]
labels = json.load(open(oasis + "/labels.json"))["voxelmorph_eval_labels_30"]
fixed, fixed_grid = read_volume(f"{oasis}/{fixed_name}_T1.nii.gz")
moving, moving_grid = read_volume(f"{oasis}/{moving_name}_T1.nii.gz")
fixed_labels, _ = read_volume(f"{oasis}/{fixed_name}_aseg.nii.gz")
moving_labels, _ = read_volume(f"{oasis}/{moving_name}_aseg.nii.gz")
start = time.perf_counter()
result = register_images(fixed, fixed_grid, moving, moving_grid, RegistrationOptions(similarity="mi", device="cpu"))
seconds = time.perf_counter() - start
warped = np.rint(resample_image(moving_labels, moving_grid, fixed_grid, result.displacement_ras, mode="nearest"))
dice = np.mean(list(dice_per_label(np.rint(fixed_labels).astype(np.int32), warped.astype(np.int32), labels).values()))
print(json.dumps({"seconds": seconds, "dice": float(dice)}))
"""

DIRECTIONS = (("l2r_subject1", "vxm_test_scan"), ("vxm_test_scan", "l2r_subject1"))


def checkout(rev: str, folder: Path) -> Path:
    """The ``LearnedRegistration`` folder of ``rev``, extracted under ``folder``."""
    archive = folder / "tree.tar"
    with archive.open("wb") as out:
        subprocess.run(["git", "-C", str(ROOT), "archive", rev, "LearnedRegistration"], stdout=out, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(folder, filter="data")
    return folder / "LearnedRegistration"


def measure(tree: Path, oasis: Path, threads: int) -> list[dict]:
    rows = []
    for moving, fixed in DIRECTIONS:
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH="")
        out = subprocess.run([sys.executable, "-c", CHILD, str(tree), str(oasis), moving, fixed, str(threads)],
                             capture_output=True, text=True, env=env, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["pair"] = f"{moving} → {fixed}"
        rows.append(row)
        print(f"  {row['pair']}: {row['seconds']:.1f} s, Dice {row['dice']:.4f}", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline-rev", default="20ce0a3")
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("LEARNEDREG_DATA", ROOT.parent / "shared" / "data")))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "mi_speed.md")
    args = parser.parse_args(argv)
    oasis = args.data / "brain_oasis"
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        print(f"baseline {args.baseline_rev}:", flush=True)
        baseline = measure(checkout(args.baseline_rev, Path(tmp)), oasis, args.threads)
    print(f"this tree (HEAD {head} and its working changes):", flush=True)
    current = measure(ROOT / "LearnedRegistration", oasis, args.threads)
    lines = [
        "# Mutual information on the OASIS pair: this tree against the tree issue 17 was filed on",
        "",
        f"Command: `python scripts/benchmark_mi.py --baseline-rev {args.baseline_rev}` (one run, each registration in its own "
        f"process, {args.threads} torch threads, `similarity=\"mi\"`, default λ and pyramid; Dice = mean over the 30 "
        "evaluation labels)",
        "",
        f"| pair | {args.baseline_rev}: time (s) | Dice | this tree ({head}): time (s) | Dice | speed-up | ΔDice |",
        "|---|---|---|---|---|---|---|",
    ]
    for old, new in zip(baseline, current):
        lines.append(f"| {old['pair']} | {old['seconds']:.1f} | {old['dice']:.4f} | {new['seconds']:.1f} | {new['dice']:.4f} | "
                     f"{old['seconds'] / new['seconds']:.2f}× | {new['dice'] - old['dice']:+.4f} |")
    args.output.write_text("\n".join(lines) + "\n")
    args.output.with_suffix(".json").write_text(json.dumps({"baseline_rev": args.baseline_rev, "head": head,
                                                            "baseline": baseline, "current": current}, indent=1) + "\n")
    print("\n".join(lines[4:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
