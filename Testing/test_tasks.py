"""Tests for the Qt-free task plumbing the Slicer panel relies on (LearnedRegistrationLib.bridge.tasks)."""

import os
import sys
import threading
import time

import pytest

from LearnedRegistrationLib.bridge.tasks import (
    LatestRequestDebouncer,
    ProcessTask,
    ProcessTaskError,
    ProgressUpdate,
    SynchronousTask,
    TaskCancelled,
    TaskState,
    scaled_progress,
)

from conftest import process_alive

WAIT_S = 30.0  # generous upper bound; every test finishes in well under a second when it passes


class FakeClock:
    """A clock the test advances by hand."""

    def __init__(self, now=100.0):
        self.now = now

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


class StopByCancel(RuntimeError):
    """Stands in for the engine's RegistrationCancelled."""


# --- LatestRequestDebouncer ---------------------------------------------------------------------


def test_debouncer_waits_for_quiet_period():
    clock = FakeClock()
    debouncer = LatestRequestDebouncer(0.3, clock=clock)
    debouncer.submit("a")
    assert debouncer.poll() is None  # 0 s after submit
    clock.advance(0.29)
    assert debouncer.poll() is None
    clock.advance(0.02)
    assert debouncer.poll() == "a"
    assert not debouncer.has_pending
    assert debouncer.poll() is None  # released once only


def test_debouncer_burst_releases_only_latest_and_restarts_quiet_period():
    clock = FakeClock()
    debouncer = LatestRequestDebouncer(0.3, clock=clock)
    for value in (0.1, 0.2, 0.3, 0.4):
        debouncer.submit(value)
        clock.advance(0.2)  # a slider drag: each move comes before the quiet period ends
        assert debouncer.poll() is None
    clock.advance(0.1)
    assert debouncer.poll() == 0.4
    assert debouncer.dropped_count == 3


def test_debouncer_latest_wins_while_busy():
    clock = FakeClock()
    debouncer = LatestRequestDebouncer(0.3, clock=clock)
    debouncer.submit("first")
    clock.advance(1.0)
    assert debouncer.poll(busy=False) == "first"  # run of "first" starts
    debouncer.submit("second")
    clock.advance(1.0)
    debouncer.submit("third")  # supersedes "second" while "first" runs
    clock.advance(1.0)
    assert debouncer.poll(busy=True) is None  # never released while a run is in progress
    assert debouncer.pending == "third"
    assert debouncer.poll(busy=False) == "third"  # run finished: newest is next
    assert debouncer.dropped_count == 1
    assert debouncer.poll(busy=False) is None  # "second" is gone for good


def test_debouncer_zero_delay_clear_and_bad_delay():
    clock = FakeClock()
    debouncer = LatestRequestDebouncer(0.0, clock=clock)
    debouncer.submit(None)  # None is a legitimate request value
    assert debouncer.has_pending
    debouncer.clear()
    assert debouncer.poll() is None
    debouncer.submit(0)
    assert debouncer.poll() == 0
    with pytest.raises(ValueError, match="delay_s"):
        LatestRequestDebouncer(-1.0)


# --- BackgroundTask -----------------------------------------------------------------------------


# --- SynchronousTask ------------------------------------------------------------------------------


def test_synchronous_task_runs_in_start_and_reports_progress():
    seen = {}

    def work(progress, cancelled):
        seen["thread"] = threading.current_thread()
        for i in range(1, 5):
            progress(i / 4, f"step {i}")
        return 42

    task = SynchronousTask(work, name="ok")
    assert task.state is TaskState.PENDING
    task.start()
    assert seen["thread"] is threading.current_thread()  # scripts and tests: no thread at all
    assert task.state is TaskState.SUCCEEDED and task.finished and task.wait(0)
    assert task.result() == 42
    updates = task.poll()
    assert [u.message for u in updates] == ["step 1", "step 2", "step 3", "step 4"]
    assert [u.fraction for u in updates] == [0.25, 0.5, 0.75, 1.0]
    assert task.poll() == []  # drained
    assert task.latest_progress == ProgressUpdate(1.0, "step 4")
    assert task.elapsed_s >= 0.0


def test_task_progress_is_clamped():
    def work(progress, cancelled):
        progress(-0.5, "below")
        progress(float("nan"), "nan")
        progress(7.0, "above")
        return "done"

    task = SynchronousTask(work).start()
    assert [u.fraction for u in task.poll()] == [0.0, 0.0, 1.0]
    assert task.result() == "done"


def test_cancel_before_start_stops_the_work_at_its_first_check():
    def work(progress, cancelled):
        if cancelled():
            raise StopByCancel("stopped at the user's request")
        return "ran"

    task = SynchronousTask(work, cancelled_exceptions=(StopByCancel,))
    task.cancel()
    assert task.cancel_was_requested
    task.start()
    assert task.state is TaskState.CANCELLED
    assert isinstance(task.exception, StopByCancel)
    with pytest.raises(TaskCancelled) as info:
        task.result()
    assert isinstance(info.value.__cause__, StopByCancel)


def test_task_that_returns_after_cancel_is_cancelled_not_succeeded():
    # The widget must not write outputs for a run the user cancelled, even if it finished anyway.
    def work(progress, cancelled):
        task.cancel()
        return "late result"

    task = SynchronousTask(work)
    task.start()
    assert task.state is TaskState.CANCELLED
    with pytest.raises(TaskCancelled):
        task.result()


def test_task_captures_exception_without_cancel():
    def work(progress, cancelled):
        progress(0.5, "half way")
        raise ValueError("fixed and moving volumes do not overlap")

    task = SynchronousTask(work, cancelled_exceptions=(StopByCancel,)).start()
    assert task.state is TaskState.FAILED
    assert isinstance(task.exception, ValueError)
    assert task.exception.__traceback__ is not None
    with pytest.raises(ValueError, match="do not overlap"):
        task.result()
    assert task.latest_progress.message == "half way"


def test_cancel_exception_without_cancel_request_is_a_failure():
    def work(progress, cancelled):
        raise StopByCancel("nobody asked")

    task = SynchronousTask(work, cancelled_exceptions=(StopByCancel,)).start()
    assert task.state is TaskState.FAILED


def test_task_misuse_raises():
    with pytest.raises(TypeError, match="callable"):
        SynchronousTask(42)
    task = SynchronousTask(lambda progress, cancelled: None)
    with pytest.raises(RuntimeError, match="never started"):
        task.wait(0)
    with pytest.raises(RuntimeError, match="has not finished"):
        task.result()
    task.start()
    with pytest.raises(RuntimeError, match="already started"):
        task.start()


# --- ProcessTask: the protocol, with small Python children (no torch) ----------------------------

#: A child that reports progress, prints a stray line, writes its result and says it is done.
CHILD_OK = """
import json, os, sys, time
for i in range(1, 4):
    print(json.dumps({"progress": i / 3, "message": f"step {i}"}), flush=True)
print("a library's stray line", flush=True)
os.mkdir("result")
open(os.path.join("result", "value.txt"), "w").write("42")
print(json.dumps({"done": True}), flush=True)
"""
#: A child whose work raises: one readable line on stdout, the traceback on stderr.
CHILD_ERROR = """
import json, sys
print(json.dumps({"progress": 0.1, "message": "starting"}), flush=True)
print("Traceback (most recent call last): ... ValueError", file=sys.stderr)
print(json.dumps({"error": "the moving image does not overlap the fixed image", "type": "ValueError"}), flush=True)
sys.exit(1)
"""
CHILD_CRASH = "import sys; print('Fatal Python error: Segmentation fault', file=sys.stderr); sys.exit(3)"
CHILD_SLOW = "import json, time\nprint(json.dumps({'progress': 0.0, 'message': 'working'}), flush=True)\ntime.sleep(60)"
CHILD_STUBBORN = ("import json, signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                  "print(json.dumps({'progress': 0.0, 'message': 'ignoring SIGTERM'}), flush=True)\ntime.sleep(60)")


def _process_task(tmp_path, script, grace_s=2.0):
    folder = tmp_path / "job"
    folder.mkdir()
    return ProcessTask([sys.executable, "-c", script], folder, lambda result: (result / "value.txt").read_text(),
                       name="test job", grace_s=grace_s)


def test_process_task_reads_progress_and_the_result_then_removes_its_folder(tmp_path):
    task = _process_task(tmp_path, CHILD_OK).start()
    assert task.state is TaskState.RUNNING and task.pid
    seen = []
    assert task.wait(WAIT_S)
    seen += task.poll()
    assert [u.message for u in seen] == ["step 1", "step 2", "step 3"]
    assert task.state is TaskState.SUCCEEDED and task.result() == "42"
    assert task.output_lines == ["a library's stray line"]
    assert not task.folder.exists()


def test_process_task_failure_is_the_childs_one_line_message(tmp_path):
    task = _process_task(tmp_path, CHILD_ERROR).start()
    assert task.wait(WAIT_S)
    assert task.state is TaskState.FAILED
    error = task.exception
    assert isinstance(error, ProcessTaskError)
    assert str(error) == "the moving image does not overlap the fixed image" and error.error_type == "ValueError"
    assert "Traceback" in error.details
    assert not task.folder.exists()


def test_process_task_that_dies_without_a_message_says_so(tmp_path):
    task = _process_task(tmp_path, CHILD_CRASH).start()
    assert task.wait(WAIT_S)
    assert task.state is TaskState.FAILED
    assert "ended unexpectedly (exit status 3)" in str(task.exception)
    assert "Segmentation fault" in str(task.exception)


def test_process_task_cancel_terminates_the_child_quickly(tmp_path):
    task = _process_task(tmp_path, CHILD_SLOW).start()
    while not task.poll():  # the child is working
        time.sleep(0.02)
    start = time.monotonic()
    task.cancel()
    assert task.wait(WAIT_S)
    assert time.monotonic() - start < 2.0
    assert task.state is TaskState.CANCELLED
    with pytest.raises(TaskCancelled):
        task.result()
    assert not process_alive(task.pid) and not task.folder.exists()


@pytest.mark.skipif(os.name == "nt", reason="POSIX signals")
def test_process_task_kills_a_child_that_ignores_terminate(tmp_path):
    task = _process_task(tmp_path, CHILD_STUBBORN, grace_s=0.5).start()
    while not task.poll():
        time.sleep(0.02)
    start = time.monotonic()
    task.stop()  # cancel, then wait: killed after the grace period
    assert task.finished and task.state is TaskState.CANCELLED
    assert 0.5 <= time.monotonic() - start < 5.0
    assert not process_alive(task.pid) and not task.folder.exists()


def test_process_task_that_cannot_start_fails_cleanly(tmp_path):
    folder = tmp_path / "job"
    folder.mkdir()
    task = ProcessTask([str(tmp_path / "no-such-python")], folder, lambda result: None).start()
    assert task.state is TaskState.FAILED and "could not start" in str(task.exception)
    assert not folder.exists()


# --- scaled_progress ----------------------------------------------------------------------------


def test_scaled_progress_maps_sub_range_and_prefixes():
    reports = []
    sub = scaled_progress(lambda f, m: reports.append((f, m)), 0.5, 0.75, prefix="λ=0.30: ")
    sub(0.0, "start")
    sub(1.0, "end")
    sub(2.0, "clamped")
    assert reports == [(0.5, "λ=0.30: start"), (0.75, "λ=0.30: end"), (0.75, "λ=0.30: clamped")]
    scaled_progress(None, 0.0, 1.0)(0.5, "no-op")  # no parent: no error
    with pytest.raises(ValueError, match="start"):
        scaled_progress(None, 0.8, 0.2)
