"""The web app's data root: every path a browser names is checked here before a file is opened.

``learnedreg serve --data-root DIR`` reads inputs from, and saves results into, ``DIR`` and
nothing else. A browser only ever names paths *relative* to that folder, as text it typed or
picked, and :class:`DataRoot` refuses, with a :class:`ValueError` that says what to change:

- an empty name, an absolute path, a ``~`` or a NUL character;
- any ``..`` component (even one that would end up inside the root: there is no reason to
  write one, and refusing it keeps the rule simple to state);
- a path whose real location, symbolic links resolved (:meth:`pathlib.Path.resolve`), is
  outside the root's real location: a link inside the root that points elsewhere is refused;
- an input that is not one of the single-file formats :data:`IMAGE_SUFFIXES` (NIfTI, NRRD,
  MetaImage ``.mha``), or whose header names a separate data file (a NRRD ``data file:`` field,
  a MetaImage ``ElementDataFile`` other than ``LOCAL``; ``.nhdr``/``.mhd`` are refused by name):
  such a header may name any file on the machine.

Results go into a sub-folder of the root, never the root itself: the command line's output
folder is staged *beside* the folder it replaces (:class:`.outputs.StagedOutput`), so saving
into the root would write into its parent.

The checks are made when a path is used; a link swapped in between a check and the open of the
file (a race with someone who can write inside the root) is not defended against.

Pure standard library, so the checks are tested without the web extra.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

#: The image formats the web app reads: single files, whose voxels are in the file itself.
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
#: Bytes of a NRRD or MetaImage header read to look for a separate data file.
_HEADER_BYTES = 65536
#: The most files :meth:`DataRoot.image_files` lists (a data root with more is cut there).
MAX_LISTED_FILES = 2000


class DataRoot:
    """A folder that the web app reads from and writes into, and the checks on the paths it is given.

    Args:
        folder: the data root (``--data-root``); it must exist and be a folder.

    Attributes:
        folder: the root's real location (absolute, symbolic links resolved).

    Raises:
        ValueError: ``folder`` does not exist or is not a folder.
    """

    def __init__(self, folder: str | os.PathLike):
        path = Path(folder).expanduser()
        if not path.is_dir():
            raise ValueError(f"the data root '{folder}' is not a folder; give an existing folder with --data-root")
        self.folder = path.resolve()

    def __repr__(self) -> str:
        return f"DataRoot('{self.folder}')"

    def _checked(self, relative: str, what: str) -> Path:
        """The real location of ``relative`` (not necessarily existing), refused outside the root."""
        text = str(relative if relative is not None else "").strip()
        if not text:
            raise ValueError(f"give the {what} as a path relative to the data root")
        if "\x00" in text:
            raise ValueError(f"the {what} '{text!r}' holds a NUL character")
        if text.startswith("~") or os.path.isabs(text) or PurePosixPath(text).is_absolute():
            raise ValueError(f"the {what} '{text}' is an absolute path; give a path relative to the data root")
        parts = Path(text).parts
        if ".." in parts or ".." in PurePosixPath(text).parts:
            raise ValueError(f"the {what} '{text}' contains '..'; give a path inside the data root without '..'")
        resolved = (self.folder / text).resolve()
        if resolved != self.folder and not resolved.is_relative_to(self.folder):
            raise ValueError(
                f"the {what} '{text}' leads outside the data root (through a symbolic link); "
                "choose a file inside the data root"
            )
        return resolved

    def input_file(self, relative: str, what: str = "input file") -> Path:
        """The real path of an existing file inside the root.

        Args:
            relative: the path as the browser gave it, relative to the root (e.g. ``"oasis/fixed.nii.gz"``).
            what: how messages call it ("fixed image", ...).

        Returns:
            The absolute path, symbolic links resolved, inside :attr:`folder`.

        Raises:
            ValueError: an empty, absolute or ``..`` path, one leading outside the root, no such
                file, or a detached-header format.
        """
        path = self._checked(relative, what)
        if not path.is_file():
            raise ValueError(f"the {what} '{relative}' is not a file in the data root")
        if not path.name.lower().endswith(IMAGE_SUFFIXES):
            raise ValueError(
                f"the {what} '{relative}' is not a {', '.join(IMAGE_SUFFIXES)} file; the web app reads only these "
                "single-file formats (convert it, e.g. with SimpleITK)"
            )
        if _names_separate_data_file(path):
            raise ValueError(
                f"the {what} '{relative}' has a header naming a separate data file, which may lie outside the data "
                "root; save it as one file (voxels inside, e.g. .nrrd or .nii.gz)"
            )
        return path

    def output_folder(self, relative: str) -> Path:
        """The real path of a results folder inside the root (it need not exist yet).

        Raises:
            ValueError: an empty, absolute or ``..`` path, one leading outside the root, the
                root itself, or an existing file.
        """
        path = self._checked(relative, "results folder")
        if path == self.folder:
            raise ValueError("save into a folder inside the data root, not into the data root itself")
        if path.exists() and not path.is_dir():
            raise ValueError(f"the results folder '{relative}' is a file; choose another name")
        return path

    def image_files(self, limit: int = MAX_LISTED_FILES) -> list[str]:
        """Relative paths of the image files under the root (by name ending, :data:`IMAGE_SUFFIXES`), sorted.

        Hidden files and folders (names starting with '.', e.g. a staging folder) are skipped,
        and so are links that lead outside the root. At most ``limit`` paths.
        """
        found = []
        for path in self._walk():
            if path.name.lower().endswith(IMAGE_SUFFIXES):
                found.append(path.relative_to(self.folder).as_posix())
                if len(found) >= limit:
                    break
        return sorted(found)

    def _walk(self) -> Iterator[Path]:
        for directory, folders, files in os.walk(self.folder, followlinks=False):
            folders[:] = sorted(f for f in folders if not f.startswith("."))
            for name in sorted(files):
                if name.startswith("."):
                    continue
                path = Path(directory) / name
                real = path.resolve()
                if real.is_file() and (real == self.folder or real.is_relative_to(self.folder)):
                    yield path


def _names_separate_data_file(path: Path) -> bool:
    """True when a NRRD header has a ``data file`` field, or a MetaImage header an ``ElementDataFile``
    that is not ``LOCAL`` (the voxels would be read from another file, named by the header); also
    True when the header does not end within its first :data:`_HEADER_BYTES` (it cannot be told)."""
    name = path.name.lower()
    if not name.endswith((".nrrd", ".mha")):
        return False
    with open(path, "rb") as file:
        head = file.read(_HEADER_BYTES)
    for raw in head.split(b"\n")[:-1]:  # complete lines only
        line = raw.decode("latin-1").strip()
        if name.endswith(".nrrd"):
            if not line:  # the blank line that ends a NRRD header
                return False
            if ":=" not in line and line.split(":", 1)[0].strip().lower() in ("data file", "datafile"):
                return True
        elif line.split("=", 1)[0].strip().lower() == "elementdatafile":  # the last field of a MetaImage header
            return line.partition("=")[2].strip().upper() != "LOCAL"
    return True
