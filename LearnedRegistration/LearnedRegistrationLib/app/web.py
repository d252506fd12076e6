"""``learnedreg serve``: the registration in a web browser, on Slicer's own slice views (trame-slicer).

One page, one screen: three slice views (red, yellow, green; no 3D view: software volume
rendering here takes seconds a frame), and beside them the inputs (the built-in demo pair or files
under the data root), the method, similarity, λ and spatially varying λ(x); Register with a
progress bar and Cancel; the live λ slider; a "Show" selector (warped over fixed, checkerboard,
difference, Jacobian determinant, λ(x)); the metrics table; the λ-sweep plot; and Save, which
writes what ``learnedreg register`` writes into a folder under the data root.

**One scene, one logic.** trame-slicer's ``SlicerApp`` owns the MRML scene, its application
logic and the module logics, and renders the slice views from them on the server (the browser
receives images). :class:`.headless.HeadlessSlicer` adopts that scene (no second set of
logics) and :class:`.web_session.RegistrationSession` runs everything on it through
:class:`bridge.logic.RegistrationLogic`: ``prepareRegistration`` and ``writeOutputs`` on the
server's event-loop thread, ``computeRegistration`` in a worker thread (``run_in_executor``),
``setRegularization`` for the slider (the last value wins), the command line's own writer for
Save. Nothing here registers, loads or writes on its own.

**Safe defaults.** It listens on 127.0.0.1 unless ``--host`` says otherwise; it reads and
writes only under ``--data-root`` (:class:`.web_paths.DataRoot`: relative paths only, no
``..``, symbolic links resolved, single-file image formats); one registration runs at a time
(a second Register is refused with a message). Every error (an unreadable file, a 2D image, no
overlap, a cancelled run, a refused path) is shown on the page as one line; the server keeps
serving.

Needs the ``web`` extra (``bash scripts/setup_env.sh --web``); the Slicer module never imports it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

from trame.app import get_server
from trame.widgets import html
from trame.widgets import vuetify3 as v
from trame_slicer.app.logic import connect_slice_view_slider_to_state
from trame_slicer.app.ui import Slider, create_vertical_view_gutter_ui
from trame_slicer.core import LayoutManager, SlicerApp
from trame_slicer.rca_view import register_rca_factories
from trame_slicer.views import Layout, LayoutDirection, ViewLayoutDefinition
from trame_vuetify.ui.vuetify3 import SinglePageWithDrawerLayout

from ..bridge.compute import DEFAULT_METHOD, DEFAULT_SPATIALLY_VARYING, EXPERIMENTAL_METHODS, METHODS
from ..engine.common import DEFAULT_LAMBDA, SIMILARITIES, RegistrationCancelled, RegistrationOptions, choose_device
from .cli import _quiet_vtk_log
from .headless import HeadlessSlicer
from .web_paths import DataRoot
from .web_session import SHOW_MODES, SWEEP_LAMBDAS, Inputs, RegistrationSession

#: The page's layout: the three slice views side by side, red (axial), yellow (sagittal), green (coronal).
LAYOUT_ID = "Registration"
#: Default results folder under the data root.
DEFAULT_SAVE_FOLDER = "learnedreg-results"


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _slice_view_gutter(server, view_id, view) -> None:
    """Reset-view button and slice slider on each view (trame-slicer's, without its "show in 3D" button)."""
    create_vertical_view_gutter_ui(server, view_id, view)
    with html.Div(style="position: absolute; bottom: 0; left: 0; width: 100%; background-color: transparent;"):
        Slider(classes="slice-slider", typed_state=connect_slice_view_slider_to_state(server, view), theme="dark", dense=True)


class RegistrationWebApp:
    """The trame server, Slicer's views and the page (module docstring).

    Args:
        dataRoot: the only folder inputs are read from and results saved into.
        device, iterationScale, demoSize: passed to :class:`.web_session.RegistrationSession`.
        quiet: hide the native libraries' messages while files are read and written.

    One per process: trame-slicer's ``SlicerApp`` sets the displayable managers' application
    logic for the whole process.
    """

    def __init__(self, dataRoot: DataRoot, device=None, iterationScale: float = 1.0, demoSize: int = 64, quiet: bool = True):
        self.server = get_server(client_type="vue3")
        self.state, self.ctrl = self.server.state, self.server.controller
        self.dataRoot = dataRoot
        self.slicerApp = SlicerApp()
        register_rca_factories(self.slicerApp.view_manager, self.server, slice_view_ui_f=_slice_view_gutter)
        self.layoutManager = LayoutManager(self.slicerApp.scene, self.slicerApp.view_manager, self.server)
        self.layoutManager.register_layout(LAYOUT_ID, Layout(LayoutDirection.Horizontal, [
            ViewLayoutDefinition.axial_view(), ViewLayoutDefinition.sagittal_view(), ViewLayoutDefinition.coronal_view(),
        ]))
        self.layoutManager.set_layout(LAYOUT_ID)
        self.headless = HeadlessSlicer(quiet=quiet, scene=self.slicerApp.scene, applicationLogic=self.slicerApp.app_logic)
        self.session = RegistrationSession(self.headless, dataRoot, device, iterationScale, demoSize)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="learnedreg-registration")
        self.cancelRequested = threading.Event()
        self._pendingLambda = None
        self._lambdaTask = self._registration = None
        self._sweepFolder = tempfile.TemporaryDirectory(prefix="learnedreg-web-")
        self._initialState()
        self._buildPage()
        self.state.change("lam")(self._onLambda)
        self.state.change("show")(self._onShow)
        self.state.change("source")(self._onSource)

    # ------------------------------------------------------------------------------------ state
    def _initialState(self) -> None:
        self.state.update({
            "data_root": str(self.dataRoot.folder),
            "source": "demo",
            "files": self.dataRoot.image_files(),
            "fixed": "", "moving": "", "fixed_labels": "", "moving_labels": "",
            "methods": [{"title": m + (" (experimental)" if m in EXPERIMENTAL_METHODS else ""), "value": m} for m in METHODS],
            "method": DEFAULT_METHOD,
            "similarities": list(SIMILARITIES),
            "similarity": RegistrationOptions.similarity,
            "lam": DEFAULT_LAMBDA,
            "spatially_varying": DEFAULT_SPATIALLY_VARYING,
            "show_modes": [{"title": label, "value": key} for key, label in SHOW_MODES.items()],
            "show": "overlay",
            "running": False,
            "progress": 0,
            "status": "Choose the inputs and press Register.",
            "error": "",
            "metric_rows": [],
            "sweep_png": "",
            "lambda_note": "",
            "save_folder": DEFAULT_SAVE_FOLDER,
            "saved": "",
            "registered": False,
        })

    def _buildPage(self) -> None:
        with SinglePageWithDrawerLayout(self.server, width=380) as layout:
            layout.title.set_text("Learned Registration")
            with layout.toolbar:
                v.VSpacer()
                html.Div("data root: {{ data_root }}", classes="text-caption mr-4", id="data-root")
            with layout.drawer, v.VContainer(classes="pa-3"):
                self._inputsPanel()
                self._registrationPanel()
                self._savePanel()
            with layout.content, html.Div(classes="d-flex flex-column", style="height: calc(100vh - 64px);"):
                with html.Div(style="flex: 3 1 0; min-height: 0;", id="views"):
                    self.layoutManager.initialize_layout_grid(layout)
                with html.Div(classes="d-flex flex-row pa-2", style="flex: 2 1 0; min-height: 0; overflow: auto;"):
                    with html.Div(style="flex: 1 1 0;"):
                        html.Div("Metrics", classes="text-subtitle-2")
                        with v.VTable(density="compact", id="metrics"), html.Tbody():
                            with html.Tr(v_for="(row, i) in metric_rows", key="i"):
                                html.Td("{{ row.name }}")
                                html.Td("{{ row.value }}")
                    with html.Div(style="flex: 1 1 0;", classes="text-center"):
                        html.Div("λ sweep", classes="text-subtitle-2")
                        html.Img(v_if="sweep_png", src=("sweep_png",), style="max-height: 100%; max-width: 100%;", id="sweep-plot")
                        html.Div("{{ lambda_note || 'Register with the λ path to see every λ.' }}", v_if="!sweep_png",
                                 classes="text-caption")

    def _inputsPanel(self) -> None:
        html.Div("Inputs", classes="text-subtitle-1")
        with v.VRadioGroup(v_model=("source",), density="compact", hide_details=True, disabled=("running",), id="source"):
            v.VRadio(label="built-in demo pair", value="demo", id="source-demo")
            v.VRadio(label="files under the data root", value="files", id="source-files")
        with html.Div(v_if="source === 'files'"):
            for key, label in (("fixed", "fixed image"), ("moving", "moving image"),
                               ("fixed_labels", "fixed labels (optional)"), ("moving_labels", "moving labels (optional)")):
                v.VCombobox(v_model=(key,), items=("files",), label=label, density="compact", clearable=True,
                            hide_details=True, classes="my-1", disabled=("running",), id=f"input-{key.replace('_', '-')}")

    def _registrationPanel(self) -> None:
        html.Div("Registration", classes="text-subtitle-1 mt-3")
        v.VSelect(v_model=("method",), items=("methods",), label="method", density="compact", hide_details=True,
                  classes="my-1", disabled=("running",), id="method")
        v.VSelect(v_model=("similarity",), items=("similarities",), label="similarity", density="compact",
                  hide_details=True, classes="my-1", disabled=("running",), id="similarity")
        v.VSwitch(v_model=("spatially_varying",), label="spatially varying λ(x)", density="compact", hide_details=True,
                  color="primary", disabled=("running || method !== 'path'",), id="spatially-varying")
        with html.Div(id="lambda", classes="mt-6"):
            v.VSlider(v_model=("lam",), min=0, max=1, step=0.01, label="λ", thumb_label="always", density="compact",
                      hide_details=True)
        with html.Div(classes="d-flex my-2"):
            v.VBtn("Register", click=self.register, color="primary", disabled=("running",), id="register")
            v.VBtn("Cancel", click=self.cancel, disabled=("!running",), classes="ml-2", id="cancel")
        v.VProgressLinear(model_value=("progress",), height=8, color="primary", id="progress")
        html.Div("{{ status }}", classes="text-caption my-1", id="status")
        v.VAlert(v_if="error", text=("error",), type="error", density="compact", variant="tonal", id="error")
        v.VSelect(v_model=("show",), items=("show_modes",), label="show", density="compact", hide_details=True,
                  classes="mt-3", id="show")

    def _savePanel(self) -> None:
        html.Div("Save", classes="text-subtitle-1 mt-3")
        v.VTextField(v_model=("save_folder",), label="folder under the data root", density="compact", hide_details=True,
                     id="save-folder")
        v.VBtn("Save", click=self.save, disabled=("running || !registered",), classes="my-2", id="save")
        html.Div("{{ saved }}", classes="text-caption", id="saved")

    # ------------------------------------------------------------------------------------ views
    def _showLayers(self) -> None:
        layers = self.session.layers(self.state.show)
        for view in self.slicerApp.view_manager.get_slice_views():
            view.set_background_volume_id(layers.background)
            view.set_foreground_volume_id(layers.foreground)
            view.set_foreground_opacity(layers.foregroundOpacity)

    def _refreshResults(self) -> None:
        self.state.metric_rows = self.session.metricRows()
        png = self.session.sweepPlot(self._sweepFolder.name)
        self.state.sweep_png = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode() if png else ""

    def _onSource(self, source, **_) -> None:
        if source == "files":  # files may have been added (or saved) since the page was built
            self.state.files = self.dataRoot.image_files()

    def _onShow(self, show, **_) -> None:
        try:
            self._showLayers()
        except ValueError as error:
            self.state.error = _one_line(error)

    # ------------------------------------------------------------------------------------ register
    def _inputs(self) -> Inputs:
        s = self.state
        if s.source == "demo":
            return Inputs(demo=True)
        return Inputs(False, *((s[k] or "").strip() for k in ("fixed", "moving", "fixed_labels", "moving_labels")))

    def _progress(self, fraction: float, message: str) -> None:
        with self.state:
            self.state.progress = round(100 * min(max(fraction, 0.0), 1.0))
            self.state.status = message

    def register(self) -> None:
        """Start a registration as a task of the event loop, so that the page's next messages (Cancel,
        the slider) are handled while it runs (trame answers one message of a page at a time)."""
        self._registration = asyncio.ensure_future(self._register())

    async def _register(self) -> None:
        """Load the inputs, prepare, compute in the worker thread, write, then the λ sweep (one at a time)."""
        if self.session.busy:
            self.state.error = "a registration is already running; wait for it or press Cancel"
            return
        self.session.busy = True
        self.cancelRequested.clear()
        with self.state:
            self.state.update({"running": True, "error": "", "saved": "", "progress": 0, "status": "loading the inputs"})
        await asyncio.sleep(0)
        start = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            if self.session.loadInputs(self._inputs()):  # a new pair: the previous outputs are gone
                self.state.update({"registered": False, "metric_rows": [], "sweep_png": ""})
                self._showLayers()
                self.slicerApp.display_manager.reset_views()
            request = self.session.prepare(self.state.method, self.state.similarity, self.state.lam,
                                           self.state.spatially_varying)

            def progress(fraction, message):
                loop.call_soon_threadsafe(self._progress, fraction, message)

            computed = await loop.run_in_executor(self.executor, self.session.compute, request, progress,
                                                  self.cancelRequested.is_set)
            self.session.write(request, computed)
            await self._sweep()
            if self.session.canSetLambdaInstantly():
                self.session.setLambda(self.state.lam, self.state.show)  # the slider may have moved meanwhile
            self._showLayers()
            self._refreshResults()
            self.state.update({"registered": True, "progress": 100, "lambda_note": self._lambdaNote(), "error": "",
                               "status": f"registered in {time.perf_counter() - start:.1f} s ({request.method})"})
        except RegistrationCancelled:
            self.state.update({"error": "cancelled: this run wrote nothing", "status": "cancelled"})
        except Exception as error:  # shown on the page; the server keeps serving
            if not isinstance(error, (ValueError, RuntimeError, OSError)):
                traceback.print_exc(file=sys.stderr)
            self.state.update({"error": _one_line(error), "status": "failed"})
        finally:
            self.session.busy = False
            self.state.running = False
            self.state.flush()

    async def _sweep(self) -> None:
        """The λ-sweep rows, one λ at a time with the loop free in between (instant methods only)."""
        if not self.session.canSetLambdaInstantly():
            return
        for index, lam in enumerate(SWEEP_LAMBDAS):
            if self.cancelRequested.is_set():
                break
            self._progress((index + 1) / len(SWEEP_LAMBDAS), f"λ sweep: λ = {lam:g}")
            self.session.sweepStep(lam)
            await asyncio.sleep(0)

    def _lambdaNote(self) -> str:
        if self.session.canSetLambdaInstantly():
            return ""
        return "With 'optimize', a λ change needs a new run: move the slider, then press Register."

    def cancel(self) -> None:
        """Ask the running registration to stop (it ends at its next check, leaving the scene as it was)."""
        if self.session.busy:
            self.cancelRequested.set()
            self.state.status = "cancelling"

    # ------------------------------------------------------------------------------------ λ
    def _onLambda(self, lam, **_) -> None:
        """The slider moved: update the outputs at the last value asked for (latest wins)."""
        if self.session.busy or not self.session.canSetLambdaInstantly():
            return
        self._pendingLambda = float(lam)
        if self._lambdaTask is None or self._lambdaTask.done():
            self._lambdaTask = asyncio.ensure_future(self._applyLambda())

    async def _applyLambda(self) -> None:
        while self._pendingLambda is not None:
            lam, self._pendingLambda = self._pendingLambda, None
            try:
                with self.state:
                    self.session.setLambda(lam, self.state.show)
                    self.state.metric_rows = self.session.metricRows()
                    self.state.status = f"λ = {lam:.2f}"
            except (ValueError, RuntimeError) as error:
                with self.state:
                    self.state.error = _one_line(error)
            await asyncio.sleep(0)  # let newer slider values in; only the latest is applied

    # ------------------------------------------------------------------------------------ save
    def save(self) -> None:
        """Write the outputs at the current λ, scene.mrb and metrics.json into the folder under the data root."""
        if self.session.busy:
            self.state.error = "wait for the registration to finish before saving"
            return
        self.state.update({"error": "", "saved": ""})
        try:
            folder = self.session.save(self.state.save_folder)
        except Exception as error:  # ValueError, OutputFolderError, OutputWriteError ...: one line on the page
            self.state.error = _one_line(error)
            return
        self.state.saved = f"saved into {self.dataRoot.folder.name}/{folder.relative_to(self.dataRoot.folder).as_posix()}"

    def close(self) -> None:
        self.cancelRequested.set()
        self.executor.shutdown(wait=True)
        self.headless.close()
        self._sweepFolder.cleanup()


@contextlib.contextmanager
def _trame_sees_no_arguments():
    """trame reads its own options from ``sys.argv``; ours are parsed already and passed explicitly."""
    saved = sys.argv
    sys.argv = saved[:1]
    try:
        yield
    finally:
        sys.argv = saved


def serve(args) -> int:
    """The ``serve`` command: start the page's server and block until it stops.

    Prints ``learnedreg: serving DATA_ROOT at http://HOST:PORT/`` once it listens (with
    ``--port 0``, a free port).

    Returns:
        0 after the server stopped, 2 for a bad ``--data-root``, ``--device`` or option.
    """
    try:
        root = DataRoot(args.data_root)
        choose_device(args.device)
        if args.iteration_scale <= 0:
            raise ValueError(f"--iteration-scale must be positive, got {args.iteration_scale}")
    except ValueError as error:
        print(f"learnedreg: error: {_one_line(error)}", file=sys.stderr)
        return 2
    host = args.host
    shown = f"[{host}]" if ":" in host else host
    with _quiet_vtk_log(args.verbose):
        app = RegistrationWebApp(root, args.device, args.iteration_scale, args.demo_size, quiet=not args.verbose)

        def announce(**_):
            print(f"learnedreg: serving {root.folder} at http://{shown}:{app.server.port}/", flush=True)

        app.ctrl.on_server_ready.add(announce)
        try:
            with _trame_sees_no_arguments():
                app.server.start(host=host, port=args.port, open_browser=False, show_connection_info=False, timeout=0,
                                 disable_logging=not args.verbose)
        finally:
            app.close()
    return 0


__all__ = ["DEFAULT_SAVE_FOLDER", "LAYOUT_ID", "RegistrationWebApp", "serve"]
