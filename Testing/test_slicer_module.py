"""Static checks of the Slicer module: .ui, parameter-node bindings, packaging, Python versions.

The desktop application is not available here (slicer-core has no qt, ctk, ScriptedLoadableModule
or parameterNodeWrapper), so the module file is read with ``ast`` and the .ui with ElementTree.
"""

import ast
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "LearnedRegistration"
MODULE_FILE = MODULE_DIR / "LearnedRegistration.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "LearnedRegistration.ui"
MODULE_CMAKE = MODULE_DIR / "CMakeLists.txt"
TOP_CMAKE = ROOT / "CMakeLists.txt"
EXTENSION_JSON = ROOT / "LearnedRegistration.json"

#: Widget classes parameterNodeWrapper's GUI connectors accept for each kind of field
#: (Slicer Base/Python/slicer/parameterNodeWrapper/guiConnectors.py, canRepresent()).
WIDGETS_FOR_KIND = {
    "node": {"qMRMLNodeComboBox"},
    "bool": {"QCheckBox", "ctkCheckBox", "QPushButton", "ctkCheckablePushButton"},
    "float": {"QDoubleSpinBox", "ctkSliderWidget", "qMRMLSliderWidget", "ctkDoubleSlider", "ctkDoubleSpinBox",
              "qMRMLSpinBox"},
    "int": {"QSpinBox", "QSlider"},
    "enum": {"QComboBox", "ctkComboBox"},
}

#: Naming convention of the .ui: name suffix -> widget classes it may have.
SUFFIX_CLASSES = (
    ("CollapsibleButton", {"ctkCollapsibleButton"}),
    ("Button", {"QPushButton"}),
    ("Selector", {"qMRMLNodeComboBox"}),
    ("ComboBox", {"QComboBox", "ctkComboBox"}),
    ("SliderWidget", {"ctkSliderWidget"}),
    ("CheckBox", {"QCheckBox", "ctkCheckBox"}),
    ("SpinBox", {"QSpinBox", "QDoubleSpinBox", "ctkDoubleSpinBox"}),
    ("TableWidget", {"QTableWidget"}),
    ("ProgressBar", {"QProgressBar"}),
    ("Label", {"QLabel"}),
)


def _expectedClasses(name):
    for suffix, classes in SUFFIX_CLASSES:
        if name.endswith(suffix) or name == suffix[0].lower() + suffix[1:]:
            return classes
    return None


# --------------------------------------------------------------------------------------------- .ui


@pytest.fixture(scope="module")
def ui():
    """Parsed .ui: root element, {name: (class, {property: value})}."""
    tree = ElementTree.parse(UI_FILE)
    root = tree.getroot()
    widgets = {}
    for widget in root.iter("widget"):
        properties = {}
        for prop in widget.findall("property"):
            value = prop[0]
            if value.tag == "stringlist":
                properties[prop.get("name")] = [s.text for s in value.findall("string")]
            else:
                properties[prop.get("name")] = value.text
        name = widget.get("name")
        assert name not in widgets, f"duplicate widget name {name} in the .ui"
        widgets[name] = (widget.get("class"), properties)
    return root, widgets


def test_ui_root_and_naming(ui):
    root, widgets = ui
    assert root.tag == "ui" and root.findtext("class") == "LearnedRegistration"
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == "LearnedRegistration"
    for name, (cls, _) in widgets.items():
        if name == "LearnedRegistration":
            continue
        expected = _expectedClasses(name)
        assert expected is not None, f"widget '{name}' ({cls}) does not follow the naming convention"
        assert cls in expected, f"widget '{name}' is a {cls}, its name says one of {sorted(expected)}"
    custom = {c.findtext("class") for c in root.iter("customwidget")}
    used = {cls for cls, _ in widgets.values()}
    assert {c for c in used if c.startswith(("ctk", "qMRML"))} <= custom, "Slicer widgets must be declared"


def test_every_control_has_a_tooltip(ui):
    _, widgets = ui
    missing = [name for name, (cls, props) in widgets.items()
               if name != "LearnedRegistration" and (cls != "QLabel" or name == "statusLabel")
               and not (props.get("toolTip") or "").strip()]
    assert not missing, f"controls without a toolTip: {missing}"


def test_sections_and_actions_exist(ui):
    _, widgets = ui
    sections = {props.get("text") for cls, props in widgets.values() if cls == "ctkCollapsibleButton"}
    assert sections == {"Inputs", "Registration", "Outputs", "Evaluation", "Advanced"}
    assert widgets["advancedCollapsibleButton"][1].get("collapsed") == "true"
    for name, cls in (("applyButton", "QPushButton"), ("cancelButton", "QPushButton"),
                      ("progressBar", "QProgressBar"), ("statusLabel", "QLabel"),
                      ("metricsTableWidget", "QTableWidget"), ("sweepButton", "QPushButton")):
        assert widgets[name][0] == cls
    assert widgets["cancelButton"][1].get("enabled") == "false"
    slider = widgets["regularizationWeightSliderWidget"][1]
    assert (float(slider["minimum"]), float(slider["maximum"])) == (0.0, 1.0)


def test_node_combo_boxes_get_the_scene(ui):
    root, widgets = ui
    connected = {
        c.findtext("receiver") for c in root.iter("connection")
        if c.findtext("sender") == "LearnedRegistration" and c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
        and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"
    }
    combos = {name for name, (cls, _) in widgets.items() if cls == "qMRMLNodeComboBox"}
    assert combos and combos == connected
    for connection in root.iter("connection"):
        assert connection.findtext("receiver") in widgets and connection.findtext("sender") in widgets


# ----------------------------------------------------------------------------------------- module


@pytest.fixture(scope="module")
def moduleTree():
    return ast.parse(MODULE_FILE.read_text(encoding="utf-8"), filename=str(MODULE_FILE))


def _classDef(tree, name):
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node
    raise AssertionError(f"class {name} not found in {MODULE_FILE.name}")


def _enumNames(tree):
    return {node.name for node in tree.body if isinstance(node, ast.ClassDef)
            and any(ast.unparse(base) == "enum.Enum" for base in node.bases)}


def _moduleAliases(tree):
    """Module-level ``Name = <type expression>`` assignments (type aliases), unparsed."""
    aliases = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            aliases[node.targets[0].id] = ast.unparse(node.value)
    return aliases


@pytest.fixture(scope="module")
def parameterFields(moduleTree):
    """{field: (annotation source with aliases expanded, default AST or None)} of the parameter node."""
    cls = _classDef(moduleTree, "LearnedRegistrationParameterNode")
    assert any(ast.unparse(d) == "parameterNodeWrapper" for d in cls.decorator_list)
    aliases = _moduleAliases(moduleTree)
    fields = {}
    for statement in cls.body:
        if isinstance(statement, ast.AnnAssign):
            annotation = ast.unparse(statement.annotation)
            annotation = aliases.get(annotation, annotation)
            fields[statement.target.id] = (annotation, statement.value)
    return fields


def _kind(annotation, enums):
    if "vtkMRML" in annotation:
        return "node"
    if annotation in enums:
        return "enum"
    if annotation == "bool":
        return "bool"
    if re.match(r"Annotated\[float\b", annotation) or annotation == "float":
        return "float"
    if re.match(r"Annotated\[int\b", annotation) or annotation == "int":
        return "int"
    raise AssertionError(f"no GUI connector for annotation {annotation}")


def test_parameter_node_has_the_required_fields(parameterFields):
    required = {
        "fixedVolume", "movingVolume", "fixedMask", "fixedSegmentation", "movingSegmentation", "fixedLandmarks",
        "movingLandmarks", "method", "similarity", "regularizationWeight", "spatiallyVarying", "device",
        "iterationScale", "workingSpacingMm", "warpedVolume", "displacementVolume", "transform",
        "checkerboardVolume", "differenceVolume", "jacobianVolume", "lambdaMapVolume", "warpedSegmentation",
    }
    assert required <= set(parameterFields)
    assert parameterFields["regularizationWeight"][0] == "Annotated[float, WithinRange(0.0, 1.0)]"
    assert parameterFields["displacementVolume"][0] == "vtkMRMLVectorVolumeNode"
    assert parameterFields["transform"][0] == "vtkMRMLGridTransformNode"


def test_every_field_is_bound_to_one_compatible_widget(ui, moduleTree, parameterFields):
    _, widgets = ui
    enums = _enumNames(moduleTree)
    bound = {}
    for name, (cls, props) in widgets.items():
        parameterName = props.get("SlicerParameterName")
        if parameterName is None:
            continue
        assert parameterName in parameterFields, f"widget '{name}' binds unknown parameter '{parameterName}'"
        assert parameterName not in bound, f"'{parameterName}' is bound twice ({bound.get(parameterName)}, {name})"
        bound[parameterName] = name
        annotation, _ = parameterFields[parameterName]
        kind = _kind(annotation, enums)
        assert cls in WIDGETS_FOR_KIND[kind], f"'{parameterName}' ({annotation}) cannot bind to a {cls}"
        if cls in ("ctkSliderWidget", "qMRMLSliderWidget"):
            assert "WithinRange" in annotation, f"a slider needs a bounded field, '{parameterName}' is {annotation}"
        if kind == "node":
            nodeTypes = set(re.findall(r"vtkMRML\w+", annotation))
            assert set(props.get("nodeTypes") or []) == nodeTypes, f"nodeTypes of '{name}' differ from {annotation}"
        bounds = re.search(r"WithinRange\(([-\d.]+), ([-\d.]+)\)", annotation)
        if bounds and "minimum" in props:
            assert (float(props["minimum"]), float(props["maximum"])) == tuple(map(float, bounds.groups())), name
    assert set(bound) == set(parameterFields), f"fields without a widget: {set(parameterFields) - set(bound)}"


def test_defaults_are_valid(moduleTree, parameterFields):
    from LearnedRegistrationLib.engine import common

    constants = {k: v for k, v in _moduleAliases(moduleTree).items()}
    for name, (annotation, default) in parameterFields.items():
        bounds = re.search(r"WithinRange\(([-\d.]+), ([-\d.]+)\)", annotation)
        if bounds and default is not None:
            source = ast.unparse(default)
            # a literal, a module constant, or a constant imported from the engine
            value = float(getattr(common, source)) if hasattr(common, source) else float(constants.get(source, source))
            low, high = map(float, bounds.groups())
            assert low <= value <= high, f"default of {name} ({value}) outside [{low}, {high}]"
    # The panel's default λ is the engine's, imported from its one home.
    assert ast.unparse(parameterFields["regularizationWeight"][1]) == "DEFAULT_LAMBDA"


def test_enums_match_the_engine(moduleTree):
    from LearnedRegistrationLib.engine import common

    def values(className):
        cls = _classDef(moduleTree, className)
        return [ast.literal_eval(s.value) for s in cls.body
                if isinstance(s, ast.Assign) and isinstance(s.value, ast.Constant)]

    assert sorted(values("Similarity")) == sorted(common.SIMILARITIES)
    assert values("Similarity")[0] == "lncc"  # the default (first member)
    assert "optimize" in values("RegistrationMethod")
    assert values("ComputeDevice") == ["auto", "cpu", "cuda"]
    assert set(values("DisplayedOutput")) == {"warped", "checkerboard", "difference", "jacobian", "lambdaMap"}


def test_output_selectors_create_new_nodes(ui, moduleTree):
    _, widgets = ui
    outputFields = set(ast.literal_eval(_moduleLiteral(moduleTree, "OUTPUT_FIELDS"))) | {"sweepTable", "sweepChart"}
    for name, (_cls, props) in widgets.items():
        if props.get("SlicerParameterName") in outputFields:
            for option in ("noneEnabled", "addEnabled", "renameEnabled"):
                assert props.get(option) == "true", f"output selector '{name}' needs {option}"


def _moduleLiteral(tree, name):
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name) and node.targets[0].id == name:
            return node.value
    raise AssertionError(f"{name} not found")


def test_output_fields_cover_the_logic_outputs(moduleTree, parameterFields):
    from dataclasses import fields

    from LearnedRegistrationLib.bridge.logic import RegistrationOutputNodes

    mapping = ast.literal_eval(_moduleLiteral(moduleTree, "OUTPUT_FIELDS"))
    nodeAttributes = {f.name for f in fields(RegistrationOutputNodes) if f.name != "metrics"}
    assert set(mapping.values()) == nodeAttributes
    assert set(mapping) <= set(parameterFields)


def test_widget_references_exist_in_the_ui(ui, moduleTree):
    _, widgets = ui
    referenced = set()
    for node in ast.walk(moduleTree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui"
                and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"):
            referenced.add(node.attr)
    assert {"applyButton", "cancelButton", "progressBar", "statusLabel", "metricsTableWidget"} <= referenced
    for name in referenced:
        assert name in widgets, f"the module uses self.ui.{name}, which is not in the .ui"
        expected = _expectedClasses(name)
        assert widgets[name][0] in expected, f"self.ui.{name} is a {widgets[name][0]}, expected {sorted(expected)}"


def test_actions_read_the_parameter_node_not_widget_values(moduleTree):
    # "Actions read the wrapper, never the widgets": no self.ui.X.value / .checked / currentNode().
    for node in ast.walk(moduleTree):
        if isinstance(node, ast.Attribute) and node.attr in ("value", "checked", "currentNode", "currentIndex"):
            inner = node.value
            if isinstance(inner, ast.Attribute) and isinstance(inner.value, ast.Attribute) and inner.value.attr == "ui":
                assert inner.attr == "progressBar", f"self.ui.{inner.attr}.{node.attr} reads a widget"


def test_module_description(moduleTree):
    source = MODULE_FILE.read_text(encoding="utf-8")
    for text in ("Learned Registration", "Registration", "RAS", "LPS", "from parent", "HyperMorph", "Hoopes",
                 "IPMI 2021", "SynthMorph", "Hoffmann", "TMI 2022", "Chen et al", "spatially varying"):
        assert text in source, f"module description lacks '{text}'"
    for leftover in ("TemplateKey", "TODO", "John Doe", "AnyWare", "This is an example"):
        for path in (MODULE_FILE, UI_FILE, MODULE_CMAKE, TOP_CMAKE):
            assert leftover not in path.read_text(encoding="utf-8"), f"template text '{leftover}' in {path.name}"
    for className in ("LearnedRegistration", "LearnedRegistrationWidget", "LearnedRegistrationLogic",
                      "LearnedRegistrationTest"):
        assert ast.get_docstring(_classDef(moduleTree, className)), f"{className} needs a docstring"
    logic = _classDef(moduleTree, "LearnedRegistrationLogic")
    assert {ast.unparse(b) for b in logic.bases} == {"ScriptedLoadableModuleLogic",
                                                      "registrationLogic.RegistrationLogic"}
    assert any(isinstance(f, ast.FunctionDef) and f.name == "registerUsingParameterNode" for f in logic.body)


def test_nothing_heavy_or_qt_at_import():
    # The module must load without torch (to offer installing it); tasks.py must not use Qt/MRML.
    def topLevelImports(path):
        names = set()
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module.split(".")[0])
        return names

    assert "torch" not in topLevelImports(MODULE_FILE)
    assert not {"torch", "qt", "ctk", "vtk", "slicer"} & topLevelImports(MODULE_DIR / "LearnedRegistrationLib" / "bridge" / "tasks.py")
    logicImports = topLevelImports(MODULE_DIR / "LearnedRegistrationLib" / "bridge" / "logic.py")
    assert "torch" not in logicImports and "optimize" not in logicImports
    source = MODULE_FILE.read_text(encoding="utf-8")
    assert "pip_install" not in source and "installTorch(askConfirmation=True)" in source
    assert "PyTorch" in source


def test_icon_is_a_128_png():
    for path in (MODULE_DIR / "Resources" / "Icons" / "LearnedRegistration.png",
                 ROOT / "Resources" / "Icons" / "LearnedRegistration.png"):
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
        assert struct.unpack(">II", data[16:24]) == (128, 128)


# --------------------------------------------------------------------------------------- packaging


def _cmakeList(text, variable):
    match = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)
    assert match, f"{variable} not set"
    return [item for item in match.group(1).split() if not item.startswith("#")]


def test_module_cmake_lists_every_file():
    text = MODULE_CMAKE.read_text(encoding="utf-8")
    moduleName = re.search(r"set\(MODULE_NAME (\w+)\)", text).group(1)
    assert moduleName == "LearnedRegistration"

    def expand(items):
        return {item.replace("${MODULE_NAME}", moduleName) for item in items}

    scripts = expand(_cmakeList(text, "MODULE_PYTHON_SCRIPTS"))
    resources = expand(_cmakeList(text, "MODULE_PYTHON_RESOURCES"))
    onDisk = {str(p.relative_to(MODULE_DIR)) for p in MODULE_DIR.glob("*.py")}
    # Every module of the library except the training package (scripts/train.py) and the web app
    # (app/web*.py, `learnedreg serve` with the web extra), which Slicer does not need.
    onDisk |= {str(p.relative_to(MODULE_DIR)) for p in (MODULE_DIR / "LearnedRegistrationLib").rglob("*.py")
               if "__pycache__" not in p.parts and "training" not in p.parts
               and not (p.parent.name == "app" and p.name.startswith("web"))}
    assert scripts == onDisk, f"not listed: {sorted(onDisk - scripts)}; listed but missing: {sorted(scripts - onDisk)}"
    resourcesOnDisk = {str(p.relative_to(MODULE_DIR)) for p in (MODULE_DIR / "Resources").rglob("*") if p.is_file()}
    # The shipped weights: package data, installed next to the modules that find them.
    resourcesOnDisk |= {str(p.relative_to(MODULE_DIR)) for p in (MODULE_DIR / "LearnedRegistrationLib").rglob("*.pt")}
    assert resources == resourcesOnDisk, (
        f"not listed: {sorted(resourcesOnDisk - resources)}; listed but missing: {sorted(resources - resourcesOnDisk)}")
    assert re.search(r"slicerMacroBuildScriptedModule\(\s*NAME \$\{MODULE_NAME\}", text)
    assert "add_subdirectory(Testing)" in text
    assert "add_subdirectory(Python)" in (MODULE_DIR / "Testing" / "CMakeLists.txt").read_text(encoding="utf-8")
    testing = (MODULE_DIR / "Testing" / "Python" / "CMakeLists.txt").read_text(encoding="utf-8")
    script = re.search(r'get_filename_component\((\w+) "\$\{CMAKE_CURRENT_SOURCE_DIR\}/([^"]+)" ABSOLUTE\)', testing)
    assert script, "the self-test script path is not computed"
    assert re.search(rf"^slicer_add_python_unittest\(SCRIPT \$\{{{script.group(1)}\}}\)", testing, re.M)
    scriptPath = MODULE_DIR / "Testing" / "Python" / script.group(2).replace("${MODULE_NAME}", moduleName)
    assert scriptPath.resolve() == MODULE_FILE


def test_extension_cmake():
    text = TOP_CMAKE.read_text(encoding="utf-8")
    for variable in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                     "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert re.search(rf"^set\({variable} ", text, re.M), f"{variable} missing"
    assert re.search(r'^set\(EXTENSION_CATEGORY "Registration"\)', text, re.M)
    assert re.search(r"^set\(EXTENSION_DEPENDS PyTorch\)", text, re.M)
    assert re.search(r"^project\(LearnedRegistration\)", text, re.M)
    order = [text.index(s) for s in ("find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})",
                                     "add_subdirectory(LearnedRegistration)", "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
                                     "include(${Slicer_EXTENSION_CPACK})")]
    assert order == sorted(order)


def test_extension_index_json():
    entry = json.loads(EXTENSION_JSON.read_text(encoding="utf-8"))
    schemaProperties = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
                        "dicom_support_rule", "build_subdirectory", "enabled", "tier"}  # catalog entry schema v1.0.x
    assert set(entry) <= schemaProperties
    assert {"$schema", "category", "scm_url"} <= set(entry)
    assert re.match(r"https://raw\.githubusercontent\.com/Slicer/Slicer/main/Schemas/"
                    r"slicer-extension-catalog-entry-schema-v1\.0\.\d\.json#$", entry["$schema"])
    assert entry["build_dependencies"] == ["PyTorch"]
    assert entry["category"] == "Registration"
    assert isinstance(entry.get("tier", 1), int) and 1 <= entry.get("tier", 1) <= 5
    cmake = TOP_CMAKE.read_text(encoding="utf-8")
    repository = re.search(r'set\(EXTENSION_REPOSITORY_URL "([^"]+)"\)', cmake).group(1)
    assert entry["scm_url"].removesuffix(".git") == repository


# ------------------------------------------------------------------------------------ Python versions


def _python312():
    """A working Python 3.12 interpreter (PATH, then pyenv's versions), or None."""
    pyenvRoot = Path.home() / ".pyenv" / "versions"
    candidates = [shutil.which("python3.12"), *sorted(str(p) for p in pyenvRoot.glob("3.12*/bin/python3.12"))]
    for candidate in candidates:
        if not candidate:
            continue
        try:  # a pyenv shim exists on PATH even when it cannot run 3.12
            version = subprocess.run([candidate, "--version"], capture_output=True, text=True, timeout=30)
        except OSError:
            continue
        if version.returncode == 0 and version.stdout.startswith("Python 3.12"):
            return candidate
    return None


SLICER_SOURCES = [MODULE_FILE, *sorted(p for p in (MODULE_DIR / "LearnedRegistrationLib").rglob("*.py")
                                       if "__pycache__" not in p.parts)]


def _compileall(interpreter, cacheFolder):
    """``python -m compileall`` over the module file and the whole library, byte code kept out of the tree."""
    env = {**os.environ, "PYTHONPYCACHEPREFIX": str(cacheFolder)}
    return subprocess.run([interpreter, "-m", "compileall", "-q", "-f", str(MODULE_FILE), str(MODULE_DIR / "LearnedRegistrationLib")],
                          capture_output=True, text=True, timeout=300, env=env)


def test_compiles_on_this_python(tmp_path):
    result = _compileall(sys.executable, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    compiled = {p.stem.split(".")[0] for p in tmp_path.rglob("*.pyc")}
    assert {p.stem for p in SLICER_SOURCES} <= compiled


def test_compiles_on_python_312(tmp_path):
    """Slicer embeds Python 3.12: compile there when an interpreter exists, else parse with its grammar."""
    interpreter = _python312()
    if interpreter is None:
        for path in SLICER_SOURCES:
            ast.parse(path.read_text(encoding="utf-8"), filename=str(path), feature_version=(3, 12))
        return
    result = _compileall(interpreter, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert any(p.name.endswith(".cpython-312.pyc") for p in tmp_path.rglob("*.pyc"))
