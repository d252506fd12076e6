"""Qt-free plumbing for long-running work started from the Slicer panel.

The panel never computes: it hands a function to :class:`BackgroundTask`, which runs it in a worker
thread, and polls the task from the GUI thread (a ``qt.QTimer`` in the module widget). Everything the
worker reports goes through thread-safe state (a ``queue.Queue`` of :class:`ProgressUpdate` and a
``threading.Event`` for cancellation), so the worker never touches Qt or MRML and the GUI thread never
blocks on the worker.

:class:`LatestRequestDebouncer` turns a burst of requests (a λ slider being dragged) into one run:
a request is released only after it has been left alone for ``delay_s`` seconds, and while a run is
in progress newer requests replace older ones, so the newest is the one run when the current run
finishes. Its clock is injectable, so tests drive it without sleeping.

Nothing here imports Qt, vtk, MRML or torch.
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

__all__ = [
    "BackgroundTask",
    "LatestRequestDebouncer",
    "ProgressUpdate",
    "TaskCancelled",
    "TaskState",
    "scaled_progress",
]

ProgressCallback = Callable[[float, str], None]
CancelRequested = Callable[[], bool]
RequestT = TypeVar("RequestT")


class TaskCancelled(RuntimeError):
    """Raised by :meth:`BackgroundTask.result` when the task ended because cancel was requested."""


class TaskState(enum.Enum):
    """Life cycle of a :class:`BackgroundTask`."""

    PENDING = "pending"  #: created, not started
    RUNNING = "running"  #: the worker thread is running the function
    SUCCEEDED = "succeeded"  #: the function returned and no cancel was requested
    FAILED = "failed"  #: the function raised an exception that is not a cancellation
    CANCELLED = "cancelled"  #: cancel was requested and the function returned or raised a cancellation

    @property
    def finished(self) -> bool:
        """True for the three final states."""
        return self in (TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED)


@dataclass(frozen=True)
class ProgressUpdate:
    """One progress report from the worker.

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


class BackgroundTask:
    """Run ``function(progress_callback, cancel_requested)`` in a worker thread.

    ``function`` receives two callables and must be safe to run off the GUI thread (no Qt, no MRML):

    - ``progress_callback(fraction, message)`` queues a :class:`ProgressUpdate` (thread-safe);
    - ``cancel_requested() -> bool`` is True once :meth:`cancel` has been called.

    The GUI thread calls :meth:`poll` from a timer to drain the progress queue and to see whether the
    task has finished; :meth:`wait` is the synchronous switch for tests and scripts. The function's
    return value is kept in :meth:`result`, an exception it raises in :attr:`exception` (with its
    traceback), and neither is ever re-raised in the worker thread.

    Final state: ``CANCELLED`` if cancel was requested and the function then returned or raised one
    of ``cancelled_exceptions``; ``FAILED`` if it raised anything else; ``SUCCEEDED`` otherwise.

    Args:
        function: the work, ``function(progress_callback, cancel_requested) -> result``.
        name: thread name, shown in logs.
        cancelled_exceptions: exception types that mean "stopped because cancel was requested"
            (the engine's ``RegistrationCancelled``); they end the task as ``CANCELLED``.
    """

    def __init__(self, function: Callable[[ProgressCallback, CancelRequested], Any], *,
                 name: str = "BackgroundTask",
                 cancelled_exceptions: tuple[type[BaseException], ...] = ()) -> None:
        if not callable(function):
            raise TypeError(f"BackgroundTask needs a callable, got {type(function).__name__}")
        self._function = function
        self._name = name
        self._cancelled_exceptions = tuple(cancelled_exceptions)
        self._cancel_event = threading.Event()
        self._done_event = threading.Event()
        self._progress_queue: queue.Queue[ProgressUpdate] = queue.Queue()
        self._lock = threading.Lock()
        self._state = TaskState.PENDING
        self._result: Any = None
        self._exception: BaseException | None = None
        self._latest_progress = ProgressUpdate(0.0, "")
        self._thread: threading.Thread | None = None
        self._start_time: float | None = None
        self._end_time: float | None = None

    # --- GUI-thread side -------------------------------------------------------------------------

    def start(self) -> BackgroundTask:
        """Start the worker thread and return ``self``.

        Raises:
            RuntimeError: if the task was already started.
        """
        with self._lock:
            if self._state is not TaskState.PENDING:
                raise RuntimeError(f"BackgroundTask '{self._name}' was already started (state {self._state.value})")
            self._state = TaskState.RUNNING
            self._start_time = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()
        return self

    def cancel(self) -> None:
        """Ask the function to stop; it sees ``cancel_requested()`` become True. Never blocks."""
        self._cancel_event.set()

    def poll(self) -> list[ProgressUpdate]:
        """Drain and return the progress updates queued since the last call (oldest first)."""
        updates = []
        while True:
            try:
                updates.append(self._progress_queue.get_nowait())
            except queue.Empty:
                return updates

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the task has finished (or ``timeout`` seconds passed); True if finished.

        Raises:
            RuntimeError: if the task was never started.
        """
        if self._state is TaskState.PENDING:
            raise RuntimeError(f"BackgroundTask '{self._name}' was never started")
        return self._done_event.wait(timeout)

    def result(self) -> Any:
        """Return the function's return value.

        Raises:
            RuntimeError: if the task has not finished.
            TaskCancelled: if it ended as ``CANCELLED`` (chained to the cancellation exception, if any).
            Exception: the function's own exception if it ended as ``FAILED``.
        """
        state = self.state
        if not state.finished:
            raise RuntimeError(f"BackgroundTask '{self._name}' has not finished (state {state.value})")
        if state is TaskState.CANCELLED:
            raise TaskCancelled(f"'{self._name}' was cancelled") from self._exception
        if state is TaskState.FAILED:
            raise self._exception  # type: ignore[misc]
        return self._result

    @property
    def state(self) -> TaskState:
        """Current :class:`TaskState` (thread-safe)."""
        with self._lock:
            return self._state

    @property
    def finished(self) -> bool:
        """True once the task reached a final state."""
        return self.state.finished

    @property
    def cancel_was_requested(self) -> bool:
        """True once :meth:`cancel` has been called."""
        return self._cancel_event.is_set()

    @property
    def exception(self) -> BaseException | None:
        """The exception the function raised, or None."""
        with self._lock:
            return self._exception

    @property
    def latest_progress(self) -> ProgressUpdate:
        """The most recent progress update (also after :meth:`poll` drained the queue)."""
        with self._lock:
            return self._latest_progress

    @property
    def elapsed_s(self) -> float:
        """Seconds since :meth:`start` (frozen when the task finishes); 0 before it starts."""
        with self._lock:
            if self._start_time is None:
                return 0.0
            end = self._end_time if self._end_time is not None else time.monotonic()
            return end - self._start_time

    # --- worker-thread side ----------------------------------------------------------------------

    def _report_progress(self, fraction: float, message: str) -> None:
        fraction = float(fraction)
        fraction = 0.0 if fraction != fraction else min(max(fraction, 0.0), 1.0)  # NaN -> 0
        update = ProgressUpdate(fraction, str(message))
        with self._lock:
            self._latest_progress = update
        self._progress_queue.put(update)

    def _run(self) -> None:
        result = None
        exception: BaseException | None = None
        try:
            result = self._function(self._report_progress, self._cancel_event.is_set)
        except BaseException as error:  # noqa: BLE001 - captured for the GUI thread, never lost
            exception = error
        if exception is None:
            state = TaskState.CANCELLED if self._cancel_event.is_set() else TaskState.SUCCEEDED
        elif isinstance(exception, self._cancelled_exceptions) and self._cancel_event.is_set():
            state = TaskState.CANCELLED
        else:
            state = TaskState.FAILED
            logging.debug("BackgroundTask '%s' failed: %r", self._name, exception)
        with self._lock:
            self._result = result
            self._exception = exception
            self._state = state
            self._end_time = time.monotonic()
        self._done_event.set()


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
