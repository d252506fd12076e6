"""Peer registration tools for ``scripts/benchmark.py``, each returning OUR convention.

Every function takes numpy volumes with their :class:`ImageGrid` and returns a (Z, Y, X, 3) RAS mm
resampling displacement on the fixed grid (moving point = x + d(x)). The peers need the benchmark
environment (``bash scripts/setup_bench_env.sh`` -> ``.venv-bench``): antspyx and itk-elastix are
imported inside the functions, so importing this module costs nothing.

Both tools are handed the images through temporary NIfTI files written by SimpleITK (LPS
headers), so geometry travels exactly as it does for a user; their dense fields come back with
LPS components and are converted by :func:`bench_helpers.lps_field_to_ras`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from bench_helpers import lps_field_to_ras


def _write(path: Path, image: np.ndarray, grid) -> str:
    import SimpleITK as sitk

    from LearnedRegistrationLib.engine.imageio import sitk_image

    sitk.WriteImage(sitk_image(np.asarray(image, np.float32), grid), str(path))
    return str(path)


def ants_displacement(fixed, fixed_grid, moving, moving_grid, type_of_transform: str = "SyN", seed: int = 0) -> np.ndarray:
    """ANTs (antspyx) registration; the forward transforms composed into one dense field on the fixed grid.

    ``type_of_transform``: "SyN" (affine + SyN) for pairs in different spaces, "SyNOnly" for
    pre-aligned pairs. ``ants.apply_transforms(..., compose=prefix)`` writes the composition of
    ``fwdtransforms`` (the resampling transforms that warp moving into fixed) as a displacement
    field on the fixed grid with LPS components.
    """
    import ants
    import SimpleITK as sitk

    with tempfile.TemporaryDirectory(prefix="lr-ants-") as tmp:
        tmp = Path(tmp)
        f = ants.image_read(_write(tmp / "fixed.nii.gz", fixed, fixed_grid))
        m = ants.image_read(_write(tmp / "moving.nii.gz", moving, moving_grid))
        reg = ants.registration(fixed=f, moving=m, type_of_transform=type_of_transform, random_seed=seed,
                                outprefix=str(tmp / "reg_"))
        composed = ants.apply_transforms(fixed=f, moving=m, transformlist=reg["fwdtransforms"],
                                         compose=str(tmp / "composed_"))
        field = sitk.ReadImage(composed)
        array = sitk.GetArrayFromImage(field)
    if array.shape != (*fixed_grid.shape, 3):
        raise RuntimeError(f"ANTs composed field has shape {array.shape}, expected {(*fixed_grid.shape, 3)}")
    return lps_field_to_ras(array)


def elastix_displacement(fixed, fixed_grid, moving, moving_grid, threads: int = 2,
                         max_iterations: int | None = None) -> np.ndarray:
    """elastix (itk-elastix): default "affine" then default "bspline" parameter maps; transformix field.

    Args:
        fixed, moving: (Z, Y, X) arrays on ``fixed_grid`` / ``moving_grid`` (any real dtype; cast
            to float32).
        threads: the most threads ITK (and so elastix) may use, >= 1; set process-wide and left
            in place (the benchmark runs every method in its own process).
        max_iterations: if given, overrides ``MaximumNumberOfIterations`` of every resolution of
            both maps (the frame check uses fewer: it tests the field's frame, not accuracy).

    Returns:
        (Z, Y, X, 3) float32 RAS mm resampling displacement on ``fixed_grid`` (moving point =
        x + d(x)). ``transformix_deformation_field`` samples the final transform at every fixed
        voxel: T(x) - x with LPS components, converted by :func:`lps_field_to_ras`.

    Raises:
        ValueError: ``threads`` < 1.
        RuntimeError: elastix or transformix fails (message: ITK's exception and the tail of
            elastix's log), or the field does not have the fixed grid's shape.

    The thread count is set through ITK's process-wide defaults, never through
    ``number_of_threads``: with itk-elastix 0.25.4 (ITK 5.4.7, TBB threader) that argument (elastix's
    "-threads") > 1 makes the B-spline map's multi-metric (Mattes MI + bending energy penalty)
    segfault in the Mattes MI threaded joint-histogram code (seen with 2 and 4; 1 works, and so do
    ITK's Pool and Platform threaders): upstream ITKElastix issues #160 and #295.
    """
    import itk

    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    # Every ITK threader created from here on (elastix's included) takes the global default as its
    # thread limit; the maximum goes first because ITK clamps the default to the maximum in force.
    itk.MultiThreaderBase.SetGlobalMaximumNumberOfThreads(threads)
    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(threads)
    with tempfile.TemporaryDirectory(prefix="lr-elastix-") as tmp:
        tmp = Path(tmp)
        f = itk.imread(_write(tmp / "fixed.nii.gz", fixed, fixed_grid), itk.F)
        m = itk.imread(_write(tmp / "moving.nii.gz", moving, moving_grid), itk.F)
        params = itk.ParameterObject.New()
        for kind in ("affine", "bspline"):
            parameter_map = params.GetDefaultParameterMap(kind)
            if max_iterations is not None:
                parameter_map["MaximumNumberOfIterations"] = [str(int(max_iterations))]
            params.AddParameterMap(parameter_map)
        log = tmp / "elastix.log"
        try:
            # ITK's exception only says "see elastix log": log to a file so a failure can quote it
            _, transform = itk.elastix_registration_method(f, m, parameter_object=params, log_to_console=False,
                                                           log_to_file=True, output_directory=str(tmp),
                                                           log_file_name=log.name)
            # transformix also writes deformationField.nii to its output directory, the CWD by default
            field = itk.transformix_deformation_field(m, transform, output_directory=str(tmp))
        except RuntimeError as error:  # how ITK exceptions reach Python
            text = log.read_text(errors="replace") if log.exists() else ""
            tail = "\n".join([line for line in text.splitlines() if line.strip()][-10:]) or "(no elastix log)"
            raise RuntimeError(f"elastix/transformix failed: {error}\nelastix log tail:\n{tail}") from error
        array = np.asarray(itk.array_from_image(field))
    if array.shape != (*fixed_grid.shape, 3):
        raise RuntimeError(f"elastix deformation field has shape {array.shape}, expected {(*fixed_grid.shape, 3)}")
    return lps_field_to_ras(array)


def set_threads(threads: int) -> None:
    """Limit ITK-based tools (SimpleITK, ANTs, elastix) to ``threads`` threads in this process."""
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)
    try:
        import SimpleITK as sitk

        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    except Exception:  # pragma: no cover - SimpleITK is a project dependency
        pass
