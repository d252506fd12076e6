#!/usr/bin/env python
"""Render the Extensions Index screenshot: the extension's outputs on a real pair, headless.

Loads a real pair into a headless slicer-core scene (:class:`LearnedRegistrationLib.app.headless.HeadlessSlicer`),
registers it with the extension's logic (:meth:`LearnedRegistrationLib.bridge.logic.RegistrationLogic.register`,
as the command line does), and draws one axial slice of the input and output nodes with matplotlib
(radiological orientation, as Slicer's axial view: patient right on the left, anterior up): fixed,
moving, warped over fixed, checkerboard, Jacobian determinant (diverging colours centred at 1) and
the regularization map λ(x) the registration used. It is a rendering of the nodes, not a
screenshot of the desktop GUI, and the figure says so.

    .venv/bin/python scripts/make_screenshot.py            # MRBrainTumor2 -> MRBrainTumor1, network+adapt

writes ``Resources/Screenshots/LearnedRegistration1.png`` (the URL in the top-level
CMakeLists.txt's EXTENSION_SCREENSHOTURLS). Data come from ``--data`` or ``$LEARNEDREG_DATA``
(default ``../shared/data``); nothing is copied. Seeded and single-configuration, so a re-run gives
the same picture (torch on CPU, 2 threads: about 30 s on 2 idle cores; when other work holds the
cores, `--threads 1` avoids the slowdown of oversubscribed threads, with slightly different floats).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "LearnedRegistration"))

from LearnedRegistrationLib.app.headless import HeadlessSlicer  # noqa: E402
from LearnedRegistrationLib.bridge.logic import METHODS, RegistrationLogic  # noqa: E402

DEFAULT_OUTPUT = ROOT / "Resources" / "Screenshots" / "LearnedRegistration1.png"

#: pair name -> (folder, fixed file, moving file, caption)
PAIRS = {
    "mrbraintumor": ("mrbraintumor_5mm", "MRBrainTumor1.nii.gz", "MRBrainTumor2.nii.gz",
                     "MRBrainTumor2 → MRBrainTumor1 (Slicer sample data, T1 post-contrast, 5 mm)"),
    "oasis": ("brain_oasis", "vxm_test_scan_T1.nii.gz", "l2r_subject1_T1.nii.gz",
              "OASIS-derived T1: l2r_subject1 → vxm_test_scan (1 mm)"),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path(os.environ.get("LEARNEDREG_DATA", ROOT.parent / "shared" / "data")),
                   help="shared data folder (default $LEARNEDREG_DATA or ../shared/data)")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=f"PNG to write (default {DEFAULT_OUTPUT.relative_to(ROOT)})")
    p.add_argument("--pair", choices=sorted(PAIRS), default="mrbraintumor", help="which real pair (default mrbraintumor)")
    p.add_argument("--method", choices=METHODS, default="network+adapt", help="registration method (default network+adapt)")
    p.add_argument("--lambda", dest="regularization_weight", type=float, default=0.25, help="λ in [0, 1] (default 0.25)")
    p.add_argument("--iteration-scale", type=float, default=0.5, help="iteration multiplier of the optimize method (default 0.5)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--slice-offset-mm", type=float, default=30.0,
                   help="axial slice position, mm above the centre of the fixed image (default 30: through both tumours of the MRBrainTumor pair)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------- geometry


def _ijk_to_ras(node) -> np.ndarray:
    import vtk

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def array_ras(node) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The node's voxels as an array indexed [S, A, R] (increasing S, A, R), the RAS position of
    that array's first voxel, and its spacing along R, A, S (mm).

    Each voxel axis is assigned to the RAS axis it is closest to (volumes here are axis-aligned up
    to small obliquity, which this display ignores).
    """
    from vtk.util.numpy_support import vtk_to_numpy

    image = node.GetImageData()
    dims = image.GetDimensions()  # I, J, K
    voxels = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[::-1])  # K, J, I
    matrix = _ijk_to_ras(node)
    directions = matrix[:3, :3]
    # ras_axis_of[ijk axis] = index of the RAS axis (0=R, 1=A, 2=S) it points along.
    ras_axis_of = [int(np.argmax(np.abs(directions[:, ijk]))) for ijk in range(3)]
    if sorted(ras_axis_of) != [0, 1, 2]:
        raise ValueError(f"cannot map the voxel axes of {node.GetName()} onto R, A, S")
    ijk_of = [ras_axis_of.index(ras) for ras in range(3)]  # voxel axis along R, A, S
    # Array axis a holds voxel axis 2 - a; put the S axis first, then A, then R.
    volume = voxels.transpose([2 - ijk_of[ras] for ras in (2, 1, 0)])
    corner = np.zeros(3)
    for ras in range(3):
        ijk = ijk_of[ras]
        if directions[ras, ijk] < 0:  # this voxel axis runs towards -R/-A/-S: flip it
            volume = np.flip(volume, axis=2 - ras)
            corner[ijk] = dims[ijk] - 1
    origin = (matrix @ np.append(corner, 1.0))[:3]
    spacing = np.linalg.norm(directions, axis=0)[ijk_of]
    return np.ascontiguousarray(volume), origin, spacing


def resample_like(volume: np.ndarray, origin: np.ndarray, spacing: np.ndarray,
                  ref_shape: tuple, ref_origin: np.ndarray, ref_spacing: np.ndarray) -> np.ndarray:
    """Linear resampling of an [S, A, R] array onto another axis-aligned [S, A, R] grid by RAS position (0 outside)."""
    from scipy.ndimage import map_coordinates

    axes = [(ref_origin[ras] + np.arange(ref_shape[2 - ras]) * ref_spacing[ras] - origin[ras]) / spacing[ras]
            for ras in (2, 1, 0)]
    coordinates = np.meshgrid(*axes, indexing="ij")
    return map_coordinates(volume.astype(np.float32), coordinates, order=1, mode="constant", cval=0.0)


def axial(volume: np.ndarray, index: int) -> np.ndarray:
    """Slice [A, R] at S index, as Slicer's axial view shows it: anterior up, patient right on the left."""
    return volume[index][::-1, ::-1]


# ---------------------------------------------------------------------------------- drawing


def _normalize(image: np.ndarray) -> np.ndarray:
    """Intensities to [0, 1] with the median of the head (voxels above 5 % of the maximum) at 0.4, so
    that two scans of different brightness look alike (the bright skull rim saturates)."""
    foreground = image[image > 0.05 * image.max()]
    scale = float(np.median(foreground)) if foreground.size else 1.0
    return np.clip(image * (0.4 / max(scale, 1e-6)), 0, 1)


def render(path: Path, panels: dict, spacing_mm: np.ndarray, title: str, footer: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    extent_ar = (0, panels["fixed"].shape[1] * spacing_mm[0], 0, panels["fixed"].shape[0] * spacing_mm[1])
    fig, axes = plt.subplots(2, 3, figsize=(12, 7), dpi=100)
    fig.suptitle(title, fontsize=13)
    fixed, moving, warped = (_normalize(panels[key]) for key in ("fixed", "moving", "warped"))
    overlay = np.stack([fixed, warped, fixed], axis=-1)  # fixed magenta, warped green: grey where they agree

    def show(ax, image, name, **kwargs):
        shown = ax.imshow(image, extent=extent_ar, **kwargs)
        ax.set_title(name, fontsize=11)
        ax.set_xticks([])
        ax.set_yticks([])
        return shown

    show(axes[0, 0], fixed, "Fixed", cmap="gray", vmin=0, vmax=1, interpolation="bilinear")
    show(axes[0, 1], moving, "Moving (on the fixed grid, before registration)", cmap="gray", vmin=0, vmax=1,
         interpolation="bilinear")
    show(axes[0, 2], overlay, "Warped (green) over fixed (magenta)", interpolation="bilinear")
    show(axes[1, 0], panels["checkerboard"], "Checkerboard: fixed / warped", cmap="gray", interpolation="bilinear")
    jacobian = panels["jacobian"]
    high = max(2.0, float(np.percentile(jacobian, 99.5)))
    shown = show(axes[1, 1], jacobian, "Jacobian determinant (≤ 0: folding)", cmap="RdBu_r",
                 norm=TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=high), interpolation="nearest")
    fig.colorbar(shown, ax=axes[1, 1], fraction=0.046, pad=0.02, extend="both")
    shown = show(axes[1, 2], panels["lambda"], "Regularization used, λ·λ(x)", cmap="viridis", interpolation="nearest")
    fig.colorbar(shown, ax=axes[1, 2], fraction=0.046, pad=0.02)
    fig.text(0.5, 0.015, footer, ha="center", fontsize=9, color="0.25")
    fig.tight_layout(rect=(0, 0.03, 1, 0.96))
    path.parent.mkdir(parents=True, exist_ok=True)
    # No software/date metadata: the same pixels give the same file.
    fig.savefig(path, dpi=100, metadata={"Software": None}, pil_kwargs={"optimize": True})
    plt.close(fig)


# ---------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    folder, fixed_name, moving_name, caption = PAIRS[args.pair]
    fixed_path, moving_path = args.data / folder / fixed_name, args.data / folder / moving_name
    for path in (fixed_path, moving_path):
        if not path.is_file():
            print(f"error: {path} not found; give the shared data folder with --data or $LEARNEDREG_DATA", file=sys.stderr)
            return 2
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    with HeadlessSlicer() as app:
        fixed_node = app.loadVolume(fixed_path, "fixed")
        moving_node = app.loadVolume(moving_path, "moving")
        options = dict(method=args.method, regularizationWeight=args.regularization_weight, device="cpu")
        if args.method == "optimize":
            options["iterationScale"] = args.iteration_scale
        outputs = RegistrationLogic().register(fixed_node, moving_node, **options)
        metrics = outputs.metrics

        fixed, origin, spacing = array_ras(fixed_node)
        centre_s = origin[2] + (fixed.shape[0] - 1) * spacing[2] / 2
        index = int(np.clip(round((centre_s + args.slice_offset_mm - origin[2]) / spacing[2]), 0, fixed.shape[0] - 1))
        panels = {"fixed": axial(fixed, index)}
        # The moving image as it lies under the fixed one before registration: resampled onto the
        # fixed grid by physical position (no transform).
        moving = resample_like(*array_ras(moving_node), fixed.shape, origin, spacing)
        panels["moving"] = axial(moving, index)
        for key, node in (("warped", outputs.warpedVolumeNode), ("checkerboard", outputs.checkerboardVolumeNode),
                          ("jacobian", outputs.jacobianVolumeNode), ("lambda", outputs.lambdaMapVolumeNode)):
            panels[key] = axial(array_ras(node)[0], index)
    seconds = time.perf_counter() - start
    title = f"LearnedRegistration outputs, rendered headless (slicer-core + matplotlib; not a GUI screenshot)\n{caption}"
    footer = (f"method {metrics['method']}, λ = {metrics['lambda']:g}, CPU ({args.threads} threads): "
              f"% folding {metrics['folding_percent']:.3g}, SDlogJ {metrics['sdlogj']:.3f}; "
              f"axial slice at S = {origin[2] + index * spacing[2]:.0f} mm")
    render(args.output, panels, spacing, title, footer)
    print(f"wrote {args.output} ({args.output.stat().st_size / 1024:.0f} KB) in {seconds:.1f} s "
          f"(load + register + read back; method {metrics['method']}, λ {metrics['lambda']:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
