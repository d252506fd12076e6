"""What ``learnedreg register`` and the logic behind it refuse, and why: a catalogue.

The command line's promise, checked for every case: exit status 2, exactly one line on stderr
naming the problem (no traceback, no library chatter), nothing written (no output folder, or the
existing one untouched, and no staging folder left next to it), and where it says so, before
Slicer's libraries load. Signals end a run with 128 + the signal number after the same clean-up.
The logic cases (the Python API) check the message and that the MRML scene is exactly as before.

Sections: input files; inputs that do not fit together; options; network weights files; the output
folder; signals and killed runs; voxel grids that must survive (left-handed directions); the logic.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from LearnedRegistrationLib.app import headless, outputs
from LearnedRegistrationLib.app.cli import EXIT_INTERRUPTED, EXIT_USER_ERROR, main
from LearnedRegistrationLib.bridge import mrml
from LearnedRegistrationLib.bridge.logic import RegistrationLogic
from LearnedRegistrationLib.engine.common import RegistrationCancelled
from LearnedRegistrationLib.engine.grid import ImageGrid
from LearnedRegistrationLib.engine.metrics import dice_per_label
from LearnedRegistrationLib.learned.checkpoint import save_checkpoint
from LearnedRegistrationLib.learned.network import NetworkConfig

from conftest import process_alive, random_network

FAST = ["--iteration-scale", "0.05", "--quiet"]
DEMO = ["--demo-size", "16", *FAST]


def blob(shape=(20, 22, 24), centre=None) -> np.ndarray:
    """A smooth bright blob, float32 (Z, Y, X)."""
    z, y, x = np.indices(shape, dtype=np.float32)
    c = np.array(centre if centre is not None else [(s - 1) / 2 for s in shape], dtype=np.float32)
    r2 = ((z - c[0]) / 5.0) ** 2 + ((y - c[1]) / 6.0) ** 2 + ((x - c[2]) / 7.0) ** 2
    return (100.0 * np.exp(-r2) + 10.0 * np.exp(-r2 / 4)).astype(np.float32)


def write_image(path: Path, array: np.ndarray, spacing=(2.0, 2.0, 2.0), origin=(0.0, 0.0, 0.0), direction=None,
                compress=False) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing[: array.ndim])
    image.SetOrigin(origin[: array.ndim])
    if direction is not None:
        image.SetDirection(direction)
    sitk.WriteImage(image, str(path), useCompression=compress)
    return path


@pytest.fixture
def good_pair(tmp_path):
    fixed = write_image(tmp_path / "fixed.nrrd", blob())
    moving = write_image(tmp_path / "moving.nrrd", blob(centre=(10, 11, 12.5)))
    return fixed, moving


def folder_state(folder: Path) -> dict:
    """{relative path: bytes} of every file under ``folder`` (folders as None)."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def staging_folders(parent: Path) -> list:
    return [p.name for p in parent.iterdir() if "learnedreg-" in p.name] if parent.is_dir() else []


def run_failing(argv, capsys, output: Path, message: str) -> str:
    """Run main(argv): exit status 2, stderr exactly one line holding ``message``, and nothing
    written (no output folder, or an existing one unchanged, and no staging folder)."""
    before = folder_state(output) if output.is_dir() else None
    status = main(argv)
    captured = capsys.readouterr()
    assert status == EXIT_USER_ERROR, captured.err
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("learnedreg: error:"), captured.err
    assert message.lower() in lines[0].lower(), lines[0]
    if before is None:
        assert not output.exists()
    else:
        assert folder_state(output) == before
    assert not staging_folders(output.parent)
    return lines[0]


def register(pair, output: Path, *extra) -> list:
    return ["register", "--fixed", str(pair[0]), "--moving", str(pair[1]), "--output-dir", str(output), *extra, *FAST]


# ================================================================================ input files
@pytest.mark.parametrize("option", ["--fixed", "--model", "--fixed-landmarks"])
def test_missing_input_file_is_reported_before_slicer_loads(tmp_path, good_pair, option):
    # In a fresh interpreter: the check comes before vtk/slicer are imported (they take 5-10 s).
    code = (
        "import sys\nfrom LearnedRegistrationLib.app.cli import main\nstatus = main(sys.argv[1:])\n"
        "print(sorted(m for m in ('slicer', 'vtk') if m in sys.modules))\nsys.exit(status)\n"
    )
    missing = tmp_path / "nope.file"
    argv = register(good_pair, tmp_path / "out")
    argv = [*argv, option, str(missing)] if option != "--fixed" else [a if a != str(good_pair[0]) else str(missing) for a in argv]
    completed = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert completed.returncode == EXIT_USER_ERROR, completed.stderr
    assert completed.stdout.strip() == "[]"  # neither vtk nor slicer was loaded
    assert completed.stderr.strip().splitlines() == [f"learnedreg: error: {option}: " + (
        "image file" if option == "--fixed" else "file") + f" not found: {missing}"]
    assert not (tmp_path / "out").exists()


def _cut(path: Path, keep: float) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def _flip_a_byte(path: Path) -> Path:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def _without_gzip_trailer(path: Path) -> Path:
    """The voxel data complete, only the gzip trailer (CRC-32 and length) missing."""
    data = path.read_bytes()
    path.write_bytes(data[:-8])
    return path


DAMAGES = {
    # what reads "successfully" through ITK today, with zeros for what is missing
    "nii.gz cut in half": ("damaged.nii.gz", True, lambda p: _cut(p, 0.5), "truncated"),
    "nii uncompressed, cut": ("damaged.nii", False, lambda p: _cut(p, 0.6), "incomplete"),
    "nii.gz with a flipped byte": ("damaged.nii.gz", True, _flip_a_byte, "corrupt"),
    "nrrd gzip without its checksum": ("damaged.nrrd", True, _without_gzip_trailer, "truncated"),
    "nrrd raw, cut": ("damaged.nrrd", False, lambda p: _cut(p, 0.6), "incomplete"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_truncated_or_corrupt_image_file_is_refused_naming_it(tmp_path, good_pair, capsys, damage):
    name, compress, spoil, message = DAMAGES[damage]
    # noise, so that compression leaves data in every part of the stream
    array = blob() + np.random.default_rng(0).normal(0, 1, blob().shape).astype(np.float32)
    damaged = spoil(write_image(tmp_path / name, array, compress=compress))
    line = run_failing(register((good_pair[0], damaged), tmp_path / "out"), capsys, tmp_path / "out", message)
    assert "--moving" in line and str(damaged) in line


def test_a_real_nifti_cut_in_half_is_refused(tmp_path, data_file, capsys):
    fixed = data_file("mrbraintumor_5mm/MRBrainTumor1.nii.gz")
    half = tmp_path / "MRBrainTumor2_half.nii.gz"
    whole = data_file("mrbraintumor_5mm/MRBrainTumor2.nii.gz").read_bytes()
    half.write_bytes(whole[: len(whole) // 2])
    line = run_failing(register((fixed, half), tmp_path / "out"), capsys, tmp_path / "out", "truncated")
    assert str(half) in line


def test_2d_image_is_refused(tmp_path, good_pair, capsys):
    flat = write_image(tmp_path / "slice.nrrd", blob()[10])
    output = tmp_path / "out"
    run_failing(register((flat, good_pair[1]), output), capsys, output, "3D")


def test_image_whose_axes_are_not_perpendicular_is_refused_in_one_line(tmp_path, good_pair, capsys):
    sheared = write_image(tmp_path / "sheared.nrrd", blob(), direction=(1, 0.3, 0, 0, 1, 0, 0, 0, 1))
    output = tmp_path / "out"
    line = run_failing(register((sheared, good_pair[1]), output), capsys, output, "not perpendicular")
    assert str(sheared) in line and "resample" in line


def test_all_zero_volume_is_refused(tmp_path, good_pair, capsys):
    zeros = write_image(tmp_path / "zeros.nrrd", np.zeros((20, 22, 24), np.float32))
    output = tmp_path / "out"
    run_failing(register((good_pair[0], zeros), output), capsys, output, "empty")


def test_nan_volume_is_refused(tmp_path, good_pair, capsys):
    array = blob()
    array[5, 5, 5] = np.nan
    nan_image = write_image(tmp_path / "nan.nrrd", array)
    output = tmp_path / "out"
    run_failing(register((nan_image, good_pair[1]), output), capsys, output, "NaN")


def test_nan_in_a_nifti_is_read_as_zero_by_itk_as_the_help_says(tmp_path, good_pair, capsys):
    # Not a refusal: ITK's NIfTI reader hands 0 where the file has NaN or inf. The help says so.
    array = blob()
    array[5, 5, 5], array[6, 6, 6] = np.nan, np.inf
    nifti = write_image(tmp_path / "nan.nii.gz", array)
    assert np.isfinite(sitk.GetArrayFromImage(sitk.ReadImage(str(nifti)))).all()
    assert main(register((nifti, good_pair[1]), tmp_path / "out")) == 0, capsys.readouterr().err
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["register", "--help"])
    assert "NaN or infinite voxels: ITK's NIfTI reader turns them into 0" in " ".join(capsys.readouterr().out.split())


# ================================================================================ inputs that do not fit together
def test_label_map_with_other_geometry_is_refused(tmp_path, good_pair, capsys):
    labels = write_image(tmp_path / "labels.nrrd", (blob((20, 22, 25)) > 50).astype(np.uint8))
    same = write_image(tmp_path / "moving_labels.nrrd", (blob() > 50).astype(np.uint8))
    output = tmp_path / "out"
    line = run_failing(register(good_pair, output, "--fixed-labels", str(labels), "--moving-labels", str(same)),
                       capsys, output, "does not have the geometry")
    assert "resample" in line  # says how to fix it
    assert "shape (Z, Y, X) is (20, 22, 25), the image's (20, 22, 24)" in line


def test_label_map_whose_origin_alone_differs_names_the_origin_and_both_values(tmp_path, good_pair, capsys):
    shifted = write_image(tmp_path / "labels.nrrd", (blob() > 50).astype(np.uint8), origin=(5.0, 0.0, 0.0))
    same = write_image(tmp_path / "moving_labels.nrrd", (blob() > 50).astype(np.uint8))
    output = tmp_path / "out"
    line = run_failing(register(good_pair, output, "--fixed-labels", str(shifted), "--moving-labels", str(same)),
                       capsys, output, "does not have the geometry")
    # LPS (5, 0, 0) on disk is RAS (-5, 0, 0); only the origin differs, so only it is named
    assert "its origin (RAS mm) is (-5.0, 0.0, 0.0), the image's (0.0, 0.0, 0.0)" in line
    assert "spacing" not in line and "shape" not in line


def test_no_overlap_after_initialization_is_refused(tmp_path, good_pair, capsys):
    far = write_image(tmp_path / "far.nrrd", blob(), origin=(5000.0, 0.0, 0.0))
    output = tmp_path / "out"
    run_failing(register((good_pair[0], far), output, "--initialization", "none"), capsys, output, "does not overlap")


# ================================================================================ options
def test_missing_file_and_bad_options_are_refused(tmp_path, good_pair, capsys):
    output = tmp_path / "out"
    run_failing(register((tmp_path / "nope.nrrd", good_pair[1]), output), capsys, output, "not found")
    run_failing(register(good_pair, output, "--lambda", "1.5"), capsys, output, "[0, 1]")
    run_failing(["register", "--fixed", str(good_pair[0]), "--output-dir", str(output), *FAST],
                capsys, output, "both --fixed and --moving")
    run_failing(["register", "--output-dir", str(output), "--eval-labels", "2,x", *FAST], capsys, output, "integers")
    labels_json = tmp_path / "labels.json"
    labels_json.write_text(json.dumps({"a": [1, 2]}))
    run_failing(["register", "--output-dir", str(output), "--labels-json", str(labels_json), "--labels-key", "b", *FAST],
                capsys, output, "no key 'b'")


@pytest.mark.parametrize("sweep", ["", " , "])
def test_empty_lambda_sweep_is_refused_not_skipped(tmp_path, good_pair, capsys, sweep):
    output = tmp_path / "out"
    run_failing(register(good_pair, output, f"--lambda-sweep={sweep}"), capsys, output, "--lambda-sweep needs at least one")


@pytest.mark.parametrize("device", ["mps", "meta", "foo", "cpu:x"])
def test_a_device_other_than_cpu_or_cuda_is_refused(tmp_path, good_pair, capsys, device):
    output = tmp_path / "out"
    line = run_failing(register(good_pair, output, "--device", device), capsys, output, f"'{device}'")
    assert "'cpu', 'cuda'" in line


# ================================================================================ network weights files
TINY = NetworkConfig(encoder_features=(4, 8, 8), decoder_features=(8,), head_features=4, condition_features=8,
                     integration_steps=4, output_level=1)


class NotAWeight:
    """A pickled object in a weights file: torch.load(weights_only=True) refuses it."""


def _payload(tmp_path) -> dict:
    metadata = {"working_grid": {"spacing_mm": 3.0, "direction_ras": np.eye(3).tolist()}}
    good = save_checkpoint(tmp_path / "good.pt", random_network(TINY), metadata)
    return torch.load(good, weights_only=True)


def _scaled_weights(payload: dict, factor: float) -> dict:
    return {**payload, "state_dict": {k: v * factor if v.is_floating_point() else v for k, v in payload["state_dict"].items()}}


MODEL_FILES = {
    "garbage bytes": (lambda p, tmp: (tmp / "m.pt").write_bytes(b"not a torch file"), "not a valid LearnedRegistration weights file"),
    "truncated": (lambda p, tmp: (tmp / "m.pt").write_bytes((tmp / "good.pt").read_bytes()[:300]),
                  "not a valid LearnedRegistration weights file"),
    "pickled object": (lambda p, tmp: torch.save({**p, "extra": NotAWeight()}, tmp / "m.pt"),
                       "not a valid LearnedRegistration weights file"),
    "NaN weights": (lambda p, tmp: torch.save(_scaled_weights(p, float("nan")), tmp / "m.pt"), "NaN or infinite"),
    # finite weights, infinite fields: refused from the computed registration, before anything is written
    "weights that overflow": (lambda p, tmp: torch.save(_scaled_weights(p, 1e30), tmp / "m.pt"), "NaN or infinite values in the"),
    "absurd integration steps": (lambda p, tmp: torch.save({**p, "config": {**p["config"], "integration_steps": 10**9}},
                                                           tmp / "m.pt"), "'integration_steps' must be an integer"),
}


@pytest.mark.parametrize("kind", list(MODEL_FILES))
def test_unusable_network_weights_file_is_refused_in_one_line(tmp_path, good_pair, capsys, kind):
    make, message = MODEL_FILES[kind]
    make(_payload(tmp_path), tmp_path)
    output = tmp_path / "out"
    line = run_failing(register(good_pair, output, "--method", "network", "--model", str(tmp_path / "m.pt")),
                       capsys, output, message)
    assert str(tmp_path / "m.pt") in line
    assert "weights_only" not in line  # torch's advice to load unsafely is never passed on


# ================================================================================ the output folder
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
    status = main(register(good_pair, output))
    captured = capsys.readouterr()
    assert status == EXIT_USER_ERROR
    assert "cannot write" in captured.err and "Traceback" not in captured.err
    assert computed == []  # refused before any computation
    assert not output.exists()


def test_output_path_that_is_a_file_is_refused(tmp_path, good_pair, capsys):
    output = tmp_path / "result"
    output.write_text("a file")
    status = main(register(good_pair, output))
    assert status == EXIT_USER_ERROR
    assert "not a folder" in capsys.readouterr().err
    assert output.read_text() == "a file"


@pytest.mark.parametrize("option,name,link", [
    ("--moving", "warped.nrrd", None),            # the very file this run would write
    ("--lambda-map", "lambda_map.nrrd", None),
    ("--fixed-mask", "warped_labels.nrrd", None),  # a previous run's output this run would remove as stale
    ("--moving", "warped.nrrd", "symlink"),        # the output name is a link to the input
    ("--moving", "warped.nrrd", "hardlink"),
])
def test_an_output_path_that_is_an_input_is_refused_before_any_work(tmp_path, good_pair, capsys, monkeypatch, option, name, link):
    output = tmp_path / "out"
    output.mkdir()
    contents = {"--moving": blob(centre=(10, 11, 12.5)), "--lambda-map": blob() / blob().max(),
                "--fixed-mask": (blob() > 50).astype(np.uint8)}
    if link is None:
        source = write_image(output / name, contents[option])
    else:
        source = good_pair[1]
        (os.symlink if link == "symlink" else os.link)(source, output / name)
    argv = register(good_pair, output)
    argv = ([a if a != str(good_pair[1]) else str(source) for a in argv] if option == "--moving"
            else [*argv, option, str(source)])
    computed, compute = [], RegistrationLogic.computeRegistration
    monkeypatch.setattr(RegistrationLogic, "computeRegistration", lambda *a, **k: computed.append(1) or compute(*a, **k))
    line = run_failing(argv, capsys, output, f"{option} '{source}' is the output file")
    assert str(output / name) in line
    assert computed == []


def test_a_folder_named_like_an_output_is_refused_and_never_deleted(tmp_path, capsys):
    output = tmp_path / "out"
    (output / "metrics.json").mkdir(parents=True)
    (output / "metrics.json" / "precious.txt").write_text("a user's folder that happens to have this name")
    line = run_failing(["register", "--output-dir", str(output), *DEMO], capsys, output, "is a folder")
    assert str(output / "metrics.json") in line
    assert (output / "metrics.json" / "precious.txt").read_text().startswith("a user's folder")


def test_a_new_run_replaces_the_previous_set_and_touches_nothing_else(tmp_path, capsys):
    output = tmp_path / "out"
    assert main(["register", "--output-dir", str(output), "--method", "optimize", "--lambda-sweep", "0.5", *DEMO]) == 0
    assert {"lambda_sweep.json", "lambda_sweep.png", "warped_labels.nrrd"} <= {p.name for p in output.iterdir()}
    # the user's own things, including a file and a folder with no tool name, and a tool-named
    # file of the previous set that the user has since rewritten (so no longer the one written)
    (output / "notes.txt").write_text("keep me")
    (output / "plots").mkdir()
    (output / "plots" / "a.png").write_bytes(b"png")
    (output / "lambda_sweep.json").write_text("[] # the user's own edit")
    assert main(["register", "--output-dir", str(output), *DEMO]) == 0, capsys.readouterr().err
    present = {p.name for p in output.iterdir()}
    assert "lambda_sweep.png" not in present  # the previous run's, not written by this one: removed
    assert (output / "lambda_sweep.json").read_text() == "[] # the user's own edit"  # changed since: kept
    assert (output / "notes.txt").read_text() == "keep me" and (output / "plots" / "a.png").read_bytes() == b"png"
    second = json.loads((output / "metrics.json").read_text())
    assert "lambda_sweep" not in second
    assert present == set(second["output_files"]) | {"metrics.json", "notes.txt", "plots", "lambda_sweep.json"}
    for name, size in second["output_files"].items():
        assert (output / name).stat().st_size == size, name
    assert not staging_folders(tmp_path)


def test_a_full_disk_gives_one_line_and_leaves_nothing(tmp_path, capfd, monkeypatch):
    """Writing into /dev/full fails with ENOSPC, through the real ITK, HDF5 and NRRD writers; their
    error output (174 lines from HDF5) must not reach the user, only one line."""
    for target in ("transform.h5", "warped.nrrd"):
        for method in ("saveNode", "saveVolumeOnGrid"):
            original = getattr(headless.HeadlessSlicer, method, None)
            if original is None:
                continue

            def into_full_disk(self, node, path, *args, _original=original, _target=target):
                if Path(path).name == _target:
                    os.symlink("/dev/full", path)
                return _original(self, node, path, *args)

            monkeypatch.setattr(headless.HeadlessSlicer, method, into_full_disk)
        monkeypatch.setattr(shutil, "disk_usage", lambda path: type("Usage", (), {"free": 0})())
        output = tmp_path / "out"
        status = main(["register", "--output-dir", str(output), *DEMO])
        err = capfd.readouterr().err
        assert status == EXIT_USER_ERROR
        assert err.strip().splitlines() == [
            f"learnedreg: error: could not write {target} for the output folder '{output}': "
            f"the disk holding '{tmp_path}' is full (0 B free)"
        ]
        assert not output.exists() and not staging_folders(tmp_path)
        monkeypatch.undo()


# ================================================================================ signals and killed runs
def test_sighup_cleans_up_like_ctrl_c(tmp_path, good_pair, capsys, monkeypatch):
    def hung_up(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGHUP)
        time.sleep(5)  # the handler interrupts this
        raise AssertionError("SIGHUP did not interrupt the registration")

    class Unhandled(BaseException):
        pass

    def not_handled(signum, frame):  # what SIGHUP would do without the command's handler: end pytest
        raise Unhandled

    previous = signal.signal(signal.SIGHUP, not_handled)
    try:
        monkeypatch.setattr(RegistrationLogic, "computeRegistration", hung_up)
        status = main(register(good_pair, tmp_path / "out"))
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert status == 128 + signal.SIGHUP
    assert capsys.readouterr().err.strip() == "learnedreg: interrupted (SIGHUP); nothing was written"
    assert not (tmp_path / "out").exists() and not staging_folders(tmp_path)


def test_ctrl_c_leaves_nothing_written(tmp_path, good_pair, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(RegistrationLogic, "writeOutputs", interrupted)
    output = tmp_path / "out"
    status = main(register(good_pair, output))
    assert status == EXIT_INTERRUPTED == 130
    assert "interrupted" in capsys.readouterr().err
    assert not output.exists()
    assert {p.name for p in tmp_path.iterdir()} == {"fixed.nrrd", "moving.nrrd"}  # no staging folder left


#: A process that stages an output (as a run does) and waits.
STAGE_AND_WAIT = """
import sys, time
from LearnedRegistrationLib.app.outputs import StagedOutput
staged = StagedOutput(sys.argv[1])
print(staged.staging, flush=True)
time.sleep(120)
"""


def start_slow_demo(output: Path) -> subprocess.Popen:
    """``learnedreg register`` on the demo pair with a slow setting (minutes), in a subprocess."""
    return subprocess.Popen(
        [sys.executable, "-m", "LearnedRegistrationLib.app.cli", "register", "--output-dir", str(output),
         "--demo-size", "48", "--iteration-scale", "20", "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def wait_until_registering(process: subprocess.Popen, parent: Path) -> Path:
    """The staging folder of ``process`` once Slicer is loaded (its scene cache exists) and a moment more."""
    deadline = time.monotonic() + 120
    while True:
        found = [parent / name for name in staging_folders(parent) if (parent / name / ".cache").is_dir()]
        if found:
            break
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.1)
    time.sleep(2.0)  # let the registration start
    assert process.poll() is None
    return found[0]


def test_sigterm_while_registering_cleans_up_and_exits_143(tmp_path):
    output = tmp_path / "out"
    process = start_slow_demo(output)
    try:
        wait_until_registering(process, tmp_path)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert stderr.strip().splitlines() == ["learnedreg: interrupted (SIGTERM); nothing was written"]
    assert not output.exists()
    assert not staging_folders(tmp_path)  # the hidden staging folder went with it


def test_a_staging_folder_left_by_a_killed_run_is_removed_by_the_next_run(tmp_path, capsys):
    output = tmp_path / "out"
    killed = start_slow_demo(output)
    try:
        stale = wait_until_registering(killed, tmp_path)
        killed.send_signal(signal.SIGKILL)  # no clean-up possible: the staging folder stays
        killed.communicate(timeout=60)
    finally:
        killed.kill()
    assert stale.is_dir() and not process_alive(killed.pid)
    live = subprocess.Popen([sys.executable, "-c", STAGE_AND_WAIT, str(output)], stdout=subprocess.PIPE, text=True)
    try:
        running = Path(live.stdout.readline().strip())
        unknown = tmp_path / ".out.learnedreg-x1y2z3"  # no process id in its name: whose is it?
        unknown.mkdir()
        assert running.is_dir()
        assert main(["register", "--output-dir", str(output), *DEMO]) == 0, capsys.readouterr().err
        assert not stale.exists()  # its process is gone: removed
        assert running.is_dir() and unknown.is_dir()  # a live run's, and one we cannot attribute: kept
    finally:
        live.kill()
        live.wait()


KILLED_WHILE_PUBLISHING = """
import os, signal, sys
from pathlib import Path
from LearnedRegistrationLib.app import outputs
from LearnedRegistrationLib.app.cli import main
output = Path(sys.argv[1]).absolute()
real_replace = os.replace
moved = []

def replace_then_die(source, target):
    real_replace(source, target)
    if Path(target).parent == output:
        moved.append(target)
        if len(moved) == 2:  # two files of the new set are in place, the others not yet
            os.kill(os.getpid(), signal.SIGKILL)

outputs.os.replace = replace_then_die
main(["register", "--output-dir", str(output), *sys.argv[2:]])
"""


def test_a_run_killed_while_publishing_is_completed_by_the_next_one(tmp_path, capsys):
    output = tmp_path / "out"
    assert main(["register", "--output-dir", str(output), "--method", "optimize", "--lambda-sweep", "0.5", *DEMO]) == 0
    first = json.loads((output / "metrics.json").read_text())
    killed = subprocess.run([sys.executable, "-c", KILLED_WHILE_PUBLISHING, str(output), "--lambda", "0.6", *DEMO],
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert json.loads((output / "metrics.json").read_text()) == first  # the record is renamed in last
    assert len(staging_folders(tmp_path)) == 1  # committed, not yet complete
    # The next run into the folder first completes the committed set (then writes its own).
    outputs.StagedOutput(output).discard()
    second = json.loads((output / "metrics.json").read_text())
    assert second["lambda"] == pytest.approx(0.6) and "lambda_sweep" not in second
    assert {p.name for p in output.iterdir()} == set(second["output_files"]) | {"metrics.json"}  # no sweep files left
    for name, size in second["output_files"].items():
        assert (output / name).stat().st_size == size, name
    assert not staging_folders(tmp_path)


# ================================================================================ voxel grids that must survive
def _identity_run(fixed: Path, labels: Path, output: Path) -> None:
    """Register an image to itself with no deformation (λ = 1, no initialization): every output
    is the input again, voxel for voxel."""
    status = main(["register", "--fixed", str(fixed), "--moving", str(fixed), "--fixed-labels", str(labels),
                   "--moving-labels", str(labels), "--output-dir", str(output), "--method", "optimize",
                   "--lambda", "1", "--initialization", "none", *FAST])
    assert status == 0


def _assert_same_grid_and_voxels(reference: Path, written: Path, exact: bool, compare_voxels: bool = True) -> None:
    a, b = sitk.ReadImage(str(reference)), sitk.ReadImage(str(written))
    assert b.GetSize() == a.GetSize()
    np.testing.assert_allclose(b.GetOrigin(), a.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(b.GetSpacing(), a.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(b.GetDirection(), a.GetDirection(), atol=1e-6)
    if not compare_voxels:
        return
    if exact:
        np.testing.assert_array_equal(sitk.GetArrayFromImage(b), sitk.GetArrayFromImage(a))
    else:
        np.testing.assert_allclose(sitk.GetArrayFromImage(b), sitk.GetArrayFromImage(a), rtol=1e-4, atol=1e-3)


def test_outputs_keep_a_left_handed_fixed_grid_voxel_for_voxel(tmp_path, capsys):
    """Slicer's reader reverses the slice axis of a left-handed file; the output files must not."""
    direction = (1, 0, 0, 0, 1, 0, 0, 0, -1)
    image = blob() + 5.0 * np.indices(blob().shape)[0].astype(np.float32)  # not symmetric along any axis
    fixed = write_image(tmp_path / "fixed.nii.gz", image, origin=(3.0, -4.0, 50.0), direction=direction)
    labels = write_image(tmp_path / "labels.nii.gz", (image > 40).astype(np.int16) + (image > 80),
                         origin=(3.0, -4.0, 50.0), direction=direction)
    _identity_run(fixed, labels, tmp_path / "out")
    _assert_same_grid_and_voxels(labels, tmp_path / "out" / "warped_labels.nrrd", exact=True)
    _assert_same_grid_and_voxels(fixed, tmp_path / "out" / "warped.nrrd", exact=False)


def test_oasis_warped_labels_compare_voxel_by_voxel_with_the_fixed_labels(tmp_path, data_file, capsys):
    """The OASIS files are LIA (a left-handed direction matrix); a 48³ block of them keeps it.

    The affine stage moves an image registered to itself a little (Adam takes full steps on
    round-off gradients), so instead of equality: the Dice computed from the two files, voxel
    by voxel as a user would, is the Dice the tool reports (a re-ordered file gives another)."""
    crops = {}
    for name in ("vxm_test_scan_T1.nii.gz", "vxm_test_scan_aseg.nii.gz"):
        image = sitk.ReadImage(str(data_file(f"brain_oasis/{name}")))
        assert np.linalg.det(np.reshape(image.GetDirection(), (3, 3))) < 0
        crops[name] = tmp_path / name
        sitk.WriteImage(sitk.RegionOfInterest(image, (48, 48, 48), (56, 72, 88)), str(crops[name]))
    labels, output = crops["vxm_test_scan_aseg.nii.gz"], tmp_path / "out"
    _identity_run(crops["vxm_test_scan_T1.nii.gz"], labels, output)
    _assert_same_grid_and_voxels(labels, output / "warped_labels.nrrd", exact=False, compare_voxels=False)
    fixed_labels = sitk.GetArrayFromImage(sitk.ReadImage(str(labels)))
    warped_labels = sitk.GetArrayFromImage(sitk.ReadImage(str(output / "warped_labels.nrrd")))
    reported = json.loads((output / "metrics.json").read_text())["dice_per_label"]
    from_files = dice_per_label(fixed_labels, warped_labels, [int(k) for k in reported])
    assert len(reported) > 5 and {str(k): v for k, v in from_files.items()} == pytest.approx(reported, abs=1e-9)
    assert (fixed_labels == warped_labels).mean() > 0.8
    for name in ("warped.nrrd", "jacobian.nrrd", "displacement.nrrd"):
        _assert_same_grid_and_voxels(crops["vxm_test_scan_T1.nii.gz"], output / name, exact=False, compare_voxels=False)


# ================================================================================ the logic (Python API)
def scene_state(scene) -> dict:
    return {scene.GetNthNode(i).GetID(): scene.GetNthNode(i).GetMTime() for i in range(scene.GetNumberOfNodes())}


def add_pair(scene):
    grid = ImageGrid((20, 22, 24), (2.0, 2.0, 2.0), np.zeros(3), np.eye(3))
    fixed = mrml.updateVolumeNodeFromArray(scene, blob(), grid, name="fixed")
    moving = mrml.updateVolumeNodeFromArray(scene, blob(centre=(10, 11, 12.5)), grid, name="moving")
    return fixed, moving, grid


def test_logic_refuses_a_file_path_or_a_wrong_node_where_a_node_is_expected(slicer_app, tmp_path):
    scene = slicer_app.scene
    fixed, moving, _ = add_pair(scene)
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "points")
    logic = RegistrationLogic()
    state = scene_state(scene)
    path = str(tmp_path / "fixed.nii.gz")
    with pytest.raises(ValueError, match=r"fixedVolumeNode must be a scalar volume node .*got the file path '.*fixed\.nii\.gz'; "
                                         r"load the file into a node first \(slicer\.util\.loadVolume\)"):
        logic.register(path, moving)
    with pytest.raises(ValueError, match="movingVolumeNode .* got the file path"):
        logic.prepareRegistration(fixed, Path(path))
    with pytest.raises(ValueError, match="fixedLabelNode must be a label map volume or segmentation node .*"
                                         "got the vtkMRMLMarkupsFiducialNode 'points'"):
        logic.prepareRegistration(fixed, moving, fixedLabelNode=points, movingLabelNode=moving)
    with pytest.raises(ValueError, match="movingLandmarksNode must be a markups point list node .*got the vtkMRMLScalarVolumeNode 'moving'"):
        logic.prepareRegistration(fixed, moving, fixedLandmarksNode=points, movingLandmarksNode=moving)
    with pytest.raises(ValueError, match="lambdaMapNode .* got a int"):
        logic.prepareRegistration(fixed, moving, lambdaMapNode=3)
    assert scene_state(scene) == state


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
