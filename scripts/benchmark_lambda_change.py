"""How long a λ change takes in the logic, on the OASIS pair (160x192x224), on 2 CPU threads.

The slider's inner loop, measured the way the Slicer panel runs it: the pair is registered once
with the λ path (``RegistrationLogic.register(method="path")``) into output nodes of a headless
slicer-core scene, then λ moves ``--changes`` times and ``setRegularization(λ, displayed=...)``
updates every output node in place: the displayed one first (the warped image, as soon as it is
ready), the others right after. Reported: the median and worst time to the displayed node and to
every node, and, as the baseline measured in the same run, what a λ change costs without the path
(a new ``optimize`` registration at that λ).

    .venv/bin/python scripts/benchmark_lambda_change.py            # -> benchmarks/lambda_change.{md,json}

Targets (issue "instant λ"): displayed output ≤ 0.25 s, every output node ≤ 0.6 s (median of ≥ 20).
The images only (no label maps): with labels each update also computes Dice and HD95 (HD95 alone
takes seconds on this pair).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "LearnedRegistration"))

PAIR = ("l2r_subject1", "vxm_test_scan")  # (moving, fixed)
TARGET_DISPLAYED_S = 0.25
TARGET_ALL_S = 0.6


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("LEARNEDREG_DATA", ROOT.parent / "shared" / "data")))
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (the target is 2 cores)")
    parser.add_argument("--changes", type=int, default=25, help="λ changes timed")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "lambda_change", help="prefix of the .md/.json results")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from LearnedRegistrationLib.app.headless import HeadlessSlicer
    from LearnedRegistrationLib.bridge.logic import RegistrationLogic

    oasis = args.data / "brain_oasis"
    with HeadlessSlicer() as app:
        fixed = app.loadVolume(oasis / f"{PAIR[1]}_T1.nii.gz", "fixed")
        moving = app.loadVolume(oasis / f"{PAIR[0]}_T1.nii.gz", "moving")
        logic = RegistrationLogic()
        start = time.perf_counter()
        outputs = logic.register(fixed, moving, method="path", device="cpu")
        path_s = time.perf_counter() - start
        lambdas = [0.05 + 0.85 * ((7 * i) % 17) / 16 for i in range(args.changes)]  # spread over [0.05, 0.9], no repeats in a row
        displayed, every = [], []
        for lam in lambdas:
            updated = logic.setRegularization(lam, displayed="warpedVolumeNode")
            assert updated.warpedVolumeNode is outputs.warpedVolumeNode  # in place
            displayed.append(updated.metrics["update_displayed_s"])
            every.append(updated.metrics["update_s"])
        start = time.perf_counter()
        logic.register(fixed, moving, method="optimize", regularizationWeight=lambdas[-1], device="cpu")
        optimize_s = time.perf_counter() - start

    report = {
        "command": "python scripts/benchmark_lambda_change.py" + (f" --changes {args.changes}" if args.changes != 25 else ""),
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} {os.cpu_count()} cores", "threads": args.threads,
        "torch": torch.__version__, "pair": f"{PAIR[0]} -> {PAIR[1]}", "path_run_s": path_s, "lambdas": lambdas,
        "displayed_s": displayed, "every_s": every, "optimize_run_s": optimize_s,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(report)
    args.output.with_suffix(".md").write_text(text + "\n")
    print(text)
    return 0


def markdown(r: dict) -> str:
    shown, every = statistics.median(r["displayed_s"]), statistics.median(r["every_s"])

    def verdict(value: float, target: float) -> str:
        return "met" if value <= target else f"missed by {value / target:.2f}×"

    return "\n".join([
        "# λ change latency (the λ path, through the logic, every output node updated in place)",
        "",
        f"`{r['command']}` — {r['date']}, {r['machine']}, {r['threads']} torch threads, torch {r['torch']}; OASIS "
        f"{r['pair']}, 160×192×224, images only (no label maps).",
        "",
        "| | seconds | target |",
        "|---|---|---|",
        f"| the λ path run (once per pair) | {r['path_run_s']:.1f} | |",
        f"| λ change: displayed node (warped) updated, median of {len(r['displayed_s'])} | {shown:.3f} | "
        f"≤ {TARGET_DISPLAYED_S} s: {verdict(shown, TARGET_DISPLAYED_S)} |",
        f"| λ change: displayed node, slowest | {max(r['displayed_s']):.3f} | |",
        f"| λ change: every output node updated, median | {every:.3f} | ≤ {TARGET_ALL_S} s: {verdict(every, TARGET_ALL_S)} |",
        f"| λ change: every output node, slowest | {max(r['every_s']):.3f} | |",
        f"| baseline: a λ change without the path (a new optimize registration) | {r['optimize_run_s']:.1f} | |",
        f"| λ change (every node), path vs that baseline | {every / r['optimize_run_s']:.3f}× | |",
    ])


if __name__ == "__main__":
    sys.exit(main())
