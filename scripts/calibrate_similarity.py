#!/usr/bin/env python
"""Calibrate each similarity's κ (``engine.similarity.REGULARIZATION_SCALE``) so that one λ means
about the same smoothness whatever the similarity (issue 17, item 3).

    .venv/bin/python scripts/calibrate_similarity.py                 # -> benchmarks/similarity_calibration.{md,json}
    .venv/bin/python scripts/calibrate_similarity.py --similarities mind,mi --output /tmp/cal

Criterion: on the OASIS pair (l2r_subject1 -> vxm_test_scan, 1 mm T1) at the default λ, the
optimizer's SDlogJ (standard deviation of log det J over the fixed grid, Learn2Reg's smoothness
figure) with similarity ``s`` matches MSE's, MSE's κ (0.0122) being the anchor. For each ``s`` the
registration runs at its current κ and at κ times or divided by ``--factor`` (towards MSE's
SDlogJ); the κ that meets MSE's SDlogJ is interpolated linearly in (log κ, log SDlogJ) between
the two runs (extrapolated when both lie on one side, which the table says). ``--working-spacing``
and ``--iteration-scale`` shorten the runs (default: the optimizer's schedule at a 2 mm working
spacing, 0.5 of its iterations); the calibration holds for the schedule it was measured with.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "LearnedRegistration"))

PAIR = ("l2r_subject1", "vxm_test_scan")  # moving, fixed


def register_once(fixed, fixed_grid, moving, moving_grid, options, kappa: float) -> dict:
    """One optimizer run with ``REGULARIZATION_SCALE[options.similarity] = kappa``: SDlogJ, % folding, time."""
    from LearnedRegistrationLib.engine.metrics import folding_percent, sdlogj
    from LearnedRegistrationLib.engine.optimize import register_images
    from LearnedRegistrationLib.engine.similarity import REGULARIZATION_SCALE

    saved = REGULARIZATION_SCALE[options.similarity]
    REGULARIZATION_SCALE[options.similarity] = kappa  # the optimizer reads the dict at each level
    try:
        start = time.perf_counter()
        result = register_images(fixed, fixed_grid, moving, moving_grid, options)
        seconds = time.perf_counter() - start
    finally:
        REGULARIZATION_SCALE[options.similarity] = saved
    return {"kappa": kappa, "sdlogj": float(sdlogj(result.jacobian)), "folding_percent": float(folding_percent(result.jacobian)),
            "runtime_s": seconds}


def interpolate_kappa(a: dict, b: dict, target: float) -> float:
    """κ where log SDlogJ, linear in log κ through the runs ``a`` and ``b``, equals log ``target``."""
    la, lb = math.log(a["kappa"]), math.log(b["kappa"])
    sa, sb = math.log(a["sdlogj"]), math.log(b["sdlogj"])
    if sa == sb:
        return a["kappa"]
    return math.exp(la + (math.log(target) - sa) * (lb - la) / (sb - sa))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--similarities", default="lncc,ncc,ngf,mi,mind")
    parser.add_argument("--factor", type=float, default=4.0)
    parser.add_argument("--working-spacing", type=float, default=2.0)
    parser.add_argument("--iteration-scale", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks")
    args = parser.parse_args()

    import torch

    from LearnedRegistrationLib.engine.common import DEFAULT_LAMBDA, RegistrationOptions
    from LearnedRegistrationLib.engine.imageio import read_volume
    from LearnedRegistrationLib.engine.similarity import REGULARIZATION_SCALE

    torch.set_num_threads(args.threads)
    oasis = args.data / "brain_oasis"
    moving, moving_grid = read_volume(oasis / f"{PAIR[0]}_T1.nii.gz")
    fixed, fixed_grid = read_volume(oasis / f"{PAIR[1]}_T1.nii.gz")
    base = RegistrationOptions(device="cpu", regularization_weight=DEFAULT_LAMBDA, iteration_scale=args.iteration_scale,
                               deformable_spacings_mm=(2.0 * args.working_spacing, args.working_spacing))

    def run(similarity: str, kappa: float) -> dict:
        row = register_once(fixed, fixed_grid, moving, moving_grid, replace(base, similarity=similarity), kappa)
        print(similarity, json.dumps(row), flush=True)
        return row

    anchor = run("mse", REGULARIZATION_SCALE["mse"])
    target = anchor["sdlogj"]
    rows = {"mse": {"runs": [anchor], "kappa": anchor["kappa"], "extrapolated": False}}
    for similarity in args.similarities.split(","):
        first = run(similarity, REGULARIZATION_SCALE[similarity])
        # a larger κ smooths more: go up when the field is rougher than MSE's, down otherwise
        step = args.factor if first["sdlogj"] > target else 1.0 / args.factor
        second = run(similarity, first["kappa"] * step)
        brackets = (first["sdlogj"] - target) * (second["sdlogj"] - target) <= 0
        rows[similarity] = {"runs": [first, second], "kappa": interpolate_kappa(first, second, target), "extrapolated": not brackets}

    meta = {"pair": f"OASIS {PAIR[0]} -> {PAIR[1]}", "lambda": DEFAULT_LAMBDA, "working_spacing_mm": args.working_spacing,
            "iteration_scale": args.iteration_scale, "threads": args.threads, "target_sdlogj": target,
            "command": " ".join(["scripts/calibrate_similarity.py", *sys.argv[1:]])}
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "similarity_calibration.json").write_text(json.dumps({"meta": meta, "similarities": rows}, indent=1))
    lines = [
        "# κ calibration of the similarities", "",
        f"`{meta['command']}`: {meta['pair']}, λ = {DEFAULT_LAMBDA}, working spacing {args.working_spacing} mm, "
        f"iteration scale {args.iteration_scale}, {args.threads} CPU threads. Target: MSE's SDlogJ {target:.4f} at κ = "
        f"{anchor['kappa']:g} (the anchor). κ* interpolates log SDlogJ linearly in log κ between the two runs.", "",
        "| similarity | κ run → SDlogJ (folding %, s) | κ* | bracketed |", "|---|---|---|---|",
    ]
    for similarity, row in rows.items():
        runs = "; ".join(f"{r['kappa']:.4g} → {r['sdlogj']:.4f} ({r['folding_percent']:.3f} %, {r['runtime_s']:.0f} s)" for r in row["runs"])
        lines.append(f"| {similarity} | {runs} | {row['kappa']:.4g} | {'no (extrapolated)' if row['extrapolated'] else 'yes'} |")
    (args.output / "similarity_calibration.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
