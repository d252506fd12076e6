"""The command line's output folder: staged next to it, published as one set, never mixed with inputs.

**The files this tool owns.** :data:`TOOL_FILES` are the only names ``learnedreg register`` ever
writes into the output folder (the outputs table of :mod:`.cli`). Anything else there (the user's
notes, other tools' results, folders of any name) is never moved, replaced or deleted. A name of
the set that a run writes replaces the file of that name; a folder with such a name is refused
before any work (exit 2), never deleted. A run also refuses to start when one of its output paths
is one of its inputs (the resolved paths, or the same file through a link), so
``--output-dir D --moving D/warped.nrrd`` cannot replace its own input.

**One set per run.** Each run's outputs replace the previous run's as a whole: a file of the
previous set that this run does not write (``lambda_sweep.json`` after a run without a sweep,
``warped_labels.nrrd`` after a run without labels, ...) is removed, but only if it is still the
file that run wrote: ``metrics.json`` records each output's name and size (``output_files``), and
a file whose size changed since, a link, or a name the record does not list is left alone.

**Atomic replacement: a journal, not a pointer.** Everything is written into a hidden staging
folder beside the output folder (same file system, so moving a file is a rename). A fresh output
folder is then one rename of the staging folder. An existing one cannot be switched in one step
without an indirection (a symlink pointer to a versioned subfolder would turn the outputs into
links that break when the folder is copied, zipped or opened on Windows, and a user's files live
in that folder too), so publication is write-ahead journaled, as databases do:

1. the staged files are flushed to disk (``fsync``);
2. the journal ``.learnedreg-commit.json`` (which files move in, which stale ones go) is written
   inside the staging folder and renamed into place: the **commit point**;
3. stale files are removed, the new files renamed into the output folder (``metrics.json``, the
   record of the set, last), the folders flushed, the journal and the staging folder removed.

A crash (SIGKILL, power loss) before the commit point leaves the previous set untouched; after it,
the journal says which set is current, and the next run into the same folder completes the
switch before it does anything else (:func:`recover_staging`), so the folder always ends up with
one run's set, never a mixture of two. Publication (and the clean-up of a failed run) holds off
SIGINT, SIGTERM and SIGHUP until it is done (:func:`signals_deferred`); it takes milliseconds.

**Staging folders left behind.** A staging folder is named
``.<output name>.learnedreg-<host>-<pid>-<random>``. A run that is killed outright leaves it
(possibly gigabytes); the next run into the same place removes it, or completes it if it was
committed, once no process with that id is alive on this host (``<host>`` is a hash of the host
name, so a folder shared over the network is never cleaned for another machine's live run). An
unclear case (a reused process id, a platform without ``os.kill(pid, 0)``) keeps the folder.

**Signals.** :func:`signals_raise` makes SIGINT, SIGTERM and SIGHUP raise :class:`Interrupted`
in the main thread, so a run cleans up (its staging folder is removed; nothing half-written is
left) and exits with 128 + the signal number; a signal the process ignores (SIGHUP under
``nohup``) stays ignored.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Optional

#: Output file names, in the order they are written (node attribute of the logic's outputs -> file).
OUTPUT_FILES = {
    "warpedVolumeNode": "warped.nrrd",
    "displacementVolumeNode": "displacement.nrrd",
    "transformNode": "transform.h5",
    "checkerboardVolumeNode": "checkerboard.nrrd",
    "differenceVolumeNode": "difference.nrrd",
    "jacobianVolumeNode": "jacobian.nrrd",
    "lambdaMapVolumeNode": "lambda_map.nrrd",
    "warpedLabelNode": "warped_labels.nrrd",
}
SCENE_FILE = "scene.mrb"
METRICS_FILE = "metrics.json"
SWEEP_FILES = ("lambda_sweep.json", "lambda_sweep.png")
#: The demo's known displacement.
TRUE_DISPLACEMENT_FILE = "true_displacement.nrrd"
#: The warped labels when the moving labels are a segmentation.
WARPED_SEGMENTATION_FILE = "warped_labels.seg.nrrd"
#: Every name this tool writes into an output folder; nothing else there is ever touched.
TOOL_FILES = frozenset(
    {*OUTPUT_FILES.values(), SCENE_FILE, METRICS_FILE, *SWEEP_FILES, TRUE_DISPLACEMENT_FILE, WARPED_SEGMENTATION_FILE}
)
#: Key of ``metrics.json`` recording the set: ``{file name: size in bytes}`` (``metrics.json`` itself excluded).
RECORD_KEY = "output_files"

_JOURNAL = ".learnedreg-commit.json"
_STAGING_TAIL = re.compile(r"^(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[a-z0-9_]+$")


class OutputFolderError(ValueError):
    """The output folder cannot be used as asked (reported in one line, exit status 2)."""


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP arrived (see :func:`signals_raise`).

    Attributes:
        signum: the signal number; the command exits with ``128 + signum``.
        output_written: True when the signal came after the output folder was complete.
    """

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = int(signum)
        self.output_written = False


# ------------------------------------------------------------------------------------------ signals
_signal_state = {"deferring": 0, "pending": None}


def _raise_interrupted(signum, frame) -> None:
    if _signal_state["deferring"]:
        _signal_state["pending"] = _signal_state["pending"] or signum
        return
    raise Interrupted(signum)


def _termination_signals() -> list:
    return [getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)]


@contextlib.contextmanager
def signals_raise():
    """While the block runs, SIGINT, SIGTERM and SIGHUP raise :class:`Interrupted` in the main thread.

    A signal whose disposition is "ignore" (SIGHUP under ``nohup``) stays ignored; the previous
    handlers come back afterwards. Outside the main thread (where Python cannot set handlers)
    this does nothing.
    """
    installed = {}
    if threading.current_thread() is threading.main_thread():
        for signum in _termination_signals():
            if signal.getsignal(signum) is not signal.SIG_IGN:
                installed[signum] = signal.signal(signum, _raise_interrupted)
    try:
        yield
    finally:
        for signum, previous in installed.items():
            signal.signal(signum, previous)


@contextlib.contextmanager
def signals_deferred():
    """Hold the signals of :func:`signals_raise` while the block runs; one that arrived meanwhile
    raises :class:`Interrupted` when the block ends (blocks nest)."""
    _signal_state["deferring"] += 1
    try:
        yield
    finally:
        _signal_state["deferring"] -= 1
        if not _signal_state["deferring"] and _signal_state["pending"] is not None:
            signum, _signal_state["pending"] = _signal_state["pending"], None
            raise Interrupted(signum)


# ------------------------------------------------------------------------------------------ checks
def refuse_outputs_over_inputs(output_dir, inputs: Mapping[str, Optional[str]]) -> None:
    """Refuse (before any work) an output path that is one of the inputs.

    Every name of :data:`TOOL_FILES` in ``output_dir`` counts, written by this run or removed as
    stale. Paths are compared resolved (links followed), and as the same file (``samefile``,
    which also catches hard links) where both exist.

    Args:
        output_dir: the ``--output-dir``.
        inputs: option name (``"--moving"``) -> path, or None when not given.

    Raises:
        OutputFolderError: naming the option, the input and the output it would be.
    """
    output = Path(output_dir).expanduser().absolute()
    for option, value in inputs.items():
        if not value:
            continue
        source = Path(value).expanduser()
        for name in sorted(TOOL_FILES):
            target = output / name
            same = os.path.realpath(source) == os.path.realpath(target)
            if not same and source.exists() and target.exists():
                with contextlib.suppress(OSError):
                    same = os.path.samefile(source, target)
            if same:
                raise OutputFolderError(
                    f"{option} '{value}' is the output file '{target}', which this run would replace; "
                    "choose another --output-dir or move the input"
                )


def _refuse_tool_named_folders(output: Path) -> None:
    for name in sorted(TOOL_FILES):
        target = output / name
        if target.is_dir():
            raise OutputFolderError(
                f"'{target}' is a folder, and learnedreg writes a file of that name there; rename or move "
                "the folder (learnedreg never deletes folders)"
            )


# ------------------------------------------------------------------------------------------ staging
def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


def _process_alive(pid: int) -> bool:
    """False only when no process ``pid`` exists on this machine (POSIX); True when unsure."""
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        return True
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, owned by someone else
        return True
    return True


def _staging_owner(entry: Path, output_name: str) -> Optional[int]:
    """The pid in the name of a staging folder of ``output_name`` made on this host, else None."""
    prefix = f".{output_name}.learnedreg-"
    if not entry.name.startswith(prefix) or not entry.is_dir() or entry.is_symlink():
        return None
    match = _STAGING_TAIL.match(entry.name[len(prefix):])
    if match is None or match["host"] != _host_tag():
        return None
    return int(match["pid"])


@contextlib.contextmanager
def _folder_lock(folder: Path):
    """An exclusive ``flock`` on ``folder`` (one publication or recovery at a time); a no-op where
    the platform or file system has no such locks."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # releases the lock


def _fsync(path: Path, directory: bool = False) -> None:
    with contextlib.suppress(OSError):
        descriptor = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _read_journal(staging: Path) -> Optional[dict]:
    try:
        journal = json.loads((staging / _JOURNAL).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(journal, dict) or not isinstance(journal.get("output"), str):
        return None
    files = [n for n in journal.get("files", []) if n in TOOL_FILES]
    remove = [n for n in journal.get("remove", []) if n in TOOL_FILES]
    return {"output": journal["output"], "files": files, "remove": remove}


def _roll_forward(staging: Path, output: Path, files: Iterable[str], remove: Iterable[str]) -> None:
    """Complete a committed publication (idempotent): stale files out, staged files in, metrics last."""
    for name in remove:
        target = output / name
        if target.is_file() and not target.is_symlink():
            target.unlink()
    for name in sorted(files, key=lambda n: n == METRICS_FILE):
        source = staging / name
        if source.exists():
            os.replace(source, output / name)
    _fsync(output, directory=True)
    (staging / _JOURNAL).unlink(missing_ok=True)
    shutil.rmtree(staging, ignore_errors=True)
    _fsync(output.parent, directory=True)


def recover_staging(output_dir) -> list[Path]:
    """Deal with the staging folders that dead runs left next to ``output_dir`` (see the module docstring).

    A committed one (it holds a journal) is completed into ``output_dir``, oldest first; any
    other one is deleted. Folders of live processes, of other hosts, or not named as a staging
    folder are left alone.

    Returns:
        The staging folders dealt with.
    """
    output = Path(output_dir).expanduser().absolute()
    parent = output.parent
    if not parent.is_dir():
        return []
    stale = []
    for entry in parent.iterdir():
        pid = _staging_owner(entry, output.name)
        if pid is not None and not _process_alive(pid):
            stale.append(entry)
    journals = {entry: _read_journal(entry) for entry in stale}

    def committed_at(entry: Path) -> float:
        try:
            return (entry / _JOURNAL).stat().st_mtime
        except OSError:
            return float("inf")

    for entry in sorted(stale, key=committed_at):
        journal = journals[entry]
        if journal is not None and Path(journal["output"]) == output and output.is_dir():
            _roll_forward(entry, output, journal["files"], journal["remove"])
        else:
            shutil.rmtree(entry, ignore_errors=True)
    return stale


def read_record(output_dir) -> dict[str, int]:
    """``{file name: size}`` of the set the last run published into ``output_dir`` (its ``metrics.json``),
    or {} when there is none or it is not one of ours."""
    try:
        metrics = json.loads((Path(output_dir) / METRICS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    record = metrics.get(RECORD_KEY) if isinstance(metrics, dict) else None
    if not isinstance(record, dict):
        return {}
    return {n: s for n, s in record.items() if n in TOOL_FILES and isinstance(s, int) and not isinstance(s, bool)}


class StagedOutput:
    """One run's output folder: checked, staged beside it, then published as a set (module docstring).

    Use::

        staged = StagedOutput(args.output_dir)      # checks, cleans up dead runs, makes the staging folder
        try:
            ...write files named in TOOL_FILES into staged.staging...
            metrics[RECORD_KEY] = staged.record()   # then write metrics.json into staged.staging
            staged.publish()
        finally:
            staged.discard()                         # nothing left behind, whatever happened

    Attributes:
        output: the output folder (absolute).
        staging: the staging folder (in ``output``'s parent).
        published: True once the new set is committed (it will be in ``output``).

    Raises:
        OutputFolderError: the path is a file, a name of :data:`TOOL_FILES` in it is a folder,
            or the folder (or its parent) cannot be created or written.
    """

    def __init__(self, output_dir):
        output = Path(output_dir).expanduser().absolute()
        if output.exists() and not output.is_dir():
            raise OutputFolderError(f"the output folder '{output}' exists and is not a folder")
        if output.is_dir():
            _refuse_tool_named_folders(output)
        try:
            output.parent.mkdir(parents=True, exist_ok=True)
            with _folder_lock(output.parent):
                recover_staging(output)
            staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.learnedreg-{_host_tag()}-{os.getpid()}-",
                                            dir=output.parent))
        except OSError as error:
            raise OutputFolderError(f"cannot write the output folder '{output}': {error.strerror or error}") from None
        if output.is_dir():
            probe = output / f".learnedreg-write-test-{os.getpid()}"
            try:
                probe.write_bytes(b"")
                probe.unlink()
            except OSError as error:
                shutil.rmtree(staging, ignore_errors=True)
                raise OutputFolderError(f"cannot write the output folder '{output}': {error.strerror or error}") from None
        self.output = output
        self.staging = staging
        self.published = False

    def staged_files(self) -> list[str]:
        """Names of :data:`TOOL_FILES` now in the staging folder (anything else there is never published)."""
        return sorted(p.name for p in self.staging.iterdir() if p.name in TOOL_FILES and p.is_file())

    def record(self) -> dict[str, int]:
        """``{file name: size}`` of the staged files but ``metrics.json``: the value of :data:`RECORD_KEY`."""
        return {name: (self.staging / name).stat().st_size for name in self.staged_files() if name != METRICS_FILE}

    def publish(self) -> None:
        """Make the staged files the output folder's set (module docstring), with signals held off.

        Raises:
            OSError: a rename failed (after the commit point the next run completes it).
        """
        with signals_deferred(), _folder_lock(self.output.parent):
            recover_staging(self.output)  # a dead run's commit is older than this one
            files = self.staged_files()
            for name in files:
                _fsync(self.staging / name)
            if not self.output.exists():
                for entry in self.staging.iterdir():  # the scene's cache and anything else not ours to publish
                    if entry.name in files:
                        continue
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry)
                    else:
                        entry.unlink()
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(self.staging, 0o777 & ~umask)  # mkdtemp made it private (0700)
                _fsync(self.staging, directory=True)
                os.replace(self.staging, self.output)
                self.published = True
                _fsync(self.output.parent, directory=True)
                return
            previous = read_record(self.output)
            remove = [
                name for name, size in previous.items()
                if name not in files and _is_file_of_size(self.output / name, size)
            ]
            journal = self.staging / _JOURNAL
            temporary = journal.with_name(journal.name + ".tmp")
            temporary.write_text(json.dumps({"output": str(self.output), "files": files, "remove": remove}))
            _fsync(temporary)
            os.replace(temporary, journal)
            _fsync(self.staging, directory=True)
            self.published = True  # committed
            _roll_forward(self.staging, self.output, files, remove)

    def discard(self) -> None:
        """Remove the staging folder (or, if the run had committed, complete the publication); signals
        held off. Never raises for a failed rename: a committed staging folder then stays, and the
        next run into the folder completes it."""
        if not self.staging.exists():
            return
        with signals_deferred():
            journal = _read_journal(self.staging)
            if journal is None:
                shutil.rmtree(self.staging, ignore_errors=True)
                return
            # Committed: complete it; if that fails too, the journal stays for the next run.
            with contextlib.suppress(OSError), _folder_lock(self.output.parent):
                _roll_forward(self.staging, self.output, journal["files"], journal["remove"])


def _is_file_of_size(path: Path, size: int) -> bool:
    try:
        return path.is_file() and not path.is_symlink() and path.stat().st_size == size
    except OSError:
        return False
