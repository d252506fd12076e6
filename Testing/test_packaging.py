"""The package as users get it: a wheel built from the source, with the shipped weights inside, that
runs the network method on the demo pair when installed without the source tree.

The wheel is built from a copy of the package's sources (so no stale build folder can leak into it)
with the environment's setuptools, installed with ``pip install --target`` into a folder of its
own, and run with that folder first on ``PYTHONPATH``; the test checks that the code that ran came
from there, not from the editable checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIB = ROOT / "LearnedRegistration" / "LearnedRegistrationLib"
WEIGHTS = "LearnedRegistrationLib/learned/models/lambda_synthmorph_2mm.pt"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(LIB, source / "LearnedRegistration" / "LearnedRegistrationLib",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp_path_factory.mktemp("dist")
    completed = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(dist), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    (built,) = dist.glob("learnedregistration-*.whl")
    return built


def test_wheel_holds_every_layer_the_weights_and_the_entry_point(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        weights = archive.getinfo(WEIGHTS)
        entry_points = next(archive.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert weights.file_size == (LIB / "learned" / "models" / "lambda_synthmorph_2mm.pt").stat().st_size
    sources = {str(p.relative_to(LIB.parent)) for p in LIB.rglob("*.py") if "__pycache__" not in p.parts}
    assert sources <= names, f"missing from the wheel: {sorted(sources - names)}"
    assert "learnedreg = LearnedRegistrationLib.app.cli:main" in entry_points


def test_installed_wheel_runs_the_network_on_the_demo_pair(wheel, tmp_path):
    site = tmp_path / "site"
    completed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(site), str(wheel)],
        capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run(
        [sys.executable, "-c", "import LearnedRegistrationLib.learned.weights as w; print(w.shipped_model_path())"],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
    )
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(site)  # the installed copy, not the checkout

    output = tmp_path / "demo"
    run = subprocess.run(
        [sys.executable, str(site / "bin" / "learnedreg"), "register", "--method", "network", "--output-dir", str(output),
         "--quiet", "--demo-size", "32", "--device", "cpu"],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["method"] == "network"
    assert metrics["displacement_error_mean_mm"] < metrics["true_displacement_mean_mm"]
    assert (output / "lambda_map.nrrd").is_file() and (output / "scene.mrb").is_file()
