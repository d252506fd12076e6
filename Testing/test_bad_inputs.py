"""Bad inputs give one clear error (exit status 2 on the command line) and leave nothing half-written.

Command-line cases run ``main()`` in-process and check: the status, a one-line message naming the
problem, no traceback, no output folder and no staging folder left next to it. Logic cases check
that the MRML scene is exactly as before.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from LearnedRegistrationLib.app.cli import EXIT_INTERRUPTED, EXIT_USER_ERROR, main
from LearnedRegistrationLib.bridge import mrml
from LearnedRegistrationLib.bridge.logic import RegistrationLogic
from LearnedRegistrationLib.engine.common import RegistrationCancelled
from LearnedRegistrationLib.engine.grid import ImageGrid

FAST = ["--iteration-scale", "0.05", "--quiet"]


def blob(shape=(20, 22, 24), centre=None) -> np.ndarray:
    """A smooth bright blob, float32 (Z, Y, X)."""
    z, y, x = np.indices(shape, dtype=np.float32)
    c = np.array(centre if centre is not None else [(s - 1) / 2 for s in shape], dtype=np.float32)
    r2 = ((z - c[0]) / 5.0) ** 2 + ((y - c[1]) / 6.0) ** 2 + ((x - c[2]) / 7.0) ** 2
    return (100.0 * np.exp(-r2) + 10.0 * np.exp(-r2 / 4)).astype(np.float32)


def write_image(path: Path, array: np.ndarray, spacing=(2.0, 2.0, 2.0), origin=(0.0, 0.0, 0.0)) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing[: array.ndim])
    image.SetOrigin(origin[: array.ndim])
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture
def good_pair(tmp_path):
    fixed = write_image(tmp_path / "fixed.nrrd", blob())
    moving = write_image(tmp_path / "moving.nrrd", blob(centre=(10, 11, 12.5)))
    return fixed, moving


def run_failing(argv, capsys, output: Path, message: str) -> str:
    """Run main(argv), expect exit status 2 with ``message`` in one stderr line and nothing written."""
    status = main(argv)
    captured = capsys.readouterr()
    assert status == EXIT_USER_ERROR, captured.err
    lines = [line for line in captured.err.splitlines() if line.startswith("learnedreg: error:")]
    assert len(lines) == 1, captured.err
    assert message.lower() in lines[0].lower(), lines[0]
    assert "Traceback" not in captured.err
    assert not output.exists()
    parent = output.parent
    if parent.is_dir():
        assert not [p for p in parent.iterdir() if "learnedreg-" in p.name], list(parent.iterdir())
    return lines[0]


# ------------------------------------------------------------------------------------------ command line
def test_2d_image_is_refused(tmp_path, good_pair, capsys):
    flat = write_image(tmp_path / "slice.nrrd", blob()[10])
    output = tmp_path / "out"
    run_failing(["register", "--fixed", str(flat), "--moving", str(good_pair[1]), "--output-dir", str(output), *FAST],
                capsys, output, "3D")


def test_all_zero_volume_is_refused(tmp_path, good_pair, capsys):
    zeros = write_image(tmp_path / "zeros.nrrd", np.zeros((20, 22, 24), np.float32))
    output = tmp_path / "out"
    run_failing(["register", "--fixed", str(good_pair[0]), "--moving", str(zeros), "--output-dir", str(output), *FAST],
                capsys, output, "empty")


def test_nan_volume_is_refused(tmp_path, good_pair, capsys):
    array = blob()
    array[5, 5, 5] = np.nan
    nan_image = write_image(tmp_path / "nan.nrrd", array)
    output = tmp_path / "out"
    run_failing(["register", "--fixed", str(nan_image), "--moving", str(good_pair[1]), "--output-dir", str(output), *FAST],
                capsys, output, "NaN")


def test_label_map_with_other_geometry_is_refused(tmp_path, good_pair, capsys):
    labels = write_image(tmp_path / "labels.nrrd", (blob((20, 22, 25)) > 50).astype(np.uint8))
    same = write_image(tmp_path / "moving_labels.nrrd", (blob() > 50).astype(np.uint8))
    output = tmp_path / "out"
    line = run_failing(
        ["register", "--fixed", str(good_pair[0]), "--moving", str(good_pair[1]), "--fixed-labels", str(labels),
         "--moving-labels", str(same), "--output-dir", str(output), *FAST],
        capsys, output, "does not have the geometry",
    )
    assert "resample" in line  # says how to fix it


def test_no_overlap_after_initialization_is_refused(tmp_path, good_pair, capsys):
    far = write_image(tmp_path / "far.nrrd", blob(), origin=(5000.0, 0.0, 0.0))
    output = tmp_path / "out"
    run_failing(["register", "--fixed", str(good_pair[0]), "--moving", str(far), "--output-dir", str(output),
                 "--initialization", "none", *FAST], capsys, output, "does not overlap")


@pytest.mark.parametrize("where", ["under_a_file", "proc"])
def test_unwritable_output_folder_is_refused_before_computing(tmp_path, good_pair, capsys, monkeypatch, where):
    # Tests may run as root, for whom permissions do not block writing: use places nobody can write.
    if where == "under_a_file":
        blocker = tmp_path / "a_file"
        blocker.write_text("not a folder")
        output = blocker / "out"
    else:
        output = Path("/proc/learnedreg-test-output")
    computed = []
    monkeypatch.setattr(RegistrationLogic, "computeRegistration", lambda *a, **k: computed.append(1))
    status = main(["register", "--fixed", str(good_pair[0]), "--moving", str(good_pair[1]), "--output-dir", str(output), *FAST])
    captured = capsys.readouterr()
    assert status == EXIT_USER_ERROR
    assert "cannot write" in captured.err and "Traceback" not in captured.err
    assert computed == []  # refused before any computation
    assert not output.exists()


def test_output_path_that_is_a_file_is_refused(tmp_path, good_pair, capsys):
    output = tmp_path / "result"
    output.write_text("a file")
    status = main(["register", "--fixed", str(good_pair[0]), "--moving", str(good_pair[1]), "--output-dir", str(output), *FAST])
    assert status == EXIT_USER_ERROR
    assert "not a folder" in capsys.readouterr().err
    assert output.read_text() == "a file"


def test_missing_file_and_bad_options_are_refused(tmp_path, good_pair, capsys):
    output = tmp_path / "out"
    run_failing(["register", "--fixed", str(tmp_path / "nope.nrrd"), "--moving", str(good_pair[1]),
                 "--output-dir", str(output), *FAST], capsys, output, "not found")
    run_failing(["register", "--fixed", str(good_pair[0]), "--moving", str(good_pair[1]), "--output-dir", str(output),
                 "--lambda", "1.5", *FAST], capsys, output, "[0, 1]")
    run_failing(["register", "--fixed", str(good_pair[0]), "--output-dir", str(output), *FAST],
                capsys, output, "both --fixed and --moving")
    run_failing(["register", "--output-dir", str(output), "--eval-labels", "2,x", *FAST], capsys, output, "integers")
    labels_json = tmp_path / "labels.json"
    labels_json.write_text(json.dumps({"a": [1, 2]}))
    run_failing(["register", "--output-dir", str(output), "--labels-json", str(labels_json), "--labels-key", "b", *FAST],
                capsys, output, "no key 'b'")


def test_ctrl_c_leaves_nothing_written(tmp_path, good_pair, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(RegistrationLogic, "writeOutputs", interrupted)
    output = tmp_path / "out"
    status = main(["register", "--fixed", str(good_pair[0]), "--moving", str(good_pair[1]), "--output-dir", str(output), *FAST])
    assert status == EXIT_INTERRUPTED
    assert "interrupted" in capsys.readouterr().err
    assert not output.exists()
    assert {p.name for p in tmp_path.iterdir()} == {"fixed.nrrd", "moving.nrrd"}  # no staging folder left


# ------------------------------------------------------------------------------------------ logic
def scene_state(scene) -> dict:
    return {scene.GetNthNode(i).GetID(): scene.GetNthNode(i).GetMTime() for i in range(scene.GetNumberOfNodes())}


def add_pair(scene):
    grid = ImageGrid((20, 22, 24), (2.0, 2.0, 2.0), np.zeros(3), np.eye(3))
    fixed = mrml.updateVolumeNodeFromArray(scene, blob(), grid, name="fixed")
    moving = mrml.updateVolumeNodeFromArray(scene, blob(centre=(10, 11, 12.5)), grid, name="moving")
    return fixed, moving, grid


def test_cancel_during_optimization_leaves_the_scene_unchanged(slicer_app):
    scene = slicer_app.scene
    fixed, moving, _ = add_pair(scene)
    logic = RegistrationLogic()
    first = logic.register(fixed, moving, iterationScale=0.05)  # outputs to be updated in place
    warped_before = mrml.arrayFromVolumeNode(first.warpedVolumeNode)[0]
    state = scene_state(scene)

    calls = []

    def progress(fraction, message):
        calls.append(fraction)

    def cancel_after_a_few_iterations():
        return len(calls) >= 3

    with pytest.raises(RegistrationCancelled):
        logic.register(fixed, moving, outputNodes=first, iterationScale=0.2, regularizationWeight=0.9,
                       progressCallback=progress, cancelRequested=cancel_after_a_few_iterations)
    assert 3 <= len(calls) < 10  # it stopped early, during the optimization
    assert scene_state(scene) == state  # no node added, removed or modified
    np.testing.assert_array_equal(mrml.arrayFromVolumeNode(first.warpedVolumeNode)[0], warped_before)


def test_cancel_during_the_lambda_paths_knots_leaves_the_scene_and_the_slider_unchanged(slicer_app):
    scene = slicer_app.scene
    fixed, moving, _ = add_pair(scene)
    logic = RegistrationLogic()
    first = logic.register(fixed, moving, method="path", iterationScale=0.1)
    session = logic.instantSession()
    warped_before = mrml.arrayFromVolumeNode(first.warpedVolumeNode)[0]
    state = scene_state(scene)
    messages = []

    def cancel_in_the_continuation():  # after the reference knot, while the other knots are optimized
        return any(m.startswith("λ = ") for m in messages)

    with pytest.raises(RegistrationCancelled):
        logic.register(fixed, moving, method="path", outputNodes=first, iterationScale=0.1, regularizationWeight=0.6,
                       progressCallback=lambda f, m: messages.append(m), cancelRequested=cancel_in_the_continuation)
    assert scene_state(scene) == state
    np.testing.assert_array_equal(mrml.arrayFromVolumeNode(first.warpedVolumeNode)[0], warped_before)
    assert logic.instantSession() is session  # the slider still follows the previous registration
    assert logic.setRegularization(0.4).warpedVolumeNode is first.warpedVolumeNode


def test_logic_reports_missing_nodes_and_mismatched_labels(slicer_app):
    scene = slicer_app.scene
    fixed, moving, grid = add_pair(scene)
    logic = RegistrationLogic()
    state = scene_state(scene)
    with pytest.raises(ValueError, match="fixed volume"):
        logic.prepareRegistration(None, moving)
    with pytest.raises(ValueError, match="moving volume"):
        logic.prepareRegistration(fixed, None)
    other_grid = ImageGrid((20, 22, 24), (2.0, 2.0, 2.5), np.zeros(3), np.eye(3))
    labels = mrml.updateVolumeNodeFromArray(
        scene, np.ones(other_grid.shape, np.int16), other_grid, name="labels", className="vtkMRMLLabelMapVolumeNode"
    )
    good_labels = mrml.updateVolumeNodeFromArray(
        scene, np.ones(grid.shape, np.int16), grid, name="good labels", className="vtkMRMLLabelMapVolumeNode"
    )
    with pytest.raises(ValueError, match="'labels'.*geometry of the fixed volume 'fixed'"):
        logic.prepareRegistration(fixed, moving, fixedLabelNode=labels, movingLabelNode=good_labels)
    with pytest.raises(ValueError, match="both fixed and moving labels"):
        logic.prepareRegistration(fixed, moving, fixedLabelNode=good_labels)
    with pytest.raises(ValueError, match="geometry"):
        logic.prepareRegistration(fixed, moving, fixedMaskNode=labels)
    empty_mask = mrml.updateVolumeNodeFromArray(
        scene, np.zeros(grid.shape, np.int16), grid, name="empty", className="vtkMRMLLabelMapVolumeNode"
    )
    with pytest.raises(ValueError, match="empty"):
        logic.prepareRegistration(fixed, moving, fixedMaskNode=empty_mask)
    fixed_points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "f")
    moving_points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "m")
    fixed_points.AddControlPoint(1.0, 2.0, 3.0)
    with pytest.raises(ValueError, match="same, non-zero number"):
        logic.prepareRegistration(fixed, moving, fixedLandmarksNode=fixed_points, movingLandmarksNode=moving_points)
    with pytest.raises(ValueError, match="similarity"):
        logic.prepareRegistration(fixed, moving, similarity="cosine")
    # only the nodes this test added; the failed calls added nothing
    added = set(scene_state(scene)) - set(state)
    assert {scene.GetNodeByID(i).GetName() for i in added if scene.GetNodeByID(i).IsA("vtkMRMLStorableNode")} == {
        "labels", "good labels", "empty", "f", "m"
    }
