"""End-to-end CLI run on the real OASIS pair (moving l2r_subject1 -> fixed vxm_test_scan), default options.

Scored over the 30 VoxelMorph labels of ``labels.json``. ``scripts/benchmark_oasis.py`` measured
Dice 0.75 at the default λ on this pair; the test allows 0.02 below that for CPU/BLAS differences.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from LearnedRegistrationLib.cli import main


@pytest.fixture(scope="module")
def oasis_run(tmp_path_factory, data_file):
    folder = data_file("brain_oasis")
    output = tmp_path_factory.mktemp("oasis") / "result"
    status = main([
        "register",
        "--fixed", str(folder / "vxm_test_scan_T1.nii.gz"),
        "--moving", str(folder / "l2r_subject1_T1.nii.gz"),
        "--fixed-labels", str(folder / "vxm_test_scan_aseg.nii.gz"),
        "--moving-labels", str(folder / "l2r_subject1_aseg.nii.gz"),
        "--labels-json", str(folder / "labels.json"),
        "--output-dir", str(output),
        "--quiet",
    ])
    return status, output


def test_oasis_dice_over_30_labels(oasis_run, data_file):
    status, output = oasis_run
    assert status == 0
    metrics = json.loads((output / "metrics.json").read_text())
    labels = json.loads(data_file("brain_oasis/labels.json").read_text())["voxelmorph_eval_labels_30"]
    assert sorted(int(k) for k in metrics["dice_per_label"]) == sorted(labels)
    assert metrics["dice_mean_initial"] == pytest.approx(0.522, abs=0.01)  # the pair's Dice before registration
    assert metrics["dice_mean"] >= 0.73
    assert metrics["folding_percent"] < 0.1
    assert metrics["hd95_mean_mm"] < 4.0
    assert (output / "warped_labels.nrrd").is_file() and (output / "scene.mrb").is_file()
