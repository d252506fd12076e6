#!/usr/bin/env python
"""Side-by-side benchmark: ours (optimizer, network, network + adaptation, over a λ sweep) against
ANTs SyN, elastix and SimpleITK's diffeomorphic demons, on real pairs, with Learn2Reg metrics.

    bash scripts/setup_bench_env.sh                                     # once: .venv-bench with antspyx + itk-elastix
    .venv-bench/bin/python scripts/benchmark.py --quick --with-network  # ≤ 10 min on 2 CPU threads -> benchmarks/quick/
    .venv-bench/bin/python scripts/benchmark.py --with-network          # every pair, full λ sweep -> benchmarks/

Writes ``results.md``, ``results.json`` and ``figures/*.png`` under ``--output`` (default
``benchmarks/`` for the full mode, ``benchmarks/quick/`` for the quick one, so a quick run never
overwrites the full results). Quick mode: the forward OASIS pair with λ 0.25 and 0.5 and the
synthetic CT pair at the default λ, without elastix, and network+adapt on OASIS only.

Every method runs in its own process (``--single``), so its wall time and peak RSS are its own;
ITK tools and torch get the same number of threads (``--threads``, default 2). Every result is
converted to the project's convention (RAS mm resampling displacement on the fixed grid) and
scored with the project's metrics: Dice and DSC30 (mean of the worst 30 % labels) and HD95 over
the pair's labels, % folding and SDlogJ of the Jacobian over the whole fixed grid, and, for
synthetic pairs with a known deformation, the displacement error (mean and 95th percentile in mm
inside the fixed image's foreground). Before any peer is trusted, ``frame_check`` registers a real
image to a copy of itself translated by a known vector and checks every peer recovers it (sign
and frame).

Pairs (data from ``--data`` / ``$LEARNEDREG_DATA``, default ``../shared/data``; nothing is copied
into the repository; generated pairs are cached in a temporary folder):

- ``oasis_l2r_to_vxm`` / ``oasis_vxm_to_l2r``: the real OASIS pair in both directions, 30 labels.
- ``mne_to_oasis``: MNE sample T1 (3 mm, native space, masked by its aseg) onto an OASIS subject
  (1 mm, different space; affine needed), Dice over the aseg labels both share.
- ``synth_ct`` / ``synth_cardiac`` / ``synth_brain``: one real scan (abdomen CT, cardiac bSSFP C0,
  OASIS brain) and its copy deformed by a seeded random smooth diffeomorphism; scored by the
  dense displacement error (CT also by Dice over its TotalSegmentator labels).
- ``multimodal_cardiac``: C0 fixed vs a deformed LGE (DE) scan of the same patient; ours with
  the multimodal default similarity (``engine.common.SITUATION_SIMILARITIES``), "mi" and "ngf".
  Same-modality pairs run ours with the same-modality default.

With ``--with-network``, the shipped λ-conditioned network adds rows "network" and
"network+adapt" (test-time adaptation) at every λ of the pair's sweep, from one session each
(:func:`run_network`). The results name, for each OASIS pair, how far each of ours at the default
λ is from the target: the best peer's Dice at ≤ 0.1× ANTs SyN's wall time (:func:`verdict`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "LearnedRegistration"))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_helpers import deform, dsc30, foreground_mask, ratios, synthetic_deformation  # noqa: E402
from LearnedRegistrationLib.engine.metric_table import metric  # noqa: E402

QUICK_PAIRS = ("oasis_l2r_to_vxm", "synth_ct")
FULL_PAIRS = ("oasis_l2r_to_vxm", "oasis_vxm_to_l2r", "mne_to_oasis", "synth_ct", "synth_cardiac", "synth_brain", "multimodal_cardiac")
QUICK_LAMBDAS = (0.25, 0.5)  # the default and one stronger: the quick sweep's two ends
FULL_LAMBDAS = (0.05, 0.1, 0.2, 0.25, 0.3, 0.5, 0.7, 0.9)
SWEEP_PAIRS = {"oasis_l2r_to_vxm", "oasis_vxm_to_l2r"}  # λ sweep here; default λ only elsewhere
SNAPSHOT_PAIR = "oasis_l2r_to_vxm"
#: Quick mode leaves out elastix (the slowest peer, 2-3 min a pair on 2 cores, and the least
#: accurate on OASIS in full runs) and runs network+adapt (1-1.5 min) on the λ-sweep pair only.
QUICK_SKIP = ("elastix",)
QUICK_SWEEP_PAIRS_ONLY = ("network+adapt",)
PEERS = ("identity", "demons", "ants", "elastix")
#: The shipped λ-conditioned network, alone and with test-time adaptation (``--with-network``).
NETWORK_METHODS = ("network", "network+adapt")
#: Our λ path, with a uniform λ and with a learned λ(x): one run, a prediction per λ of the sweep.
PATH_METHODS = ("path", "path_sv")
#: Methods with one run per pair and one row per λ.
SESSION_METHODS = (*NETWORK_METHODS, *PATH_METHODS)
METHOD_LABELS = {
    "identity": "no registration",
    "demons": "SimpleITK diffeomorphic demons",
    "ants": "ANTs SyN (antspyx)",
    "elastix": "elastix affine+B-spline (default maps)",
    "ours": "ours (optimize)",
    "network": "ours (network)",
    "network+adapt": "ours (network + instance adaptation)",
    "path": "ours (λ path)",
    "path_sv": "ours (λ path, learned λ(x))",
}


# ===================================================================================== pairs
def _grid_dict(grid) -> dict:
    return {"shape": list(grid.shape), "spacing": list(grid.spacing), "origin": grid.origin.tolist(), "direction": grid.direction.tolist()}


def _grid(d: dict):
    from LearnedRegistrationLib.engine.grid import ImageGrid

    return ImageGrid(tuple(d["shape"]), tuple(d["spacing"]), np.asarray(d["origin"]), np.asarray(d["direction"]))


def build_pair(name: str, data: Path) -> dict:
    """Arrays and metadata of one benchmark pair (see the module docstring)."""
    from LearnedRegistrationLib.engine.imageio import read_volume

    oasis = data / "brain_oasis"
    eval30 = json.loads((oasis / "labels.json").read_text())["voxelmorph_eval_labels_30"]
    pair: dict = {"name": name, "prealigned": True, "multimodal": False}
    if name.startswith("oasis_"):
        a, b = ("l2r_subject1", "vxm_test_scan") if name == "oasis_l2r_to_vxm" else ("vxm_test_scan", "l2r_subject1")
        pair["moving"], pair["moving_grid"] = read_volume(oasis / f"{a}_T1.nii.gz")
        pair["fixed"], pair["fixed_grid"] = read_volume(oasis / f"{b}_T1.nii.gz")
        pair["moving_labels"], pair["moving_labels_grid"] = read_volume(oasis / f"{a}_aseg.nii.gz", np.int32)
        pair["fixed_labels"], _ = read_volume(oasis / f"{b}_aseg.nii.gz", np.int32)
        pair["labels"] = eval30
        pair["description"] = f"OASIS {a} → {b} (moving → fixed), 30 labels"
    elif name == "mne_to_oasis":
        mne = data / "brain_mne_sample"
        t1, grid = read_volume(mne / "sample_T1_3mm.nii.gz")
        aseg, _ = read_volume(mne / "sample_aseg_3mm.nii.gz", np.int32)
        pair["moving"], pair["moving_grid"] = t1 * (aseg > 0), grid  # skull-stripped like the OASIS scans
        pair["moving_labels"], pair["moving_labels_grid"] = aseg, grid
        pair["fixed"], pair["fixed_grid"] = read_volume(oasis / "vxm_test_scan_T1.nii.gz")
        pair["fixed_labels"], _ = read_volume(oasis / "vxm_test_scan_aseg.nii.gz", np.int32)
        present = set(np.unique(aseg).tolist()) & set(np.unique(pair["fixed_labels"]).tolist())
        pair["labels"] = [v for v in eval30 if v in present]
        pair["prealigned"] = False
        pair["description"] = f"MNE sample T1 3 mm (aseg-masked, native space) → OASIS vxm_test_scan 1 mm, {len(pair['labels'])} shared labels"
    elif name.startswith("synth_") or name == "multimodal_cardiac":
        labels = None
        if name == "synth_ct":
            ct = data / "abdomen_totalseg"
            image, grid = read_volume(ct / "example_ct_sm.nii.gz")
            labels, _ = read_volume(ct / "example_seg.nii.gz", np.int32)
            seed, in_plane, source = 1, False, "abdomen CT example_ct_sm (3 mm)"
        elif name == "synth_brain":
            image, grid = read_volume(oasis / "lapirn_imageB_T1.nii.gz")
            seed, in_plane, source = 3, False, "OASIS brain lapirn_imageB (1 mm)"
        else:
            image, grid = read_volume(data / "cardiac_myops" / "101_C0.nii.gz")
            seed, in_plane, source = (2, True, "cardiac bSSFP C0") if name == "synth_cardiac" else (4, True, "cardiac")
        u, true_d = synthetic_deformation(grid, seed, max_displacement_mm=8.0, control_spacing_mm=60.0, in_plane=in_plane)
        pair["fixed"], pair["fixed_grid"] = image, grid
        if name == "multimodal_cardiac":
            de, _ = read_volume(data / "cardiac_myops" / "101_DE.nii.gz")
            pair["moving"] = deform(de, grid, u)
            pair["multimodal"] = True
            pair["description"] = "cardiac C0 (fixed) vs LGE/DE deformed by a known in-plane field (seed 4)"
        else:
            pair["moving"] = deform(image, grid, u)
            pair["description"] = f"{source} vs itself deformed by a known field (seed {seed}{', in-plane' if in_plane else ''})"
        pair["moving_grid"] = grid
        pair["true_displacement"] = true_d.astype(np.float32)
        pair["mask"] = foreground_mask(image)
        if labels is not None:
            pair["fixed_labels"] = labels
            pair["moving_labels"] = deform(labels, grid, u, order=0).astype(np.int32)
            pair["moving_labels_grid"] = grid
            pair["labels"] = [int(v) for v in np.unique(labels) if v != 0]
    else:
        raise ValueError(f"unknown pair {name!r}")
    return pair


def save_pair(pair: dict, folder: Path) -> Path:
    arrays = {k: v for k, v in pair.items() if isinstance(v, np.ndarray)}
    meta = {k: (_grid_dict(v) if k.endswith("_grid") else v) for k, v in pair.items() if not isinstance(v, np.ndarray)}
    path = folder / f"{pair['name']}.npz"
    np.savez(path, meta=json.dumps(meta), **arrays)
    return path


def load_pair(path: Path) -> dict:
    with np.load(path) as z:
        pair = {k: z[k] for k in z.files if k != "meta"}
        meta = json.loads(str(z["meta"]))
    for k, v in meta.items():
        pair[k] = _grid(v) if k.endswith("_grid") else v
    return pair


# ===================================================================================== scoring
def score(pair: dict, displacement_ras: np.ndarray) -> tuple[dict, np.ndarray]:
    """Learn2Reg metrics of one result: ``(metrics, jacobian)``.

    ``displacement_ras``: (Z, Y, X, 3) RAS mm resampling displacement on the pair's fixed grid.
    ``metrics``: % folding and SDlogJ of the (Z, Y, X) Jacobian determinant ``jacobian``; with
    labels, mean Dice, DSC30, mean HD95 (mm, finite labels) and Dice per label (moving labels
    warped nearest-neighbour); with a known field, the displacement error (mm, mean and 95th
    percentile inside the fixed foreground mask).
    """
    from LearnedRegistrationLib.engine.metrics import (
        dice_per_label,
        displacement_error,
        folding_percent,
        hd95_mm,
        jacobian_map,
        sdlogj,
    )
    from LearnedRegistrationLib.engine.transforms import resample_image

    grid = pair["fixed_grid"]
    jac = jacobian_map(displacement_ras, grid)
    out = {"folding_percent": folding_percent(jac), "sdlogj": sdlogj(jac)}
    if pair.get("labels"):
        warped = resample_image(pair["moving_labels"], pair["moving_labels_grid"], grid, displacement_ras, mode="nearest")
        per = dice_per_label(pair["fixed_labels"], warped, pair["labels"])
        hd = hd95_mm(pair["fixed_labels"], warped, pair["labels"], grid)
        finite = [v for v in hd.values() if np.isfinite(v)]
        out.update(
            dice_mean=float(np.mean(list(per.values()))), dsc30=dsc30(per),
            hd95_mean_mm=float(np.mean(finite)) if finite else None,
            dice_per_label={str(k): v for k, v in per.items()},
        )
    if "true_displacement" in pair:
        out.update(displacement_error(displacement_ras, pair["true_displacement"], pair["mask"]))
    return out, jac


def sweep_rows(pair: dict, session, lambdas, row: dict, session_s: float, snapshot: str | None, **extra) -> list[dict]:
    """One scored row per λ from a registration that predicts any λ (the network's session, the λ path).

    ``runtime_s`` is the time to that λ's first result (``session_s`` + one ``predict(λ)``),
    ``update_s`` the prediction alone; ``peak_rss_gb`` is taken after the first prediction, before
    any scoring; ``extra`` goes into every row.
    """
    from LearnedRegistrationLib.engine.common import DEFAULT_LAMBDA

    rows, peak = [], None
    for lam in lambdas:
        start = time.perf_counter()
        result = session.predict(lam)
        predict_s = time.perf_counter() - start
        peak = peak or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
        metrics, jac = score(pair, result.displacement_ras)
        rows.append({**row, "lambda": lam, "device": result.device, "label": f"{METHOD_LABELS[row['method']]}, λ={lam:g}",
                     **extra, "runtime_s": session_s + predict_s, "update_s": predict_s, "peak_rss_gb": peak, **metrics})
        if snapshot and lam == DEFAULT_LAMBDA:
            save_snapshot(pair, result, jac, snapshot)
    return rows


# ===================================================================================== methods
def run_network(pair: dict, adapt: bool, lambdas, row: dict, snapshot: str | None, similarity: str | None = None) -> list[dict]:
    """The shipped network's rows ("network"; with ``adapt`` "network+adapt"), one per λ of ``lambdas``.

    Same path as the logic (:func:`predict.register_with_network`): our affine stage, the network,
    optionally test-time adaptation (:func:`predict.adapt`, the λ path started from the network),
    once; then one ``predict(λ)`` per λ, as the slider does. A row's
    ``runtime_s`` is the time to its first result (session + that prediction), ``update_s``
    the prediction alone; ``peak_rss_gb`` is taken after the first prediction, before any scoring.
    ``similarity`` is the affine stage's (default "mse").
    """
    from LearnedRegistrationLib.engine.common import RegistrationOptions
    from LearnedRegistrationLib.learned.checkpoint import load_checkpoint
    from LearnedRegistrationLib.learned.predict import adapt as adapt_to_pair
    from LearnedRegistrationLib.learned.predict import register_with_network
    from LearnedRegistrationLib.learned.weights import shipped_model_path

    start = time.perf_counter()
    network, metadata = load_checkpoint(shipped_model_path())
    options = RegistrationOptions(similarity=similarity or "mse")
    session = register_with_network(network, metadata, pair["fixed"], pair["fixed_grid"], pair["moving"], pair["moving_grid"],
                                    options=options)
    if adapt:
        session = adapt_to_pair(session, options)
    session_s = time.perf_counter() - start
    return sweep_rows(pair, session, lambdas, row, session_s, snapshot)


def run_path(pair: dict, spatially_varying: bool, lambdas, row: dict, snapshot: str | None, similarity: str | None = None) -> list[dict]:
    """The λ path's rows ("path"; with ``spatially_varying`` "path_sv"), one per λ of ``lambdas``.

    Same engine call as the logic (:func:`engine.path.register_path`): one run for the pair, then one
    ``predict(λ)`` per λ, as the slider does. A row's ``runtime_s`` is the time to its first result
    (the path run + that prediction), ``path_s`` the path run alone, ``update_s`` the prediction.
    """
    from LearnedRegistrationLib.engine.common import RegistrationOptions
    from LearnedRegistrationLib.engine.path import PathOptions, register_path

    start = time.perf_counter()
    path = register_path(pair["fixed"], pair["fixed_grid"], pair["moving"], pair["moving_grid"],
                         RegistrationOptions(similarity=similarity or "mse"), PathOptions(spatially_varying=spatially_varying))
    path_s = time.perf_counter() - start
    return sweep_rows(pair, path, lambdas, row, path_s, snapshot,
                      similarity=similarity or "mse", path_s=path_s, knots=list(path.knots))


def run_method(pair: dict, spec: dict, threads: int) -> list[dict]:
    """One measurement (inside a ``--single`` process): register, convert, time, then score.

    Returns one row, or one per λ for the network methods (one session, a prediction per λ)."""
    from bench_peers import set_threads

    set_threads(threads)
    method, lam, similarity, snapshot = spec["method"], spec.get("lambda"), spec.get("similarity"), spec.get("snapshot")
    fixed, fg, moving, mg = pair["fixed"], pair["fixed_grid"], pair["moving"], pair["moving_grid"]
    row: dict = {"pair": pair["name"], "method": method, "label": METHOD_LABELS[method]}
    if method in NETWORK_METHODS:
        return run_network(pair, method == "network+adapt", spec["lambdas"], row, snapshot, similarity)
    if method in PATH_METHODS:
        return run_path(pair, method == "path_sv", spec["lambdas"], row, snapshot, similarity)
    result = None
    start = time.perf_counter()
    if method == "identity":
        d = np.zeros((*fg.shape, 3), np.float32)
    elif method == "demons":
        from bench_helpers import demons_displacement

        d = demons_displacement(fixed, fg, moving, mg)
    elif method == "ants":
        from bench_peers import ants_displacement

        kind = "SyNOnly" if pair["prealigned"] else "SyN"
        row["label"] = f"ANTs {kind} (antspyx)"
        d = ants_displacement(fixed, fg, moving, mg, kind)
    elif method == "elastix":
        from bench_peers import elastix_displacement

        d = elastix_displacement(fixed, fg, moving, mg, threads)
    elif method == "ours":
        from LearnedRegistrationLib.engine.common import RegistrationOptions
        from LearnedRegistrationLib.engine.optimize import register_images

        result = register_images(fixed, fg, moving, mg, RegistrationOptions(regularization_weight=lam, similarity=similarity))
        d = result.displacement_ras
        row.update({"lambda": lam, "similarity": similarity, "device": result.device,
                    "label": f"ours (optimize, {similarity}, λ={lam:g})"})
    else:
        raise ValueError(f"unknown method {method!r}")
    row["runtime_s"] = 0.0 if method == "identity" else time.perf_counter() - start
    row["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # before scoring
    metrics, jac = score(pair, d)
    row.update(metrics)
    if snapshot and result is not None:
        save_snapshot(pair, result, jac, snapshot)
    return [row]


def save_snapshot(pair: dict, result, jac: np.ndarray, path: str) -> None:
    """Middle slices (array axis 0) of the images the snapshot figure shows."""
    from LearnedRegistrationLib.engine.transforms import resample_image
    from LearnedRegistrationLib.engine.visualization import checkerboard

    fg = pair["fixed_grid"]
    k = fg.shape[0] // 2
    moving_on_fixed = resample_image(pair["moving"], pair["moving_grid"], fg)
    np.savez(path, fixed=pair["fixed"][k], moving=moving_on_fixed[k], warped=result.warped[k],
             checkerboard=checkerboard(pair["fixed"], result.warped, fg)[k], jacobian=jac[k],
             lambda_map=result.lambda_map[k], spacing=np.asarray(fg.spacing), label=f"λ={result.regularization_weight:g}")


# ===================================================================================== frame check
FRAME_CHECK_T = (6.0, -4.0, 5.0)
#: elastix's iterations per resolution in the frame check (default maps: 256): the check tests the
#: frame of the field elastix and transformix hand back, not accuracy, and this cuts it from 2-2.5 min.
FRAME_CHECK_ELASTIX_ITERATIONS = 32


def frame_check_peer(data: Path, name: str, threads: int) -> dict:
    """One peer on a real image vs its copy translated by a known RAS vector t: mean d must be ≈ t.

    moving(y) = fixed(y - t), so the resampling displacement that registers it is d = +t (RAS mm).
    """
    from bench_helpers import demons_displacement
    from bench_peers import ants_displacement, elastix_displacement, set_threads
    from LearnedRegistrationLib.engine.imageio import read_volume
    from LearnedRegistrationLib.engine.transforms import resample_image

    set_threads(threads)
    image, grid = read_volume(data / "mrbraintumor_5mm" / "MRBrainTumor1.nii.gz")
    t = np.array(FRAME_CHECK_T)
    moving = resample_image(image, grid, grid, np.broadcast_to(-t, (*grid.shape, 3)).astype(np.float32))
    mask = foreground_mask(image)
    # stay away from the edges, where the shifted copy has no data
    mask[:2], mask[-2:], mask[:, :2], mask[:, -2:], mask[:, :, :2], mask[:, :, -2:] = (False,) * 6
    fn = {"demons": lambda: demons_displacement(image, grid, moving, grid),
          "ants": lambda: ants_displacement(image, grid, moving, grid, "SyN"),
          "elastix": lambda: elastix_displacement(image, grid, moving, grid, threads, FRAME_CHECK_ELASTIX_ITERATIONS)}[name]
    mean = fn()[mask].mean(axis=0)
    error = float(np.linalg.norm(mean - t))
    return {"mean_displacement_ras_mm": [round(float(v), 3) for v in mean], "error_mm": error,
            "ok": bool(error < 0.35 * np.linalg.norm(t))}


def frame_check(data: Path, threads: int, peers=("demons", "ants", "elastix"), timeout: float = 300) -> dict:
    """:func:`frame_check_peer` for each peer, each in its own process (a crash or hang is recorded)."""
    out = {"image": "mrbraintumor_5mm/MRBrainTumor1", "translation_ras_mm": list(FRAME_CHECK_T), "peers": {}}
    for name in peers:
        res = in_subprocess({"frame_check": name, "data": str(data)}, threads, timeout)
        out["peers"][name] = res if "error" not in res else {**res, "ok": False}
        print(f"frame check {name}: {out['peers'][name]}", file=sys.stderr)
    return out


# ===================================================================================== driver
def in_subprocess(spec: dict, threads: int, timeout: float) -> list[dict] | dict:
    """Run ``spec`` in ``--single`` mode in a fresh process: its rows (a list; a frame check gives
    one dict), or ``{"error": ...}`` when it times out, crashes or exits non-zero."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=str(threads))
    try:
        out = subprocess.run([sys.executable, __file__, "--single", json.dumps(spec), "--threads", str(threads)],
                             env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or [f"killed by signal {-out.returncode}" if out.returncode < 0 else "no message"])[-1]
        return {"error": f"exit {out.returncode}: {tail[:300]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def plan(pairs, lambdas, with_network: bool, pair_flags: dict, quick: bool = False) -> list[dict]:
    """The measurements, in order: each a spec for one ``--single`` process."""
    from LearnedRegistrationLib.engine.common import DEFAULT_LAMBDA, SITUATION_SIMILARITIES

    jobs = []
    for name in pairs:
        flags = pair_flags[name]
        slow_ok = not quick or name in SWEEP_PAIRS
        for peer in PEERS:
            if peer == "demons" and (flags["multimodal"] or not flags["prealigned"]):
                continue  # demons needs same modality and a pre-aligned pair
            if quick and peer in QUICK_SKIP:
                continue
            jobs.append({"pair": name, "method": peer})
        # the situation's default similarity first (the row the verdicts read), then the cheap alternatives
        situation = "multimodal" if flags["multimodal"] else "same-modality"
        sims = (SITUATION_SIMILARITIES[situation], *(("mi", "ngf") if flags["multimodal"] else ()))
        sims = tuple(dict.fromkeys(sims))
        lams = tuple(lambdas) if name in SWEEP_PAIRS else (DEFAULT_LAMBDA,)
        for sim in sims:
            for lam in lams:
                job = {"pair": name, "method": "ours", "lambda": lam, "similarity": sim}
                if name == SNAPSHOT_PAIR and lam == DEFAULT_LAMBDA and sim == "mse":
                    job["snapshot"] = True
                jobs.append(job)
            for method in PATH_METHODS:
                if method == "path_sv" and name not in SWEEP_PAIRS:
                    continue  # uniform against learned λ(x): on the OASIS pairs
                job = {"pair": name, "method": method, "lambdas": list(lams), "similarity": sim}
                if name == SNAPSHOT_PAIR and sim == "mse":
                    job["snapshot"] = True
                jobs.append(job)
        if with_network:
            for method in NETWORK_METHODS:
                if method in QUICK_SWEEP_PAIRS_ONLY and not slow_ok:
                    continue
                if method == "network+adapt" and flags["multimodal"]:
                    continue  # test-time adaptation optimizes MSE: same modality only
                job = {"pair": name, "method": method, "lambdas": list(lams)}
                if flags["multimodal"]:
                    job["similarity"] = "mi"  # of the affine stage; the network itself is contrast-agnostic
                if name == SNAPSHOT_PAIR and method == "network+adapt":
                    job["snapshot"] = True
                jobs.append(job)
    return jobs


#: Columns of the results tables (labels, units and formats from the project's metric table).
TABLE_KEYS = ("lambda", "runtime_s", "peak_rss_gb", "dice_mean", "dsc30", "hd95_mean_mm", "folding_percent", "sdlogj",
              "displacement_error_mean_mm", "displacement_error_p95_mm")


def fmt(v, spec=".3f"):
    return "–" if v is None or (isinstance(v, float) and not np.isfinite(v)) else format(v, spec)


def verdict(rows: list[dict], pair: str) -> list[str]:
    """Plain statements of the target for one labelled pair: each of ours at the default λ against
    the best peer's Dice, at no more than a tenth of ANTs SyN's wall time (measured in this run)."""
    from LearnedRegistrationLib.engine.common import DEFAULT_LAMBDA

    ok = [r for r in rows if r["pair"] == pair and "error" not in r and r.get("dice_mean") is not None]
    peers = [r for r in ok if r["method"] in PEERS[1:]]
    ants = next((r for r in peers if r["method"] == "ants"), None)
    if not peers or ants is None:
        return []
    best = max(peers, key=lambda r: r["dice_mean"])
    out = []
    for r in ok:
        if r["method"] not in ("ours", *SESSION_METHODS) or r.get("lambda") != DEFAULT_LAMBDA or r.get("similarity", "mse") != "mse":
            continue
        ratio = r["runtime_s"] / ants["runtime_s"]
        dice = (f"Dice {r['dice_mean']:.3f} ≥ best peer's {best['dice_mean']:.3f} ({best['label']})" if r["dice_mean"] >= best["dice_mean"]
                else f"Dice {r['dice_mean']:.3f}, {best['dice_mean'] - r['dice_mean']:.3f} below the best peer's {best['dice_mean']:.3f} ({best['label']})")
        time_ = (f"{r['runtime_s']:.1f} s = {ratio:.2f}× ANTs' {ants['runtime_s']:.1f} s"
                 + (" (≤ 0.1×: met)" if ratio <= 0.1 else f" (target ≤ 0.1×: missed by {ratio / 0.1:.1f}×)"))
        out.append(f"- {r['label']}: {dice}; {time_}.")
    return out


#: The bar on the pairs with a known displacement: ours (the situation's default similarity, the
#: default λ) below no registration and at most this multiple of the best peer's mean error.
PEER_ERROR_MARGIN = 1.10


def error_verdict(rows: list[dict], pair: str) -> list[str]:
    """Plain statement of that bar for one pair with a known displacement: ours (the first "ours" row
    at the default λ with a situation's default similarity: :func:`plan` runs it first) against no
    registration and against the best peer's mean displacement error, as a ratio."""
    from LearnedRegistrationLib.engine.common import DEFAULT_LAMBDA, SITUATION_SIMILARITIES

    key = "displacement_error_mean_mm"
    ok = [r for r in rows if r["pair"] == pair and "error" not in r and r.get(key) is not None]
    start = next((r for r in ok if r["method"] == PEERS[0]), None)
    defaults = set(SITUATION_SIMILARITIES.values())
    ours = next((r for r in ok if r["method"] == "ours" and r.get("lambda") == DEFAULT_LAMBDA and r.get("similarity") in defaults), None)
    if start is None or ours is None:
        return []
    error = ours[key]
    line = (f"- {ours['label']}: {error:.2f} mm against {start[key]:.2f} mm without registration ("
            + ("lower: met" if error < start[key] else "not lower: missed") + ")")
    peers = [r for r in ok if r["method"] in PEERS[1:]]
    if peers:
        best = min(peers, key=lambda r: r[key])
        ratio = error / best[key]
        line += (f"; {ratio:.2f}× the best peer's {best[key]:.2f} mm ({best['label']}): "
                 + (f"within {PEER_ERROR_MARGIN - 1:.0%}: met" if ratio <= PEER_ERROR_MARGIN else f"not within {PEER_ERROR_MARGIN - 1:.0%}: missed"))
    return [line + "."]


#: The λ path's accuracy target against an independent optimizer run at each λ (Dice, 30 labels).
PATH_DICE_TOLERANCE = 0.005
#: The path's wall-time target, as a multiple of one optimizer run at the default λ.
PATH_TIME_TARGET = 1.5


def path_report(rows: list[dict], pair: str) -> list[str]:
    """The λ path against the optimizer on one pair: time ratio, Dice per λ, folding and SDlogJ
    (uniform λ and learned λ(x)); each target stated as met or missed."""
    from LearnedRegistrationLib.engine.common import DEFAULT_LAMBDA

    ok = [r for r in rows if r["pair"] == pair and "error" not in r and r.get("similarity", "mse") == "mse"]
    optimize = {r["lambda"]: r for r in ok if r["method"] == "ours"}
    path = {r["lambda"]: r for r in ok if r["method"] == "path"}
    varying = {r["lambda"]: r for r in ok if r["method"] == "path_sv"}
    lambdas = sorted(set(optimize) & set(path))
    if not lambdas or DEFAULT_LAMBDA not in optimize:
        return []
    ratio = path[lambdas[0]]["path_s"] / optimize[DEFAULT_LAMBDA]["runtime_s"]
    out = [f"- Path run {path[lambdas[0]]['path_s']:.1f} s (knots {path[lambdas[0]]['knots']}) = {ratio:.3f}× one optimizer "
           f"run at λ = {DEFAULT_LAMBDA:g} ({optimize[DEFAULT_LAMBDA]['runtime_s']:.1f} s): target ≤ {PATH_TIME_TARGET}× "
           + ("met." if ratio <= PATH_TIME_TARGET else f"missed ({ratio:.3f}×)."), ""]
    out += ["| λ | optimize Dice | path Dice | Δ | path % folding | path SDlogJ | λ update s | learned λ(x): Dice | % folding | SDlogJ |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for lam in lambdas:
        o, q, v = optimize[lam], path[lam], varying.get(lam, {})
        out.append(f"| {lam:g} | {o['dice_mean']:.4f} | {q['dice_mean']:.4f} | {q['dice_mean'] - o['dice_mean']:+.4f} | "
                   f"{q['folding_percent']:.4f} | {q['sdlogj']:.3f} | {q['update_s']:.2f} | "
                   f"{metric('dice_mean').text(v.get('dice_mean'))} | {metric('folding_percent').text(v.get('folding_percent'))} | "
                   f"{metric('sdlogj').text(v.get('sdlogj'))} |")
    worst = max(abs(path[lam]["dice_mean"] - optimize[lam]["dice_mean"]) for lam in lambdas)
    below = min(path[lam]["dice_mean"] - optimize[lam]["dice_mean"] for lam in lambdas)
    folding = [path[lam]["folding_percent"] for lam in lambdas]
    irregularity = [path[lam]["sdlogj"] for lam in lambdas]
    out += ["", f"- Dice within {PATH_DICE_TOLERANCE} of the optimizer at every λ: "
            + ("met" if worst <= PATH_DICE_TOLERANCE
               else f"missed (largest difference {worst:.4f}; the path is at most {max(-below, 0.0):.4f} below the optimizer)") + ".",
            "- % folding < 0.1 at every λ: " + ("met" if max(folding) < 0.1 else f"missed (largest {max(folding):.4f})") + ".",
            "- % folding and SDlogJ falling as λ rises: "
            + ("met" if all(a >= b for a, b in zip(folding, folding[1:])) and all(a >= b for a, b in zip(irregularity, irregularity[1:]))
               else "missed") + "."]
    return out


def markdown(rows: list[dict], meta: dict, descriptions: dict) -> str:
    peers = ", ".join(dict.fromkeys(r["method"] for r in rows if r["method"] in PEERS[1:]))
    lines = [
        f"# Benchmark ({meta['mode']} mode): ours" + (f" vs {peers}" if peers else ""), "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}, {meta['threads']} threads per method, torch {meta['torch']}, "
        f"antspyx {meta['versions'].get('antspyx', '–')}, itk-elastix {meta['versions'].get('itk-elastix', '–')}, "
        f"SimpleITK {meta['versions'].get('SimpleITK', '–')}, date {meta['date']}, total {meta['total_runtime_s']:.0f} s  ",
        "Each method runs in its own process; peak RSS is that process's maximum before scoring. "
        "Wall times on a shared machine are noisy (±30 % between runs).", "",
    ]
    if meta["frame_check"].get("peers"):
        lines += ["Frame check (peer fields converted LPS → RAS, real image translated by "
                  f"{meta['frame_check'].get('translation_ras_mm')} mm RAS; expected mean d = t):", ""]
    for peer, res in meta["frame_check"].get("peers", {}).items():
        lines.append(f"- {peer}: " + (f"mean d = {res['mean_displacement_ras_mm']} mm, error {res['error_mm']:.2f} mm, "
                                      f"{'OK' if res['ok'] else 'FAILED'}" if "error" not in res else f"error: {res['error']}"))
    lines.append("")
    for name in dict.fromkeys(r["pair"] for r in rows):
        lines += [f"## {name}", "", descriptions.get(name, ""), "",
                  "| method | " + " | ".join(metric(k).header for k in TABLE_KEYS) + " |",
                  "|---" * (len(TABLE_KEYS) + 1) + "|"]
        for r in (r for r in rows if r["pair"] == name):
            if "error" in r:
                lines.append(f"| {r.get('label', r['method'])} | {metric('lambda').text(r.get('lambda'))} | failed: {r['error']} |"
                             + " |" * (len(TABLE_KEYS) - 2))
                continue
            lines.append(f"| {r['label']} | " + " | ".join(metric(k).text(r.get(k)) for k in TABLE_KEYS) + " |")
        network = [r for r in rows if r["pair"] == name and "update_s" in r and r["method"].startswith("network")]
        if network:
            stages = "affine, network, adaptation" if any(r["method"] == "network+adapt" for r in network) else "affine, network"
            changes = [r["update_s"] for r in network]
            lines += ["", f"Network rows: time to the first result at that λ ({stages} and one prediction); "
                      f"a later λ change (the slider) took {min(changes):.2f}–{max(changes):.2f} s."]
        against = path_report(rows, name) if name in SWEEP_PAIRS else []
        if against:
            lines += ["", "λ path against independent optimizer runs (ours, mse):", "", *against]
        target = verdict(rows, name) if name in SWEEP_PAIRS else []
        if target:
            lines += ["", "Target (ours at the default λ: at least the best peer's Dice at ≤ 0.1× ANTs SyN's time):", "", *target]
        errors = error_verdict(rows, name)
        if errors:
            lines += ["", "Target (ours with the situation's default similarity at the default λ: a lower mean displacement "
                      f"error than no registration, at most {PEER_ERROR_MARGIN:.2f}× the best peer's):", "", *errors]
        comps = [(r, c) for r in rows if r["pair"] == name and "comparisons" in r for c in r["comparisons"]]
        if comps:
            lines += ["", "| ours | vs | time ratio | ΔDice | ΔDSC30 | Δ disp. err mean mm |", "|---|---|---|---|---|---|"]
            for r, c in comps:
                lines.append(f"| {r['label']} | {c['peer']} | {fmt(c.get('time_ratio'), '.2f')}× | {fmt(c.get('delta_dice_mean'), '+.3f')} | "
                             f"{fmt(c.get('delta_dsc30'), '+.3f')} | {fmt(c.get('delta_displacement_error_mean_mm'), '+.2f')} |")
        lines.append("")
    return "\n".join(lines)


def _relative(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def figures(rows: list[dict], snapshots: dict, out: Path) -> list[str]:
    """λ-sweep plots (Dice vs % folding, one curve per method of ours, peers as points) and one
    snapshot figure per saved snapshot (``snapshots``: method -> npz of :func:`save_snapshot`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in dict.fromkeys(r["pair"] for r in rows):
        scored = [r for r in rows if r["pair"] == name and "dice_mean" in r]
        curves = {m: sorted((r for r in scored if r["method"] == m and r.get("similarity", "mse") == "mse"), key=lambda r: r["lambda"])
                  for m in ("ours", *SESSION_METHODS)}
        if max(len(c) for c in curves.values()) < 2:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.8))
        for i, (method, curve) in enumerate(curves.items()):
            if not curve:
                continue
            xs, ys = [r["folding_percent"] for r in curve], [r["dice_mean"] for r in curve]
            ax.plot(xs, ys, "o-", color=f"C{i}", label=f"{METHOD_LABELS[method]}, λ sweep")
            for r in curve:
                ax.annotate(f"{r['lambda']:g}", (r["folding_percent"], r["dice_mean"]), textcoords="offset points",
                            xytext=(4, 3), fontsize=7, color=f"C{i}")
        for i, r in enumerate(r for r in scored if r["method"] in PEERS):
            ax.plot(r["folding_percent"], r["dice_mean"], "s^Dvp"[i % 5], color=f"C{i + 3}", ms=8, label=f"{r['label']} ({r['runtime_s']:.0f} s)")
        ax.set_xscale("symlog", linthresh=1e-3)
        ax.set_xlabel(f"{metric('folding_percent').header}, symlog")
        ax.set_ylabel(metric("dice_mean").header)
        ax.set_title(f"{name}: Dice vs folding over λ (labels: λ)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        path = out / f"lambda_sweep_{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(_relative(path))
    for name in dict.fromkeys(r["pair"] for r in rows):
        curves = {m: sorted((r for r in rows if r["pair"] == name and r["method"] == m and "dice_mean" in r
                             and r.get("similarity", "mse") == "mse"), key=lambda r: r["lambda"]) for m in ("ours", *PATH_METHODS)}
        if len(curves["path"]) < 2:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.8))
        for i, (method, curve) in enumerate(curves.items()):
            if curve:
                ax.plot([r["sdlogj"] for r in curve], [r["dice_mean"] for r in curve], "o-" if method != "ours" else "s:",
                        color=f"C{i}", label=METHOD_LABELS[method])
                for r in curve:
                    ax.annotate(f"{r['lambda']:g}", (r["sdlogj"], r["dice_mean"]), textcoords="offset points", xytext=(4, 3),
                                fontsize=7, color=f"C{i}")
        ax.set_xlabel(metric("sdlogj").header + " (irregularity)")
        ax.set_ylabel(metric("dice_mean").header)
        ax.set_title(f"{name}: Dice against SDlogJ over λ, uniform λ vs learned λ(x) (labels: λ)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        path = out / f"dice_vs_sdlogj_{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(_relative(path))
    for method, snapshot in snapshots.items():
        if not snapshot.is_file():
            continue
        s = np.load(snapshot)
        sp = s["spacing"]  # (I, J, K) mm; a slice of array axis 0 shows (J, I)
        aspect = float(sp[1] / sp[0])
        panels = [("fixed", "gray", None), ("moving", "gray", None), ("warped", "gray", None),
                  ("checkerboard", "gray", None), ("jacobian", "RdBu_r", (0.0, 2.0)), ("lambda_map", "viridis", None)]
        fig, axes = plt.subplots(2, 3, figsize=(11, 7.5))
        for ax, (key, cmap, lim) in zip(axes.ravel(), panels):
            img = ax.imshow(s[key], cmap=cmap, aspect=aspect, **({"vmin": lim[0], "vmax": lim[1]} if lim else {}))
            ax.set_title({"jacobian": "Jacobian determinant", "lambda_map": "regularization map λ·λ(x)"}.get(key, key))
            ax.axis("off")
            if key in ("jacobian", "lambda_map"):
                fig.colorbar(img, ax=ax, fraction=0.046)
        fig.suptitle(f"{SNAPSHOT_PAIR}, {METHOD_LABELS[method]}, {s['label']}, middle slice")
        fig.tight_layout()
        path = out / f"snapshot_{SNAPSHOT_PAIR}_{method.replace('+', '_')}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(_relative(path))
    return written


def versions() -> dict:
    from importlib import metadata

    out = {}
    for dist in ("torch", "antspyx", "itk-elastix", "SimpleITK", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"pairs {', '.join(QUICK_PAIRS)} and λ {QUICK_LAMBDAS} (≤ 10 min on 2 cores)")
    parser.add_argument("--pairs", help="comma-separated pair names (default: by mode)")
    parser.add_argument("--lambdas", help="comma-separated λ values of the sweep (default: by mode)")
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("LEARNEDREG_DATA", ROOT.parent / "shared" / "data")))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per method before it is recorded as failed")
    parser.add_argument("--skip", help="comma-separated methods to leave out (e.g. elastix)")
    parser.add_argument("--with-network", action="store_true", help="also the shipped network's rows (network, network+adapt)")
    parser.add_argument("--output", type=Path, help="folder of the results (default: benchmarks/, quick mode benchmarks/quick/)")
    parser.add_argument("--render", type=Path, help="only re-write results.md next to this results.json (no run)")
    parser.add_argument("--single", help=argparse.SUPPRESS)  # internal: one measurement in this process
    args = parser.parse_args()

    if args.render:
        saved = json.loads(args.render.read_text())
        args.render.with_suffix(".md").write_text(markdown(saved["rows"], saved["meta"], saved["descriptions"]))
        return

    if args.single:
        import torch

        torch.set_num_threads(args.threads)
        spec = json.loads(args.single)
        if "frame_check" in spec:
            print(json.dumps(frame_check_peer(Path(spec["data"]), spec["frame_check"], args.threads)))
            return
        pair = load_pair(Path(spec["cache"]))
        print(json.dumps(run_method(pair, spec, args.threads)))
        return

    start = time.perf_counter()
    args.output = args.output or (ROOT / "benchmarks" / ("quick" if args.quick else ""))
    pairs = args.pairs.split(",") if args.pairs else list(QUICK_PAIRS if args.quick else FULL_PAIRS)
    lambdas = tuple(float(v) for v in args.lambdas.split(",")) if args.lambdas else (QUICK_LAMBDAS if args.quick else FULL_LAMBDAS)
    skip = set(args.skip.split(",")) if args.skip else set()
    rows, descriptions = [], {}
    with tempfile.TemporaryDirectory(prefix="lr-bench-") as tmp:
        tmp = Path(tmp)
        cache, flags = {}, {}
        for name in pairs:
            pair = build_pair(name, args.data)
            cache[name] = save_pair(pair, tmp)
            flags[name] = {"multimodal": pair["multimodal"], "prealigned": pair["prealigned"]}
            descriptions[name] = pair["description"]
            del pair
        jobs = [job for job in plan(pairs, lambdas, args.with_network, flags, args.quick) if job["method"] not in skip]
        print("frame check ...", file=sys.stderr)
        check = frame_check(args.data, args.threads, [p for p in PEERS[1:] if any(job["method"] == p for job in jobs)])
        # a peer whose field does not recover the known translation is not trusted: no rows for it
        untrusted = {name: res.get("error", "wrong sign/frame") for name, res in check["peers"].items() if not res["ok"]}
        snapshots = {}
        for job in jobs:
            base = {k: v for k, v in job.items() if k not in ("snapshot", "lambdas")}
            if job["method"] in untrusted:
                rows.append({**base, "label": METHOD_LABELS[job["method"]], "error": f"excluded, frame check failed ({untrusted[job['method']]})"})
                continue
            spec = dict(job, cache=str(cache[job["pair"]]))
            if job.get("snapshot"):
                spec["snapshot"] = str(tmp / f"snapshot_{job['method']}.npz")
                snapshots[job["method"]] = Path(spec["snapshot"])
            result = in_subprocess(spec, args.threads, args.timeout)
            for row in result if isinstance(result, list) else [{**base, "label": METHOD_LABELS[job["method"]], **result}]:
                rows.append(row)
                summary = row.get("error") or ", ".join(f"{k} {row[k]:.3f}" for k in ("runtime_s", "dice_mean", "displacement_error_mean_mm") if k in row)
                print(f"{job['pair']} {row['label']}: {summary}", file=sys.stderr)
        for r in rows:
            if r["method"] in ("ours", *SESSION_METHODS) and "error" not in r:
                r["comparisons"] = [ratios(r, p) for p in rows
                                    if p["pair"] == r["pair"] and p["method"] in PEERS[1:] and "error" not in p]
        fig_paths = figures(rows, snapshots, args.output / "figures")

    import torch

    cmd = "python scripts/benchmark.py" + " ".join(["", *(["--quick"] if args.quick else []),
                                                   *([f"--pairs {args.pairs}"] if args.pairs else []),
                                                   *([f"--lambdas {args.lambdas}"] if args.lambdas else []),
                                                   *([f"--skip {args.skip}"] if args.skip else []),
                                                   *(["--with-network"] if args.with_network else [])])
    meta = {"mode": "quick" if args.quick else "full", "command": cmd.strip(),
            "machine": f"{platform.machine()} {os.cpu_count()} cores", "threads": args.threads, "torch": torch.__version__,
            "versions": versions(), "date": time.strftime("%Y-%m-%d"), "pairs": pairs, "lambdas": list(lambdas),
            "frame_check": check, "figures": fig_paths, "total_runtime_s": time.perf_counter() - start}
    text = markdown(rows, meta, descriptions)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "results.md").write_text(text)
    (args.output / "results.json").write_text(json.dumps({"meta": meta, "descriptions": descriptions, "rows": rows}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
