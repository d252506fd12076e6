"""The web app (``learnedreg serve``): its data-root checks, its session on a slicer-core scene, and
the page itself in a real browser.

Three groups:

- **Path safety** (:class:`app.web_paths.DataRoot`) and the **session**
  (:class:`app.web_session.RegistrationSession` on a :class:`app.headless.HeadlessSlicer`) need no
  web extra: they run in every environment.
- **The browser test** starts ``learnedreg serve`` in a subprocess on a free port and drives the
  page in headless Chromium (selenium + Debian's ``chromium`` and ``chromium-driver``): the page
  loads, the demo pair registers with progress shown, the λ slider and the "Show" selector change
  the slice views' pixels, errors appear on the page while the server keeps serving, and Save
  writes the command line's files under the data root. It needs the web environment
  (``bash scripts/setup_env.sh --web``, then ``.venv-web/bin/python -m pytest Testing/test_web_app.py``)
  and skips, saying what is missing, elsewhere; with ``LEARNEDREG_REQUIRE_WEB=1`` it fails instead.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from LearnedRegistrationLib.app.cli import main
from LearnedRegistrationLib.app.outputs import OUTPUT_FILES, SCENE_FILE
from LearnedRegistrationLib.app.web_paths import DataRoot
from LearnedRegistrationLib.engine.grid import ImageGrid

from conftest import blobs

#: Quick registrations: the demo pair at 32³ and a twentieth of the iterations.
DEMO_SIZE, ITERATION_SCALE = 32, 0.05


def write_image(path: Path, shape=(12, 14, 16), value=None, spacing=2.0) -> Path:
    """A small image file (SimpleITK; the shape is (Z, Y, X), or (Y, X) for a 2D image)."""
    rng = np.random.default_rng(len(shape))
    array = rng.random(shape).astype(np.float32) if value is None else np.full(shape, value, np.float32)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((spacing,) * len(shape))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


# ============================================================================================ path safety
@pytest.fixture
def root(tmp_path) -> Path:
    """A data root with an image, a sub-folder, and a file beside it (outside the root)."""
    folder = tmp_path / "root"
    write_image(folder / "fixed.nrrd")
    write_image(folder / "sub" / "moving.nii.gz")
    write_image(tmp_path / "outside.nrrd")
    return folder


def test_data_root_accepts_relative_paths_inside(root):
    data = DataRoot(root)
    assert data.input_file("fixed.nrrd") == (root / "fixed.nrrd").resolve()
    assert data.input_file("sub/moving.nii.gz") == (root / "sub" / "moving.nii.gz").resolve()
    assert data.input_file("./fixed.nrrd") == (root / "fixed.nrrd").resolve()
    assert data.output_folder("results/run 1") == (root / "results" / "run 1").resolve()
    assert data.image_files() == ["fixed.nrrd", "sub/moving.nii.gz"]


@pytest.mark.parametrize("path,expected", [
    ("", "relative to the data root"),
    ("   ", "relative to the data root"),
    ("../outside.nrrd", "'..'"),
    ("sub/../../outside.nrrd", "'..'"),
    ("sub/../fixed.nrrd", "'..'"),  # inside after all, but '..' is refused outright
    ("..", "'..'"),
    ("~/outside.nrrd", "absolute"),
    ("fixed\x00.nrrd", "NUL"),
    ("missing.nrrd", "not a file"),
    ("sub", "not a file"),
])
def test_data_root_refuses_inputs(root, path, expected):
    with pytest.raises(ValueError, match=expected):
        DataRoot(root).input_file(path)


def test_data_root_refuses_absolute_paths_even_inside(root):
    data = DataRoot(root)
    for path in (str(root.parent / "outside.nrrd"), str(root / "fixed.nrrd"), "/etc/passwd"):
        with pytest.raises(ValueError, match="absolute path"):
            data.input_file(path)
        with pytest.raises(ValueError, match="absolute path"):
            data.output_folder(path)


def test_data_root_resolves_links(root):
    (root / "escape.nrrd").symlink_to(root.parent / "outside.nrrd")
    (root / "escape_dir").symlink_to(root.parent, target_is_directory=True)
    (root / "alias.nrrd").symlink_to(root / "fixed.nrrd")
    data = DataRoot(root)
    with pytest.raises(ValueError, match="outside the data root"):
        data.input_file("escape.nrrd")
    with pytest.raises(ValueError, match="outside the data root"):
        data.input_file("escape_dir/outside.nrrd")
    with pytest.raises(ValueError, match="outside the data root"):
        data.output_folder("escape_dir/results")
    assert data.input_file("alias.nrrd") == (root / "fixed.nrrd").resolve()  # a link that stays inside
    assert "escape.nrrd" not in data.image_files() and "alias.nrrd" in data.image_files()


def test_data_root_itself_through_a_link_is_its_real_folder(root):
    link = root.parent / "root_link"
    link.symlink_to(root, target_is_directory=True)
    assert DataRoot(link).folder == root.resolve()
    assert DataRoot(link).input_file("fixed.nrrd") == (root / "fixed.nrrd").resolve()


def test_data_root_output_folder_must_be_a_folder_below_the_root(root):
    data = DataRoot(root)
    for path in (".", "./", "./."):
        with pytest.raises(ValueError, match="not into the data root itself"):
            data.output_folder(path)
    with pytest.raises(ValueError, match="is a file"):
        data.output_folder("fixed.nrrd")
    with pytest.raises(ValueError, match="'..'"):
        data.output_folder("../results")


def test_data_root_must_exist(tmp_path):
    with pytest.raises(ValueError, match="--data-root"):
        DataRoot(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="--data-root"):
        DataRoot(tmp_path / "file")


def test_data_root_reads_single_file_formats_only(root):
    """A header that names another data file could read any file on the machine: refused."""
    data = DataRoot(root)
    raw = root.parent / "secret.raw"
    raw.write_bytes(bytes(8))
    (root / "detached.nrrd").write_text(
        f"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 2 2 2\nencoding: raw\ndata file: {raw}\n\n")
    (root / "detached.mha").write_text(
        f"ObjectType = Image\nNDims = 3\nDimSize = 2 2 2\nElementType = MET_UCHAR\nElementDataFile = {raw}\n")
    (root / "header.nhdr").write_text("NRRD0004\ntype: uint8\ndimension: 3\nsizes: 2 2 2\nencoding: raw\ndata file: x.raw\n\n")
    (root / "notes.txt").write_text("not an image")
    for name in ("detached.nrrd", "detached.mha"):
        with pytest.raises(ValueError, match="separate data file"):
            data.input_file(name)
    for name in ("header.nhdr", "notes.txt"):
        with pytest.raises(ValueError, match="single-file formats"):
            data.input_file(name)
    write_image(root / "attached.mha")  # SimpleITK writes ElementDataFile = LOCAL
    assert data.input_file("attached.mha") == (root / "attached.mha").resolve()
    assert "header.nhdr" not in data.image_files() and "notes.txt" not in data.image_files()


def test_data_root_skips_hidden_entries(root):
    write_image(root / ".hidden" / "staged.nrrd")
    write_image(root / ".dot.nrrd")
    assert DataRoot(root).image_files() == ["fixed.nrrd", "sub/moving.nii.gz"]
    assert len(DataRoot(root).image_files(limit=1)) == 1


# ============================================================================================ headless adoption
def test_headless_slicer_adopts_a_scene_and_its_logics(tmp_path):
    """The web app's scene is trame-slicer's: HeadlessSlicer uses its logics instead of making new ones."""
    import slicer

    from LearnedRegistrationLib.app.headless import HeadlessSlicer

    scene = slicer.vtkMRMLScene()
    applicationLogic = slicer.vtkSlicerApplicationLogic()
    applicationLogic.SetMRMLScene(scene)
    volumesLogic = slicer.vtkSlicerVolumesLogic()
    volumesLogic.SetMRMLApplicationLogic(applicationLogic)
    volumesLogic.SetMRMLScene(scene)
    applicationLogic.SetModuleLogic("Volumes", volumesLogic)

    adopted = HeadlessSlicer(cacheDirectory=tmp_path / "cache", scene=scene, applicationLogic=applicationLogic)
    assert adopted.scene is scene and adopted.applicationLogic is applicationLogic
    assert adopted.volumesLogic is volumesLogic  # the application's, not a second one
    assert applicationLogic.GetModuleLogic("Transforms") is adopted.transformLogic  # a missing one is registered
    assert scene.GetDataIOManager() is not None
    node = adopted.loadVolume(write_image(tmp_path / "image.nrrd"), "image")
    assert node.GetScene() is scene
    adopted.close()
    assert scene.GetNodeByID(node.GetID()) is not None  # the application's scene is left as it is

    with pytest.raises(ValueError, match="give both"):
        HeadlessSlicer(scene=scene)
    with pytest.raises(ValueError, match="application logic of 'scene'"):
        HeadlessSlicer(scene=slicer.vtkMRMLScene(), applicationLogic=applicationLogic)


def test_headless_slicer_adopts_trame_slicers_scene(tmp_path):
    """In the web environment: the logics HeadlessSlicer loads with are SlicerApp's own."""
    if importlib.util.find_spec("trame_slicer") is None:
        pytest.skip("needs the web extra (bash scripts/setup_env.sh --web): trame-slicer's SlicerApp")
    from trame_slicer.core import SlicerApp

    from LearnedRegistrationLib.app.headless import HeadlessSlicer

    app = SlicerApp()
    adopted = HeadlessSlicer(cacheDirectory=tmp_path / "cache", scene=app.scene, applicationLogic=app.app_logic)
    assert adopted.volumesLogic is app.volumes_logic and adopted.segmentationsLogic is app.segmentations_logic
    assert adopted.colorLogic is app.color_logic
    assert adopted.markupsLogic is app.app_logic.GetModuleLogic("Markups")
    assert adopted.remoteIOLogic is None  # trame-slicer's IO manager already serves the scene
    node = adopted.loadVolume(write_image(tmp_path / "image.nrrd"), "image")
    assert app.scene.GetNodeByID(node.GetID()) is node
    adopted.close()
    assert app.scene.GetNodeByID(node.GetID()) is node


# ============================================================================================ session
@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """A session on a headless scene with the demo pair registered by the λ path."""
    from LearnedRegistrationLib.app.headless import HeadlessSlicer
    from LearnedRegistrationLib.app.web_session import Inputs, RegistrationSession

    folder = tmp_path_factory.mktemp("web-session")
    write_image(folder / "flat.nrrd", shape=(20, 24))
    write_image(folder / "moving.nrrd")
    write_image(folder.parent / f"{folder.name}-outside.nrrd")
    app = HeadlessSlicer(cacheDirectory=folder.parent / f"{folder.name}-cache", quiet=True)
    session = RegistrationSession(app, DataRoot(folder), iterationScale=ITERATION_SCALE, demoSize=DEMO_SIZE)
    assert session.loadInputs(Inputs(demo=True))
    assert not session.loadInputs(Inputs(demo=True))  # the same inputs: nothing reloaded
    request = session.prepare("path", "mse", 0.25, False)
    session.write(request, session.compute(request))
    yield session
    app.close()


def test_session_layers_follow_the_show_selector(session):
    from LearnedRegistrationLib.app.web_session import Layers

    outputs = session.outputs
    fixed = session._nodes["fixedVolumeNode"].GetID()
    assert session.layers("overlay") == Layers(fixed, outputs.warpedVolumeNode.GetID(), 0.5)
    assert session.layers("checkerboard").background == outputs.checkerboardVolumeNode.GetID()
    assert session.layers("difference").background == outputs.differenceVolumeNode.GetID()
    jacobian = session.layers("jacobian")
    assert jacobian.background == outputs.jacobianVolumeNode.GetID() and jacobian.foreground is None
    assert session.layers("lambda").background == outputs.lambdaMapVolumeNode.GetID()
    # Jacobian: a diverging colour table centred at det J = 1
    display = outputs.jacobianVolumeNode.GetDisplayNode()
    assert display.GetLevel() == pytest.approx(1.0) and display.GetWindow() == pytest.approx(2.0)
    assert display.GetColorNodeID() == "vtkMRMLColorTableNodeFileDivergingBlueRed.txt"
    table = display.GetColorNode().GetLookupTable()
    low, middle, high = (np.array(table.GetTableValue(i)[:3]) for i in (0, table.GetNumberOfTableValues() // 2, table.GetNumberOfTableValues() - 1))
    assert low[2] > low[0] + 0.4 and high[0] > high[2] + 0.4  # blue below det J = 1, red above
    assert np.ptp(middle) < 0.05 and middle.min() > 0.8  # a neutral light grey at 1
    with pytest.raises(ValueError, match="unknown display"):
        session.layers("3d")


def test_session_lambda_updates_the_same_nodes_and_the_table(session):
    from LearnedRegistrationLib.bridge import mrml

    node = session.outputs.warpedVolumeNode
    before = mrml.arrayFromVolumeNode(node)[0].copy()
    rows = {row["name"]: row["value"] for row in session.metricRows()}
    assert rows["λ"] == "0.25" and "Dice (mean)" in rows and "Displacement error (mm)" in rows
    session.setLambda(1.0, "overlay")
    assert session.outputs.warpedVolumeNode is node
    assert np.abs(mrml.arrayFromVolumeNode(node)[0] - before).max() > 1e-3
    assert {row["name"]: row["value"] for row in session.metricRows()}["λ"] == "1.00"
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        session.setLambda(1.5)
    session.setLambda(0.25)


def test_session_refuses_bad_inputs_and_keeps_the_pair(session):
    from LearnedRegistrationLib.app.web_session import Inputs

    loaded = dict(session._nodes)
    for inputs, expected in (
        (Inputs(False, "flat.nrrd", "moving.nrrd"), "3D"),
        (Inputs(False, f"../{session.dataRoot.folder.name}-outside.nrrd", "moving.nrrd"), "'..'"),
        (Inputs(False, "moving.nrrd", ""), "fixed and a moving image"),
        (Inputs(False, "moving.nrrd", "moving.nrrd", "moving.nrrd", ""), "both label maps"),
    ):
        with pytest.raises(ValueError, match=expected):
            session.loadInputs(inputs)
    assert session._nodes == loaded and session.outputs is not None  # a refused input changes nothing


def test_session_save_writes_the_command_line_files(session):
    from LearnedRegistrationLib.app.web_session import SWEEP_LAMBDAS

    for lam in SWEEP_LAMBDAS:
        session.sweepStep(lam)
    session.setLambda(0.4)
    folder = session.save("results/run 1")
    assert folder == session.dataRoot.folder / "results" / "run 1"
    written = {p.name for p in folder.iterdir()}
    expected = {*(name for name in OUTPUT_FILES.values()), SCENE_FILE, "metrics.json", "lambda_sweep.json",
                "lambda_sweep.png", "true_displacement.nrrd"}
    assert written == expected
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["lambda"] == pytest.approx(0.4) and metrics["method"] == "path"
    assert [row["lambda"] for row in metrics["lambda_sweep"]] == pytest.approx(list(SWEEP_LAMBDAS))
    assert set(metrics["output_files"]) == expected - {"metrics.json"}
    assert "displacement_error_mean_mm" in metrics
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no staging folder left
    for bad, expected_message in (("../escape", "'..'"), (".", "data root itself"), ("moving.nrrd", "is a file")):
        with pytest.raises(ValueError, match=expected_message):
            session.save(bad)
    assert not (session.dataRoot.folder.parent / "escape").exists()


def test_serve_without_the_web_extra_says_how_to_get_it(capsys, tmp_path):
    if importlib.util.find_spec("trame_slicer") is not None:
        pytest.skip("the web extra is installed here (this checks the message given without it)")
    assert main(["serve", "--data-root", str(tmp_path)]) == 2
    assert "setup_env.sh --web" in capsys.readouterr().err


# ============================================================================================ the browser
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


def _missing_for_the_browser_test() -> str:
    missing = [name for name in ("trame_slicer", "selenium", "PIL") if importlib.util.find_spec(name) is None]
    reasons = [f"Python packages {', '.join(missing)} (bash scripts/setup_env.sh --web)"] if missing else []
    reasons += [f"{path} (apt-get install chromium chromium-driver)" for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    return "; ".join(reasons)


@pytest.fixture(scope="module")
def browser_root(tmp_path_factory):
    missing = _missing_for_the_browser_test()
    if missing:
        message = f"the browser test needs the web environment; missing: {missing}"
        if os.environ.get("LEARNEDREG_REQUIRE_WEB") == "1":
            pytest.fail(f"LEARNEDREG_REQUIRE_WEB=1 but {message}")
        pytest.skip(message)
    folder = tmp_path_factory.mktemp("web") / "root"
    write_image(folder / "flat.nrrd", shape=(20, 24))
    write_image(folder / "moving.nrrd")
    write_image(folder.parent / "outside.nrrd")
    return folder


@pytest.fixture(scope="module")
def server(browser_root):
    """``learnedreg serve`` in a subprocess on a free port; yields (url, process)."""
    log = open(browser_root.parent / "server.log", "w+")  # closed at teardown
    process = subprocess.Popen(
        [sys.executable, "-m", "LearnedRegistrationLib.app.cli", "serve", "--data-root", str(browser_root),
         "--port", "0", "--demo-size", str(DEMO_SIZE), "--iteration-scale", str(ITERATION_SCALE)],
        stdout=subprocess.PIPE, stderr=log, text=True,
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    url, deadline = None, time.monotonic() + 90
    while url is None and time.monotonic() < deadline and process.poll() is None:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            continue
        if "serving" in line and "http://" in line:
            url = line.split(" at ", 1)[1].strip()
    if url is None:
        process.kill()
        log.seek(0)
        pytest.fail(f"the server did not start: {log.read()[-3000:]}")
    assert url.startswith("http://127.0.0.1:"), url  # the safe default: this machine only
    yield url, process
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    log.close()


@pytest.fixture(scope="module")
def page(server):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1600,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.get(server[0])
    yield driver
    driver.quit()


def _wait(condition, timeout=60.0, what="the page"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _by_id(driver, name):
    from selenium.webdriver.common.by import By

    found = driver.find_elements(By.ID, name)
    return found[0] if found else None


def _text(driver, name) -> str:
    element = _by_id(driver, name)
    return element.text if element is not None else ""


def _views(driver) -> np.ndarray:
    """The three slice views as the browser shows them, once two screenshots 0.5 s apart agree."""
    from PIL import Image

    def shot():
        return np.asarray(Image.open(io.BytesIO(_by_id(driver, "views").screenshot_as_png)).convert("RGB"), dtype=np.int16)

    previous = shot()
    for _ in range(40):
        time.sleep(0.5)
        current = shot()
        if np.array_equal(current, previous):
            return current
        previous = current
    return previous


def _type(driver, name, text):
    from selenium.webdriver.common.keys import Keys

    field = _by_id(driver, name)
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(Keys.DELETE)
    field.send_keys(text, Keys.TAB)


def _lambda_thumb(driver):
    return driver.find_element("css selector", "#lambda [role='slider']")


def _register(driver, timeout=120.0) -> list:
    """Click Register and follow the status line and progress bar until the run ends; returns what was seen."""
    _by_id(driver, "register").click()
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = _text(driver, "status")
        progress = _by_id(driver, "progress").get_attribute("aria-valuenow")
        seen.append((status, float(progress or 0)))
        if status.startswith(("registered", "failed", "cancelled")):
            return seen
        time.sleep(0.05)
    raise AssertionError(f"the registration did not end within {timeout} s: {seen[-5:]}")


@pytest.fixture(scope="module")
def registered(page):
    """The demo pair registered through the page (λ path); yields what the status line and progress bar showed."""
    _wait(lambda: _by_id(page, "register"), what="the Register button")
    before = _views(page)
    seen = _register(page)
    return {"seen": seen, "before": before}


def test_page_loads_with_three_slice_views_and_the_controls(page):
    _wait(lambda: _by_id(page, "register"), what="the Register button")
    for name in ("cancel", "lambda", "show", "method", "similarity", "spatially-varying", "save", "metrics"):
        assert _by_id(page, name) is not None, name
    assert "data root" in _text(page, "data-root")
    views = _views(page)
    assert views.shape[0] > 100 and views.shape[1] > 300


def test_demo_pair_registers_with_progress_shown(page, registered):
    statuses = [status for status, _ in registered["seen"]]
    assert statuses[-1].startswith("registered"), statuses[-5:]
    assert any(0 < progress < 100 for _, progress in registered["seen"]), "no progress between 0 and 100 % was shown"
    assert any("deformable" in s or "affine" in s or "λ" in s for s in statuses), set(statuses)
    table = _text(page, "metrics")
    assert "Dice (mean)" in table and "Displacement error (mm)" in table and "λ 0.25" in table
    assert _by_id(page, "sweep-plot") is not None  # the λ path gives the sweep plot
    assert np.abs(_views(page) - registered["before"]).mean() > 0.5  # the warped image is shown now


def test_lambda_slider_changes_the_slice_views(page, registered):
    from selenium.webdriver.common.keys import Keys

    before = _views(page)
    _lambda_thumb(page).send_keys(Keys.END)  # λ = 1: no deformation
    _wait(lambda: _text(page, "status") == "λ = 1.00", timeout=30, what="the λ update")
    after = _views(page)
    difference = np.abs(after - before)
    assert difference.mean() > 0.5 and difference.max() > 40, (difference.mean(), difference.max())
    assert "λ 1.00" in _text(page, "metrics")


def test_show_jacobian_changes_the_slice_views(page, registered):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    before = _views(page)
    _by_id(page, "show").find_element(By.XPATH, "..").click()  # the select's field opens its menu
    item = _wait(lambda: [e for e in page.find_elements(By.CSS_SELECTOR, ".v-list-item") if e.text == "Jacobian determinant"],
                 what="the Jacobian item")
    item[0].click()
    _lambda_thumb(page).send_keys(Keys.HOME)  # λ = 0: the most deformation, det J away from 1
    _wait(lambda: _text(page, "status") == "λ = 0.00", timeout=30, what="the λ update")
    after = _views(page)
    assert np.abs(after - before).mean() > 2.0
    red, blue = after[..., 0], after[..., 2]
    assert ((red - blue) > 40).mean() > 0.005 and ((blue - red) > 40).mean() > 0.005  # diverging: red and blue


def test_errors_show_on_the_page_and_the_server_keeps_serving(page, registered, browser_root):
    page.find_element("css selector", "#source-files").click()
    _wait(lambda: _by_id(page, "input-fixed"), what="the file fields")
    _type(page, "input-fixed", "flat.nrrd")
    _type(page, "input-moving", "moving.nrrd")
    assert _register(page)[-1][0] == "failed"
    assert "3D" in _text(page, "error") and "flat.nrrd" in _text(page, "error")
    _type(page, "input-fixed", "../outside.nrrd")
    assert _register(page)[-1][0] == "failed"
    assert "'..'" in _text(page, "error")
    # still serving: the registered pair is still there and answers the slider
    from selenium.webdriver.common.keys import Keys

    page.find_element("css selector", "#source-demo").click()
    _lambda_thumb(page).send_keys(Keys.PAGE_UP)
    _wait(lambda: _text(page, "status") == "λ = 0.10", timeout=30, what="the λ update after the errors")


def test_save_writes_the_files_under_the_data_root(page, registered, browser_root):
    _type(page, "save-folder", "../escape")
    _by_id(page, "save").click()
    _wait(lambda: "'..'" in _text(page, "error"), what="the refused folder")
    assert not (browser_root.parent / "escape").exists()
    _type(page, "save-folder", "results/web run")
    _by_id(page, "save").click()
    _wait(lambda: _text(page, "saved").startswith("saved into"), timeout=60, what="the save")
    folder = browser_root / "results" / "web run"
    written = {p.name for p in folder.iterdir()}
    assert {*OUTPUT_FILES.values(), SCENE_FILE, "metrics.json", "lambda_sweep.json", "lambda_sweep.png"} <= written
    metrics = json.loads((folder / "metrics.json").read_text())
    slider = float(_lambda_thumb(page).get_attribute("aria-valuenow"))
    assert metrics["lambda"] == pytest.approx(slider) and metrics["method"] == "path"
    shutil.rmtree(folder)


def test_cancel_stops_a_run_and_the_server_keeps_serving(page, registered, browser_root):
    """Last: a new pair (64³ blobs, a few seconds to register) replaces the demo's outputs, then Cancel."""
    grid = ImageGrid((64, 64, 64), (2.0, 2.0, 2.0), np.zeros(3), np.diag([-1.0, -1.0, 1.0]))
    for name, shift in (("blobs_fixed.nrrd", (0.0, 0.0, 0.0)), ("blobs_moving.nrrd", (4.0, -3.0, 2.0))):
        image = sitk.GetImageFromArray(blobs(grid, shift))
        image.SetSpacing((2.0, 2.0, 2.0))
        sitk.WriteImage(image, str(browser_root / name))
    page.find_element("css selector", "#source-files").click()
    _wait(lambda: _by_id(page, "input-fixed"), what="the file fields")
    _type(page, "input-fixed", "blobs_fixed.nrrd")
    _type(page, "input-moving", "blobs_moving.nrrd")
    _by_id(page, "register").click()
    _wait(lambda: _by_id(page, "cancel").is_enabled(), timeout=30, what="the Cancel button")
    _by_id(page, "cancel").click()
    _wait(lambda: _text(page, "status") in ("cancelled", "failed") or _text(page, "status").startswith("registered"),
          timeout=60, what="the end of the cancelled run")
    assert _text(page, "status") == "cancelled" and "cancelled" in _text(page, "error")
    assert _by_id(page, "register").is_enabled() and not _by_id(page, "save").is_enabled()
    assert _text(page, "metrics") == ""  # nothing registered for this pair
    page.get(page.current_url)  # and the server still serves the page
    _wait(lambda: _by_id(page, "register"), what="the page after the cancelled run")
