"""Where the shipped network weights are.

The weights are package data of this package (``learned/models/``), found with
:mod:`importlib.resources`: the same lookup works from a source checkout, an installed wheel and
Slicer's install tree (the extension's CMake copies the file next to the package's modules). No
weights are downloaded, and nothing is ever written there at run time.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

#: The shipped model: trained by ``scripts/train.py`` (its metadata and the README say how).
SHIPPED_MODEL = "lambda_synthmorph_2mm.pt"


def shipped_model_path(name: str = SHIPPED_MODEL) -> Path:
    """Path of a shipped weights file (it may not exist, e.g. in a source tree without weights).

    Raises:
        RuntimeError: when the package is not on a file system (a zip import), where torch could
            not read the file in place.
    """
    location = resources.files(__package__).joinpath("models", name)
    if not isinstance(location, Path):
        raise RuntimeError(f"the shipped weights {name} are not on a file system ({location}); install the package unzipped")
    return location
