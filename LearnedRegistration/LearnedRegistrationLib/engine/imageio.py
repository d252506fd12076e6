"""Reading and writing volumes with SimpleITK, converting LPS geometry through :class:`grid.ImageGrid`.

Used by the scripts and tests that work without an MRML scene, and by the command line to check
its input files before Slicer reads them (:func:`check_image_file`) and to write its output
volumes on the fixed image's own voxel grid (:func:`reindex_to_grid`, :func:`write_volume`); the
Slicer side goes through :mod:`bridge.mrml`. Arrays are (Z, Y, X) = KJI, as SimpleITK's
``GetArrayFromImage`` returns them.

Why :func:`check_image_file` exists: ITK's NIfTI reader fills the missing part of a file that was
cut short (an interrupted copy or download) with zeros and reports success, and reads a
compressed file without checking the gzip checksum. So before any reader sees a file, the whole
compressed stream is decompressed once (it must end properly, with a valid CRC-32 and length),
and for NIfTI and NRRD the number of voxel bytes the header announces must be there. (ITK's NIfTI
reader also turns NaN and infinite voxels into 0; that cannot be told from the file's header, so
callers document it instead.)
"""

from __future__ import annotations

import bz2
import gzip
import math
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .grid import ImageGrid

_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 20
#: Bytes of the decompressed stream kept for header parsing (a NIfTI-2 header is 540 bytes).
_HEAD = 4096
#: Largest NRRD header read (the header is text up to the first blank line).
_NRRD_HEADER_MAX = 1 << 20
#: Bytes per value of the NRRD types (teem's names and their aliases).
_NRRD_TYPE_BYTES = {
    **dict.fromkeys(("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"), 1),
    **dict.fromkeys(("short", "short int", "signed short", "signed short int", "int16", "int16_t", "ushort",
                     "unsigned short", "unsigned short int", "uint16", "uint16_t"), 2),
    **dict.fromkeys(("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32", "uint32_t", "float"), 4),
    **dict.fromkeys(("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64",
                     "int64_t", "ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t",
                     "double"), 8),
}


def grid_from_sitk(image: sitk.Image) -> ImageGrid:
    """:class:`ImageGrid` of a 3D SimpleITK image (LPS geometry converted to RAS).

    Raises:
        ValueError: for an image that is not 3D.
    """
    if image.GetDimension() != 3:
        raise ValueError(f"expected a 3D image, got a {image.GetDimension()}D one")
    return ImageGrid.from_lps(image.GetSize()[::-1], image.GetSpacing(), image.GetOrigin(), image.GetDirection())


def _refuse_if_not_3d(path: Path, size) -> int:
    """Number of leading axes that make the volume (3), or ValueError for a 2D image or a 4D series."""
    size = tuple(int(s) for s in size)
    if len(size) == 2 or (len(size) >= 3 and min(size[:3]) < 2):
        raise ValueError(f"{path} is a 2D image (size {size}); LearnedRegistration registers 3D volumes")
    if len(size) != 3 and not (len(size) > 3 and all(s == 1 for s in size[3:])):
        raise ValueError(f"{path} has {len(size)} dimensions (size {size}); LearnedRegistration registers 3D volumes")
    return 3


def read_volume(path, dtype=np.float32) -> tuple[np.ndarray, ImageGrid]:
    """Read any SimpleITK-readable 3D scalar volume: ``(array (Z, Y, X), ImageGrid)``.

    Raises:
        ValueError: unreadable file, not 3D, or more than one component per voxel.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no such image file: {path}")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise ValueError(f"cannot read {path} as an image: {_last_line(exc)}") from exc
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{path} has {image.GetNumberOfComponentsPerPixel()} components per voxel; expected a scalar volume")
    _refuse_if_not_3d(path, image.GetSize())
    return sitk.GetArrayFromImage(image).astype(dtype, copy=False), grid_from_sitk(image)


def _last_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


# ------------------------------------------------------------------------------------------ input checks
def check_image_file(path) -> ImageGrid:
    """Check an image file before any reader sees it, and return its voxel grid as ITK reads it.

    Checks, each failure one line naming the file:

    - it exists and is a file;
    - a gzip-compressed file (``.nii.gz``, ``.mgz`` ..., or a NRRD with gzip/bzip2 encoding)
      decompresses to its end with a valid checksum;
    - a single-file NIfTI-1/2 (``.nii``, ``.nii.gz``) or a NRRD (``.nrrd``, ``.nhdr`` with its
      data file) holds at least the voxel bytes its header announces;
    - ITK can read the header, the image is 3D (a 4D file with one frame counts), and its voxel
      axes are perpendicular (the direction matrix is orthonormal, within 1e-4).

    The voxels themselves are not loaded here: ITK's NIfTI reader turns NaN and infinite voxels
    into 0, which no header shows.

    Returns:
        The :class:`ImageGrid` (world RAS mm, shape (Z, Y, X)) of the file's voxels in the order
        ITK reads them; :func:`reindex_to_grid` puts an array from another reader onto it.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a truncated or corrupt file, a header ITK cannot read, an image that is not
            3D, or a direction matrix that is not orthonormal.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    _check_complete(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise ValueError(f"cannot read {path} as an image: {_last_line(exc)}") from None
    size = reader.GetSize()
    dimension = _refuse_if_not_3d(path, size)
    full = np.asarray(reader.GetDirection(), dtype=np.float64).reshape(len(size), len(size))
    direction = full[:dimension, :dimension]
    gram = direction.T @ direction
    if not np.allclose(gram, np.eye(3), atol=1e-4):
        norms = np.sqrt(np.clip(np.diag(gram), 1e-30, None))
        cosines = np.abs(gram / np.outer(norms, norms))
        i, j = max(((0, 1), (0, 2), (1, 2)), key=lambda ij: cosines[ij])
        angle = math.degrees(math.acos(min(1.0, float(cosines[i, j]))))
        raise ValueError(
            f"{path} has voxel axes that are not perpendicular (its direction matrix is not orthonormal: "
            f"axes {'IJK'[i]} and {'IJK'[j]} meet at {angle:.2f}° instead of 90°); resample it onto an "
            "orthogonal grid first (e.g. Slicer's Resample Scalar Volume or SimpleITK.Resample)"
        )
    return ImageGrid.from_lps(
        tuple(size[:dimension])[::-1], reader.GetSpacing()[:dimension], reader.GetOrigin()[:dimension], direction.ravel()
    )


def _check_complete(path: Path) -> None:
    """Refuse a file whose compressed stream or voxel data is cut short or corrupt (see :func:`check_image_file`)."""
    with open(path, "rb") as file:
        magic = file.read(4)
    if magic.startswith(b"NRRD"):
        _check_nrrd(path)
        return
    if magic[:2] == _GZIP_MAGIC:
        head, size = _read_through(path, 0, "gzip")
    else:
        head, size = magic + _read_head(path, 4), path.stat().st_size
    end = _nifti_data_end(head, path)
    if end is not None and size < end:
        raise ValueError(_cut_short(path, end, size, "the header and voxel data"))


def _read_head(path: Path, offset: int) -> bytes:
    with open(path, "rb") as file:
        file.seek(offset)
        return file.read(_HEAD - offset)


def _read_through(path: Path, offset: int, encoding: str) -> tuple[bytes, int]:
    """(first bytes, decompressed size) of the gzip or bzip2 stream starting at ``offset``, read to its end.

    Raises:
        ValueError: the stream ends early (truncated file) or is corrupt (bad data or checksum).
    """
    head, total = b"", 0
    with open(path, "rb") as raw:
        raw.seek(offset)
        stream = gzip.GzipFile(fileobj=raw) if encoding == "gzip" else bz2.BZ2File(raw)
        try:
            with stream:
                while chunk := stream.read(_CHUNK):
                    if len(head) < _HEAD:
                        head += chunk[: _HEAD - len(head)]
                    total += len(chunk)
        except EOFError:
            raise ValueError(
                f"{path} is truncated: its {encoding} stream ends before its end marker; copy or download the file again"
            ) from None
        except (OSError, zlib.error) as exc:
            raise ValueError(f"{path} is corrupt: its {encoding} data does not decompress ({_last_line(exc)})") from None
    return head, total


def _cut_short(path: Path, expected: int, found: int, what: str) -> str:
    return (
        f"{path} is incomplete: its header announces {expected} bytes of {what} but the file holds {found}; "
        "it was cut short (an interrupted copy or download?), copy it again"
    )


def _nifti_data_end(head: bytes, path: Path):
    """Byte offset where a single-file NIfTI-1/2's voxel data ends (vox_offset + voxels x bitpix / 8),
    or None for anything else (including header/image pairs, whose data is in the ``.img``)."""
    for endian in "<>":
        if len(head) >= 348 and struct.unpack(endian + "i", head[:4])[0] == 348 and head[344:348] == b"n+1\x00":
            dim = struct.unpack(endian + "8h", head[40:56])
            bitpix = struct.unpack(endian + "h", head[72:74])[0]
            offset = struct.unpack(endian + "f", head[108:112])[0]
        elif len(head) >= 540 and struct.unpack(endian + "i", head[:4])[0] == 540 and head[4:8] == b"n+2\x00":
            bitpix = struct.unpack(endian + "h", head[14:16])[0]
            dim = struct.unpack(endian + "8q", head[16:80])
            offset = struct.unpack(endian + "q", head[168:176])[0]
        else:
            continue
        count = dim[0]
        if not 1 <= count <= 7 or bitpix <= 0 or bitpix % 8 or min(dim[1 : count + 1]) < 0 or not offset >= 0:
            raise ValueError(f"{path} has a corrupt NIfTI header (dim {list(dim)}, bitpix {bitpix}, vox_offset {offset})")
        return int(offset) + math.prod(dim[1 : count + 1]) * (bitpix // 8)
    return None


def _nrrd_header(path: Path) -> tuple[dict, int]:
    """(fields with lower-case keys, byte offset of the data after the header) of a NRRD file."""
    fields: dict = {}
    with open(path, "rb") as file:
        file.readline()  # NRRD000X
        while True:
            line = file.readline(_NRRD_HEADER_MAX)
            if file.tell() > _NRRD_HEADER_MAX:
                raise ValueError(f"{path} has no end to its NRRD header")
            if not line or not line.strip(b"\r\n"):
                return fields, file.tell()
            text = line.decode("latin-1").strip()
            if text.startswith("#") or ":=" in text or ":" not in text:
                continue
            key, value = text.split(":", 1)
            fields[key.strip().lower()] = value.strip()


def _check_nrrd(path: Path) -> None:
    """Voxel bytes of a NRRD (attached, or one detached data file) against its header's sizes and type."""
    fields, offset = _nrrd_header(path)
    try:
        sizes = [int(s) for s in fields.get("sizes", "").split()]
        value_bytes = _NRRD_TYPE_BYTES[fields.get("type", "").lower()]
        byte_skip = int(fields.get("byte skip", "0"))
        line_skip = int(fields.get("line skip", "0"))
    except (KeyError, ValueError):
        return  # a header ITK will judge (block types, odd fields): nothing to count here
    expected = math.prod(sizes) * value_bytes if sizes else 0
    data_file = fields.get("data file", fields.get("datafile"))
    source = path
    if data_file is not None:
        if data_file.startswith("LIST") or "%" in data_file or " " in data_file:
            return  # a list or pattern of data files: ITK checks each
        source = Path(data_file) if os.path.isabs(data_file) else path.parent / data_file
        if not source.is_file():
            raise ValueError(f"{path} names the data file '{data_file}', which does not exist next to it")
        offset = 0
    encoding = fields.get("encoding", "raw").lower()
    if encoding in ("gzip", "gz", "bzip2", "bz2"):
        kind = "gzip" if encoding.startswith("gz") else "bzip2"
        _, size = _read_through(source, offset, kind)
        if line_skip == 0 and size - max(byte_skip, 0) < expected:
            raise ValueError(_cut_short(source, expected, size - max(byte_skip, 0), f"{kind}-compressed voxel data"))
    elif encoding == "raw" and line_skip == 0:
        available = source.stat().st_size - offset - max(byte_skip, 0)
        if available < expected:
            raise ValueError(_cut_short(source, expected, max(available, 0), "voxel data"))


# ------------------------------------------------------------------------------------------ writing
def reindex_to_grid(array: np.ndarray, grid: ImageGrid, target: ImageGrid, tol: float = 1e-3) -> np.ndarray:
    """The voxels of ``array`` on ``grid`` re-ordered onto ``target``, the same voxel centres indexed otherwise.

    Two readers can index one file's voxels differently (Slicer's archetype reader reverses the
    slice axis of a file whose direction matrix is left-handed, where ITK keeps the file's
    order); this maps one indexing onto the other without resampling: axes are permuted and
    reversed, values untouched.

    Args:
        array: (Z, Y, X) or (Z, Y, X, C) voxels on ``grid`` (vector components are left as they are).
        grid, target: two grids (world RAS mm) over the same voxel centres.
        tol: largest deviation (in voxels) from an exact re-indexing.

    Returns:
        (Z', Y', X'[, C]) array on ``target``, a view where possible.

    Raises:
        ValueError: the grids are not the same voxel centres (not a permutation with reversals).
    """
    array = np.asarray(array)
    if array.shape[:3] != tuple(grid.shape):
        raise ValueError(f"reindex_to_grid() 'array' must have the grid's shape {grid.shape} first, got {array.shape}")
    mapping = target.ras_to_ijk @ grid.ijk_to_ras  # source (I, J, K) -> target (I, J, K)
    linear, shift = mapping[:3, :3], mapping[:3, 3]
    rounded = np.round(linear)
    source_axes = np.argmax(np.abs(rounded), axis=1)  # target axis t takes source axis source_axes[t]
    signs = rounded[np.arange(3), source_axes]
    size = np.asarray(grid.size_ijk)[source_axes]
    expected_shift = np.where(signs < 0, size - 1, 0)
    if (
        np.abs(linear - rounded).max() > tol
        or sorted(source_axes.tolist()) != [0, 1, 2]
        or np.abs(rounded).sum() != 3
        or np.abs(shift - expected_shift).max() > tol
        or tuple(size) != tuple(target.size_ijk)
    ):
        raise ValueError(
            f"reindex_to_grid(): the grids do not cover the same voxel centres (shape {grid.shape} -> {target.shape}, "
            f"index mapping {np.round(mapping[:3], 4).tolist()})"
        )
    ijk = np.moveaxis(array, (0, 1, 2), (2, 1, 0))  # (I, J, K[, C])
    ijk = np.moveaxis(ijk, tuple(source_axes), (0, 1, 2))
    for axis in range(3):
        if signs[axis] < 0:
            ijk = np.flip(ijk, axis=axis)
    return np.moveaxis(ijk, (0, 1, 2), (2, 1, 0))


def sitk_image(array: np.ndarray, grid: ImageGrid) -> sitk.Image:
    """SimpleITK image of a (Z, Y, X) or (Z, Y, X, C) array on ``grid`` (RAS geometry written as LPS)."""
    array = np.asarray(array)
    image = sitk.GetImageFromArray(array, isVector=array.ndim == 4)
    spacing, origin, direction = grid.lps_geometry()
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


class WriteError(OSError, ValueError):
    """Writing a file failed (a full disk, a folder that is gone or not writable); the message names
    the file and the likely cause (:func:`describe_write_failure`), in one line."""


def write_volume(path, array: np.ndarray, grid: ImageGrid) -> None:
    """Write a (Z, Y, X) or (Z, Y, X, C) array on ``grid`` to any SimpleITK-writable file (compressed).

    The file's voxel order, origin and direction are ``grid``'s (LPS on disk), whatever their handedness.

    Raises:
        WriteError: writing failed.
    """
    path = Path(path)
    try:
        sitk.WriteImage(sitk_image(array, grid), str(path), useCompression=True)
    except RuntimeError:
        raise WriteError(f"could not write '{path}': {describe_write_failure(path.parent)}") from None


def describe_write_failure(folder) -> str:
    """Why writing into ``folder`` probably failed, in words: a full disk, a folder that is gone or
    not writable, or else a disk that may be full or failing (with the free space)."""
    folder = Path(folder)
    if not folder.is_dir():
        return f"the folder '{folder}' does not exist (any more)"
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    if free is not None and free < 64 * 1024**2:
        return f"the disk holding '{folder}' is full ({_format_bytes(free)} free)"
    if not os.access(folder, os.W_OK):
        return f"the folder '{folder}' is not writable"
    suffix = f" ({_format_bytes(free)} free)" if free is not None else ""
    return f"the disk holding '{folder}' may be full or failing{suffix}"


def _format_bytes(count: float) -> str:
    if count < 1000:
        return f"{count:.0f} B"
    for unit in ("kB", "MB", "GB", "TB"):
        count /= 1000
        if count < 1000 or unit == "TB":
            return f"{count:.1f} {unit}"
