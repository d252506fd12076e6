"""Shared pytest fixtures: the real-data folder and a headless slicer-core scene.

Real data (never copied into the repository) is read from ``$LEARNEDREG_DATA``, by default
``<repo>/../shared/data``. A test that needs it is skipped with the reason when it is missing, and
fails instead when ``LEARNEDREG_REQUIRE_DATA=1`` (as in CI).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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


@pytest.fixture
def slicer_app(tmp_path):
    """A fresh headless slicer-core scene with the module logics (closed after the test)."""
    from LearnedRegistrationLib.headless import HeadlessSlicer

    app = HeadlessSlicer(cacheDirectory=tmp_path / "mrml-cache")
    yield app
    app.close()
