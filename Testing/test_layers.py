"""The layers of LearnedRegistrationLib, read from the source: every import points down.

``engine`` < ``learned`` < ``training``; ``learned`` < ``bridge`` < ``app``; the Slicer module file
sits on ``bridge``. Every import statement counts, also those inside functions and under
``TYPE_CHECKING``, since each one is an arrow between layers. Besides the package's own layers, each
layer may use only the third-party packages its users have: Slicer ships numpy, scipy, SimpleITK,
vtk and its ``slicer`` package, the PyTorch extension adds torch; the command line adds tqdm and
matplotlib; only the module file may import Qt.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE_FILE = ROOT / "LearnedRegistration" / "LearnedRegistration.py"
LIB = ROOT / "LearnedRegistration" / "LearnedRegistrationLib"
PACKAGE = "LearnedRegistrationLib"

#: Layer -> the package's layers it may import (itself included).
ALLOWED_LAYERS = {
    "engine": {"engine"},
    "learned": {"engine", "learned"},
    "training": {"engine", "learned", "training"},
    "bridge": {"engine", "learned", "bridge"},
    "app": {"engine", "learned", "bridge", "app"},
    "module": {"engine", "learned", "bridge"},  # the Slicer module file LearnedRegistration.py
}
_TORCH_WORLD = {"numpy", "scipy", "torch", "SimpleITK"}
_MRML = {"vtk", "slicer"}
_QT = {"qt", "ctk", "PythonQt", "slicer.ScriptedLoadableModule", "slicer.util", "slicer.parameterNodeWrapper"}
#: Layer -> third-party packages it may import (the standard library is always allowed).
ALLOWED_THIRD_PARTY = {
    "engine": _TORCH_WORLD,
    "learned": _TORCH_WORLD,
    "training": _TORCH_WORLD,
    "bridge": _TORCH_WORLD | _MRML,
    "app": _TORCH_WORLD | _MRML | {"tqdm", "matplotlib"},
    "module": _TORCH_WORLD | _MRML | {"qt", "ctk", "SampleData", "PyTorchUtils"},
}
#: The web app (app/web*.py, `learnedreg serve`, the `web` extra) alone may import trame.
_WEB = {"trame", "trame_slicer", "trame_vuetify"}


def imported_modules(source: str, module: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``source``, the file of module ``module``
    (dotted, e.g. "LearnedRegistrationLib.bridge.logic"); relative imports are resolved, and
    ``from package import name`` also yields "package.name" (it may be a module)."""
    package = module.rsplit(".", 1)[0]  # the package a relative import starts from (also for __init__)
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.append((node.lineno, target))
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names if alias.name != "*"]
    return found


def violations(source: str, module: str, layer: str) -> list[str]:
    """Every import of ``source`` (module ``module`` in ``layer``) that runs the wrong way."""
    bad = []
    for line, name in imported_modules(source, module):
        top = name.split(".")[0]
        if top == PACKAGE:
            parts = name.split(".")
            target = parts[1] if len(parts) > 1 else None
            if target in ALLOWED_LAYERS and target not in ALLOWED_LAYERS[layer]:
                bad.append(f"{module}:{line} imports {name} ({layer} -> {target})")
        elif top in sys.stdlib_module_names or top == "__future__":
            continue
        elif any(name == q or name.startswith(q + ".") for q in _QT) and layer != "module":
            bad.append(f"{module}:{line} imports {name} (Qt and the Slicer GUI only in the module file)")
        elif top in _WEB and module.startswith(f"{PACKAGE}.app.web"):
            continue
        elif top not in ALLOWED_THIRD_PARTY[layer]:
            bad.append(f"{module}:{line} imports {name} (not available to the {layer} layer)")
    return bad


def library_modules():
    """(dotted module name, layer, path) of every module of the package."""
    for path in sorted(LIB.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        relative = path.relative_to(LIB).with_suffix("")
        parts = relative.parts
        layer = parts[0] if len(parts) > 1 else None
        yield ".".join((PACKAGE, *parts)), layer, path


def test_every_module_belongs_to_a_layer():
    top_level = [path.name for _, layer, path in library_modules() if layer is None]
    assert top_level == ["__init__.py"], f"modules outside the layer folders: {top_level}"
    layers = {layer for _, layer, _ in library_modules() if layer}
    assert layers == set(ALLOWED_LAYERS) - {"module"}


@pytest.mark.parametrize("module,layer,path", list(library_modules()), ids=lambda v: v if isinstance(v, str) else "")
def test_imports_point_down(module, layer, path):
    source = path.read_text(encoding="utf-8")
    if layer is None:  # the package's __init__: imports nothing, so that `import LearnedRegistrationLib` is free
        assert not imported_modules(source, module)
        return
    assert not violations(source, module, layer)


def test_the_module_file_sits_on_the_bridge():
    source = MODULE_FILE.read_text(encoding="utf-8")
    assert not violations(source, "LearnedRegistration", "module")
    assert any(name == "qt" for _, name in imported_modules(source, "LearnedRegistration"))


def test_scripts_never_import_qt():
    for path in sorted((ROOT / "scripts").glob("*.py")):
        names = [name for _, name in imported_modules(path.read_text(encoding="utf-8"), path.stem)]
        assert not [n for n in names if n.split(".")[0] in {"qt", "ctk", "PythonQt"}], path.name


@pytest.mark.parametrize("source,module,layer,expected", [
    ("from ..bridge import mrml\n", "LearnedRegistrationLib.engine.grid", "engine", "engine -> bridge"),
    ("def f():\n    from ..app.cli import main\n", "LearnedRegistrationLib.bridge.logic", "bridge", "bridge -> app"),
    ("from ..training.synthesis import one_hot\n", "LearnedRegistrationLib.learned.predict", "learned", "learned -> training"),
    ("import vtk\n", "LearnedRegistrationLib.engine.metrics", "engine", "not available to the engine layer"),
    ("import matplotlib\n", "LearnedRegistrationLib.bridge.logic", "bridge", "not available to the bridge layer"),
    ("import qt\n", "LearnedRegistrationLib.app.cli", "app", "only in the module file"),
    ("from LearnedRegistrationLib.app import demo\n", "LearnedRegistration", "module", "module -> app"),
])
def test_the_checker_catches_wrong_arrows(source, module, layer, expected):
    found = violations(source, module, layer)
    assert found and expected in found[0]


def test_the_checker_accepts_right_arrows():
    source = "from ..engine.grid import ImageGrid\nfrom . import mrml\nimport numpy as np\nimport slicer\n"
    assert not violations(source, "LearnedRegistrationLib.bridge.logic", "bridge")
