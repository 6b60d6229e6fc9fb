"""The Slicer side of SASSRSegment, checked without Slicer.

The module file and its SASSRSegmentSlicer package are imported in plain Python (their Slicer imports are
guarded, in SASSRSegmentSlicer/slicerapi.py): the Slicer-free helpers and the process runner are tested
for real, and the files Slicer needs (.ui, CMake lists, catalog entry, .s4ext, icons) are checked against
the module's code.
"""

import ast
import graphlib
import importlib.util
import json
import os
import py_compile
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import SimpleITK as sitk

from SASSRSegmentLib.io.geometry import Grid, hr_grid

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "SASSRSegment"
MODULE_FILE = MODULE_DIR / "SASSRSegment.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "SASSRSegment.ui"
MODULE_CMAKE = MODULE_DIR / "CMakeLists.txt"
ENGINE_DIR = MODULE_DIR / "SASSRSegmentLib"
SLICER_DIR = MODULE_DIR / "SASSRSegmentSlicer"
SLICER_FILES = sorted(SLICER_DIR.glob("*.py"))
REFERENCE = ROOT.parent / "shared" / "reference"
POSIX_ONLY = pytest.mark.skipif(os.name == "nt", reason="process-group signals are POSIX")

# Slicer puts the module folder on sys.path: the module file imports its SASSRSegmentSlicer package from there.
sys.path.insert(0, str(MODULE_DIR))

from SASSRSegmentSlicer import paths  # noqa: E402
from SASSRSegmentSlicer.cards import (  # noqa: E402
    defaultModelName,
    hasImageSrDecoder,
    modelsHelpHtml,
    modelSummary,
    readModelCards,
)
from SASSRSegmentSlicer.command import (  # noqa: E402
    commandEnvironment,
    devicesCommand,
    failureMessage,
    panelMessage,
    parseProgressLine,
    pythonExecutable,
    segmentCommand,
)
from SASSRSegmentSlicer.devices import DeviceProbe, deviceArgument, deviceSummary  # noqa: E402
from SASSRSegmentSlicer.geometry import (  # noqa: E402
    boundsOfPoints,
    boxCorners,
    gridSpatialDims,
    hrScales,
    superResolvedGrid,
    voxelCornerBounds,
)
from SASSRSegmentSlicer.naming import formatElapsed, outputNodeNames, outputPathsForFiles, uniqueName  # noqa: E402
from SASSRSegmentSlicer.roi import roiOverlapsGrid, sliceAxisBounds  # noqa: E402
from SASSRSegmentSlicer.runner import CANCEL_GRACE_S, SegmentRunner  # noqa: E402
from SASSRSegmentSlicer.tables import readCsvColumns  # noqa: E402


@pytest.fixture(scope="module")
def mod():
    spec = importlib.util.spec_from_file_location("SASSRSegmentModule", MODULE_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.slicer is None, "these tests must run outside Slicer"
    return module


# ------------------------------------------------------------------------------------ module vs .ui


def _ui_widgets():
    return ET.parse(UI_FILE).getroot().iter("widget")


def _parameter_fields():
    """Field name -> annotation source of the @parameterNodeWrapper class in the module."""
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any(
            isinstance(d, ast.Name) and d.id == "parameterNodeWrapper" for d in node.decorator_list
        ):
            return {
                item.target.id: ast.unparse(item.annotation)
                for item in node.body
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
            }
    raise AssertionError("no @parameterNodeWrapper class in the module")


@pytest.mark.parametrize("path", [MODULE_FILE, *SLICER_FILES], ids=lambda path: path.name)
def test_module_compiles_for_slicers_python(path):
    py_compile.compile(str(path), doraise=True)
    # Slicer 5.6 and 5.8 ship Python 3.9: no newer syntax in the module ...
    tree = ast.parse(path.read_text(encoding="utf-8"), feature_version=(3, 9))
    # ... and none of the 3.10 features that parse but fail when run: `X | Y` types, zip(strict=).
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "zip":
            assert not node.keywords, f"line {node.lineno}: zip(strict=) needs Python 3.10"
        annotations = (
            [getattr(node, "annotation", None)] if isinstance(node, (ast.AnnAssign, ast.arg)) else []
        )
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("isinstance", "issubclass"):
            annotations.append(node.args[1])
        for annotation in filter(None, annotations):
            assert not any(
                isinstance(part, ast.BinOp) and isinstance(part.op, ast.BitOr)
                for part in ast.walk(annotation)
            ), f"line {node.lineno}: `X | Y` types need Python 3.10"


def _python39():
    """A Python 3.9 interpreter (Slicer 5.6 and 5.8's): $SASSR_PYTHON39, pyenv's, or python3.9 on PATH,
    whichever runs (pyenv's shim on PATH may not)."""
    pyenv = sorted(Path.home().glob(".pyenv/versions/3.9*/bin/python3.9"))
    for candidate in (os.environ.get("SASSR_PYTHON39"), *map(str, pyenv), shutil.which("python3.9")):
        if not candidate:
            continue
        probe = subprocess.run(
            [candidate, "-c", "import sys; print(sys.version_info[:2] == (3, 9))"],
            capture_output=True,
            text=True,
        )
        if probe.stdout.strip() == "True":
            return candidate
    pytest.skip(
        "no Python 3.9 found: set SASSR_PYTHON39 to one to run the module's helpers on Slicer 5.6's Python"
    )


def test_module_helpers_run_on_python_39(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(
        textwrap.dedent(
            """
            import importlib.util, sys
            # The module file imports every file of its package.
            spec = importlib.util.spec_from_file_location("m", sys.argv[1])
            m = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(m)
            from SASSRSegmentSlicer.cards import defaultModelName, readModelCards
            from SASSRSegmentSlicer.command import panelMessage, segmentCommand
            from SASSRSegmentSlicer.job import FileResult, SegmentationResult
            from SASSRSegmentSlicer.runner import SegmentRunner
            cards = readModelCards()
            assert defaultModelName(cards, 3, "MR") == cards[0]["name"]
            assert panelMessage("--roi: each max must be larger than its min").startswith("the Region")
            engine = "import json; print(json.dumps({'log': 'warning: w'}))"
            runner = SegmentRunner([sys.executable, "-c", engine])
            runner.start()
            assert runner.wait() == 0 and runner.warnings == ["w"], runner.warnings
            segmentCommand("py", "in", "out", roiBounds=[0, 1, 0, 1, 0, 1], threshold=0.4)
            print(SegmentationResult("completed"), FileResult("in"), m.SASSRSegmentLogic)
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": str(MODULE_DIR)}
    done = subprocess.run(
        [_python39(), str(script), str(MODULE_FILE)], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr


def test_the_module_file_gives_the_console_api(mod):
    # `import SASSRSegment; SASSRSegment.SASSRSegmentLogic()` in Slicer's Python console (docs/slicer.md).
    from SASSRSegmentSlicer.logic import SASSRSegmentLogic

    assert mod.SASSRSegmentLogic is SASSRSegmentLogic
    for method in ("segmentVolume", "segmentFiles", "outputSegmentationStatus", "cancel", "defaultModelName"):
        assert callable(getattr(SASSRSegmentLogic, method)), method
    assert paths.MODULE_DIR == MODULE_DIR and paths.SAMPLE_PATH.is_file()


def test_the_sample_is_registered_with_its_checksum(mod, monkeypatch):
    """Sample Data reuses a cached file of the same name unless a checksum says it changed: without one, a
    release with a new sample would keep showing users the old one."""
    import hashlib
    import types

    registered = []
    logic = types.SimpleNamespace(registerCustomSampleDataSource=lambda **kw: registered.append(kw))
    monkeypatch.setitem(sys.modules, "SampleData", types.SimpleNamespace(SampleDataLogic=logic))
    mod.registerSampleData()
    (source,) = registered
    digest = hashlib.sha256(paths.SAMPLE_PATH.read_bytes()).hexdigest()
    assert source["checksums"] == [f"SHA256:{digest}"] and source["fileNames"] == [paths.SAMPLE_PATH.name]
    assert source["uris"] == [paths.SAMPLE_PATH.as_uri()]


def _imported_modules(tree):
    """The modules an AST imports: top-level names, ".name" for a file of its own package, and ".." for
    anything imported from above its package."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield (node.module or "").split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 1:
            names = [node.module] if node.module else [alias.name for alias in node.names]
            yield from ("." + name.split(".")[0] for name in names)
        elif isinstance(node, ast.ImportFrom):
            yield ".."


def test_module_file_stays_small_and_its_package_imports_one_way():
    """What Slicer needs stays in the module file; the rest lives in SASSRSegmentSlicer, in small files
    and functions, none of which imports the module file, and whose imports of each other form no circle."""
    assert len(MODULE_FILE.read_text(encoding="utf-8").splitlines()) < 600
    assert len(SLICER_FILES) >= 8 and SLICER_DIR / "__init__.py" in SLICER_FILES
    uses = {}
    for path in [MODULE_FILE, *SLICER_FILES]:
        text = path.read_text(encoding="utf-8")
        assert len(text.splitlines()) < 600, f"{path.name} has grown past 600 lines: split it"
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                assert length <= 80, f"{path.name}: {node.name} is {length} lines long"
        if path != MODULE_FILE:
            imported = set(_imported_modules(tree))
            assert "SASSRSegment" not in imported, f"{path.name} imports the module file"
            assert ".." not in imported, f"{path.name} imports from above its package"
            uses[path.stem] = {name[1:] for name in imported if name.startswith(".")}
    order = list(graphlib.TopologicalSorter(uses).static_order())  # raises CycleError on a circle
    assert order.index("slicerapi") < order.index("logic") < order.index("selftest")


def test_every_ui_attribute_used_by_the_module_exists_in_the_ui():
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_FILE.read_text(encoding="utf-8")))
    names = {widget.get("name") for widget in _ui_widgets()}
    assert len(used) >= 10
    assert sorted(used - names) == []


def test_no_node_selector_offers_to_delete_the_users_node():
    """qMRMLNodeComboBox's "Delete current ..." removes the node from the scene at once, unasked: one
    misclick would lose a hand-edited segmentation or a placed ROI."""
    selectors = [w for w in _ui_widgets() if w.get("class") == "qMRMLNodeComboBox"]
    assert len(selectors) >= 3
    for widget in selectors:
        remove = widget.find("property[@name='removeEnabled']/bool")
        assert remove is not None and remove.text == "false", widget.get("name")


def test_every_slicer_parameter_name_is_a_parameter_node_field_of_a_compatible_type():
    fields = _parameter_fields()
    bound = []
    for widget in _ui_widgets():
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound.append((widget.get("class"), prop.findtext("string"), widget))
    assert len(bound) >= 6
    for widgetClass, name, widget in bound:
        assert name in fields, f"{name} is bound in the .ui but not a parameter-node field"
        annotation = fields[name]
        if widgetClass == "qMRMLNodeComboBox":
            nodeTypes = [s.text for s in widget.find("property[@name='nodeTypes']/stringlist")]
            assert nodeTypes == [annotation], f"{name}: combo shows {nodeTypes}, field is {annotation}"
        else:
            expected = {"QCheckBox": "bool", "ctkSliderWidget": "float"}[widgetClass]
            assert annotation == expected or annotation.startswith(f"Annotated[{expected},"), (
                name,
                annotation,
            )


def test_parameter_node_attributes_used_by_the_module_are_fields():
    fields = _parameter_fields()
    used = set(re.findall(r"_parameterNode\.(\w+)", MODULE_FILE.read_text(encoding="utf-8")))
    used -= {"connectGui", "disconnectGui"}
    assert {"inputVolume", "modelName", "threshold", "outputSegmentation"} <= used
    assert sorted(used - set(fields)) == []


# ------------------------------------------------------------------------------------ packaging


def _cmake_listed(text):
    return {line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")}


def _files_under(folder, pattern="*"):
    return sorted(
        p.relative_to(MODULE_DIR).as_posix()
        for p in folder.rglob(pattern)
        if p.is_file() and "__pycache__" not in p.parts and not p.name.startswith(".")
    )


def test_cmake_lists_every_engine_file():
    engine = _files_under(ENGINE_DIR, "*.py")
    assert "SASSRSegmentLib/cli.py" in engine
    missing = set(engine) - _cmake_listed(MODULE_CMAKE.read_text(encoding="utf-8"))
    assert not missing, f"not in {MODULE_CMAKE.name}: {sorted(missing)}; run tools/update_cmake_lists.py"


def test_cmake_lists_every_slicer_package_file():
    package = _files_under(SLICER_DIR, "*.py")
    assert "SASSRSegmentSlicer/__init__.py" in package and "SASSRSegmentSlicer/logic.py" in package
    missing = set(package) - _cmake_listed(MODULE_CMAKE.read_text(encoding="utf-8"))
    assert not missing, f"not in {MODULE_CMAKE.name}: {sorted(missing)}; run tools/update_cmake_lists.py"


def test_cmake_lists_every_model_and_sample_file():
    resources = MODULE_DIR / "Resources"
    models = _files_under(resources / "Models")
    samples = _files_under(resources / "Samples")
    assert any(name.endswith(".nrrd") for name in samples), "the shipped sample is missing"
    if not models:
        pytest.skip("no bundled model yet (Resources/Models is empty)")
    missing = set(models + samples) - _cmake_listed(MODULE_CMAKE.read_text(encoding="utf-8"))
    assert not missing, f"not in {MODULE_CMAKE.name}: {sorted(missing)}; run tools/update_cmake_lists.py"


def test_every_file_listed_in_the_module_cmake_exists():
    text = MODULE_CMAKE.read_text(encoding="utf-8").replace("${MODULE_NAME}", "SASSRSegment")
    listed = [entry for entry in _cmake_listed(text) if re.fullmatch(r"[\w./-]+\.\w+", entry)]
    assert "SASSRSegment.py" in listed and "Resources/UI/SASSRSegment.ui" in listed
    assert sorted(entry for entry in listed if not (MODULE_DIR / entry).is_file()) == []


def test_cmake_registers_the_module_its_tests_and_the_pytorch_dependency():
    top = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.search(r"set\(EXTENSION_DEPENDS\s+PyTorch\)", top)
    assert "add_subdirectory(SASSRSegment)" in top
    module = MODULE_CMAKE.read_text(encoding="utf-8")
    assert "WITH_GENERIC_TESTS" in module and "add_subdirectory(Testing)" in module
    testing = (MODULE_DIR / "Testing" / "Python" / "CMakeLists.txt").read_text(encoding="utf-8")
    match = re.search(r"slicer_add_python_unittest\(SCRIPT \$\{CMAKE_CURRENT_SOURCE_DIR\}/([^)]+)\)", testing)
    assert match and (MODULE_DIR / "Testing" / "Python" / match[1]).resolve() == MODULE_FILE


def test_update_cmake_lists_rewrites_only_the_generated_blocks():
    spec = importlib.util.spec_from_file_location(
        "update_cmake_lists", ROOT / "tools" / "update_cmake_lists.py"
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    text = (
        "set(S\n  A.py\n  # BEGIN GENERATED FILE LIST: engine\n  old.py\n  # END GENERATED FILE LIST\n  )\n"
        "set(R\n    # BEGIN GENERATED FILE LIST: resources\n    # END GENERATED FILE LIST\n)\n"
    )
    lists = {"engine": ["Lib/a.py", "Lib/b.py"], "resources": ["Resources/Models/m/model.json"]}
    assert tool.render(text, lists) == (
        "set(S\n  A.py\n  # BEGIN GENERATED FILE LIST: engine\n  Lib/a.py\n  Lib/b.py\n"
        "  # END GENERATED FILE LIST\n  )\n"
        "set(R\n    # BEGIN GENERATED FILE LIST: resources\n    Resources/Models/m/model.json\n"
        "    # END GENERATED FILE LIST\n)\n"
    )
    with pytest.raises(SystemExit):
        tool.render(text.replace("resources", "other"), lists)
    assert tool.main(["--check"]) == 0, (
        "SASSRSegment/CMakeLists.txt is stale: run tools/update_cmake_lists.py"
    )


def _s4ext_fields(path):
    fields = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(" ")
            fields[key] = value.strip()
    return fields


def test_s4ext_has_every_field_of_the_example():
    example = _s4ext_fields(REFERENCE / "example.s4ext")
    ours = _s4ext_fields(ROOT / "SASSRSegment.s4ext")
    assert len(example) >= 12
    assert sorted(set(example) - set(ours)) == []
    assert ours["depends"] == "PyTorch" and ours["category"] == "Segmentation" and ours["scm"] == "git"


def test_catalog_entry_is_valid_and_agrees_with_the_s4ext():
    schema = json.loads((REFERENCE / "slicer-extension-catalog-entry-schema-v1.0.2.json").read_text())
    entry = json.loads((ROOT / "SASSRSegment.json").read_text())
    jsonschema.Draft7Validator(schema).validate(entry)
    assert entry["build_dependencies"] == ["PyTorch"]
    assert entry["scm_url"] == _s4ext_fields(ROOT / "SASSRSegment.s4ext")["scmurl"]


def test_engine_never_imports_slicer_qt_vtk_or_ctk():
    files = sorted(ENGINE_DIR.rglob("*.py"))
    assert len(files) >= 5
    forbidden = {"slicer", "qt", "vtk", "ctk"}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in forbidden, f"{path.name} imports {name}"


def test_screenshot_urls_point_at_committed_pngs_like_the_icon():
    top = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    icon = re.search(r'set\(EXTENSION_ICONURL "([^"]+)"\)', top)[1]
    prefix = icon[: icon.index("/Resources/")] + "/"
    urls = re.search(r'set\(EXTENSION_SCREENSHOTURLS "([^"]*)"\)', top)[1].split()
    assert urls, "the Extensions Index rejects an extension without a screenshot"
    assert _s4ext_fields(ROOT / "SASSRSegment.s4ext")["screenshoturls"].split() == urls
    for url in urls:
        assert url.startswith(prefix), url
        path = ROOT / url[len(prefix) :]
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
        assert path.stat().st_size < 300_000
        assert min(sitk.ReadImage(str(path)).GetSize()) >= 300


@pytest.mark.parametrize(
    "icon", ["SASSRSegment/Resources/Icons/SASSRSegment.png", "Resources/SASSRSegment.png"]
)
def test_icon_is_a_128_pixel_png(icon):
    path = ROOT / icon
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = sitk.ReadImage(str(path))
    assert image.GetSize() == (128, 128)
    assert image.GetNumberOfComponentsPerPixel() in (3, 4)


# ------------------------------------------------------------------------------------ helpers


def test_segment_command_with_defaults():
    command = segmentCommand("/py", "/t/in.nrrd", "/t/out.nrrd")
    assert command == ["/py", "-m", "SASSRSegmentLib", "segment", "/t/in.nrrd", "-o", "/t/out.nrrd"] + [
        "--device",
        "auto",
        "--progress",
        "json",
    ]


def test_segment_command_with_every_option():
    command = segmentCommand(
        "/py",
        Path("/t/in.nrrd"),
        Path("/t/out.nrrd"),
        modelName="brain-tumour-flair-3d",
        device="gpu",
        threshold=0.35,
        tta=True,
        roiBounds=[-10, 20.5, -30, 40, 5, 6.25],
        srImagePath=Path("/t/sr.nrrd"),
        lesionTablePath=Path("/t/lesions.csv"),
        numberedLesions=True,
    )
    assert command[4:7] == ["/t/in.nrrd", "-o", "/t/out.nrrd"]
    assert command[7:] == [
        "--model",
        "brain-tumour-flair-3d",
        "--device",
        "cuda",
        "--progress",
        "json",
        "--threshold",
        "0.35",
        "--tta",
        "--roi",
        "-10.0",
        "20.5",
        "-30.0",
        "40.0",
        "5.0",
        "6.25",
        "--sr-image",
        "/t/sr.nrrd",
        "--lesion-table",
        "/t/lesions.csv",
        "--numbered-lesions",
    ]


def test_roi_bounds_reach_the_engine_exactly_even_when_tiny():
    # An ROI edge at 0 comes back from a transform as -1.8e-15: in exponent form argparse took it for an option.
    from SASSRSegmentLib import cli

    bounds = [-1.7763568394002505e-15, 20.5, -3e-20, 40.0, 1e-07, 6.25]
    command = segmentCommand("/py", "/t/in.nrrd", "/t/out.nrrd", roiBounds=bounds, threshold=1e-05)
    args = cli.build_parser("segment").parse_args(command[3:])
    assert args.roi == bounds
    assert args.threshold == 1e-05


def test_segment_command_rejects_bad_values():
    with pytest.raises(ValueError, match="threshold"):
        segmentCommand("/py", "in", "out", threshold=1.5)
    with pytest.raises(ValueError, match="empty or flat"):
        segmentCommand("/py", "in", "out", roiBounds=[1, -1, 0, 1, 0, 1])
    with pytest.raises(ValueError, match="empty or flat"):
        segmentCommand("/py", "in", "out", roiBounds=[0, 0, 0, 0, 0, 0])  # an ROI never placed
    with pytest.raises(ValueError, match="empty or flat"):
        segmentCommand("/py", "in", "out", roiBounds=[0, 1, 0, 1, 2, 2])  # flat
    with pytest.raises(ValueError, match="six finite"):
        segmentCommand("/py", "in", "out", roiBounds=[0, 1, 0, float("nan"), 0, 1])
    with pytest.raises(ValueError, match="Unknown device"):
        segmentCommand("/py", "in", "out", device="tpu")


def test_device_choice_follows_what_torch_detected():
    assert deviceArgument("Auto") == "auto"
    assert deviceArgument("CPU") == "cpu"
    assert deviceArgument("cuda:1") == "cuda:1"
    assert deviceArgument("gpu", {"cuda": "NVIDIA H100", "mps": False}) == "cuda"
    assert deviceArgument("gpu", {"cuda": None, "mps": True}) == "mps"
    assert deviceArgument("gpu", {"cuda": None, "mps": False}) == "cuda"  # the engine says it is absent


def _probe(command, timeoutS=60.0):
    probe = DeviceProbe(command, commandEnvironment(os.environ), timeoutS=timeoutS)
    probe.start()
    deadline = time.monotonic() + 90
    while (devices := probe.poll()) is None:
        assert time.monotonic() < deadline, "the probe never answered"
        time.sleep(0.05)
    return probe, devices


def test_device_probe_asks_the_engine_python_without_importing_torch_here():
    import torch

    _, devices = _probe(devicesCommand(sys.executable))
    assert devices["error"] is None
    assert devices["torch"] == torch.__version__
    assert devices["cuda"] == (torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    summary = deviceSummary(devices)
    assert devices["torch"] in summary
    assert (devices["cuda"] or "CPU") in summary or devices["mps"]
    assert "not installed" in deviceSummary({"torch": None})

    # What the panel's process runs: the probe and its summary, and torch never enters that process.
    script = textwrap.dedent(
        f"""
        import os, sys, time
        sys.path.insert(0, {str(MODULE_DIR)!r})
        from SASSRSegmentSlicer.command import commandEnvironment, devicesCommand
        from SASSRSegmentSlicer.devices import DeviceProbe, deviceSummary
        probe = DeviceProbe(devicesCommand(sys.executable), commandEnvironment(os.environ))
        probe.start()
        while (devices := probe.poll()) is None:
            time.sleep(0.05)
        print(deviceSummary(devices))
        print("torch" in sys.modules)
        """
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [summary, "False"]


def test_device_probe_failures_are_one_line_for_the_panel(tmp_path):
    _, devices = _probe(
        [sys.executable, "-c", "import sys; print('Traceback', file=sys.stderr); sys.exit(3)"]
    )
    assert devices["torch"] is None and "(exit code 3): Traceback" in devices["error"]
    assert deviceSummary(devices).startswith("PyTorch is not usable here: ")
    _, devices = _probe([sys.executable, "-c", "print('not json')"])
    assert "exit code 0" in devices["error"]
    # Warnings longer than a pipe holds do not block the process until the timeout.
    chatty = 'import sys; sys.stderr.write(\'w\' * 400000); print(\'{"torch": "2.9.0", "cuda": null}\')'
    _, devices = _probe([sys.executable, "-c", chatty], timeoutS=20)
    assert devices == {"torch": "2.9.0", "cuda": None, "mps": False, "error": None}
    _, devices = _probe([str(tmp_path / "no-such-python")])
    assert "could not start" in devices["error"]

    probe, devices = _probe([sys.executable, "-c", "import time; time.sleep(60)"], timeoutS=0.5)
    assert "did not answer within 0.5 s" in devices["error"]
    assert probe._process.poll() is not None  # killed, not left running
    assert deviceArgument("gpu", devices) == "cuda"  # the engine then says no GPU is there


def test_parse_progress_line():
    line = json.dumps({"stage": "predict", "fraction": 0.25, "message": "window 3/12", "elapsed": 4.5})
    assert parseProgressLine(line + "\n") == {
        "kind": "progress",
        "stage": "predict",
        "fraction": 0.25,
        "message": "window 3/12",
        "elapsed": 4.5,
    }
    assert parseProgressLine('{"log": "using device cpu"}') == {
        "kind": "log",
        "message": "using device cpu",
    }
    assert parseProgressLine('{"stage": "write", "fraction": 1.7}')["fraction"] == 1.0
    assert parseProgressLine('{"log": "warning: the input image is constant"}') == {
        "kind": "warning",
        "message": "the input image is constant",
    }
    for garbage in [
        "",
        "Warning: something happened",
        "{not json",
        "[1, 2]",
        '{"stage": "read"}',
        '{"stage": "read", "fraction": "half"}',
        '{"stage": "read", "fraction": NaN}',
    ]:
        assert parseProgressLine(garbage) is None, garbage


def test_failure_message_is_one_clear_line():
    stderr = ["Traceback (most recent call last):", "  ...", "error: cannot read in.nrrd: not an image", ""]
    assert failureMessage(2, stderr) == "cannot read in.nrrd: not an image"
    assert "cancelled" in failureMessage(130, [])
    assert "PyTorch" in failureMessage(1, ["ModuleNotFoundError: No module named 'torch'"])
    assert "Out of memory" in failureMessage(1, ["torch.OutOfMemoryError: CUDA out of memory. Tried"])
    # Killed by the system (the out-of-memory killer), after some unrelated warning on stderr.
    killed = failureMessage(-9, ["UserWarning: TypedStorage is deprecated"])
    assert "most likely for lack of memory" in killed and "TypedStorage" not in killed
    # PythonSlicer (CTK's launcher) reports its killed Python child in a line of its own, exit code 1.
    launcher = failureMessage(
        1, ["error: [/opt/Slicer/bin/python-real] exit abnormally - Report the problem."]
    )
    assert "most likely for lack of memory" in launcher and "python-real" not in launcher
    assert (
        failureMessage(-11, ["Segmentation fault"])
        == "The segmentation process failed (exit code -11): Segmentation fault"
    )
    assert "\n" not in failureMessage(1, [])


def _write_card(folder, **card):
    folder.mkdir(parents=True)
    (folder / "model.json").write_text(json.dumps(card))


def test_model_cards_are_read_from_a_models_folder(tmp_path, caplog):
    _write_card(
        tmp_path / "brain-3d",
        name="ignored: the folder name is what --model resolves",
        description="Whole tumour",
        modality="MRI FLAIR",
        preprocessing={"spatial_dims": 3, "scale": 2, "channels": ["FLAIR"], "lr_spacing": [2.0, 2.0, 2.0]},
        threshold=0.45,
        validation={"dice_mean": 0.8912},
        robustness={"inputs": {"block": {"mean_dice": 0.8912}, "thick-slice-5mm": {"mean_dice": 0.8311}}},
    )
    _write_card(
        tmp_path / "breast-us-2d",
        modality="Ultrasound (B-mode)",
        preprocessing={"spatial_dims": 2, "scale": 2, "lr_longer_side": 160},
    )
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model.json").write_text("{ not json")
    (tmp_path / "no-card").mkdir()

    cards = readModelCards(tmp_path)
    assert [card["name"] for card in cards] == ["brain-3d", "breast-us-2d"]
    assert "broken" in caplog.text

    brain = modelSummary(cards[0])
    for expected in ["brain-3d: Whole tumour", "MRI FLAIR", "2 x 2 x 2 mm", "FLAIR", "x2", "0.891"]:
        assert expected in brain
    assert "On inputs made 2 ways: 0.831-0.891" in brain
    breast = modelSummary(cards[1])
    for expected in ["Ultrasound (B-mode)", "2D image", "160 pixels", "not recorded"]:
        assert expected in breast
    assert "inputs made" not in breast  # no robustness table in its card
    assert "brain-3d" in modelsHelpHtml(cards) and "No bundled model" in modelsHelpHtml([])
    assert readModelCards(tmp_path / "absent") == []


def _grid_rows(grid):
    """IJK-to-physical 4x4 rows of an engine Grid."""
    rows = [[grid.matrix[r][c] * grid.spacing[c] for c in range(3)] + [grid.origin[r]] for r in range(3)]
    return rows + [[0.0, 0.0, 0.0, 1.0]]


def test_roi_box_corners_and_bounds():
    corners = boxCorners([0, 1, 10, 12, -5, -4])
    assert len(set(corners)) == 8
    assert boundsOfPoints(corners) == [0, 1, 10, 12, -5, -4]
    with pytest.raises(ValueError):
        boundsOfPoints([])


def test_reference_geometry_is_the_engines_hr_grid():
    # An oblique, anisotropic input: the Slicer side must compute the same HR grid as the engine.
    rotation = sitk.VersorRigid3DTransform()
    rotation.SetRotation([0.2, 1, 0.1], 0.3)
    lr = Grid((7, 5, 3), (1.0, 2.0, 5.0), (10.0, -3.0, 4.0), tuple(rotation.GetMatrix()))
    hr = hr_grid(lr, 2)
    rows, dimensions = superResolvedGrid(_grid_rows(lr), lr.size, [2, 2, 2])
    assert dimensions == list(hr.size)
    assert np.allclose(rows, _grid_rows(hr), atol=1e-12)
    lr_bounds = voxelCornerBounds(_grid_rows(lr), lr.size)
    assert voxelCornerBounds(rows, dimensions) == pytest.approx(lr_bounds, abs=1e-9)
    assert voxelCornerBounds(rows, [14, 10, 7]) != pytest.approx(lr_bounds, abs=1e-3)

    # A 2D image held as a one-slice volume keeps its slice axis.
    rows, dimensions = superResolvedGrid(_grid_rows(lr), [7, 5, 1], [2, 2, 1])
    assert dimensions == [14, 10, 1]
    assert [row[2] for row in rows] == pytest.approx([row[2] for row in _grid_rows(lr)])
    card = {"preprocessing": {"scale": 2}}
    assert hrScales(card, [7, 5, 3]) == [2, 2, 2]
    assert hrScales(card, [7, 5, 1]) == [2, 2, 1]


def test_roi_overlap_is_decided_as_the_engine_decides():
    rows = _grid_rows(Grid((10, 8, 6), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1)))
    rasToIjk = np.linalg.inv(np.asarray(rows)).tolist()
    assert roiOverlapsGrid([2, 4, 2, 4, 2, 4], rasToIjk, [10, 8, 6])
    assert roiOverlapsGrid([-3, -0.9, 2, 4, 2, 4], rasToIjk, [10, 8, 6])  # touches the first voxel
    assert not roiOverlapsGrid([-3, -1.1, 2, 4, 2, 4], rasToIjk, [10, 8, 6])
    assert not roiOverlapsGrid([500, 510, 2, 4, 2, 4], rasToIjk, [10, 8, 6])
    # A flat ROI on a one-slice image gets the slice's thickness along the slice normal.
    rows = _grid_rows(Grid((10, 8, 1), (0.5, 0.5, 1.0), (0.0, 0.0, 4.0), (1, 0, 0, 0, 1, 0, 0, 0, 1)))
    assert sliceAxisBounds([1, 2, 1, 2, 4, 4], rows, [10, 8, 1]) == [1, 2, 1, 2, 3.5, 4.5]


def test_default_model_by_dimensionality_then_modality():
    cards = [
        {"name": "a-ct-3d", "modality": "CT", "preprocessing": {"spatial_dims": 3}},
        {"name": "b-brain-3d", "modality": "MRI FLAIR", "preprocessing": {"spatial_dims": 3}},
        {"name": "c-us-2d", "modality": "ultrasound (B-mode, breast)", "preprocessing": {"spatial_dims": 2}},
    ]
    assert defaultModelName(cards, 3) == "a-ct-3d"  # the engine's choice: the first by name
    assert defaultModelName(cards, 3, "MR") == "b-brain-3d"
    assert defaultModelName(cards, 3, "US") is None  # no 3D ultrasound model: none rather than a CT one
    assert defaultModelName(cards, 2, "US") == "c-us-2d"
    assert defaultModelName(cards[1:], 3, "CT") is None  # a CT never gets the brain MRI model unasked
    assert defaultModelName(cards, 3, "OT") == "a-ct-3d"  # "other" says nothing: by dimensionality
    assert defaultModelName(cards[1:], 3, "PT") is None  # a PET never gets the brain MRI model either
    assert defaultModelName(cards[:2], 2) is None
    assert gridSpatialDims([300, 200, 1]) == 2 and gridSpatialDims([30, 20, 2]) == 3


def test_image_sr_decoder_is_read_from_the_card():
    cards = {card["name"]: card for card in readModelCards()}
    if not cards:
        pytest.skip("no bundled model yet (Resources/Models is empty)")
    assert hasImageSrDecoder(cards["brain-tumour-flair-3d"])
    assert hasImageSrDecoder(cards["breast-ultrasound-2d"])
    assert not hasImageSrDecoder({"network": {"image_sr": False}})  # the baseline ablation
    assert hasImageSrDecoder({"network": {}})  # older cards: the network's default, the full network


def test_engine_messages_are_reworded_for_the_panel():
    assert panelMessage("--roi does not overlap the image; check that it is given in RAS millimetres") == (
        "the Region (ROI) does not overlap the input volume: move it over the image"
    )
    assert (
        panelMessage(
            "the input is a 2D image but model 'brain' is a 3D model; choose a 2D model with --model (see `models`)"
        )
        == "the input is a 2D image but model 'brain' is a 3D model; choose a 2D model in the Model list"
    )
    assert "--" not in panelMessage("model 'brain' has no image-SR decoder (image_sr=false); drop --sr-image")
    assert panelMessage("cannot read in.nrrd: not an image") == "cannot read in.nrrd: not an image"


def test_command_environment_puts_the_module_first_on_pythonpath():
    env = commandEnvironment({"PYTHONPATH": "/site", "HOME": "/h"}, Path("/mod"))
    assert env["PYTHONPATH"] == os.pathsep.join(["/mod", "/site"])
    assert env["HOME"] == "/h" and env["PYTHONUNBUFFERED"] == "1"
    assert commandEnvironment({}, Path("/mod"))["PYTHONPATH"] == "/mod"


def test_output_naming():
    paths = outputPathsForFiles(
        ["/a/case1.nii.gz", "/b/case1.nrrd", "/c/dicom_series", "/d/scan.v2.mha", "/e/.nrrd"], "/out"
    )
    assert [p.name for p in paths] == [
        "case1_lesions.nrrd",
        "case1 2_lesions.nrrd",
        "dicom_series_lesions.nrrd",
        "scan.v2_lesions.nrrd",
        ".nrrd_lesions.nrrd",
    ]
    assert all(p.parent == Path("/out") for p in paths)
    assert uniqueName("Lesion", []) == "Lesion"
    assert uniqueName("Lesion", ["Lesion", "Lesion 2"]) == "Lesion 3"
    assert outputNodeNames("FLAIR") == {
        "segmentation": "FLAIR lesions",
        "srImage": "FLAIR super-resolved",
        "table": "FLAIR lesion table",
    }
    assert [formatElapsed(s) for s in (0, 9.9, 75, 3723)] == ["0:00", "0:09", "1:15", "1:02:03"]


def test_lesion_table_columns_are_numeric(tmp_path):
    path = tmp_path / "lesions.csv"
    path.write_text("id,voxels,volume_mm3,centroid_ras_x,note\n1,120,15.0,-3.5,a\n2,8,1.0,12,\n")
    columns = dict(readCsvColumns(path))
    assert columns == {
        "id": [1, 2],
        "voxels": [120, 8],
        "volume_mm3": [15.0, 1.0],
        "centroid_ras_x": [-3.5, 12.0],
        "note": ["a", ""],
    }
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert readCsvColumns(empty) == []


# ------------------------------------------------------------------------------------ process runner


def _script(tmp_path, name, body):
    path = tmp_path / name
    path.write_text("import json, signal, subprocess, sys, time\n" + body)
    return [sys.executable, str(path)]


def _drive(runner, events, until, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, f"timed out; events so far: {events}"
        events.extend(runner.poll())
        time.sleep(0.02)


def test_runner_streams_progress_and_reports_the_error_line(tmp_path):
    command = _script(
        tmp_path,
        "engine.py",
        """
for k in range(3):
    print(json.dumps({"stage": "predict", "fraction": k / 2, "message": f"{k}", "elapsed": k}), flush=True)
print(json.dumps({"log": "device: cpu"}), flush=True)
print(json.dumps({"log": "warning: the input image is constant"}), flush=True)
print("a stray print", flush=True)
print("warning: printed without --progress json", file=sys.stderr)
print("Traceback: details", file=sys.stderr)
print("error: the input is 4D", file=sys.stderr)
sys.exit(2)
""",
    )
    runner = SegmentRunner(command)
    runner.start()
    events = []
    assert runner.wait(onEvent=events.append) == 2
    progress = [e for e in events if e["kind"] == "progress"]
    assert [e["fraction"] for e in progress] == [0.0, 0.5, 1.0]
    assert {"kind": "log", "message": "device: cpu"} in events
    assert [e["message"] for e in events if e["kind"] == "stderr"] == [
        "Traceback: details",
        "error: the input is 4D",
    ]
    # Standard output and standard error are read apart: their lines' relative order is not kept.
    assert sorted(runner.warnings) == ["printed without --progress json", "the input image is constant"]
    assert not runner.cancelled
    assert failureMessage(runner.returnCode, runner.stderrLines) == "the input is 4D"


def _running(tmp_path, name, body, **options):
    """A runner of the script `body`, started and driven until its first line has arrived."""
    runner = SegmentRunner(_script(tmp_path, name, body), **options)
    runner.start()
    events = []
    _drive(runner, events, lambda: events)
    return runner, events


@POSIX_ONLY
def test_runner_cancel_ends_a_process_that_honours_sigterm(tmp_path):
    runner, events = _running(
        tmp_path,
        "engine.py",
        """
def stop(signum, frame):
    print("cancelled", file=sys.stderr, flush=True)
    sys.exit(130)
signal.signal(signal.SIGTERM, stop)
print(json.dumps({"stage": "predict", "fraction": 0.1}), flush=True)
time.sleep(60)
""",
    )
    started = time.monotonic()
    runner.cancel()
    _drive(runner, events, lambda: runner.finished)
    assert time.monotonic() - started < CANCEL_GRACE_S
    assert runner.cancelled and runner.returnCode == 130
    assert list(runner.stderrLines) == ["cancelled"]


@POSIX_ONLY
def test_runner_cancel_kills_a_stubborn_process_and_its_children(tmp_path):
    # Like the PythonSlicer launcher: the process we start runs the engine in a child of its own.
    runner, events = _running(
        tmp_path,
        "launcher.py",
        """
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import signal, time; "
                          "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"])
print(json.dumps({"log": str(child.pid)}), flush=True)
time.sleep(60)
""",
        cancelGraceS=0.5,
    )
    childPid = int(events[0]["message"])
    runner.cancel()
    _drive(runner, events, lambda: runner.finished)
    assert runner.cancelled and runner.returnCode == -signal.SIGKILL
    assert _ends(childPid), "the child outlived Cancel"


def _ends(pid, timeoutS=5.0):
    """Whether process `pid` is gone (or a zombie) within `timeoutS`."""
    status = Path(f"/proc/{pid}/status")
    deadline = time.monotonic() + timeoutS
    while status.exists() and "State:\tZ" not in status.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not status.exists() or "State:\tZ" in status.read_text()


@POSIX_ONLY
def test_device_probe_timeout_ends_the_python_the_launcher_started(tmp_path):
    """PythonSlicer is a launcher: the Python it starts, which imports torch, is ended with it."""
    pid_file = tmp_path / "child.pid"
    launcher = (
        "import subprocess, sys, time; "
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"open({str(pid_file)!r}, 'w').write(str(child.pid)); time.sleep(60)"
    )
    _, devices = _probe([sys.executable, "-c", launcher], timeoutS=1.0)
    assert "did not answer within 1 s" in devices["error"]
    assert _ends(int(pid_file.read_text()))


def test_runner_terminate_returns_once_every_holder_of_its_output_has_ended(tmp_path):
    """The run's folder is deleted right after terminate(): nothing may still hold its files then."""
    runner, _ = _running(
        tmp_path,
        "launcher.py",
        """
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print(json.dumps({"log": str(child.pid)}), flush=True)
time.sleep(60)
""",
        cancelGraceS=0.5,
    )
    runner.terminate()
    assert runner._process.poll() is not None and not any(reader.is_alive() for reader in runner._readers)


# ------------------------------------------------------------------------------------ end to end


def test_the_logic_command_segments_the_sample_at_twice_the_resolution(tmp_path):
    """The exact command the Logic builds, run as a subprocess on the shipped sample."""
    if not readModelCards():
        pytest.skip("no bundled model yet (Resources/Models is empty)")
    output, table = tmp_path / "lesions.nrrd", tmp_path / "lesions.csv"
    command = segmentCommand(
        pythonExecutable(), paths.SAMPLE_PATH, output, device="cpu", lesionTablePath=table
    )
    runner = SegmentRunner(command, env=commandEnvironment(os.environ), cwd=str(paths.MODULE_DIR))
    runner.start()
    events = []
    runner.wait(onEvent=events.append)
    assert runner.returnCode == 0, failureMessage(runner.returnCode, runner.stderrLines)
    assert any(e["kind"] == "progress" and e["fraction"] == 1.0 for e in events)

    lr, hr = sitk.ReadImage(str(paths.SAMPLE_PATH)), sitk.ReadImage(str(output))
    assert hr.GetSize() == tuple(2 * n for n in lr.GetSize())
    assert hr.GetSpacing() == pytest.approx([s / 2 for s in lr.GetSpacing()])
    assert hr.GetDirection() == pytest.approx(lr.GetDirection())
    low = lr.TransformContinuousIndexToPhysicalPoint([-0.5] * 3)
    assert hr.TransformContinuousIndexToPhysicalPoint([-0.5] * 3) == pytest.approx(low, abs=1e-4)
    assert sitk.GetArrayViewFromImage(hr).max() == 1, "no lesion found in the sample"
    columns = dict(readCsvColumns(table))
    assert {"id", "volume_mm3", "longest_diameter_mm"} <= set(columns) and columns["id"]
