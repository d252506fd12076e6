"""Learned Registration: deformable image registration with the regularization weight λ in the user's hand.

Slicer module layer: the module description, the parameter node, the Qt panel (the only place Qt is
used), the Slicer logic and the self-test. The registration itself lives in
``LearnedRegistrationLib.bridge.logic`` (no Qt; also used headless and from the command line), the
engine in ``LearnedRegistrationLib.engine`` and the network in ``LearnedRegistrationLib.learned``.
"""

import enum
import importlib.util
import logging
import math
import os
import time
import typing
from typing import Annotated

import numpy as np
import qt
import vtk

import slicer
from slicer import (
    vtkMRMLGridTransformNode,
    vtkMRMLLabelMapVolumeNode,
    vtkMRMLMarkupsFiducialNode,
    vtkMRMLPlotChartNode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
    vtkMRMLTableNode,
    vtkMRMLVectorVolumeNode,
)
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

# The bridge and these engine modules import torch only inside the functions that compute, so the
# module loads without torch and can offer to install PyTorch.
from LearnedRegistrationLib.bridge import jobs
from LearnedRegistrationLib.bridge import logic as registrationLogic
from LearnedRegistrationLib.bridge.compute import DEFAULT_SPATIALLY_VARYING, computeSweep, qualityWarning
from LearnedRegistrationLib.bridge.tasks import LatestRequestDebouncer, TaskState
from LearnedRegistrationLib.engine.common import DEFAULT_LAMBDA, RegistrationCancelled
from LearnedRegistrationLib.engine.metric_table import EVALUATION_KEYS, SWEEP_KEYS, metric

#
# LearnedRegistration
#


class LearnedRegistration(ScriptedLoadableModule):
    """Module description shown in Slicer's module list and help panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Learned Registration")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Registration")]
        self.parent.dependencies = []
        self.parent.contributors = ["LearnedRegistration developers"]
        self.parent.helpText = _("""
Deformable registration of a moving volume to a fixed volume, with the regularization weight
&lambda; in [0, 1] on a slider: small &lambda; follows the images closely, large &lambda; gives a
smoother deformation. Changing &lambda; after a registration recomputes it into the same output nodes.
Outputs: warped moving volume, displacement field (vector volume), grid transform, checkerboard,
difference, Jacobian determinant and &lambda;(x) map, with Dice, HD95, TRE, % folding and SDlogJ when
segmentations or landmarks are given.
<br><br>
Conventions: data are in RAS in memory and LPS in files (NRRD, NIfTI, .h5), as everywhere in Slicer.
The displacement field is in RAS millimetres on the fixed volume's grid. The grid transform is a
resampling transform, stored "from parent", that maps fixed to moving:
warped(x) = moving(x + u(x)) for x in the fixed volume's space.
""")
        self.parent.acknowledgementText = _("""
Regularization control follows HyperMorph (Hoopes et al., "HyperMorph: Amortized Hyperparameter
Learning for Image Registration", IPMI 2021) and SynthMorph (Hoffmann et al., "SynthMorph: learning
contrast-invariant registration without acquired images", IEEE TMI 2022). The spatially varying
regularization follows Chen et al., "Unsupervised learning of spatially varying regularization for
diffeomorphic image registration".
""")

        # Sample data are registered once the application has started (SampleData must be loaded).
        slicer.app.connect("startupCompleted()", registerSampleData)


#
# Register sample data sets in Sample Data module
#

#: The MRBrainTumor1/2 pair that ships with Slicer's SampleData (same files and checksums).
_BRAIN_TUMOR_PAIR = {
    "uris": (
        "https://github.com/Slicer/SlicerTestingData/releases/download/SHA256/"
        "998cb522173839c78657f4bc0ea907cea09fd04e44601f17c82ea27927937b95",
        "https://github.com/Slicer/SlicerTestingData/releases/download/SHA256/"
        "1a64f3f422eb3d1c9b093d1a18da354b13bcf307907c66317e2463ee530b7a97",
    ),
    "fileNames": ("RegLib_C01_1.nrrd", "RegLib_C01_2.nrrd"),
    "nodeNames": ("MRBrainTumor1", "MRBrainTumor2"),
    "checksums": (
        "SHA256:998cb522173839c78657f4bc0ea907cea09fd04e44601f17c82ea27927937b95",
        "SHA256:1a64f3f422eb3d1c9b093d1a18da354b13bcf307907c66317e2463ee530b7a97",
    ),
}

SAMPLE_DATA_CATEGORY = "LearnedRegistration"
SAMPLE_PAIR_NAME = "LearnedRegistrationBrainTumorPair"


def registerSampleData():
    """Add the MRBrainTumor1 (fixed) / MRBrainTumor2 (moving) pair to the Sample Data module."""
    import SampleData

    iconsPath = os.path.join(os.path.dirname(__file__), "Resources", "Icons")
    if hasattr(SampleData.SampleDataLogic, "registerCustomSampleDataCategory"):  # Slicer >= 5.12 (added after 5.10)
        SampleData.SampleDataLogic.registerCustomSampleDataCategory(
            SAMPLE_DATA_CATEGORY, title=_("Learned Registration"))
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category=SAMPLE_DATA_CATEGORY,
        sampleName=SAMPLE_PAIR_NAME,
        thumbnailFileName=os.path.join(iconsPath, "LearnedRegistration.png"),
        uris=_BRAIN_TUMOR_PAIR["uris"],
        fileNames=_BRAIN_TUMOR_PAIR["fileNames"],
        nodeNames=_BRAIN_TUMOR_PAIR["nodeNames"],
        checksums=_BRAIN_TUMOR_PAIR["checksums"],
    )


#
# Choices
#


class RegistrationMethod(enum.Enum):
    """How the deformation is computed.

    ``PATH`` (the default) registers the pair once for every λ (``LearnedRegistrationLib.engine.path``):
    a λ change re-evaluates the path already in memory, with no new optimization. ``OPTIMIZE``
    fits a stationary velocity field at one λ; a λ change re-runs it. ``NETWORK`` and
    ``NETWORK_ADAPT`` are the experimental λ-conditioned network (``LearnedRegistrationLib.learned``),
    alone or adapted to the pair. The values are the logic's method names.
    """

    PATH = "path"
    OPTIMIZE = "optimize"
    NETWORK = "network"
    NETWORK_ADAPT = "network+adapt"

    def label(self) -> str:
        """Text shown in the method combo box."""
        return {
            RegistrationMethod.PATH: _("λ path (instant λ)"),
            RegistrationMethod.OPTIMIZE: _("Instance optimization"),
            RegistrationMethod.NETWORK: _("Network (experimental)"),
            RegistrationMethod.NETWORK_ADAPT: _("Network + adaptation (experimental)"),
        }[self]

    @property
    def updatesInstantly(self) -> bool:
        """True when a λ change needs no new registration run (the λ path, the network)."""
        return self is not RegistrationMethod.OPTIMIZE


class Similarity(enum.Enum):
    """Image similarity measure; the values are the engine's names."""

    LNCC = "lncc"
    MSE = "mse"
    NCC = "ncc"
    NGF = "ngf"
    MI = "mi"
    MIND = "mind"

    def label(self) -> str:
        """Text shown in the similarity combo box."""
        return {
            Similarity.LNCC: _("Local normalized cross-correlation"),
            Similarity.MSE: _("Mean squared error"),
            Similarity.NCC: _("Normalized cross-correlation (global)"),
            Similarity.NGF: _("Normalized gradient fields"),
            Similarity.MI: _("Mutual information"),
            Similarity.MIND: _("MIND-SSC (modality independent)"),
        }[self]


class ComputeDevice(enum.Enum):
    """Where torch computes."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"

    def label(self) -> str:
        """Text shown in the device combo box."""
        return {
            ComputeDevice.AUTO: _("Automatic (GPU if available)"),
            ComputeDevice.CPU: _("CPU"),
            ComputeDevice.CUDA: _("GPU (CUDA)"),
        }[self]

    @property
    def torchDevice(self) -> typing.Optional[str]:
        """The logic's ``device`` argument: None for automatic."""
        return None if self is ComputeDevice.AUTO else self.value


class DisplayedOutput(enum.Enum):
    """Output shown in the slice views' foreground over the fixed volume."""

    WARPED = "warped"
    CHECKERBOARD = "checkerboard"
    DIFFERENCE = "difference"
    JACOBIAN = "jacobian"
    LAMBDA_MAP = "lambdaMap"

    def label(self) -> str:
        """Text shown in the "Show" combo box."""
        return {
            DisplayedOutput.WARPED: _("Warped volume"),
            DisplayedOutput.CHECKERBOARD: _("Checkerboard"),
            DisplayedOutput.DIFFERENCE: _("Difference"),
            DisplayedOutput.JACOBIAN: _("Jacobian determinant"),
            DisplayedOutput.LAMBDA_MAP: _("λ map"),
        }[self]


#
# LearnedRegistrationParameterNode
#

# Unions are spelled with typing.Union (not "A | B"): parameterNodeWrapper accepts PEP 604 unions
# only in recent Slicer releases.
LabelNodeType = typing.Union[vtkMRMLLabelMapVolumeNode, vtkMRMLSegmentationNode, None]


@parameterNodeWrapper
class LearnedRegistrationParameterNode:
    """All user choices of the module, saved with the scene.

    Inputs:
        fixedVolume, movingVolume: images to register (moving is deformed onto fixed).
        fixedMask: optional label map / segmentation; similarity is measured where non-zero.
        fixedSegmentation, movingSegmentation: optional labels for Dice / HD95 and the warped labels.
        fixedLandmarks, movingLandmarks: optional corresponding point lists for TRE.
    Registration:
        method: :class:`RegistrationMethod`.
        similarity: :class:`Similarity`.
        regularizationWeight: λ in [0, 1]; loss = (1 - λ)·similarity + λ·smoothness.
        liveUpdate: re-run (debounced) when λ changes after a registration.
        spatiallyVarying: spatially varying regularization: the λ path learns a λ(x) for the pair,
            times ``inputLambdaMap`` when set; instance optimization uses ``inputLambdaMap``.
        inputLambdaMap: optional per-voxel weight λ(x) in [0, 1].
    Advanced:
        device: :class:`ComputeDevice`.
        iterationScale: multiplies every iteration count.
        workingSpacingMm: finest working voxel size in mm; 0 = automatic.
    Evaluation:
        sweepSteps: number of λ values of the λ sweep (evenly spaced in [0, 1]).
        displayedOutput: :class:`DisplayedOutput` shown in the slice views.
    Outputs (empty ones are created on Apply and stored back here):
        warpedVolume, displacementVolume, transform, checkerboardVolume, differenceVolume,
        jacobianVolume, lambdaMapVolume, warpedSegmentation, sweepTable, sweepChart.
    """

    fixedVolume: vtkMRMLScalarVolumeNode
    movingVolume: vtkMRMLScalarVolumeNode
    fixedMask: LabelNodeType
    fixedSegmentation: LabelNodeType
    movingSegmentation: LabelNodeType
    fixedLandmarks: vtkMRMLMarkupsFiducialNode
    movingLandmarks: vtkMRMLMarkupsFiducialNode

    method: RegistrationMethod = RegistrationMethod.PATH
    similarity: Similarity = Similarity.MSE
    regularizationWeight: Annotated[float, WithinRange(0.0, 1.0)] = DEFAULT_LAMBDA
    liveUpdate: bool = True
    spatiallyVarying: bool = DEFAULT_SPATIALLY_VARYING
    inputLambdaMap: vtkMRMLScalarVolumeNode

    device: ComputeDevice = ComputeDevice.AUTO
    iterationScale: Annotated[float, WithinRange(0.1, 10.0)] = 1.0
    workingSpacingMm: Annotated[float, WithinRange(0.0, 10.0)] = 0.0

    sweepSteps: Annotated[int, WithinRange(2, 21)] = 6
    displayedOutput: DisplayedOutput = DisplayedOutput.WARPED

    warpedVolume: vtkMRMLScalarVolumeNode
    displacementVolume: vtkMRMLVectorVolumeNode
    transform: vtkMRMLGridTransformNode
    checkerboardVolume: vtkMRMLScalarVolumeNode
    differenceVolume: vtkMRMLScalarVolumeNode
    jacobianVolume: vtkMRMLScalarVolumeNode
    lambdaMapVolume: vtkMRMLScalarVolumeNode
    warpedSegmentation: LabelNodeType
    sweepTable: vtkMRMLTableNode
    sweepChart: vtkMRMLPlotChartNode


#: Parameter-node output field <-> ``RegistrationOutputNodes`` attribute.
OUTPUT_FIELDS = {
    "warpedVolume": "warpedVolumeNode",
    "displacementVolume": "displacementVolumeNode",
    "transform": "transformNode",
    "checkerboardVolume": "checkerboardVolumeNode",
    "differenceVolume": "differenceVolumeNode",
    "jacobianVolume": "jacobianVolumeNode",
    "lambdaMapVolume": "lambdaMapVolumeNode",
    "warpedSegmentation": "warpedLabelNode",
}

#: Output shown for each "Show" choice, and its foreground opacity over the fixed volume.
DISPLAYED_OUTPUT_FIELDS = {
    DisplayedOutput.WARPED: ("warpedVolume", 0.5),
    DisplayedOutput.CHECKERBOARD: ("checkerboardVolume", 1.0),
    DisplayedOutput.DIFFERENCE: ("differenceVolume", 1.0),
    DisplayedOutput.JACOBIAN: ("jacobianVolume", 0.6),
    DisplayedOutput.LAMBDA_MAP: ("lambdaMapVolume", 0.6),
}

#: Series of the λ sweep plot: (column = metrics key, colour); the legend is the metric's label.
SWEEP_SERIES = (
    ("dice_mean", (0.20, 0.55, 0.90)),
    ("folding_percent", (0.90, 0.40, 0.10)),
)


#
# LearnedRegistrationWidget
#


class _RunKind(enum.Enum):
    APPLY = "apply"  # Apply button
    LIVE = "live"  # debounced λ change (instance optimization: a new registration)
    SWEEP = "sweep"  # the λ sweep (one background job for every λ)


class _ActiveRun:
    """A job running in the background: what was asked and the task computing it."""

    def __init__(self, kind, request, task, regularizationWeight):
        self.kind = kind
        self.request = request
        self.task = task
        self.regularizationWeight = regularizationWeight


class LearnedRegistrationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module panel.

    The panel reads and writes the parameter node (widgets are bound through the .ui's
    ``SlicerParameterName`` properties) and never computes on Slicer's main thread: a registration
    (or a λ sweep) is prepared there, computed in a separate process of Slicer's Python
    (``LearnedRegistrationLib.bridge.jobs``) whose progress a ``qt.QTimer`` reads, and written into
    the scene on the main thread only when it succeeded, so Cancel (which terminates the process)
    leaves the scene as it was. The one computation on the main thread is a λ change with a
    network method: the network already in memory is re-evaluated (throttled while the slider
    moves, always ending on the last value, and deferred while a job runs).
    """

    POLL_INTERVAL_MS = 100
    LAMBDA_DEBOUNCE_S = 0.3
    #: Least time between two instant λ updates while the slider moves (each blocks the main thread).
    LAMBDA_THROTTLE_S = 0.25

    def __init__(self, parent=None) -> None:
        """Called when the user opens the module the first time and the widget is initialized."""
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._pollTimer = None
        self._activeRun = None
        self._lambdaDebouncer = LatestRequestDebouncer(self.LAMBDA_DEBOUNCE_S)
        self._instantLambda = LatestRequestDebouncer(0.0)  # latest λ for the network in memory
        self._lastInstantUpdate = -math.inf  # time.monotonic() of the last instant λ update
        self._resultAvailable = False  # outputs of a run of this session are in the scene
        self._lastRequestedLambda = None
        self._shownOutput = None

    def setup(self) -> None:
        """Build the panel from the .ui file and connect it."""
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/LearnedRegistration.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        # The .ui connects the top-level widget's mrmlSceneChanged(vtkMRMLScene*) signal to every
        # node combo box's setMRMLScene(vtkMRMLScene*) slot.
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = LearnedRegistrationLogic()

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(self.POLL_INTERVAL_MS)
        self._pollTimer.timeout.connect(self._onPollTimer)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.sweepButton.connect("clicked(bool)", self.onSweepButton)

        self.ui.metricsTableWidget.horizontalHeader().setSectionResizeMode(0, qt.QHeaderView.ResizeToContents)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed: a running
        background process is stopped and waited for."""
        self._abandonRuns()
        if self._pollTimer is not None:
            self._pollTimer.stop()
        self.removeObservers()

    def enter(self) -> None:
        """Called each time the user opens this module."""
        self.initializeParameterNode()

    def exit(self) -> None:
        """Called each time the user opens a different module; a running registration continues."""
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event) -> None:
        """Called just before the scene is closed: runs refer to nodes that are going away, and the
        λ path (or network) kept for the slider is released."""
        self._abandonRuns()
        self.logic.releaseInstantSession()
        self._resultAvailable = False
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        """Called just after the scene is closed."""
        if self.parent.isEntered:
            self.initializeParameterNode()

    # --- parameter node ----------------------------------------------------------------------

    def initializeParameterNode(self) -> None:
        """Ensure the parameter node exists and is observed; pick default input volumes."""
        self.setParameterNode(self.logic.getParameterNode())
        parameterNode = self._parameterNode
        if not parameterNode.fixedVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode and not firstVolumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
                parameterNode.fixedVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode) -> None:
        """Bind the GUI to ``inputParameterNode`` (or unbind it when None) and observe it."""
        if self._parameterNode is inputParameterNode:
            return
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Widgets carry a "SlicerParameterName" dynamic property in the .ui file.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self._lastRequestedLambda = self._parameterNode.regularizationWeight
            self._shownOutput = self._parameterNode.displayedOutput
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        parameterNode = self._parameterNode
        self._updateGuiState()
        if parameterNode is None:
            return
        regularizationWeight = parameterNode.regularizationWeight
        if regularizationWeight != self._lastRequestedLambda:
            self._lastRequestedLambda = regularizationWeight
            self._onRegularizationWeightChanged(regularizationWeight)
        if parameterNode.displayedOutput is not self._shownOutput:
            self._shownOutput = parameterNode.displayedOutput
            if self._resultAvailable:
                self.logic.showResultInViews(parameterNode)

    def _onRegularizationWeightChanged(self, regularizationWeight: float) -> None:
        """λ moved: update the outputs, without ever computing a registration on this thread.

        With a network method whose result is in memory, the network is re-evaluated at the latest
        λ by the timer (throttled; deferred while a job runs). Otherwise a new registration runs
        in the background once the slider has rested (debounced; the latest λ wins).
        """
        parameterNode = self._parameterNode
        if not (self._resultAvailable and parameterNode.liveUpdate):
            return
        if parameterNode.method.updatesInstantly and self.logic.canSetRegularizationInstantly():
            self._instantLambda.submit(regularizationWeight)
        else:
            self._lambdaDebouncer.submit(regularizationWeight)
            self._setStatus(_("λ = {value:.2f}: the registration will be recomputed.").format(value=regularizationWeight))
        self._startPolling()

    def _updateGuiState(self) -> None:
        """Enable the buttons that make sense now (state lives in variables, not in the widgets)."""
        parameterNode = self._parameterNode
        running = self._activeRun is not None
        haveInputs = bool(parameterNode and parameterNode.fixedVolume and parameterNode.movingVolume)
        self.ui.applyButton.enabled = haveInputs and not running
        self.ui.sweepButton.enabled = haveInputs and not running
        self.ui.cancelButton.enabled = running
        self.ui.inputLambdaMapSelector.enabled = bool(parameterNode and parameterNode.spatiallyVarying)
        if parameterNode is not None and not running and not haveInputs:
            self._setStatus(_("Select the fixed and moving volumes."))

    # --- actions -----------------------------------------------------------------------------

    def onApplyButton(self) -> None:
        """Register with the current settings (in the background)."""
        if self._activeRun is not None or not self._ensureTorch():
            return
        self._lambdaDebouncer.clear()
        self._instantLambda.clear()
        self._startRun(_RunKind.APPLY, self._parameterNode.regularizationWeight)

    def onCancelButton(self) -> None:
        """Stop the running registration or sweep (its process is terminated); the scene is left unchanged."""
        self._lambdaDebouncer.clear()
        if self._activeRun is not None:
            self._activeRun.task.cancel()
            self._setStatus(_("Cancelling…"))

    def onSweepButton(self) -> None:
        """Register at several λ and tabulate/plot Dice and % folding against λ (one background job)."""
        if self._activeRun is not None or not self._ensureTorch():
            return
        self._lambdaDebouncer.clear()
        self._startRun(_RunKind.SWEEP, self._parameterNode.regularizationWeight)

    def _ensureTorch(self) -> bool:
        """True if torch can be imported; otherwise offer to install it with the PyTorch extension."""
        if self.logic.torchAvailable():
            return True
        try:
            import PyTorchUtils
        except ModuleNotFoundError:
            slicer.util.errorDisplay(_(
                "Learned Registration needs PyTorch. Install the 'PyTorch' extension with the Extensions "
                "Manager, restart Slicer and click Apply again."))
            return False
        self._setStatus(_("PyTorch is not installed; it is needed to compute the registration."))
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True)
        if torch is None:
            self._setStatus(_("PyTorch was not installed; the registration cannot run without it."))
            return False
        return True

    # --- background runs ---------------------------------------------------------------------

    def _startRun(self, kind, regularizationWeight: float) -> bool:
        """Prepare a request on the main thread (no torch) and start its job in the background."""
        parameterNode = self._parameterNode
        if parameterNode is None:
            return False
        try:
            request = self.logic.prepareRegistration(
                parameterNode.fixedVolume, parameterNode.movingVolume,
                **self.logic.registrationOptions(parameterNode, regularizationWeight))
            if kind is _RunKind.SWEEP:
                task = self.logic.startTask(request, "sweep", self.logic.sweepLambdas(parameterNode.sweepSteps))
            else:
                task = self.logic.startTask(request)
            task.start()
        except (ValueError, RuntimeError) as error:
            self._setStatus(_("Cannot register: {error}").format(error=error))
            slicer.util.errorDisplay(_("Cannot start the registration:\n\n{error}").format(error=error))
            return False
        self._activeRun = _ActiveRun(kind, request, task, regularizationWeight)
        self._setProgress(0.0)
        self._setStatus(_("starting…"))
        self._updateGuiState()
        self._startPolling()
        return True

    def _startPolling(self) -> None:
        if self._pollTimer is not None and not self._pollTimer.isActive():
            self._pollTimer.start()

    def _onPollTimer(self) -> None:
        """Main-thread heartbeat: show progress, finish a completed job, then apply what waited for it
        (the latest instant λ, throttled; a debounced re-registration)."""
        run = self._activeRun
        if run is not None:
            updates = run.task.poll()
            if updates and not run.task.cancel_was_requested:
                self._setProgress(updates[-1].fraction)
                self._setStatus(f"{updates[-1].message} ({run.task.elapsed_s:.0f} s)")
            if run.task.finished:
                self._activeRun = None
                self._finishRun(run)
        if self._activeRun is None:
            self._applyInstantLambda()
            regularizationWeight = self._lambdaDebouncer.poll(busy=False)
            if regularizationWeight is not None and self._parameterNode is not None:
                self._startRun(_RunKind.LIVE, regularizationWeight)
        if self._activeRun is None and not self._lambdaDebouncer.has_pending and not self._instantLambda.has_pending:
            self._pollTimer.stop()
        self._updateGuiState()

    def _applyInstantLambda(self) -> None:
        """Re-evaluate the network in memory at the latest λ, at most every ``LAMBDA_THROTTLE_S``."""
        throttled = time.monotonic() - self._lastInstantUpdate < self.LAMBDA_THROTTLE_S
        regularizationWeight = self._instantLambda.poll(busy=throttled)
        if regularizationWeight is None:
            return
        parameterNode = self._parameterNode
        displayed = None
        if parameterNode is not None:  # updated first, the others right after
            displayed = OUTPUT_FIELDS[DISPLAYED_OUTPUT_FIELDS[parameterNode.displayedOutput][0]]
        try:
            outputs = self.logic.setRegularization(regularizationWeight, displayed=displayed)
        except (ValueError, RuntimeError) as error:
            self._setStatus(_("Cannot update λ: {error}").format(error=error))
            return
        finally:
            self._lastInstantUpdate = time.monotonic()
        self._updateMetricsTable(outputs.metrics)
        self._setStatus(_("λ = {value:.2f}: updated in {seconds:.2f} s.").format(
            value=regularizationWeight, seconds=outputs.metrics.get("runtime_s", 0.0)))

    def _finishRun(self, run) -> None:
        """Write a successful run into the scene (main thread); report a failed or cancelled one."""
        state = run.task.state
        if state is TaskState.CANCELLED:
            self._setProgress(0.0)
            self._setStatus(_("Cancelled; the scene was not changed."))
            return
        if state is TaskState.FAILED:
            self._setProgress(0.0)
            error = run.task.exception
            logging.error("LearnedRegistration failed: %s\n%s", error, getattr(error, "details", ""))
            self._setStatus(_("Registration failed: {error}").format(error=error))
            slicer.util.errorDisplay(_("Registration failed:\n\n{error}").format(error=error))
            return

        parameterNode = self._parameterNode or self.logic.getParameterNode()
        if run.kind is _RunKind.SWEEP:
            self._writeSweep(parameterNode, run.task.result())
            return
        try:
            outputs = self.logic.writeOutputs(
                run.request, run.task.result(), self.logic.outputNodesFromParameterNode(parameterNode))
        except (ValueError, RuntimeError) as error:
            self._setStatus(_("Could not write the results: {error}").format(error=error))
            slicer.util.errorDisplay(_("Could not write the results:\n\n{error}").format(error=error))
            return
        self.logic.setOutputNodesInParameterNode(parameterNode, outputs)
        self._resultAvailable = True
        self._updateMetricsTable(outputs.metrics)
        self.logic.showResultInViews(parameterNode, fit=run.kind is _RunKind.APPLY)
        self._setProgress(1.0)
        self._setStatus(self._summary(outputs.metrics))

    def _writeSweep(self, parameterNode, metricsPerLambda) -> None:
        rows = [self.logic.sweepRow(metrics) for metrics in metricsPerLambda]
        tableNode = self.logic.writeSweepTable(rows, parameterNode.sweepTable)
        chartNode = self.logic.updateSweepChart(tableNode, parameterNode.sweepChart)
        parameterNode.sweepTable = tableNode
        parameterNode.sweepChart = chartNode
        self.logic.showSweepChart(chartNode)
        self._setProgress(1.0)
        self._setStatus(_("λ sweep done: {count} registrations in table '{table}'.").format(
            count=len(rows), table=tableNode.GetName()))

    def _abandonRuns(self) -> None:
        """Stop everything in flight without writing anything (scene close, module clean-up): the
        background process is terminated and waited for (killed after a grace period)."""
        self._lambdaDebouncer.clear()
        self._instantLambda.clear()
        if self._activeRun is not None:
            self._activeRun.task.stop()
            self._activeRun = None

    # --- display -----------------------------------------------------------------------------

    def _setStatus(self, text: str) -> None:
        self.ui.statusLabel.text = text

    def _setProgress(self, fraction: float) -> None:
        maximum = self.ui.progressBar.maximum
        self.ui.progressBar.value = int(round(min(max(fraction, 0.0), 1.0) * maximum))

    @staticmethod
    def _summary(metrics: dict) -> str:
        parts = [_("Done in {seconds:.1f} s on {device}").format(
            seconds=metrics.get("runtime_s", float("nan")), device=metrics.get("device", "?"))]
        if metrics.get("dice_mean") is not None:
            parts.append(_("Dice {value:.3f}").format(value=metrics["dice_mean"]))
        if metrics.get("tre_mean_mm") is not None:
            parts.append(_("TRE {value:.2f} mm").format(value=metrics["tre_mean_mm"]))
        if metrics.get("folding_percent") is not None:
            parts.append(_("{value:.3f} % folding").format(value=metrics["folding_percent"]))
        warning = qualityWarning(metrics)
        if warning:
            parts.append(_("WARNING: {warning}").format(warning=warning))
        return ", ".join(parts) + "."

    def _updateMetricsTable(self, metrics: dict) -> None:
        table = self.ui.metricsTableWidget
        table.setRowCount(len(EVALUATION_KEYS))
        for row, key in enumerate(EVALUATION_KEYS):
            info = metric(key)
            table.setItem(row, 0, qt.QTableWidgetItem(_(info.header)))
            table.setItem(row, 1, qt.QTableWidgetItem(info.text(metrics.get(key))))


#
# LearnedRegistrationLogic
#


class LearnedRegistrationLogic(ScriptedLoadableModuleLogic, registrationLogic.RegistrationLogic):
    """The registration logic (``LearnedRegistrationLib.bridge.logic.RegistrationLogic``) plus the module's
    parameter node, the slice views and the λ-sweep table.

    Usable from the Python console without the panel::

        logic = slicer.util.getModuleLogic("LearnedRegistration")  # or LearnedRegistrationLogic()
        outputs = logic.register(fixedNode, movingNode, regularizationWeight=0.3)
        outputs = logic.registerUsingParameterNode()

    ``prepareRegistration`` / ``computeRegistration`` / ``writeOutputs`` / ``register`` are
    inherited unchanged. Nothing here uses Qt.
    """

    #: Where the panel's jobs run: "process" (a child process of Slicer's Python, so that Slicer's
    #: main thread stays free) or "synchronous" (in the calling thread; scripts and tests).
    taskBackend = "process"

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        registrationLogic.RegistrationLogic.__init__(self)
        self._parameterNodeWrapper = None

    def getParameterNode(self) -> LearnedRegistrationParameterNode:
        """The module's parameter node (created on first use), wrapped with typed access."""
        parameterNode = super().getParameterNode()
        if self._parameterNodeWrapper is None or self._parameterNodeWrapper.parameterNode is not parameterNode:
            self._parameterNodeWrapper = LearnedRegistrationParameterNode(parameterNode)
        return self._parameterNodeWrapper

    # --- parameter node <-> logic arguments ----------------------------------------------------

    @staticmethod
    def registrationOptions(parameterNode, regularizationWeight: typing.Optional[float] = None) -> dict:
        """Keyword arguments of ``prepareRegistration`` (after the two volumes) from the parameter node.

        Args:
            parameterNode: a :class:`LearnedRegistrationParameterNode`.
            regularizationWeight: λ to use instead of the parameter node's (a λ sweep step).
        """
        return {
            "fixedMaskNode": parameterNode.fixedMask,
            "fixedLabelNode": parameterNode.fixedSegmentation,
            "movingLabelNode": parameterNode.movingSegmentation,
            "fixedLandmarksNode": parameterNode.fixedLandmarks,
            "movingLandmarksNode": parameterNode.movingLandmarks,
            "lambdaMapNode": parameterNode.inputLambdaMap if parameterNode.spatiallyVarying else None,
            "spatiallyVarying": bool(parameterNode.spatiallyVarying),
            "similarity": parameterNode.similarity.value,
            "regularizationWeight": float(parameterNode.regularizationWeight
                                          if regularizationWeight is None else regularizationWeight),
            "device": parameterNode.device.torchDevice,
            "iterationScale": float(parameterNode.iterationScale),
            "workingSpacingMm": float(parameterNode.workingSpacingMm) if parameterNode.workingSpacingMm > 0 else None,
            "method": parameterNode.method.value,
        }

    @staticmethod
    def outputNodesFromParameterNode(parameterNode) -> registrationLogic.RegistrationOutputNodes:
        """The parameter node's output nodes (None where a node is to be created)."""
        return registrationLogic.RegistrationOutputNodes(**{
            attribute: getattr(parameterNode, field) for field, attribute in OUTPUT_FIELDS.items()})

    @staticmethod
    def setOutputNodesInParameterNode(parameterNode, outputNodes) -> None:
        """Store the (possibly newly created) output nodes in the parameter node, in one modification."""
        with slicer.util.NodeModify(parameterNode.parameterNode):
            for field, attribute in OUTPUT_FIELDS.items():
                node = getattr(outputNodes, attribute)
                if node is not None:
                    setattr(parameterNode, field, node)

    def registerUsingParameterNode(self, parameterNode=None, progressCallback=None, cancelRequested=None):
        """Register synchronously with the parameter node's settings and outputs; store the outputs back.

        Returns:
            ``RegistrationOutputNodes`` with the metrics.

        Raises:
            ValueError: missing or inconsistent inputs.
            RegistrationCancelled: when ``cancelRequested()`` returned True (scene unchanged).
        """
        parameterNode = parameterNode or self.getParameterNode()
        outputs = self.register(
            parameterNode.fixedVolume, parameterNode.movingVolume,
            outputNodes=self.outputNodesFromParameterNode(parameterNode),
            progressCallback=progressCallback, cancelRequested=cancelRequested,
            **self.registrationOptions(parameterNode))
        self.setOutputNodesInParameterNode(parameterNode, outputs)
        return outputs

    def startTask(self, request, kind: str = "register", lambdas=()):
        """A (not yet started) background task computing ``request``: a registration, or the metrics at
        each of ``lambdas`` (``kind="sweep"``); see ``LearnedRegistrationLib.bridge.jobs.startJob``.
        With the process backend the job runs in ``PythonSlicer`` and its files live in Slicer's
        temporary folder until the task ends."""
        app = getattr(slicer, "app", None)
        if self.taskBackend != "process":
            return jobs.startJob(request, kind, lambdas, backend=self.taskBackend, networks=self._networks)
        return jobs.startJob(
            request, kind, lambdas, backend="process", networks=self._networks,
            temporaryFolder=app.temporaryPath if app is not None else None,
            python=jobs.pythonExecutable(app.slicerHome if app is not None else None))

    @staticmethod
    def torchAvailable() -> bool:
        """True if the torch package can be imported (checked without importing it)."""
        return importlib.util.find_spec("torch") is not None

    @staticmethod
    def cancelledExceptionTypes() -> tuple:
        """Exception types that mean "stopped because cancel was requested"."""
        return (RegistrationCancelled,)

    # --- views ---------------------------------------------------------------------------------

    @staticmethod
    def showResultInViews(parameterNode, fit: bool = False) -> None:
        """Fixed volume in the background, the chosen output (``displayedOutput``) in the foreground.

        Colour maps and ranges are set on the output nodes when they are written (grey for warped,
        checkerboard and a symmetric window for difference; diverging around 1 for the Jacobian;
        sequential for λ).
        """
        field, opacity = DISPLAYED_OUTPUT_FIELDS[parameterNode.displayedOutput]
        foreground = getattr(parameterNode, field) or parameterNode.warpedVolume
        slicer.util.setSliceViewerLayers(
            background=parameterNode.fixedVolume, foreground=foreground, foregroundOpacity=opacity, fit=fit)

    # --- λ sweep -------------------------------------------------------------------------------

    @staticmethod
    def sweepLambdas(steps: int) -> list:
        """``steps`` values of λ evenly spaced in [0, 1]."""
        steps = int(steps)
        if steps < 2:
            raise ValueError(f"a λ sweep needs at least 2 steps, got {steps}")
        return [float(v) for v in np.linspace(0.0, 1.0, steps)]

    @staticmethod
    def sweepRow(metrics: dict) -> dict:
        """One row of the sweep table from a run's metrics (NaN where a metric is not available)."""
        row = {}
        for key in SWEEP_KEYS:
            value = metrics.get(key)
            row[key] = float(value) if isinstance(value, (int, float)) else float("nan")
        return row

    @staticmethod
    def writeSweepTable(rows, tableNode=None):
        """Fill ``tableNode`` (created when None) with one row per λ; returns the table node."""
        if tableNode is None:
            tableNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", "λ sweep")
        with slicer.util.NodeModify(tableNode):
            tableNode.RemoveAllColumns()
            for key in SWEEP_KEYS:
                array = vtk.vtkDoubleArray()
                array.SetName(key)
                array.SetNumberOfTuples(len(rows))
                for index, row in enumerate(rows):
                    array.SetValue(index, row[key])
                tableNode.AddColumn(array)
                if metric(key).unit:
                    tableNode.SetColumnUnitLabel(key, metric(key).unit)
        return tableNode

    @staticmethod
    def updateSweepChart(tableNode, chartNode=None):
        """Plot Dice and % folding against λ from the sweep table; series are reused on later sweeps."""
        scene = tableNode.GetScene()
        if chartNode is None:
            chartNode = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", "λ sweep chart")
        existing = {}
        for index in range(chartNode.GetNumberOfPlotSeriesNodes()):
            seriesNode = chartNode.GetNthPlotSeriesNode(index)
            if seriesNode is not None:
                existing[seriesNode.GetYColumnName()] = seriesNode
        for column, color in SWEEP_SERIES:
            seriesNode = existing.get(column)
            if seriesNode is None:
                seriesNode = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", metric(column).header)
                chartNode.AddAndObservePlotSeriesNodeID(seriesNode.GetID())
            seriesNode.SetAndObserveTableNodeID(tableNode.GetID())
            seriesNode.SetXColumnName("lambda")
            seriesNode.SetYColumnName(column)
            seriesNode.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
            seriesNode.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle)
            seriesNode.SetColor(*color)
        chartNode.SetTitle("Registration quality against λ")
        chartNode.SetXAxisTitle("λ")
        chartNode.SetYAxisTitle("Dice / % folding")
        return chartNode

    @staticmethod
    def showSweepChart(chartNode) -> None:
        """Show the chart in the layout's plot view (switches to a layout with one if needed)."""
        slicer.modules.plots.logic().ShowChartInLayout(chartNode)

    def lambdaSweepUsingParameterNode(self, parameterNode=None, progressCallback=None, cancelRequested=None):
        """Synchronous λ sweep with the parameter node's settings; output volumes are not touched.

        Returns:
            (table node, chart node), also stored in the parameter node.
        """
        parameterNode = parameterNode or self.getParameterNode()
        request = self.prepareRegistration(parameterNode.fixedVolume, parameterNode.movingVolume,
                                           **self.registrationOptions(parameterNode))
        metricsPerLambda = computeSweep(request, self.sweepLambdas(parameterNode.sweepSteps), progressCallback,
                                        cancelRequested, self._networks)
        tableNode = self.writeSweepTable([self.sweepRow(m) for m in metricsPerLambda], parameterNode.sweepTable)
        chartNode = self.updateSweepChart(tableNode, parameterNode.sweepChart)
        parameterNode.sweepTable = tableNode
        parameterNode.sweepChart = chartNode
        return tableNode, chartNode


#
# LearnedRegistrationTest
#


class LearnedRegistrationTest(ScriptedLoadableModuleTest):
    """Self-test: registers a synthetic pair with a known deformation and checks the results.

    Runs on the CPU in well under a minute (small volumes, reduced iterations). It needs torch,
    which the PyTorch extension installs only when a user asks (the Extensions build factory has
    none): without torch the test is skipped, with a message saying so.
    """

    #: Upper bound on the folded fraction of the fixed grid (%), for a smooth known deformation.
    MAX_FOLDING_PERCENT = 0.5
    #: The warped image must have at most this fraction of the moving image's MSE to the fixed image.
    MAX_MSE_RATIO = 0.6

    def setUp(self):
        """Start from an empty scene."""
        slicer.mrmlScene.Clear()

    #: Why the test is skipped where torch is missing.
    SKIP_WITHOUT_TORCH = ("PyTorch is not installed (the PyTorch extension installs it on request), so the "
                          "registration cannot run; the self-test is skipped")

    def runTest(self):
        """Run all tests of the module (skipped when torch is not installed)."""
        if not LearnedRegistrationLogic.torchAvailable():
            self.skipTest(self.SKIP_WITHOUT_TORCH)
        self.setUp()
        self.test_RegistrationImprovesAlignment()
        self.setUp()
        self.test_ParameterNodeAndSweep()
        self.setUp()
        self.test_BackgroundTaskCancelLeavesSceneUnchanged()

    # --- helpers -------------------------------------------------------------------------------

    @staticmethod
    def _phantom(points):
        """Smooth synthetic "anatomy" at RAS points (..., 3) in mm: an ellipsoid with inner blobs."""
        x, y, z = points[..., 0], points[..., 1], points[..., 2]
        image = 100.0 / (1.0 + np.exp(((x / 32.0) ** 2 + (y / 28.0) ** 2 + (z / 26.0) ** 2 - 1.0) * 10.0))
        for center, sigma, weight in (((12, 8, 4), 6.0, 80.0), ((-12, -6, -4), 5.0, -60.0),
                                      ((0, -12, 8), 5.0, 70.0), ((-6, 12, -8), 6.0, 50.0)):
            distance2 = (x - center[0]) ** 2 + (y - center[1]) ** 2 + (z - center[2]) ** 2
            image = image + weight * np.exp(-distance2 / (2.0 * sigma**2))
        return image.astype(np.float32)

    def _createPhantomPair(self, shape=(20, 22, 24), spacing=4.0):
        """Fixed and moving volumes related by a known smooth deformation (up to about 7 mm)."""
        kk, jj, ii = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij")
        origin = -0.5 * spacing * (np.array(shape[::-1]) - 1.0)  # centred, RAS axes along IJK
        points = np.stack([origin[0] + spacing * ii, origin[1] + spacing * jj, origin[2] + spacing * kk], axis=-1)
        bump = np.exp(-(points**2).sum(axis=-1) / (2.0 * 15.0**2))
        displacement = np.stack([6.0 * bump, -4.0 * bump, 2.0 * bump], axis=-1)
        ijkToRas = vtk.vtkMatrix4x4()
        for axis in range(3):
            ijkToRas.SetElement(axis, axis, spacing)
            ijkToRas.SetElement(axis, 3, origin[axis])
        fixed = slicer.util.addVolumeFromArray(self._phantom(points), ijkToRas, "PhantomFixed")
        moving = slicer.util.addVolumeFromArray(self._phantom(points + displacement), ijkToRas, "PhantomMoving")
        return fixed, moving

    @staticmethod
    def _fastOptions():
        # The two phantoms share their intensities, so MSE is the matching similarity (and the measure).
        return {"similarity": "mse", "iterationScale": 1.0, "workingSpacingMm": 4.0, "device": "cpu"}

    @staticmethod
    def _meanSquaredDisplacementGradient(displacementNode):
        field = slicer.util.arrayFromVolume(displacementNode).astype(np.float64)  # (K, J, I, 3) mm
        spacing = displacementNode.GetSpacing()[::-1]  # K, J, I
        total = 0.0
        for component in range(3):
            for gradient in np.gradient(field[..., component], *spacing):
                total += float(np.mean(gradient**2))
        return total

    # --- tests ---------------------------------------------------------------------------------

    def test_RegistrationImprovesAlignment(self):
        """Warped is closer to fixed than moving was, no folding, every output exists, λ smooths."""
        self.delayDisplay("Registering a synthetic pair at two values of λ")
        fixed, moving = self._createPhantomPair()
        logic = LearnedRegistrationLogic()

        outputsLow = logic.register(fixed, moving, regularizationWeight=0.1, **self._fastOptions())
        outputsHigh = logic.register(fixed, moving, regularizationWeight=0.6, **self._fastOptions())

        expectedClasses = {
            "warpedVolumeNode": "vtkMRMLScalarVolumeNode",
            "displacementVolumeNode": "vtkMRMLVectorVolumeNode",
            "transformNode": "vtkMRMLGridTransformNode",
            "checkerboardVolumeNode": "vtkMRMLScalarVolumeNode",
            "differenceVolumeNode": "vtkMRMLScalarVolumeNode",
            "jacobianVolumeNode": "vtkMRMLScalarVolumeNode",
            "lambdaMapVolumeNode": "vtkMRMLScalarVolumeNode",
        }
        for attribute, className in expectedClasses.items():
            node = getattr(outputsLow, attribute)
            self.assertIsNotNone(node, attribute)
            self.assertTrue(node.IsA(className), f"{attribute} is a {node.GetClassName()}, expected {className}")
            self.assertIsNotNone(slicer.mrmlScene.GetNodeByID(node.GetID()), f"{attribute} is not in the scene")
        self.assertIsNone(outputsLow.warpedLabelNode)  # no moving labels were given

        fixedArray = slicer.util.arrayFromVolume(fixed).astype(np.float64)
        movingArray = slicer.util.arrayFromVolume(moving).astype(np.float64)
        warpedArray = slicer.util.arrayFromVolume(outputsLow.warpedVolumeNode).astype(np.float64)
        self.assertEqual(warpedArray.shape, fixedArray.shape)
        mseBefore = float(np.mean((movingArray - fixedArray) ** 2))
        mseAfter = float(np.mean((warpedArray - fixedArray) ** 2))
        self.assertLess(mseAfter, self.MAX_MSE_RATIO * mseBefore,
                        f"MSE to fixed: moving {mseBefore:.2f}, warped {mseAfter:.2f}")

        self.assertLess(outputsLow.metrics["folding_percent"], self.MAX_FOLDING_PERCENT)
        jacobian = slicer.util.arrayFromVolume(outputsLow.jacobianVolumeNode)
        self.assertLess(100.0 * float(np.mean(jacobian <= 0)), self.MAX_FOLDING_PERCENT)

        roughLow = self._meanSquaredDisplacementGradient(outputsLow.displacementVolumeNode)
        roughHigh = self._meanSquaredDisplacementGradient(outputsHigh.displacementVolumeNode)
        self.assertLess(roughHigh, roughLow, "a larger λ must give a smoother displacement field")
        self.assertLess(outputsHigh.metrics["sdlogj"], outputsLow.metrics["sdlogj"])
        self.delayDisplay("Registration test passed")

    def test_ParameterNodeAndSweep(self):
        """The parameter-node path stores its outputs, reuses them on a second run, and sweeps λ."""
        fixed, moving = self._createPhantomPair()
        logic = LearnedRegistrationLogic()
        parameterNode = logic.getParameterNode()
        parameterNode.fixedVolume = fixed
        parameterNode.movingVolume = moving
        parameterNode.device = ComputeDevice.CPU
        parameterNode.similarity = Similarity.MSE
        parameterNode.iterationScale = self._fastOptions()["iterationScale"]
        parameterNode.workingSpacingMm = self._fastOptions()["workingSpacingMm"]
        parameterNode.regularizationWeight = 0.2

        outputs = logic.registerUsingParameterNode(parameterNode)
        self.assertIs(parameterNode.warpedVolume, outputs.warpedVolumeNode)
        self.assertIs(parameterNode.transform, outputs.transformNode)
        warpedID = outputs.warpedVolumeNode.GetID()
        firstField = slicer.util.arrayFromVolume(outputs.displacementVolumeNode).copy()

        parameterNode.regularizationWeight = 0.9
        outputsAgain = logic.registerUsingParameterNode(parameterNode)
        self.assertEqual(outputsAgain.warpedVolumeNode.GetID(), warpedID, "outputs must be updated in place")
        secondField = slicer.util.arrayFromVolume(outputsAgain.displacementVolumeNode)
        self.assertFalse(np.allclose(firstField, secondField), "a new λ must change the displacement")

        parameterNode.sweepSteps = 2
        tableNode, chartNode = logic.lambdaSweepUsingParameterNode(parameterNode)
        self.assertEqual(tableNode.GetNumberOfRows(), 2)
        lambdas = [tableNode.GetTable().GetValueByName(row, "lambda").ToDouble() for row in range(2)]
        self.assertEqual(lambdas, [0.0, 1.0])
        folding = [tableNode.GetTable().GetValueByName(row, "folding_percent").ToDouble() for row in range(2)]
        self.assertTrue(all(math.isfinite(value) for value in folding))
        self.assertEqual(chartNode.GetNumberOfPlotSeriesNodes(), len(SWEEP_SERIES))
        self.assertIs(parameterNode.sweepTable, tableNode)
        self.delayDisplay("Parameter node and sweep test passed")

    def test_BackgroundTaskCancelLeavesSceneUnchanged(self):
        """The panel's path (prepare, compute in a separate process, write) with Cancel adds no node,
        stops the process and removes its files."""
        fixed, moving = self._createPhantomPair()
        logic = LearnedRegistrationLogic()
        logic.taskBackend = "process"
        nodeCountBefore = slicer.mrmlScene.GetNumberOfNodes()
        request = logic.prepareRegistration(fixed, moving, regularizationWeight=0.3, **self._fastOptions())
        task = logic.startTask(request).start()
        task.cancel()
        self.assertTrue(task.wait(30.0))
        self.assertIs(task.state, TaskState.CANCELLED)
        self.assertFalse(task.folder.exists(), "the job's temporary folder must be removed")
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodeCountBefore)
        self.delayDisplay("Cancel test passed")
