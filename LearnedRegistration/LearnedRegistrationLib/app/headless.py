"""A full-behaviour MRML scene without the Slicer application (slicer-core), plus file I/O.

Used by the command-line tool and the tests; inside Slicer the application provides all of this
(``slicer.mrmlScene``, ``slicer.util.loadVolume``, ...), so the Slicer module never imports it.

:class:`HeadlessSlicer` wires up what ``qSlicerCoreApplication`` would: an application logic
with the default colour nodes, the Colors / Volumes / Markups / Segmentations / Transforms
logics, and a remote-IO + data-IO manager with a cache directory (``vtkMRMLScene::ReadFromMRB``
fails without it).

Files are read and written by Slicer's own readers and storage nodes, so they carry exactly the
geometry Slicer would give them: RAS in memory, LPS on disk, the flip done inside the storage
nodes (not here). One exception is :meth:`HeadlessSlicer.saveVolumeOnGrid`, for files a user
compares voxel by voxel with the inputs: Slicer's archetype reader reverses the slice axis of a
file whose direction matrix is left-handed (the OASIS files are), so a node's voxel order can
differ from the file's; that method writes the voxels with SimpleITK in the order ITK reads the
reference file (:func:`engine.imageio.reindex_to_grid`).

With ``quiet=True`` the native libraries' own messages (ITK, HDF5, MetaIO print straight to the
process's stdout/stderr, dozens of lines for one damaged or unwritable file) are silenced while
files are read and written (:func:`silencedNativeOutput`); failures still raise, in one line.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import sys
import tempfile
import weakref
from pathlib import Path

import numpy as np
import vtk
from vtk.util import numpy_support

import slicer

from ..bridge import mrml
from ..engine.grid import ImageGrid
from ..engine.imageio import WriteError, describe_write_failure, reindex_to_grid, write_volume

#: vtkSlicerVolumesLogic::AddArchetypeVolume loading-option bits.
_LOAD_LABELMAP = 1
_LOAD_SINGLE_FILE = 4


@contextlib.contextmanager
def silencedNativeOutput(enabled: bool = True):
    """Send what native code writes to the process's stdout and stderr (file descriptors 1 and 2)
    to the null device while the block runs; Python's own ``sys.stdout``/``sys.stderr`` are flushed
    first and work again afterwards. C stdio buffers are flushed before the descriptors come back,
    so nothing printed inside surfaces later. A no-op with ``enabled=False``."""
    if not enabled:
        yield
        return
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    try:
        saved = [os.dup(1), os.dup(2)]
    except OSError:  # no stdout/stderr to silence (a daemon with them closed)
        yield
        return
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        _flushCStdio()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for descriptor in (*saved, null):
            os.close(descriptor)


def _flushCStdio() -> None:
    with contextlib.suppress(Exception):  # no C library to call (Windows without msvcrt ...): nothing buffered to lose
        ctypes.CDLL(None).fflush(None)


class HeadlessSlicer:
    """An MRML scene with the module logics Slicer would register, usable without a GUI.

    Attributes:
        scene: the ``vtkMRMLScene``.
        applicationLogic: its ``vtkSlicerApplicationLogic``.
        volumesLogic, colorLogic, markupsLogic, segmentationsLogic, transformLogic: the logics.

    Call :meth:`close` (or use it as a context manager) to clear the scene and delete the cache
    directory it created. With ``quiet=True``, native libraries print nothing while files are
    read or written (see the module docstring).

    **Adopting an application's scene.** Given ``scene`` and ``applicationLogic`` (both, e.g.
    trame-slicer's ``SlicerApp.scene`` and ``SlicerApp.app_logic``), it builds no scene and no
    second set of module logics: it uses the logics registered on that application logic under
    the names above and creates (and registers) only the missing ones; the remote-IO set-up is
    added only when the scene has no data-IO manager. :meth:`close` then leaves the scene as it
    is (it belongs to the application) and only removes a cache folder made here.

    Raises:
        ValueError: only one of ``scene`` and ``applicationLogic``, or an application logic of
            another scene.
    """

    def __init__(
        self,
        cacheDirectory: str | os.PathLike | None = None,
        quiet: bool = False,
        *,
        scene=None,
        applicationLogic=None,
    ):
        if (scene is None) != (applicationLogic is None):
            raise ValueError("HeadlessSlicer adopts a scene together with its application logic: give both or neither")
        if scene is not None and applicationLogic.GetMRMLScene() is not scene:
            raise ValueError("HeadlessSlicer: 'applicationLogic' must be the application logic of 'scene'")
        self.quiet = bool(quiet)
        self._ownsScene = scene is None
        self._ownedCache = cacheDirectory is None
        self.cacheDirectory = Path(cacheDirectory or tempfile.mkdtemp(prefix="learnedreg-mrml-cache-"))
        self.cacheDirectory.mkdir(parents=True, exist_ok=True)
        # A cache folder made here is deleted by close(), or at the latest when this object is
        # garbage-collected or the interpreter exits.
        self._removeCache = (
            weakref.finalize(self, shutil.rmtree, str(self.cacheDirectory), True) if self._ownedCache else None
        )
        # The cache manager refuses to manage (and warns about) a folder without its sentinel.
        (self.cacheDirectory / ".slicer-cache").touch()

        if not self._ownsScene:
            self._adopt(scene, applicationLogic)
            return
        self.scene = slicer.vtkMRMLScene()
        self.applicationLogic = slicer.vtkSlicerApplicationLogic()
        self.applicationLogic.SetTemporaryPath(str(self.cacheDirectory))
        # The colour logic looks for colour files under <home>/<share>/ColorFiles and logs an
        # error when the folder is not there; slicer-core ships none, so give it an empty one.
        (self.cacheDirectory / "share" / "ColorFiles").mkdir(parents=True, exist_ok=True)
        self.applicationLogic.SetHomeDirectory(str(self.cacheDirectory))
        self.applicationLogic.SetShareDirectory("share")
        self.applicationLogic.SetMRMLScene(self.scene)
        self.applicationLogic.SetSliceLogics(vtk.vtkCollection())
        self.applicationLogic.SetViewLogics(vtk.vtkCollection())

        # Default colour tables (Grey, Labels, fMRI, PET ...); file-based ones (Viridis) are not
        # shipped with slicer-core. The application logic must be set before the scene.
        self.colorLogic = slicer.vtkSlicerColorLogic()
        self._addLogic("Colors", self.colorLogic)

        self.volumesLogic = slicer.vtkSlicerVolumesLogic()
        self._addLogic("Volumes", self.volumesLogic)
        self.markupsLogic = slicer.vtkSlicerMarkupsLogic()
        self._addLogic("Markups", self.markupsLogic)
        self.segmentationsLogic = slicer.vtkSlicerSegmentationsModuleLogic()
        self._addLogic("Segmentations", self.segmentationsLogic)
        self.transformLogic = slicer.vtkSlicerTransformLogic()
        self._addLogic("Transforms", self.transformLogic)

        # Remote IO + data IO manager: ReadFromMRB unpacks bundles through the cache manager.
        self.remoteIOLogic = slicer.vtkMRMLRemoteIOLogic()
        self.remoteIOLogic.GetCacheManager().SetRemoteCacheDirectory(str(self.cacheDirectory))
        self.dataIOManagerLogic = slicer.vtkDataIOManagerLogic()
        self.dataIOManagerLogic.SetMRMLApplicationLogic(self.applicationLogic)
        self.dataIOManagerLogic.SetAndObserveDataIOManager(self.remoteIOLogic.GetDataIOManager())
        self.applicationLogic.SetMRMLSceneDataIO(self.scene, self.remoteIOLogic, self.dataIOManagerLogic)

    def _addLogic(self, name: str, logic) -> None:
        logic.SetMRMLApplicationLogic(self.applicationLogic)
        logic.SetMRMLScene(self.scene)
        self.applicationLogic.SetModuleLogic(name, logic)

    def _adopt(self, scene, applicationLogic) -> None:
        """Use ``scene`` and the module logics already registered on ``applicationLogic`` (class docstring)."""
        self.scene = scene
        self.applicationLogic = applicationLogic
        logics = (
            ("Colors", "colorLogic", slicer.vtkSlicerColorLogic),
            ("Volumes", "volumesLogic", slicer.vtkSlicerVolumesLogic),
            ("Markups", "markupsLogic", slicer.vtkSlicerMarkupsLogic),
            ("Segmentations", "segmentationsLogic", slicer.vtkSlicerSegmentationsModuleLogic),
            ("Transforms", "transformLogic", slicer.vtkSlicerTransformLogic),
        )
        for name, attribute, logicClass in logics:
            logic = applicationLogic.GetModuleLogic(name)
            if logic is None:
                logic = logicClass()
                self._addLogic(name, logic)
            setattr(self, attribute, logic)
        self.remoteIOLogic = self.dataIOManagerLogic = None
        if scene.GetDataIOManager() is None:  # ReadFromMRB needs one
            self.remoteIOLogic = slicer.vtkMRMLRemoteIOLogic()
            self.remoteIOLogic.GetCacheManager().SetRemoteCacheDirectory(str(self.cacheDirectory))
            self.dataIOManagerLogic = slicer.vtkDataIOManagerLogic()
            self.dataIOManagerLogic.SetMRMLApplicationLogic(applicationLogic)
            self.dataIOManagerLogic.SetAndObserveDataIOManager(self.remoteIOLogic.GetDataIOManager())
            applicationLogic.SetMRMLSceneDataIO(scene, self.remoteIOLogic, self.dataIOManagerLogic)

    # ------------------------------------------------------------------------------ life cycle
    def close(self) -> None:
        """Clear the scene (unless it was adopted) and remove the cache directory if this object created it."""
        if self.scene is not None and self._ownsScene:
            self.scene.Clear(True)
        if self._removeCache is not None:
            self._removeCache()

    def __enter__(self) -> HeadlessSlicer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------ reading
    def loadVolume(self, path: str | os.PathLike, name: str | None = None, labelMap: bool = False):
        """Load an image file (NRRD, NIfTI, MHA, ... anything ITK reads) as a volume node.

        Slicer's own archetype reader is used, so the node's RAS geometry is what Slicer shows.
        Only the named file is read (no series detection).

        Returns:
            ``vtkMRMLScalarVolumeNode`` (or ``vtkMRMLVectorVolumeNode`` for multi-component
            files), or ``vtkMRMLLabelMapVolumeNode`` with ``labelMap=True``.

        Raises:
            FileNotFoundError: the file does not exist.
            ValueError: the file could not be read as an image.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {path}")
        name = name or _stemOf(path)
        options = _LOAD_SINGLE_FILE | (_LOAD_LABELMAP if labelMap else 0)
        with silencedNativeOutput(self.quiet):
            node = self.volumesLogic.AddArchetypeVolume(str(path), name, options)
        if node is None or node.GetImageData() is None:
            if node is not None:
                self.scene.RemoveNode(node)
            raise ValueError(f"could not read '{path}' as an image (unsupported or corrupt file)")
        return node

    def loadTransform(self, path: str | os.PathLike, name: str | None = None):
        """Load an ITK transform file (.h5, .tfm, .txt) into a transform node.

        Raises:
            FileNotFoundError / ValueError as :meth:`loadVolume`.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"transform file not found: {path}")
        storageNode = slicer.vtkMRMLTransformStorageNode()
        storageNode.SetFileName(str(path))
        self.scene.AddNode(storageNode)
        node = self.scene.AddNewNodeByClass("vtkMRMLTransformNode", name or _stemOf(path))
        with silencedNativeOutput(self.quiet):
            ok = storageNode.ReadData(node)
        if not ok:
            self.scene.RemoveNode(node)
            self.scene.RemoveNode(storageNode)
            raise ValueError(f"could not read '{path}' as a transform")
        node.SetAndObserveStorageNodeID(storageNode.GetID())
        return node

    def loadMarkups(self, path: str | os.PathLike, name: str | None = None):
        """Load a markups file (.mrk.json, .fcsv) as a markups node.

        Raises:
            FileNotFoundError / ValueError as :meth:`loadVolume`.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"markups file not found: {path}")
        with silencedNativeOutput(self.quiet):
            nodeId = self.markupsLogic.LoadMarkups(str(path), name or _stemOf(path))
        node = self.scene.GetNodeByID(nodeId) if nodeId else None
        if node is None:
            raise ValueError(f"could not read '{path}' as markups")
        return node

    def loadScene(self, path: str | os.PathLike) -> None:
        """Replace the scene's content with an ``.mrb`` bundle (or ``.mrml`` file).

        Raises:
            FileNotFoundError: the file does not exist.
            ValueError: the scene could not be read.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"scene file not found: {path}")
        with silencedNativeOutput(self.quiet):
            if path.suffix.lower() == ".mrb":
                ok = self.scene.ReadFromMRB(str(path), True)
            else:
                self.scene.SetURL(str(path))
                ok = self.scene.Connect()
        if not ok:
            raise ValueError(f"could not read the scene '{path}'")

    # ------------------------------------------------------------------------------ writing
    def saveNode(self, node, path: str | os.PathLike) -> Path:
        """Write a storable node with its default storage node (.nrrd, .nii.gz, .h5, .mrk.json, ...).

        The file format follows the extension; the node keeps the storage node, so a later
        scene save refers to this file. The voxel order is the node's (see :meth:`saveVolumeOnGrid`).

        Raises:
            ValueError: the node cannot be stored.
            engine.imageio.WriteError: writing failed (a ``ValueError`` too); the message says why
                (full disk, folder not writable ...).
        """
        path = Path(path)
        storageNode = node.GetStorageNode()
        if storageNode is None:
            storageNode = node.CreateDefaultStorageNode()
            if storageNode is None:
                raise ValueError(f"'{node.GetName()}' ({node.GetClassName()}) cannot be saved to a file")
            self.scene.AddNode(storageNode)
            node.SetAndObserveStorageNodeID(storageNode.GetID())
        storageNode.SetFileName(str(path))
        with silencedNativeOutput(self.quiet):
            ok = storageNode.WriteData(node)
        if not ok:
            raise WriteError(f"could not write '{node.GetName()}' to '{path}': {describe_write_failure(path.parent)}")
        return path

    def saveVolumeOnGrid(self, volumeNode, path: str | os.PathLike, grid: ImageGrid | None = None) -> Path:
        """Write a volume node's voxels with SimpleITK, indexed as on ``grid`` (default: the node's own).

        For files compared voxel by voxel with an input: pass the input file's grid as ITK reads
        it (:func:`engine.imageio.check_image_file`), and the file gets that voxel order, origin
        and direction exactly, even where Slicer's reader re-ordered the input's axes. Vector
        volumes keep their components as they are (a displacement stays RAS mm). The node is
        not changed and gets no storage node (a scene save stores it as Slicer would).

        Args:
            volumeNode: scalar, label map or vector volume node, without a parent transform.
            path: the file (.nrrd, .nii.gz, .mha ...; written compressed).
            grid: the same voxel centres as the node's, indexed in the order wanted.

        Raises:
            ValueError: the node has no voxels or a parent transform, or ``grid`` is not the
                node's voxel centres.
            engine.imageio.WriteError: writing failed.
        """
        path = Path(path)
        if volumeNode.GetParentTransformNode() is not None:
            raise ValueError(f"'{volumeNode.GetName()}' is under a transform; harden it before saving it on a grid")
        array, nodeGrid = volumeVoxels(volumeNode)
        if grid is not None:
            array = reindex_to_grid(array, nodeGrid, grid)
        with silencedNativeOutput(self.quiet):
            write_volume(path, np.ascontiguousarray(array), nodeGrid if grid is None else grid)
        return path

    def saveScene(self, path: str | os.PathLike) -> Path:
        """Write the whole scene as a Slicer ``.mrb`` bundle (every storable node with its data).

        Raises:
            ValueError: not an ``.mrb`` name.
            engine.imageio.WriteError: writing failed.
        """
        path = Path(path)
        if path.suffix.lower() != ".mrb":
            raise ValueError(f"scene files are written as .mrb, got '{path.name}'")
        with silencedNativeOutput(self.quiet):
            ok = self.scene.WriteToMRB(str(path))
        if not ok:
            raise WriteError(f"could not write the scene to '{path}': {describe_write_failure(path.parent)}")
        return path


def volumeVoxels(volumeNode) -> tuple[np.ndarray, ImageGrid]:
    """The voxels of a scalar, label map or vector volume node without a copy, and its grid.

    Returns:
        ``(array, grid)``: a read-only view, (Z, Y, X) or (Z, Y, X, C) in the node's own type,
        and the node's :class:`ImageGrid` (world RAS mm, parent transforms included).

    Raises:
        ValueError: the node has no voxels (:func:`bridge.mrml.gridFromVolumeNode`).
    """
    grid = mrml.gridFromVolumeNode(volumeNode)
    scalars = volumeNode.GetImageData().GetPointData().GetScalars()
    if scalars is None:
        raise ValueError(f"volume '{volumeNode.GetName()}' has no voxel values")
    components = scalars.GetNumberOfComponents()
    # FRAME: VTK memory order is I fastest, so (K, J, I[, C]) = (Z, Y, X[, C]).
    array = numpy_support.vtk_to_numpy(scalars).reshape(grid.shape + ((components,) if components > 1 else ()))
    array.flags.writeable = False
    return array, grid


def _stemOf(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".seg.nrrd", ".mrk.json"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem
