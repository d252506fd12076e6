"""The 3D Slicer Extensions Index's automated checks, applied to this repository offline.

Mirrors ``scripts/check_description_files.py`` of github.com/Slicer/ExtensionsIndex as read at commit
07f1d1b2781c7dd9f6e2a9f5521b3ed43631724c (the script last changed in 43753a55409d6cf9cbd238018c4a721d420ac749),
and the catalog-entry schema it downloads (Slicer/Slicer ``Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.parse
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP_CMAKE = ROOT / "CMakeLists.txt"
EXTENSION_JSON = ROOT / "LearnedRegistration.json"
EXTENSION_NAME = EXTENSION_JSON.stem  # the checker takes the extension name from the .json file name
SCREENSHOT_FOLDER = "Resources/Screenshots"

# ------------------------------------------------------------------------ facts from the checker

#: ACCEPTED_EXTENSION_CATEGORIES at the commit above.
ACCEPTED_CATEGORIES = frozenset({
    "Active Learning", "Analysis", "Auto3dgm", "BigImage", "Cardiac", "Chest Imaging Platform", "Conda",
    "Converters", "DICOM", "DSCI", "Developer Tools", "Diffusion", "Examples", "Exporter", "FTV Segmentation",
    "Filtering", "Filtering.Morphology", "Filtering.Vesselness", "Holographic Display", "Image Synthesis", "IGT",
    "Informatics", "Netstim", "Neuroimaging", "Nuclear Medicine", "Orthodontics", "Osteotomy Planning",
    "Otolaryngology", "Photogrammetry", "Pipelines", "Planning", "Printing", "Quantification", "Radiotherapy",
    "Registration", "Remote", "Rendering", "SPHARM", "Segmentation", "Sequences", "Shape Analysis",
    "Shape Regression", "Shape Visualization", "Simulation", "SlicerCMF", "SlicerMorph", "Spectral Imaging",
    "Supervisely", "Surface Models", "SurfaceLearner", "Tomographic Reconstruction", "Tracking", "Tractography",
    "Training", "Ultrasound", "Utilities", "Vascular Modeling Toolkit", "Virtual Reality", "VisSimTools",
    "Web System Tools", "Wizards",
})
#: check_license_file: names looked for at the repository root, in this order.
LICENSE_FILE_NAMES = ("LICENSE", "LICENCE", "License.txt", "license.txt", "LICENSE.txt", "COPYING", "COPYING.txt")
#: check_git_repository_name: accepted prefixes of the repository name.
REPOSITORY_PREFIXES = ("Slicer", "Slicer-", "Slicer_", "SlicerExtension-", "SlicerExtension_")
#: check_scm_url_syntax.
SCM_SCHEMES = ("git", "https")
#: check_repository_size: the checked-out clone (its .git included), in MB.
SIZE_LIMIT_MB = 100
#: validate_image_url: content types accepted (or application/octet-stream with one of IMAGE_SUFFIXES).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif")
#: check_dependencies: every build dependency must be another .json of the index. Those this
#: extension uses, seen in the index at the commit above (PyTorch.json -> fepegar/SlicerPyTorch).
INDEX_EXTENSIONS_SEEN = frozenset({"PyTorch"})

#: The checker's regular expressions (re.IGNORECASE | re.MULTILINE; first match wins; no CMake
#: variable expansion, comments included).
PROJECT_RE = r"project\s*\(\s*([^\s\)\n\r]+)"
EXTENSION_NAME_RE = r"set\(EXTENSION_NAME\s+([^\s\)]+)\)"
ICONURL_RE = r'set\s*\(EXTENSION_ICONURL\s*"([^"]+)"[ ]*\)'
SCREENSHOTURLS_RE = r'set\s*\(EXTENSION_SCREENSHOTURLS\s*"([^"]+)"\)'  # no space allowed before ")"

#: Catalog-entry schemas the checker would download, by $schema URL without its fragment
#: (Slicer/Slicer Schemas/, v1.0.1 read at commit 0e8d0c4a5b0cc0845eb2b2ce9ace43ff57df9151).
SCHEMAS = {
    "https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json": {
        "type": "object",
        "required": ["$schema", "category", "scm_url"],
        "additionalProperties": False,
        "properties": {
            "$schema": {"type": "string"},
            "category": {"type": "string"},
            "scm_url": {"type": "string"},
            "scm_revision": {"type": "string"},
            "scm_type": {"type": "string", "enum": ["git", "local"]},
            "build_dependencies": {"type": "array", "items": {"type": "string"}},
            "build_subdirectory": {"type": "string"},
            "enabled": {"type": "boolean"},
            "tier": {"type": "integer", "enum": [1, 3, 5]},
        },
    },
}

# ------------------------------------------------------------------------ checking functions
# Each returns a list of error messages (empty: the rule holds).


def _first(pattern: str, text: str):
    matches = re.findall(pattern, text, re.IGNORECASE | re.MULTILINE)
    return matches[0] if matches else None


def parse_cmake(text: str) -> dict:
    """What the checker reads from a top-level CMakeLists.txt: project name, icon URL, screenshot URLs."""
    name = _first(PROJECT_RE, text) or _first(EXTENSION_NAME_RE, text)
    icon = _first(ICONURL_RE, text)
    screenshots = _first(SCREENSHOTURLS_RE, text)
    return {
        "name": name.strip().strip('"').strip("'") if name else None,
        "icon": icon.strip() if icon else None,
        "screenshots": screenshots.split() if screenshots else None,
    }


def cmake_set_value(text: str, variable: str):
    """The literal value of ``set(VARIABLE "value")`` or ``set(VARIABLE a b)`` (first match), unexpanded."""
    match = re.search(rf'^\s*set\s*\(\s*{variable}\s+("([^"]*)"|[^)]*?)\s*\)', text, re.MULTILINE)
    if not match:
        return None
    return match.group(2) if match.group(2) is not None else match.group(1)


def image_url_errors(url: str, what: str) -> list[str]:
    """Offline stand-in for validate_image_url (which downloads it): an absolute https URL of an image file."""
    errors = []
    if not url.startswith("http"):  # the checker's own test
        errors.append(f"{what} '{url}' should be a valid URL starting with 'http'")
    elif urllib.parse.urlsplit(url).scheme != "https" or "${" in url:
        errors.append(f"{what} '{url}' must be a literal https URL")
    if not urllib.parse.urlsplit(url).path.lower().endswith(IMAGE_SUFFIXES):
        errors.append(f"{what} '{url}' does not name a .png/.jpg/.jpeg/.gif file")
    return errors


def check_cmakelists(text: str, extension_name: str) -> list[str]:
    """check_cmakelists_content: project name, icon URL and screenshot URLs, as the checker parses them."""
    parsed = parse_cmake(text)
    errors = []
    if parsed["name"] is None:
        errors.append("No project() declaration found in CMakeLists.txt")
    elif parsed["name"] != extension_name:
        errors.append(f"project name '{parsed['name']}' does not match extension description file name '{extension_name}'")
    if parsed["icon"] is None:
        errors.append("No EXTENSION_ICONURL found in CMakeLists.txt.")
    else:
        errors += image_url_errors(parsed["icon"], "EXTENSION_ICONURL")
    if not parsed["screenshots"]:
        errors.append("No EXTENSION_SCREENSHOTURLS found in CMakeLists.txt.")
    else:
        for url in parsed["screenshots"]:
            errors += image_url_errors(url, "EXTENSION_SCREENSHOTURLS")
    return errors


def raw_url_prefix(scm_url: str, revision: str) -> str:
    """https://raw.githubusercontent.com/<owner>/<repo>/<revision>/ for a github.com scm_url."""
    parts = urllib.parse.urlsplit(scm_url.strip().rstrip("/"))
    owner, repo = parts.path.strip("/").split("/")[:2]
    return f"https://raw.githubusercontent.com/{owner}/{repo.removesuffix('.git')}/{revision}/"


_MAGIC = {".png": (b"\x89PNG\r\n\x1a\n",), ".jpg": (b"\xff\xd8\xff",), ".jpeg": (b"\xff\xd8\xff",),
          ".gif": (b"GIF87a", b"GIF89a")}


def repository_file_errors(url: str, prefix: str, root: Path) -> list[str]:
    """A URL into this repository's raw files must name an image file of the working tree (what
    raw.githubusercontent.com will serve once pushed), with the content its suffix says."""
    if not url.startswith(prefix):
        return [f"'{url}' does not point into this repository ({prefix}); it cannot be checked offline"]
    relative = urllib.parse.unquote(url[len(prefix):])
    path = root / relative
    if not path.is_file():
        return [f"'{url}' names {relative}, which is not a file of the repository"]
    suffix = path.suffix.lower()
    if suffix not in _MAGIC:
        return [f"{relative} does not have an image suffix ({', '.join(IMAGE_SUFFIXES)})"]
    if not path.read_bytes()[:8].startswith(_MAGIC[suffix]):
        return [f"{relative} is not a {suffix} image"]
    return []


def check_license_file(root: Path) -> list[str]:
    """check_license_file: one of the accepted names, as a file at the repository root."""
    if any((root / name).is_file() for name in LICENSE_FILE_NAMES):
        return []
    return ["No license file found in repository root."]


def check_json_file_format(path: Path) -> list[str]:
    """check_json_file_format: valid JSON with LF-only line endings."""
    content = path.read_bytes()
    try:
        json.loads(content.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        return [f"Invalid JSON format: {error}"]
    if b"\r" in content:
        return ["File contains non-LF line endings (CR or CRLF)."]
    return []


_TYPES = {"object": dict, "string": str, "array": list, "boolean": bool, "integer": int}


def _schema_errors(value, schema: dict, where: str) -> list[str]:
    expected = _TYPES[schema["type"]]
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        return [f"{where or 'entry'}: {value!r} is not of type '{schema['type']}'"]
    errors = []
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} is not one of {schema['enum']}")
    if expected is dict:
        errors += [f"'{key}' is a required property" for key in schema.get("required", ()) if key not in value]
        properties = schema.get("properties", {})
        if schema.get("additionalProperties", True) is False:
            errors += [f"additional property '{key}' is not allowed" for key in value if key not in properties]
        for key, sub in properties.items():
            if key in value:
                errors += _schema_errors(value[key], sub, key)
    if expected is list and "items" in schema:
        for i, item in enumerate(value):
            errors += _schema_errors(item, schema["items"], f"{where}[{i}]")
    return errors


def check_json_schema(entry: dict) -> list[str]:
    """check_json_schema: the entry names its schema in $schema (fragment dropped) and validates against it."""
    if not entry.get("$schema"):
        return ["No $schema field found in extension description"]
    url = entry["$schema"].split("#")[0]
    if url not in SCHEMAS:
        return [f"schema {url} is not one this test has a copy of ({', '.join(SCHEMAS)})"]
    return _schema_errors(entry, SCHEMAS[url], "")


def check_extension_name(name: str) -> list[str]:
    """check_extension_name: the extension name must not start with 'Slicer' (case-insensitive)."""
    return [f"extension name '{name}' should not start with 'Slicer'"] if name.lower().startswith("slicer") else []


def check_category(category) -> list[str]:
    """check_category: one of the accepted catalog categories."""
    return [] if category in ACCEPTED_CATEGORIES else [f"Category '{category}' is unknown"]


def check_git_repository_name(scm_url: str) -> list[str]:
    """check_git_repository_name: the repository name (last path part, extension dropped) starts with 'Slicer'."""
    url = scm_url.strip().strip("/")
    name = os.path.splitext(urllib.parse.urlsplit(url).path.split("/")[-1])[0]
    if not name:
        return [f"Failed to determine repository name from scm_url '{url}'"]
    return [] if name.startswith(REPOSITORY_PREFIXES) else [f"git repository name '{name}' should start with 'Slicer'"]


def check_scm_url_syntax(scm_url: str) -> list[str]:
    """check_scm_url_syntax: scheme://host/path with scheme git or https."""
    if "://" not in scm_url:
        return ["scm_url do not match scheme://host/path"]
    scheme = urllib.parse.urlsplit(scm_url).scheme
    return [] if scheme in SCM_SCHEMES else [f"scm_url scheme is '{scheme}' but it should by any of {list(SCM_SCHEMES)}"]


def check_dependencies(entry: dict, index_extensions=INDEX_EXTENSIONS_SEEN) -> list[str]:
    """check_dependencies: every non-empty build dependency is an extension of the index."""
    return [f"'{name}' extension is not found in the index" for name in entry.get("build_dependencies", [])
            if name and name not in index_extensions]


# ------------------------------------------------------------------------ the repository


@pytest.fixture(scope="module")
def cmake_text() -> str:
    return TOP_CMAKE.read_text(encoding="utf-8", errors="ignore")


@pytest.fixture(scope="module")
def entry() -> dict:
    return json.loads(EXTENSION_JSON.read_text(encoding="utf-8"))


def test_cmakelists_content(cmake_text):
    assert check_cmakelists(cmake_text, EXTENSION_NAME) == []


def test_cmake_urls_point_at_files_of_this_repository(cmake_text, entry):
    parsed = parse_cmake(cmake_text)
    prefix = raw_url_prefix(entry["scm_url"], entry.get("scm_revision", "main"))
    errors = []
    for url in [parsed["icon"], *parsed["screenshots"]]:
        errors += repository_file_errors(url, prefix, ROOT)
    assert errors == []
    assert all(url.startswith(f"{prefix}{SCREENSHOT_FOLDER}/") for url in parsed["screenshots"])


def test_cmake_image_files_are_not_git_ignored(cmake_text, entry):
    """A file git ignores is never pushed, so raw.githubusercontent.com would answer 404."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    parsed = parse_cmake(cmake_text)
    prefix = raw_url_prefix(entry["scm_url"], entry.get("scm_revision", "main"))
    paths = [url[len(prefix):] for url in [parsed["icon"], *parsed["screenshots"]]]
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=ROOT, capture_output=True, text=True)
    assert ignored.stdout.split() == []


def test_homepage_repository_and_scm_url_agree(cmake_text, entry):
    homepage = cmake_set_value(cmake_text, "EXTENSION_HOMEPAGE")
    assert homepage and homepage.startswith("https://") and "${" not in homepage
    scm = entry["scm_url"].strip().rstrip("/").removesuffix(".git")
    assert homepage == scm == cmake_set_value(cmake_text, "EXTENSION_REPOSITORY_URL")


def test_catalog_text_fields_are_literal(cmake_text, entry):
    """What the catalog shows besides the URLs: description and contributors, literal and non-empty."""
    for variable in ("EXTENSION_DESCRIPTION", "EXTENSION_CONTRIBUTORS"):
        value = cmake_set_value(cmake_text, variable)
        assert value and value.strip() and "${" not in value, variable
    assert cmake_set_value(cmake_text, "EXTENSION_CATEGORY") == entry["category"]


def test_repository_size():
    """The checker sums every file of the clone, .git included: here the files git would push
    (tracked and not-ignored untracked) plus this checkout's object store (an upper bound of a clone's)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    files = sum((ROOT / name).stat().st_size for name in set(listed) if name and (ROOT / name).is_file())
    counts = subprocess.run(["git", "count-objects", "-v"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    store = sum(int(v) for k, v in re.findall(r"^(size|size-pack): (\d+)$", counts, re.M)) * 1024
    assert (files + store) / 2**20 <= SIZE_LIMIT_MB


def test_license_file():
    assert check_license_file(ROOT) == []
    # The project's license (pyproject.toml) is the one the file states.
    declared = re.search(r'^license\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert declared == "Apache-2.0"
    assert "Apache License\n                           Version 2.0, January 2004" in (ROOT / "LICENSE").read_text()


def test_json_file_format():
    assert check_json_file_format(EXTENSION_JSON) == []


def test_json_schema(entry):
    assert check_json_schema(entry) == []


def test_extension_name():
    assert check_extension_name(EXTENSION_NAME) == []


def test_category(entry):
    assert check_category(entry.get("category")) == []


def test_git_repository_name(entry):
    assert check_git_repository_name(entry["scm_url"]) == []


def test_scm_url_syntax(entry):
    assert check_scm_url_syntax(entry["scm_url"]) == []


def test_dependencies(entry, cmake_text):
    assert check_dependencies(entry) == []
    # The extension build's EXTENSION_DEPENDS names the same extensions.
    assert sorted(cmake_set_value(cmake_text, "EXTENSION_DEPENDS").split()) == sorted(entry.get("build_dependencies", []))


# ------------------------------------------------------------------------ the rules catch bad input

GOOD_CMAKE = """project(Foo)
set(EXTENSION_ICONURL "https://raw.githubusercontent.com/o/SlicerFoo/main/Resources/Icons/Foo.png")
set(EXTENSION_SCREENSHOTURLS "https://raw.githubusercontent.com/o/SlicerFoo/main/a.png https://x.org/b.jpg")
"""


def test_parse_cmake_like_the_checker():
    parsed = parse_cmake(GOOD_CMAKE)
    assert parsed == {"name": "Foo", "icon": "https://raw.githubusercontent.com/o/SlicerFoo/main/Resources/Icons/Foo.png",
                      "screenshots": ["https://raw.githubusercontent.com/o/SlicerFoo/main/a.png", "https://x.org/b.jpg"]}
    assert check_cmakelists(GOOD_CMAKE, "Foo") == []
    # The first match wins, even in a comment; EXTENSION_NAME is the fallback without project().
    assert parse_cmake('# set(EXTENSION_ICONURL "https://old/a.png")\n' + GOOD_CMAKE)["icon"] == "https://old/a.png"
    assert parse_cmake("set(EXTENSION_NAME Bar)")["name"] == "Bar"


@pytest.mark.parametrize("bad, message", [
    (GOOD_CMAKE.replace("https://raw.githubusercontent.com/o/SlicerFoo/main", "${EXTENSION_RAW_URL}", 1),
     "should be a valid URL starting with 'http'"),
    (GOOD_CMAKE.replace("https://x.org", "http://x.org"), "literal https URL"),
    (GOOD_CMAKE.replace("Foo.png", "Foo.svg"), "does not name a .png"),
    (GOOD_CMAKE.replace("b.jpg\")", "b.jpg\" )"), "No EXTENSION_SCREENSHOTURLS"),  # the checker's regex
    (GOOD_CMAKE.replace("set(EXTENSION_ICONURL", "set(EXTENSION_ICON_URL"), "No EXTENSION_ICONURL"),
    (GOOD_CMAKE.replace("project(Foo)", "project(SlicerFoo)"), "does not match"),
    (GOOD_CMAKE.replace("project(Foo)", ""), "No project() declaration"),
])
def test_cmakelists_rejects(bad, message):
    errors = check_cmakelists(bad, "Foo")
    assert any(message in error for error in errors), errors


def test_repository_file_rules(tmp_path):
    prefix = "https://raw.githubusercontent.com/o/SlicerFoo/main/"
    assert raw_url_prefix("https://github.com/o/SlicerFoo.git", "main") == prefix
    (tmp_path / "Resources" / "Screenshots").mkdir(parents=True)
    (tmp_path / "Resources" / "Screenshots" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(16))
    (tmp_path / "fake.png").write_text("not an image")
    assert repository_file_errors(prefix + "Resources/Screenshots/a.png", prefix, tmp_path) == []
    assert "not a file" in repository_file_errors(prefix + "Resources/Screenshots/b.png", prefix, tmp_path)[0]
    assert "not a .png image" in repository_file_errors(prefix + "fake.png", prefix, tmp_path)[0]
    assert "does not point into" in repository_file_errors("https://example.org/a.png", prefix, tmp_path)[0]


def test_license_and_json_format_reject(tmp_path):
    assert check_license_file(tmp_path) != []
    (tmp_path / "LICENSE.md").write_text("MIT")  # not a name the checker looks for
    assert check_license_file(tmp_path) != []
    (tmp_path / "COPYING").write_text("GPL")
    assert check_license_file(tmp_path) == []
    crlf = tmp_path / "Foo.json"
    crlf.write_bytes(b'{\r\n  "category": "Registration"\r\n}\r\n')
    assert "non-LF" in check_json_file_format(crlf)[0]
    crlf.write_text('{"category": }')
    assert "Invalid JSON" in check_json_file_format(crlf)[0]


@pytest.mark.parametrize("change, message", [
    ({"tier": 2}, "is not one of"),
    ({"tier": True}, "is not of type 'integer'"),
    ({"enabled": "yes"}, "is not of type 'boolean'"),
    ({"build_dependencies": [1]}, "is not of type 'string'"),
    ({"description": "x"}, "additional property 'description'"),
    ({"scm_url": None}, "is not of type 'string'"),
    ({"$schema": "https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/other.json#"}, "not one this test has"),
])
def test_json_schema_rejects(entry, change, message):
    errors = check_json_schema({**entry, **change})
    assert any(message in error for error in errors), errors


def test_json_schema_requires(entry):
    for key in ("category", "scm_url"):
        assert f"'{key}' is a required property" in check_json_schema({k: v for k, v in entry.items() if k != key})
    assert check_json_schema({k: v for k, v in entry.items() if k != "$schema"}) == [
        "No $schema field found in extension description"]


def test_metadata_rules_reject():
    assert check_extension_name("SlicerFoo") != [] and check_extension_name("slicerfoo") != []
    assert check_category("Deep Learning") != [] and check_category(None) != []
    assert check_git_repository_name("https://github.com/o/LearnedRegistration.git") != []
    assert check_git_repository_name("https://github.com/o/SlicerExtension-Foo.git/") == []
    assert check_scm_url_syntax("github.com/o/SlicerFoo") != []
    assert check_scm_url_syntax("ssh://git@github.com/o/SlicerFoo") != []
    assert check_scm_url_syntax("git://github.com/o/SlicerFoo") == []
    assert check_dependencies({"build_dependencies": ["PyTorch", "NoSuchExtension", ""]}) == [
        "'NoSuchExtension' extension is not found in the index"]


def test_cmake_set_value():
    text = 'set(EXTENSION_DEPENDS PyTorch) # comment\nset(EXTENSION_HOMEPAGE "${URL}")\n  set(A "x y")\n'
    assert cmake_set_value(text, "EXTENSION_DEPENDS") == "PyTorch"
    assert cmake_set_value(text, "EXTENSION_HOMEPAGE") == "${URL}"
    assert cmake_set_value(text, "A") == "x y"
    assert cmake_set_value(text, "B") is None
