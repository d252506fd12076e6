"""``scripts/gpu_check.py``, the script a lent GPU runs: its preparation and its dry run, so it cannot rot.

The preparation runs on a tiny subset of the real data (2 label maps on an 8 mm grid, the OASIS
pair strided to 4 mm) into a temporary folder; the dry run (CPU, tiny sizes, one training step)
reads it with the packages the GPU machine lacks made unimportable, as they are there.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "scripts" / "gpu_check.py"
#: Installed here, absent on the GPU machine (its image has torch, numpy, scipy, scikit-image ...).
ABSENT_ON_GPU_MACHINE = ("SimpleITK", "slicer", "vtk", "tqdm", "matplotlib")
#: What the device tool brings back from $OUT: at most 8 files named in these characters.
RETURNED_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def _scripts():
    """``scripts/train.py`` as a module (the prepared data's readers and the OASIS pair)."""
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    try:
        import train
    finally:
        sys.path.remove(str(REPO_ROOT / "scripts"))
    return train


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, data_dir):
    folder = tmp_path_factory.mktemp("gpu_check") / "gpu_data"
    subprocess.run(
        [sys.executable, str(SCRIPT), "--prepare", str(folder), "--source", str(data_dir), "--max-label-maps", "2",
         "--working-spacing", "8", "--oasis-stride", "4", "--threads", "1"],
        cwd=REPO_ROOT, check=True, capture_output=True, text=True, timeout=120,
    )
    return folder


def test_prepare_writes_the_pair_and_label_maps_without_loss(prepared, data_file):
    from LearnedRegistrationLib.engine.common import match_histogram
    from LearnedRegistrationLib.engine.imageio import read_volume

    train = _scripts()
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert manifest["label_maps"]["count"] == 2 and manifest["label_maps"]["working_spacing_mm"] == 8.0
    assert manifest["oasis_pair"]["stride"] == 4
    assert 0 < manifest["size_mib"]["together"] < manifest["size_mib"]["budget"] <= 64

    pair = train.load_prepared_pair(prepared)
    fixed, fixed_grid = read_volume(data_file("brain_oasis/vxm_test_scan_T1.nii.gz"))
    moving, moving_grid = read_volume(data_file("brain_oasis/l2r_subject1_T1.nii.gz"))
    labels, _ = read_volume(data_file("brain_oasis/l2r_subject1_aseg.nii.gz"))
    every4 = (slice(None, None, 4),) * 3
    np.testing.assert_array_equal(pair.fixed, fixed[every4])
    np.testing.assert_array_equal(pair.moving, moving[every4])
    np.testing.assert_array_equal(pair.moving_labels, labels[every4].astype(np.int16))
    np.testing.assert_array_equal(pair.moving_matched, match_histogram(moving[every4], fixed[every4]))
    assert len(pair.labels) == 30
    # the strided grid's voxel (i, j, k) is the 1 mm grid's voxel (4i, 4j, 4k), in RAS
    assert pair.fixed.shape == pair.fixed_grid.shape == fixed[every4].shape
    ijk = np.array([[0, 0, 0, 1], [3, 5, 7, 1], [39, 47, 55, 1]], dtype=float).T
    np.testing.assert_allclose(pair.fixed_grid.ijk_to_ras @ ijk, fixed_grid.ijk_to_ras @ np.diag([4, 4, 4, 1]) @ ijk, atol=1e-9)
    np.testing.assert_allclose(pair.moving_grid.ijk_to_ras @ ijk, moving_grid.ijk_to_ras @ np.diag([4, 4, 4, 1]) @ ijk, atol=1e-9)

    maps, files, values, grid, fov = train.load_prepared_label_maps(prepared)
    assert files == ["training_seg_01.nii.gz", "training_seg_02.nii.gz"] and fov == train.DEFAULT_FOV_MM
    assert maps.shape == (2, 32, 32, 32) and maps.dtype == torch.int64 and grid.spacing == (8.0, 8.0, 8.0)
    assert set(values) <= set(torch.unique(maps).tolist()) and 0 < len(values) and max(values) < 500  # brain labels
    assert (maps > 0).float().mean() > 0.1  # the head is inside the working grid

    # the carried pytest imports on its own (no site-packages: python -S)
    site = prepared / "site-packages"
    found = subprocess.run([sys.executable, "-S", "-c", f"import sys; sys.path.insert(0, {str(site)!r}); import pytest; "
                            "print(pytest.__file__)"], capture_output=True, text=True, check=True).stdout.strip()
    assert found.startswith(str(site))


def test_dry_run_passes_without_the_packages_the_gpu_machine_lacks(prepared, tmp_path):
    blocked = tmp_path / "absent"
    blocked.mkdir()
    for name in ABSENT_ON_GPU_MACHINE:
        (blocked / f"{name}.py").write_text(f"raise ImportError('{name} is not installed on the GPU machine')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(blocked), os.environ.get("PYTHONPATH")])))
    out = tmp_path / "out"
    # one thread: on a shared 2-core machine two threads per process often wait on each other (4x slower here)
    run = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--data", str(prepared), "--output", str(out), "--threads", "1"],
                         cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] and report["dry_run"] and report["device"] == "cpu"

    tests = report["tests"]  # pytest in a child process, every test module collected without SimpleITK
    assert tests["status"] == "ok" and tests["tests"] == 4 and tests["failures"] == tests["errors"] == tests["skipped"] == 0
    assert "4 passed" in (out / tests["log"]).read_text()

    compare = report["compare"]
    assert compare["devices"] == ["cpu", "cpu"] and len(compare["checks"]) == 5
    for check in compare["checks"].values():
        assert check["passed"] and 0.3 < min(check["dice"]) <= max(check["dice"]) < 1.0
        assert 0.0 <= check["field_mm"]["mean"] <= check["field_mm"]["p99"] <= check["field_mm"]["max"]

    speed = report["speed"]
    assert speed["shape_zyx"] == [56, 48, 40] and speed["optimize"]["wall_s"] > 0 and 0.3 < speed["optimize"]["dice"] < 1.0
    assert speed["path"]["knots"] == [0.05, 0.25, 0.5, 0.9]
    for latency in (speed["lambda_change"]["evaluate_warped"], speed["lambda_change"]["predict"]):
        assert latency["count"] == 5 and 0 < latency["median_ms"] <= latency["max_ms"]

    training = report["train"]
    assert training["steps"] == 1 and training["batch_size"] == 2
    assert [row["lambda"] for row in training["validation"]] == [0.2] and 0.0 < training["validation"][0]["dice"] < 1.0
    from LearnedRegistrationLib.learned.checkpoint import load_checkpoint, read_checkpoint
    from LearnedRegistrationLib.learned.weights import shipped_model_path

    network, meta = load_checkpoint(out / training["checkpoint"])
    assert meta["iterations"] == read_checkpoint(shipped_model_path())["metadata"]["iterations"] + 1
    assert meta["optimizer"]["bf16_encoder"] and "prepared" in meta["data"]
    assert meta["working_grid"]["spacing_mm"] == 8.0

    returned = [p for p in out.rglob("*") if p.is_file()]
    assert len(returned) <= 8 and all(RETURNED_NAME.match(p.name) and p.parent == out for p in returned)


def test_bf16_training_forward_runs_the_encoder_in_bf16_and_returns_float32():
    """``--bf16`` (the GPU training): autocast on the encoder only, the fields float32 and close to float32's."""
    from LearnedRegistrationLib.learned.network import NetworkConfig
    from LearnedRegistrationLib.training.objective import network_output
    from LearnedRegistrationLib.training.synthesis import SynthesizedPair

    from conftest import random_network

    network = random_network(NetworkConfig(encoder_features=(4, 8, 8), decoder_features=(8,), head_features=4), seed=2)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 2, 1, 16, 20, 12, generator=g)
    labels = torch.zeros(2, 1, 16, 20, 12, dtype=torch.int64)
    pair = SynthesizedPair(images[0], images[1], labels, labels)
    lam = torch.tensor([0.2, 0.7])
    with torch.no_grad():
        full = network_output(network, pair, lam)
        mixed = network_output(network, pair, lam, torch.bfloat16)
    for a, b in zip(full, mixed):
        assert b.dtype == torch.float32 and b.shape == a.shape
    assert not torch.equal(mixed.velocity, full.velocity)  # the encoder did run in bfloat16
    scale = float(full.displacement.abs().max())
    assert scale > 0 and float((mixed.displacement - full.displacement).abs().max()) < 0.05 * scale
    torch.testing.assert_close(mixed.weight_map, full.weight_map, atol=0.02, rtol=0)
