"""End-to-end runs of ``learnedreg register``: a real pair (MRBrainTumor2 -> MRBrainTumor1) and the built-in demo.

The runs use a small ``--iteration-scale`` so they stay fast on a CPU; the assertions are about the
plumbing (files, frames, scene, metrics), which must hold whatever the number of iterations.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import vtk
from vtk.util import numpy_support

import slicer

from LearnedRegistrationLib.app.cli import OUTPUT_FILES, main
from LearnedRegistrationLib.app.demo import make_demo_pair
from LearnedRegistrationLib.app.headless import HeadlessSlicer
from LearnedRegistrationLib.bridge import mrml
from LearnedRegistrationLib.engine.grid import ImageGrid
from LearnedRegistrationLib.engine.metrics import displacement_error
from LearnedRegistrationLib.engine.transforms import resample_image

FAST = ["--iteration-scale", "0.05", "--quiet"]
EXPECTED_FILES = {
    "warped.nrrd", "displacement.nrrd", "transform.h5", "checkerboard.nrrd", "difference.nrrd",
    "jacobian.nrrd", "lambda_map.nrrd", "scene.mrb", "metrics.json",
}
FLIP = np.array([-1.0, -1.0, 1.0])  # RAS <-> LPS


def transform_points(transform, points: np.ndarray) -> np.ndarray:
    """Map (N, 3) points with a VTK transform (all at once)."""
    source = vtk.vtkPoints()
    source.SetData(numpy_support.numpy_to_vtk(np.ascontiguousarray(points, dtype=np.float64), deep=True))
    target = vtk.vtkPoints()
    transform.TransformPoints(source, target)
    return numpy_support.vtk_to_numpy(target.GetData()).astype(np.float64)


def read_image(path: Path):
    """(array (Z, Y, X[, C]), ImageGrid in RAS) of a file read with SimpleITK, independently of Slicer."""
    image = sitk.ReadImage(str(path))
    array = sitk.GetArrayFromImage(image)
    grid = ImageGrid.from_lps(array.shape[:3], image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    return array, grid


@pytest.fixture(scope="module")
def tumor_run(tmp_path_factory, data_file):
    """One CLI run through the installed ``learnedreg`` entry point on the real 5 mm pair."""
    fixed = data_file("mrbraintumor_5mm/MRBrainTumor1.nii.gz")
    moving = data_file("mrbraintumor_5mm/MRBrainTumor2.nii.gz")
    output = tmp_path_factory.mktemp("tumor") / "result"
    executable = Path(sys.executable).with_name("learnedreg")
    command = [str(executable)] if executable.exists() else [sys.executable, "-m", "LearnedRegistrationLib.app.cli"]
    completed = subprocess.run(
        [*command, "register", "--fixed", str(fixed), "--moving", str(moving), "--output-dir", str(output),
         "--lambda", "0.3", *FAST],
        capture_output=True, text=True, timeout=600,
    )
    return completed, output, fixed, moving


def test_tumor_pair_writes_every_output_and_metrics(tumor_run):
    completed, output, fixed, _ = tumor_run
    assert completed.returncode == 0, completed.stderr
    assert "Traceback" not in completed.stderr
    assert "wrote" in completed.stdout
    assert {p.name for p in output.iterdir()} == EXPECTED_FILES  # no labels given: no warped_labels.nrrd
    assert not list(output.parent.glob(".*learnedreg-*"))  # the staging folder is gone

    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["lambda"] == pytest.approx(0.3)
    assert metrics["device"] == "cpu"
    assert metrics["runtime_s"] > 0
    assert 0.0 <= metrics["folding_percent"] < 1.0
    assert 0.0 < metrics["sdlogj"] < 1.0
    assert "dice_mean" not in metrics

    fixed_array, fixed_grid = read_image(fixed)
    for name in ("warped.nrrd", "checkerboard.nrrd", "difference.nrrd", "jacobian.nrrd", "lambda_map.nrrd"):
        array, grid = read_image(output / name)
        assert array.shape == fixed_array.shape, name
        assert grid.same_geometry(fixed_grid, tol_mm=1e-3), name
    jacobian, _ = read_image(output / "jacobian.nrrd")
    assert np.median(jacobian) == pytest.approx(1.0, abs=0.2)
    lambda_map, _ = read_image(output / "lambda_map.nrrd")
    np.testing.assert_allclose(lambda_map, 0.3, atol=1e-6)
    warped, _ = read_image(output / "warped.nrrd")
    # registration made the images more alike than the unregistered moving image resampled as is
    moving_array, moving_grid = read_image(tumor_run[3])
    unregistered = resample_image(moving_array.astype(np.float32), moving_grid, fixed_grid)
    correlation_after = np.corrcoef(warped.ravel(), fixed_array.ravel())[0, 1]
    correlation_before = np.corrcoef(unregistered.ravel(), fixed_array.ravel())[0, 1]
    assert correlation_after > correlation_before


def test_tumor_transform_h5_maps_points_like_the_displacement_field(tumor_run):
    completed, output, fixed, _ = tumor_run
    assert completed.returncode == 0, completed.stderr
    field, field_grid = read_image(output / "displacement.nrrd")  # (Z, Y, X, 3), RAS components
    assert field.shape[-1] == 3
    _, fixed_grid = read_image(fixed)
    assert field_grid.same_geometry(fixed_grid, tol_mm=1e-3)
    transform = sitk.ReadTransform(str(output / "transform.h5"))
    points = fixed_grid.world_points()
    rng = np.random.default_rng(0)
    for flat in rng.choice(field[..., 0].size, size=40, replace=False):
        index = np.unravel_index(flat, field.shape[:3])
        x = points[index]
        mapped = np.array(transform.TransformPoint(tuple(x * FLIP))) * FLIP  # LPS file, RAS here
        np.testing.assert_allclose(mapped - x, field[index], atol=1e-3)


def test_tumor_hardened_transform_reproduces_warped(tumor_run, tmp_path):
    """Moving volume under transform.h5 in a fresh scene, hardened: it is the moving image warped by the field.

    Slicer resamples onto its own (grown) grid, so the check is done twice: on Slicer's grid against
    ``moving(T(y))`` computed here (one interpolation each side: tight), and back on the fixed
    grid against warped.nrrd (two interpolations in a row at 5 mm: loose, but far below what the
    opposite sign of the field gives).
    """
    completed, output, fixed, moving = tumor_run
    assert completed.returncode == 0, completed.stderr
    warped, fixed_grid = read_image(output / "warped.nrrd")
    field, _ = read_image(output / "displacement.nrrd")
    moving_array, moving_grid = read_image(moving)
    moving_array = moving_array.astype(np.float32)
    scale = float(np.abs(moving_array).max())
    with HeadlessSlicer(tmp_path / "cache") as app:
        moving_node = app.loadVolume(moving)
        transform_node = app.loadTransform(output / "transform.h5")
        moving_node.SetAndObserveTransformNodeID(transform_node.GetID())
        assert slicer.vtkSlicerTransformLogic.hardenTransform(moving_node)
        assert moving_node.GetParentTransformNode() is None
        hardened, hardened_grid = mrml.arrayFromVolumeNode(moving_node)
        # T(y) for every voxel y of Slicer's grid, by the transform node itself (it interpolates
        # the field cubically between the fixed grid's voxel centres)
        points = hardened_grid.world_points()
        mapped = transform_points(transform_node.GetTransformFromParent(), points.reshape(-1, 3)).reshape(points.shape)

    # 1. On Slicer's grid, where the fixed grid (and so the field) is defined: hardened = moving(T(y))
    ijk = (points.reshape(-1, 3) @ fixed_grid.ras_to_ijk[:3, :3].T + fixed_grid.ras_to_ijk[:3, 3]).reshape(points.shape)
    covered = np.all((ijk >= 1) & (ijk <= np.array(fixed_grid.size_ijk) - 2), axis=-1)
    expected = resample_image(moving_array, moving_grid, hardened_grid, (mapped - points).astype(np.float32))
    assert covered.sum() > 10000
    difference = np.abs(hardened - expected)[covered]
    assert np.percentile(difference, 99) < 0.01 * scale, np.percentile(difference, 99)

    # 2. Back on the fixed grid, against warped.nrrd
    back_on_fixed = resample_image(hardened, hardened_grid, fixed_grid)
    inside = np.zeros(fixed_grid.shape, bool)
    inside[2:-2, 2:-2, 2:-2] = True
    error = np.abs(back_on_fixed - warped)[inside].mean()
    opposite = resample_image(moving_array, moving_grid, fixed_grid, -field.astype(np.float32))
    error_if_sign_flipped = np.abs(opposite - warped)[inside].mean()
    assert error < 0.05 * scale
    assert error < 0.5 * error_if_sign_flipped


def test_tumor_scene_mrb_has_every_node(tumor_run, tmp_path):
    completed, output, _, _ = tumor_run
    assert completed.returncode == 0, completed.stderr
    with HeadlessSlicer(tmp_path / "cache") as app:
        app.loadScene(output / "scene.mrb")
        scene = app.scene
        names = {scene.GetNthNode(i).GetName(): scene.GetNthNode(i).GetClassName() for i in range(scene.GetNumberOfNodes())}
        assert names["fixed"] == "vtkMRMLScalarVolumeNode" and names["moving"] == "vtkMRMLScalarVolumeNode"
        for suffix, class_name in [
            ("warped", "vtkMRMLScalarVolumeNode"),
            ("displacement", "vtkMRMLVectorVolumeNode"),
            ("transform", "vtkMRMLGridTransformNode"),
            ("checkerboard", "vtkMRMLScalarVolumeNode"),
            ("difference", "vtkMRMLScalarVolumeNode"),
            ("Jacobian determinant", "vtkMRMLScalarVolumeNode"),
            ("lambda map", "vtkMRMLScalarVolumeNode"),
        ]:
            assert names.get(f"moving {suffix}") == class_name, suffix
        transform = scene.GetFirstNodeByName("moving transform")
        metrics = json.loads(transform.GetAttribute("LearnedRegistration.metrics"))
        assert metrics["lambda"] == pytest.approx(0.3)
        field, _ = mrml.displacementFromGridTransformNode(transform)
        vectors = slicer.util.arrayFromVolume(scene.GetFirstNodeByName("moving displacement"))
        np.testing.assert_allclose(field, vectors, atol=1e-4)


def test_builtin_demo_reports_error_against_the_known_field(tmp_path, capsys):
    output = tmp_path / "demo"
    status = main(["register", "--output-dir", str(output), "--demo-size", "32", *FAST])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert EXPECTED_FILES | {"warped_labels.nrrd", "true_displacement.nrrd"} == {p.name for p in output.iterdir()}
    metrics = json.loads((output / "metrics.json").read_text())
    for key in ("displacement_error_mean_mm", "displacement_error_p95_mm", "true_displacement_mean_mm",
                "dice_mean", "dice_mean_initial", "hd95_mean_mm", "folding_percent", "sdlogj"):
        assert isinstance(metrics[key], float) and np.isfinite(metrics[key]), key
    assert metrics["displacement_error_p95_mm"] >= metrics["displacement_error_mean_mm"] > 0
    assert metrics["true_displacement_mean_mm"] > 0.3  # the demo does deform the moving image
    assert set(metrics["dice_per_label"]) == {"1", "2", "3", "4", "5", "6"}
    assert metrics["folding_percent"] < 1.0

    # the demo is reproducible, the written truth is the generated one, and the reported error is
    # the one between the written fields over the phantom's foreground
    pair = make_demo_pair(size=32, seed=0)
    true, true_grid = read_image(output / "true_displacement.nrrd")
    estimated, grid = read_image(output / "displacement.nrrd")
    assert grid.same_geometry(pair.fixed_grid) and true_grid.same_geometry(pair.fixed_grid)
    np.testing.assert_allclose(true, pair.true_displacement_ras, atol=1e-6)
    recomputed = displacement_error(estimated, true, pair.fixed_labels > 0)
    for key, value in recomputed.items():
        assert metrics[key] == pytest.approx(value, rel=1e-5), key
    # and the estimate points the right way (a sign or frame error would make this fail)
    assert recomputed["displacement_error_mean_mm"] < displacement_error(-estimated, true, pair.fixed_labels > 0)[
        "displacement_error_mean_mm"
    ]
    warped_labels, _ = read_image(output / "warped_labels.nrrd")
    assert set(np.unique(warped_labels)) <= {0, 1, 2, 3, 4, 5, 6}


def test_labels_json_restricts_dice_to_its_labels(tmp_path, capsys):
    labels_json = tmp_path / "labels.json"
    labels_json.write_text(json.dumps({"some_labels": [3, 4], "other": [1]}))
    output = tmp_path / "demo"
    status = main(["register", "--output-dir", str(output), "--demo-size", "24", "--labels-json", str(labels_json),
                   "--labels-key", "some_labels", *FAST])
    assert status == 0, capsys.readouterr().err
    metrics = json.loads((output / "metrics.json").read_text())
    assert set(metrics["dice_per_label"]) == {"3", "4"}
    assert metrics["dice_mean"] == pytest.approx(np.mean(list(metrics["dice_per_label"].values())))


def test_existing_output_folder_is_updated_and_other_files_kept(tmp_path, capsys):
    output = tmp_path / "out"
    output.mkdir()
    (output / "notes.txt").write_text("keep me")
    (output / "metrics.json").write_text("old")
    status = main(["register", "--output-dir", str(output), "--demo-size", "20", *FAST])
    assert status == 0, capsys.readouterr().err
    assert (output / "notes.txt").read_text() == "keep me"
    assert json.loads((output / "metrics.json").read_text())["lambda"] > 0
    assert set(OUTPUT_FILES.values()) <= {p.name for p in output.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_path_sweep_reuses_one_run_and_times_each_update(tmp_path):
    """The default method is the λ path: a --lambda-sweep is one registration and a prediction per λ,
    each row with the seconds that λ took to update every output (update_s)."""
    out = tmp_path / "path"
    status = main(["register", "--output-dir", str(out), "--demo-size", "32", "--lambda-sweep", "0.1,0.5,0.9",
                   "--iteration-scale", "0.2", "--quiet"])
    assert status == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "path" and metrics["spatially_varying"] is False
    sweep = json.loads((out / "lambda_sweep.json").read_text())
    assert [r["lambda"] for r in sweep] == [0.1, 0.5, 0.9]
    # a prediction per λ, far quicker than the registration itself
    assert all(0.0 < r["update_s"] < metrics["runtime_s"] + 5.0 for r in sweep)
    assert sweep[0]["sdlogj"] > sweep[-1]["sdlogj"]  # smoother as λ rises


def test_spatially_varying_flag_learns_a_lambda_map(tmp_path):
    out = tmp_path / "varying"
    assert main(["register", "--output-dir", str(out), "--demo-size", "32", "--lambda", "0.4", "--spatially-varying",
                 "--iteration-scale", "0.5", "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["spatially_varying"] is True
    assert metrics["runtime_s"] > 0.2  # the run's time (seconds), not its first λ's evaluation (0.01 s)
    image = sitk.ReadImage(str(out / "lambda_map.nrrd"))
    values = sitk.GetArrayFromImage(image)
    assert values.std() > 1e-3 and 0.0 < values.min() and values.max() < 2 * 0.4  # λ · λ(x) / mode, λ(x) in (0, 1)
