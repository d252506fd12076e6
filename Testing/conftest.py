"""Shared pytest fixtures and helpers: the real-data folder, a headless slicer-core scene, oblique
grids, world-space phantoms and tiny random networks.

Real data (never copied into the repository) is read from ``$LEARNEDREG_DATA``, by default
``<repo>/../shared/data``. A test that needs it is skipped with the reason when it is missing, and
fails instead when ``LEARNEDREG_REQUIRE_DATA=1`` (as in CI).

The helpers are plain functions; test modules import them with ``from conftest import ...``
(pytest puts this folder on ``sys.path``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from LearnedRegistrationLib.engine.grid import ImageGrid

REPO_ROOT = Path(__file__).resolve().parents[1]


def _data_root() -> Path:
    return Path(os.environ.get("LEARNEDREG_DATA", REPO_ROOT.parent / "shared" / "data")).expanduser()


def _missing(what: str) -> None:
    message = (
        f"{what} not found; set LEARNEDREG_DATA to the shared data folder "
        f"(default <repo>/../shared/data, see its README.md)"
    )
    if os.environ.get("LEARNEDREG_REQUIRE_DATA") == "1":
        pytest.fail(f"LEARNEDREG_REQUIRE_DATA=1 but {message}")
    pytest.skip(message)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real-data folder (skips, or fails with LEARNEDREG_REQUIRE_DATA=1, when absent)."""
    root = _data_root()
    if not root.is_dir():
        _missing(f"real-data folder '{root}'")
    return root


@pytest.fixture(scope="session")
def data_file(data_dir):
    """Factory: ``data_file("mrbraintumor_5mm/MRBrainTumor1.nii.gz")`` -> Path, skipping/failing when missing."""

    def get(relative: str) -> Path:
        path = data_dir / relative
        if not path.exists():
            _missing(f"data file '{path}'")
        return path

    return get


@pytest.fixture(scope="session")
def device():
    """The torch device the engine tests compute on: ``$LEARNEDREG_TEST_DEVICE`` (default ``cpu``).

    ``LEARNEDREG_TEST_DEVICE=cuda`` runs them on a GPU (``scripts/gpu_check.py`` does so on a lent
    one). A device that is not there fails the test rather than skipping it, so a GPU run cannot
    silently test the CPU.
    """
    from LearnedRegistrationLib.engine.common import choose_device

    name = os.environ.get("LEARNEDREG_TEST_DEVICE", "").strip() or "cpu"
    try:
        return choose_device(name)
    except ValueError as exc:
        pytest.fail(f"LEARNEDREG_TEST_DEVICE={name!r}: {exc}")


@pytest.fixture
def slicer_app(tmp_path):
    """A fresh headless slicer-core scene with the module logics (closed after the test)."""
    from LearnedRegistrationLib.app.headless import HeadlessSlicer

    app = HeadlessSlicer(cacheDirectory=tmp_path / "mrml-cache")
    yield app
    app.close()


# --------------------------------------------------------------------------------------------- helpers
def rotation_about(axis, degrees) -> np.ndarray:
    """(3, 3) rotation by ``degrees`` about ``axis`` (Rodrigues' formula)."""
    axis = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    t = np.deg2rad(degrees)
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


def oblique_grid(shape=(12, 14, 16), spacing=(0.9, 1.7, 2.6), seed=3, origin=(12.5, -30.25, 41.0), direction=None) -> ImageGrid:
    """An anisotropic grid with an off-centre origin, oriented by ``direction`` or by a random proper
    rotation drawn with ``seed``, so that every RAS/LPS and IJK/KJI convention matters."""
    if direction is None:
        q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
        if np.linalg.det(q) < 0:
            q[:, 0] *= -1
        direction = q
    return ImageGrid(shape, spacing, np.asarray(origin, dtype=np.float64), np.asarray(direction, dtype=np.float64))


def blobs(grid: ImageGrid, shift=(0.0, 0.0, 0.0)) -> np.ndarray:
    """Smooth blobs around the grid centre, placed in world (RAS) space, so two grids see the same
    object; ``shift`` (mm) moves it. (Z, Y, X) float32."""
    p = grid.world_points() - grid.center_ras - np.asarray(shift)
    image = np.exp(-(p**2).sum(-1) / (2 * 9.0**2)) + 0.6 * np.exp(-((p - [5.0, -4.0, 3.0]) ** 2).sum(-1) / (2 * 4.0**2))
    return image.astype(np.float32)


def random_network(config, seed: int = 0):
    """A ``RegistrationNetwork(config)`` whose zero-initialized FiLM layers and heads get random weights,
    so that the predicted field is not the identity and λ changes it."""
    import torch

    from LearnedRegistrationLib.learned.network import RegistrationNetwork

    torch.manual_seed(seed)
    net = RegistrationNetwork(config)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "film" in name:
                p.normal_(0.0, 0.3)
            elif name in ("velocity_head.weight", "weight_head.weight"):
                p.normal_(0.0, 0.05)
    return net


def process_alive(pid: int) -> bool:
    """True while a process with this id exists (POSIX; a zombie that nobody waited for counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
