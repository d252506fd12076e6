#!/usr/bin/env python
"""Side-by-side benchmark: our optimizer (over a λ sweep) against ANTs SyN, elastix and demons.

    bash scripts/setup_bench_env.sh                      # once: .venv-bench with antspyx + itk-elastix
    .venv-bench/bin/python scripts/benchmark.py --quick  # 15 min on 2 CPU threads (910 s measured; elastix ~6 min)
    .venv-bench/bin/python scripts/benchmark.py          # every pair, full λ sweep

Writes ``benchmarks/results.md``, ``benchmarks/results.json`` and ``benchmarks/figures/*.png``.

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
  "mi" and "ngf".

With ``--with-network``, the shipped λ-conditioned network adds rows "network" and
"network+adapt" (test-time adaptation) at the default λ (:func:`run_network`).
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

QUICK_PAIRS = ("oasis_l2r_to_vxm", "synth_ct")
FULL_PAIRS = ("oasis_l2r_to_vxm", "oasis_vxm_to_l2r", "mne_to_oasis", "synth_ct", "synth_cardiac", "synth_brain", "multimodal_cardiac")
QUICK_LAMBDAS = (0.1, 0.25, 0.5)
FULL_LAMBDAS = (0.05, 0.1, 0.25, 0.5, 0.75)
SWEEP_PAIRS = {"oasis_l2r_to_vxm", "oasis_vxm_to_l2r"}  # λ sweep here; default λ only elsewhere
SNAPSHOT_PAIR = "oasis_l2r_to_vxm"
PEERS = ("identity", "demons", "ants", "elastix")
#: The shipped λ-conditioned network, alone and with test-time adaptation (``--with-network``).
NETWORK_METHODS = ("network", "network+adapt")
METHOD_LABELS = {
    "identity": "no registration",
    "demons": "SimpleITK diffeomorphic demons",
    "ants": "ANTs SyN (antspyx)",
    "elastix": "elastix affine+B-spline (default maps)",
    "ours": "ours (optimize)",
    "network": "ours (network)",
    "network+adapt": "ours (network + instance adaptation)",
}


# ===================================================================================== pairs
def _grid_dict(grid) -> dict:
    return {"shape": list(grid.shape), "spacing": list(grid.spacing), "origin": grid.origin.tolist(), "direction": grid.direction.tolist()}


def _grid(d: dict):
    from LearnedRegistrationLib.grid import ImageGrid

    return ImageGrid(tuple(d["shape"]), tuple(d["spacing"]), np.asarray(d["origin"]), np.asarray(d["direction"]))


def build_pair(name: str, data: Path) -> dict:
    """Arrays and metadata of one benchmark pair (see the module docstring)."""
    from LearnedRegistrationLib.imageio import read_volume

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
def score(pair: dict, displacement_ras: np.ndarray) -> dict:
    from LearnedRegistrationLib.demo import displacement_error
    from LearnedRegistrationLib.metrics import dice_per_label, folding_percent, hd95_mm, jacobian_map, sdlogj
    from LearnedRegistrationLib.transforms import resample_image

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


# ===================================================================================== methods
def run_network(pair: dict, adapt: bool):
    """The shipped network's rows ("network"; with ``adapt`` "network+adapt") at the default λ.

    Same path as the logic (:func:`predict.register_with_network`): our affine stage, the network,
    optionally test-time adaptation; returns ``(displacement_ras, extra_row_fields)``.
    """
    from LearnedRegistrationLib.checkpoint import load_checkpoint
    from LearnedRegistrationLib.optimize import DEFAULT_LAMBDA
    from LearnedRegistrationLib.predict import DEFAULT_MODEL_PATH, AdaptationOptions, register_with_network

    network, metadata = load_checkpoint(DEFAULT_MODEL_PATH)
    session = register_with_network(network, metadata, pair["fixed"], pair["fixed_grid"], pair["moving"],
                                    pair["moving_grid"], adaptation=AdaptationOptions() if adapt else None)
    result = session.predict(DEFAULT_LAMBDA)
    name = "network+adapt" if adapt else "network"
    return result.displacement_ras, {"lambda": DEFAULT_LAMBDA, "device": result.device, "label": f"ours ({name}, λ={DEFAULT_LAMBDA:g})"}


def run_method(pair: dict, method: str, lam: float | None, similarity: str | None, threads: int, snapshot: str | None) -> dict:
    """One measurement (inside a ``--single`` process): register, convert, time, then score."""
    from bench_peers import set_threads

    set_threads(threads)
    fixed, fg, moving, mg = pair["fixed"], pair["fixed_grid"], pair["moving"], pair["moving_grid"]
    row: dict = {"pair": pair["name"], "method": method, "label": METHOD_LABELS[method]}
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
        from LearnedRegistrationLib.optimize import RegistrationOptions, register_images

        result = register_images(fixed, fg, moving, mg, RegistrationOptions(regularization_weight=lam, similarity=similarity))
        d = result.displacement_ras
        row.update({"lambda": lam, "similarity": similarity, "device": result.device,
                    "label": f"ours (optimize, {similarity}, λ={lam:g})"})
    elif method in NETWORK_METHODS:
        d, extra = run_network(pair, adapt=method == "network+adapt")
        row.update(extra)
    else:
        raise ValueError(f"unknown method {method!r}")
    row["runtime_s"] = 0.0 if method == "identity" else time.perf_counter() - start
    row["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # before scoring
    metrics, jac = score(pair, d)
    row.update(metrics)
    if snapshot and result is not None:
        save_snapshot(pair, result, jac, snapshot)
    return row


def save_snapshot(pair: dict, result, jac: np.ndarray, path: str) -> None:
    """Middle slices (array axis 0) of the images the snapshot figure shows."""
    from LearnedRegistrationLib.transforms import resample_image
    from LearnedRegistrationLib.visualization import checkerboard

    fg = pair["fixed_grid"]
    k = fg.shape[0] // 2
    moving_on_fixed = resample_image(pair["moving"], pair["moving_grid"], fg)
    np.savez(path, fixed=pair["fixed"][k], moving=moving_on_fixed[k], warped=result.warped[k],
             checkerboard=checkerboard(pair["fixed"], result.warped, fg)[k], jacobian=jac[k],
             lambda_map=result.lambda_map[k], spacing=np.asarray(fg.spacing), label=f"λ={result.regularization_weight:g}")


# ===================================================================================== frame check
FRAME_CHECK_T = (6.0, -4.0, 5.0)


def frame_check_peer(data: Path, name: str, threads: int) -> dict:
    """One peer on a real image vs its copy translated by a known RAS vector t: mean d must be ≈ t.

    moving(y) = fixed(y - t), so the resampling displacement that registers it is d = +t (RAS mm).
    """
    from bench_helpers import demons_displacement
    from bench_peers import ants_displacement, elastix_displacement, set_threads
    from LearnedRegistrationLib.imageio import read_volume
    from LearnedRegistrationLib.transforms import resample_image

    set_threads(threads)
    image, grid = read_volume(data / "mrbraintumor_5mm" / "MRBrainTumor1.nii.gz")
    t = np.array(FRAME_CHECK_T)
    moving = resample_image(image, grid, grid, np.broadcast_to(-t, (*grid.shape, 3)).astype(np.float32))
    mask = foreground_mask(image)
    # stay away from the edges, where the shifted copy has no data
    mask[:2], mask[-2:], mask[:, :2], mask[:, -2:], mask[:, :, :2], mask[:, :, -2:] = (False,) * 6
    fn = {"demons": lambda: demons_displacement(image, grid, moving, grid),
          "ants": lambda: ants_displacement(image, grid, moving, grid, "SyN"),
          "elastix": lambda: elastix_displacement(image, grid, moving, grid, threads)}[name]
    mean = fn()[mask].mean(axis=0)
    error = float(np.linalg.norm(mean - t))
    return {"mean_displacement_ras_mm": [round(float(v), 3) for v in mean], "error_mm": error,
            "ok": bool(error < 0.35 * np.linalg.norm(t))}


def frame_check(data: Path, threads: int, peers=("demons", "ants", "elastix"), timeout: float = 300) -> dict:
    """:func:`frame_check_peer` for each peer, each in its own process (a crash or hang is recorded).

    elastix's default affine + B-spline maps take 2-2.5 min on 2 threads even on this small image
    (about 20 s of it loading itk's modules), hence the generous ``timeout``."""
    out = {"image": "mrbraintumor_5mm/MRBrainTumor1", "translation_ras_mm": list(FRAME_CHECK_T), "peers": {}}
    for name in peers:
        res = in_subprocess({"frame_check": name, "data": str(data)}, threads, timeout)
        out["peers"][name] = res if "error" not in res else {**res, "ok": False}
        print(f"frame check {name}: {out['peers'][name]}", file=sys.stderr)
    return out


# ===================================================================================== driver
def in_subprocess(spec: dict, threads: int, timeout: float) -> dict:
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


def plan(pairs, lambdas, with_network: bool, pair_flags: dict) -> list[dict]:
    from LearnedRegistrationLib.optimize import DEFAULT_LAMBDA

    jobs = []
    for name in pairs:
        flags = pair_flags[name]
        for peer in PEERS:
            if peer == "demons" and (flags["multimodal"] or not flags["prealigned"]):
                continue  # demons needs same modality and a pre-aligned pair
            jobs.append({"pair": name, "method": peer})
        sims = ("mi", "ngf") if flags["multimodal"] else ("mse",)
        lams = lambdas if name in SWEEP_PAIRS else (DEFAULT_LAMBDA,)
        for sim in sims:
            for lam in lams:
                job = {"pair": name, "method": "ours", "lambda": lam, "similarity": sim}
                if name == SNAPSHOT_PAIR and lam == DEFAULT_LAMBDA and sim == "mse":
                    job["snapshot"] = True
                jobs.append(job)
        if with_network:
            jobs += [{"pair": name, "method": m} for m in NETWORK_METHODS]
    return jobs


def fmt(v, spec=".3f"):
    return "–" if v is None or (isinstance(v, float) and not np.isfinite(v)) else format(v, spec)


def markdown(rows: list[dict], meta: dict, descriptions: dict) -> str:
    lines = [
        f"# Benchmark ({meta['mode']} mode): ours vs ANTs, elastix, demons", "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}, {meta['threads']} threads per method, torch {meta['torch']}, "
        f"antspyx {meta['versions'].get('antspyx', '–')}, itk-elastix {meta['versions'].get('itk-elastix', '–')}, "
        f"SimpleITK {meta['versions'].get('SimpleITK', '–')}, date {meta['date']}, total {meta['total_runtime_s']:.0f} s  ",
        "Each method runs in its own process; peak RSS is that process's maximum before scoring. "
        "Wall times on a shared machine are noisy (±30 % between runs).", "",
        "Frame check (peer fields converted LPS → RAS, real image translated by "
        f"{meta['frame_check'].get('translation_ras_mm')} mm RAS; expected mean d = t):", "",
    ]
    for peer, res in meta["frame_check"].get("peers", {}).items():
        lines.append(f"- {peer}: " + (f"mean d = {res['mean_displacement_ras_mm']} mm, error {res['error_mm']:.2f} mm, "
                                      f"{'OK' if res['ok'] else 'FAILED'}" if "error" not in res else f"error: {res['error']}"))
    lines.append("")
    for name in dict.fromkeys(r["pair"] for r in rows):
        lines += [f"## {name}", "", descriptions.get(name, ""), "",
                  "| method | λ | time s | peak RSS GB | Dice | DSC30 | HD95 mm | % folding | SDlogJ | disp. err mean mm | disp. err p95 mm |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in rows if r["pair"] == name):
            if "error" in r:
                lines.append(f"| {r.get('label', r['method'])} | {fmt(r.get('lambda'), 'g')} | failed: {r['error']} | | | | | | | | |")
                continue
            lines.append(
                f"| {r['label']} | {fmt(r.get('lambda'), 'g')} | {fmt(r['runtime_s'], '.1f')} | {fmt(r['peak_rss_gb'], '.2f')} | "
                f"{fmt(r.get('dice_mean'))} | {fmt(r.get('dsc30'))} | {fmt(r.get('hd95_mean_mm'), '.2f')} | "
                f"{fmt(r['folding_percent'], '.4f')} | {fmt(r['sdlogj'])} | {fmt(r.get('displacement_error_mean_mm'), '.2f')} | "
                f"{fmt(r.get('displacement_error_p95_mm'), '.2f')} |")
        comps = [(r, c) for r in rows if r["pair"] == name and "comparisons" in r for c in r["comparisons"]]
        if comps:
            lines += ["", "| ours | vs | time ratio | ΔDice | ΔDSC30 | Δ disp. err mean mm |", "|---|---|---|---|---|---|"]
            for r, c in comps:
                lines.append(f"| {r['label']} | {c['peer']} | {fmt(c.get('time_ratio'), '.2f')}× | {fmt(c.get('delta_dice_mean'), '+.3f')} | "
                             f"{fmt(c.get('delta_dsc30'), '+.3f')} | {fmt(c.get('delta_displacement_error_mean_mm'), '+.2f')} |")
        lines.append("")
    return "\n".join(lines)


def figures(rows: list[dict], snapshot: Path | None, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in dict.fromkeys(r["pair"] for r in rows):
        ours = sorted((r for r in rows if r["pair"] == name and r["method"] == "ours" and "dice_mean" in r), key=lambda r: r["lambda"])
        if len(ours) < 2:
            continue
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        ax.plot([r["folding_percent"] for r in ours], [r["dice_mean"] for r in ours], "o-", color="C0", label="ours (optimize), λ sweep")
        for r in ours:
            ax.annotate(f"λ={r['lambda']:g}", (r["folding_percent"], r["dice_mean"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
        for i, r in enumerate(r for r in rows if r["pair"] == name and r["method"] != "ours" and "dice_mean" in r):
            ax.plot(r["folding_percent"], r["dice_mean"], "s^Dvp"[i % 5], color=f"C{i + 1}", ms=8, label=r["label"])
        ax.set_xscale("symlog", linthresh=1e-3)
        ax.set_xlabel("% voxels folding (det J ≤ 0), symlog")
        ax.set_ylabel("mean Dice")
        ax.set_title(f"{name}: Dice vs folding")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        path = out / f"lambda_sweep_{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path.relative_to(ROOT)))
    if snapshot is not None and snapshot.is_file():
        s = np.load(snapshot)
        sp = s["spacing"]  # (I, J, K) mm; a slice of array axis 0 shows (J, I)
        aspect = float(sp[1] / sp[0])
        panels = [("fixed", "gray", None), ("moving", "gray", None), ("warped", "gray", None),
                  ("checkerboard", "gray", None), ("jacobian", "RdBu_r", (0.0, 2.0)), ("lambda_map", "viridis", (0.0, 1.0))]
        fig, axes = plt.subplots(2, 3, figsize=(11, 7.5))
        for ax, (key, cmap, lim) in zip(axes.ravel(), panels):
            img = ax.imshow(s[key], cmap=cmap, aspect=aspect, **({"vmin": lim[0], "vmax": lim[1]} if lim else {}))
            ax.set_title({"jacobian": "Jacobian det", "lambda_map": "λ map (λ·λ(x))"}.get(key, key))
            ax.axis("off")
            if lim:
                fig.colorbar(img, ax=ax, fraction=0.046)
        fig.suptitle(f"{SNAPSHOT_PAIR}, ours (optimize, mse, {s['label']}), middle slice")
        fig.tight_layout()
        path = out / f"snapshot_{SNAPSHOT_PAIR}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(str(path.relative_to(ROOT)))
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
    parser.add_argument("--quick", action="store_true", help=f"pairs {', '.join(QUICK_PAIRS)} and λ {QUICK_LAMBDAS} (about 15 min on 2 cores)")
    parser.add_argument("--pairs", help="comma-separated pair names (default: by mode)")
    parser.add_argument("--lambdas", help="comma-separated λ values of the sweep (default: by mode)")
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("LEARNEDREG_DATA", ROOT.parent / "shared" / "data")))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per method before it is recorded as failed")
    parser.add_argument("--skip", help="comma-separated methods to leave out (e.g. elastix)")
    parser.add_argument("--with-network", action="store_true", help="also the shipped network's rows (network, network+adapt)")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks")
    parser.add_argument("--single", help=argparse.SUPPRESS)  # internal: one measurement in this process
    args = parser.parse_args()

    if args.single:
        import torch

        torch.set_num_threads(args.threads)
        spec = json.loads(args.single)
        if "frame_check" in spec:
            print(json.dumps(frame_check_peer(Path(spec["data"]), spec["frame_check"], args.threads)))
            return
        pair = load_pair(Path(spec["cache"]))
        row = run_method(pair, spec["method"], spec.get("lambda"), spec.get("similarity"), args.threads, spec.get("snapshot"))
        print(json.dumps(row))
        return

    start = time.perf_counter()
    pairs = args.pairs.split(",") if args.pairs else list(QUICK_PAIRS if args.quick else FULL_PAIRS)
    lambdas = tuple(float(v) for v in args.lambdas.split(",")) if args.lambdas else (QUICK_LAMBDAS if args.quick else FULL_LAMBDAS)
    print("frame check ...", file=sys.stderr)
    skip = set(args.skip.split(",")) if args.skip else set()
    check = frame_check(args.data, args.threads, [p for p in PEERS[1:] if p not in skip])
    # a peer whose field does not recover the known translation is not trusted: no rows for it
    untrusted = {name: res.get("error", "wrong sign/frame") for name, res in check["peers"].items() if not res["ok"]}
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
        snapshot = None
        for job in plan(pairs, lambdas, args.with_network, flags):
            if job["method"] in skip:
                continue
            if job["method"] in untrusted:
                rows.append({**job, "label": METHOD_LABELS[job["method"]], "error": f"excluded, frame check failed ({untrusted[job['method']]})"})
                continue
            spec = dict(job, cache=str(cache[job["pair"]]))
            if job.get("snapshot"):
                snapshot = tmp / "snapshot.npz"
                spec["snapshot"] = str(snapshot)
            row = in_subprocess(spec, args.threads, args.timeout)
            row = {**{k: v for k, v in job.items() if k != "snapshot"}, "label": METHOD_LABELS[job["method"]], **row}
            rows.append(row)
            summary = row.get("error") or ", ".join(f"{k} {row[k]:.3f}" for k in ("runtime_s", "dice_mean", "displacement_error_mean_mm") if k in row)
            print(f"{job['pair']} {row['label']}: {summary}", file=sys.stderr)
        for r in rows:
            if r["method"] in ("ours", *NETWORK_METHODS) and "error" not in r:
                r["comparisons"] = [ratios(r, p) for p in rows
                                    if p["pair"] == r["pair"] and p["method"] in PEERS[1:] and "error" not in p]
        fig_paths = figures(rows, snapshot, args.output / "figures")

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
