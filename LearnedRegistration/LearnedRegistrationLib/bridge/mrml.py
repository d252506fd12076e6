"""MRML bridge: Slicer nodes <-> numpy arrays with their :class:`~LearnedRegistrationLib.engine.grid.ImageGrid`.

This module is the ONE place where data crosses the Slicer boundary, so it is where two
conversions happen (each marked ``# FRAME:`` below):

- **KJI <-> IJK**: ``vtkImageData`` stores voxels with I fastest; viewed as a numpy array they
  come out in (K, J, I) = (Z, Y, X) order, which is the engine's tensor order. The VTK
  dimensions tuple is (I, J, K) and is reversed to get the numpy shape.
- **RAS**: Slicer holds every node in RAS in memory (``GetIJKToRASMatrix``, markup positions,
  transform displacements), and so does the engine, so nothing is flipped here. The RAS <-> LPS
  flip for files happens inside Slicer's own storage nodes (NRRD / NIfTI / ITK ``.h5``) and,
  for files read without Slicer, in :meth:`ImageGrid.from_lps` / :meth:`ImageGrid.lps_geometry`.

Functions take the node's own scene (``node.GetScene()``) or an explicit ``scene``, never a
global, so they work the same in Slicer (``slicer.mrmlScene``) and in a headless slicer-core
scene. Nothing here imports Qt or torch.

Output nodes are created or updated *in place*: an existing node keeps its ID, name, display
node and any references to it; only its data and geometry change.
"""

from __future__ import annotations

import numpy as np
import vtk
from vtk.util import numpy_support

import slicer

from ..engine.grid import ImageGrid
from ..engine.visualization import sampled_percentiles

#: Colour nodes tried in order for each kind of output; the first present in the scene is used.
#: Slicer ships the file-based tables (Viridis, DivergingBlueRed); slicer-core only the procedural
#: ones, hence the fall-backs.
GREY_COLOR_NODE_IDS = ("vtkMRMLColorTableNodeGrey",)
JACOBIAN_COLOR_NODE_IDS = (
    "vtkMRMLColorTableNodeFileDivergingBlueRed.txt",
    "vtkMRMLColorTableNodeFileColdToHotRainbow.txt",
    "vtkMRMLColorTableNodefMRI",
    "vtkMRMLColorTableNodeRainbow",
)
LAMBDA_COLOR_NODE_IDS = (
    "vtkMRMLColorTableNodeFileViridis.txt",
    "vtkMRMLColorTableNodeFileInferno.txt",
    "vtkMRMLPETProceduralColorNodePET-Heat",
    "vtkMRMLColorTableNodeIron",
)
LABEL_COLOR_NODE_IDS = ("vtkMRMLColorTableNodeFileGenericAnatomyColors.txt", "vtkMRMLColorTableNodeLabels")


# ------------------------------------------------------------------------------------------ geometry
def _nodeName(node) -> str:
    return node.GetName() if node is not None and node.GetName() else "(unnamed node)"


def vtkMatrixFromArray(matrix: np.ndarray) -> vtk.vtkMatrix4x4:
    """A ``vtkMatrix4x4`` from a (4, 4) numpy array."""
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.shape != (4, 4):
        raise ValueError(f"vtkMatrixFromArray expects a (4, 4) matrix, got shape {matrix.shape}")
    result = vtk.vtkMatrix4x4()
    for row in range(4):
        for column in range(4):
            result.SetElement(row, column, float(matrix[row, column]))
    return result


def arrayFromVtkMatrix(matrix) -> np.ndarray:
    """(4, 4) float64 numpy array from a ``vtkMatrix4x4``."""
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def _parentTransformToWorld(node) -> np.ndarray:
    """(4, 4) local-to-world RAS matrix of the node's parent transforms (identity when none).

    Raises:
        ValueError: when a parent transform is non-linear (it must be hardened first).
    """
    transformNode = node.GetParentTransformNode()
    if transformNode is None:
        return np.eye(4)
    if not transformNode.IsTransformToWorldLinear():
        raise ValueError(
            f"'{_nodeName(node)}' is under the non-linear transform '{_nodeName(transformNode)}'; "
            "harden the transform on it (Data module, right-click > Harden transform) or remove it"
        )
    matrix = vtk.vtkMatrix4x4()
    transformNode.GetMatrixTransformToWorld(matrix)
    return arrayFromVtkMatrix(matrix)


def gridFromVolumeNode(volumeNode) -> ImageGrid:
    """Geometry of a volume node in world RAS, including any linear parent transform.

    Returns:
        ImageGrid with ``shape`` (Z, Y, X) = the reversed VTK dimensions.

    Raises:
        ValueError: no image data, a volume that is not 3D (a single slice), a non-linear parent
            transform, or a parent transform with scaling/shear (direction not orthonormal).
    """
    if volumeNode is None:
        raise ValueError("no volume node given")
    imageData = volumeNode.GetImageData()
    if imageData is None:
        raise ValueError(f"volume '{_nodeName(volumeNode)}' has no image data")
    dimensions = imageData.GetDimensions()
    if min(dimensions) < 2:
        raise ValueError(
            f"volume '{_nodeName(volumeNode)}' is 2D or a single slice ({' x '.join(map(str, dimensions))} voxels); "
            "registration needs a 3D volume with at least 2 voxels along each axis"
        )
    # FRAME: VTK dimensions are (I, J, K); the engine's shape is (Z, Y, X) = (K, J, I).
    shape = tuple(reversed(dimensions))
    ijkToRas = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(ijkToRas)
    # RAS in, RAS out: both Slicer and the engine are RAS, so no flip here.
    worldMatrix = _parentTransformToWorld(volumeNode) @ arrayFromVtkMatrix(ijkToRas)
    try:
        return ImageGrid.from_ijk_to_ras(shape, worldMatrix)
    except ValueError as error:
        raise ValueError(f"volume '{_nodeName(volumeNode)}': {error}") from error


def arrayFromVolumeNode(volumeNode, dtype=np.float32, copy: bool = True) -> tuple[np.ndarray, ImageGrid]:
    """Voxels and geometry of a scalar (or label map) volume node.

    Args:
        copy: with False, voxels already stored as ``dtype`` are returned as a read-only view of the
            node's memory instead of a copy (one volume less: 0.42 GB for a 512 x 512 x 400 float32
            CT); the view keeps that memory alive even if the node's voxels are replaced later.

    Returns:
        ``(array, grid)``: the voxels, shape (Z, Y, X) in ``dtype`` (a copy, or with ``copy=False``
        possibly a read-only view), and its ImageGrid in world RAS mm.

    Raises:
        ValueError: not a volume node, no image data, more than one component (RGB / vector),
            or a geometry :func:`gridFromVolumeNode` rejects.
    """
    if volumeNode is None or not volumeNode.IsA("vtkMRMLVolumeNode"):
        raise ValueError(f"expected a volume node, got {_nodeName(volumeNode)}")
    grid = gridFromVolumeNode(volumeNode)
    imageData = volumeNode.GetImageData()
    components = imageData.GetNumberOfScalarComponents()
    if components != 1:
        raise ValueError(
            f"volume '{_nodeName(volumeNode)}' has {components} components per voxel; a scalar "
            "(grey-level) volume is needed (convert colour/vector volumes to scalar first)"
        )
    scalars = imageData.GetPointData().GetScalars()
    # FRAME: VTK memory order is I fastest, so reshaping to (K, J, I) gives the (Z, Y, X) array.
    voxels = numpy_support.vtk_to_numpy(scalars).reshape(grid.shape)
    array = voxels.astype(dtype, copy=copy)
    if array.base is not None and np.shares_memory(array, voxels):
        array.flags.writeable = False  # a view of the node's voxels must not be written through
    return array, grid


def _vtkArrayFromArray(array: np.ndarray, copy: bool = True):
    """(vtkDataArray named "ImageScalars", (Z, Y, X) shape) of a (Z, Y, X[, C]) array.

    bool becomes uint8 and 64-bit integers int32 (Slicer does not display "long long" volumes).
    With ``copy=False`` a C-contiguous array of a supported type is not copied: VTK uses its
    memory (``numpy_to_vtk`` keeps the array alive), so the caller must not change it afterwards;
    that saves a copy of every output volume on each slider move.
    """
    array = np.ascontiguousarray(array)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    elif array.dtype in (np.int64, np.uint64):
        array = array.astype(np.int32)
    components = 1 if array.ndim == 3 else array.shape[3]
    vtkArray = numpy_support.numpy_to_vtk(array.reshape(-1, components), deep=copy)
    vtkArray.SetName("ImageScalars")
    return vtkArray, array.shape[:3]


def _replaceScalars(imageData, vtkArray, shape) -> bool:
    """Put ``vtkArray`` into ``imageData`` in place of its scalars if the dimensions, component count
    and type match (True), else leave it (False).

    Swapping the array keeps the vtkImageData object, so the volume's display pipeline only sees
    a modification; a new vtkImageData makes Slicer rebuild it (0.1 s for a 160x192x224 vector
    volume, on every slider move).
    """
    old = imageData.GetPointData().GetScalars() if imageData is not None else None
    if (
        old is None
        or tuple(imageData.GetDimensions()) != (shape[2], shape[1], shape[0])
        or old.GetNumberOfComponents() != vtkArray.GetNumberOfComponents()
        or old.GetDataType() != vtkArray.GetDataType()
    ):
        return False
    imageData.GetPointData().SetScalars(vtkArray)
    imageData.Modified()
    return True


def _imageDataFromVtkArray(vtkArray, shape) -> vtk.vtkImageData:
    """vtkImageData (origin 0, spacing 1) holding ``vtkArray`` as scalars, for a (Z, Y, X) ``shape``."""
    imageData = vtk.vtkImageData()
    # FRAME: numpy (Z, Y, X) -> VTK dimensions (I, J, K).
    imageData.SetDimensions(shape[2], shape[1], shape[0])
    imageData.GetPointData().SetScalars(vtkArray)
    return imageData


def _checkArrayOnGrid(array: np.ndarray, grid: ImageGrid, what: str, components: int | None = None):
    expected = tuple(grid.shape) + ((components,) if components else ())
    if tuple(array.shape) != expected:
        raise ValueError(f"{what} must have shape {expected} (the grid's (Z, Y, X){'+C' if components else ''}), got {array.shape}")


def _rounded(values, digits: int = 4) -> tuple:
    """Numbers (any nesting) rounded for a message, with -0.0 shown as 0.0."""
    array = np.round(np.asarray(values, dtype=np.float64), digits) + 0.0
    return tuple(map(tuple, array)) if array.ndim == 2 else tuple(array.tolist())


def _geometryDifferences(grid: ImageGrid, referenceGrid: ImageGrid) -> str:
    """'its origin (RAS mm) is A, the image's B; ...' for each property where ``grid`` differs from ``referenceGrid``."""
    pairs = []
    if grid.shape != referenceGrid.shape:
        pairs.append(("shape (Z, Y, X)", grid.shape, referenceGrid.shape))
    if not np.allclose(grid.spacing, referenceGrid.spacing, rtol=0.0, atol=1e-6):
        pairs.append(("spacing (mm)", _rounded(grid.spacing), _rounded(referenceGrid.spacing)))
    if not np.allclose(grid.origin, referenceGrid.origin, rtol=0.0, atol=1e-3):
        pairs.append(("origin (RAS mm)", _rounded(grid.origin), _rounded(referenceGrid.origin)))
    if not np.allclose(grid.direction, referenceGrid.direction, rtol=0.0, atol=1e-4):
        pairs.append(("direction (RAS columns)", _rounded(grid.direction), _rounded(referenceGrid.direction)))
    if not pairs:  # each within its tolerance, but drifting apart across the volume
        pairs.append(("spacing (mm)", tuple(grid.spacing), tuple(referenceGrid.spacing)))
    return "; ".join(f"its {name} is {mine}, the image's {theirs}" for name, mine, theirs in pairs)


def labelArrayFromLabelMapNode(labelNode, referenceGrid: ImageGrid, referenceName: str = "the image") -> np.ndarray:
    """Label values of a label map (or integer scalar) volume node on ``referenceGrid``.

    Returns:
        int32 array, shape (Z, Y, X) of ``referenceGrid``.

    Raises:
        ValueError: when the label map's geometry (shape, spacing, origin, directions, within
            1e-3 mm) differs from ``referenceGrid``; the one-line message names each property
            that differs with both values and says how to fix it.
    """
    labels, grid = arrayFromVolumeNode(labelNode, dtype=np.float64)
    if not grid.same_geometry(referenceGrid):
        raise ValueError(
            f"label map '{_nodeName(labelNode)}' does not have the geometry of {referenceName}: "
            f"{_geometryDifferences(grid, referenceGrid)}; resample it onto that image "
            "(Resample Scalar/Vector/DWI Volume, nearest neighbour) or pass a segmentation instead"
        )
    if not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)):
        raise ValueError(f"label map '{_nodeName(labelNode)}' must hold integer labels")
    return labels.astype(np.int32)


def labelArrayFromSegmentationNode(
    segmentationNode, referenceVolumeNode, segmentNames: list[str] | None = None
) -> tuple[np.ndarray, list[str]]:
    """Segments of a segmentation node rasterized on a reference volume's grid.

    The segmentation is exported to a temporary label map node (removed again) in the geometry
    of ``referenceVolumeNode``. Label value ``n`` is the ``n``-th name (1-based) of
    ``segmentNames`` (segments matched by name, so two segmentations get the same numbering);
    with ``segmentNames=None`` the segmentation's own segment order is used. Segments whose name
    is not listed get the next free values. Where segments overlap the later one wins.

    Returns:
        ``(labels, names)``: int32 array (Z, Y, X) on the reference grid, and the segment name of
        each label value (``names[v - 1]`` for value ``v``).

    Raises:
        ValueError: no reference volume, or no segment in the segmentation.
    """
    if referenceVolumeNode is None:
        raise ValueError(f"segmentation '{_nodeName(segmentationNode)}' needs a reference volume")
    scene = segmentationNode.GetScene()
    segmentation = segmentationNode.GetSegmentation()
    segmentIds = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    if not segmentIds:
        raise ValueError(f"segmentation '{_nodeName(segmentationNode)}' has no segments")
    names = list(segmentNames or [])
    for segmentId in segmentIds:
        name = segmentation.GetSegment(segmentId).GetName()
        if name not in names:
            names.append(name)
    referenceGrid = gridFromVolumeNode(referenceVolumeNode)
    labels = np.zeros(referenceGrid.shape, dtype=np.int32)
    segmentationsLogic = slicer.vtkSlicerSegmentationsModuleLogic
    nodeIdsBefore = nodeIds(scene)
    temporaryNode = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__learnedreg_temporary_labelmap__")
    try:
        for segmentId in segmentIds:
            value = names.index(segmentation.GetSegment(segmentId).GetName()) + 1
            ids = vtk.vtkStringArray()
            ids.InsertNextValue(segmentId)
            if not segmentationsLogic.ExportSegmentsToLabelmapNode(
                segmentationNode, ids, temporaryNode, referenceVolumeNode
            ):
                raise ValueError(
                    f"could not rasterize segment '{segmentId}' of '{_nodeName(segmentationNode)}'"
                )
            mask, _ = arrayFromVolumeNode(temporaryNode, dtype=np.int32)
            if mask.shape != labels.shape:
                raise ValueError(
                    f"segment '{segmentId}' was exported with shape {mask.shape}, expected {labels.shape}"
                )
            labels[mask != 0] = value
    finally:
        # The export also adds a colour table for the label map: remove everything it added.
        removeNodesAddedSince(scene, nodeIdsBefore)
    return labels, names


def pointsFromMarkupsNode(markupsNode) -> np.ndarray:
    """World RAS positions (mm) of a markups node's control points, shape (P, 3), float64.

    Parent transforms are applied (world coordinates).

    Raises:
        ValueError: not a markups node.
    """
    if markupsNode is None or not markupsNode.IsA("vtkMRMLMarkupsNode"):
        raise ValueError(f"expected a markups (point list) node, got {_nodeName(markupsNode)}")
    points = np.zeros((markupsNode.GetNumberOfControlPoints(), 3), dtype=np.float64)
    for index in range(points.shape[0]):
        markupsNode.GetNthControlPointPositionWorld(index, points[index])
    return points


# ------------------------------------------------------------------------------------------ output nodes
def _removeNodeWithDisplay(scene, node) -> None:
    if node is None or scene is None or node.GetScene() is None:
        return
    if node.IsA("vtkMRMLDisplayableNode"):
        for index in reversed(range(node.GetNumberOfDisplayNodes())):
            displayNode = node.GetNthDisplayNode(index)
            if displayNode is not None:
                scene.RemoveNode(displayNode)
    if node.IsA("vtkMRMLStorableNode"):
        for index in reversed(range(node.GetNumberOfStorageNodes())):
            storageNode = node.GetNthStorageNode(index)
            if storageNode is not None:
                scene.RemoveNode(storageNode)
    scene.RemoveNode(node)


def nodeIds(scene) -> set:
    """IDs of every node in the scene."""
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def removeNodesAddedSince(scene, nodeIdsBefore: set) -> None:
    """Remove every node whose ID is not in ``nodeIdsBefore`` (data nodes with their display nodes first)."""
    added = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
    added = [node for node in added if node.GetID() not in nodeIdsBefore]
    for node in added:
        if node.GetScene() is not None and node.IsA("vtkMRMLDisplayableNode"):
            _removeNodeWithDisplay(scene, node)
    for node in added:
        if node.GetScene() is not None:
            scene.RemoveNode(node)


def removeNode(node) -> None:
    """Remove a node and its display and storage nodes from its scene (no-op for None)."""
    if node is not None:
        _removeNodeWithDisplay(node.GetScene(), node)


def _firstColorNodeId(scene, candidates) -> str | None:
    for nodeId in candidates:
        if scene.GetNodeByID(nodeId) is not None:
            return nodeId
    return None


def _getOrCreateVolumeNode(scene, node, className: str, name: str):
    if node is None:
        node = scene.AddNewNodeByClass(className, scene.GenerateUniqueName(name))
    elif not node.IsA(className):
        raise ValueError(f"output node '{_nodeName(node)}' must be a {className}, got a {node.GetClassName()}")
    return node


def updateVolumeNodeFromArray(
    scene,
    array: np.ndarray,
    grid: ImageGrid,
    volumeNode=None,
    name: str = "Volume",
    className: str = "vtkMRMLScalarVolumeNode",
    copy: bool = True,
):
    """Create a volume node, or update ``volumeNode`` in place, from a (Z, Y, X[, C]) array on ``grid``.

    The voxels are deep-copied (with ``copy=False`` the node uses the array's memory when it can:
    the caller hands the array over) and the node's IJK-to-RAS matrix is set from ``grid`` (RAS mm).
    A display node is created when missing. The node keeps its ID when updated in place, and its
    vtkImageData too when the new voxels have the same dimensions, components and type (only the
    scalar array is swapped: what a slider move does).

    Args:
        className: ``vtkMRMLScalarVolumeNode``, ``vtkMRMLLabelMapVolumeNode`` or
            ``vtkMRMLVectorVolumeNode`` (then ``array`` is (Z, Y, X, C)).

    Returns:
        The volume node.

    Raises:
        ValueError: array shape not the grid's, or an existing node of another class.
    """
    components = array.shape[3] if array.ndim == 4 else None
    _checkArrayOnGrid(array, grid, f"array for '{name}'", components)
    volumeNode = _getOrCreateVolumeNode(scene, volumeNode, className, name)
    wasModifying = volumeNode.StartModify()
    try:
        # RAS geometry straight from the grid (the node is RAS, like the engine).
        volumeNode.SetIJKToRASMatrix(vtkMatrixFromArray(grid.ijk_to_ras))
        vtkArray, shape = _vtkArrayFromArray(array, copy)
        if not _replaceScalars(volumeNode.GetImageData(), vtkArray, shape):
            volumeNode.SetAndObserveImageData(_imageDataFromVtkArray(vtkArray, shape))
        if volumeNode.GetDisplayNode() is None:
            volumeNode.CreateDefaultDisplayNodes()
    finally:
        volumeNode.EndModify(wasModifying)
    return volumeNode


def updateDisplacementVolumeNode(
    scene, displacementRas: np.ndarray, grid: ImageGrid, volumeNode=None, name="Displacement", copy: bool = True
):
    """Create or update a 3-component ``vtkMRMLVectorVolumeNode`` holding a displacement field.

    Args:
        displacementRas: (Z, Y, X, 3) displacement in RAS mm on ``grid``, resampling convention
            (the moving point matching fixed point x is x + d(x)). Stored as float32 with the
            components in (R, A, S) order; no LPS flip.

    Returns:
        The vector volume node. Slicer keeps the components in RAS when it writes the node to
        NRRD (no measurement frame, no flip), unlike the ITK ``.h5`` transform writer, which
        converts to LPS.
    """
    displacementRas = np.asarray(displacementRas, dtype=np.float32)
    _checkArrayOnGrid(displacementRas, grid, "displacement field", 3)
    volumeNode = updateVolumeNodeFromArray(
        scene, displacementRas, grid, volumeNode, name, className="vtkMRMLVectorVolumeNode", copy=copy
    )
    return volumeNode


def updateSegmentationNodeFromLabels(
    scene,
    labels: np.ndarray,
    grid: ImageGrid,
    segmentationNode=None,
    name: str = "Segmentation",
    labelNames: list[str] | None = None,
):
    """Create a segmentation node, or replace the segments of ``segmentationNode``, from a label map.

    One segment per non-zero label value ``v`` present, named ``labelNames[v - 1]`` when given
    (else ``"Label v"``), imported through a temporary label map node (removed again).

    Args:
        labels: (Z, Y, X) integer labels on ``grid``.

    Returns:
        The segmentation node (same ID when updated in place).

    Raises:
        ValueError: wrong shape, or the import failed.
    """
    labels = np.asarray(labels)
    _checkArrayOnGrid(labels, grid, f"labels for '{name}'")
    if segmentationNode is None:
        segmentationNode = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", scene.GenerateUniqueName(name))
        segmentationNode.CreateDefaultDisplayNodes()
    elif not segmentationNode.IsA("vtkMRMLSegmentationNode"):
        raise ValueError(f"'{_nodeName(segmentationNode)}' must be a segmentation node, got a {segmentationNode.GetClassName()}")
    nodeIdsBefore = nodeIds(scene)  # the temporary label map and whatever the import adds go again
    temporaryNode = updateVolumeNodeFromArray(
        scene, labels.astype(np.int32), grid, None, "__learnedreg_temporary_labelmap__", "vtkMRMLLabelMapVolumeNode"
    )
    try:
        segmentation = segmentationNode.GetSegmentation()
        segmentation.RemoveAllSegments()
        if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(temporaryNode, segmentationNode):
            raise ValueError(f"could not convert the labels to the segmentation '{_nodeName(segmentationNode)}'")
        for index in range(segmentation.GetNumberOfSegments()):
            segment = segmentation.GetNthSegment(index)
            value = int(segment.GetLabelValue())
            if labelNames and 1 <= value <= len(labelNames):
                segment.SetName(labelNames[value - 1])
            else:
                segment.SetName(f"Label {value}")
    finally:
        removeNodesAddedSince(scene, nodeIdsBefore)
    return segmentationNode


def gridTransformFromDisplacement(displacementRas: np.ndarray, grid: ImageGrid) -> slicer.vtkOrientedGridTransform:
    """A ``vtkOrientedGridTransform`` mapping RAS point x to x + d(x) (the resampling direction).

    The displacement grid has the fixed grid's origin and spacing, and its direction matrix is
    set with ``SetGridDirectionMatrix`` (so oblique grids are exact). Interpolation is cubic, as
    Slicer sets it when it reads a grid transform from a file, so the node behaves the same before
    and after a scene is saved and reloaded; at the grid's voxel centres (where the engine
    evaluates the field) cubic and linear give the stored vectors exactly.

    The vectors are stored as float32 (what the engine computes; Slicer reads, writes and
    interpolates float grids) in a copy of their own.

    Raises:
        ValueError: ``displacementRas`` is not (Z, Y, X, 3) on ``grid``.
    """
    return _gridTransformFromVectors(*_displacementVectors(displacementRas, grid), grid)


def _displacementVectors(displacementRas: np.ndarray, grid: ImageGrid, copy: bool = True):
    """(vtkDataArray, shape) of a (Z, Y, X, 3) displacement checked against ``grid``: float32, a copy
    of its own, or with ``copy=False`` the array's memory when it is already float32 and contiguous."""
    displacementRas = np.array(displacementRas, dtype=np.float32) if copy else np.ascontiguousarray(displacementRas, np.float32)
    _checkArrayOnGrid(displacementRas, grid, "displacement field", 3)
    return _vtkArrayFromArray(displacementRas, copy=False)


def _gridTransformFromVectors(vtkArray, shape, grid: ImageGrid) -> slicer.vtkOrientedGridTransform:
    """:func:`gridTransformFromDisplacement` from prepared vectors (:func:`_displacementVectors`)."""
    displacementGrid = _imageDataFromVtkArray(vtkArray, shape)
    displacementGrid.SetOrigin(*grid.origin)
    displacementGrid.SetSpacing(*grid.spacing)
    directionMatrix = vtk.vtkMatrix4x4()
    for row in range(3):
        for column in range(3):
            directionMatrix.SetElement(row, column, float(grid.direction[row, column]))
    transform = slicer.vtkOrientedGridTransform()
    transform.SetGridDirectionMatrix(directionMatrix)
    transform.SetDisplacementGridData(displacementGrid)
    transform.SetInterpolationModeToCubic()
    return transform


def updateGridTransformNode(
    scene, displacementRas: np.ndarray, grid: ImageGrid, transformNode=None, name="Transform", copy: bool = True
):
    """Create or update a ``vtkMRMLGridTransformNode`` holding the displacement *from parent*.

    Placing the moving volume under this node shows it warped onto the fixed image, and
    hardening the transform on it reproduces the warped volume (up to interpolation):
    ``warped(x) = moving(x + d(x))`` with x in world RAS.

    Args:
        displacementRas: (Z, Y, X, 3) RAS mm on ``grid`` (the fixed grid).
        copy: with False the transform uses the array's memory (float32, contiguous) instead of a
            copy: the caller hands it over, e.g. to share it with the displacement vector volume
            (3 volumes less: 1.26 GB for a 512 x 512 x 400 grid). Editing that volume's voxels in
            place then changes the transform too.

    Returns:
        The grid transform node. Updated on the same grid, it keeps its transform object (only
        the vectors are swapped, as a slider move does).

    Raises:
        ValueError: ``displacementRas`` not on ``grid``, or ``transformNode`` not a grid transform node.
    """
    vectors, shape = _displacementVectors(displacementRas, grid, copy)  # checked before the scene changes
    if transformNode is None:
        transformNode = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", scene.GenerateUniqueName(name))
    elif not transformNode.IsA("vtkMRMLGridTransformNode"):
        raise ValueError(
            f"output transform '{_nodeName(transformNode)}' must be a grid transform node, "
            f"got a {transformNode.GetClassName()}"
        )
    # "From parent" = world (fixed) -> local (moving): the resampling direction.
    if not _replaceGridDisplacement(transformNode.GetTransformFromParent(), vectors, shape, grid):
        transformNode.SetAndObserveTransformFromParent(_gridTransformFromVectors(vectors, shape, grid))
    return transformNode


def _replaceGridDisplacement(transform, vectors, shape, grid: ImageGrid) -> bool:
    """Swap ``vectors`` into an existing grid transform on the same grid (True), else do nothing (False).

    The slider path: the transform object stays, so Slicer only sees a modification.
    """
    if transform is None or not transform.IsA("vtkOrientedGridTransform") or transform.GetInverseFlag():
        return False
    displacementGrid = transform.GetDisplacementGrid()
    directionMatrix = transform.GetGridDirectionMatrix()
    if displacementGrid is None or directionMatrix is None:
        return False
    sameGeometry = (
        np.allclose(displacementGrid.GetOrigin(), grid.origin)
        and np.allclose(displacementGrid.GetSpacing(), grid.spacing)
        and np.allclose(arrayFromVtkMatrix(directionMatrix)[:3, :3], grid.direction)
    )
    if not sameGeometry or not _replaceScalars(displacementGrid, vectors, shape):
        return False
    transform.Modified()
    return True


def displacementFromGridTransformNode(transformNode) -> tuple[np.ndarray, ImageGrid]:
    """The resampling displacement (RAS mm) and grid of a grid transform node (inverse of the above).

    Returns:
        ``(displacementRas (Z, Y, X, 3) float64, grid)``.

    Raises:
        ValueError: not a grid transform holding a from-parent displacement grid.
    """
    transform = transformNode.GetTransformFromParent() if transformNode is not None else None
    if transform is None or not transform.IsA("vtkOrientedGridTransform"):
        raise ValueError(f"'{_nodeName(transformNode)}' does not hold a grid transform from parent")
    transform.Update()
    displacementGrid = transform.GetDisplacementGrid()
    if transform.GetInverseFlag() or displacementGrid is None:
        raise ValueError(f"'{_nodeName(transformNode)}' does not hold a grid transform from parent")
    shape = tuple(reversed(displacementGrid.GetDimensions()))
    direction = np.eye(3)
    directionMatrix = transform.GetGridDirectionMatrix()
    if directionMatrix is not None:
        direction = arrayFromVtkMatrix(directionMatrix)[:3, :3]
    grid = ImageGrid(shape, displacementGrid.GetSpacing(), np.array(displacementGrid.GetOrigin()), direction)
    vectors = numpy_support.vtk_to_numpy(displacementGrid.GetPointData().GetScalars())
    return vectors.reshape(shape + (3,)).astype(np.float64), grid


# ------------------------------------------------------------------------------------------ display
def setScalarDisplay(volumeNode, colorNodeIds, window: float | None = None, level: float | None = None) -> None:
    """Colour table (first of ``colorNodeIds`` present in the scene) and window/level.

    With ``window``/``level`` None the display keeps automatic window/level.
    """
    displayNode = volumeNode.GetDisplayNode()
    if displayNode is None:
        volumeNode.CreateDefaultDisplayNodes()
        displayNode = volumeNode.GetDisplayNode()
    colorNodeId = _firstColorNodeId(volumeNode.GetScene(), colorNodeIds)
    if colorNodeId is not None:
        displayNode.SetAndObserveColorNodeID(colorNodeId)
    if window is not None and level is not None and displayNode.IsA("vtkMRMLScalarVolumeDisplayNode"):
        displayNode.AutoWindowLevelOff()
        displayNode.SetWindowLevel(float(window), float(level))
    elif displayNode.IsA("vtkMRMLScalarVolumeDisplayNode"):
        displayNode.AutoWindowLevelOn()


def setGreyDisplay(volumeNode, array: np.ndarray | None = None, symmetric: bool = False) -> None:
    """Grey display; with ``array`` the window covers its 1st-99th percentile (symmetric about 0 if asked)."""
    if array is None:
        setScalarDisplay(volumeNode, GREY_COLOR_NODE_IDS)
        return
    if symmetric:
        values = sampled_percentiles(array, [99], absolute=True)
    else:
        values = sampled_percentiles(array, [1, 99])
    if values is None:
        setScalarDisplay(volumeNode, GREY_COLOR_NODE_IDS)
        return
    if symmetric:
        half = float(values[0]) or 1.0
        setScalarDisplay(volumeNode, GREY_COLOR_NODE_IDS, window=2.0 * half, level=0.0)
    else:
        low, high = (float(v) for v in values)
        if high <= low:
            high = low + 1.0
        setScalarDisplay(volumeNode, GREY_COLOR_NODE_IDS, window=high - low, level=(high + low) / 2.0)


def setJacobianDisplay(volumeNode) -> None:
    """Diverging colours centred on det J = 1 (no volume change), window [0, 2]."""
    setScalarDisplay(volumeNode, JACOBIAN_COLOR_NODE_IDS, window=2.0, level=1.0)


def setLambdaMapDisplay(volumeNode, lambdaMap: np.ndarray) -> None:
    """Sequential colours over [0, max λ] (λ >= 0)."""
    high = float(np.nanmax(lambdaMap)) if np.size(lambdaMap) else 1.0
    high = high if np.isfinite(high) and high > 0 else 1.0
    setScalarDisplay(volumeNode, LAMBDA_COLOR_NODE_IDS, window=high, level=high / 2.0)


def setLabelDisplay(labelNode) -> None:
    """Label colours (GenericAnatomyColors in Slicer, Labels in slicer-core)."""
    displayNode = labelNode.GetDisplayNode()
    if displayNode is None:
        labelNode.CreateDefaultDisplayNodes()
        displayNode = labelNode.GetDisplayNode()
    colorNodeId = _firstColorNodeId(labelNode.GetScene(), LABEL_COLOR_NODE_IDS)
    if colorNodeId is not None:
        displayNode.SetAndObserveColorNodeID(colorNodeId)
