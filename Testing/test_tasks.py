"""Tests for the Qt-free task plumbing the Slicer panel relies on (LearnedRegistrationLib.bridge.tasks)."""

import threading

import pytest

from LearnedRegistrationLib.bridge.tasks import (
    BackgroundTask,
    LatestRequestDebouncer,
    ProgressUpdate,
    TaskCancelled,
    TaskState,
    scaled_progress,
)

WAIT_S = 10.0  # generous upper bound; every test finishes in milliseconds when it passes


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


def test_task_success_runs_in_other_thread_and_reports_progress():
    seen = {}

    def work(progress, cancelled):
        seen["thread"] = threading.current_thread()
        for i in range(1, 5):
            progress(i / 4, f"step {i}")
        return 42

    task = BackgroundTask(work, name="ok").start()
    assert task.wait(WAIT_S)
    assert seen["thread"] is not threading.current_thread()
    assert task.state is TaskState.SUCCEEDED and task.finished
    assert task.result() == 42
    updates = task.poll()
    assert [u.message for u in updates] == ["step 1", "step 2", "step 3", "step 4"]
    assert [u.fraction for u in updates] == [0.25, 0.5, 0.75, 1.0]
    assert task.poll() == []  # drained
    assert task.latest_progress == ProgressUpdate(1.0, "step 4")
    assert task.elapsed_s >= 0.0


def test_task_progress_is_polled_while_running_and_clamped():
    gate = threading.Event()
    reported = threading.Event()

    def work(progress, cancelled):
        progress(-0.5, "below")
        progress(float("nan"), "nan")
        progress(7.0, "above")
        reported.set()
        gate.wait(WAIT_S)
        return "done"

    task = BackgroundTask(work).start()
    assert reported.wait(WAIT_S)
    assert task.state is TaskState.RUNNING and not task.finished
    with pytest.raises(RuntimeError, match="has not finished"):
        task.result()
    assert [u.fraction for u in task.poll()] == [0.0, 0.0, 1.0]
    gate.set()
    assert task.wait(WAIT_S)
    assert task.result() == "done"


def test_task_cancel_sets_flag_and_ends_cancelled():
    started = threading.Event()

    def work(progress, cancelled):
        started.set()
        while not cancelled():
            threading.Event().wait(0.001)
        raise StopByCancel("stopped at the user's request")

    task = BackgroundTask(work, cancelled_exceptions=(StopByCancel,)).start()
    assert started.wait(WAIT_S)
    assert not task.cancel_was_requested
    task.cancel()
    assert task.cancel_was_requested
    assert task.wait(WAIT_S)
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

    task = BackgroundTask(work)
    task.start()
    assert task.wait(WAIT_S)
    assert task.state is TaskState.CANCELLED
    with pytest.raises(TaskCancelled):
        task.result()


def test_task_captures_exception_without_cancel():
    def work(progress, cancelled):
        progress(0.5, "half way")
        raise ValueError("fixed and moving volumes do not overlap")

    task = BackgroundTask(work, cancelled_exceptions=(StopByCancel,)).start()
    assert task.wait(WAIT_S)
    assert task.state is TaskState.FAILED
    assert isinstance(task.exception, ValueError)
    assert task.exception.__traceback__ is not None
    with pytest.raises(ValueError, match="do not overlap"):
        task.result()
    assert task.latest_progress.message == "half way"


def test_cancel_exception_without_cancel_request_is_a_failure():
    def work(progress, cancelled):
        raise StopByCancel("nobody asked")

    task = BackgroundTask(work, cancelled_exceptions=(StopByCancel,)).start()
    assert task.wait(WAIT_S)
    assert task.state is TaskState.FAILED


def test_task_misuse_raises():
    with pytest.raises(TypeError, match="callable"):
        BackgroundTask(42)
    task = BackgroundTask(lambda progress, cancelled: None)
    with pytest.raises(RuntimeError, match="never started"):
        task.wait(0)
    task.start()
    assert task.wait(WAIT_S)
    with pytest.raises(RuntimeError, match="already started"):
        task.start()


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
