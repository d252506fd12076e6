"""The logic, called the way the Slicer panel calls it, on a slicer-core MRML scene.

Two levels:

1. The three-step sequence the panel uses (``prepareRegistration`` on the main thread, the
   computation in a child process through ``jobs.startJob``, ``writeOutputs`` on the main
   thread), then a second λ that reuses the output nodes.
2. The module file itself (``LearnedRegistration.py``: parameter node, widget state machine,
   Slicer logic), loaded with small stand-ins for what only the desktop application provides
   (``qt``, ``slicer.ScriptedLoadableModule``, ``slicer.parameterNodeWrapper``, ``slicer.i18n``).
   The widget runs its real code paths, with real child processes: Apply, the polling timer, the
   debounced λ re-run, the instant λ update of a network method, the "Show" choice, Cancel and
   the λ sweep. Only the .ui widgets are replaced by plain objects.

Registrations use tiny volumes and a reduced iteration budget: they check the plumbing, not the
registration quality (the engine tests do that).
"""

import ast
import enum
import importlib.util
import inspect
import sys
import time
import types
import unittest
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import pytest
from vtk.util import numpy_support

import slicer

from LearnedRegistrationLib.app.headless import HeadlessSlicer
from LearnedRegistrationLib.bridge import jobs, mrml
from LearnedRegistrationLib.bridge.logic import RegistrationLogic, RegistrationOutputNodes
from LearnedRegistrationLib.bridge.tasks import LatestRequestDebouncer, TaskState
from LearnedRegistrationLib.engine.common import RegistrationCancelled
from LearnedRegistrationLib.engine.grid import ImageGrid

ROOT = Path(__file__).resolve().parents[1]
MODULE_FILE = ROOT / "LearnedRegistration" / "LearnedRegistration.py"
UI_FILE = ROOT / "LearnedRegistration" / "Resources" / "UI" / "LearnedRegistration.ui"

#: Small, fast settings: 4 mm working grid, a tenth of the iterations, CPU.
FAST = {"iterationScale": 0.1, "workingSpacingMm": 4.0, "device": "cpu"}
WAIT_S = 300.0


def _phantom(points):
    """Smooth blobs inside an ellipsoid, at RAS points (..., 3) in mm."""
    x, y, z = points[..., 0], points[..., 1], points[..., 2]
    image = 100.0 / (1.0 + np.exp(((x / 30.0) ** 2 + (y / 26.0) ** 2 + (z / 24.0) ** 2 - 1.0) * 10.0))
    for (cx, cy, cz), sigma, weight in (((10, 6, 4), 6.0, 80.0), ((-10, -6, -4), 5.0, -60.0), ((0, -10, 6), 5.0, 70.0)):
        image = image + weight * np.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2.0 * sigma**2))
    return image.astype(np.float32)


def _addPhantomPair(scene, shape=(16, 18, 20), spacing=4.0):
    """Fixed and moving scalar volumes related by a smooth bump displacement (<= 6 mm)."""
    kk, jj, ii = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij")
    origin = -0.5 * spacing * (np.array(shape[::-1], dtype=np.float64) - 1.0)
    points = np.stack([origin[0] + spacing * ii, origin[1] + spacing * jj, origin[2] + spacing * kk], axis=-1)
    bump = np.exp(-(points**2).sum(axis=-1) / (2.0 * 15.0**2))
    displacement = np.stack([6.0 * bump, -4.0 * bump, 2.0 * bump], axis=-1)
    grid = ImageGrid(shape, (spacing,) * 3, origin, np.eye(3))
    fixed = mrml.updateVolumeNodeFromArray(scene, _phantom(points), grid, None, "PhantomFixed")
    moving = mrml.updateVolumeNodeFromArray(scene, _phantom(points + displacement), grid, None, "PhantomMoving")
    return fixed, moving


def _volumeArray(node):
    imageData = node.GetImageData()
    array = numpy_support.vtk_to_numpy(imageData.GetPointData().GetScalars())
    return array.reshape(imageData.GetDimensions()[::-1] + ((3,) if array.ndim == 2 else ())).copy()


@pytest.fixture
def headless():
    with HeadlessSlicer() as instance:
        yield instance


# ------------------------------------------------------------------------------ the three steps


def test_three_steps_with_a_child_process_then_a_second_lambda_reuses_the_nodes(headless):
    scene = headless.scene
    fixed, moving = _addPhantomPair(scene)
    logic = RegistrationLogic()

    def run(regularizationWeight, outputNodes):
        request = logic.prepareRegistration(fixed, moving, similarity="lncc",
                                            regularizationWeight=regularizationWeight, **FAST)
        progressSeen = []

        task = jobs.startJob(request).start()  # a child process, as in the panel
        while not task.finished:
            progressSeen += task.poll()
            time.sleep(0.02)
        progressSeen += task.poll()
        assert task.state is TaskState.SUCCEEDED, task.exception
        assert progressSeen and progressSeen[-1].fraction == pytest.approx(1.0)
        assert all(0.0 <= u.fraction <= 1.0 for u in progressSeen)
        return logic.writeOutputs(request, task.result(), outputNodes)

    first = run(0.1, None)
    nodeAttributes = [a for a in vars(RegistrationOutputNodes()) if a not in ("metrics", "warpedLabelNode")]
    ids = {a: getattr(first, a).GetID() for a in nodeAttributes}
    assert all(ids.values()) and len(set(ids.values())) == len(ids)
    firstDisplacement = _volumeArray(first.displacementVolumeNode)
    firstWarped = _volumeArray(first.warpedVolumeNode)
    nodeCount = scene.GetNumberOfNodes()

    second = run(0.9, first)
    assert {a: getattr(second, a).GetID() for a in nodeAttributes} == ids
    assert scene.GetNumberOfNodes() == nodeCount, "a second run into the same outputs must not add nodes"
    assert not np.allclose(_volumeArray(second.displacementVolumeNode), firstDisplacement)
    assert not np.array_equal(_volumeArray(second.warpedVolumeNode), firstWarped)
    assert second.metrics["lambda"] == pytest.approx(0.9) and first.metrics["lambda"] == pytest.approx(0.1)


def test_module_calls_match_the_logic_signatures():
    """Every keyword the module passes to the logic exists in the logic's signature."""
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    logicMethods = {name: inspect.signature(getattr(RegistrationLogic, name))
                    for name in ("prepareRegistration", "computeRegistration", "writeOutputs", "register")}
    checked = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in logicMethods:
            parameters = dict(logicMethods[node.func.attr].parameters)
            if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
                parameters.update(logicMethods["prepareRegistration"].parameters)  # register(**options)
            for keyword in node.keywords:
                if keyword.arg is not None:
                    assert keyword.arg in parameters, f"{node.func.attr}() has no parameter '{keyword.arg}'"
            checked += 1
    assert checked >= 6
    options = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "registrationOptions")
    returned = next(n for n in ast.walk(options) if isinstance(n, ast.Return)).value
    keys = {ast.literal_eval(k) for k in returned.keys}
    assert keys <= set(logicMethods["prepareRegistration"].parameters)
    assert {"similarity", "regularizationWeight", "device", "iterationScale", "workingSpacingMm"} <= keys


# ---------------------------------------------------------------- the module file, with stand-ins


class _Signal:
    def __init__(self):
        self.slots = []

    def connect(self, slot):
        self.slots.append(slot)


class _FakeTimer:
    """qt.QTimer stand-in: the test calls the widget's timeout slot itself."""

    def __init__(self):
        self.timeout = _Signal()
        self.active = False

    def setInterval(self, milliseconds):
        self.interval = milliseconds

    def start(self):
        self.active = True

    def stop(self):
        self.active = False

    def isActive(self):
        return self.active


class _FakeWidget:
    """Stands in for any .ui widget: the attributes and calls the module uses."""

    def __init__(self, name, cls, properties):
        self.name, self.cls = name, cls
        self.enabled = properties.get("enabled", "true") == "true"
        self.text = properties.get("text") or ""
        self.value = 0
        self.maximum = int(properties.get("maximum", "100").split(".")[0])
        self.items = {}
        self.rowCount = 0
        self.connections = []

    def connect(self, signal, slot):
        self.connections.append((signal, slot))

    def horizontalHeader(self):
        return types.SimpleNamespace(setSectionResizeMode=lambda *args: None)

    def setRowCount(self, count):
        self.rowCount = count

    def setItem(self, row, column, item):
        self.items[(row, column)] = item.text


def _fakeUi():
    root = ElementTree.parse(UI_FILE).getroot()
    widgets = {}
    for widget in root.iter("widget"):
        properties = {p.get("name"): (p[0].text if len(p) else None) for p in widget.findall("property")}
        widgets[widget.get("name")] = _FakeWidget(widget.get("name"), widget.get("class"), properties)
    return types.SimpleNamespace(**widgets)


class _WithinRange:
    def __init__(self, minimum, maximum):
        self.minimum, self.maximum = minimum, maximum


def _parameterNodeWrapper(cls):
    """Minimal parameterNodeWrapper: typed attributes with defaults, Modified() on every change."""
    names = list(cls.__annotations__)
    defaults = {name: cls.__dict__.get(name) for name in names}

    class Wrapper:
        def __init__(self, parameterNode):
            object.__setattr__(self, "parameterNode", parameterNode)
            object.__setattr__(self, "_values", dict(defaults))

        def __getattr__(self, name):
            values = object.__getattribute__(self, "_values")
            if name in values:
                return values[name]
            raise AttributeError(name)

        def __setattr__(self, name, value):
            if name not in names:
                raise AttributeError(f"{cls.__name__} has no parameter '{name}'")
            self._values[name] = value
            self.parameterNode.Modified()

        def connectGui(self, gui):
            for widget in vars(gui).values():
                widget.enabled = widget.enabled  # the real one writes every bound widget
            return 1

        def disconnectGui(self, tag):
            pass

        def AddObserver(self, event, callback, priority=0.0):
            return self.parameterNode.AddObserver(event, callback, priority)

        def RemoveObserver(self, tag):
            self.parameterNode.RemoveObserver(tag)

    Wrapper.__name__ = cls.__name__
    return Wrapper


class _ScriptedLoadableModuleLogic:
    """The parts of Slicer's ScriptedLoadableModuleLogic the module uses (singleton parameter node)."""

    def __init__(self, parent=None):
        super().__init__()
        self.moduleName = type(self).__name__.removesuffix("Logic")

    def getParameterNode(self):
        node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
            node.UnRegister(None)
            node.SetSingletonTag(self.moduleName)
            node.SetAttribute("ModuleName", self.moduleName)
            node = slicer.mrmlScene.AddNode(node)
        return node


class _ScriptedLoadableModuleWidget:
    def __init__(self, parent=None):
        self.parent = types.SimpleNamespace(isEntered=True)


class _ScriptedLoadableModuleTest(unittest.TestCase):
    def delayDisplay(self, message, msec=None):
        pass


@pytest.fixture
def module(headless, monkeypatch):
    """LearnedRegistration.py imported with stand-ins for the desktop-only modules."""
    qt = types.ModuleType("qt")
    qt.QTimer = _FakeTimer
    qt.QTableWidgetItem = lambda text: types.SimpleNamespace(text=text)
    qt.QHeaderView = types.SimpleNamespace(ResizeToContents=3)
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    slm = types.ModuleType("slicer.ScriptedLoadableModule")
    slm.ScriptedLoadableModule = type("ScriptedLoadableModule", (), {})
    slm.ScriptedLoadableModuleWidget = _ScriptedLoadableModuleWidget
    slm.ScriptedLoadableModuleLogic = _ScriptedLoadableModuleLogic
    slm.ScriptedLoadableModuleTest = _ScriptedLoadableModuleTest
    pnw = types.ModuleType("slicer.parameterNodeWrapper")
    pnw.parameterNodeWrapper = _parameterNodeWrapper
    pnw.WithinRange = _WithinRange
    for name, stub in (("qt", qt), ("slicer.i18n", i18n), ("slicer.ScriptedLoadableModule", slm),
                       ("slicer.parameterNodeWrapper", pnw)):
        monkeypatch.setitem(sys.modules, name, stub)
    monkeypatch.setattr(slicer, "mrmlScene", headless.scene, raising=False)

    spec = importlib.util.spec_from_file_location("LearnedRegistration", MODULE_FILE)
    loaded = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "LearnedRegistration", loaded)
    spec.loader.exec_module(loaded)

    loaded.viewCalls = []
    monkeypatch.setattr(slicer.util, "setSliceViewerLayers", lambda **kwargs: loaded.viewCalls.append(kwargs))
    loaded.chartsShown = []
    monkeypatch.setattr(loaded.LearnedRegistrationLogic, "showSweepChart",
                        staticmethod(lambda chartNode: loaded.chartsShown.append(chartNode)))
    loaded.errors = []
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, *args, **kwargs: loaded.errors.append(text))
    return loaded


class _FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _makeWidget(module):
    widget = module.LearnedRegistrationWidget()
    widget.ui = _fakeUi()
    widget.logic = module.LearnedRegistrationLogic()
    widget._pollTimer = _FakeTimer()
    widget._pollTimer.timeout.connect(widget._onPollTimer)
    clock = _FakeClock()
    widget._lambdaDebouncer = LatestRequestDebouncer(widget.LAMBDA_DEBOUNCE_S, clock=clock)
    widget.initializeParameterNode()
    return widget, clock


def _pollUntilIdle(widget, timeout=WAIT_S):
    """Fire the widget's timer like Qt would until it stops itself."""
    deadline = time.monotonic() + timeout
    while widget._pollTimer.isActive():
        assert time.monotonic() < deadline, "the widget did not finish in time"
        for slot in widget._pollTimer.timeout.slots:
            slot()
        time.sleep(0.02)


def test_module_parameter_node_and_logic_options(module, headless):
    fixed, moving = _addPhantomPair(headless.scene)
    logic = module.LearnedRegistrationLogic()
    assert logic.moduleName == "LearnedRegistration"
    parameterNode = logic.getParameterNode()
    assert logic.getParameterNode() is parameterNode  # cached wrapper around the singleton node
    assert parameterNode.regularizationWeight == module.DEFAULT_LAMBDA
    parameterNode.fixedVolume, parameterNode.movingVolume = fixed, moving
    parameterNode.similarity = module.Similarity.NGF
    parameterNode.device = module.ComputeDevice.AUTO
    parameterNode.workingSpacingMm = 0.0
    options = logic.registrationOptions(parameterNode)
    assert options["similarity"] == "ngf" and options["device"] is None and options["workingSpacingMm"] is None
    assert options["lambdaMapNode"] is None
    parameterNode.inputLambdaMap = fixed
    assert logic.registrationOptions(parameterNode)["lambdaMapNode"] is None  # only when spatially varying
    parameterNode.spatiallyVarying = True
    assert logic.registrationOptions(parameterNode, 0.7)["lambdaMapNode"] is fixed
    assert logic.registrationOptions(parameterNode, 0.7)["regularizationWeight"] == 0.7
    assert isinstance(logic.outputNodesFromParameterNode(parameterNode), RegistrationOutputNodes)
    assert logic.sweepLambdas(3) == [0.0, 0.5, 1.0]
    with pytest.raises(ValueError):
        logic.sweepLambdas(1)
    for member in (*module.Similarity, *module.ComputeDevice, *module.DisplayedOutput, *module.RegistrationMethod):
        assert isinstance(member, enum.Enum) and member.label()
    assert logic.cancelledExceptionTypes() == (RegistrationCancelled,)


def test_widget_apply_live_lambda_show_cancel_and_sweep(module, headless):
    scene = headless.scene
    fixed, moving = _addPhantomPair(scene)
    widget, clock = _makeWidget(module)
    parameterNode = widget._parameterNode
    assert parameterNode.fixedVolume is fixed  # picked as default input
    assert not widget.ui.applyButton.enabled  # no moving volume yet
    parameterNode.movingVolume = moving
    parameterNode.device = module.ComputeDevice.CPU
    parameterNode.method = module.RegistrationMethod.OPTIMIZE  # a λ change is a new background registration
    parameterNode.iterationScale = FAST["iterationScale"]
    parameterNode.workingSpacingMm = FAST["workingSpacingMm"]
    parameterNode.regularizationWeight = 0.1
    assert widget.ui.applyButton.enabled and not widget.ui.cancelButton.enabled
    assert not widget._lambdaDebouncer.has_pending  # no result yet: λ changes start nothing

    # Apply: computed in the background, written on the "GUI thread" (the timer slot).
    widget.onApplyButton()
    assert widget._activeRun is not None and widget.ui.cancelButton.enabled and not widget.ui.applyButton.enabled
    _pollUntilIdle(widget)
    assert not module.errors, module.errors
    assert widget.ui.applyButton.enabled and not widget.ui.cancelButton.enabled
    outputFields = list(module.OUTPUT_FIELDS)
    created = {name: getattr(parameterNode, name) for name in outputFields if name != "warpedSegmentation"}
    assert all(node is not None and scene.GetNodeByID(node.GetID()) is node for node in created.values())
    assert widget.ui.progressBar.value == widget.ui.progressBar.maximum
    shownMetrics = {widget.ui.metricsTableWidget.items[(row, 0)]: widget.ui.metricsTableWidget.items[(row, 1)]
                    for row in range(widget.ui.metricsTableWidget.rowCount)}
    assert shownMetrics["λ"] == "0.10" and shownMetrics["Dice (mean)"] == "—"
    assert float(shownMetrics[module.metric("folding_percent").header]) >= 0.0  # the label lives in the metric table
    assert module.viewCalls[-1]["background"] is fixed and module.viewCalls[-1]["foreground"] is created["warpedVolume"]

    # λ slider: debounced, the latest value wins, results go into the same nodes.
    ids = {name: node.GetID() for name, node in created.items()}
    displacementBefore = _volumeArray(created["displacementVolume"])
    nodeCount = scene.GetNumberOfNodes()
    parameterNode.regularizationWeight = 0.5
    parameterNode.regularizationWeight = 0.9  # supersedes 0.5 before the quiet period ends
    widget._onPollTimer()
    assert widget._activeRun is None and widget._lambdaDebouncer.pending == 0.9
    clock.now += widget.LAMBDA_DEBOUNCE_S + 0.01
    widget._onPollTimer()
    assert widget._activeRun is not None and widget._activeRun.regularizationWeight == 0.9
    _pollUntilIdle(widget)
    assert {name: getattr(parameterNode, name).GetID() for name in created} == ids
    assert scene.GetNumberOfNodes() == nodeCount
    assert not np.allclose(_volumeArray(created["displacementVolume"]), displacementBefore)
    assert widget.ui.metricsTableWidget.items[module.EVALUATION_KEYS.index("lambda"), 1] == "0.90"

    # "Show": the chosen output goes to the foreground.
    parameterNode.displayedOutput = module.DisplayedOutput.JACOBIAN
    assert module.viewCalls[-1]["foreground"] is created["jacobianVolume"]
    parameterNode.displayedOutput = module.DisplayedOutput.CHECKERBOARD
    assert module.viewCalls[-1]["foreground"] is created["checkerboardVolume"]

    # Cancel: nothing in the scene changes.
    warpedBefore = _volumeArray(created["warpedVolume"])
    nodeCount = scene.GetNumberOfNodes()
    widget.onApplyButton()
    widget.onCancelButton()
    _pollUntilIdle(widget)
    assert "Cancelled" in widget.ui.statusLabel.text
    assert scene.GetNumberOfNodes() == nodeCount
    assert np.array_equal(_volumeArray(created["warpedVolume"]), warpedBefore)
    assert not module.errors

    # λ sweep: a table with one row per λ and a chart with Dice and % folding; volumes untouched.
    parameterNode.sweepSteps = 2
    widget.onSweepButton()
    _pollUntilIdle(widget)
    assert not module.errors, module.errors
    table = parameterNode.sweepTable
    assert table is not None and table.GetNumberOfRows() == 2
    assert [table.GetTable().GetValueByName(r, "lambda").ToDouble() for r in range(2)] == [0.0, 1.0]
    folding = [table.GetTable().GetValueByName(r, "folding_percent").ToDouble() for r in range(2)]
    assert all(np.isfinite(folding))
    chart = parameterNode.sweepChart
    assert chart.GetNumberOfPlotSeriesNodes() == len(module.SWEEP_SERIES)
    assert {chart.GetNthPlotSeriesNode(i).GetYColumnName() for i in range(2)} == {"dice_mean", "folding_percent"}
    assert module.chartsShown == [chart]
    assert np.array_equal(_volumeArray(created["warpedVolume"]), warpedBefore)
    seriesCount = scene.GetNumberOfNodesByClass("vtkMRMLPlotSeriesNode")
    widget.onSweepButton()  # a second sweep reuses table, chart and series
    _pollUntilIdle(widget)
    assert parameterNode.sweepTable is table and scene.GetNumberOfNodesByClass("vtkMRMLPlotSeriesNode") == seriesCount


def test_widget_reports_bad_inputs_without_running(module, headless):
    fixed, moving = _addPhantomPair(headless.scene)
    widget, _ = _makeWidget(module)
    parameterNode = widget._parameterNode
    parameterNode.movingVolume = moving
    parameterNode.fixedSegmentation = fixed  # not a label map or segmentation; and no moving labels
    widget.onApplyButton()
    assert widget._activeRun is None and not widget._pollTimer.isActive()
    assert module.errors and "Cannot" in widget.ui.statusLabel.text
    assert parameterNode.warpedVolume is None


def test_module_self_test_passes(module):
    """The module's own self-test (what Slicer's ctest runs) passes on slicer-core."""
    selfTest = module.LearnedRegistrationTest()
    selfTest.runTest()  # raises AssertionError on any failed check


def test_self_test_skips_with_a_message_without_torch(module, monkeypatch):
    """On the Extensions build factory torch is absent: the self-test is skipped and says why."""
    findSpec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "torch" else findSpec(name, *args))
    result = unittest.TestResult()
    module.LearnedRegistrationTest("runTest").run(result)
    assert result.wasSuccessful() and len(result.skipped) == 1 and result.testsRun == 1
    assert "PyTorch is not installed" in result.skipped[0][1]


def _forbidden(name):
    def fail(*args, **kwargs):
        raise AssertionError(f"{name} ran on the main thread")

    return fail


def test_widget_never_computes_on_the_main_thread_and_defers_lambda_during_a_run(module, headless, monkeypatch):
    """Every registration of the panel runs in a child process; the only torch work left on the main
    thread is the λ update of the λ path already in memory, which waits while a job runs, is
    throttled while the slider moves (ending on the last value), and is released with the scene."""
    from LearnedRegistrationLib.bridge import compute, logic
    from LearnedRegistrationLib.engine import optimize, path
    from LearnedRegistrationLib.learned import network, predict

    for owner, name in ((compute, "computeRegistration"), (compute, "computeSweep"), (compute, "instantSession"),
                        (logic, "computeRegistration"), (jobs, "computeRegistration"), (jobs, "computeSweep"),
                        (module, "computeSweep"), (optimize, "register_images"), (optimize, "optimize_velocity"),
                        (path, "register_path"), (predict, "register_with_network"), (predict, "adapt"),
                        (network.RegistrationNetwork, "encode")):
        monkeypatch.setattr(owner, name, _forbidden(f"{getattr(owner, '__name__', owner)}.{name}"))
    predictions = []
    evaluateOriginal = path.LambdaPath.evaluate

    def recordingEvaluate(session, lam):
        callers = {frame.function for frame in inspect.stack()[1:8]}
        assert "setRegularization" in callers, f"a λ evaluation outside the λ update: {callers}"
        predictions.append(lam)
        return evaluateOriginal(session, lam)

    monkeypatch.setattr(path.LambdaPath, "evaluate", recordingEvaluate)

    fixed, moving = _addPhantomPair(headless.scene)
    widget, clock = _makeWidget(module)
    parameterNode = widget._parameterNode
    parameterNode.movingVolume = moving
    parameterNode.device = module.ComputeDevice.CPU
    assert parameterNode.method is module.RegistrationMethod.PATH  # the default
    parameterNode.iterationScale = FAST["iterationScale"]
    parameterNode.workingSpacingMm = FAST["workingSpacingMm"]
    parameterNode.regularizationWeight = 0.3

    widget.onApplyButton()  # the λ path, in a child process
    _pollUntilIdle(widget)
    assert not module.errors, module.errors
    assert widget.logic.canSetRegularizationInstantly() and predictions == []
    warped = parameterNode.warpedVolume

    # Slider drag: throttled, and the last value always wins.
    widget._lastInstantUpdate = -1e9
    for value in (0.4, 0.5, 0.6):
        parameterNode.regularizationWeight = value
    _pollUntilIdle(widget)
    assert predictions[-1] == 0.6 and len(predictions) <= 2
    assert parameterNode.warpedVolume is warped  # same nodes, updated in place
    assert widget.ui.metricsTableWidget.items[module.EVALUATION_KEYS.index("lambda"), 1] == "0.60"

    # A λ change while a job runs waits for it, then applies the latest value.
    predictions.clear()
    widget.onApplyButton()
    assert widget._activeRun is not None
    parameterNode.regularizationWeight = 0.7
    parameterNode.regularizationWeight = 0.8
    widget._onPollTimer()
    if widget._activeRun is not None:  # still running: nothing was predicted yet
        assert predictions == [] and widget._instantLambda.pending == 0.8
    _pollUntilIdle(widget)
    assert not module.errors, module.errors
    assert predictions == [0.8]
    assert widget.ui.metricsTableWidget.items[module.EVALUATION_KEYS.index("lambda"), 1] == "0.80"

    # Closing the scene releases the path kept for the slider.
    widget.onSceneStartClose(None, None)
    assert not widget.logic.canSetRegularizationInstantly()
    widget.onSceneEndClose(None, None)
    parameterNode = widget._parameterNode
    fixed, moving = _addPhantomPair(headless.scene)
    parameterNode.fixedVolume, parameterNode.movingVolume = fixed, moving
    parameterNode.device = module.ComputeDevice.CPU
    parameterNode.iterationScale = FAST["iterationScale"]
    parameterNode.workingSpacingMm = FAST["workingSpacingMm"]

    # The optimizer's λ change is a new background registration, never a computation here.
    parameterNode.method = module.RegistrationMethod.OPTIMIZE
    widget.onApplyButton()
    _pollUntilIdle(widget)
    parameterNode.regularizationWeight = 0.2
    clock.now += widget.LAMBDA_DEBOUNCE_S + 0.01
    _pollUntilIdle(widget)
    assert not module.errors, module.errors
    assert widget.ui.metricsTableWidget.items[module.EVALUATION_KEYS.index("lambda"), 1] == "0.20"
