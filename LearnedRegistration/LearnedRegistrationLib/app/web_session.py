"""What the web page does to the scene, without the page: inputs, registration, λ, display, Save.

:class:`RegistrationSession` is the web app's (:mod:`.web`) hold on one MRML scene: trame-slicer's,
adopted through :class:`.headless.HeadlessSlicer` (no second set of module logics). Every step
goes through the same code as the command line and the Slicer panel:

- inputs: files under the data root (:class:`.web_paths.DataRoot`), checked by
  :func:`engine.imageio.check_image_file` and loaded by :meth:`HeadlessSlicer.loadVolume`, or
  the built-in demo pair, loaded as ``learnedreg register`` loads it;
- registration: :class:`bridge.logic.RegistrationLogic` in its three steps, so the caller can
  run :meth:`compute` in a worker thread (:meth:`prepare` and :meth:`write` on the thread that
  owns the scene);
- λ: :meth:`bridge.logic.RegistrationLogic.setRegularization`; the λ-sweep rows:
  :func:`.cli.run_lambda_sweep`, one λ per call so the server can breathe in between;
- Save: :func:`.cli.write_output_set`, the command line's own writer, into
  :class:`.outputs.StagedOutput`.

Threads: every method touches the scene and must run on the thread that owns it (the server's
event loop), except :meth:`compute`, which touches no MRML. The session does not lock: the web
app runs one registration at a time (:attr:`RegistrationSession.busy`).

No trame here, so this module is tested on the main environment's slicer-core.
"""

from __future__ import annotations

import os
from argparse import Namespace
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..bridge import mrml
from ..bridge.logic import RegistrationLogic, RegistrationOutputNodes
from ..engine.metric_table import EVALUATION_KEYS, metric
from .cli import _demo_inputs, run_lambda_sweep, write_lambda_sweep, write_output_set
from .headless import HeadlessSlicer
from .outputs import SWEEP_FILES, StagedOutput, refuse_outputs_over_inputs
from .web_paths import DataRoot

#: The "Show" selector: key -> label.
SHOW_MODES = {
    "overlay": "warped over fixed",
    "checkerboard": "checkerboard",
    "difference": "difference",
    "jacobian": "Jacobian determinant",
    "lambda": "λ(x)",
}
#: Output shown as the background of each mode (the overlay shows the warped image over the fixed one).
_SHOWN_OUTPUT = {
    "overlay": "warpedVolumeNode",
    "checkerboard": "checkerboardVolumeNode",
    "difference": "differenceVolumeNode",
    "jacobian": "jacobianVolumeNode",
    "lambda": "lambdaMapVolumeNode",
}
#: λ values of the sweep plot (the command line's README example).
SWEEP_LAMBDAS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)
#: Rows of the page's metrics table: the panel's evaluation rows, the demo's error against its
#: known displacement, and the time of the last λ change.
TABLE_KEYS = (*EVALUATION_KEYS, "displacement_error_mean_mm", "displacement_error_p95_mm", "update_s")
#: Opacity of the warped (or moving) image over the fixed one.
OVERLAY_OPACITY = 0.5
#: Slicer's diverging colour table for the Jacobian map (:data:`bridge.mrml.JACOBIAN_COLOR_NODE_IDS`):
#: slicer-core ships no colour files, so the session adds one under that ID (blue < 1 < red, light
#: grey at 1: Moreland's cool-warm end and middle colours), not saved with the scene (as Slicer's
#: own colour tables), so a saved scene opened in Slicer uses Slicer's table.
DIVERGING_COLOR_TAG = "FileDivergingBlueRed.txt"
_COOL_WARM = ((0.230, 0.299, 0.754), (0.865, 0.865, 0.865), (0.706, 0.016, 0.150))


def addDivergingColorTable(scene, colors: int = 256):
    """The diverging blue-grey-red table with ID ``vtkMRMLColorTableNodeFileDivergingBlueRed.txt``
    (:data:`DIVERGING_COLOR_TAG`), added to ``scene`` unless a node with that ID is there; returns it."""
    import slicer

    existing = scene.GetNodeByID("vtkMRMLColorTableNode" + DIVERGING_COLOR_TAG)
    if existing is not None:
        return existing
    table = slicer.vtkMRMLColorTableNode()
    table.SetTypeToUser()
    table.SetNumberOfColors(colors)
    low, middle, high = (np.asarray(c) for c in _COOL_WARM)
    for index, t in enumerate(np.linspace(-1.0, 1.0, colors)):
        rgb = middle + (high - middle) * t if t >= 0 else middle + (low - middle) * -t
        table.SetColor(index, f"{t:+.3f}", *rgb, 1.0)
    table.SetName("DivergingBlueRed")
    table.SetSingletonTag(DIVERGING_COLOR_TAG)  # the ID is the class name + the singleton tag
    table.SetSaveWithScene(False)
    table.SetAttribute("Category", "Continuous")
    scene.AddNode(table)
    return table


@dataclass(frozen=True)
class Inputs:
    """What the page asked to register: the demo pair, or files relative to the data root ("" = none)."""

    demo: bool
    fixed: str = ""
    moving: str = ""
    fixedLabels: str = ""
    movingLabels: str = ""


@dataclass(frozen=True)
class Layers:
    """What the slice views show: background and foreground volume node IDs (None: empty layer)."""

    background: Optional[str]
    foreground: Optional[str] = None
    foregroundOpacity: float = 0.0


class RegistrationSession:
    """The web app's registration state on one scene (module docstring).

    Args:
        slicerApp: the scene and its logics (trame-slicer's, adopted).
        dataRoot: where inputs are read and results saved.
        device: "cpu", "cuda", "cuda:N" or None (automatic).
        iterationScale: multiplies every iteration count (< 1: a quick preview; tests).
        demoSize: voxels per side of the demo pair.

    Attributes:
        logic: the :class:`bridge.logic.RegistrationLogic`.
        outputs: the output nodes of the last registration written (None before the first).
        sweepRows: the λ-sweep rows of the last registration ([] when none).
        busy: True while a registration runs (set by the caller: one at a time per server).
    """

    def __init__(
        self,
        slicerApp: HeadlessSlicer,
        dataRoot: DataRoot,
        device: Optional[str] = None,
        iterationScale: float = 1.0,
        demoSize: int = 64,
    ):
        self.slicerApp = slicerApp
        addDivergingColorTable(slicerApp.scene)
        self.dataRoot = dataRoot
        self.device = device
        self.iterationScale = float(iterationScale)
        self.demoSize = int(demoSize)
        self.logic = RegistrationLogic()
        self.outputs: Optional[RegistrationOutputNodes] = None
        self.sweepRows: list[dict] = []
        self.busy = False
        self._inputs: Optional[Inputs] = None
        self._nodes: dict = {}
        self._inputPaths: dict = {}
        self._fixedGrid = None
        self._demo = None
        self._truthNode = None

    # ------------------------------------------------------------------------------------ inputs
    def loadInputs(self, inputs: Inputs) -> bool:
        """Load the inputs into the scene, unless they are the ones loaded already (loop thread).

        New inputs replace the previous inputs and outputs (their nodes are removed) and forget
        the λ path in memory.

        Returns:
            True when new nodes were loaded (the views should be fitted to them).

        Raises:
            ValueError: a path the data root refuses (:class:`.web_paths.DataRoot`), a file that
                is not a complete, readable 3D image (:func:`engine.imageio.check_image_file`),
                only one of the two label maps, or a missing fixed or moving image.
        """
        from ..engine.imageio import check_image_file

        if inputs == self._inputs and self._nodes:
            return False
        if not inputs.demo:
            if not inputs.fixed or not inputs.moving:
                raise ValueError("choose a fixed and a moving image (or the built-in demo pair)")
            if bool(inputs.fixedLabels) != bool(inputs.movingLabels):
                raise ValueError("choose both label maps (fixed and moving) or neither")
            named = {"fixed": ("fixed image", inputs.fixed), "moving": ("moving image", inputs.moving),
                     "fixed_labels": ("fixed label map", inputs.fixedLabels),
                     "moving_labels": ("moving label map", inputs.movingLabels)}
            paths, grids = {}, {}
            for key, (what, relative) in named.items():
                if relative:
                    paths[key] = self.dataRoot.input_file(relative, what)
                    try:
                        grids[key] = check_image_file(paths[key])
                    except (OSError, ValueError) as error:
                        raise ValueError(f"{what} '{relative}': {error}") from None
        self._clear()
        scene = self.slicerApp.scene
        before = mrml.nodeIds(scene)
        try:
            if inputs.demo:
                self._nodes, self._demo, self._truthNode = _demo_inputs(
                    self.slicerApp, Namespace(demo_size=self.demoSize, demo_seed=0)
                )
            else:
                load = self.slicerApp.loadVolume
                self._nodes = {"fixedVolumeNode": load(paths["fixed"], "fixed"),
                               "movingVolumeNode": load(paths["moving"], "moving")}
                if "fixed_labels" in paths:
                    self._nodes["fixedLabelNode"] = load(paths["fixed_labels"], "fixed labels", labelMap=True)
                    self._nodes["movingLabelNode"] = load(paths["moving_labels"], "moving labels", labelMap=True)
                self._fixedGrid = grids["fixed"]
                self._inputPaths = {key: str(path) for key, path in paths.items()}
        except BaseException:
            mrml.removeNodesAddedSince(scene, before)
            self._nodes, self._demo, self._truthNode, self._fixedGrid, self._inputPaths = {}, None, None, None, {}
            raise
        for node in self._nodes.values():
            if node.IsA("vtkMRMLLabelMapVolumeNode"):
                mrml.setLabelDisplay(node)
        self._inputs = inputs
        return True

    def _clear(self) -> None:
        """Remove the inputs and outputs of the previous pair and forget its λ path."""
        self.logic.releaseInstantSession()
        nodes = list(self._nodes.values()) + [self._truthNode]
        if self.outputs is not None:
            nodes += [getattr(self.outputs, name) for name in vars(self.outputs) if name != "metrics"]
        for node in nodes:
            mrml.removeNode(node)
        self.outputs, self.sweepRows, self._inputs, self._nodes = None, [], None, {}
        self._demo = self._truthNode = self._fixedGrid = None
        self._inputPaths = {}

    # ------------------------------------------------------------------------------------ registration
    def prepare(self, method: str, similarity: str, regularizationWeight: float, spatiallyVarying: bool):
        """The logic's request for the loaded inputs (loop thread): :meth:`RegistrationLogic.prepareRegistration`.

        Raises:
            ValueError: no inputs loaded, or what ``prepareRegistration`` refuses.
        """
        if not self._nodes:
            raise ValueError("load a fixed and a moving image first")
        return self.logic.prepareRegistration(
            regularizationWeight=float(regularizationWeight),
            method=method,
            similarity=similarity,
            spatiallyVarying=bool(spatiallyVarying),
            device=self.device,
            iterationScale=self.iterationScale,
            **self._nodes,
        )

    def compute(self, request, progressCallback=None, cancelRequested=None):
        """:meth:`RegistrationLogic.computeRegistration` (any thread: no MRML).

        Raises:
            ValueError: images the engine refuses (no overlap, empty ...).
            engine.common.RegistrationCancelled: ``cancelRequested()`` returned True.
        """
        return self.logic.computeRegistration(request, progressCallback, cancelRequested)

    def write(self, request, computed) -> RegistrationOutputNodes:
        """Write the computed registration into the output nodes (loop thread), in place when the
        pair already has output nodes; forgets the previous λ-sweep rows."""
        self.outputs = self.logic.writeOutputs(request, computed, self.outputs)
        self.sweepRows = []
        return self.outputs

    def canSetLambdaInstantly(self) -> bool:
        """True when the last registration can be re-evaluated at another λ without a new run."""
        return self.outputs is not None and self.logic.canSetRegularizationInstantly()

    def setLambda(self, regularizationWeight: float, show: str = "overlay") -> RegistrationOutputNodes:
        """Update every output node to a new λ (loop thread): :meth:`RegistrationLogic.setRegularization`,
        the node shown in ``show`` mode first.

        Raises:
            RuntimeError: no λ path or network registration in memory.
            ValueError: λ outside [0, 1].
        """
        displayed = _SHOWN_OUTPUT.get(show) if show in ("overlay", "checkerboard", "difference") else None
        self.outputs = self.logic.setRegularization(float(regularizationWeight), displayed=displayed)
        return self.outputs

    def sweepStep(self, regularizationWeight: float) -> dict:
        """One row of the λ sweep (loop thread): the outputs move to that λ (:func:`.cli.run_lambda_sweep`);
        set the slider's λ again when the sweep is done.

        Raises:
            RuntimeError: no λ path or network registration in memory.
        """
        row = run_lambda_sweep(self.logic, self.outputs, [float(regularizationWeight)], None)[0]
        self.sweepRows.append(row)
        return row

    # ------------------------------------------------------------------------------------ showing
    def layers(self, show: str) -> Layers:
        """What the slice views show in ``show`` mode (:data:`SHOW_MODES`): before a registration,
        the moving image over the fixed one.

        Raises:
            ValueError: an unknown mode.
        """
        if show not in SHOW_MODES:
            raise ValueError(f"unknown display {show!r}; choose one of {', '.join(SHOW_MODES)}")
        fixed = self._nodes.get("fixedVolumeNode")
        moving = self._nodes.get("movingVolumeNode")
        if fixed is None:
            return Layers(None)
        if self.outputs is None:
            return Layers(fixed.GetID(), moving.GetID(), OVERLAY_OPACITY)
        shown = getattr(self.outputs, _SHOWN_OUTPUT[show])
        if show == "overlay":
            return Layers(fixed.GetID(), shown.GetID(), OVERLAY_OPACITY)
        return Layers(shown.GetID())

    def metrics(self) -> dict:
        """The last registration's metrics at the current λ ({} before a registration), with the
        demo's error against its known displacement."""
        if self.outputs is None:
            return {}
        metrics = dict(self.outputs.metrics)
        if self._demo is not None:
            from ..engine.metrics import displacement_error

            estimated, _ = mrml.displacementFromGridTransformNode(self.outputs.transformNode)
            metrics.update(displacement_error(estimated, self._demo.true_displacement_ras, self._demo.fixed_labels > 0))
            metrics["demo"] = {"size": self.demoSize, "seed": 0}
        return metrics

    def metricRows(self, keys: Sequence[str] = TABLE_KEYS) -> list[dict]:
        """``[{"name": "HD95 (mm)", "value": "2.31"}, ...]`` for the metrics present, labelled,
        with units and formatted as every table is (:mod:`engine.metric_table`)."""
        metrics = self.metrics()
        rows = []
        for key in keys:
            value = metrics.get(key)
            if value is not None:
                rows.append({"name": metric(key).header, "value": metric(key).text(value)})
        return rows

    def sweepPlot(self, folder: os.PathLike) -> Optional[Path]:
        """Write the λ-sweep files into ``folder`` as the command line does (:func:`.cli.write_lambda_sweep`:
        ``lambda_sweep.json`` and the plot of Dice, or SDlogJ without labels, against % folding);
        returns the PNG's path, or None when there are no rows."""
        if not self.sweepRows:
            return None
        write_lambda_sweep(self.sweepRows, Path(folder), self.outputs.metrics.get("method", ""))
        return Path(folder) / SWEEP_FILES[1]

    # ------------------------------------------------------------------------------------ saving
    def save(self, folder: str) -> Path:
        """Write the outputs at the current λ, ``scene.mrb``, ``metrics.json`` and the λ-sweep files
        into ``folder`` (relative to the data root), as ``learnedreg register --output-dir`` does
        (:func:`.cli.write_output_set`: staged beside it, published as one set).

        Returns:
            The folder written (absolute).

        Raises:
            ValueError: no registration yet, a folder the data root refuses, one that is an
                input's place (:func:`.outputs.refuse_outputs_over_inputs`) or that cannot be used
                (:class:`.outputs.OutputFolderError`).
            .cli.OutputWriteError: a file could not be written (a full disk ...).
        """
        if self.outputs is None:
            raise ValueError("register a pair before saving")
        output = self.dataRoot.output_folder(folder)
        refuse_outputs_over_inputs(output, {f"the {key.replace('_', ' ')} input": path for key, path in self._inputPaths.items()})
        metrics = self.metrics()
        if self._inputPaths:
            metrics["inputs"] = dict(self._inputPaths)
        rows = list(self.sweepRows)
        staged = StagedOutput(output)
        try:
            write_output_set(self.slicerApp, self.outputs, staged, metrics, self._fixedGrid, self._truthNode,
                             (lambda: rows) if rows else None)
        finally:
            staged.discard()
        return output
