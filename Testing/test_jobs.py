"""The panel's background jobs for real: child Python processes running registrations on the small
brain-tumour pair (Slicer's MRBrainTumor1/2 at 5 mm), compared with the same work done in-process.

What the Slicer panel relies on: progress arrives while the child works, the result equals the
in-process one, Cancel stops the child within 2 s, nothing is left behind (files or processes), an
exception in the child arrives as one readable message, a network session crosses over so that the
λ slider works afterwards, and preparing and writing a job never loads torch in the parent.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from LearnedRegistrationLib.bridge import jobs
from LearnedRegistrationLib.bridge.compute import computeSweep
from LearnedRegistrationLib.bridge.logic import RegistrationLogic
from LearnedRegistrationLib.bridge.tasks import ProcessTask, ProcessTaskError, TaskState

from conftest import process_alive

PAIR = ("mrbraintumor_5mm/MRBrainTumor1.nii.gz", "mrbraintumor_5mm/MRBrainTumor2.nii.gz")
WAIT_S = 300.0


@pytest.fixture
def tumour(slicer_app, data_file):
    fixed = slicer_app.loadVolume(data_file(PAIR[0]), "MRBrainTumor1")
    moving = slicer_app.loadVolume(data_file(PAIR[1]), "MRBrainTumor2")
    return slicer_app, fixed, moving


def _run(task, timeout=WAIT_S):
    """Poll like the panel's timer until the task ends; returns the progress updates seen."""
    updates, deadline = [], time.monotonic() + timeout
    task.start()
    while not task.finished:
        assert time.monotonic() < deadline, "the job did not finish in time"
        updates += task.poll()
        time.sleep(0.02)
    return updates + task.poll()


def test_process_job_reports_progress_and_equals_the_in_process_result(tumour):
    app, fixed, moving = tumour
    logic = RegistrationLogic()
    request = logic.prepareRegistration(fixed, moving, iterationScale=0.3, device="cpu")
    task = jobs.startJob(request)
    assert isinstance(task, ProcessTask)
    updates = _run(task)
    assert task.state is TaskState.SUCCEEDED, task.exception
    assert len(updates) >= 3 and updates[-1].fraction == pytest.approx(1.0)
    assert all(0.0 <= u.fraction <= 1.0 for u in updates)
    assert not task.folder.exists() and not process_alive(task.pid)

    fromProcess = task.result()
    inProcess = logic.computeRegistration(request)
    for name in ("warped", "displacement_ras", "jacobian", "lambda_map"):
        np.testing.assert_allclose(getattr(fromProcess.result, name), getattr(inProcess.result, name), atol=1e-5, err_msg=name)
    np.testing.assert_allclose(fromProcess.checkerboard, inProcess.checkerboard, atol=1e-6)
    for key in ("folding_percent", "sdlogj", "lambda"):
        assert fromProcess.metrics[key] == pytest.approx(inProcess.metrics[key], abs=1e-6)

    nodesBefore = app.scene.GetNumberOfNodes()
    outputs = logic.writeOutputs(request, fromProcess)  # what the panel does with it, on the main thread
    assert app.scene.GetNumberOfNodes() > nodesBefore and outputs.warpedVolumeNode is not None


def test_cancel_stops_the_child_within_two_seconds_and_leaves_nothing(tumour):
    _, fixed, moving = tumour
    request = RegistrationLogic().prepareRegistration(fixed, moving, iterationScale=4.0, device="cpu")
    task = jobs.startJob(request).start()
    deadline = time.monotonic() + WAIT_S
    while not any(u.fraction > 0 for u in task.poll()):  # wait until it is registering, not importing
        assert time.monotonic() < deadline and not task.finished
        time.sleep(0.05)
    start = time.monotonic()
    task.cancel()
    while not task.finished:
        task.poll()
        time.sleep(0.02)
    assert time.monotonic() - start < 2.0
    assert task.state is TaskState.CANCELLED
    assert not process_alive(task.pid) and not task.folder.exists()


def test_an_exception_in_the_child_arrives_as_one_readable_message(tumour):
    app, fixed, moving = tumour
    far = app.loadVolume(moving.GetStorageNode().GetFileName(), "far away")
    far.SetOrigin(5000.0, 0.0, 0.0)  # no overlap after initialization: the engine refuses in the child
    request = RegistrationLogic().prepareRegistration(fixed, far, initialization="none", device="cpu")
    task = jobs.startJob(request)
    _run(task)
    assert task.state is TaskState.FAILED
    error = task.exception
    assert isinstance(error, ProcessTaskError) and error.error_type == "ValueError"
    assert str(error).startswith("the moving image does not overlap the fixed image") and "\n" not in str(error)
    assert "Traceback" in error.details  # the child's traceback, for the log
    assert not task.folder.exists()


def test_network_session_crosses_over_for_the_lambda_slider(tumour):
    """After a network job the parent holds the pair's session (no encoder run in the parent), and a λ
    change there gives what the child's session would have given."""
    app, fixed, moving = tumour
    logic = RegistrationLogic()
    request = logic.prepareRegistration(fixed, moving, method="network", iterationScale=0.3, device="cpu")
    task = jobs.startJob(request, networks=logic._networks)
    _run(task)
    assert task.state is TaskState.SUCCEEDED, task.exception
    computed = task.result()
    assert computed.session is not None
    outputs = logic.writeOutputs(request, computed)
    assert logic.canSetRegularizationInstantly()

    reference = logic.computeRegistration(request).session  # the same session, computed in-process
    for lam in (0.1, 0.6):
        np.testing.assert_allclose(computed.session.predict(lam).displacement_ras, reference.predict(lam).displacement_ras,
                                   atol=1e-4)
    updated = logic.setRegularization(0.6)
    assert updated.warpedVolumeNode is outputs.warpedVolumeNode and updated.metrics["lambda"] == pytest.approx(0.6)


def test_sweep_job_gives_the_in_process_metrics(tumour):
    _, fixed, moving = tumour
    logic = RegistrationLogic()
    request = logic.prepareRegistration(fixed, moving, iterationScale=0.2, device="cpu")
    task = jobs.startJob(request, "sweep", [0.1, 0.8])
    updates = _run(task)
    assert task.state is TaskState.SUCCEEDED, task.exception
    rows = task.result()
    assert [r["lambda"] for r in rows] == [0.1, 0.8]
    assert any("λ = 0.80" in u.message for u in updates)
    expected = computeSweep(request, [0.1, 0.8])
    for row, reference in zip(rows, expected):
        assert row["sdlogj"] == pytest.approx(reference["sdlogj"], abs=1e-6)
    assert rows[1]["sdlogj"] < rows[0]["sdlogj"]  # smoother at the larger λ


def test_job_kinds_and_backends_are_checked(tumour):
    _, fixed, moving = tumour
    request = RegistrationLogic().prepareRegistration(fixed, moving)
    with pytest.raises(ValueError, match="job kind"):
        jobs.startJob(request, "path")
    with pytest.raises(ValueError, match="λ values"):
        jobs.startJob(request, "sweep", [])
    with pytest.raises(ValueError, match="backend"):
        jobs.startJob(request, backend="thread")


def test_preparing_and_writing_a_job_never_loads_torch(tmp_path, data_file):
    """The panel's main thread: prepare a request, write the job, read back an optimizer result and
    write it into nodes, all without importing torch (checked in a fresh interpreter). (A λ-path
    result brings the path into memory for the slider, and with it torch: the one computation
    the main thread does is a λ update.)"""
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from LearnedRegistrationLib.app.headless import HeadlessSlicer
        from LearnedRegistrationLib.bridge import jobs
        from LearnedRegistrationLib.bridge.logic import RegistrationLogic
        with HeadlessSlicer() as app:
            fixed = app.loadVolume({str(data_file(PAIR[0]))!r})
            moving = app.loadVolume({str(data_file(PAIR[1]))!r})
            logic = RegistrationLogic()
            request = logic.prepareRegistration(fixed, moving, method="optimize", iterationScale=0.1, device="cpu")
            task = jobs.startJob(request, python=sys.executable)
            task.start()
            assert task.wait(300), "timeout"
            computed = task.result()
            logic.writeOutputs(request, computed)
            print("torch imported:", "torch" in sys.modules)
    """)
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr
    assert "torch imported: False" in completed.stdout


def test_request_and_result_files_round_trip(tumour, tmp_path):
    _, fixed, moving = tumour
    logic = RegistrationLogic()
    request = logic.prepareRegistration(fixed, moving, iterationScale=0.1, evaluationLabels=[1, 2], device="cpu")
    jobs.saveRequest(tmp_path, request)
    again = jobs.loadRequest(tmp_path)
    np.testing.assert_array_equal(again.fixed, request.fixed)
    assert again.fixedGrid.same_geometry(request.fixedGrid, tol_mm=0.0) and again.movingGrid.same_geometry(request.movingGrid, 0.0)
    assert again.options == request.options and again.evaluationLabels == [1, 2] and again.scene is None
    computed = logic.computeRegistration(request)
    jobs.saveComputed(tmp_path / "result", computed)
    loaded = jobs.loadComputed(tmp_path / "result", request)
    np.testing.assert_array_equal(loaded.result.displacement_ras, computed.result.displacement_ras)
    assert json.loads(json.dumps(loaded.metrics)) == loaded.metrics and loaded.metrics["sdlogj"] == computed.metrics["sdlogj"]
