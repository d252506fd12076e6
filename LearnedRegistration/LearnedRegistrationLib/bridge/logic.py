"""Registration logic on MRML nodes, shared by the Slicer panel, the Slicer Python console and the command line.

Three steps, so that the long one can run away from Slicer's main thread::

    request = logic.prepareRegistration(fixedNode, movingNode, regularizationWeight=0.3)  # main thread
    computed = logic.computeRegistration(request, progressCallback, cancelRequested)    # anywhere
    outputs = logic.writeOutputs(request, computed, outputs)                             # main thread

or in one call, ``logic.register(fixedNode, movingNode, regularizationWeight=0.3)``. The Slicer
panel runs the middle step in a separate process (:mod:`jobs`, :mod:`tasks`).

Methods (``method=`` of ``prepareRegistration``): ``"optimize"`` (instance optimization,
:mod:`engine.optimize`), ``"network"`` (the shipped λ-conditioned network, :mod:`learned.predict`) and
``"network+adapt"`` (the network after test-time adaptation on the pair). After a network
registration has been written, ``logic.setRegularization(lam)`` re-evaluates the network already
in memory at a new λ and updates the same output nodes in place (the interactive slider).

``prepareRegistration`` reads the nodes into numpy arrays with their geometry (world RAS, see
:mod:`.mrml`) and checks them, without torch; ``computeRegistration`` (:mod:`compute`) touches no
MRML (engine, label warping, metrics, checkerboard); ``writeOutputs`` creates the missing output
nodes and updates the given ones in place, all or nothing.

:class:`RegistrationLogic` is a plain class (no Qt, no ``ScriptedLoadableModuleLogic``, which
slicer-core lacks), used as it is by the command line and the tests; the Slicer module's
``LearnedRegistrationLogic`` adds the parameter node, the views and the λ-sweep table to it.
torch is imported only where something is computed, so the Slicer module loads (and offers to
install PyTorch) without it.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Optional, Union

import numpy as np
import vtk

import slicer

from ..engine.common import DEFAULT_LAMBDA, PATH_KNOT_ITERATIONS, CancelCallback, ProgressCallback, RegistrationOptions
from ..engine.grid import ImageGrid
from . import mrml
from .compute import (
    DEFAULT_METHOD,
    DEFAULT_SPATIALLY_VARYING,
    EXPERIMENTAL_METHODS,
    METHODS,
    ComputedRegistration,
    NetworkCache,
    RegistrationRequest,
    computeRegistration,
    deriveOutputs,
    jsonSafe,
    loadNetwork,
)

if TYPE_CHECKING:  # torch-dependent types, imported where they are used
    from ..learned.network import RegistrationNetwork
    from .compute import InstantSession

__all__ = [
    "DEFAULT_METHOD",
    "METHODS",
    "METRICS_ATTRIBUTE",
    "ComputedRegistration",
    "RegistrationLogic",
    "RegistrationOutputNodes",
    "RegistrationRequest",
    "jsonSafe",
]


#: Node attribute holding the metrics (JSON) on the output transform node, kept in saved scenes.
METRICS_ATTRIBUTE = "LearnedRegistration.metrics"

@dataclass
class RegistrationOutputNodes:
    """Output nodes of a registration; None ones are created by :meth:`RegistrationLogic.writeOutputs`.

    Attributes:
        warpedVolumeNode: moving volume resampled on the fixed grid (scalar volume).
        displacementVolumeNode: ``vtkMRMLVectorVolumeNode``, 3 components, RAS mm, resampling
            convention (moving point = x + d(x)).
        transformNode: ``vtkMRMLGridTransformNode`` holding d as the transform from parent; put
            the moving volume under it to see it registered.
        checkerboardVolumeNode, differenceVolumeNode: fixed vs warped (grey).
        jacobianVolumeNode: det of the Jacobian of x -> x + d(x) (1 = no volume change, <= 0 folding).
        lambdaMapVolumeNode: regularization weight used at each voxel.
        warpedLabelNode: moving labels warped with nearest neighbour (label map, or a
            segmentation when the moving labels were a segmentation); only with moving labels.
        metrics: the metrics of the last registration written into these nodes.
    """

    warpedVolumeNode: Optional[slicer.vtkMRMLScalarVolumeNode] = None
    displacementVolumeNode: Optional[slicer.vtkMRMLVectorVolumeNode] = None
    transformNode: Optional[slicer.vtkMRMLGridTransformNode] = None
    checkerboardVolumeNode: Optional[slicer.vtkMRMLScalarVolumeNode] = None
    differenceVolumeNode: Optional[slicer.vtkMRMLScalarVolumeNode] = None
    jacobianVolumeNode: Optional[slicer.vtkMRMLScalarVolumeNode] = None
    lambdaMapVolumeNode: Optional[slicer.vtkMRMLScalarVolumeNode] = None
    warpedLabelNode: Optional[Union[slicer.vtkMRMLLabelMapVolumeNode, slicer.vtkMRMLSegmentationNode]] = None
    metrics: dict = field(default_factory=dict)


class RegistrationLogic:
    """Deformable registration of MRML volume nodes (see the module docstring for the three steps).

    All node arguments are MRML nodes of one scene; errors a user can fix raise ``ValueError``
    with a message that says what to change.

    Loaded networks are cached per weights file (read-only: adaptation works on a copy), and the
    last network registration written stays in memory for :meth:`setRegularization`.
    """

    def __init__(self) -> None:
        self._networks: NetworkCache = {}
        # (request, session, outputs) of the last network registration written, for setRegularization
        self._interactive: Optional[tuple[RegistrationRequest, InstantSession, RegistrationOutputNodes]] = None

    # ------------------------------------------------------------------------------------ prepare
    def prepareRegistration(
        self,
        fixedVolumeNode,
        movingVolumeNode,
        *,
        fixedMaskNode=None,
        fixedLabelNode=None,
        movingLabelNode=None,
        fixedLandmarksNode=None,
        movingLandmarksNode=None,
        lambdaMapNode=None,
        similarity: Optional[str] = None,
        regularizationWeight: Optional[float] = None,
        device: Optional[str] = None,
        iterationScale: float = 1.0,
        workingSpacingMm: Optional[float] = None,
        initialization: str = "com",
        evaluationLabels: Optional[Sequence[int]] = None,
        method: Optional[str] = None,
        spatiallyVarying: Optional[bool] = None,
        modelPath: Optional[str] = None,
        adaptationSteps: Optional[int] = None,
    ) -> RegistrationRequest:
        """Read the input nodes into a :class:`RegistrationRequest` (main thread).

        Args:
            fixedVolumeNode, movingVolumeNode: scalar volumes (any geometry; linear parent
                transforms are applied, non-linear ones must be hardened first).
            fixedMaskNode: label map (same geometry as the fixed volume) or segmentation; the
                similarity is computed where it is non-zero.
            fixedLabelNode, movingLabelNode: label maps with the geometry of their image, or
                segmentations (matched by segment name); for Dice/HD95 and the warped labels.
            fixedLandmarksNode, movingLandmarksNode: markups point lists with corresponding
                points in the same order; for TRE.
            lambdaMapNode: scalar volume with per-voxel regularization in [0, 1]; resampled
                (linear) onto the fixed grid when its geometry differs, 1 outside it.
            similarity: "mse", "lncc", "ncc", "ngf" or "mi" (None = the engine default, "mse").
            regularizationWeight: λ in [0, 1] (None = the engine default).
            device: "cpu", "cuda" or None (automatic).
            iterationScale: multiplies every iteration count (< 1 for a quick preview).
            workingSpacingMm: finest deformable level spacing (mm); coarser levels are 2x, 4x.
            initialization: "com" (align intensity centres of mass), "moments" (also principal
                axes) or "none" (use the images' positions as they are).
            evaluationLabels: restrict Dice/HD95 to these label values (default: all present).
            method: "path" (every λ from one run: the slider is instant), "optimize" (one λ),
                or the experimental "network" / "network+adapt" (None = :data:`DEFAULT_METHOD`).
                The network methods use the optimizer's affine stage, then the network; they
                ignore ``similarity``, ``iterationScale`` and ``workingSpacingMm``.
            spatiallyVarying: with "path", learn a per-pair λ(x) map (Chen et al.; None =
                :data:`DEFAULT_SPATIALLY_VARYING`).
            modelPath: network weights file (None = the shipped ones).
            adaptationSteps: test-time adaptation effort of "network+adapt" (a λ path started from
                the network): steps per λ knot (None = the path's default,
                :data:`engine.common.PATH_KNOT_ITERATIONS`).

        Raises:
            ValueError: a missing or empty node, an argument that is not a node of the kind listed
                above (a file path, a node of another class: the message names the argument and
                what it got; load files into nodes first, e.g. ``slicer.util.loadVolume``), a
                label map / mask whose geometry differs from its image, landmark lists of
                different lengths, bad option values, an unknown method, or a λ map with a
                network method (the network predicts its own λ(x)).
        """
        method = DEFAULT_METHOD if method is None else str(method).lower()
        if method not in METHODS:
            raise ValueError(f"unknown registration method {method!r}; choose one of {', '.join(METHODS)}")
        if method in EXPERIMENTAL_METHODS and lambdaMapNode is not None:
            raise ValueError(
                "a user-drawn λ map works with the 'path' and 'optimize' methods only; the network predicts its own λ(x)"
            )
        steps = PATH_KNOT_ITERATIONS if adaptationSteps is None else int(adaptationSteps)
        if steps < 0:
            raise ValueError(f"adaptation steps must be >= 0, got {adaptationSteps}")

        if fixedVolumeNode is None:
            raise ValueError("select a fixed volume")
        if movingVolumeNode is None:
            raise ValueError("select a moving volume")
        for argument, node in (
            ("fixedVolumeNode", fixedVolumeNode), ("movingVolumeNode", movingVolumeNode),
            ("fixedMaskNode", fixedMaskNode), ("fixedLabelNode", fixedLabelNode), ("movingLabelNode", movingLabelNode),
            ("fixedLandmarksNode", fixedLandmarksNode), ("movingLandmarksNode", movingLandmarksNode),
            ("lambdaMapNode", lambdaMapNode),
        ):
            _checkNodeArgument(argument, node)
        # read-only views where the voxels are float32 already: the engine never writes its inputs
        fixed, fixedGrid = mrml.arrayFromVolumeNode(fixedVolumeNode, copy=False)
        moving, movingGrid = mrml.arrayFromVolumeNode(movingVolumeNode, copy=False)
        fixedName, movingName = fixedVolumeNode.GetName(), movingVolumeNode.GetName()

        options = RegistrationOptions(
            similarity=RegistrationOptions.similarity if similarity is None else str(similarity).lower(),
            regularization_weight=DEFAULT_LAMBDA if regularizationWeight is None else float(regularizationWeight),
            device=device or None,
            iteration_scale=float(iterationScale),
            initialization=str(initialization).lower(),
        )
        if workingSpacingMm is not None:
            spacing = float(workingSpacingMm)
            if not spacing > 0:
                raise ValueError(f"working spacing must be a positive number of mm, got {workingSpacingMm}")
            options = replace(
                options,
                deformable_spacings_mm=(2.0 * spacing, spacing),
                affine_spacings_mm=(max(8.0, 4.0 * spacing), max(4.0, 2.0 * spacing)),
            )
        options = options.validated()

        request = RegistrationRequest(
            fixed=fixed,
            fixedGrid=fixedGrid,
            moving=moving,
            movingGrid=movingGrid,
            options=options,
            scene=fixedVolumeNode.GetScene(),
            fixedVolumeNodeID=fixedVolumeNode.GetID() or "",
            movingVolumeNodeID=movingVolumeNode.GetID() or "",
            outputBaseName=movingName or "Moving",
            evaluationLabels=None if evaluationLabels is None else [int(v) for v in evaluationLabels],
            method=method,
            spatiallyVarying=bool(DEFAULT_SPATIALLY_VARYING if spatiallyVarying is None else spatiallyVarying),
            modelPath=None if modelPath is None else str(modelPath),
            adaptationSteps=steps if method == "network+adapt" else 0,
        )

        if fixedMaskNode is not None:
            mask = self._labelsOnImage(fixedMaskNode, fixedVolumeNode, fixedGrid, f"the fixed volume '{fixedName}'")[0]
            if not np.any(mask > 0):
                raise ValueError(f"the fixed mask '{fixedMaskNode.GetName()}' is empty; it must mark at least one voxel")
            request.fixedMask = (mask > 0).astype(np.uint8)

        if lambdaMapNode is not None:
            lambdaMap, lambdaGrid = mrml.arrayFromVolumeNode(lambdaMapNode)
            if not np.all(np.isfinite(lambdaMap)) or lambdaMap.min() < 0 or lambdaMap.max() > 1:
                raise ValueError(
                    f"the λ map '{lambdaMapNode.GetName()}' must hold values in [0, 1] "
                    f"(found {np.nanmin(lambdaMap):.3g} to {np.nanmax(lambdaMap):.3g})"
                )
            # Resampled onto the fixed grid (if needed) where the registration runs, not here.
            request.lambdaMap, request.lambdaMapGrid = lambdaMap.astype(np.float32), lambdaGrid

        if (fixedLabelNode is None) != (movingLabelNode is None):
            raise ValueError("give both fixed and moving labels (or neither) to measure label overlap")
        if fixedLabelNode is not None:
            names: Optional[list] = None
            fixedLabels, names = self._labelsOnImage(
                fixedLabelNode, fixedVolumeNode, fixedGrid, f"the fixed volume '{fixedName}'"
            )
            movingLabels, names = self._labelsOnImage(
                movingLabelNode, movingVolumeNode, movingGrid, f"the moving volume '{movingName}'", names
            )
            request.fixedLabels, request.movingLabels, request.labelNames = fixedLabels, movingLabels, names
            request.movingLabelsAreSegmentation = bool(movingLabelNode.IsA("vtkMRMLSegmentationNode"))

        if (fixedLandmarksNode is None) != (movingLandmarksNode is None):
            raise ValueError("give both fixed and moving landmarks (or neither) to measure the target registration error")
        if fixedLandmarksNode is not None:
            fixedPoints = mrml.pointsFromMarkupsNode(fixedLandmarksNode)
            movingPoints = mrml.pointsFromMarkupsNode(movingLandmarksNode)
            if len(fixedPoints) != len(movingPoints) or len(fixedPoints) == 0:
                raise ValueError(
                    f"the landmark lists must hold the same, non-zero number of corresponding points; "
                    f"'{fixedLandmarksNode.GetName()}' has {len(fixedPoints)} and "
                    f"'{movingLandmarksNode.GetName()}' has {len(movingPoints)}"
                )
            request.fixedPoints, request.movingPoints = fixedPoints, movingPoints
        return request

    @staticmethod
    def _labelsOnImage(labelNode, volumeNode, grid: ImageGrid, description: str, names=None):
        """(labels int32 on ``grid``, segment names or None) from a label map or segmentation node."""
        if labelNode.IsA("vtkMRMLSegmentationNode"):
            return mrml.labelArrayFromSegmentationNode(labelNode, volumeNode, names)
        if not labelNode.IsA("vtkMRMLVolumeNode"):
            raise ValueError(
                f"'{labelNode.GetName()}' must be a label map volume or a segmentation, got a {labelNode.GetClassName()}"
            )
        return mrml.labelArrayFromLabelMapNode(labelNode, grid, description), names

    # ------------------------------------------------------------------------------------ compute
    def computeRegistration(
        self,
        request: RegistrationRequest,
        progressCallback: Optional[ProgressCallback] = None,
        cancelRequested: Optional[CancelCallback] = None,
    ) -> ComputedRegistration:
        """:func:`compute.computeRegistration` with this logic's cache of loaded networks (any thread).

        Raises:
            ValueError: images the engine rejects (2D, NaN, empty, no overlap ...).
            engine.common.RegistrationCancelled: when ``cancelRequested()`` returned True.
        """
        return computeRegistration(request, progressCallback, cancelRequested, self._networks)

    def loadNetwork(self, modelPath: Optional[str] = None) -> tuple[RegistrationNetwork, dict]:
        """(network, metadata) from ``modelPath`` (None = the shipped weights), cached per file."""
        return loadNetwork(modelPath, self._networks)

    # ------------------------------------------------------------------------------------ interactive λ
    def canSetRegularizationInstantly(self) -> bool:
        """True when a λ path or network registration is in memory (:meth:`setRegularization` needs no new run)."""
        return self._interactive is not None

    def instantSession(self) -> Optional[InstantSession]:
        """The session of the last λ-path or network registration written (``engine.path.LambdaPath``
        or ``learned.predict.NetworkRegistration``), or None.

        For scripting: e.g. ``session.predict(λ)``, a path's ``session.knots``, a network's
        ``session.weight_map()``.
        """
        return None if self._interactive is None else self._interactive[1]

    def releaseInstantSession(self) -> None:
        """Forget the session kept for :meth:`setRegularization` (frees its memory; the scene is closing)."""
        self._interactive = None

    def setRegularization(self, regularizationWeight: float, displayed: Optional[str] = None) -> RegistrationOutputNodes:
        """Re-evaluate the last λ-path (or network) registration at a new λ and update its output nodes in place.

        No optimization runs: the λ path interpolates its velocities (a network re-runs only its
        λ-conditioned decoder), then every output (warped, displacement, transform, checkerboard,
        difference, Jacobian, λ map, warped labels, metrics) is rewritten into the same nodes, all
        or nothing (main thread).

        Args:
            regularizationWeight: the new λ.
            displayed: the output attribute shown in the views ("warpedVolumeNode",
                "checkerboardVolumeNode" or "differenceVolumeNode"): with the λ path it is updated
                first, as soon as the warped image is ready, and the others right after.

        Returns:
            The (same) output nodes, with the new metrics; ``metrics["update_s"]`` is the time the
            whole update took, ``metrics["update_displayed_s"]`` the time to the displayed one.

        Raises:
            RuntimeError: no such registration has been written yet (run one with ``method="path"``,
                ``"network"`` or ``"network+adapt"`` first).
            ValueError: λ outside [0, 1].
        """
        if self._interactive is None:
            raise RuntimeError("no λ-path or network registration in memory: register with method 'path' first")
        start = time.perf_counter()
        request, session, outputs = self._interactive
        lam = float(regularizationWeight)
        if not 0.0 <= lam <= 1.0 or math.isnan(lam):
            raise ValueError(f"λ must be in [0, 1], got {regularizationWeight}")
        request = request.atLambda(lam)
        transaction = _SceneTransaction(request.scene)
        displayedAt = None
        try:
            if displayed in _FROM_WARPED and hasattr(session, "evaluate") and getattr(outputs, displayed) is not None:
                evaluation = session.evaluate(lam)
                node = transaction.prepare(getattr(outputs, displayed))
                mrml.updateVolumeNodeFromArray(request.scene, _FROM_WARPED[displayed](request, evaluation.warped),
                                               request.fixedGrid, node, node.GetName(), copy=False)
                displayedAt = time.perf_counter() - start
                result = evaluation.result()
            else:
                result = session.predict(lam)
            computed = deriveOutputs(request, result, session)
            updated = self.writeOutputs(request, computed, outputs)
        except BaseException:
            transaction.rollback()
            raise
        updated.metrics["update_s"] = time.perf_counter() - start
        updated.metrics["update_displayed_s"] = updated.metrics["update_s"] if displayedAt is None else displayedAt
        return updated

    # ------------------------------------------------------------------------------------ write
    def writeOutputs(
        self,
        request: RegistrationRequest,
        computed: ComputedRegistration,
        outputNodes: Optional[RegistrationOutputNodes] = None,
    ) -> RegistrationOutputNodes:
        """Create missing output nodes and update the given ones in place (main thread).

        All or nothing: if anything fails, the nodes created by this call are removed and the
        nodes given in ``outputNodes`` get their previous data back, then the error is raised.
        The volume nodes take over the arrays of ``computed`` without copying them (a slider
        move writes seven full volumes): write a ``computed`` once and do not change its arrays.

        The scene is put in batch-processing state only when nodes are created; in-place updates
        (a λ change) skip it.

        Returns:
            A new :class:`RegistrationOutputNodes` (the given nodes, plus the created ones).

        Raises:
            ValueError: an output node of the wrong class, or no scene.
        """
        scene = request.scene
        if scene is None:
            raise ValueError("the request has no MRML scene (was it made by prepareRegistration?)")
        given = outputNodes or RegistrationOutputNodes()
        result = computed.result
        grid = request.fixedGrid
        base = request.outputBaseName

        # Check the classes of the given nodes before changing anything.
        for attribute, className in _OUTPUT_CLASSES.items():
            node = getattr(given, attribute)
            if node is not None and not _isOutputClass(node, className):
                raise ValueError(
                    f"output '{attribute}' must be a {className}, got '{node.GetName()}' ({node.GetClassName()})"
                )
        if given.warpedLabelNode is not None and not (
            given.warpedLabelNode.IsA("vtkMRMLLabelMapVolumeNode") or given.warpedLabelNode.IsA("vtkMRMLSegmentationNode")
        ):
            raise ValueError(
                f"output 'warpedLabelNode' must be a label map or segmentation, got {given.warpedLabelNode.GetClassName()}"
            )

        transaction = _SceneTransaction(scene)
        outputs = RegistrationOutputNodes()
        # Batch processing only when nodes are added: ending it makes every node combo box and the
        # subject hierarchy rebuild, which costs more than an in-place update (a slider move) itself.
        needed = [*_OUTPUT_CLASSES, *(["warpedLabelNode"] if computed.warpedLabels is not None else [])]
        batch = any(getattr(given, attribute) is None for attribute in needed)
        if batch:
            scene.StartState(scene.BatchProcessState)
        try:

            def volume(attribute, array, name, className="vtkMRMLScalarVolumeNode"):
                node = transaction.prepare(getattr(given, attribute))
                node = mrml.updateVolumeNodeFromArray(scene, array, grid, node, name, className, copy=False)
                setattr(outputs, attribute, node)
                return node

            node = volume("warpedVolumeNode", result.warped, f"{base} warped")
            mrml.setGreyDisplay(node, result.warped)

            node = transaction.prepare(given.displacementVolumeNode)
            outputs.displacementVolumeNode = mrml.updateDisplacementVolumeNode(
                scene, result.displacement_ras, grid, node, f"{base} displacement", copy=False
            )
            node = transaction.prepare(given.transformNode)
            outputs.transformNode = mrml.updateGridTransformNode(  # shares the vector volume's voxels
                scene, result.displacement_ras, grid, node, f"{base} transform", copy=False
            )

            node = volume("checkerboardVolumeNode", computed.checkerboard, f"{base} checkerboard")
            mrml.setGreyDisplay(node, computed.checkerboard)
            node = volume("differenceVolumeNode", computed.difference, f"{base} difference")
            mrml.setGreyDisplay(node, computed.difference, symmetric=True)
            node = volume("jacobianVolumeNode", result.jacobian, f"{base} Jacobian determinant")
            mrml.setJacobianDisplay(node)
            node = volume("lambdaMapVolumeNode", result.lambda_map, f"{base} lambda map")
            mrml.setLambdaMapDisplay(node, result.lambda_map)

            outputs.warpedLabelNode = given.warpedLabelNode
            if computed.warpedLabels is not None:
                target = transaction.prepare(given.warpedLabelNode)
                asSegmentation = (
                    target.IsA("vtkMRMLSegmentationNode") if target is not None else request.movingLabelsAreSegmentation
                )
                if asSegmentation:
                    node = mrml.updateSegmentationNodeFromLabels(
                        scene, computed.warpedLabels, grid, target, f"{base} warped labels", request.labelNames
                    )
                else:
                    node = mrml.updateVolumeNodeFromArray(
                        scene, computed.warpedLabels, grid, target, f"{base} warped labels", "vtkMRMLLabelMapVolumeNode"
                    )
                    mrml.setLabelDisplay(node)
                outputs.warpedLabelNode = node

            outputs.metrics = dict(computed.metrics)
            outputs.transformNode.SetAttribute(METRICS_ATTRIBUTE, json.dumps(jsonSafe(outputs.metrics)))
        except BaseException:
            transaction.rollback()
            raise
        finally:
            if batch:
                scene.EndState(scene.BatchProcessState)
        # The slider (setRegularization) follows the last registration written.
        self._interactive = (request, computed.session, outputs) if computed.session is not None else None
        return outputs

    # ------------------------------------------------------------------------------------ all
    def register(
        self,
        fixedVolumeNode,
        movingVolumeNode,
        *,
        outputNodes: Optional[RegistrationOutputNodes] = None,
        progressCallback: Optional[ProgressCallback] = None,
        cancelRequested: Optional[CancelCallback] = None,
        **options,
    ) -> RegistrationOutputNodes:
        """Prepare, compute and write in one synchronous call (scripts, tests, the command line).

        ``options`` are the keyword arguments of :meth:`prepareRegistration`. On error or
        cancellation (:class:`engine.common.RegistrationCancelled`) the scene is left unchanged.
        """
        request = self.prepareRegistration(fixedVolumeNode, movingVolumeNode, **options)
        computed = self.computeRegistration(request, progressCallback, cancelRequested)
        return self.writeOutputs(request, computed, outputNodes)


#: MRML classes each node argument of :meth:`RegistrationLogic.prepareRegistration` accepts, how to
#: call them in a message, and the ``slicer.util`` function that loads such a file into a node.
_VOLUME = (("vtkMRMLScalarVolumeNode",), "a scalar volume node", "slicer.util.loadVolume")
_LABELS = (("vtkMRMLVolumeNode", "vtkMRMLSegmentationNode"), "a label map volume or segmentation node",
           "slicer.util.loadLabelVolume or loadSegmentation")
_POINTS = (("vtkMRMLMarkupsNode",), "a markups point list node", "slicer.util.loadMarkups")
_NODE_ARGUMENT_CLASSES = {
    "fixedVolumeNode": _VOLUME,
    "movingVolumeNode": _VOLUME,
    "fixedMaskNode": _LABELS,
    "fixedLabelNode": _LABELS,
    "movingLabelNode": _LABELS,
    "fixedLandmarksNode": _POINTS,
    "movingLandmarksNode": _POINTS,
    "lambdaMapNode": _VOLUME,
}


def _checkNodeArgument(argument: str, node) -> None:
    """Refuse (ValueError) a node argument that is neither None nor an MRML node of the accepted classes."""
    if node is None:
        return
    classes, kind, loader = _NODE_ARGUMENT_CLASSES[argument]
    if isinstance(node, slicer.vtkMRMLNode) and any(node.IsA(name) for name in classes):
        return
    if isinstance(node, slicer.vtkMRMLNode):
        got = f"the {node.GetClassName()} '{node.GetName()}'"
    elif isinstance(node, (str, bytes, os.PathLike)):
        got = f"the file path {os.fsdecode(node)!r}; load the file into a node first ({loader})"
    else:
        got = f"a {type(node).__name__}"
    raise ValueError(f"{argument} must be {kind} ({' or '.join(classes)}), got {got}")


def _checkerboardOf(request: RegistrationRequest, warped: np.ndarray) -> np.ndarray:
    from ..engine.visualization import checkerboard

    return checkerboard(request.fixed, warped, request.fixedGrid, request.checkerboardSquareMm)


def _differenceOf(request: RegistrationRequest, warped: np.ndarray) -> np.ndarray:
    from ..engine.visualization import difference

    return difference(request.fixed, warped)


#: Outputs made from the warped image alone (what a λ change can show first), and how.
_FROM_WARPED = {
    "warpedVolumeNode": lambda request, warped: warped,
    "checkerboardVolumeNode": _checkerboardOf,
    "differenceVolumeNode": _differenceOf,
}

#: Class each output node must have when given for an in-place update.
_OUTPUT_CLASSES = {
    "warpedVolumeNode": "vtkMRMLScalarVolumeNode",
    "displacementVolumeNode": "vtkMRMLVectorVolumeNode",
    "transformNode": "vtkMRMLGridTransformNode",
    "checkerboardVolumeNode": "vtkMRMLScalarVolumeNode",
    "differenceVolumeNode": "vtkMRMLScalarVolumeNode",
    "jacobianVolumeNode": "vtkMRMLScalarVolumeNode",
    "lambdaMapVolumeNode": "vtkMRMLScalarVolumeNode",
}


def _isOutputClass(node, className: str) -> bool:
    """Scalar outputs must be plain scalar volumes (not label maps or vector volumes)."""
    if className == "vtkMRMLScalarVolumeNode":
        return node.GetClassName() == className
    return bool(node.IsA(className))


class _SceneTransaction:
    """Remembers what :meth:`RegistrationLogic.writeOutputs` changed, to undo it on failure.

    Every node added to the scene since the transaction began is removed (output, display and
    storage nodes alike); nodes updated in place get back their previous image data, geometry,
    transform or segments (a shallow snapshot: the old VTK objects are kept alive).
    """

    def __init__(self, scene):
        self.scene = scene
        self.nodeIdsBefore = mrml.nodeIds(scene)
        self.restorers: list = []

    def prepare(self, node):
        """Snapshot ``node`` (may be None) before it is updated; returns it."""
        if node is None:
            return None
        if node.IsA("vtkMRMLVolumeNode"):
            # Updates may swap the scalar array inside the same vtkImageData (mrml._replaceScalars),
            # so keep the old array as well as the old image object.
            oldImage = node.GetImageData()
            oldScalars = oldImage.GetPointData().GetScalars() if oldImage is not None else None
            oldMatrix = vtk.vtkMatrix4x4()
            node.GetIJKToRASMatrix(oldMatrix)

            def restoreVolume(node=node, oldImage=oldImage, oldScalars=oldScalars, oldMatrix=oldMatrix):
                if oldImage is not None and oldScalars is not None:
                    oldImage.GetPointData().SetScalars(oldScalars)
                    oldImage.Modified()
                node.SetIJKToRASMatrix(oldMatrix)
                node.SetAndObserveImageData(oldImage)

            self.restorers.append(restoreVolume)
        elif node.IsA("vtkMRMLTransformNode"):
            oldTransform = node.GetTransformFromParent()
            oldGrid = oldTransform.GetDisplacementGrid() if oldTransform is not None and oldTransform.IsA("vtkOrientedGridTransform") else None
            oldVectors = oldGrid.GetPointData().GetScalars() if oldGrid is not None else None
            oldAttribute = node.GetAttribute(METRICS_ATTRIBUTE)

            def restoreTransform(node=node, oldTransform=oldTransform, oldGrid=oldGrid, oldVectors=oldVectors, oldAttribute=oldAttribute):
                if oldGrid is not None and oldVectors is not None:
                    oldGrid.GetPointData().SetScalars(oldVectors)
                    oldGrid.Modified()
                    oldTransform.Modified()
                node.SetAndObserveTransformFromParent(oldTransform)
                if oldAttribute is None:
                    node.RemoveAttribute(METRICS_ATTRIBUTE)
                else:
                    node.SetAttribute(METRICS_ATTRIBUTE, oldAttribute)

            self.restorers.append(restoreTransform)
        elif node.IsA("vtkMRMLSegmentationNode"):
            oldSegmentation = slicer.vtkSegmentation()
            oldSegmentation.DeepCopy(node.GetSegmentation())

            def restoreSegmentation(node=node, oldSegmentation=oldSegmentation):
                node.GetSegmentation().DeepCopy(oldSegmentation)

            self.restorers.append(restoreSegmentation)
        return node

    def rollback(self) -> None:
        """Remove the added nodes and restore the updated ones."""
        mrml.removeNodesAddedSince(self.scene, self.nodeIdsBefore)
        for restore in reversed(self.restorers):
            restore()
        self.restorers = []
