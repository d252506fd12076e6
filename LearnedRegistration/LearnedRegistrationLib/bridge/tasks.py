"""Qt-free plumbing for long-running work started from the Slicer panel.

The panel never computes: it starts a :class:`Task` and polls it from the main thread (a
``qt.QTimer`` in the module widget). :class:`ProcessTask` runs the work in a child process (Slicer's
main thread keeps the Python GIL in the Qt event loop, so a Python thread there would barely run),
reading its progress from the child's output at each poll; :class:`SynchronousTask` runs it in
:meth:`Task.start` for scripts and tests. Which work, and how it crosses into the child, is in
:mod:`jobs`.

:class:`LatestRequestDebouncer` turns a burst of requests (a λ slider being dragged) into one run:
a request is released only after it has been left alone for ``delay_s`` seconds, and while a run is
in progress newer requests replace older ones, so the newest is the one run when the current run
finishes. Its clock is injectable, so tests drive it without sleeping.

Nothing here imports Qt, vtk, MRML or torch.
"""

from __future__ import annotations

import atexit
import enum
import json
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

__all__ = [
    "LatestRequestDebouncer",
    "ProcessTask",
    "ProcessTaskError",
    "ProgressUpdate",
    "SynchronousTask",
    "Task",
    "TaskCancelled",
    "TaskState",
    "scaled_progress",
]

ProgressCallback = Callable[[float, str], None]
CancelRequested = Callable[[], bool]
RequestT = TypeVar("RequestT")


class TaskCancelled(RuntimeError):
    """Raised by :meth:`Task.result` when the task ended because cancel was requested."""


class TaskState(enum.Enum):
    """Life cycle of a :class:`BackgroundTask`."""

    PENDING = "pending"  #: created, not started
    RUNNING = "running"  #: started, not finished
    SUCCEEDED = "succeeded"  #: the function returned and no cancel was requested
    FAILED = "failed"  #: the function raised an exception that is not a cancellation
    CANCELLED = "cancelled"  #: cancel was requested and the function returned or raised a cancellation

    @property
    def finished(self) -> bool:
        """True for the three final states."""
        return self in (TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED)


@dataclass(frozen=True)
class ProgressUpdate:
    """One progress report of a task.

    Attributes:
        fraction: completed fraction in [0, 1] (clamped on the way in).
        message: short human-readable status line.
    """

    fraction: float
    message: str


def scaled_progress(callback: ProgressCallback | None, start: float, stop: float,
                    prefix: str = "") -> ProgressCallback:
    """Map a sub-task's progress in [0, 1] onto ``[start, stop]`` of a parent progress callback.

    Used when one task runs several steps (a λ sweep runs one registration per λ).

    Args:
        callback: the parent ``callback(fraction, message)``; None gives a no-op callback.
        start, stop: the part of the parent range this sub-task covers, ``0 <= start <= stop <= 1``.
        prefix: text put in front of every message (e.g. ``"λ=0.30: "``).

    Raises:
        ValueError: for a range outside [0, 1] or with ``start > stop``.
    """
    if not (0.0 <= start <= stop <= 1.0):
        raise ValueError(f"scaled_progress() needs 0 <= start <= stop <= 1, got start={start}, stop={stop}")

    def report(fraction: float, message: str) -> None:
        if callback is None:
            return
        fraction = min(max(float(fraction), 0.0), 1.0)
        callback(start + (stop - start) * fraction, prefix + message)

    return report


class Task:
    """Work that runs away from the caller, polled from its main thread (a ``qt.QTimer`` in Slicer).

    The one interface of the two backends: :class:`ProcessTask` (a child process: the Slicer panel)
    and :class:`SynchronousTask` (in :meth:`start`, in the caller's thread: scripts and tests).

    - :meth:`start` begins the work; :meth:`cancel` asks it to stop and never blocks;
    - :meth:`poll` returns the :class:`ProgressUpdate` objects that arrived since the last call and
      advances the task's state (a process task learns only there that its process ended);
    - :meth:`wait` polls until the task has finished (the synchronous switch for scripts);
    - :meth:`result` gives the value, or raises :class:`TaskCancelled` or the failure.

    Final state: ``CANCELLED`` when cancel was requested before the work finished, ``FAILED`` when
    it raised, ``SUCCEEDED`` otherwise.
    """

    def __init__(self, name: str = "task", cancelled_exceptions: tuple[type[BaseException], ...] = ()) -> None:
        self._name = name
        self._cancelled_exceptions = tuple(cancelled_exceptions)
        self._cancel_requested = False
        self._updates: list[ProgressUpdate] = []
        self._state = TaskState.PENDING
        self._result: Any = None
        self._exception: BaseException | None = None
        self._latest_progress = ProgressUpdate(0.0, "")
        self._start_time: float | None = None
        self._end_time: float | None = None

    # --- interface -------------------------------------------------------------------------------

    def start(self) -> Task:
        """Begin the work and return ``self``.

        Raises:
            RuntimeError: if the task was already started.
        """
        if self._state is not TaskState.PENDING:
            raise RuntimeError(f"task '{self._name}' was already started (state {self._state.value})")
        self._state = TaskState.RUNNING
        self._start_time = time.monotonic()
        self._begin()
        return self

    def cancel(self) -> None:
        """Ask the work to stop (it ends as ``CANCELLED`` unless it had already finished). Never blocks."""
        self._cancel_requested = True

    def stop(self, timeout: float | None = None) -> None:
        """Cancel, and return once the work has ended (clean-up: scene close, application exit)."""
        self.cancel()

    def poll(self) -> list[ProgressUpdate]:
        """The progress updates since the last call (oldest first); also advances the state."""
        updates, self._updates = self._updates, []
        return updates

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> bool:
        """Poll until the task has finished or ``timeout`` seconds passed; True if it finished.

        Raises:
            RuntimeError: if the task was never started.
        """
        if self._state is TaskState.PENDING:
            raise RuntimeError(f"task '{self._name}' was never started")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            pending = self.poll()
            self._updates = pending + self._updates  # kept for the caller's next poll()
            if self.finished:
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(interval)

    def result(self) -> Any:
        """The work's return value.

        Raises:
            RuntimeError: if the task has not finished.
            TaskCancelled: if it ended as ``CANCELLED``.
            Exception: the work's own exception if it ended as ``FAILED``.
        """
        if not self.finished:
            raise RuntimeError(f"task '{self._name}' has not finished (state {self._state.value})")
        if self._state is TaskState.CANCELLED:
            raise TaskCancelled(f"'{self._name}' was cancelled") from self._exception
        if self._state is TaskState.FAILED:
            raise self._exception  # type: ignore[misc]
        return self._result

    @property
    def state(self) -> TaskState:
        """Current :class:`TaskState`."""
        return self._state

    @property
    def finished(self) -> bool:
        """True once the task reached a final state."""
        return self._state.finished

    @property
    def cancel_was_requested(self) -> bool:
        """True once :meth:`cancel` has been called."""
        return self._cancel_requested

    @property
    def exception(self) -> BaseException | None:
        """The exception the work ended with (failure or cancellation), or None."""
        return self._exception

    @property
    def latest_progress(self) -> ProgressUpdate:
        """The most recent progress update (also after :meth:`poll` returned it)."""
        return self._latest_progress

    @property
    def elapsed_s(self) -> float:
        """Seconds since :meth:`start` (frozen when the task finishes); 0 before it starts."""
        if self._start_time is None:
            return 0.0
        end = self._end_time if self._end_time is not None else time.monotonic()
        return end - self._start_time

    # --- for the backends ------------------------------------------------------------------------

    def _begin(self) -> None:
        raise NotImplementedError

    def _report_progress(self, fraction: float, message: str) -> None:
        fraction = float(fraction)
        fraction = 0.0 if fraction != fraction else min(max(fraction, 0.0), 1.0)  # NaN -> 0
        update = ProgressUpdate(fraction, str(message))
        self._latest_progress = update
        self._updates.append(update)

    def _finish(self, result: Any = None, exception: BaseException | None = None) -> None:
        if exception is None:
            state = TaskState.CANCELLED if self._cancel_requested else TaskState.SUCCEEDED
        elif self._cancel_requested and (isinstance(exception, self._cancelled_exceptions) or isinstance(exception, TaskCancelled)):
            state = TaskState.CANCELLED
        else:
            state = TaskState.FAILED
            logging.debug("task '%s' failed: %r", self._name, exception)
        self._result, self._exception, self._state = result, exception, state
        self._end_time = time.monotonic()


class SynchronousTask(Task):
    """Runs ``function(progress_callback, cancel_requested)`` inside :meth:`start`, in the caller's thread.

    For scripts and tests: when :meth:`start` returns the task has finished, its progress updates
    wait for :meth:`poll`. ``cancel_requested()`` is True when :meth:`cancel` was called before
    (the work then stops at its first check).

    Args:
        function: the work, ``function(progress_callback, cancel_requested) -> result``.
        name: shown in messages and logs.
        cancelled_exceptions: exception types that mean "stopped because cancel was requested"
            (the engine's ``RegistrationCancelled``); they end the task as ``CANCELLED``.
    """

    def __init__(self, function: Callable[[ProgressCallback, CancelRequested], Any], *, name: str = "task",
                 cancelled_exceptions: tuple[type[BaseException], ...] = ()) -> None:
        if not callable(function):
            raise TypeError(f"SynchronousTask needs a callable, got {type(function).__name__}")
        super().__init__(name, cancelled_exceptions)
        self._function = function

    def _begin(self) -> None:
        try:
            result = self._function(self._report_progress, lambda: self._cancel_requested)
        except Exception as error:  # noqa: BLE001 - kept for result(), like a background task's
            self._finish(exception=error)
            return
        self._finish(result)


class ProcessTaskError(RuntimeError):
    """The child process failed; the message is the child's own one-line error message.

    Attributes:
        error_type: the class name of the exception raised in the child ("" when the process
            ended without reporting one, e.g. killed by the system).
        details: the tail of the child's error output (its traceback), for logs.
    """

    def __init__(self, message: str, error_type: str = "", details: str = "") -> None:
        super().__init__(message)
        self.error_type, self.details = error_type, details


#: Process tasks still running, stopped when the interpreter exits (Slicer quits).
_RUNNING: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _stop_running_processes() -> None:
    for task in list(_RUNNING):
        task.stop()


class ProcessTask(Task):
    """Runs ``command`` as a child process whose stdout carries JSON lines, polled without threads.

    Protocol (see :mod:`jobs`): every line of the child's stdout is a JSON object:
    ``{"progress": f, "message": m}`` as it advances, then ``{"done": true}`` or ``{"error": text,
    "type": name}``. stdout and stderr go to ``stdout.log`` and ``stderr.log`` in ``folder``, and
    :meth:`poll` reads what was added since the last call, so the parent needs no reader thread
    (a Python thread inside Slicer hardly runs: the main thread keeps the GIL in the Qt event loop).

    On success (exit status 0) ``load(folder / "result")`` makes the task's result, on the polling
    thread. :meth:`cancel` terminates the child (its whole process group: ``PythonSlicer`` is a
    launcher with the interpreter as its child) and kills it when it has not ended ``grace_s``
    seconds later. ``folder`` is removed when the task ends, whatever the outcome; a running child
    is stopped when this interpreter exits.

    Args:
        command: the child's command line.
        folder: the job folder (owned by the task from now on).
        load: ``load(result_folder) -> result``.
        env: the child's environment (default this process's).
        name: shown in messages and logs.
        grace_s: seconds between terminate and kill.
    """

    def __init__(self, command: list[str], folder: Path, load: Callable[[Path], Any], *, env: dict | None = None,
                 name: str = "process", grace_s: float = 2.0) -> None:
        super().__init__(name)
        self.command, self.folder, self._load, self._env = list(command), Path(folder), load, env
        self.grace_s = float(grace_s)
        self._process: subprocess.Popen | None = None
        self._offset = 0
        self._partial = b""
        self._child_error: dict | None = None
        self._terminated_at: float | None = None
        self.output_lines: list[str] = []  # lines of stdout that were not protocol messages

    @property
    def pid(self) -> int | None:
        """The child's process id once started."""
        return None if self._process is None else self._process.pid

    def _begin(self) -> None:
        kwargs: dict = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            kwargs["start_new_session"] = True  # its own process group: terminate reaches the interpreter too
        try:
            with open(self.folder / "stdout.log", "wb") as out, open(self.folder / "stderr.log", "wb") as err:
                self._process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                                 env=self._env, cwd=self.folder, **kwargs)
        except OSError as error:
            self._cleanup()
            self._finish(exception=ProcessTaskError(f"could not start the {self._name} process: {error}"))
            return
        _RUNNING.add(self)

    def cancel(self) -> None:
        """Terminate the child (then kill it after ``grace_s``); the task ends as ``CANCELLED``."""
        super().cancel()
        if self._process is not None and not self.finished and self._terminated_at is None:
            self._signal(kill=False)
            self._terminated_at = time.monotonic()

    def stop(self, timeout: float | None = None) -> None:
        """Cancel and wait until the child has ended (killed after ``grace_s``); for clean-up."""
        if self._state is TaskState.PENDING:
            self._cleanup()
            return
        self.cancel()
        self.wait(self.grace_s + 5.0 if timeout is None else timeout)

    def poll(self) -> list[ProgressUpdate]:
        if self._state is TaskState.RUNNING and self._process is not None:
            self._read_output()
            if self._terminated_at is not None and time.monotonic() - self._terminated_at > self.grace_s:
                self._signal(kill=True)
            returncode = self._process.poll()
            if returncode is not None:
                self._read_output()
                self._conclude(returncode)
        return super().poll()

    # --- internals --------------------------------------------------------------------------------

    def _read_output(self) -> None:
        try:
            with open(self.folder / "stdout.log", "rb") as out:
                out.seek(self._offset)
                data = out.read()
        except OSError:
            return
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for raw in lines:
            line = raw.decode("utf-8", errors="replace").strip()
            try:
                message = json.loads(line) if line.startswith("{") else None
            except ValueError:
                message = None
            if not isinstance(message, dict):
                if line:
                    self.output_lines.append(line)
                continue
            if "progress" in message:
                self._report_progress(message.get("progress", 0.0), message.get("message", ""))
            elif "error" in message:
                self._child_error = message

    def _conclude(self, returncode: int) -> None:
        _RUNNING.discard(self)
        try:
            if self._cancel_requested:
                self._finish(exception=TaskCancelled(f"'{self._name}' was cancelled"))
            elif returncode == 0 and (self.folder / "result").is_dir():
                try:
                    result = self._load(self.folder / "result")
                except Exception as error:  # noqa: BLE001 - a result that cannot be read is a failure
                    self._finish(exception=error)
                else:
                    self._finish(result)
            else:
                details = self._stderr_tail()
                if self._child_error is not None:
                    error = ProcessTaskError(str(self._child_error.get("error")), str(self._child_error.get("type", "")), details)
                else:
                    last = details.strip().splitlines()[-1] if details.strip() else "no error message"
                    error = ProcessTaskError(f"the {self._name} process ended unexpectedly (exit status {returncode}): {last}",
                                             "", details)
                logging.error("%s failed:\n%s", self._name, details)
                self._finish(exception=error)
        finally:
            self._cleanup()

    def _stderr_tail(self, limit: int = 4000) -> str:
        try:
            return (self.folder / "stderr.log").read_bytes()[-limit:].decode("utf-8", errors="replace")
        except OSError:
            return ""

    def _signal(self, kill: bool) -> None:
        process = self._process
        if process is None or process.poll() is not None:
            return
        try:
            if os.name == "nt":
                # The whole tree (the PythonSlicer launcher and the interpreter it started).
                subprocess.run(["taskkill", "/PID", str(process.pid), "/T", *(["/F"] if kill else [])],
                               capture_output=True, timeout=10)
                if kill:
                    process.kill()
            else:
                os.killpg(process.pid, signal.SIGKILL if kill else signal.SIGTERM)
        except (OSError, subprocess.SubprocessError):
            if kill:
                process.kill()

    def _cleanup(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class LatestRequestDebouncer(Generic[RequestT]):
    """Release only the latest of a burst of requests, once it has been left alone long enough.

    ``submit(request)`` records a request and (re)starts a quiet period of ``delay_s``;
    ``poll(busy)`` returns the request once the quiet period is over and the caller is not busy,
    and None otherwise. A request submitted while an older one is still waiting replaces it, so a
    request superseded while a run is in progress is dropped and only the newest is run after the
    current run finishes.

    Args:
        delay_s: quiet period in seconds (``>= 0``).
        clock: ``clock() -> seconds``; :func:`time.monotonic` by default, a fake in tests.

    Raises:
        ValueError: for a negative delay.
    """

    def __init__(self, delay_s: float = 0.3, clock: Callable[[], float] = time.monotonic) -> None:
        if not delay_s >= 0:
            raise ValueError(f"LatestRequestDebouncer delay_s must be >= 0 seconds, got {delay_s}")
        self._delay_s = float(delay_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: RequestT | None = None
        self._has_pending = False
        self._deadline = 0.0
        self._dropped = 0

    @property
    def delay_s(self) -> float:
        """The quiet period in seconds."""
        return self._delay_s

    @property
    def has_pending(self) -> bool:
        """True while a request is waiting to be released."""
        with self._lock:
            return self._has_pending

    @property
    def pending(self) -> RequestT | None:
        """The waiting request, or None."""
        with self._lock:
            return self._pending if self._has_pending else None

    @property
    def dropped_count(self) -> int:
        """How many requests were replaced by a newer one before being released."""
        with self._lock:
            return self._dropped

    def submit(self, request: RequestT) -> None:
        """Record ``request`` as the latest one, replacing (dropping) any waiting request."""
        with self._lock:
            if self._has_pending:
                self._dropped += 1
            self._pending = request
            self._has_pending = True
            self._deadline = self._clock() + self._delay_s

    def clear(self) -> None:
        """Forget the waiting request, if any."""
        with self._lock:
            self._pending = None
            self._has_pending = False

    def poll(self, busy: bool = False) -> RequestT | None:
        """Return the waiting request if its quiet period is over and ``busy`` is False, else None.

        A released request is no longer pending. While ``busy`` (a run is in progress) nothing is
        released, however long ago the request came, so it is released by the first poll after the
        run finished.
        """
        with self._lock:
            if not self._has_pending or busy or self._clock() < self._deadline:
                return None
            request = self._pending
            self._pending = None
            self._has_pending = False
            return request
