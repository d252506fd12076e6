#!/usr/bin/env python
"""Network benchmark on the real OASIS pair: slider latency, accuracy over a λ sweep, and λ(x).

Everything runs through the Slicer logic on a headless MRML scene, as a user's session would
(moving l2r_subject1 -> fixed vxm_test_scan, 160x192x224 at 1 mm; the network never saw them):

1. **Latency** (no labels, so only what the slider must redo): the first registration with the
   network end to end in the logic (weights read from disk, affine stage, encoder, decoder, every
   output node written), the same again with the weights cached, then ``--repeats`` λ changes
   through ``logic.setRegularization`` (decoder + every output node: warped, displacement,
   transform, checkerboard, difference, Jacobian, λ map), with their split into network
   prediction, derived volumes/metrics and node writing.
2. **Accuracy**: Dice over the 30 VoxelMorph labels, HD95, % folding and SDlogJ at each λ of
   ``--lambdas`` for ``network`` and ``network+adapt``; the optimizer at its default λ in the same
   run is the baseline (ratios printed). Plot: ``benchmarks/figures/network_lambda_sweep_oasis.png``.
3. **λ(x)**: range of the predicted map and its mean inside (fixed labels > 0) vs outside the brain.

    python scripts/benchmark_network.py [--threads 2] [--device cpu] [--model PATH]

Writes ``benchmarks/network.{md,json}`` (``--output`` prefix). Data: ``--data`` or
``$LEARNEDREG_DATA`` (default ``../shared/data``).
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

from LearnedRegistrationLib.engine.metric_table import metric  # noqa: E402

PAIR = ("l2r_subject1", "vxm_test_scan")  # (moving, fixed)
#: Metrics of each λ row (names and formats from the project's metric table).
ACCURACY_KEYS = ("lambda", "dice_mean", "hd95_mean_mm", "folding_percent", "sdlogj")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path(os.environ.get("LEARNEDREG_DATA", ROOT.parent / "shared" / "data")))
    p.add_argument("--model", default=None, help="network weights (default: the shipped model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (the target is 2 cores)")
    p.add_argument("--lambdas", default="0.05,0.1,0.2,0.3,0.5,0.7,0.9")
    p.add_argument("--repeats", type=int, default=7, help="λ changes timed")
    p.add_argument("--adapt-steps", type=int, default=None, help="test-time adaptation steps (default: the logic's)")
    p.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "network", help="prefix of the .md/.json results")
    p.add_argument("--no-optimize", action="store_true", help="skip the optimizer baseline")
    p.add_argument("--render", type=Path, help="only re-write the markdown of this results JSON (no run)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render:
        args.render.with_suffix(".md").write_text(render(args.render) + "\n")
        return 0
    import numpy as np
    import torch

    from LearnedRegistrationLib.app.headless import HeadlessSlicer
    from LearnedRegistrationLib.app.plots import plot_lambda_sweep
    from LearnedRegistrationLib.bridge import mrml
    from LearnedRegistrationLib.bridge.logic import RegistrationLogic
    from LearnedRegistrationLib.engine.common import DEFAULT_LAMBDA

    torch.set_num_threads(args.threads)
    lambdas = [float(v) for v in args.lambdas.split(",") if v.strip()]
    folder = args.data / "brain_oasis"
    labels30 = json.loads((folder / "labels.json").read_text())["voxelmorph_eval_labels_30"]
    report: dict = {
        "meta": {
            "command": "python scripts/benchmark_network.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": f"{platform.machine()} {os.cpu_count()} cores",
            "threads": args.threads,
            "device": args.device,
            "torch": str(torch.__version__),
            "date": time.strftime("%Y-%m-%d"),
            "pair": f"{PAIR[0]} -> {PAIR[1]}",
        }
    }
    with HeadlessSlicer() as app:
        fixed = app.loadVolume(folder / f"{PAIR[1]}_T1.nii.gz", "fixed")
        moving = app.loadVolume(folder / f"{PAIR[0]}_T1.nii.gz", "moving")
        fixedLabels = app.loadVolume(folder / f"{PAIR[1]}_aseg.nii.gz", "fixed labels", labelMap=True)
        movingLabels = app.loadVolume(folder / f"{PAIR[0]}_aseg.nii.gz", "moving labels", labelMap=True)
        shape = fixed.GetImageData().GetDimensions()
        report["meta"]["fixed_size_ijk"] = list(shape)
        common = dict(device=args.device, modelPath=args.model)

        # ---------------------------------------------------------------- 1. latency
        logic = RegistrationLogic()
        t = time.perf_counter()
        outputs = logic.register(fixed, moving, method="network", regularizationWeight=DEFAULT_LAMBDA, **common)
        cold = time.perf_counter() - t
        t = time.perf_counter()
        outputs = logic.register(fixed, moving, method="network", regularizationWeight=DEFAULT_LAMBDA, outputNodes=outputs, **common)
        warm = time.perf_counter() - t
        session = logic.networkSession()
        changes, predict_s = [], []
        cycle = [0.1, 0.6, 0.3, 0.9, 0.05, 0.5, 0.2]
        for i in range(args.repeats):
            lam = cycle[i % len(cycle)]
            t = time.perf_counter()
            updated = logic.setRegularization(lam)
            changes.append(time.perf_counter() - t)
            predict_s.append(updated.metrics["runtime_s"])
        assert all(getattr(updated, k) is getattr(outputs, k) for k in ("warpedVolumeNode", "jacobianVolumeNode"))
        report["latency"] = {
            "first_registration_cold_s": cold,
            "first_registration_warm_s": warm,
            "prepare_s": session.prepare_s,
            "lambda_change_s": changes,
            "lambda_change_median_s": statistics.median(changes),
            "lambda_change_max_s": max(changes),
            "network_predict_median_s": statistics.median(predict_s),
            "working_grid_zyx": list(session.work.shape),
        }
        print(f"first registration {cold:.2f} s (weights from disk), {warm:.2f} s (cached); "
              f"λ change median {statistics.median(changes):.3f} s, max {max(changes):.3f} s "
              f"(network part {statistics.median(predict_s):.3f} s)", flush=True)

        # ---------------------------------------------------------------- 3. λ(x)
        brain = mrml.arrayFromVolumeNode(fixedLabels)[0] > 0
        weight = session.weight_map(DEFAULT_LAMBDA)
        report["weight_map"] = {
            "lambda": DEFAULT_LAMBDA,
            "min": float(weight.min()),
            "max": float(weight.max()),
            "p5": float(np.percentile(weight, 5)),
            "p95": float(np.percentile(weight, 95)),
            "mean_inside_brain": float(weight[brain].mean()),
            "mean_outside_brain": float(weight[~brain].mean()),
        }
        print("λ(x): " + ", ".join(f"{k} {v:.3f}" for k, v in report["weight_map"].items()), flush=True)

        # ---------------------------------------------------------------- 2. accuracy
        labelled = dict(fixedLabelNode=fixedLabels, movingLabelNode=movingLabels, evaluationLabels=labels30, **common)
        sweeps: dict = {}
        for method in ("network", "network+adapt"):
            logic = RegistrationLogic()
            t = time.perf_counter()
            extra = {"adaptationSteps": args.adapt_steps} if method == "network+adapt" else {}
            first = logic.register(fixed, moving, method=method, regularizationWeight=lambdas[0], **labelled, **extra)
            elapsed = time.perf_counter() - t
            rows = []
            for lam in lambdas:
                m = first.metrics if lam == lambdas[0] else logic.setRegularization(lam).metrics
                rows.append({k: m.get(k) for k in ACCURACY_KEYS})
                print(f"{method:14s} λ={lam:.2f}: Dice {m['dice_mean']:.4f}  HD95 {m['hd95_mean_mm']:.2f} mm  "
                      f"folding {m['folding_percent']:.4f} %  SDlogJ {m['sdlogj']:.3f}", flush=True)
            sweeps[method] = {"first_registration_with_metrics_s": elapsed, "rows": rows,
                              "dice_before": first.metrics.get("dice_mean_initial")}
        report["sweeps"] = sweeps
        if not args.no_optimize:
            logic = RegistrationLogic()
            t = time.perf_counter()
            m = logic.register(fixed, moving, method="optimize", regularizationWeight=DEFAULT_LAMBDA, **labelled).metrics
            report["optimize"] = {"lambda": DEFAULT_LAMBDA, "runtime_s": time.perf_counter() - t,
                                  **{k: m.get(k) for k in ACCURACY_KEYS if k != "lambda"}}
            print(f"optimize       λ={DEFAULT_LAMBDA:.2f}: Dice {m['dice_mean']:.4f}  folding {m['folding_percent']:.4f} %  "
                  f"{report['optimize']['runtime_s']:.1f} s", flush=True)

    figure = args.output.parent / "figures" / f"{args.output.name}_lambda_sweep_oasis.png"
    peers = [{"label": f"optimize (λ={DEFAULT_LAMBDA:g})", **report["optimize"]}] if "optimize" in report else []
    plot_lambda_sweep(figure, {k: v["rows"] for k, v in sweeps.items()}, peers,
                      title=f"OASIS {PAIR[0]} → {PAIR[1]}: network λ sweep")
    report["figure"] = str(figure.relative_to(args.output.parent))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    args.output.with_suffix(".md").write_text(markdown(report) + "\n")
    print(markdown(report))
    return 0


def render(json_path: Path) -> str:
    """The markdown of an earlier run's JSON (``python scripts/benchmark_network.py --render benchmarks/network.json``)."""
    return markdown(json.loads(Path(json_path).read_text()))


def markdown(r: dict) -> str:
    meta, lat = r["meta"], r["latency"]
    lines = [
        "# Network benchmark (OASIS, through the Slicer logic)",
        "",
        f"`{meta['command']}` — {meta['date']}, {meta['machine']}, {meta['threads']} torch threads, device {meta['device']}, "
        f"torch {meta['torch']}; pair {meta['pair']}, fixed {'x'.join(map(str, meta['fixed_size_ijk']))} voxels.",
        "",
        "## Latency",
        "",
        "| step | seconds |",
        "|---|---|",
        f"| first registration, weights read from disk (affine + network + all nodes) | {lat['first_registration_cold_s']:.2f} |",
        f"| first registration, weights cached | {lat['first_registration_warm_s']:.2f} |",
        f"| λ change, every output node updated (median of {len(lat['lambda_change_s'])}) | {lat['lambda_change_median_s']:.3f} |",
        f"| λ change, slowest | {lat['lambda_change_max_s']:.3f} |",
        f"| of which the network + field on the fixed grid (median) | {lat['network_predict_median_s']:.3f} |",
    ]
    if r.get("optimize"):
        # Baseline from the same run: with the optimizer a λ change is a whole new registration.
        seconds = r["optimize"]["runtime_s"]
        lines.append(f"| baseline: a λ change with `optimize` (a new registration, with label metrics) | {seconds:.1f} |")
        lines.append(f"| λ change, network vs that baseline | {lat['lambda_change_median_s'] / seconds:.3f}× |")
    lines += [""]
    if "weight_map" in r:
        w = r["weight_map"]
        lines += [
            "## λ(x) (before scaling by λ)",
            "",
            f"range {w['min']:.3f} – {w['max']:.3f} (5–95 %: {w['p5']:.3f} – {w['p95']:.3f}); "
            f"mean inside the brain {w['mean_inside_brain']:.3f}, outside {w['mean_outside_brain']:.3f}.",
            "",
        ]
    opt = r.get("optimize")
    lines += ["## Accuracy over λ (Dice over the 30 VoxelMorph labels)", ""]
    lines += ["| method | " + " | ".join(metric(k).header for k in ACCURACY_KEYS) + " | Dice vs optimize |",
              "|---" * (len(ACCURACY_KEYS) + 2) + "|"]
    for method, sweep in r["sweeps"].items():
        for row in sweep["rows"]:
            ratio = f"{row['dice_mean'] / opt['dice_mean']:.3f}×" if opt else "—"
            lines.append(f"| {method} | " + " | ".join(metric(k).text(row.get(k)) for k in ACCURACY_KEYS) + f" | {ratio} |")
    if opt:
        lines.append("| optimize (baseline) | " + " | ".join(metric(k).text(opt.get(k)) for k in ACCURACY_KEYS) + " | 1 |")
    lines.append("")
    before = next(iter(r["sweeps"].values()))["dice_before"]
    times = ", ".join(f"{k} {v['first_registration_with_metrics_s']:.1f} s" for k, v in r["sweeps"].items())
    lines.append(f"Dice before registration {before:.4f}. First registration including label metrics: {times}"
                 + (f"; optimize {opt['runtime_s']:.1f} s." if opt else "."))
    lines += ["", f"![λ sweep]({r['figure']})"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
