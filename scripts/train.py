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

On a GPU machine without SimpleITK (``scripts/gpu_check.py`` runs this so, on a lent H200): the
label maps and the OASIS pair come from ``--prepared DIR``, a folder that
``scripts/gpu_check.py --prepare DIR`` writes here (the label maps already aligned and resampled
onto the working grid, the pair as arrays with their geometry and the moving image's histogram
already matched), and

    python3 scripts/train.py --prepared gpu_data --device cuda --bf16 --batch-size 0 \
        --checkpoint-every-s 120 --time-limit-s 240 --init <weights.pt> --output OUT/network.pt

synthesizes every batch on the GPU, runs the network's encoder under bfloat16 autocast
(:func:`LearnedRegistrationLib.training.objective.network_output` says why only the encoder), uses
the largest power-of-two batch that fits (``--batch-size 0``), validates and writes the checkpoint
every two minutes and stops (validated, saved) after ``--time-limit-s`` seconds.

Smoke run on CPU:

    .venv/bin/python scripts/train.py --device cpu --steps 5 --working-spacing 4 --val-every 5 \
        --output output/train/smoke.pt

Data come from ``--data`` or ``$LEARNEDREG_DATA`` (default ``../shared/data``), or from ``--prepared``;
nothing is copied into the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "LearnedRegistration"))

from LearnedRegistrationLib.engine.common import RegistrationOptions, choose_device  # noqa: E402
from LearnedRegistrationLib.engine.grid import ImageGrid  # noqa: E402
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
from LearnedRegistrationLib.training.objective import (  # noqa: E402
    LossConfig,
    network_output,
    registration_loss,
    sample_lambda,
    train_step,
)
from LearnedRegistrationLib.training.synthesis import SynthesisConfig, synthesize_pair  # noqa: E402

#: Column RAS directions of the (I, J, K) axes of the OASIS scans (LIA); training grids use them too.
LIA_DIRECTION = np.array([[-1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])
VALIDATION_PAIR = ("l2r_subject1", "vxm_test_scan")  # (moving, fixed)
#: Defaults of the working grid when the label maps are read from NIfTI (``--prepared`` brings its own).
DEFAULT_WORKING_SPACING_MM = 2.0
DEFAULT_FOV_MM = (224.0, 192.0, 160.0)
#: Files of a prepared folder (``scripts/gpu_check.py --prepare``).
PREPARED_PAIR = "oasis_pair.npz"
PREPARED_LABEL_MAPS = "label_maps.npz"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path(os.environ.get("LEARNEDREG_DATA", ROOT.parent / "shared" / "data")),
                   help="shared data folder (default $LEARNEDREG_DATA or ../shared/data)")
    p.add_argument("--prepared", type=Path, default=None,
                   help="read the label maps and the OASIS pair from this folder (written by scripts/gpu_check.py "
                        "--prepare; no SimpleITK needed) instead of --data; its working grid is used")
    p.add_argument("--output", type=Path, default=ROOT / "output" / "train" / "network.pt",
                   help="checkpoint path (default output/train/network.pt); a .log.json goes next to it")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--steps", type=int, default=100_000, help="optimizer steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--working-spacing", type=float, default=None,
                   help=f"isotropic voxel size of the working grid (mm; default {DEFAULT_WORKING_SPACING_MM:g}, "
                        "or the prepared folder's)")
    p.add_argument("--fov-mm", type=float, nargs=3, default=None, metavar=("Z", "Y", "X"),
                   help="training field of view in mm along tensor axes (Z, Y, X) (default the OASIS "
                        "224 192 160, or the prepared folder's)")
    p.add_argument("--batch-size", type=int, default=1,
                   help="pairs per step; 0 = the largest power of two (at most --max-batch-size) whose step fits "
                        "in the GPU's memory (CUDA only)")
    p.add_argument("--max-batch-size", type=int, default=64, help="upper bound of --batch-size 0")
    p.add_argument("--bf16", action="store_true",
                   help="run the network's encoder under bfloat16 autocast (decoder, integration and loss stay float32)")
    p.add_argument("--checkpoint-every-s", type=float, default=0.0,
                   help="also validate and write the checkpoint whenever this many seconds passed since the last "
                        "time (0 = only every --val-every steps)")
    p.add_argument("--time-limit-s", type=float, default=0.0,
                   help="stop (after a last validation and checkpoint) once this many seconds passed since the "
                        "start, loading included (0 = no limit)")
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
    if args.steps < 1 or args.val_every < 1 or args.max_batch_size < 1:
        p.error("--steps, --val-every and --max-batch-size must be >= 1")
    if args.batch_size < 0:
        p.error("--batch-size must be >= 1, or 0 for the largest that fits")
    if args.working_spacing is not None and args.working_spacing <= 0:
        p.error("--working-spacing must be positive")
    if args.checkpoint_every_s < 0 or args.time_limit_s < 0:
        p.error("--checkpoint-every-s and --time-limit-s must be >= 0")
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


def load_label_maps(folder: Path, fov_mm, spacing_mm: float, divisor: int, extracerebral: int, max_maps: int = 0):
    """Training label maps, affinely aligned to the first one and resampled (nearest) to one working grid.

    Like the OASIS scans (affinely pre-aligned to a template), the maps are brought into a common
    space first, so the network learns the deformable part: a least-squares affine between the
    centroids of the brain labels maps the first map's space onto each other map. Reads NIfTI with
    SimpleITK (:mod:`engine.imageio`).

    Args:
        folder: the folder of ``*.nii*`` label maps (sorted by name; the first ``max_maps`` when > 0).
        fov_mm: field of view (Z, Y, X) in mm; ``spacing_mm``: isotropic voxel size; ``divisor``:
            every axis is rounded up to a multiple of it (the network's).
        extracerebral: first label value outside the brain.

    Returns:
        (maps (M, Z, Y, X) int64 tensor, file names, brain label values used by the loss, the working
        grid (RAS, LIA directions) the maps are on).
    """
    from LearnedRegistrationLib.engine.imageio import read_volume

    files = sorted(folder.glob("*.nii*"))
    if max_maps:
        files = files[:max_maps]
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
            target = working_grid(center, fov_mm, spacing_mm, divisor, LIA_DIRECTION)
        affine = centroid_affine(reference, centroids)
        maps.append(np.rint(resample_image(labels, grid, target, mode="nearest", affine_ras=affine)).astype(np.int64))
    maps = torch.as_tensor(np.stack(maps))
    return maps, [p.name for p in files], brain_label_values(maps, extracerebral), target


def brain_label_values(maps: torch.Tensor, extracerebral: int) -> list[int]:
    """Sorted label values of ``maps`` inside the brain (0 < value < ``extracerebral``): the loss's labels."""
    return [int(v) for v in torch.unique(maps).tolist() if 0 < v < extracerebral]


@dataclass
class OasisPair:
    """The validation pair (moving l2r_subject1 -> fixed vxm_test_scan) with its label maps.

    Attributes:
        fixed, moving: (Z, Y, X) float32 T1 images on ``fixed_grid`` / ``moving_grid`` (RAS).
        fixed_labels, moving_labels: (Z, Y, X) integer FreeSurfer aseg maps on the same grids.
        labels: the 30 VoxelMorph evaluation labels (``labels.json``, ``voxelmorph_eval_labels_30``).
        moving_matched: the moving image after the engine's histogram matching onto the fixed one
            (:func:`engine.common.match_histogram`, which needs SimpleITK), or None when not done yet.
    """

    fixed: np.ndarray
    fixed_grid: ImageGrid
    moving: np.ndarray
    moving_grid: ImageGrid
    fixed_labels: np.ndarray
    moving_labels: np.ndarray
    labels: list
    moving_matched: Optional[np.ndarray] = None

    def registration_moving(self) -> tuple[np.ndarray, bool]:
        """``(moving image to register, histogram_matching option)``: the matched image with matching
        off when it is there (no SimpleITK needed; the same numbers as the default pipeline, which
        matches first), else the moving image with matching on."""
        if self.moving_matched is not None:
            return self.moving_matched, False
        return self.moving, True

    def with_matched_histogram(self) -> OasisPair:
        """The pair with :attr:`moving_matched` computed (SimpleITK, :func:`engine.common.match_histogram`)."""
        from LearnedRegistrationLib.engine.common import match_histogram

        return replace(self, moving_matched=match_histogram(self.moving, self.fixed))

    def strided(self, stride: int) -> OasisPair:
        """Every ``stride``-th voxel along each axis (images and labels alike), on grids of ``stride``
        times the spacing with the same first voxel: a small pair for quick runs (no anti-aliasing)."""
        stride = int(stride)
        if stride < 1:
            raise ValueError(f"OasisPair.strided() 'stride' must be >= 1, got {stride}")
        if stride == 1:
            return self
        pick = (slice(None, None, stride),) * 3

        def grid_of(array: np.ndarray, grid: ImageGrid) -> ImageGrid:
            return ImageGrid(array[pick].shape, tuple(stride * s for s in grid.spacing), grid.origin, grid.direction)

        return OasisPair(
            fixed=np.ascontiguousarray(self.fixed[pick]), fixed_grid=grid_of(self.fixed, self.fixed_grid),
            moving=np.ascontiguousarray(self.moving[pick]), moving_grid=grid_of(self.moving, self.moving_grid),
            fixed_labels=np.ascontiguousarray(self.fixed_labels[pick]),
            moving_labels=np.ascontiguousarray(self.moving_labels[pick]), labels=list(self.labels),
            moving_matched=None if self.moving_matched is None else np.ascontiguousarray(self.moving_matched[pick]),
        )

    def dice(self, displacement_ras: Optional[np.ndarray] = None, affine_ras: Optional[np.ndarray] = None) -> float:
        """Mean Dice over :attr:`labels` of the moving labels warped (nearest) onto the fixed grid by a
        (Z, Y, X, 3) RAS mm resampling displacement (None = identity) or a (4, 4) resampling affine."""
        warped = resample_image(self.moving_labels, self.moving_grid, self.fixed_grid, displacement_ras, mode="nearest",
                                affine_ras=affine_ras)
        return dice_mean(self.fixed_labels, warped, self.labels)


def read_oasis_pair(folder: Path) -> OasisPair:
    """The validation pair from the shared data's ``brain_oasis`` folder (NIfTI, SimpleITK)."""
    from LearnedRegistrationLib.engine.imageio import read_volume

    moving_name, fixed_name = VALIDATION_PAIR
    fixed, fixed_grid = read_volume(folder / f"{fixed_name}_T1.nii.gz")
    moving, moving_grid = read_volume(folder / f"{moving_name}_T1.nii.gz")
    fixed_labels, _ = read_volume(folder / f"{fixed_name}_aseg.nii.gz")
    moving_labels, _ = read_volume(folder / f"{moving_name}_aseg.nii.gz")
    labels = json.loads((folder / "labels.json").read_text())["voxelmorph_eval_labels_30"]
    return OasisPair(fixed, fixed_grid, moving, moving_grid, np.rint(fixed_labels).astype(np.int16),
                     np.rint(moving_labels).astype(np.int16), [int(v) for v in labels])


def _grid_arrays(prefix: str, grid: ImageGrid) -> dict:
    return {f"{prefix}_spacing": np.asarray(grid.spacing), f"{prefix}_origin": grid.origin, f"{prefix}_direction": grid.direction}


def _grid_from_arrays(data, prefix: str, shape) -> ImageGrid:
    return ImageGrid(tuple(shape), tuple(data[f"{prefix}_spacing"]), data[f"{prefix}_origin"], data[f"{prefix}_direction"])


def save_prepared_pair(path: Path, pair: OasisPair) -> None:
    """Write ``pair`` (with :attr:`OasisPair.moving_matched`) to a compressed ``.npz``: the arrays as they
    are (float32 images, int16 labels: lossless) and each grid's RAS spacing, origin and direction.

    Raises:
        ValueError: when the histogram matching has not been done (:meth:`OasisPair.with_matched_histogram`).
    """
    if pair.moving_matched is None:
        raise ValueError("save_prepared_pair() needs the matched moving image: call pair.with_matched_histogram() first")
    np.savez_compressed(
        path, fixed=pair.fixed.astype(np.float32), moving=pair.moving.astype(np.float32),
        moving_matched=pair.moving_matched.astype(np.float32), fixed_labels=pair.fixed_labels.astype(np.int16),
        moving_labels=pair.moving_labels.astype(np.int16), labels=np.asarray(pair.labels, dtype=np.int64),
        **_grid_arrays("fixed", pair.fixed_grid), **_grid_arrays("moving", pair.moving_grid),
    )


def load_prepared_pair(folder: Path) -> OasisPair:
    """The pair :func:`save_prepared_pair` wrote into ``folder`` (numpy only: no SimpleITK)."""
    path = Path(folder) / PREPARED_PAIR
    if not path.is_file():
        raise SystemExit(f"no {PREPARED_PAIR} in {folder}; write the folder with scripts/gpu_check.py --prepare {folder}")
    with np.load(path, allow_pickle=False) as data:
        return OasisPair(
            fixed=data["fixed"], fixed_grid=_grid_from_arrays(data, "fixed", data["fixed"].shape),
            moving=data["moving"], moving_grid=_grid_from_arrays(data, "moving", data["moving"].shape),
            fixed_labels=data["fixed_labels"], moving_labels=data["moving_labels"],
            labels=[int(v) for v in data["labels"]], moving_matched=data["moving_matched"],
        )


def save_prepared_label_maps(path: Path, maps: torch.Tensor, files, values, grid: ImageGrid, fov_mm) -> None:
    """Write the output of :func:`load_label_maps` to a compressed ``.npz`` (maps as uint16).

    Raises:
        ValueError: for label values outside [0, 65535].
    """
    if int(maps.min()) < 0 or int(maps.max()) > np.iinfo(np.uint16).max:
        raise ValueError(f"label values must be in [0, 65535] to be stored as uint16, got [{int(maps.min())}, {int(maps.max())}]")
    np.savez_compressed(
        path, maps=maps.numpy().astype(np.uint16), files=np.asarray(files), label_values=np.asarray(values, dtype=np.int64),
        fov_mm=np.asarray(fov_mm, dtype=np.float64), **_grid_arrays("grid", grid),
    )


def load_prepared_label_maps(folder: Path):
    """What :func:`load_label_maps` returns, plus the field of view, from ``folder``'s ``label_maps.npz``:
    ``(maps (M, Z, Y, X) int64 tensor, file names, label values, working grid, fov_mm (Z, Y, X))``."""
    path = Path(folder) / PREPARED_LABEL_MAPS
    if not path.is_file():
        raise SystemExit(f"no {PREPARED_LABEL_MAPS} in {folder}; write the folder with scripts/gpu_check.py --prepare {folder}")
    with np.load(path, allow_pickle=False) as data:
        maps = torch.as_tensor(data["maps"].astype(np.int64))
        grid = _grid_from_arrays(data, "grid", maps.shape[1:])
        return maps, [str(f) for f in data["files"]], [int(v) for v in data["label_values"]], grid, tuple(float(f) for f in data["fov_mm"])


class Validation:
    """The real OASIS pair on the working grid, scored at its native grid (1 mm; Dice over the 30 labels).

    As in the logic's network path, the pair is first aligned by our optimizer's affine stage
    (:func:`register_images` without deformable levels); the network registers what remains.
    """

    def __init__(self, pair: OasisPair, fov_mm, spacing_mm: float, divisor: int, device: torch.device) -> None:
        self.pair = pair
        self.fixed_grid, self.moving_grid = pair.fixed_grid, pair.moving_grid
        self.grid = working_grid(self.fixed_grid.center_ras, fov_mm, spacing_mm, divisor, LIA_DIRECTION)
        moving_for_affine, matching = pair.registration_moving()
        affine_only = RegistrationOptions(deformable_spacings_mm=(), deformable_iterations=(), histogram_matching=matching)
        self.affine = register_images(pair.fixed, self.fixed_grid, moving_for_affine, self.moving_grid, affine_only).affine_ras
        self.fixed = torch.as_tensor(to_working_grid(pair.fixed, self.fixed_grid, self.grid))[None, None].to(device)
        self.moving = torch.as_tensor(to_working_grid(pair.moving, self.moving_grid, self.grid, self.affine))[None, None].to(device)
        # Native fixed voxels in the working grid's normalized frame, for up-sampling the displacement.
        self.native_points = sampling_grid(self.fixed_grid, self.grid)
        self.dice_before = pair.dice()
        self.dice_affine = pair.dice(affine_ras=self.affine)

    @torch.no_grad()
    def score(self, network: RegistrationNetwork, lam: float) -> dict:
        network.eval()
        out = network(self.fixed, self.moving, lam)
        deformable = displacement_to_ras(out.displacement.cpu(), self.grid)  # (Z, Y, X, 3) RAS mm on the working grid
        folding = folding_percent(jacobian_map(deformable, self.grid))
        disp_ras = displacement_to_ras(out.displacement.cpu(), self.grid, self.affine)
        field = torch.as_tensor(disp_ras).permute(3, 0, 1, 2)[None]
        native = grid_sample(field, self.native_points, "linear", padding_mode="border")[0].permute(1, 2, 3, 0).numpy()
        return {
            "lambda": lam,
            "dice": self.pair.dice(native),
            "folding_percent": folding,
            "weight_map_mean": float(out.weight_map.mean()),
        }


def largest_batch(try_step, device: torch.device, limit: int) -> int:
    """The largest power-of-two batch size <= ``limit`` whose training step fits in the GPU's memory.

    ``try_step(batch)`` runs one synthesis, forward and backward pass of that many pairs (and
    changes no weights). Batches double while the measured peak memory, scaled to the next
    doubling, stays under 85 % of the device's memory, and stop at the first out-of-memory error.

    Raises:
        SystemExit: on a device that is not CUDA, or when even one pair does not fit.
    """
    if device.type != "cuda":
        raise SystemExit("--batch-size 0 (the largest that fits) needs --device cuda; give a batch size on the CPU")
    total = torch.cuda.get_device_properties(device).total_memory
    best, batch = 0, 1
    while batch <= limit:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            try_step(batch)
            torch.cuda.synchronize(device)
        except torch.cuda.OutOfMemoryError:
            break
        best = batch
        if 2 * torch.cuda.max_memory_allocated(device) > 0.85 * total:
            break
        batch *= 2
    torch.cuda.empty_cache()
    if best == 0:
        raise SystemExit("one training pair does not fit in the GPU's memory; use a coarser --working-spacing")
    return best


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
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest convolutions
    torch.manual_seed(args.seed)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    pick = np.random.default_rng(args.seed)

    try:
        net_config = NetworkConfig(encoder_features=tuple(args.encoder_features), decoder_features=tuple(args.decoder_features),
                                   output_level=args.output_level)
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc
    extracerebral = SynthesisConfig.extracerebral_label

    t0 = time.time()
    if args.prepared is not None:
        maps, files, label_values, maps_grid, fov_mm = load_prepared_label_maps(args.prepared)
        spacing = float(maps_grid.spacing[0])
        if args.working_spacing is not None and abs(args.working_spacing - spacing) > 1e-6:
            raise SystemExit(f"the prepared label maps are on a {spacing:g} mm grid, not {args.working_spacing:g} mm; "
                             f"leave out --working-spacing or prepare again with --working-spacing {args.working_spacing:g}")
        if args.fov_mm is not None and not np.allclose(args.fov_mm, fov_mm):
            raise SystemExit(f"the prepared label maps cover {list(fov_mm)} mm, not {list(args.fov_mm)}; leave out --fov-mm")
        args.working_spacing, args.fov_mm = spacing, tuple(fov_mm)
        if args.max_label_maps:
            maps, files = maps[: args.max_label_maps], files[: args.max_label_maps]
            label_values = brain_label_values(maps, extracerebral)
        oasis = load_prepared_pair(args.prepared)
    else:
        args.working_spacing = args.working_spacing or DEFAULT_WORKING_SPACING_MM
        args.fov_mm = tuple(args.fov_mm or DEFAULT_FOV_MM)
        maps, files, label_values, maps_grid = load_label_maps(args.data / "synthseg_label_maps", args.fov_mm, args.working_spacing,
                                                               net_config.divisor, extracerebral, args.max_label_maps)
        oasis = read_oasis_pair(args.data / "brain_oasis")
    maps = maps.to(device)  # the synthesis runs where the network does
    synth_config = SynthesisConfig(spacing_mm=args.working_spacing, rotation_deg=args.rotation_deg,
                                   translation_mm=args.translation_mm, scaling=args.scaling)
    loss_config = LossConfig(kappa=args.kappa, prior_weight=args.prior_weight,
                             normalize_weight_map=not args.no_normalize_weight_map)
    val_lambdas = [float(v) for v in args.val_lambdas.split(",") if v.strip()]
    validation = Validation(oasis, args.fov_mm, args.working_spacing, net_config.divisor, device)
    native_mm = "x".join(f"{s:g}" for s in oasis.fixed_grid.spacing)
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
    autocast_dtype = torch.bfloat16 if args.bf16 else None

    def draw_batch(size: int):
        """A synthesized batch of ``size`` pairs (on ``device``), its λ (size,) and the Dice subsample offset."""
        i = pick.integers(len(files), size=size)
        j = pick.integers(len(files), size=size)
        with torch.no_grad():
            pair = synthesize_pair(maps[i].unsqueeze(1), maps[j].unsqueeze(1), generator, synth_config)
        lam = sample_lambda(size, generator, loss_config.endpoint_probability, device)
        return pair, lam, pick.integers(loss_config.dice_stride, size=3)

    batch_size = args.batch_size
    if batch_size == 0:
        def try_step(size: int) -> None:
            pair, lam, offset = draw_batch(size)
            network.train()
            output = network_output(network, pair, lam, autocast_dtype)
            registration_loss(output, pair, lam, label_values, args.working_spacing, loss_config, offset).loss.backward()
            network.zero_grad(set_to_none=True)

        batch_size = largest_batch(try_step, device, args.max_batch_size)
        print(f"batch size {batch_size}: the largest power of two up to {args.max_batch_size} whose step fits "
              f"({torch.cuda.get_device_properties(device).total_memory / 2**30:.0f} GiB)", flush=True)
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
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def metadata(step: int) -> dict:
        data = {
            "training": f"synthseg_label_maps ({len(files)} maps): {', '.join(files)}",
            "validation": f"brain_oasis {VALIDATION_PAIR[0]} -> {VALIDATION_PAIR[1]}, Dice over voxelmorph_eval_labels_30 "
                          f"at {native_mm} mm",
            "loss_label_values": label_values,
        }
        if args.prepared is not None:
            data["prepared"] = f"{args.prepared.name} (scripts/gpu_check.py --prepare)"
        return {
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
            "git_commit": git_commit(),
            "data": data,
            "working_grid": {
                "spacing_mm": args.working_spacing,
                "shape_zyx": list(maps.shape[1:]),
                "fov_mm_zyx": list(args.fov_mm),
                "direction_ras": LIA_DIRECTION.tolist(),
                "note": "inputs are LIA-oriented, about [0, 1] intensities, affinely aligned",
            },
            "synthesis": asdict(synth_config),
            "loss": loss_config.to_dict(),
            "optimizer": {"name": "Adam", "lr": args.lr, "lr_decay_start": args.lr_decay_start, "batch_size": batch_size,
                          "bf16_encoder": bool(args.bf16)},
            "network": net_config.to_dict(),
            "seed": args.seed,
            "iterations": before["iterations"] + step,
            "continued_from": None if args.init is None else {
                "file": args.init.name, "iterations": before["iterations"], "command": before.get("command"),
                "train_time_s": round(before["train_time_s"], 1)},
            "wall_time_s": round(time.time() - t0, 1),
            "train_time_s": round(before["train_time_s"] + train_time, 1),
            "device": f"{device.type} ({device_name})",
            "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
            "torch_version": str(torch.__version__),
            "dice_before_registration": validation.dice_before,
            "dice_after_affine": validation.dice_affine,
            "validation_curve": before["validation_curve"] + curve,
            "training_curve": before["training_curve"] + train_curve,
        }

    def validate(step: int) -> None:
        for lam in val_lambdas:
            row = {"step": before["iterations"] + step, "wall_time_s": round(time.time() - t0, 1), **validation.score(network, lam)}
            curve.append(row)
            print(f"  val step {row['step']:6d} λ={lam:.2f}: Dice {row['dice']:.4f}  folding {row['folding_percent']:.3f} %  "
                  f"mean λ(x) {row['weight_map_mean']:.3f}", flush=True)
        meta = metadata(step)
        save_checkpoint(args.output, network, meta)
        log_path.write_text(json.dumps(meta, indent=1))

    last_save = time.time()
    step = 0
    for step in range(1, args.steps + 1):
        t = time.time()
        pair, lam, offset = draw_batch(batch_size)
        terms = train_step(network, optimizer, pair, lam, label_values, args.working_spacing, loss_config, offset,
                           autocast_dtype=autocast_dtype)
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
            shown = lam.tolist() if batch_size <= 4 else f"mean {float(lam.mean()):.2f}"
            print(f"step {row['step']:6d}  loss {terms.loss:.4f}  Dice {terms.dice:.4f}  reg {terms.regularization:.4f}  "
                  f"prior {terms.prior:.3f}  λ {shown}  {seconds:.2f} s/step", flush=True)
        out_of_time = bool(args.time_limit_s) and time.time() - t0 >= args.time_limit_s
        if (step % args.val_every == 0 or step == args.steps or out_of_time
                or (args.checkpoint_every_s and time.time() - last_save >= args.checkpoint_every_s)):
            validate(step)
            last_save = time.time()
        if out_of_time:
            print(f"time limit of {args.time_limit_s:g} s reached after {step} steps", flush=True)
            break
    print(f"wrote {args.output} and {log_path} ({step} steps of {batch_size} pairs, {train_time:.1f} s training, "
          f"{time.time() - t0:.1f} s total)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
