#!/usr/bin/env python
"""Train the λ-conditioned registration network on images synthesized from brain label maps.

SynthMorph-style (Hoffmann et al., IEEE TMI 2022): every step draws two of the 20 SynthSeg label
maps, synthesizes a fixed and a moving image of random contrast with random deformations
(:mod:`LearnedRegistrationLib.training.synthesis`), draws λ per pair (HyperMorph, Hoopes et al., IPMI 2021:
10 % at 0, 10 % at 1, the rest uniform), and minimizes

    (1-λ)·(1 - softDice(moving labels ∘ exp(v), fixed labels)) + λ·κ·mean_x λ(x)|∇v|² + γ·BetaNLL(λ(x))

(λ(x) divided by its image mean in the middle term unless ``--no-normalize-weight-map``)

(:mod:`LearnedRegistrationLib.training.objective`). Every ``--val-every`` steps it registers the real OASIS
pair (moving l2r_subject1 -> fixed vxm_test_scan) at a few λ and logs the Dice over the 30
VoxelMorph labels (at the scans' native 1 mm grid) and the % folding; the curve goes to the
console, to ``<output>.log.json`` and into the checkpoint's metadata. The checkpoint
(:mod:`LearnedRegistrationLib.learned.checkpoint`) is written at every validation and at the end.

Working grid: label maps and validation scans are resampled (nearest for labels, box-filtered
linear for images) onto an isotropic grid of ``--working-spacing`` mm with the OASIS axis order
(LIA: tensor X = I = right->left, Y = J = superior->inferior, Z = K = posterior->anterior), a
field of view of ``--fov-mm`` (Z Y X, default the OASIS 224x192x160 mm) centred on the brain, and
each axis rounded up to a multiple of the network's divisor (2^levels). The label maps are first
affinely aligned to the first one (least squares between the centroids of their brain labels), as
the OASIS scans are affinely pre-aligned, so the network learns the deformable part.

The shipped model (``LearnedRegistration/LearnedRegistrationLib/learned/models/lambda_synthmorph_2mm.pt``,
1 MB; it was in ``LearnedRegistration/Resources/Models`` when these commands ran) was
trained on this machine's 2 CPU cores over two work sessions: 600 steps by

    .venv/bin/python scripts/train.py --device cpu --threads 2 --steps 1100 --working-spacing 2 \
        --lr 7e-4 --lr-decay-start 0.5 --val-every 200 --rotation-deg 1 --translation-mm 1 \
        --scaling 0.01 --output output/train/network_2mm.pt

(stopped by hand at step 600), then 1000 more steps continuing from it by

    .venv/bin/python scripts/train.py --device cpu --threads 2 --steps 2000 --seed 1 --working-spacing 2 \
        --lr 5e-4 --lr-decay-start 0.6 --val-every 250 --rotation-deg 1 --translation-mm 1 --scaling 0.01 \
        --init LearnedRegistration/Resources/Models/lambda_synthmorph_2mm.pt --output output/train/network_2mm_cont.pt

(stopped by hand after the validation at its step 1000, i.e. 1600 in all; copied into the
shipped location; the merged log is ``benchmarks/training_log_lambda_synthmorph_2mm.json``).
A GPU run would simply use ``--device cuda`` and many more ``--steps``.

Smoke run on CPU:

    .venv/bin/python scripts/train.py --device cpu --steps 5 --working-spacing 4 --val-every 5 \
        --output output/train/smoke.pt

Data come from ``--data`` or ``$LEARNEDREG_DATA`` (default ``../shared/data``); nothing is copied.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "LearnedRegistration"))

from LearnedRegistrationLib.engine.common import RegistrationOptions, choose_device  # noqa: E402
from LearnedRegistrationLib.engine.grid import ImageGrid  # noqa: E402
from LearnedRegistrationLib.engine.imageio import read_volume  # noqa: E402
from LearnedRegistrationLib.engine.metrics import dice_mean, folding_percent, jacobian_map  # noqa: E402
from LearnedRegistrationLib.engine.optimize import register_images  # noqa: E402
from LearnedRegistrationLib.engine.transforms import (  # noqa: E402
    displacement_to_ras,
    grid_sample,
    resample_image,
    sampling_grid,
)
from LearnedRegistrationLib.learned.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from LearnedRegistrationLib.learned.network import NetworkConfig, RegistrationNetwork  # noqa: E402
from LearnedRegistrationLib.learned.predict import to_working_grid, working_grid  # noqa: E402
from LearnedRegistrationLib.training.objective import LossConfig, sample_lambda, train_step  # noqa: E402
from LearnedRegistrationLib.training.synthesis import SynthesisConfig, synthesize_pair  # noqa: E402

#: Column RAS directions of the (I, J, K) axes of the OASIS scans (LIA); training grids use them too.
LIA_DIRECTION = np.array([[-1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])
VALIDATION_PAIR = ("l2r_subject1", "vxm_test_scan")  # (moving, fixed)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path(os.environ.get("LEARNEDREG_DATA", ROOT.parent / "shared" / "data")),
                   help="shared data folder (default $LEARNEDREG_DATA or ../shared/data)")
    p.add_argument("--output", type=Path, default=ROOT / "output" / "train" / "network.pt",
                   help="checkpoint path (default output/train/network.pt); a .log.json goes next to it")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--steps", type=int, default=100_000, help="optimizer steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--working-spacing", type=float, default=2.0, help="isotropic voxel size of the working grid (mm)")
    p.add_argument("--fov-mm", type=float, nargs=3, default=(224.0, 192.0, 160.0), metavar=("Z", "Y", "X"),
                   help="training field of view in mm along tensor axes (Z, Y, X)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate")
    p.add_argument("--lr-decay-start", type=float, default=1.0,
                   help="fraction of --steps after which the learning rate falls linearly to 5 %% of --lr (1 = constant)")
    p.add_argument("--val-every", type=int, default=1000, help="validate on the OASIS pair every K steps (and at the end)")
    p.add_argument("--val-lambdas", default="0.05,0.2,0.5", help="comma-separated λ values to validate at")
    p.add_argument("--kappa", type=float, default=LossConfig.kappa, help="κ: scale of the regularization term")
    p.add_argument("--prior-weight", type=float, default=LossConfig.prior_weight, help="γ: weight of the Beta prior on λ(x)")
    p.add_argument("--no-normalize-weight-map", action="store_true",
                   help="use λ(x) as is in the regularization (Chen et al.) instead of divided by its mean")
    p.add_argument("--rotation-deg", type=float, default=SynthesisConfig.rotation_deg,
                   help="largest random rotation per side (degrees); inference aligns affinely first, so keep it small")
    p.add_argument("--translation-mm", type=float, default=SynthesisConfig.translation_mm, help="largest random translation per side (mm)")
    p.add_argument("--scaling", type=float, default=SynthesisConfig.scaling, help="largest random log-scaling per side")
    p.add_argument("--max-label-maps", type=int, default=0, help="use only the first N label maps (0 = all)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--encoder-features", type=int, nargs="+", default=list(NetworkConfig.encoder_features),
                   help="network channels per level, full resolution first")
    p.add_argument("--decoder-features", type=int, nargs="+", default=list(NetworkConfig.decoder_features),
                   help="decoder channels from the coarsest level up to --output-level")
    p.add_argument("--output-level", type=int, default=NetworkConfig.output_level,
                   help="resolution level of the predicted fields (0 = working grid, 1 = half)")
    p.add_argument("--init", type=Path, default=None,
                   help="continue from this checkpoint (its architecture and weights; a fresh Adam state); "
                        "its iterations, training time and curves are carried into the new one")
    args = p.parse_args(argv)
    if args.steps < 1 or args.val_every < 1 or args.batch_size < 1:
        p.error("--steps, --val-every and --batch-size must be >= 1")
    if args.working_spacing <= 0:
        p.error("--working-spacing must be positive")
    return args


# --------------------------------------------------------------------------------- grids and data
def brain_center(labels: np.ndarray, grid: ImageGrid, extracerebral: int) -> np.ndarray:
    """RAS centroid (mm) of the brain labels (0 < label < ``extracerebral``)."""
    kji = np.argwhere((labels > 0) & (labels < extracerebral)).mean(axis=0)
    return (grid.ijk_to_ras @ np.r_[kji[::-1], 1.0])[:3]


def label_centroids(labels: np.ndarray, grid: ImageGrid, values) -> dict[int, np.ndarray]:
    """RAS centroid (mm) of each label value present, from every second voxel (fast, plenty accurate)."""
    sub = labels[::2, ::2, ::2].reshape(-1)
    counts = np.bincount(sub.clip(0), minlength=max(values) + 1)
    present = [v for v in values if counts[v] > 0]
    kji = np.indices(labels[::2, ::2, ::2].shape, dtype=np.float64).reshape(3, -1) * 2.0
    sums = np.stack([np.bincount(sub.clip(0), weights=c, minlength=len(counts)) for c in kji], axis=1)
    ijk = (sums[present] / counts[present, None])[:, ::-1]
    ras = (grid.ijk_to_ras @ np.c_[ijk, np.ones(len(ijk))].T)[:3].T
    return dict(zip(present, ras))


def centroid_affine(reference: dict, moving: dict) -> np.ndarray:
    """(4, 4) least-squares affine mapping reference RAS centroids onto moving ones (a resampling affine)."""
    common = sorted(set(reference) & set(moving))
    if len(common) < 4:
        raise SystemExit(f"only {len(common)} labels in common between label maps; cannot align them")
    p = np.c_[np.stack([reference[v] for v in common]), np.ones(len(common))]
    q = np.stack([moving[v] for v in common])
    solution, *_ = np.linalg.lstsq(p, q, rcond=None)  # q ≈ p @ solution
    affine = np.eye(4)
    affine[:3] = solution.T
    return affine


def load_label_maps(folder: Path, args, divisor: int, extracerebral: int):
    """Training label maps, affinely aligned to the first one and resampled (nearest) to one working grid.

    Like the OASIS scans (affinely pre-aligned to a template), the maps are brought into a common
    space first, so the network learns the deformable part: a least-squares affine between the
    centroids of the brain labels maps the first map's space onto each other map.

    Returns:
        (maps (M, Z, Y, X) int64 tensor, file names, brain label values used by the loss).
    """
    files = sorted(folder.glob("*.nii*"))
    if args.max_label_maps:
        files = files[: args.max_label_maps]
    if not files:
        raise SystemExit(f"no label maps (*.nii.gz) in {folder}; set --data or $LEARNEDREG_DATA")
    maps = []
    brain_values = list(range(1, extracerebral))
    reference = target = None
    for path in files:
        labels, grid = read_volume(path)
        labels = np.rint(labels).astype(np.int64)
        centroids = label_centroids(labels, grid, brain_values)
        if reference is None:
            reference = centroids
            center = brain_center(labels, grid, extracerebral)
            target = working_grid(center, args.fov_mm, args.working_spacing, divisor, LIA_DIRECTION)
        affine = centroid_affine(reference, centroids)
        maps.append(np.rint(resample_image(labels, grid, target, mode="nearest", affine_ras=affine)).astype(np.int64))
    maps = np.stack(maps)
    values = sorted(int(v) for v in np.unique(maps) if 0 < v < extracerebral)
    return torch.as_tensor(maps), [p.name for p in files], values


class Validation:
    """The real OASIS pair on the working grid, scored at native 1 mm (Dice over the 30 labels).

    As in the logic's network path, the pair is first aligned by our optimizer's affine stage
    (:func:`register_images` without deformable levels); the network registers what remains.
    """

    def __init__(self, folder: Path, args, divisor: int, device: torch.device) -> None:
        moving_name, fixed_name = VALIDATION_PAIR
        fixed, self.fixed_grid = read_volume(folder / f"{fixed_name}_T1.nii.gz")
        moving, self.moving_grid = read_volume(folder / f"{moving_name}_T1.nii.gz")
        self.fixed_labels, _ = read_volume(folder / f"{fixed_name}_aseg.nii.gz")
        self.moving_labels, _ = read_volume(folder / f"{moving_name}_aseg.nii.gz")
        self.labels = json.loads((folder / "labels.json").read_text())["voxelmorph_eval_labels_30"]
        self.grid = working_grid(self.fixed_grid.center_ras, args.fov_mm, args.working_spacing, divisor, LIA_DIRECTION)
        affine_only = RegistrationOptions(deformable_spacings_mm=(), deformable_iterations=())
        self.affine = register_images(fixed, self.fixed_grid, moving, self.moving_grid, affine_only).affine_ras
        self.fixed = torch.as_tensor(to_working_grid(fixed, self.fixed_grid, self.grid))[None, None].to(device)
        self.moving = torch.as_tensor(to_working_grid(moving, self.moving_grid, self.grid, self.affine))[None, None].to(device)
        # Native fixed voxels in the working grid's normalized frame, for up-sampling the displacement.
        self.native_points = sampling_grid(self.fixed_grid, self.grid)
        self.dice_before = dice_mean(self.fixed_labels, resample_image(self.moving_labels, self.moving_grid, self.fixed_grid, mode="nearest"), self.labels)
        self.dice_affine = dice_mean(
            self.fixed_labels,
            resample_image(self.moving_labels, self.moving_grid, self.fixed_grid, mode="nearest", affine_ras=self.affine),
            self.labels,
        )

    @torch.no_grad()
    def score(self, network: RegistrationNetwork, lam: float) -> dict:
        network.eval()
        out = network(self.fixed, self.moving, lam)
        deformable = displacement_to_ras(out.displacement.cpu(), self.grid)  # (Z, Y, X, 3) RAS mm on the working grid
        folding = folding_percent(jacobian_map(deformable, self.grid))
        disp_ras = displacement_to_ras(out.displacement.cpu(), self.grid, self.affine)
        field = torch.as_tensor(disp_ras).permute(3, 0, 1, 2)[None]
        native = grid_sample(field, self.native_points, "linear", padding_mode="border")[0].permute(1, 2, 3, 0).numpy()
        warped = resample_image(self.moving_labels, self.moving_grid, self.fixed_grid, native, mode="nearest")
        return {
            "lambda": lam,
            "dice": dice_mean(self.fixed_labels, warped, self.labels),
            "folding_percent": folding,
            "weight_map_mean": float(out.weight_map.mean()),
        }


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# --------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = choose_device(args.device)
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc
    torch.manual_seed(args.seed)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    pick = np.random.default_rng(args.seed)

    try:
        net_config = NetworkConfig(encoder_features=tuple(args.encoder_features), decoder_features=tuple(args.decoder_features),
                                   output_level=args.output_level)
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc
    synth_config = SynthesisConfig(spacing_mm=args.working_spacing, rotation_deg=args.rotation_deg,
                                   translation_mm=args.translation_mm, scaling=args.scaling)
    loss_config = LossConfig(kappa=args.kappa, prior_weight=args.prior_weight,
                             normalize_weight_map=not args.no_normalize_weight_map)
    val_lambdas = [float(v) for v in args.val_lambdas.split(",") if v.strip()]

    t0 = time.time()
    maps, files, label_values = load_label_maps(args.data / "synthseg_label_maps", args, net_config.divisor, synth_config.extracerebral_label)
    validation = Validation(args.data / "brain_oasis", args, net_config.divisor, device)
    print(f"loaded {len(files)} label maps on a {tuple(maps.shape[1:])} grid at {args.working_spacing} mm "
          f"({len(label_values)} loss labels) and the OASIS pair (Dice before registration "
          f"{validation.dice_before:.4f}, after affine {validation.dice_affine:.4f}) in {time.time() - t0:.1f} s; "
          f"device {device}", flush=True)

    before = {"iterations": 0, "train_time_s": 0.0, "validation_curve": [], "training_curve": []}
    if args.init is not None:
        network, init_meta = load_checkpoint(args.init, device)
        net_config = network.config
        before = {k: init_meta.get(k, v) for k, v in before.items()}
        before["command"] = init_meta.get("command")
        print(f"continuing from {args.init} ({before['iterations']} iterations, {before['train_time_s']:.0f} s)", flush=True)
    else:
        network = RegistrationNetwork(net_config).to(device)
    optimizer = torch.optim.Adam(network.parameters(), lr=args.lr)
    decay_from = int(args.lr_decay_start * args.steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: 1.0 if k < decay_from else max(0.05, 1.0 - 0.95 * (k - decay_from) / max(1, args.steps - decay_from))
    )
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    log_path = args.output.with_name(args.output.name + ".log.json")
    curve: list[dict] = []
    train_curve: list[dict] = []
    running: dict[str, float] = {}
    train_time = 0.0

    def metadata(step: int) -> dict:
        return {
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
            "git_commit": git_commit(),
            "data": {
                "training": f"synthseg_label_maps ({len(files)} maps): {', '.join(files)}",
                "validation": f"brain_oasis {VALIDATION_PAIR[0]} -> {VALIDATION_PAIR[1]}, Dice over voxelmorph_eval_labels_30 at 1 mm",
                "loss_label_values": label_values,
            },
            "working_grid": {
                "spacing_mm": args.working_spacing,
                "shape_zyx": list(maps.shape[1:]),
                "fov_mm_zyx": list(args.fov_mm),
                "direction_ras": LIA_DIRECTION.tolist(),
                "note": "inputs are LIA-oriented, about [0, 1] intensities, affinely aligned",
            },
            "synthesis": asdict(synth_config),
            "loss": loss_config.to_dict(),
            "optimizer": {"name": "Adam", "lr": args.lr, "lr_decay_start": args.lr_decay_start, "batch_size": args.batch_size},
            "network": net_config.to_dict(),
            "seed": args.seed,
            "iterations": before["iterations"] + step,
            "continued_from": None if args.init is None else {
                "file": args.init.name, "iterations": before["iterations"], "command": before.get("command")},
            "wall_time_s": round(time.time() - t0, 1),
            "train_time_s": round(before["train_time_s"] + train_time, 1),
            "device": f"{device.type} ({device_name})",
            "torch_version": str(torch.__version__),
            "dice_before_registration": validation.dice_before,
            "dice_after_affine": validation.dice_affine,
            "validation_curve": before["validation_curve"] + curve,
            "training_curve": before["training_curve"] + train_curve,
        }

    def validate(step: int) -> None:
        for lam in val_lambdas:
            row = {"step": before["iterations"] + step, **validation.score(network, lam)}
            curve.append(row)
            print(f"  val step {row['step']:6d} λ={lam:.2f}: Dice {row['dice']:.4f}  folding {row['folding_percent']:.3f} %  "
                  f"mean λ(x) {row['weight_map_mean']:.3f}", flush=True)
        meta = metadata(step)
        save_checkpoint(args.output, network, meta)
        log_path.write_text(json.dumps(meta, indent=1))

    for step in range(1, args.steps + 1):
        t = time.time()
        i = pick.integers(len(files), size=args.batch_size)
        j = pick.integers(len(files), size=args.batch_size)
        fixed_labels = maps[i].unsqueeze(1).to(device)
        moving_labels = maps[j].unsqueeze(1).to(device)
        with torch.no_grad():
            pair = synthesize_pair(fixed_labels, moving_labels, generator, synth_config)
        lam = sample_lambda(args.batch_size, generator, loss_config.endpoint_probability, device)
        offset = pick.integers(loss_config.dice_stride, size=3)
        terms = train_step(network, optimizer, pair, lam, label_values, args.working_spacing, loss_config, offset)
        schedule.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.time() - t
        train_time += seconds
        for name, value in (*zip(terms._fields, (float(x) for x in terms)), ("seconds", seconds)):
            running[name] = value if name not in running else 0.98 * running[name] + 0.02 * value
        if step % max(1, min(100, args.val_every)) == 0 or step <= 3:
            row = {"step": before["iterations"] + step, **{k: round(v, 5) for k, v in running.items()}}
            train_curve.append(row)
            print(f"step {row['step']:6d}  loss {terms.loss:.4f}  Dice {terms.dice:.4f}  reg {terms.regularization:.4f}  "
                  f"prior {terms.prior:.3f}  λ {lam.tolist()}  {seconds:.2f} s/step", flush=True)
        if step % args.val_every == 0 or step == args.steps:
            validate(step)
    print(f"wrote {args.output} and {log_path} ({args.steps} steps, {train_time:.1f} s training, "
          f"{time.time() - t0:.1f} s total)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
